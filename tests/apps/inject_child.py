"""What inject_app.py (``HTR_INJECT=agent``) runs instead of the agent's process: a module
function, so the warm server's fork can import it by name."""

from typing import Any


def crash(*args: Any) -> None:
    raise RuntimeError("injected failure in agent")
