"""What the reports say about runs: per-job values, medians, spans and the phase table.

Shared by launch_overhead.py and slurm_compare.py (launch_overhead.py runs slurm_compare.py's
section with --slurm, so these live here rather than in either of them).
"""

from __future__ import annotations

import statistics

from _runner import Run

#: Milestone -> what the phase ending there covers (in time order; a run's phase starts at
#: its previous milestone, so a system without Hydra skips the Hydra rows).
PHASES: tuple[tuple[str, str], ...] = (
    ("python_up", "interpreter start (Popen -> top process runs Python)"),
    ("composed", "Hydra import + compose (-> on_run_start)"),
    ("node_proc", "submit + schedule + node-side processes created (submitit task / agent)"),
    ("job_start", "Hydra job setup (-> on_job_start; on the nodes: unpickle + run_job)"),
    ("created", "until workers exist (agent, torch import, rendezvous, process creation)"),
    ("imported", "worker start + imports (-> torch imported in the body)"),
    ("pg_init", "process group init"),
    ("first_collective", "first collective"),
    ("end", "rest of the body (check, destroy group)"),
    ("result", "result back in the Hydra process (-> on_job_end; nodes: in their tasks)"),
    ("top_exit", "top process exits"),
    ("gone", "every process gone (stderr pipe closed, no tagged process left)"),
)


def values(runs: list[Run], attr: str) -> list[float]:
    """Per job (a multirun's jobs share one process), except RSS and leftovers."""
    out = []
    for r in runs:
        v = r.marks.get("first_collective", float("nan")) if attr == "first" else getattr(r, attr)
        out.append(float(v) if attr in ("rss_mb", "leftovers") else float(v) / r.jobs)
    return out


def med(runs: list[Run], attr: str) -> float:
    return statistics.median(values(runs, attr))


def span(runs: list[Run], attr: str) -> str:
    vals = values(runs, attr)
    return f"{min(vals):.2f}-{max(vals):.2f}"


def phase_split(marks: dict[str, float]) -> dict[str, float]:
    """Milestones -> phase durations: each from the previous milestone this run has."""
    prev, out = 0.0, {}
    for key, _ in PHASES:
        if key in marks:
            out[key] = marks[key] - prev
            prev = marks[key]
    return out


def phase_table(columns: list[tuple[str, list[Run]]]) -> str:
    """Rows = phases, columns = (system, its runs), median seconds over the repetitions."""
    splits = [[phase_split(r.marks) for r in runs] for _, runs in columns]
    head = "| phase (s, median) | " + " | ".join(name for name, _ in columns) + " |"
    rows = [head, "|---" * (len(columns) + 1) + "|"]
    for key, label in PHASES:
        cells = []
        for split in splits:
            vals = [p[key] for p in split if key in p]
            cells.append(f"{statistics.median(vals):.2f}" if vals else "-")
        if any(c != "-" for c in cells):
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
    rows.append(
        "| **wall (every process gone)** | "
        + " | ".join(f"**{med(runs, 'wall'):.2f}**" for _, runs in columns)
        + " |"
    )
    return "\n".join(rows)
