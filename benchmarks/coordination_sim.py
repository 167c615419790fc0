"""Simulate the multi-node coordination protocol at scale: n nodes, one real TCPStore.

Each node is a real :class:`JobCoordinator` (node 0 hosts the store, as in a job) with its
watchdog thread, in this one process, with no agent and no workers. The run measures

- store calls per second in steady state (every node beating, node 0 watching them);
- after one node is lost (its watchdog stops, as when its Hydra process dies): the time
  until node 0 notices (bounded by ``peer_timeout``) and until every node has stopped.

    python benchmarks/coordination_sim.py                 # 8, 64 and 512 nodes
    python benchmarks/coordination_sim.py --nodes 8 --json

Before this protocol every node polled every other node's heartbeat and done keys, four
times a second: 8 * n * (n - 1) calls per second (2.1 million at 512 nodes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra_torchrun_callback._node.coordinator import JobCoordinator
from hydra_torchrun_callback._node.placement import resolve_placement
from hydra_torchrun_callback._options import parse_options


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def simulate(nnodes: int, steady_s: float = 5.0, peer_timeout: float = 3.0) -> dict[str, Any]:
    port = _free_port()
    secret = os.urandom(32)
    stopped: dict[int, float] = {}
    lock = threading.Lock()

    def make(node: int) -> JobCoordinator:
        env = {
            "SUBMITIT_EXECUTOR": "local",
            "SUBMITIT_LOCAL_JOB_ID": f"sim{port}",
            "SUBMITIT_LOCAL_GLOBALID": str(node),
            "SUBMITIT_LOCAL_NTASKS": str(nnodes),
        }
        placement = resolve_placement(parse_options({"master_port": port}), env, 1)

        def abort(reason: Any, node: int = node) -> None:
            with lock:
                stopped.setdefault(node, time.monotonic())

        return JobCoordinator(placement, peer_timeout, secret, abort=abort)

    started = time.monotonic()
    nodes = [make(0)]
    nodes += [make(n) for n in range(1, nnodes)]
    connect_s = time.monotonic() - started
    for coord in nodes:
        coord.start_watchdog(lambda: {0: "alive"})
    time.sleep(2.0)  # every node has beaten and been seen
    calls0 = sum(c.js.calls for c in nodes)
    t0 = time.monotonic()
    time.sleep(steady_s)
    calls = sum(c.js.calls for c in nodes) - calls0
    rate = calls / (time.monotonic() - t0)

    lost = nnodes - 1
    lost_at = time.monotonic()
    nodes[lost].stop_watchdog()  # its Hydra process is gone: no more heartbeats
    deadline = lost_at + peer_timeout + 30
    while time.monotonic() < deadline:
        with lock:
            if len(stopped) >= nnodes - 1:
                break
        time.sleep(0.05)
    with lock:
        times = {n: t - lost_at for n, t in stopped.items()}
    for coord in nodes:
        coord.stop_watchdog()
    detected = times.get(0)
    everyone = max(times.values()) if len(times) >= nnodes - 1 else None
    return {
        "nodes": nnodes,
        "connect_s": round(connect_s, 2),
        "store_calls_per_s": round(rate, 1),
        "calls_per_node_per_s": round(rate / nnodes, 2),
        "old_protocol_calls_per_s": 8 * nnodes * (nnodes - 1),
        "peer_timeout_s": peer_timeout,
        "node0_noticed_after_s": None if detected is None else round(detected, 2),
        "all_stopped_after_s": None if everyone is None else round(everyone, 2),
        "propagation_s": None
        if everyone is None or detected is None
        else round(everyone - detected, 2),
        "stopped_nodes": len(times),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="*", default=[8, 64, 512])
    parser.add_argument("--steady", type=float, default=5.0, help="seconds of steady state")
    parser.add_argument("--peer-timeout", type=float, default=3.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HYDRA_TORCHRUN_SECRET_FILE", str(Path(tempfile.mkdtemp()) / "secret"))
    logging.getLogger("hydra_torchrun_callback").setLevel(logging.CRITICAL)  # n abort lines
    results = [simulate(n, args.steady, args.peer_timeout) for n in args.nodes]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(
        "nodes  store calls/s  per node  (old protocol)  node 0 noticed  all stopped  propagation"
    )
    for r in results:
        print(
            f"{r['nodes']:>5}  {r['store_calls_per_s']:>13.0f}  {r['calls_per_node_per_s']:>8.2f}"
            f"  {r['old_protocol_calls_per_s']:>14,}  {r['node0_noticed_after_s']!s:>13}s"
            f"  {r['all_stopped_after_s']!s:>10}s  {r['propagation_s']!s:>10}s"
        )
    print(f"(peer_timeout {args.peer_timeout:.0f}s: a lost node is noticed after it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
