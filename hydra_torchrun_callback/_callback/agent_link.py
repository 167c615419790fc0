"""The Hydra process's side of the agent in a fork of the warm server, so that a node's
Hydra process needs no torch of its own (an app may still import it: the server is then
a fork of the Hydra process, see ``_node.warm``).

With ``start_method=forkserver`` (the default) a node imported torch twice: in its
Hydra process, for the agent, and in the warm server, for the workers. On 2 emulated
nodes of a 2-core machine that second import was most of the gap to bare torchrun
agents. Here the agent runs in a child forked from the server (torch already there)
and its workers are forked from that same server, so each node imports torch once.

The Hydra process (parent) and the agent (child) talk over an anonymous
``multiprocessing.Pipe`` that only they hold: nothing on the network can write to it.

- parent -> child: the job (pickled by the caller: an unpicklable task fails in the
  parent with the usual setup error), then forwarded signals and replies;
- child -> parent: log records (handed to Hydra's handlers: console, the job's log
  file), requests (adopt node 0's output dir, which moves the parent's log file; hand
  a preemption to submitit's handler, which lives in the parent) and one final
  message: rank 0's pickled value, or the error.

Signals reach the agent exactly once. The child blocks the stop signals and the
preemption signal (scancel signals every process of the step, Ctrl-C the whole
process group) and acts only on what the parent forwards, raised in its main thread
by ``_thread.interrupt_main``, where the agent's handlers run as they would in the
Hydra process. Stops from inside the agent (a lost node, the launcher gone) take the
same path (``_proc.stop_self``). Stack requests (``SIGURG``) are not blocked: the
parent passes them on with ``kill``.

Nothing outlives the parent: the server dies with it (``_node.warm``), the agent and the
workers with the server (their death signal); when the agent ends, the parent kills
whatever the job left under the server (a worker of an agent that was killed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable
from typing import Any, Optional

from hydra_torchrun_callback._wire.pipe import Channel
from hydra_torchrun_callback._wire.protocol import STACKS_SIGNAL, STOP_SIGNALS, PipeMessage

__all__ = ["run_in_warm_server"]

#: How long the parent waits for the agent to wind down after it raised (a stop,
#: submitit's requeue): its workers stop within torch's 30 s close timeout.
WIND_DOWN_S = 45.0


class _RemoteTraceback(Exception):
    """The agent's traceback, chained to an unexpected error it raised (tracebacks do
    not pickle)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _logger_levels() -> dict[str, tuple[int, bool]]:
    """The Hydra process's named loggers that have a level or are disabled (Hydra's job
    logging config sets them), for the agent to filter its records the same way."""
    found = {}
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and (logger.level or logger.disabled):
            found[name] = (logger.level, logger.disabled)
    return found


def run_in_warm_server(
    blob: bytes,
    adopt: Callable[[str, str], bool],
    preemption: Optional[signal.Signals],
    warm_server: str = "auto",
) -> Optional[bytes]:
    """In the Hydra process: run the pickled :class:`.._node.job.NodeJob` with
    :func:`.._node.job.run_node` in a fork of the warm server (``warm_server``: the
    option, see :func:`.._node.warm.start_warm`); return what it returned (rank 0's
    pickled value) or raise what it raised."""
    link = _AgentLink(blob, preemption, warm_server)
    link.start()
    try:
        return link.serve(adopt)
    finally:
        link.close()


class _AgentLink:
    """The Hydra process's end: starts the agent, forwards signals to it, serves its
    requests and log records, and leaves nothing of the job behind."""

    def __init__(self, blob: bytes, preemption: Optional[signal.Signals], warm_server: str) -> None:
        import multiprocessing
        from multiprocessing import forkserver

        from hydra_torchrun_callback._node import agent_host as _agent_host
        from hydra_torchrun_callback._node.warm import start_warm

        server_pid = start_warm(warm_server)
        fs: Any = forkserver._forkserver
        if server_pid is None or fs._forkserver_address is None:
            raise RuntimeError("the warm server did not start")
        self.server_pid = server_pid
        ctx = multiprocessing.get_context("forkserver")
        self.conn, theirs = ctx.Pipe()
        self.blocked = STOP_SIGNALS + ((preemption,) if preemption is not None else ())
        self.child = ctx.Process(
            target=_agent_host.agent_main,
            args=(
                theirs,
                blob,
                dict(os.environ),
                os.getcwd(),
                logging.getLogger().getEffectiveLevel(),
                _logger_levels(),
                (fs._forkserver_address, server_pid),
                os.getpid(),
                self.blocked,
            ),
            name="torchrun-agent",
            daemon=False,
        )
        self._theirs = theirs
        self.channel = Channel(self.conn)
        self.send = self.channel.send
        handlers: dict[int, Any] = {sig: self._forward for sig in self.blocked}
        handlers[STACKS_SIGNAL] = self._pass_stacks_request
        self.handlers = handlers
        self.previous = {sig: signal.getsignal(sig) for sig in handlers}
        self.preempt_handler = self.previous.get(preemption) if preemption is not None else None
        self.raised: Optional[BaseException] = None  # from submitit's handler, run here
        self.finished = False  # the agent sent its outcome

    def start(self) -> None:
        from hydra_torchrun_callback._node.warm import no_main_reimport

        with no_main_reimport():
            self.child.start()
        self._theirs.close()
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)

    def _forward(self, signum: int, frame: Any) -> None:
        self.send((PipeMessage.SIGNAL, signum))

    def _pass_stacks_request(self, signum: int, frame: Any) -> None:
        with contextlib.suppress(OSError, TypeError):
            os.kill(self.child.pid, signum)  # type: ignore[arg-type]

    def serve(self, adopt: Callable[[str, str], bool]) -> Optional[bytes]:
        """Answer the agent until it sends its outcome; return or raise that outcome (or
        what submitit's preemption handler raised here, once the agent wound down)."""
        while True:
            try:
                if self.raised is not None and not self.conn.poll(WIND_DOWN_S):
                    break  # the agent did not wind down: close() kills it
                kind, value = self.conn.recv()
            except (EOFError, OSError):
                if self.raised is not None:
                    break
                self.child.join(5)
                raise RuntimeError(
                    f"the torchrun agent's process (pid {self.child.pid}) ended without a "
                    f"result (exit code {self.child.exitcode}); its workers were stopped"
                ) from None
            if kind == PipeMessage.LOG:
                record = logging.makeLogRecord(value)
                logging.getLogger(record.name).handle(record)  # levels applied in the agent
            elif kind == PipeMessage.ADOPT:
                self.send((PipeMessage.ADOPT, adopt(*value)))
            elif kind in (PipeMessage.PREEMPTED, PipeMessage.PREEMPTED_NOW):
                self._preempted(kind, value)
            elif kind in (PipeMessage.DONE, PipeMessage.ERROR):
                self.finished = True
                if self.raised is not None:
                    break
                if kind == PipeMessage.DONE:
                    return value  # type: ignore[no-any-return]
                error, text = value
                if text is not None:
                    error.__cause__ = _RemoteTraceback(f"\n\nIn the torchrun agent:\n{text}")
                raise error
        assert self.raised is not None
        raise self.raised

    def _preempted(self, kind: PipeMessage, signum: int) -> None:
        """submitit's handler lives here: run it (checkpoint, requeue, exit); what it
        raises stops the agent, and this process then leaves with it."""
        if kind == PipeMessage.PREEMPTED:
            self.send((PipeMessage.PREEMPTED, None))  # the agent's handler returns first
        if callable(self.preempt_handler):
            try:
                self.preempt_handler(signum, None)
            except BaseException as exc:
                self.raised = exc
                self.send((PipeMessage.SIGNAL, signal.SIGTERM))  # the agent stops, then we go

    def close(self) -> None:
        """Put the signal handlers back; stop the agent if it still runs; kill what the
        job left under the server (workers of an agent that was killed). The server
        itself stays for the next job of a multirun."""
        from hydra_torchrun_callback._proc import descendants

        for sig, handler in self.previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if not self.finished and self.child.is_alive():  # we leave first (an error here)
            self.send((PipeMessage.SIGNAL, signal.SIGTERM))
        self.child.join(WIND_DOWN_S)
        if self.child.is_alive():
            self.child.kill()
            self.child.join(5)
        for pid in descendants(self.server_pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.channel.close(timeout=1.0)
        self.conn.close()
