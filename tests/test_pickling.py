"""Code carried by value keeps the user's file, line and source text (cloudpickle >= 3.1.2
renames it ``<dynamic-code>``), also when it was already rebuilt by another cloudpickle."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

APP = textwrap.dedent(
    """
    import pickle, sys
    import cloudpickle
    from hydra_torchrun_callback._wire import pickling as _pickling

    def helper(x):
        raise ValueError(f"boom {x}")

    def main(cfg):
        def inner():
            return (lambda: helper(cfg))()
        return inner()

    task = main
    if sys.argv[1] == "twice":  # as in a submitit job: the task was cloudpickled once already
        task = pickle.loads(cloudpickle.dumps(main))
    sys.stdout.buffer.write(_pickling.dumps(task))
    """
)

RUN = "import pickle, sys; pickle.loads(sys.stdin.buffer.read())(3)"


@pytest.mark.parametrize("hops", ["once", "twice"])
def test_traceback_names_the_apps_file_line_and_source(tmp_path: Path, hops: str) -> None:
    app = tmp_path / "my_app.py"
    app.write_text(APP)
    blob = subprocess.run(
        [sys.executable, str(app), hops], capture_output=True, check=True, cwd=tmp_path
    ).stdout
    # A fresh interpreter elsewhere, as a worker: the app module is not importable there.
    run = subprocess.run([sys.executable, "-c", RUN], input=blob, capture_output=True)
    err = run.stderr.decode()
    assert run.returncode == 1 and "ValueError: boom 3" in err, err
    assert "<dynamic-code>" not in err
    for line, source in [
        (7, 'raise ValueError(f"boom {x}")'),
        (11, "return (lambda: helper(cfg))()"),
        (12, "return inner()"),
    ]:
        assert f'File "{app}", line {line}' in err, err
        assert source in err, err


def test_unpickled_code_is_dynamic_when_no_file_is_known() -> None:
    """Code really made at run time (exec) keeps cloudpickle's own marker."""
    from hydra_torchrun_callback._wire import pickling as _pickling

    namespace: dict[str, object] = {}
    exec("def f():\n    return 42\n", namespace)
    f = _pickling.loads(_pickling.dumps(namespace["f"]))
    assert f() == 42 and f.__code__.co_filename in ("<string>", "<dynamic-code>")
