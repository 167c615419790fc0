"""Validate and normalise the callback's options before anything starts.

Pure functions: they take the raw option mapping (what Hydra composed) and return
an immutable :class:`Options`, or raise :class:`TorchrunOptionError` naming the
option, the bad value, what is accepted and how to fix it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

from hydra_torchrun_callback._config import OPTION_NAMES

__all__ = ["Options", "TorchrunOptionError", "parse_options"]

PREFIX = "hydra.callbacks.torchrun"
START_METHODS = ("forkserver", "spawn", "fork")
RDZV_BACKENDS = ("c10d", "static", "etcd", "etcd-v2")
CLUSTER_MODES = ("auto", "none", "slurm", "submitit")
NPROC_WORDS = ("auto", "gpu", "cpu")

_NPROC_ACCEPTED = "expected a positive integer, 'auto', 'gpu' or 'cpu'"

#: redirects/tee: one stream code for all local ranks, or a code per local rank.
StdSpec = Union[int, dict[int, int]]


class TorchrunOptionError(ValueError):
    """A ``hydra.callbacks.torchrun`` option has a value that cannot work."""

    def __init__(
        self,
        option: str,
        value: Any,
        accepted: str,
        example: str,
        fix: Optional[str] = None,
        prefix: str = PREFIX,
    ) -> None:
        self.option = option
        self.value = value
        self._parts = (accepted, example, fix, prefix)
        super().__init__(
            f"{prefix}.{option}={value!r} is not valid: {accepted}. "
            f"Fix: {fix or f'e.g. {prefix}.{option}={example}'}"
        )

    def under(self, prefix: str) -> TorchrunOptionError:
        """The same error, naming the option where the user set it (``hydra.launcher``)."""
        accepted, example, fix, old = self._parts

        def moved(text: str) -> str:
            return text.replace(old + ".", prefix + ".")

        return TorchrunOptionError(
            self.option, self.value, moved(accepted), example, fix and moved(fix), prefix
        )

    def __reduce__(self) -> Any:  # travels intact in a JobReturn (submitit pickles it)
        return (TorchrunOptionError, (self.option, self.value, *self._parts))


@dataclass(frozen=True)
class Options:
    """Validated options. ``None`` means "decide from the placement"."""

    min_nodes: Optional[int]
    max_nodes: Optional[int]
    nproc_per_node: Optional[str]  # validated spelling; resolved by _placement.plan_workers
    rdzv_backend: str
    rdzv_endpoint: str
    rdzv_id: Optional[str]
    rdzv_configs: dict[str, Any]
    standalone: bool
    max_restarts: int
    monitor_interval: float
    start_method: str
    role: str
    log_dir: Optional[str]
    redirects: StdSpec
    tee: StdSpec
    local_ranks_filter: Optional[frozenset[int]]
    node_rank: Optional[int]
    master_addr: Optional[str]
    master_port: Optional[int]
    local_addr: Optional[str]
    cluster: str = "auto"
    peer_timeout: float = 20.0
    summary: bool = True
    heartbeat_interval: float = 0.0


def _int(option: str, value: Any, minimum: int, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TorchrunOptionError(option, value, f"expected an integer >= {minimum}", example)
    try:
        number = int(value)
    except ValueError:
        raise TorchrunOptionError(
            option, value, f"expected an integer >= {minimum}", example
        ) from None
    if number < minimum:
        raise TorchrunOptionError(option, value, f"expected an integer >= {minimum}", example)
    return number


def parse_nnodes(value: Any) -> tuple[int, int]:
    """``"N"`` or ``"MIN:MAX"`` -> (min, max), as torchrun's ``--nnodes``."""
    accepted = "expected a node count N >= 1 or a range MIN:MAX with 1 <= MIN <= MAX"
    text = str(value).strip()
    parts = text.split(":")
    try:
        if len(parts) == 1:
            low = high = int(parts[0])
        elif len(parts) == 2:
            low, high = int(parts[0]), int(parts[1])
        else:
            raise ValueError(text)
    except ValueError:
        raise TorchrunOptionError("nnodes", value, accepted, "2 or 1:4") from None
    if not 1 <= low <= high:
        raise TorchrunOptionError("nnodes", value, accepted, "2 or 1:4")
    return low, high


def parse_std(option: str, value: Any) -> StdSpec:
    """torchrun's redirects/tee syntax: ``"3"`` or ``"0:3,1:1"`` (local rank: code)."""
    accepted = (
        "expected 0 (none), 1 (stdout), 2 (stderr), 3 (both), or per local rank "
        "'LOCAL_RANK:CODE,...' such as '0:3,1:1'"
    )
    text = str(value).strip()
    if re.fullmatch(r"[0-3]", text):
        return int(text)
    if re.fullmatch(r"\d+:[0-3](,\d+:[0-3])*", text):
        return {int(rank): int(code) for rank, code in (p.split(":") for p in text.split(","))}
    raise TorchrunOptionError(option, value, accepted, "3")


def parse_rdzv_conf(value: Any) -> dict[str, Any]:
    """``"k=v,k2=v2"`` or a mapping -> dict, as torchrun's ``--rdzv-conf``."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    accepted = "expected 'key=value,key2=value2' or a mapping such as {timeout: 120}"
    if not isinstance(value, str):
        raise TorchrunOptionError("rdzv_conf", value, accepted, "timeout=120")
    conf: dict[str, Any] = {}
    for item in value.split(","):
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise TorchrunOptionError("rdzv_conf", value, accepted, "timeout=120")
        conf[key.strip()] = val.strip()
    return conf


def _parse_port(value: Any) -> Optional[int]:
    if value is None:
        return None
    port = _int("master_port", value, 1, "29500")
    if port > 65535:
        raise TorchrunOptionError("master_port", value, "expected a TCP port 1..65535", "29500")
    return port


def parse_options(raw: Mapping[str, Any]) -> Options:
    """Check every option; raise on the first one that cannot work."""
    unknown = sorted(set(raw) - set(OPTION_NAMES) - {"_target_"})
    if unknown:
        close = [n for n in OPTION_NAMES if n.startswith(unknown[0])] or (
            difflib.get_close_matches(unknown[0], OPTION_NAMES, n=1, cutoff=0.5)
        )
        raise TorchrunOptionError(
            unknown[0],
            raw[unknown[0]],
            "there is no such option; the options are " + ", ".join(OPTION_NAMES),
            "",
            fix=f"did you mean {PREFIX}.{close[0]}?" if close else "use one of those names",
        )
    get = raw.get

    nnodes = get("nnodes")
    min_nodes, max_nodes = (None, None) if nnodes in (None, "") else parse_nnodes(nnodes)

    nproc = get("nproc_per_node")
    if nproc in (None, ""):
        nproc_text: Optional[str] = None
    else:
        nproc_text = str(nproc).strip()
        if nproc_text not in NPROC_WORDS:
            if isinstance(nproc, bool) or not re.fullmatch(r"\d+", nproc_text):
                raise TorchrunOptionError("nproc_per_node", nproc, _NPROC_ACCEPTED, "2")
            if int(nproc_text) < 1:
                raise TorchrunOptionError("nproc_per_node", nproc, _NPROC_ACCEPTED, "2")
            nproc_text = str(int(nproc_text))

    backend = str(get("rdzv_backend") or "c10d")
    if backend not in RDZV_BACKENDS:
        raise TorchrunOptionError(
            "rdzv_backend", backend, "expected one of " + ", ".join(RDZV_BACKENDS), "c10d"
        )
    start_method = str(get("start_method") or "forkserver")
    if start_method not in START_METHODS:
        raise TorchrunOptionError(
            "start_method",
            start_method,
            "expected one of forkserver (default: warm and CUDA-safe), spawn (a fresh "
            "interpreter per worker, as torchrun), fork",
            "forkserver",
        )
    interval = get("monitor_interval", 0.1)
    try:
        monitor_interval = float(interval)
    except (TypeError, ValueError):
        monitor_interval = -1.0
    if not monitor_interval > 0:
        raise TorchrunOptionError(
            "monitor_interval", interval, "expected a number of seconds > 0", "0.1"
        )
    filt = get("local_ranks_filter")
    ranks: Optional[frozenset[int]] = None
    if filt not in (None, ""):
        try:
            ranks = frozenset(int(r) for r in str(filt).split(","))
        except ValueError:
            raise TorchrunOptionError(
                "local_ranks_filter", filt, "expected comma-separated local ranks", "0"
            ) from None
        if any(r < 0 for r in ranks):
            raise TorchrunOptionError(
                "local_ranks_filter", filt, "expected comma-separated local ranks >= 0", "0"
            )
    node_rank = get("node_rank")
    role = str(get("role") or "default")
    return Options(
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        nproc_per_node=nproc_text,
        rdzv_backend=backend,
        rdzv_endpoint=str(get("rdzv_endpoint") or ""),
        rdzv_id=None if get("rdzv_id") in (None, "") else str(get("rdzv_id")),
        rdzv_configs=parse_rdzv_conf(get("rdzv_conf")),
        standalone=bool(get("standalone", False)),
        max_restarts=_int("max_restarts", get("max_restarts", 0), 0, "1"),
        monitor_interval=monitor_interval,
        start_method=start_method,
        role=role,
        log_dir=None if get("log_dir") in (None, "") else str(get("log_dir")),
        redirects=parse_std("redirects", get("redirects", "0")),
        tee=parse_std("tee", get("tee", "0")),
        local_ranks_filter=ranks,
        node_rank=None if node_rank is None else _int("node_rank", node_rank, 0, "0"),
        master_addr=None if get("master_addr") in (None, "") else str(get("master_addr")),
        master_port=_parse_port(get("master_port")),
        local_addr=None if get("local_addr") in (None, "") else str(get("local_addr")),
        cluster=_choice("cluster", get("cluster") or "auto", CLUSTER_MODES, "none"),
        peer_timeout=_positive_float("peer_timeout", get("peer_timeout", 20.0), "20"),
        summary=_bool("summary", get("summary", True)),
        heartbeat_interval=_heartbeat(get("heartbeat_interval", 0.0)),
    )


def _bool(option: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise TorchrunOptionError(option, value, "expected true or false", "false")


def _heartbeat(value: Any) -> float:
    try:
        number = float(value if value is not None else 0.0)
    except (TypeError, ValueError):
        number = -1.0
    if number != 0 and not number >= 1:
        raise TorchrunOptionError(
            "heartbeat_interval", value, "expected 0 (off) or a number of seconds >= 1", "60"
        )
    return number


def _choice(option: str, value: Any, accepted: tuple[str, ...], example: str) -> str:
    text = str(value)
    if text not in accepted:
        raise TorchrunOptionError(option, value, "expected one of " + ", ".join(accepted), example)
    return text


def _positive_float(option: str, value: Any, example: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if not number > 0:
        raise TorchrunOptionError(option, value, "expected a number of seconds > 0", example)
    return number
