"""Where is every rank? Stack dumps on demand and whenever a job is stopped.

The hang is real: in ``hang_app.py`` rank 1 waits for data that never comes while
rank 0 blocks in a gloo all_reduce it never joins (native code: only a signal-level
dump reaches it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hydra_torchrun_callback._report.frames import (
    Frame,
    group_by_frame,
    main_thread_frames,
    parse_dumps,
    where,
)

from conftest import APPS, app_env, start_app, wait_started
from multinode_scenarios import stacks_cli


def _line(snippet: str) -> int:
    """Line of ``snippet`` in hang_app.py (what a dump must point at)."""
    lines = (APPS / "hang_app.py").read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if snippet in line)


SLEEP = _line("time.sleep(seconds)")  # in wait_for_data
ALL_REDUCE = _line("dist.all_reduce(torch.ones(1))")


def _start(tmp_path: Path, *overrides: str) -> tuple[subprocess.Popen[str], Path]:
    out = tmp_path / "out"
    proc = start_app(
        tmp_path,
        "hydra.callbacks.torchrun.nproc_per_node=2",
        f"hydra.run.dir={out}",
        *overrides,
        script="hang_app.py",
        start_new_session=True,  # its own process group: Ctrl-C is sent to the group
    )
    return proc, out


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("start_method", ["spawn", "fork", "forkserver"])
def test_on_demand_then_on_sigterm(tmp_path: Path, start_method: str) -> None:
    proc, out = _start(tmp_path, f"hydra.callbacks.torchrun.start_method={start_method}")
    try:
        wait_started(out, 2, proc)
        cli = stacks_cli(out, app_env())
        assert cli.returncode == 0, cli.stdout + cli.stderr
        text = cli.stdout
        assert "2/2 rank(s) dumped, 1/1 node(s) answered" in text, text
        # Grouped by innermost frame, with the user's own frame for library code.
        assert "rank 0: all_reduce (distributed_c10d.py:" in text, text
        assert "<- main (hang_app.py:" in text, text
        assert "rank 1: wait_for_data (hang_app.py:" in text, text
        assert f'File "{APPS / "hang_app.py"}", line' in text  # real file, real line
        assert "spawn_main" not in text and "run_worker" not in text  # plumbing left out
        assert proc.poll() is None  # asking stopped nothing

        os.kill(proc.pid, signal.SIGTERM)  # scancel / a time limit
        sent = time.monotonic()
        output = _finish(proc)
        stopped_after = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, output
    assert stopped_after < 25, stopped_after  # dumping adds no wait (torch's close waits 30 s)
    logs = [(out / f"hang_app_rank{r}.log").read_text() for r in (0, 1)]
    for log in logs:
        assert ", on request," in log and ", when the job stopped it," in log, log
        assert "in prefetch_loop" in log  # all threads
    stop_block = logs[0].split(", when the job stopped it,", 1)[1]
    assert "line" in stop_block and "in all_reduce" in stop_block
    assert "in wait_for_data" in logs[1].split(", when the job stopped it,", 1)[1]

    summary = json.loads((out / "torchrun_summary.json").read_text())
    assert summary["status"] == "INTERRUPTED"
    assert summary["root_cause"] == "stopped by SIGTERM (exit status 143)"
    rows = {row["rank"]: row for row in summary["ranks"]}
    assert rows[0]["frame"]["function"] == "all_reduce"
    assert rows[0]["stopped_in"].endswith(f" <- main (hang_app.py:{ALL_REDUCE})"), rows[0]
    assert rows[1]["frame"] == {
        "function": "wait_for_data",
        "file": str(APPS / "hang_app.py"),
        "line": SLEEP,
    }
    node_log = (out / "hang_app.log").read_text()
    assert "where the ranks were when the job stopped them" in node_log
    assert f"rank 1: wait_for_data (hang_app.py:{SLEEP})" in node_log
    assert not (out / ".torchrun_stacks").exists()
    assert stacks_cli(out, app_env()).returncode == 2  # no running job any more


def test_a_failure_dumps_the_ranks_it_leaves_blocked(tmp_path: Path) -> None:
    proc, out = _start(tmp_path, "sleeper=0", "fail_rank=1", "collective=false")
    wait_started(out, 2, proc)
    (out / "release").touch()  # rank 1 raises now; rank 0 waits on
    output = _finish(proc)
    assert proc.returncode == 1, output
    summary = json.loads((out / "torchrun_summary.json").read_text())
    rows = {row["rank"]: row for row in summary["ranks"]}
    assert "data shard missing" in rows[1]["root_cause"]
    assert rows[1]["stopped_in"] is None  # it raised: its traceback is the root cause
    assert rows[0]["stopped_in"] == f"wait_for_data (hang_app.py:{SLEEP})", rows[0]
    assert ", when the job stopped it," in (out / "hang_app_rank0.log").read_text()


def test_ctrl_c_dumps_every_rank(tmp_path: Path) -> None:
    proc, out = _start(tmp_path, "collective=false")
    wait_started(out, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    output = _finish(proc)
    assert proc.returncode != 0, output
    for rank in (0, 1):
        log = (out / f"hang_app_rank{rank}.log").read_text()
        assert ", when the job stopped it," in log and "in wait_for_data" in log, log
    summary = json.loads((out / "torchrun_summary.json").read_text())
    wheres = {row["stopped_in"] for row in summary["ranks"]}
    assert wheres == {f"wait_for_data (hang_app.py:{SLEEP})"}


def test_signal_to_the_hydra_process_dumps_its_ranks(tmp_path: Path) -> None:
    """SIGURG (the documented signal) to a node's Hydra process: no stop, dumps logged."""
    proc, out = _start(tmp_path)
    try:
        wait_started(out, 2, proc)
        os.kill(proc.pid, signal.SIGURG)
        deadline = time.monotonic() + 15
        log = ""
        while "where this node's ranks are" not in log and time.monotonic() < deadline:
            time.sleep(0.2)
            log = (out / "hang_app.log").read_text()
        assert f"rank 1: wait_for_data (hang_app.py:{SLEEP})" in log, log
        assert ", on SIGURG," in (out / "hang_app_rank0.log").read_text()
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGTERM)
        _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_no_running_job(tmp_path: Path) -> None:
    cli = stacks_cli(tmp_path, app_env())
    assert cli.returncode == 2 and "no running torchrun job" in cli.stderr


# -- reading faulthandler's output (produced by a real faulthandler, not written by hand)
_DUMPER = """
import faulthandler, os, signal, sys, threading, time
f = open(sys.argv[1], "ab", buffering=0)
faulthandler.register(signal.SIGURG, file=f, all_threads=True)
def helper(ev):
    ev.wait()
threading.Thread(target=helper, args=(threading.Event(),), daemon=True).start()
def inner():
    os.kill(os.getpid(), signal.SIGURG)
    os.kill(os.getpid(), signal.SIGURG)
inner()
print(threading.main_thread().ident)
"""


def _real_dumps(tmp_path: Path) -> tuple[Path, str, int]:
    """(the dumper script, the two dumps it wrote, its main thread's ident)."""
    script, dump = tmp_path / "dumper.py", tmp_path / "dump.txt"
    script.write_text(_DUMPER)
    ident = int(
        subprocess.run(
            [sys.executable, str(script), str(dump)], capture_output=True, text=True, check=True
        ).stdout
    )
    return script, dump.read_text(), ident


def test_parse_two_appended_dumps(tmp_path: Path) -> None:
    script, text, ident = _real_dumps(tmp_path)
    dumps = parse_dumps(text)
    assert len(dumps) == 2
    for found in dumps:
        assert sorted(found) == sorted({ident, *found})  # the main thread is among them
        main = found[ident]
        assert [f.function for f in main] == ["inner", "<module>"]
        assert main[0].file == str(script) and main[0].line in (9, 10)
        other = next(frames for t, frames in found.items() if t != ident)
        assert "helper" in [f.function for f in other]
        assert list(found)[-1] == ident  # faulthandler writes the main thread last
    assert [f.function for f in main_thread_frames(dumps, ident)] == ["inner", "<module>"]
    assert main_thread_frames(dumps, None) == dumps[0][ident]  # no ident: the last thread


def test_stop_dump_cut_short_by_a_second_signal(tmp_path: Path) -> None:
    """scancel: SLURM and the agent both send SIGTERM. faulthandler chains with
    SA_NODEFER, so the second starts a new dump inside the first (cut after the helper
    thread's first frame) and ends the process. The main thread is where it was."""
    _, text, ident = _real_dumps(tmp_path)
    real = text.splitlines(keepends=True)
    heads = [i for i, line in enumerate(real) if "(most recent call first)" in line]
    second = heads[len(heads) // 2]  # the second dump starts here
    cut = "".join(real[: heads[0] + 2]) + "".join(real[second:])
    assert cut.count("(most recent call first)") == len(heads) // 2 + 1
    dumps = parse_dumps(cut)
    assert ident not in dumps[0] and len(dumps[0]) == 1  # only the helper's first frame
    assert [f.function for f in main_thread_frames(dumps, ident)] == ["inner", "<module>"]
    assert where(main_thread_frames(dumps, ident) or []).startswith("inner (dumper.py:")
    # faulthandler writes a line in many small writes: the cut can fall mid-line, and the
    # second dump's first header is then glued to the partial line.
    half = real[heads[0] + 1][:12]
    glued = "".join(real[: heads[0] + 1]) + half + "".join(real[second:])
    dumps = parse_dumps(glued)
    assert len(dumps) == 2 and ident not in dumps[0], dumps
    assert [f.function for f in main_thread_frames(dumps, ident)] == ["inner", "<module>"]
    # Cut right after the main thread's header: that dump has it without frames.
    main_head = next(i for i in heads[: len(heads) // 2] if f"{ident:#018x}" in real[i])
    headless = "".join(real[: main_head + 1]) + "".join(real[second:])
    dumps = parse_dumps(headless)
    assert dumps[0][ident] == [], dumps
    assert [f.function for f in main_thread_frames(dumps, ident)] == ["inner", "<module>"]
    # Killed inside the first dump: no dump reached the main thread, so nothing is
    # reported rather than the helper thread's frame.
    assert main_thread_frames(parse_dumps("".join(real[: heads[0] + 2])), ident) is None


def test_where_and_groups() -> None:
    lib = Frame("/v/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py", 9, "f")
    own = Frame("/home/me/train.py", 42, "main")
    assert where([lib, own]) == "f (distributed_c10d.py:9) <- main (train.py:42)"
    assert where([own]) == "main (train.py:42)"
    assert where([]) == "<no Python frame>"
    groups = group_by_frame({0: "a", 1: "a", 2: "b", 3: "a"})
    assert groups == [([0, 1, 3], "a"), ([2], "b")]
