"""The agent pipe: one end of the anonymous pipe between a node's Hydra process and its
agent in a fork of the warm server (``_callback.agent_link`` holds one end, ``_node.agent_host`` the
other; the message kinds are :class:`.protocol.PipeMessage`). Only those two
processes hold it: nothing on the network can write to it."""

from __future__ import annotations

import queue
import threading
from typing import Any

__all__ = ["Channel"]


class Channel:
    """One end of the pipe. Messages are sent by a thread of their own: signal handlers
    send too (a forwarded stop, a preemption, a log line), and a handler that runs while
    its thread is inside ``conn.send`` would deadlock on a lock or interleave the bytes of
    two messages; ``SimpleQueue.put`` is safe there (reentrant)."""

    _CLOSE = object()

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="torchrun-agent-pipe", daemon=True)
        self._writer.start()

    def send(self, message: Any) -> None:
        self._out.put(message)

    def _write(self) -> None:
        while True:
            message = self._out.get()
            if message is self._CLOSE:
                return
            try:
                self.conn.send(message)
            except (OSError, ValueError):  # the other end is gone
                return
            except Exception:  # a value that does not pickle: drop it, keep the channel
                continue

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued (up to ``timeout``), then stop the writer."""
        self._out.put(self._CLOSE)
        self._writer.join(timeout)
