"""The files a sweep's controller, its point jobs and the user's shell share in the sweep dir.

Nothing here travels through a store: these are files on the (shared) file system, read
by another process or host later, perhaps by a controller that resumes the sweep days
after. So every file is written whole (temp file + rename) and only rank 0's value is
ever unpickled, after its HMAC checks out:

- ``<sweep>/.torchrun_sweep/sweep.json``: what the sweep is (id, app, task overrides,
  the command that started it). Written by the process that starts the sweep.
- ``<sweep>/.torchrun_sweep/controller.json``: where the controller runs (pid and host,
  or its SLURM job), its log, when it was last seen.
- ``<sweep>/.torchrun_sweep/points/<num>.json``: what the controller did with point
  ``num`` (its overrides, every scheduler job it was submitted as).
- ``<point dir>/torchrun_point.json``: the point's own record, written by its job (node
  0): every attempt's state (running, completed, failed), host, SLURM job, root cause.
- ``<point dir>/torchrun_result.bin``: rank 0's value, ``MAGIC + HMAC + pickle``, signed
  with the user's key file (``_wire.store.load_secret``) over (sweep id, job number,
  overrides): a value copied from another point or sweep does not verify.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from hydra_torchrun_callback._files import write_atomic, write_text_atomic
from hydra_torchrun_callback._log import log
from hydra_torchrun_callback._wire.protocol import (
    CONTROLLER_FILE,
    LEDGER_DIR,
    POINT_FILE,
    POINT_VALUE_FILE,
    SWEEP_FILE,
    SWEEP_STATE_DIR,
)

__all__ = [
    "add_submission",
    "open_value",
    "point_key",
    "read_controller",
    "read_json",
    "read_ledger",
    "read_point",
    "read_sweep",
    "record_attempt",
    "seal_value",
    "state_dir",
    "write_controller",
    "write_sweep",
]

#: The signing session of point values (a value is valid for one key of one sweep).
VALUE_SESSION = "hydra-torchrun point value v1"
#: Attempts kept in a point's record (the first ones and the latest ones).
MAX_ATTEMPTS = 50


def state_dir(sweep_dir: str | Path) -> Path:
    return Path(sweep_dir) / SWEEP_STATE_DIR


def read_json(path: Path) -> Optional[dict[str, Any]]:
    """A record written by this module, or None (absent, half-copied, not ours)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")


# -- the sweep, its controller, its ledger -----------------------------------------------
def read_sweep(sweep_dir: str | Path) -> Optional[dict[str, Any]]:
    return read_json(state_dir(sweep_dir) / SWEEP_FILE)


def write_sweep(sweep_dir: str | Path, info: Mapping[str, Any]) -> None:
    _write_json(state_dir(sweep_dir) / SWEEP_FILE, info)


def read_controller(sweep_dir: str | Path) -> Optional[dict[str, Any]]:
    return read_json(state_dir(sweep_dir) / CONTROLLER_FILE)


def write_controller(sweep_dir: str | Path, info: Mapping[str, Any]) -> None:
    _write_json(state_dir(sweep_dir) / CONTROLLER_FILE, info)


def _ledger_file(sweep_dir: str | Path, num: int) -> Path:
    return state_dir(sweep_dir) / LEDGER_DIR / f"{num}.json"


def read_ledger(sweep_dir: str | Path, sweep_id: str) -> dict[int, dict[str, Any]]:
    """Point number -> what the controller recorded of it, for this sweep id only (a
    sweep started afresh in the same dir has another id)."""
    found: dict[int, dict[str, Any]] = {}
    folder = state_dir(sweep_dir) / LEDGER_DIR
    with contextlib.suppress(OSError):
        for path in folder.glob("*.json"):
            entry = read_json(path)
            if entry is None or entry.get("sweep_id") != sweep_id:
                continue
            with contextlib.suppress(TypeError, ValueError):
                found[int(entry["num"])] = entry
    return found


def add_submission(
    sweep_dir: str | Path,
    sweep_id: str,
    num: int,
    overrides: Sequence[str],
    submission: Mapping[str, Any],
) -> None:
    """Record that point ``num`` was started (``submission``: executor, job id, folder):
    a resumed controller re-attaches to it instead of submitting it again."""
    path = _ledger_file(sweep_dir, num)
    entry = read_json(path)
    if entry is None or entry.get("sweep_id") != sweep_id:
        entry = {"sweep_id": sweep_id, "num": num, "overrides": list(overrides), "jobs": []}
    entry["jobs"] = [*entry.get("jobs", []), {**submission, "at": time.time()}]
    _write_json(path, entry)


# -- a point's own record ----------------------------------------------------------------
def read_point(job_dir: str | Path) -> Optional[dict[str, Any]]:
    return read_json(Path(job_dir) / POINT_FILE)


def record_attempt(job_dir: str | Path, base: Mapping[str, Any], **attempt: Any) -> None:
    """Start (no ``attempt_id`` match) or update this job's attempt in the point record.

    Earlier attempts stay in the record: a re-run in the same dir adds to it."""
    path = Path(job_dir) / POINT_FILE
    record = read_json(path) or {}
    if record.get("sweep_id") != base.get("sweep_id"):
        record = {}
    record.update(base)
    attempts = list(record.get("attempts", []))
    ident = attempt.get("attempt_id")
    for i, old in enumerate(attempts):
        if old.get("attempt_id") == ident:
            attempts[i] = {**old, **attempt}
            break
    else:
        attempts.append(dict(attempt))
    if len(attempts) > MAX_ATTEMPTS:
        attempts = attempts[:1] + attempts[-(MAX_ATTEMPTS - 1) :]
    record["attempts"] = attempts
    last = attempts[-1]
    record["state"] = last.get("state", "running")
    _write_json(path, record)


def point_key(sweep_id: str, num: int, overrides: Sequence[str]) -> str:
    """What a point's value is signed for: one job number of one sweep, its overrides."""
    return "\0".join(["point", sweep_id, str(num), json.dumps(list(overrides))])


def _signer(env: Mapping[str, str]) -> Any:
    from hydra_torchrun_callback._wire.store import Signer, load_secret

    return Signer(load_secret(env), VALUE_SESSION)


def seal_value(
    job_dir: str | Path, key: str, data: bytes, env: Optional[Mapping[str, str]] = None
) -> None:
    """Write rank 0's pickled value, signed for ``key``, into the point's dir (0600)."""
    blob = _signer(os.environ if env is None else env).seal(key, data)
    write_atomic(Path(job_dir) / POINT_VALUE_FILE, blob, mode=0o600)


def open_value(
    job_dir: str | Path, key: str, env: Optional[Mapping[str, str]] = None
) -> Optional[bytes]:
    """The pickled value if the point's value file is there and was signed for ``key`` with
    this user's key; None otherwise (never unpickle what this returns None for)."""
    from hydra_torchrun_callback._wire.store import SecretError, secret_path

    env = os.environ if env is None else env
    try:
        blob = (Path(job_dir) / POINT_VALUE_FILE).read_bytes()
    except OSError:
        return None
    if not secret_path(env).exists():  # never create a key just to find nothing verifies
        return None
    try:
        signer = _signer(env)
    except SecretError as exc:
        log.warning("a point's value cannot be verified: %s", exc)
        return None
    payload: Optional[bytes] = signer.open(key, blob)
    return payload
