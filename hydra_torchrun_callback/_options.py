"""Validate and normalise the callback's options before anything starts.

Pure functions: they take the raw option mapping (what Hydra composed) and return
an immutable :class:`Options`, or raise :class:`TorchrunOptionError` naming the
option, the bad value, what is accepted and how to fix it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Optional, Union

from hydra_torchrun_callback._config import OPTION_NAMES

__all__ = [
    "ENV_OPTIONS",
    "Options",
    "TorchrunOptionError",
    "environment_options",
    "options_here",
    "parse_options",
]

PREFIX = "hydra.callbacks.torchrun"
START_METHODS = ("forkserver", "spawn", "fork")
NUMA_MODES = ("node", "socket", "exclusive", "core-complex")
DEFAULT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"

#: The options torchrun reads from ``PET_<NAME>`` when its flag is absent (torch's
#: ``argparse_util.env`` / ``check_env``): all but ``logs_specs`` and ``numa_binding``.
#: The flags (``check_env``) read the variable as an integer.
ENV_OPTIONS: tuple[str, ...] = (
    "nnodes",
    "nproc_per_node",
    "rdzv_backend",
    "rdzv_endpoint",
    "rdzv_id",
    "rdzv_conf",
    "standalone",
    "max_restarts",
    "monitor_interval",
    "start_method",
    "event_log_handler",
    "role",
    "log_dir",
    "redirects",
    "tee",
    "local_ranks_filter",
    "duplicate_stdout_filters",
    "duplicate_stderr_filters",
    "node_rank",
    "master_addr",
    "master_port",
    "local_addr",
    "signals_to_handle",
    "shutdown_timeout",
    "virtual_local_rank",
)
_ENV_FLAGS = ("standalone", "virtual_local_rank")

#: Options that torch's programmatic layer (``LaunchConfig``) gained after our torch
#: floor: option -> first torch release that has it. Setting one on an older torch is
#: refused with the installed version; leaving it unset works on any supported torch.
TORCH_SINCE: dict[str, str] = {
    "event_log_handler": "2.8.0",
    "numa_binding": "2.9.0",
    "signals_to_handle": "2.10.0",
    "duplicate_stdout_filters": "2.10.0",
    "duplicate_stderr_filters": "2.10.0",
    "virtual_local_rank": "2.10.0",
    "shutdown_timeout": "2.12.0",
}
RDZV_BACKENDS = ("c10d", "static", "etcd", "etcd-v2")
CLUSTER_MODES = ("auto", "none", "slurm", "submitit")
#: ``warm_server``: what forkserver workers are forked from (see _node.warm).
WARM_SERVERS = ("auto", "fork", "fresh")
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

    def from_environment(self, variable: str) -> TorchrunOptionError:
        """The same error, naming the ``PET_*`` variable the value came from."""
        accepted, example, _, prefix = self._parts
        return TorchrunOptionError(
            self.option,
            self.value,
            f"{accepted} (read from the environment variable {variable}={self.value!r}, "
            f"as torchrun reads it when {prefix}.{self.option} is unset)",
            example,
            fix=f"unset {variable}, or set {prefix}.{self.option} "
            + (f"(e.g. {prefix}.{self.option}={example})" if example else "yourself"),
            prefix=prefix,
        )

    def __reduce__(self) -> Any:  # travels intact in a JobReturn (submitit pickles it)
        return (TorchrunOptionError, (self.option, self.value, *self._parts))


@dataclass(frozen=True)
class Options:
    """Validated options. ``None`` means "decide from the placement"."""

    min_nodes: Optional[int]
    max_nodes: Optional[int]
    nproc_per_node: Optional[str]  # validated spelling; resolved by _placement.plan_workers
    rdzv_backend: Optional[str]  # None: unset (see _node.placement.rendezvous_backend)
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
    logs_specs: Optional[str] = None
    event_log_handler: str = "null"
    duplicate_stdout_filters: tuple[str, ...] = ()
    duplicate_stderr_filters: tuple[str, ...] = ()
    numa_binding: Optional[str] = None
    signals_to_handle: str = DEFAULT_SIGNALS
    shutdown_timeout: Optional[int] = None
    virtual_local_rank: bool = False
    preemption_grace: float = 30.0
    warm_server: str = "auto"
    detach: bool = False
    resume: bool = False
    #: The detached controller's SLURM job parameters (submitit names), over ours.
    controller: tuple[tuple[str, Any], ...] = ()
    #: Options whose value came from a ``PET_*`` variable: option -> variable name.
    from_env: tuple[tuple[str, str], ...] = ()

    def source(self, option: str) -> str:
        """Where the option's value was set, for messages: the variable or the option."""
        return dict(self.from_env).get(option, f"{PREFIX}.{option}")


#: Under the job's output dir: torchrun's per-rank files when output goes to files and
#: ``log_dir`` is unset.
KEPT_LOG_DIR = "torchrun_logs"


def _sends_to_files(spec: StdSpec) -> bool:
    return any(spec.values()) if isinstance(spec, dict) else spec != 0


def with_log_dir(opts: Options, output_dir: str) -> Options:
    """Never lose output the user sent to files: with ``redirects``, ``tee`` or a
    duplicate filter and no ``log_dir``, torch's per-rank files go to
    ``<output_dir>/torchrun_logs`` (kept, beside the job's other files) instead of the
    private temporary folder that is removed after the job."""
    if opts.log_dir is not None:
        return opts
    asked = (
        _sends_to_files(opts.redirects)
        or _sends_to_files(opts.tee)
        or bool(opts.duplicate_stdout_filters or opts.duplicate_stderr_filters)
    )
    if not asked:
        return opts
    import os

    return replace(opts, log_dir=os.path.join(output_dir, KEPT_LOG_DIR))


def environment_options(
    raw: Mapping[str, Any], env: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """torchrun's ``PET_<NAME>`` variables for the options left unset (None or absent),
    as torchrun reads them when a flag is absent: the user's config and overrides win
    over ``PET_*``, which wins over this package's own defaults. Returns the options
    and which of them came from which variable."""
    merged = dict(raw)
    taken: dict[str, str] = {}
    for option in ENV_OPTIONS:
        variable = "PET_" + option.upper()
        if merged.get(option) is not None or variable not in env:
            continue
        value: Any = env[variable]
        if option in _ENV_FLAGS:
            try:
                value = bool(int(value))
            except ValueError:
                raise TorchrunOptionError(
                    option, value, "expected 0 or 1 (torchrun reads flags as integers)", "1"
                ).from_environment(variable) from None
        merged[option] = value
        taken[option] = variable
    return merged, taken


def _comma_list(option: str, value: Any) -> tuple[str, ...]:
    """torchrun's ``comma_separated_list``: ``"a,b"`` (``,,`` is a literal comma) or a list."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(v.replace("\0", ",") for v in value.replace(",,", "\0").split(","))
    items = list(value) if isinstance(value, Iterable) else None  # a list, a ListConfig
    if items is not None and all(isinstance(v, str) for v in items):
        return tuple(items)
    raise TorchrunOptionError(
        option, value, "expected a list of strings such as [error, warn]", "[error]"
    )


def _signals(value: Any) -> str:
    import signal as _signal

    text = str(value).strip()
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if not isinstance(getattr(_signal, n, None), _signal.Signals)]
    if not names or bad:
        raise TorchrunOptionError(
            "signals_to_handle",
            value,
            "expected comma-separated signal names such as SIGTERM,SIGINT,SIGUSR1"
            + (f" ({', '.join(bad)} is not a signal here)" if bad else ""),
            DEFAULT_SIGNALS,
        )
    return ",".join(names)


def _logs_specs(value: Any) -> Optional[str]:
    """The name of a ``torchrun.logs_specs`` entry point, checked without importing it."""
    if value in (None, ""):
        return None
    from importlib import metadata

    name = str(value)
    found = sorted({ep.name for ep in metadata.entry_points(group="torchrun.logs_specs")})
    if name not in found:
        raise TorchrunOptionError(
            "logs_specs",
            value,
            "expected the name of an entry point in the 'torchrun.logs_specs' group "
            f"(installed: {', '.join(found) or 'none'})",
            found[0] if found else "my_logs_specs",
            fix="install the package that registers it, or leave logs_specs unset",
        )
    return name


def check_torch_supports(opts: Options, torch_version: Optional[str]) -> None:
    """Refuse an option the installed torch's ``LaunchConfig`` lacks (unset ones pass)."""
    from hydra_torchrun_callback._support import _parse

    if torch_version is None:
        return
    defaults = Options.__dataclass_fields__
    for option, since in TORCH_SINCE.items():
        if getattr(opts, option) == defaults[option].default:
            continue
        if _parse(torch_version) < _parse(since):
            raise TorchrunOptionError(
                option,
                getattr(opts, option),
                f"torch {torch_version} is installed and its torchrun has no {option} "
                f"(it came in torch {since})",
                "",
                fix=f"pip install 'torch>={since}', or leave {PREFIX}.{option} unset",
            )


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


def parse_options(
    raw: Mapping[str, Any],
    env: Optional[Mapping[str, str]] = None,
    torch_version: Optional[str] = None,
) -> Options:
    """Check every option; raise on the first one that cannot work.

    ``env``: the environment whose ``PET_*`` variables fill the options left unset (as
    torchrun does); None reads none. ``torch_version``: the installed torch, to refuse
    options it lacks (None: not checked)."""
    merged, taken = environment_options(raw, env) if env is not None else (dict(raw), {})
    try:
        opts = _parse_options(merged)
    except TorchrunOptionError as err:
        if err.option in taken:
            raise err.from_environment(taken[err.option]) from None
        raise
    opts = replace(opts, from_env=tuple(sorted(taken.items())))
    check_torch_supports(opts, torch_version)
    return opts


def options_here(raw: Mapping[str, Any]) -> Options:
    """:func:`parse_options` for this process: its ``PET_*`` variables, its torch."""
    import os

    from hydra_torchrun_callback._support import installed_versions

    return parse_options(raw, os.environ, installed_versions(("torch",))["torch"])


def _parse_options(raw: Mapping[str, Any]) -> Options:
    _refuse_unknown(raw)
    # Unset (None) and absent are the same: the defaults below.
    given = {k: v for k, v in raw.items() if v is not None}
    get = given.get
    min_nodes, max_nodes = _nodes(get("nnodes"))
    return Options(
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        nproc_per_node=_nproc(get("nproc_per_node")),
        rdzv_backend=_backend(get("rdzv_backend")),
        rdzv_endpoint=str(get("rdzv_endpoint") or ""),
        rdzv_id=_text(get("rdzv_id")),
        rdzv_configs=parse_rdzv_conf(get("rdzv_conf")),
        standalone=_bool("standalone", get("standalone", False)),
        max_restarts=_int("max_restarts", get("max_restarts", 0), 0, "1"),
        monitor_interval=_positive_float("monitor_interval", get("monitor_interval", 0.1), "0.1"),
        start_method=_start_method(get("start_method") or "forkserver"),
        role=str(get("role") or "default"),
        log_dir=_text(get("log_dir")),
        redirects=parse_std("redirects", get("redirects", "0")),
        tee=parse_std("tee", get("tee", "0")),
        local_ranks_filter=_local_ranks(get("local_ranks_filter")),
        node_rank=None if get("node_rank") is None else _int("node_rank", get("node_rank"), 0, "0"),
        master_addr=_text(get("master_addr")),
        master_port=_parse_port(get("master_port")),
        local_addr=_text(get("local_addr")),
        cluster=_choice("cluster", get("cluster") or "auto", CLUSTER_MODES, "none"),
        peer_timeout=_positive_float("peer_timeout", get("peer_timeout", 20.0), "20"),
        summary=_bool("summary", get("summary", True)),
        heartbeat_interval=_heartbeat(get("heartbeat_interval", 0.0)),
        logs_specs=_logs_specs(get("logs_specs")),
        event_log_handler=str(get("event_log_handler") or "null"),
        duplicate_stdout_filters=_comma_list(
            "duplicate_stdout_filters", get("duplicate_stdout_filters")
        ),
        duplicate_stderr_filters=_comma_list(
            "duplicate_stderr_filters", get("duplicate_stderr_filters")
        ),
        numa_binding=None
        if get("numa_binding") in (None, "")
        else _choice("numa_binding", get("numa_binding"), NUMA_MODES, "node"),
        signals_to_handle=_signals(get("signals_to_handle", DEFAULT_SIGNALS)),
        shutdown_timeout=None
        if get("shutdown_timeout") is None
        else _int("shutdown_timeout", get("shutdown_timeout"), 1, "30"),
        virtual_local_rank=_bool("virtual_local_rank", get("virtual_local_rank", False)),
        preemption_grace=_positive_float("preemption_grace", get("preemption_grace", 30.0), "120"),
        warm_server=_choice("warm_server", get("warm_server") or "auto", WARM_SERVERS, "fresh"),
        detach=_bool("detach", get("detach", False)),
        resume=_bool("resume", get("resume", False)),
        controller=_controller(get("controller")),
    )


def _refuse_unknown(raw: Mapping[str, Any]) -> None:
    unknown = sorted(set(raw) - set(OPTION_NAMES) - {"_target_"})
    if not unknown:
        return
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


def _text(value: Any) -> Optional[str]:
    return None if value in (None, "") else str(value)


def _nodes(value: Any) -> tuple[Optional[int], Optional[int]]:
    return (None, None) if value in (None, "") else parse_nnodes(value)


def _nproc(value: Any) -> Optional[str]:
    """The validated spelling (resolved later, by ``_node.placement.plan_workers``)."""
    if value in (None, ""):
        return None
    text = str(value).strip()
    if text in NPROC_WORDS:
        return text
    if isinstance(value, bool) or not re.fullmatch(r"\d+", text) or int(text) < 1:
        raise TorchrunOptionError("nproc_per_node", value, _NPROC_ACCEPTED, "2")
    return str(int(text))


def _backend(value: Any) -> Optional[str]:
    """Unset stays None: the placement picks c10d, or static where torchrun's default
    would rule (hand-wired nodes given only a master address/port)."""
    if value in (None, ""):
        return None
    if str(value) not in RDZV_BACKENDS:
        raise TorchrunOptionError(
            "rdzv_backend", value, "expected one of " + ", ".join(RDZV_BACKENDS), "c10d"
        )
    return str(value)


def _start_method(value: Any) -> str:
    if str(value) not in START_METHODS:
        raise TorchrunOptionError(
            "start_method",
            value,
            "expected one of forkserver (default: warm and CUDA-safe), spawn (a fresh "
            "interpreter per worker, as torchrun), fork",
            "forkserver",
        )
    return str(value)


def _local_ranks(value: Any) -> Optional[frozenset[int]]:
    if value in (None, ""):
        return None
    try:
        ranks = frozenset(int(r) for r in str(value).split(","))
    except ValueError:
        raise TorchrunOptionError(
            "local_ranks_filter", value, "expected comma-separated local ranks", "0"
        ) from None
    if any(r < 0 for r in ranks):
        raise TorchrunOptionError(
            "local_ranks_filter", value, "expected comma-separated local ranks >= 0", "0"
        )
    return ranks


def _bool(option: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise TorchrunOptionError(option, value, "expected true or false", "false")


def _controller(value: Any) -> tuple[tuple[str, Any], ...]:
    """``controller``: a mapping of submitit parameter names to values."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise TorchrunOptionError(
            "controller",
            value,
            "expected a mapping of SLURM job settings (submitit's names)",
            "{partition: cpu, timeout_min: 4320}",
        )
    bad = [k for k in value if not str(k).isidentifier()]
    if bad:
        raise TorchrunOptionError(
            "controller", value, f"{bad[0]!r} is not a parameter name", "{timeout_min: 4320}"
        )
    return tuple(sorted((str(k), v) for k, v in value.items()))


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
