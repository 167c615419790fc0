"""Run a script or module as __main__ and record this process's peak RSS at exit.

usage: python _rss.py OUTFILE (-m MODULE | SCRIPT) [args...]
"""

import atexit
import resource
import runpy
import sys

out = sys.argv[1]


def _write() -> None:
    with open(out, "w") as f:
        f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))  # KiB on Linux


atexit.register(_write)
if sys.argv[2] == "-m":
    sys.argv = [sys.argv[3], *sys.argv[4:]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
