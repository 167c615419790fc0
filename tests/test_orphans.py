"""Nothing outlives the Hydra process: every start method, every way it can be stopped.

SIGKILL is what the OOM killer, SLURM's final kill after KillWait and a lost node do:
the agent gets no chance to stop its workers. With the warm start (forkserver) the
workers are children of the preloaded server, not of the agent, so this is where
orphans holding GPUs would come from. Each test counts every process that carries
the test's tag in its environment (the Hydra process, the server, multiprocessing's
resource tracker, the workers) after the signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import app_env, processes_with_tag, start_app, wait_started

#: hang_app imports torch at the top: "forkserver" is a warm server forked from the Hydra
#: process; "forkserver+fresh" a spawned one (warm_server=fresh, as for a lazy app).
START_METHODS = ["forkserver", "forkserver+fresh", "spawn", "fork"]
SIGNALS = [signal.SIGKILL, signal.SIGTERM, signal.SIGINT]
GONE_WITHIN_S = 12.0  # worst seen 3.85 s; under submitit's 15 s give-up on a sweep
TWO_NODES = [  # two emulated nodes (submitit_local tasks), one worker each
    "hydra/launcher=submitit_local",
    "hydra.launcher.tasks_per_node=2",
    "hydra.launcher.timeout_min=60",
    "hydra.callbacks.torchrun.nproc_per_node=1",
]
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report() -> object:
    yield
    print("\nall processes gone after (s): " + ", ".join(f"{k}: {v:.2f}" for k, v in TIMES.items()))


def _describe(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120]
            out.append(f"{pid}: {cmd.decode(errors='replace')}")
        except OSError:
            continue
    return out


def _gone(tag: str, since: float, but: int = 0) -> float:
    """Wait until no process of the test is left (``but`` that one); return how long
    after ``since``."""
    deadline = time.monotonic() + GONE_WITHIN_S
    while True:
        left = [pid for pid in processes_with_tag(tag) if pid != but]
        if not left:
            return time.monotonic() - since
        if time.monotonic() > deadline:
            described = _describe(left)
            for pid in left:  # ours (tagged): do not leave them to the next test
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            pytest.fail(f"{len(left)} process(es) outlived the job: {described}")
        time.sleep(0.05)


def _start(
    tmp_path: Path, tag: str, *overrides: str, multirun: bool = False
) -> subprocess.Popen[bytes]:
    out = tmp_path / ("multi" if multirun else "out")
    # Output to a file, not a pipe: a leftover holding the pipe must not hang the test.
    with open(tmp_path / "app.log", "wb") as log:
        return start_app(
            tmp_path,
            f"hydra.{'sweep' if multirun else 'run'}.dir={out}",
            *overrides,
            script="hang_app.py",
            multirun=multirun,
            env=app_env(HTR_TEST_TAG=tag, HTR_IMPORT_PROBE=str(tmp_path / "imports.txt")),
            stdout=log,
            text=False,
        )


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("start_method", START_METHODS)
def test_one_machine(tmp_path: Path, start_method: str, sig: signal.Signals) -> None:
    """Rank 0 blocks in a gloo all_reduce (native code), rank 1 sleeps."""
    tag = uuid.uuid4().hex
    method, _, warm = start_method.partition("+")
    proc = _start(
        tmp_path,
        tag,
        "hydra.callbacks.torchrun.nproc_per_node=2",
        f"hydra.callbacks.torchrun.start_method={method}",
        f"hydra.callbacks.torchrun.warm_server={warm or 'auto'}",
    )
    try:
        started = wait_started(tmp_path / "out", 2, proc)
        assert {s["agent_pid"] for s in started} == {proc.pid}
        before = processes_with_tag(tag)
        assert len(before) >= 3, _describe(before)  # the Hydra process + 2 workers at least
        sent = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    TIMES[f"{start_method} {sig.name}"] = _gone(tag, sent)


@pytest.mark.parametrize(
    ("start_method", "sig"),
    [
        ("forkserver", signal.SIGKILL),
        ("forkserver", signal.SIGINT),
    ],
    ids=lambda v: getattr(v, "name", v),
)
def test_emulated_nodes(tmp_path: Path, start_method: str, sig: signal.Signals) -> None:
    """Both nodes' Hydra processes (the submitit tasks that run the agents) get the
    signal, as on a node that is lost or OOM-killed (SIGTERM: test_faults; spawn and
    fork workers are the agent's own children, as on one machine)."""
    tag = uuid.uuid4().hex
    proc = _start(
        tmp_path,
        tag,
        *TWO_NODES,
        f"hydra.callbacks.torchrun.start_method={start_method}",
        multirun=True,
    )
    try:
        started = wait_started(tmp_path / "multi" / "0", 2, proc)
        agents = {s["agent_pid"] for s in started}
        assert len(agents) == 2 and proc.pid not in agents
        sent = time.monotonic()
        for pid in agents:
            os.kill(pid, sig)
        # The nodes' processes go first; the sweep then returns when submitit gives up
        # waiting for the killed tasks' results (its own 15 s).
        TIMES[f"2 nodes {start_method} {sig.name}: nodes"] = _gone(tag, sent, but=proc.pid)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, (tmp_path / "app.log").read_text()
    TIMES[f"2 nodes {start_method} {sig.name}: all"] = _gone(tag, sent)


@pytest.mark.parametrize("warm_server", ["auto", "fresh"])
def test_warm_server_is_single_threaded_and_never_imports_the_task(
    tmp_path: Path, warm_server: str
) -> None:
    """Forking is safe only from a process with one thread (and no CUDA context: torch
    creates it lazily, and nothing preloaded asks for it; checked on GPUs by
    scripts/gpu_check.sh). The app imports torch at the top, so by default the server
    is a fork of the Hydra process (torch imported once on the node): the workers
    inherit the task's module as the Hydra process imported it. A fresh server
    (warm_server=fresh) never imports the task's module: the workers do."""
    tag = uuid.uuid4().hex
    proc = _start(
        tmp_path,
        tag,
        "hydra.callbacks.torchrun.nproc_per_node=2",
        f"hydra.callbacks.torchrun.warm_server={warm_server}",
    )
    try:
        started = wait_started(tmp_path / "out", 2, proc)
        server = {_parent(s["pid"]) for s in started}
        assert len(server) == 1 and server != {proc.pid}
        (pid,) = server
        assert _parent(pid) == proc.pid
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if warm_server == "fresh":
            assert b"multiprocessing.forkserver" in cmdline
        else:  # a fork: the Hydra process's command line
            assert cmdline == Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        threads = [
            line
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("Threads:")
        ]
        assert threads == ["Threads:\t1"]
        imports = {int(x) for x in (tmp_path / "imports.txt").read_text().split()}
        assert pid not in imports and proc.pid in imports
        workers = {s["pid"] for s in started}
        if warm_server == "fresh":  # each worker imported the task's module
            assert workers <= imports
        else:  # imported once, by the Hydra process, before the fork
            assert imports == {proc.pid}
    finally:
        proc.kill()
        proc.wait()
    _gone(tag, time.monotonic())


def test_agent_killed_alone(tmp_path: Path) -> None:
    """The warm start's agent runs in a fork of the server, beside its workers: if that
    fork alone is SIGKILLed (the OOM killer's pick), its workers are no one's children
    but the server's. The Hydra process fails the job, naming the agent's exit, and
    ends them."""
    tag = uuid.uuid4().hex
    proc = _start(tmp_path, tag, "hydra.callbacks.torchrun.nproc_per_node=2")
    try:
        started = wait_started(tmp_path / "out", 2, proc)
        workers = {s["pid"] for s in started}
        (server,) = {_parent(pid) for pid in workers}
        assert _parent(server) == proc.pid
        agents = [
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit()
            and int(p.name) not in workers
            and _parent_or_0(int(p.name)) == server
        ]
        assert len(agents) == 1, _describe(agents)
        sent = time.monotonic()
        os.kill(agents[0], signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = (tmp_path / "app.log").read_text()
    assert proc.returncode == 1, output
    assert f"agent's process (pid {agents[0]}) ended without a result (exit code -9)" in output
    TIMES["agent killed alone"] = _gone(tag, sent)


def _parent_or_0(pid: int) -> int:
    try:
        return _parent(pid)
    except (OSError, ValueError, IndexError):
        return 0


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_emulated_nodes_when_the_launcher_is_killed(tmp_path: Path) -> None:
    """SIGKILL of the Hydra process the user started (not the nodes'): submitit's local
    controller and the nodes would run on unwatched; each node notices and stops."""
    tag = uuid.uuid4().hex
    proc = _start(
        tmp_path,
        tag,
        *TWO_NODES,
        multirun=True,
    )
    try:
        wait_started(tmp_path / "multi" / "0", 2, proc)
        sent = time.monotonic()
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    TIMES["2 nodes, launcher SIGKILL"] = _gone(tag, sent)
    log = (tmp_path / "multi" / "0").glob("*.log")
    assert any("launched this emulated node" in p.read_text() for p in log)
