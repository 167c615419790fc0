"""Rank 0's return value reaches the Hydra process with its tensors on the CPU (_result.to_cpu).

This machine has no GPU (CPU-only torch), so no real CUDA tensor can be made here. The
stand-in: ``FakeCuda``, a ``torch.Tensor`` subclass holding CPU data whose ``device`` says
``cuda:0`` (``is_cuda`` True) and whose ``.cpu()`` returns a plain CPU copy and records the
call. ``to_cpu`` only looks at ``tensor.device.type`` and calls ``.detach().cpu()``, so this
exercises its real code path; what it cannot show (a real device-to-host copy, CUDA never
initialised in the Hydra process) is checked on a GPU host by ``scripts/gpu_check.sh``.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
import subprocess
import sys
from typing import Any, NamedTuple

import pytest
import torch

from hydra_torchrun_callback._result import to_cpu
from hydra_torchrun_callback._wire import pickling as _pickling


class _ReportsCuda:
    """Mixin: a tensor that reports ``cuda:0`` and records each ``.cpu()`` call."""

    moves: list[torch.Tensor] = []  # noqa: RUF012 - shared record of the calls

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0)

    @property
    def is_cuda(self) -> bool:
        return True

    def cpu(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        copy = torch.Tensor.as_subclass(self, torch.Tensor).clone()  # type: ignore[arg-type]
        _ReportsCuda.moves.append(copy)
        return copy


class FakeCuda(_ReportsCuda, torch.Tensor):
    pass


class FakeCudaParameter(_ReportsCuda, torch.nn.Parameter):
    pass


def fake_cuda(*values: float, requires_grad: bool = False) -> torch.Tensor:
    tensor = torch.tensor(values, requires_grad=requires_grad).as_subclass(FakeCuda)
    assert tensor.device.type == "cuda" and tensor.requires_grad == requires_grad
    return tensor


def is_plain_cpu(value: Any) -> bool:
    return type(value) is torch.Tensor and value.device.type == "cpu"


class Point(NamedTuple):
    x: Any
    y: Any


@dataclasses.dataclass(frozen=True)
class Metrics:
    loss: Any
    name: str = "m"
    extra: Any = dataclasses.field(default=None, init=False)


@pytest.fixture(autouse=True)
def _clear_moves() -> None:
    _ReportsCuda.moves.clear()


def test_stand_in_reports_a_cuda_device() -> None:
    t = fake_cuda(1.0)
    assert t.is_cuda and t.device == torch.device("cuda", 0)
    assert is_plain_cpu(t.cpu()) and len(_ReportsCuda.moves) == 1


def test_nested_containers_come_back_on_the_cpu() -> None:
    t = fake_cuda(1.0, 2.0)
    state = collections.OrderedDict(w=fake_cuda(3.0), b=torch.zeros(1))
    state._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    value = {
        "loss": t,
        "same": t,
        "list": [1, "a", fake_cuda(4.0)],
        "tuple": (fake_cuda(5.0), 2),
        "point": Point(fake_cuda(6.0), 7),
        "set": {fake_cuda(8.0)},
        "frozen": frozenset({fake_cuda(9.0)}),
        "state": state,
        "dd": collections.defaultdict(list, k=fake_cuda(10.0)),
        "metrics": Metrics(fake_cuda(11.0)),
    }
    out = to_cpu(value)
    assert out is not value and type(out) is dict
    assert is_plain_cpu(out["loss"]) and out["loss"].tolist() == [1.0, 2.0]
    assert out["same"] is out["loss"]  # a tensor met twice is moved once
    assert out["list"][:2] == [1, "a"] and is_plain_cpu(out["list"][2])
    assert type(out["tuple"]) is tuple and is_plain_cpu(out["tuple"][0])
    assert type(out["point"]) is Point and is_plain_cpu(out["point"].x) and out["point"].y == 7
    assert type(out["set"]) is set and all(map(is_plain_cpu, out["set"]))
    assert type(out["frozen"]) is frozenset and all(map(is_plain_cpu, out["frozen"]))
    assert type(out["state"]) is collections.OrderedDict and list(out["state"]) == ["w", "b"]
    assert out["state"]._metadata == {"": {"version": 1}}  # load_state_dict needs it
    assert is_plain_cpu(out["state"]["w"]) and out["state"]["b"] is state["b"]
    assert out["dd"].default_factory is list and is_plain_cpu(out["dd"]["k"])
    assert type(out["metrics"]) is Metrics and is_plain_cpu(out["metrics"].loss)
    assert out["metrics"].name == "m" and out["metrics"].extra is None
    assert len(_ReportsCuda.moves) == 9  # 9 tensors: `same` cost no second copy
    # The worker's own value is never changed in place.
    assert value["loss"] is t and type(value["list"][2]) is FakeCuda
    assert type(state["w"]) is FakeCuda and type(value["metrics"].loss) is FakeCuda


def test_values_without_accelerator_tensors_are_the_same_objects() -> None:
    cpu = torch.ones(2)
    meta = torch.empty(3, device="meta")  # no data to copy: kept as is
    opaque = object()
    value = {"a": [cpu, (1, 2.5, None)], "b": {"c": meta}, "o": opaque, "s": "x", "n": None}
    assert to_cpu(value) is value
    for item in (cpu, meta, opaque, 3, "s", None, [], (), Point(1, 2), Metrics(cpu)):
        assert to_cpu(item) is item
    assert _ReportsCuda.moves == []


def test_other_objects_are_not_walked() -> None:
    class Holder:
        def __init__(self) -> None:
            self.t = fake_cuda(1.0)

    holder = Holder()
    assert to_cpu(holder) is holder and type(holder.t) is FakeCuda


def test_grad_and_parameters() -> None:
    leaf = fake_cuda(1.0, requires_grad=True)
    moved = to_cpu(leaf)
    assert is_plain_cpu(moved) and moved.requires_grad and moved.is_leaf
    param = FakeCudaParameter(torch.tensor([2.0]))
    assert param.device.type == "cuda"
    out = to_cpu({"p": param})["p"]
    assert type(out) is torch.nn.Parameter and out.device.type == "cpu" and out.requires_grad


def test_module_is_moved_in_place() -> None:
    class Recording(torch.nn.Linear):
        calls = 0

        def cpu(self) -> Recording:
            Recording.calls += 1
            return super().cpu()

    module = Recording(2, 2)
    value = {"model": module}
    assert to_cpu(value) is value and Recording.calls == 1


def test_reference_cycle() -> None:
    value: list[Any] = [fake_cuda(1.0)]
    value.append(value)
    out = to_cpu(value)
    assert is_plain_cpu(out[0]) and out[1] is value  # the cycle keeps the original


def test_pickled_like_the_worker_does() -> None:
    """The worker cloudpickles the value; the Hydra process gets plain CPU tensors."""
    data = _pickling.dumps(to_cpu({"loss": fake_cuda(0.5), "steps": 3}))
    back = _pickling.loads(data)
    assert is_plain_cpu(back["loss"]) and back["loss"].item() == 0.5 and back["steps"] == 3
    assert b"FakeCuda" not in data and b"cuda" not in pickle.dumps(back)


def test_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from hydra_torchrun_callback._result import to_cpu\n"
        "v = {'a': [1, (2, {3})]}\n"
        "assert to_cpu(v) is v\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
