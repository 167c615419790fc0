"""Test sweeper: Hydra's basic sweeper that writes down every JobReturn it receives.

``hydra/sweeper=record`` (with ``tests/sweeper_plugin`` on PYTHONPATH). Each point's
status, value (its repr and type) or error goes to ``<sweep dir>/sweeper_saw.jsonl``: what
any sweeper would see, observed from outside. Unlike the basic sweeper it never raises
on a failed point, so every batch runs.
"""
# No `from __future__ import annotations`: Hydra imports plugins outside sys.modules
# while scanning, and dataclasses then cannot resolve string annotations.

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobStatus


@dataclass
class RecordSweeperConf:
    _target_: str = "hydra_plugins.record_sweeper.RecordSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="record", node=RecordSweeperConf)


class RecordSweeper(BasicSweeper):
    def sweep(self, arguments: list[str]) -> Any:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        assert self.config is not None and self.launcher is not None
        params_conf = self._parse_config()
        params_conf.extend(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        self.overrides = self.split_arguments(
            parser.parse_overrides(params_conf), self.max_batch_size
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        idx = 0
        while not self.is_done():
            batch = self.get_job_batch()
            results = self.launcher.launch(batch, initial_job_idx=idx)
            idx += len(batch)
            with open(sweep_dir / "sweeper_saw.jsonl", "a") as f:
                for ret in results:
                    row: dict[str, Any] = {
                        "overrides": list(ret.overrides or []),
                        "status": ret.status.name,
                        "working_dir": ret.working_dir,
                    }
                    if ret.status == JobStatus.COMPLETED:
                        row["value"] = repr(ret.return_value)
                        row["type"] = type(ret.return_value).__name__
                    else:
                        row["error_type"] = type(ret._return_value).__name__
                        row["error"] = str(ret._return_value)[:3000]
                    f.write(json.dumps(row) + "\n")
        return None
