"""Steady state: DDP training step time under bare torchrun vs hydra/callbacks=torchrun.

    python benchmarks/steady_state.py                  # 5 rounds x 300 steps (+20 warm-up)
    python benchmarks/steady_state.py --reps 1 --steps 20 --warmup 5   # smoke

Launch overhead is paid once; what a long job feels is the step time. A small MLP
(ddp_body.py) trains with DDP over gloo on 2 workers, the same seeds and data in every
system; rank 0 times each optimizer step (forward, backward with the gradient all-reduce,
update). Systems alternate (A B A B ...). A difference can only come from the workers'
environment: thread count, CPU affinity, start method (a fork of a warm server vs a fresh
interpreter), the agent's monitoring. Target: ours within 2 % of torchrun.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field

from _runner import HERE, Run, enable_subreaper, run
from ddp_body import BATCH, HIDDEN, IN, OUT

TARGET = 1.02


@dataclass
class SteadySystem:
    name: str
    cmds: list[list[str]]
    runs: list[Run] = field(default_factory=list)

    @property
    def steps(self) -> list[float]:
        """Every timed step of every round, pooled."""
        return [s for r in self.runs for s in r.steps]

    def median_ms(self) -> float:
        return statistics.median(self.steps) * 1e3

    def p90_ms(self) -> float:
        return statistics.quantiles(self.steps, n=10)[8] * 1e3 if len(self.steps) > 1 else 0.0


def systems(steps: int, warmup: int, spawn: bool = False, nproc: int = 2) -> list[SteadySystem]:
    """Bare torchrun first (the baseline), ours with its default start method, and (``spawn``)
    ours with fresh-interpreter workers, to tell a start-method effect from a launcher one."""
    torchrun = [
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(HERE / "ddp_body.py"),
        str(steps),
        str(warmup),
    ]
    ours = [
        str(HERE / "ddp_app.py"),
        "hydra/callbacks=torchrun",
        f"hydra.callbacks.torchrun.nproc_per_node={nproc}",
        f"steps={steps}",
        f"warmup={warmup}",
        "hydra.run.dir=out",
    ]
    found = [
        SteadySystem(f"torchrun --standalone N={nproc}", [torchrun]),
        SteadySystem(f"ours default N={nproc}", [ours]),
    ]
    if spawn:
        spawned = [*ours, "hydra.callbacks.torchrun.start_method=spawn"]
        found.append(SteadySystem(f"ours spawn N={nproc}", [spawned]))
    return found


def report(steady: list[SteadySystem], steps: int, warmup: int) -> str:
    """The Markdown section: pooled step-time median and p90, ratios, agent RSS."""
    base = steady[0]
    rows = [
        f"Per step (rank 0, {steps} timed steps + {warmup} warm-up per run, "
        f"{len(base.runs)} run(s) per system, pooled): MLP {IN}-{HIDDEN}-{OUT}, batch {BATCH} "
        "per rank, DDP over gloo.",
        "",
        "| system | step ms median | step ms p90 | median ratio vs torchrun | "
        "p90 ratio | torch threads (rank 0) | peak RSS agent MB | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in steady:
        threads = ",".join(str(t) for t in sorted({r.threads for r in s.runs}))
        rows.append(
            f"| {s.name} | {s.median_ms():.3f} | {s.p90_ms():.3f} | "
            f"{s.median_ms() / base.median_ms():.3f}x | "
            f"{s.p90_ms() / base.p90_ms() if base.p90_ms() else float('nan'):.3f}x | {threads} | "
            f"{statistics.median(r.rss_mb for r in s.runs):.0f} | "
            f"{statistics.median(r.wall for r in s.runs):.2f} |"
        )
    ours = steady[1]
    ratio = ours.median_ms() / base.median_ms()
    verdict = "met" if ratio <= TARGET else "**not met**"
    rows += [
        "",
        f"Steady state: {ours.name} / torchrun median step = {ratio:.3f}x "
        f"(target <= {TARGET:.2f}x: {verdict}).",
    ]
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--no-spawn", action="store_true", help="skip the 'ours spawn' row")
    args = ap.parse_args()
    enable_subreaper()
    steady = systems(args.steps, args.warmup, spawn=not args.no_spawn)
    for rep in range(args.reps):
        for s in steady:
            s.runs.append(run(s.cmds))
            print(f"round {rep + 1}/{args.reps} {s.name}: {s.median_ms():.3f} ms", file=sys.stderr)
    print("## Steady state (DDP step time)\n\n" + report(steady, args.steps, args.warmup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
