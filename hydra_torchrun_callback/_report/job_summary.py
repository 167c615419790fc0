"""The job summary: who ran where and how it ended, one row per global rank. Node 0
logs it as a table and saves it as JSON beside ``.hydra/``, so a sweep can be inspected
afterwards (``hydra-torchrun-summary``).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Container, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from hydra_torchrun_callback._files import write_text_atomic
from hydra_torchrun_callback._log import log
from hydra_torchrun_callback._report.frames import group_by_frame, rank_label
from hydra_torchrun_callback._wire.protocol import SUMMARY_FILE

__all__ = [
    "build_summary",
    "clip",
    "error_line",
    "format_columns",
    "render_table",
    "signal_name",
    "write_summary",
]


def build_summary(
    rows: Iterable[dict[str, Any]],
    *,
    run_id: str,
    nnodes: int,
    nproc_per_node: int,
    wall_s: float,
    error: Optional[BaseException] = None,
    missing_nodes: Iterable[int] = (),
    elastic: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """The JSON-ready summary; the root cause's row is marked. ``elastic``: an elastic
    job's node range and membership changes (see ``JobCoordinator.membership_history``)."""
    ordered = sorted(rows, key=lambda r: r["rank"])
    root_rank = getattr(error, "rank", None)
    # An exception may have no message at all (torch's RendezvousClosedError()).
    root_text = (str(error).splitlines() or [type(error).__name__])[0] if error else None
    if isinstance(error, SystemExit) and isinstance(error.code, int) and error.code > 128:
        root_text = f"stopped by {signal_name(error.code - 128)} (exit status {error.code})"
    for row in ordered:
        is_root = root_rank is not None and row["rank"] == root_rank
        row["root_cause"] = error_line(row) if is_root else None
    if error is None:
        status = "COMPLETED"
    elif isinstance(error, (KeyboardInterrupt, SystemExit)):
        status = "INTERRUPTED"
    else:
        status = "FAILED"
    summary = {
        "status": status,
        "run_id": run_id,
        "nnodes": nnodes,
        "nproc_per_node": nproc_per_node,
        "world_size": nnodes * nproc_per_node,
        "wall_s": round(wall_s, 3),
        "root_cause": root_text,
        "root_cause_rank": root_rank,
        "missing_nodes": sorted(missing_nodes),
        "ranks": ordered,
    }
    if elastic is not None:
        summary["elastic"] = dict(elastic)
    return summary


def error_line(row: Mapping[str, Any]) -> str:
    """What a failed rank did, in a few words ("ValueError: boom", "SIGKILL")."""
    return str(row["detail"]) or str(row["status"])


def _status_cell(row: Mapping[str, Any]) -> str:
    status = str(row["status"])
    if status == "raised":
        return "raised " + str(row["detail"]).split(":", 1)[0]
    if status == "killed":
        return f"killed ({row['detail']})"
    if status == "exited":
        return str(row["detail"])
    return status


def format_columns(
    columns: Sequence[str], lines: Sequence[Sequence[str]], right: Container[int] = ()
) -> list[str]:
    """Header and rows as fixed-width text, two spaces apart; ``right``: right-aligned."""
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(columns)]
    return [
        "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ).rstrip()
        for cells in [columns, *lines]
    ]


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def render_table(summary: Mapping[str, Any]) -> str:
    """The summary as a fixed-width text table (one line per rank)."""
    head = (
        f"torchrun job summary: {summary['status']} in {summary['wall_s']:.1f}s, "
        f"{summary['nnodes']} node(s) x {summary['nproc_per_node']} worker(s), "
        f"run id {summary['run_id']}"
    )
    columns: tuple[str, ...] = (
        "rank",
        "node",
        "host",
        "pid",
        "attempts",
        "exit status",
        "wall",
        "root cause",
    )
    stopped = {r["rank"]: r["stopped_in"] for r in summary["ranks"] if r.get("stopped_in")}
    if stopped:
        columns += ("stopped in",)
    lines = []
    for row in summary["ranks"]:
        cells: tuple[str, ...] = (
            str(row["rank"]),
            str(row["node"]),
            clip(str(row["host"]), 24),
            "-" if row["pid"] is None else str(row["pid"]),
            str(row["attempts"]),
            clip(_status_cell(row), 28),
            f"{row['wall_s']:.1f}s",
            clip(str(row["root_cause"] or ""), 60),
        )
        if stopped:
            cells += (clip(str(row.get("stopped_in") or ""), 70),)
        lines.append(cells)
    out = [head, *format_columns(columns, lines, right={0, 1, 3, 4, 6})]
    if stopped:
        out.append("where the ranks were when the job stopped them (stacks in each rank's log):")
        for ranks, text in group_by_frame(stopped):
            out.append(f"  {rank_label(ranks)}: {text}")
    for row in summary["ranks"]:
        for past in row.get("history", ()):
            if past["status"] in ("raised", "killed", "exited"):
                was = past.get("rank", row["rank"])
                out.append(
                    f"rank {row['rank']}"
                    + (f" (then rank {was})" if was != row["rank"] else "")
                    + f" attempt {past['attempt']} (pid {past['pid']}): "
                    f"{clip(_status_cell(past), 40)} after {past['wall_s']:.1f}s, restarted"
                )
    elastic = summary.get("elastic") or {}
    for change in elastic.get("changes", ()):
        lost = ", ".join(str(n) for n in change["lost"])
        back = change.get("lost_s")
        out.append(
            f"elastic (nnodes={elastic['nnodes']}): {change['why']}; went on with "
            f"{change['alive']} of {summary['nnodes']} nodes (lost: {lost})"
            + (f", training again {back:.1f}s after its last heartbeat" if back else "")
        )
    if summary["missing_nodes"]:
        out.append(f"nodes {summary['missing_nodes']} sent no report (lost before the end)")
    if summary["root_cause"] and summary["root_cause_rank"] is None:
        out.append(f"root cause: {summary['root_cause']}")
    return "\n".join(out)


def write_summary(summary: Mapping[str, Any], output_dir: str) -> Optional[Path]:
    """Save the summary beside ``.hydra/``; a failure to write is logged, not raised."""
    path = Path(output_dir) / SUMMARY_FILE
    try:
        write_text_atomic(path, json.dumps(summary, indent=2) + "\n")
    except OSError as exc:
        log.warning("could not save the job summary to %s: %s", path, exc)
        return None
    return path


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
