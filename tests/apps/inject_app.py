"""Test app that breaks one step of the callback's ``on_job_start`` (``HTR_INJECT``), as a
bug, a missing or too-old dependency or an unsupported interpreter would, then records
where its task ran (``HTR_MARK_DIR``): the task must never run in the Hydra process."""

import json
import os
import sys
from typing import Any

import hydra


def _boom(step: str, kind: type[Exception] = RuntimeError) -> Any:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise kind(f"injected failure in {step}")

    return boom


def inject(step: str) -> None:
    from hydra_torchrun_callback import _support
    from hydra_torchrun_callback._callback import hooks as _callback
    from hydra_torchrun_callback._node import agent as _launch
    from hydra_torchrun_callback._node import placement as _placement
    from hydra_torchrun_callback._wire import pickling as _pickling

    if step == "none":
        return
    if step == "restore":  # the very first thing on_job_start does
        _callback.TorchrunCallback._restore = _boom(step)  # type: ignore[method-assign]
    elif step == "can_divert":  # what Python 3.10 raised before (co_qualname is 3.11+)
        _callback.can_divert = _boom(step, AttributeError)
    elif step == "python":  # an interpreter older than the package supports
        _support.MIN_PYTHON = (3, 99)
    elif step == "old_torch":
        real = _support.installed_versions
        _support.installed_versions = lambda *a, **k: {**real(*a, **k), "torch": "2.1.0"}
    elif step == "no_torch":
        real = _support.installed_versions
        _support.installed_versions = lambda *a, **k: {**real(*a, **k), "torch": None}
        sys.modules["torch"] = None  # type: ignore[assignment]  # import torch -> ImportError
    elif step == "placement":  # runs in the Hydra process when the agent does
        os.environ["HYDRA_TORCHRUN_AGENT_IN_SERVER"] = "0"
        _placement.resolve_placement = _boom(step)
    elif step == "pickle":
        _pickling.dumps = _boom(step)
    elif step == "launch":
        os.environ["HYDRA_TORCHRUN_AGENT_IN_SERVER"] = "0"
        _launch.launch = _boom(step)
    elif step == "agent":  # the agent's process (a fork of the warm server) dies at start
        from inject_child import crash

        from hydra_torchrun_callback._node import agent_host as _agent_host

        _agent_host.agent_main = crash  # type: ignore[assignment]
    elif step == "divert":  # arming the task's call itself fails
        _callback.divert = _boom(step)
    else:
        raise SystemExit(f"unknown HTR_INJECT step {step!r}")


@hydra.main(version_base=None, config_path=None, config_name=None)
def main(cfg: Any) -> int:
    mark = os.path.join(os.environ["HTR_MARK_DIR"], f"ran_{os.getpid()}.json")
    with open(mark, "w") as f:
        json.dump({"pid": os.getpid(), "rank": os.environ.get("RANK")}, f)
    return 7


if __name__ == "__main__":
    inject(os.environ["HTR_INJECT"])
    main()
