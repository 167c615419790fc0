"""cloudpickle, keeping the user's file names in the code it carries by value.

The task (and everything it uses from the app's ``__main__``) travels to the workers
by value. cloudpickle >= 3.1.2 replaces ``co_filename`` of every code object it
pickles by value with ``"<dynamic-code>"`` (for deterministic payloads), so a
worker's traceback loses the user's file and source line: ``File
"<dynamic-code>", line 16, in main``. Root causes and stack dumps must name the
app's real file, as they do under torchrun, so this pickler carries the file name
beside each code object and puts it back when unpickling.

The name is the code object's own, or, for code that was already rebuilt by a
cloudpickle elsewhere (submitit pickles the whole Hydra job to each node), the
``__file__`` of the function's module, which cloudpickle keeps in the function's
globals. Line numbers are never touched by cloudpickle; with the real file name,
:mod:`linecache` finds the source text on any host that sees the app's file.
"""

from __future__ import annotations

import io
import types
from collections import ChainMap
from typing import Any

__all__ = ["dumps", "loads"]

#: What cloudpickle 3.1.2+ writes instead of the real file name.
DYNAMIC = "<dynamic-code>"


def _with_filename(code: types.CodeType, filename: str) -> types.CodeType:
    """Unpickling side: the code object under the app's file name."""
    return code.replace(co_filename=filename)


def _code_ids(code: types.CodeType) -> list[int]:
    """``code`` and the code objects nested in it (inner functions, lambdas, classes)."""
    ids = [id(code)]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            ids.extend(_code_ids(const))
    return ids


_PICKLER: Any = None


def _pickler_class() -> Any:
    import cloudpickle

    base: Any = cloudpickle.Pickler
    reduce_code = base.dispatch_table[types.CodeType]  # cloudpickle's own (2.x and 3.x)

    class _Pickler(base):  # type: ignore[misc]
        def __init__(self, file: Any) -> None:
            #: id(code object) -> the file it came from, for already-renamed code.
            self.files: dict[int, str] = {}
            # Before the base __init__: the C pickler reads dispatch_table there.
            self.dispatch_table = ChainMap({types.CodeType: self._reduce_code}, base.dispatch_table)
            super().__init__(file)

        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, types.FunctionType) and obj.__code__.co_filename == DYNAMIC:
                filename = obj.__globals__.get("__file__")
                if isinstance(filename, str) and filename:
                    for code_id in _code_ids(obj.__code__):
                        self.files.setdefault(code_id, filename)
            return super().reducer_override(obj)

        def _reduce_code(self, code: types.CodeType) -> Any:
            filename = code.co_filename
            if filename == DYNAMIC:
                filename = self.files.get(id(code), DYNAMIC)
                if filename == DYNAMIC:  # the renamed copy below, or code with no known file
                    return reduce_code(code)
            # Nested code objects (co_consts) come through here too, each with its name.
            return _with_filename, (code.replace(co_filename=DYNAMIC), filename)

    return _Pickler


def dumps(obj: Any) -> bytes:
    """``cloudpickle.dumps(obj)``, with every code object's real ``co_filename``."""
    global _PICKLER
    if _PICKLER is None:
        _PICKLER = _pickler_class()
    buffer = io.BytesIO()
    _PICKLER(buffer).dump(obj)
    return buffer.getvalue()


def loads(data: bytes) -> Any:
    """``cloudpickle.loads`` (plain :func:`pickle.loads`: the reducers are importable)."""
    import cloudpickle

    return cloudpickle.loads(data)
