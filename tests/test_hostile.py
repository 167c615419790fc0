"""Another user on the cluster network against our stores: nothing it writes is ever
unpickled, forged values never change a job's outcome, foreign stores are refused, and
values too large for one TCPStore message still arrive.

The attacker is a plain ``torch.distributed.TCPStore`` client that knows only the port
(and the key names, from this source). Its pickles would create a marker directory if
anything ever loaded them.
"""

from __future__ import annotations

import base64
import os
import pickle
import re
import socket
import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from hydra_torchrun_callback._node.coordinator import JobCoordinator
from hydra_torchrun_callback._node.placement import candidate_ports, resolve_placement
from hydra_torchrun_callback._options import parse_options
from hydra_torchrun_callback._result import TorchrunSetupError
from hydra_torchrun_callback._wire.store import (
    HELLO_WAIT_S,
    JobStore,
    SecretError,
    Signer,
    load_secret,
)

from conftest import app_env, free_port, run_app, start_app, wait_started

LOCAL = [
    "hydra/launcher=submitit_local",
    "hydra.launcher.tasks_per_node=2",
    "hydra.launcher.timeout_min=60",
]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> Any:
        return (os.mkdir, (self.marker,))


class Attacker(threading.Thread):
    """Connects to host:port as soon as something listens and keeps writing ``forged``."""

    def __init__(self, host: str, port: int, forged: dict[str, bytes], duration: float) -> None:
        super().__init__(daemon=True)
        self.host, self.port, self.forged, self.duration = host, port, forged, duration
        self.writes = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 120
        store = None
        while store is None and time.monotonic() < deadline:
            # A plain connect probe every 5 ms: a TCPStore client that finds nothing
            # retries for its whole timeout and then backs off for up to seconds more, long
            # enough to miss a store that lives only a few seconds on a loaded machine.
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
            except OSError:
                time.sleep(0.005)
                continue
            try:
                store = dist.TCPStore(  # type: ignore[attr-defined]
                    self.host,
                    self.port,
                    is_master=False,
                    timeout=timedelta(seconds=5),
                    wait_for_workers=False,
                )
            except Exception:
                time.sleep(0.005)
        if store is None:
            self.error = TimeoutError("nothing listened")
            return
        until = time.monotonic() + self.duration
        while time.monotonic() < until:
            try:
                for key, value in self.forged.items():
                    store.set(key, value)
                    self.writes += 1
            except Exception as exc:  # the job ended and its store with it
                self.error = exc
                return
            time.sleep(0.005)


def _rendezvous_forgery(run_id: str, marker: Path) -> dict[str, bytes]:
    """What torch's c10d backend would unpickle: base64 of a pickle."""
    return {f"torch.rendezvous.{run_id}": base64.b64encode(pickle.dumps(_Evil(marker)))}


def test_forged_rendezvous_state_on_one_machine(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    port = free_port()
    attacker = Attacker("127.0.0.1", port, _rendezvous_forgery("hostile1", marker), 3.0)
    attacker.start()
    run = run_app(
        tmp_path,
        "hydra.callbacks.torchrun.nproc_per_node=2",
        f"hydra.callbacks.torchrun.master_port={port}",
        "hydra.callbacks.torchrun.rdzv_id=hostile1",
        "sleep_before=1",
    )
    attacker.join()
    assert attacker.writes > 0, attacker.error
    assert not marker.exists()  # nothing unpickled the forged state
    assert run.proc.returncode == 0, run.output
    assert run.records[0]["value"]["rank"] == 0 and run.records[0]["value"]["sum"] == 1
    assert "rejected a forged value for key 'torch.rendezvous.hostile1'" in run.output


def _wait_for_placement(log: Path, proc: subprocess.Popen[str]) -> tuple[int, str]:
    deadline = time.monotonic() + 120
    pattern = re.compile(r"rendezvous at [^:]+:(\d+), rdzv_id=(\S+),")
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the job ended early"
        if log.exists():
            found = pattern.search(log.read_text())
            if found:
                return int(found.group(1)), found.group(2)
        time.sleep(0.05)
    raise AssertionError("no placement line")


def test_forged_values_on_two_nodes(tmp_path: Path) -> None:
    """Failure records, result, claims, heartbeats and rendezvous state, all forged while
    a 2-node job runs: it completes with its true result and nothing is unpickled."""
    marker = tmp_path / "PWNED"
    out = tmp_path / "multi"
    rec = tmp_path / "recorder.jsonl"
    proc = start_app(
        tmp_path,
        "hydra.callbacks.torchrun.nproc_per_node=2",
        *LOCAL,
        "sleep_before=4",
        "+hydra.callbacks.recorder._target_=recorder.Recorder",
        f"+hydra.callbacks.recorder.path={rec}",
        f"hydra.sweep.dir={out}",
        multirun=True,
    )
    try:
        port, run_id = _wait_for_placement(out / "0" / "probe_app.log", proc)
        # Once the rendezvous is done (a job's whole life but its first second): a forgery
        # that races a rendezvous can break it (denial of service, a clear error), which is
        # what the one-machine test and the README's threat model cover.
        wait_started(out / "0", 4, proc)
        evil = pickle.dumps(_Evil(marker))
        prefix = f"hydra_torchrun/{run_id}/"
        forged = {
            prefix + "failure": evil,
            prefix + "failure/1": evil,
            prefix + "result": evil,
            prefix + "result#0": evil,
            prefix + "first_failed_rank": b"3",
            prefix + "first_failure": b'{"rank": 3}',
            prefix + "hb/1": b'{"beat": 1, "done": true}',
            **_rendezvous_forgery(run_id, marker),
        }
        attacker = Attacker("127.0.0.1", port, forged, 3.0)
        attacker.start()
        output, _ = proc.communicate(timeout=180)
        attacker.join()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert attacker.writes > 0, attacker.error
    assert not marker.exists()
    assert proc.returncode == 0, output
    import json

    records = [json.loads(line) for line in rec.read_text().splitlines()]
    node0 = next(r for r in records if r["task"] == 0)
    assert node0["status"] == "COMPLETED" and node0["value"]["rank"] == 0
    assert node0["value"]["sum"] == 6
    log = (out / "0" / "probe_app.log").read_text() + output
    assert f"rejected a forged value for key '{prefix}failure'" in log, log
    summary = json.loads((out / "0" / "torchrun_summary.json").read_text())
    assert summary["status"] == "COMPLETED" and len(summary["ranks"]) == 4


def test_huge_exception_text_on_node_1_keeps_the_root_cause(tmp_path: Path) -> None:
    """A 9 MB exception message (over TCPStore's 8 MiB per value): capped, never lost."""
    run = run_app(
        tmp_path,
        *LOCAL,
        "hydra.callbacks.torchrun.nproc_per_node=2",
        "fail_group=1",
        "fail_local=1",
        "fail_delay=1",
        "fail_pad_mb=9",
        multirun=True,
    )
    ended = time.time()
    assert run.proc.returncode == 1, run.output[-3000:]
    failed_at = float((run.out / "0" / "failed_at").read_text())
    assert ended - failed_at < 30, ended - failed_at
    node0 = next(r for r in run.records if r["task"] == 0)
    attrs = node0["error_attrs"]
    assert (attrs["node_rank"], attrs["exc_type"]) == (1, "ValueError"), attrs
    assert "probe failure on rank" in node0["error"] and "characters cut" in node0["error"]
    assert len(node0["error"]) < 200_000
    summary = (run.out / "0" / "torchrun_summary.json").read_text()
    assert len(summary) < 1_000_000


def test_100_mb_result_of_rank_0_on_node_1(tmp_path: Path) -> None:
    """Rank 0 runs on node 1 (its local_addr sorts first in the rendezvous); its 100 MB
    value reaches node 0 in signed chunks."""
    extra = tmp_path / "extra" / "flip"
    extra.mkdir(parents=True)
    (extra / "on.yaml").write_text(  # per node: too nested for a command-line override
        "# @package _global_\n"
        "flip: {n0: 127.0.0.3, n1: 127.0.0.2}\n"
        "hydra:\n  callbacks:\n    torchrun:\n"
        "      local_addr: \"${oc.select:'flip.n${oc.env:SUBMITIT_LOCAL_GLOBALID,0}'}\"\n"
    )
    run = run_app(
        tmp_path,
        *LOCAL,
        "hydra.callbacks.torchrun.nproc_per_node=1",
        "+flip=on",
        "returns=bytes",
        "return_mb=100",
        multirun=True,
        timeout=300,
        flags=(f"--config-dir={tmp_path / 'extra'}",),
    )
    assert run.proc.returncode == 0, run.output[-3000:]
    import json

    summary = json.loads((run.out / "0" / "torchrun_summary.json").read_text())
    assert [r["node"] for r in summary["ranks"] if r["rank"] == 0] == [1]  # off node 0
    node0 = next(r for r in run.records if r["task"] == 0)
    assert node0["status"] == "COMPLETED" and node0["value_len"] == 100 * 1024 * 1024


# -- the handshake and the key file, with real coordinators and stores (no workers) ------
def _placement(node: int, job_id: str, port: int | None = None) -> Any:
    env = {
        "SUBMITIT_EXECUTOR": "local",
        "SUBMITIT_LOCAL_JOB_ID": job_id,
        "SUBMITIT_LOCAL_GLOBALID": str(node),
        "SUBMITIT_LOCAL_NTASKS": "2",
    }
    options = {} if port is None else {"master_port": port}
    return resolve_placement(parse_options(options), env, 1)


def _foreign_store(port: int, hello: bool, job_id: str = "") -> Any:
    """Another job's store on our port (its own secret, its own run id)."""
    store = dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1", port, is_master=True, wait_for_workers=False, world_size=None
    )
    if hello:
        other = JobStore(store, "hydra_torchrun/jobother/", Signer(os.urandom(32), "x"))
        key = f"hydra_torchrun/job{job_id}/hello"  # even our key name: not our signature
        store.set(key, other.signer.seal(key, b'{"run_id": "x", "nonce": "y"}'))
    return store


def _job_id_with_free_first_ports() -> str:
    for n in range(1000):
        job_id = f"{os.getpid()}{n}"
        ports = candidate_ports(job_id)[:3]
        try:
            for port in ports:
                with socket.socket() as s:
                    s.bind(("", port))
        except OSError:
            continue
        return job_id
    raise AssertionError("no free candidate ports")


@pytest.mark.parametrize("hello", [True, False], ids=["foreign-hello", "no-hello"])
def test_a_foreign_store_on_our_port_is_skipped(hello: bool) -> None:
    job_id = _job_id_with_free_first_ports()
    ports = candidate_ports(job_id)
    foreign = _foreign_store(ports[0], hello, job_id)
    secret = load_secret(os.environ)
    start = time.monotonic()
    node0 = JobCoordinator(_placement(0, job_id, ports[0]), 5, secret, ports=ports)
    node1 = JobCoordinator(_placement(1, job_id, ports[0]), 5, secret, ports=ports)
    took = time.monotonic() - start
    try:
        assert node0.placement.rdzv_endpoint.endswith(f":{ports[1]}")
        assert node1.placement.rdzv_endpoint == node0.placement.rdzv_endpoint
        assert took < HELLO_WAIT_S + 5, took
        node1.mark_done()
        assert node0.wait_all_done(timeout=5) == [0]  # node 1 reached node 0's store
    finally:
        del foreign


def test_every_candidate_foreign_fails_within_seconds() -> None:
    job_id = _job_id_with_free_first_ports()
    ports = candidate_ports(job_id)[:2]
    stores = [_foreign_store(p, hello=True, job_id=job_id) for p in ports]
    start = time.monotonic()
    with pytest.raises(TorchrunSetupError, match="held by another job or program"):
        JobCoordinator(_placement(1, job_id, ports[0]), 2, load_secret(os.environ), ports=ports)
    assert time.monotonic() - start < 3  # no wait for a timeout
    del stores


def test_key_file_created_private_and_shared(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(load_secret(env))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    path = tmp_path / "cfg" / "hydra-torchrun-callback" / "secret"
    assert len(set(keys)) == 1 and len(keys[0]) == 32  # racing nodes agree on one key
    assert (path.stat().st_mode & 0o777) == 0o600
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["secret"]  # no temp file left


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    load_secret({"HYDRA_TORCHRUN_SECRET_FILE": str(path)})
    path.chmod(0o644)
    with pytest.raises(SecretError, match=r"mode 0644.*chmod 600"):
        load_secret({"HYDRA_TORCHRUN_SECRET_FILE": str(path)})


def test_job_with_an_unsafe_key_file_fails_before_any_worker(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(os.urandom(32).hex())
    key.chmod(0o644)
    run = run_app(
        tmp_path,
        *LOCAL,
        "hydra.callbacks.torchrun.nproc_per_node=2",
        multirun=True,
        env=app_env(HYDRA_TORCHRUN_SECRET_FILE=str(key)),
    )
    assert run.proc.returncode == 1
    assert not list((run.out / "0").glob("started_rank*.json"))  # no worker started
    node0 = next(r for r in run.records if r["task"] == 0)
    assert f"chmod 600 {key}" in node0["error"], node0["error"]


def test_torch_error_files_stay_private(tmp_path: Path) -> None:
    """torch's spawn pickles a failing worker's traceback into the temp dir: not ours."""
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("pytorch-errorfile-*"))
    run = run_app(tmp_path, "hydra.callbacks.torchrun.nproc_per_node=2", "fail_rank=1")
    assert run.proc.returncode == 1, run.output
    after = set(Path(tempfile.gettempdir()).glob("pytorch-errorfile-*"))
    assert after == before, after - before


def test_foreign_store_on_the_fixed_port_of_a_two_node_job(tmp_path: Path) -> None:
    """master_port is taken by another job's store: both nodes fail with a clear error,
    within seconds, and no worker starts."""
    port = free_port()
    foreign = _foreign_store(port, hello=True, job_id="other")
    start = time.monotonic()
    run = run_app(
        tmp_path,
        *LOCAL,
        "hydra.callbacks.torchrun.nproc_per_node=1",
        f"hydra.callbacks.torchrun.master_port={port}",
        multirun=True,
    )
    elapsed = time.monotonic() - start
    del foreign
    assert run.proc.returncode == 1, run.output
    errors = {r["task"]: r["error"] for r in run.records}
    assert f"node 0 could not host the job's rendezvous store on port {port}" in errors[0]
    assert "could not reach the job's rendezvous store" in errors[1], errors[1]
    assert "held by another job or program" in errors[1], errors[1]
    assert not list((run.out / "0").glob("rank*.json"))
    assert elapsed < 90, elapsed  # without the hello check: the 600 s join timeout


def test_huge_exception_text_on_one_machine(tmp_path: Path) -> None:
    run = run_app(
        tmp_path, "hydra.callbacks.torchrun.nproc_per_node=2", "fail_rank=1", "fail_pad_mb=9"
    )
    assert run.proc.returncode == 1
    [job] = run.records
    assert job["error_attrs"]["rank"] == 1 and job["error_attrs"]["exc_type"] == "ValueError"
    assert "characters cut" in job["error"] and len(job["error"]) < 200_000


# -- what review found: replays, emptied keys, the rendezvous backend's edge cases ---------
def _pair(peer_timeout: float = 5.0, **kw: Any) -> tuple[JobCoordinator, JobCoordinator]:
    job_id = _job_id_with_free_first_ports()
    port = free_port()  # the job's fixed port (master_port)
    secret = load_secret(os.environ)
    node0 = JobCoordinator(_placement(0, job_id, port), peer_timeout, secret, **kw)
    node1 = JobCoordinator(_placement(1, job_id, port), peer_timeout, secret)
    return node0, node1


def _attacker_client(coord: JobCoordinator) -> Any:
    _host, port = coord.placement.rdzv_endpoint.rsplit(":", 1)
    return dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1", int(port), is_master=False, wait_for_workers=False
    )


def test_a_failed_node_cannot_be_hidden_by_emptying_the_failure_key() -> None:
    """Node 1 failed, but the attacker replays the signed empty failure slot (and forges
    the claim): node 0 still learns it from node 1's signed done beat."""
    from hydra_torchrun_callback._result import job_error

    node0, node1 = _pair()
    evil = _attacker_client(node0)
    prefix = node0.js.prefix
    empty_slot = bytes(evil.get(prefix + "failure"))  # signed by node 0: a valid value
    error = job_error(rank=3, local_rank=1, node="n2", node_rank=1, what="raised ValueError: x")
    node1.report_failure(error)
    evil.set(prefix + "failure", empty_slot)  # replayed: verifies, and says "no failure"
    node1.mark_done(error)
    node0.mark_done()
    assert node0.failure() is None  # the slot was emptied
    assert node0.wait_all_done(timeout=2) == []
    failed = node0.failed_node()
    assert failed is not None and (failed.rank, failed.node_rank) == (3, 1)
    assert "ValueError: x" in str(failed)


def test_replayed_heartbeats_cannot_hide_a_lost_node() -> None:
    reasons: list[Any] = []
    node0, node1 = _pair(peer_timeout=2.0, abort=reasons.append)
    evil = _attacker_client(node0)
    key = node0.js.prefix + "hb/1"
    node1.start_watchdog()
    time.sleep(2.5)
    old = bytes(evil.get(key))
    time.sleep(1.2)
    newer = bytes(evil.get(key))
    node1.stop_watchdog()  # node 1 is gone; the attacker alternates its old beats
    node0.start_watchdog()
    start = time.monotonic()
    while not reasons and time.monotonic() - start < 10:
        for value in (old, newer):
            evil.set(key, value)
            time.sleep(0.1)
    node0.stop_watchdog()
    assert reasons and "node 1 stopped sending heartbeats" in str(reasons[0])


def test_no_abort_once_the_watchdog_stopped() -> None:
    from hydra_torchrun_callback._result import TorchrunJobError

    reasons: list[Any] = []
    node0, node1 = _pair(abort=reasons.append)
    node0.start_watchdog()
    node0.stop_watchdog()
    node0._abort(TorchrunJobError("late"))  # a watchdog out of a slow store call
    assert reasons == [] and node0.abort_reason is None
    del node1


def test_signed_rendezvous_backend_edge_cases(caplog: pytest.LogCaptureFixture) -> None:
    """On torch's real c10d backend and a real store: an undecodable value, the empty
    sentinel written back, and a forgery over a newer state than the caller's."""
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import (
        C10dRendezvousBackend,
    )

    from hydra_torchrun_callback._wire.store import SignedRendezvousBackend

    port = free_port()
    server = dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1", port, is_master=True, wait_for_workers=False, world_size=None
    )
    signer = Signer(os.urandom(32), "run/nonce")
    a = SignedRendezvousBackend(C10dRendezvousBackend(server, "edge"), signer)
    b = SignedRendezvousBackend(C10dRendezvousBackend(_client(port), "edge"), signer)
    key = "torch.rendezvous.edge"

    state, token, ok = a.set_state(b"state-1")
    assert (state, ok) == (b"state-1", True)
    assert b.get_state()[0] == b"state-1"
    server.set(key, "%%% not base64 %%%")  # what torch's decoder would choke on
    assert a.get_state() == (b"state-1", token)  # the last verified state, logged
    assert "rejected a forged value for key 'torch.rendezvous.edge'" in caplog.text
    state2, token2, ok = a.set_state(b"state-2", token)  # based on the last: repairs
    assert (state2, ok) == (b"state-2", True) and b.get_state()[0] == b"state-2"

    server.set(key, base64.b64encode(b"forged"))
    stale = b.set_state(b"stale", token)  # b's state predates state-2: no overwrite
    assert stale is not None and stale[0] == b"state-2" and stale[2] is False
    server.set(key, "Y2FuaW1hZGFt")  # torch's empty sentinel, after a verified state
    assert a.get_state() == (b"state-2", token2)


def _client(port: int) -> Any:
    return dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1", port, is_master=False, wait_for_workers=False
    )


def test_an_elastic_jobs_shared_store_is_private_and_signed(tmp_path: Path) -> None:
    """The FileStore of an elastic job (no node hosts it): its directory is created 0700
    and refused when others can enter it; a hello signed with another key is refused; two
    nodes that share the directory find each other, and node 1 leads once node 0 is lost."""
    from hydra_torchrun_callback._node.job_decisions import Membership
    from hydra_torchrun_callback._wire.protocol import MEMBERSHIP_KEY
    from hydra_torchrun_callback._wire.store import ForeignStoreError, open_shared_job_store

    secret = load_secret(os.environ)
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    with pytest.raises(OSError, match="only you can enter"):
        open_shared_job_store(str(loose), secret, "job1", "p/", 1.0)
    forged = tmp_path / "forged"
    _, created = open_shared_job_store(str(forged), os.urandom(32), "job1", "p/", 1.0)
    assert created and forged.stat().st_mode & 0o777 == 0o700
    with pytest.raises(ForeignStoreError, match="no hello signed for job job1"):
        open_shared_job_store(str(forged), secret, "job1", "p/", 1.0)

    env = {
        "SUBMITIT_EXECUTOR": "local",
        "SUBMITIT_LOCAL_JOB_ID": f"{os.getpid()}",
        "SUBMITIT_LOCAL_NTASKS": "3",
        "SUBMITIT_FOLDER": str(tmp_path / "submitit" / "%j"),
    }
    opts = parse_options({"nnodes": "2:3"})
    nodes = [
        JobCoordinator(
            resolve_placement(opts, {**env, "SUBMITIT_LOCAL_GLOBALID": str(n)}, 1), 5, secret
        )
        for n in (1, 0, 2)  # the first there creates it, whichever node that is
    ]
    try:
        node1, node0, node2 = nodes
        assert all(c.shared for c in nodes)
        assert [c.leads() for c in (node0, node1, node2)] == [True, False, False]
        node0.ops.put_result(b"rank 0's value")
        assert node2.wait_result(timeout=5) == b"rank 0's value"
        node0.ops.publish_membership(Membership(1, (0,), 2, time.time(), "node 0 lost"))
        change = node1.ops.membership()
        assert change is not None and change.lost == (0,)
        # A value written without the job's signature is never taken.
        raw = dist.FileStore(str(node0.placement.store_dir) + "/job", -1)  # type: ignore[attr-defined]
        key = node0.js.key(MEMBERSHIP_KEY)
        raw.set(key, b"HTR1" + b"0" * 32 + b'{"epoch": 9, "lost": [1, 2]}')
        assert node2.ops.membership() is None
        node1.state.lost.update(change.lost)
        node0.state.lost.update(change.lost)
        assert node1.leads() and not node2.leads()
        assert not node0.leads()  # declared lost (it was slow): it never leads again
        # Workers claim the first failure in the same store, named "file:<path>".
        assert node2.worker_env["HYDRA_TORCHRUN_JOB_STORE"].startswith("file:")
    finally:
        for c in nodes:
            c.close()
