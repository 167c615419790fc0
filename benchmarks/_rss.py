"""Run a script or module as __main__; at exit, record this process's peak RSS and timestamps.

usage: python _rss.py OUTFILE (-m MODULE | SCRIPT) [args...]

OUTFILE gets JSON: ``maxrss_kib`` (peak RSS of this process, the Hydra process or torchrun's
agent), ``created`` (process creation, 10 ms ticks) and ``python_up`` (the interpreter has
started and runs this file), which splits "interpreter start" off the launcher's own work.
"""

import time

python_up = time.time()

import atexit  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402

from _clock import process_start  # noqa: E402

out = sys.argv[1]
created = process_start()


def _write() -> None:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with open(out, "w") as f:
        json.dump({"maxrss_kib": rss, "created": created, "python_up": python_up}, f)


atexit.register(_write)
if sys.argv[2] == "-m":
    sys.argv = [sys.argv[3], *sys.argv[4:]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
