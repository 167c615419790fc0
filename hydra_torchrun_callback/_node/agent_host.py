"""The agent's side of a node whose agent runs in a fork of the warm server.

The fork becomes the node's agent process (:func:`agent_main`): it blocks the stop
signals (the Hydra process forwards each one once, see ``_callback.agent_link``), points
multiprocessing at the warm server it was forked from (its workers are that server's
forks too), sends every log record to the Hydra process, runs :func:`.._node.job.run_node`
on the job it was given and sends back the outcome. Why the agent runs here, and the
whole exchange, is told in ``_callback.agent_link``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import threading
from collections.abc import Callable
from typing import Any, Optional

from hydra_torchrun_callback._wire.pipe import Channel
from hydra_torchrun_callback._wire.protocol import STOP_SIGNALS, PipeMessage

__all__ = ["agent_main"]


class _PipeHandler(logging.Handler):
    """In the agent: every record goes to the Hydra process, as a dict of plain values
    with its message formatted (``QueueHandler.prepare``'s rule: args may not pickle)."""

    def __init__(self, send: Callable[[Any], None]) -> None:
        super().__init__()
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = dict(record.__dict__)
            data["msg"] = record.getMessage()
            data["args"] = None
            if record.exc_info:
                data["exc_text"] = logging.Formatter().formatException(record.exc_info)
            data["exc_info"] = None
            data.pop("message", None)
            plain = (str, int, float, bool, type(None))
            self.send((PipeMessage.LOG, {k: v for k, v in data.items() if isinstance(v, plain)}))
        except Exception:
            self.handleError(record)


def _portable(exc: BaseException) -> tuple[BaseException, Optional[str]]:
    """``exc`` if it survives pickling (SignalException's does not), else a stand-in of
    a builtin type with its type and message; and, for an unexpected error, its
    traceback (ours and stops carry what matters in their message)."""
    import traceback

    from hydra_torchrun_callback._result import TorchrunJobError, TorchrunSetupError

    try:
        pickle.loads(pickle.dumps(exc))
        portable = exc
    except Exception:
        portable = RuntimeError(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, (TorchrunJobError, TorchrunSetupError, KeyboardInterrupt, SystemExit)):
        return portable, None
    return portable, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _rank_nodes_by_hydra_pid(hydra_pid: int) -> None:
    """torch's c10d rendezvous numbers nodes in the order of (address, agent pid). With
    the agent in a fork, that pid would order the nodes of one host (emulated nodes) at
    random; name the node's Hydra process instead, as when the agent ran in it (nodes
    started in task order get ranks in task order). Private torch API: where it differs,
    the fork's pid is used, which only changes that order."""
    with contextlib.suppress(ImportError, AttributeError, TypeError):
        from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr

        class _HydraPidNodes(dr._NodeDescGenerator):
            def generate(self, local_addr: Optional[str] = None) -> Any:
                node = super().generate(local_addr)
                return dr._NodeDesc(node.addr, hydra_pid, node.local_id)

        dr.DynamicRendezvousHandler._node_desc_generator = _HydraPidNodes()


class _ParentLink:
    """The agent's end of the pipe: its requests to the Hydra process and their answers,
    and the signals the Hydra process forwards (raised in the agent's main thread, where
    the agent's handlers run as they would in the Hydra process)."""

    def __init__(self, conn: Any, channel: Channel) -> None:
        self.conn = conn
        self.send = channel.send
        self._replies: dict[PipeMessage, list[Any]] = {}
        self._replied = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="torchrun-agent-host", daemon=True)
        self._reader.start()

    def ask(self, kind: PipeMessage, value: Any) -> Any:
        with self._replied:
            self.send((kind, value))
            self._replied.wait_for(
                lambda: bool(self._replies.get(kind)) or not self._reader.is_alive()
            )
            if not self._replies.get(kind):
                raise RuntimeError("the Hydra process is gone")
            return self._replies[kind].pop(0)

    @staticmethod
    def raise_in_main(signum: int) -> None:
        import _thread

        _thread.interrupt_main(signal.Signals(signum))  # 3.10+: raise this signal

    def preempted(self, signum: int, frame: Any) -> None:
        """The agent's preemption handler: the Hydra process runs submitit's, then answers."""
        self.ask(PipeMessage.PREEMPTED, signum)

    def adopt(self, own_dir: str, job_dir: str) -> bool:
        """Node 0's output dir: the Hydra process moves its log and config there, then this
        process follows (its cwd; the workers' payload is the caller's)."""
        if not self.ask(PipeMessage.ADOPT, (own_dir, job_dir)):
            return False
        here = os.path.realpath(os.getcwd()) if os.path.isdir(".") else ""
        if here in ("", os.path.realpath(own_dir)):
            os.chdir(job_dir)
        return True

    def _read(self) -> None:
        while True:
            try:
                kind, value = self.conn.recv()
            except (EOFError, OSError):
                with self._replied:
                    self._replied.notify_all()
                return
            if kind == PipeMessage.SIGNAL:
                handler = signal.getsignal(value)
                if callable(handler):
                    self.raise_in_main(int(value))
                elif value not in STOP_SIGNALS:  # preemption before the agent watches
                    self.send((PipeMessage.PREEMPTED_NOW, int(value)))
            else:
                with self._replied:
                    self._replies.setdefault(kind, []).append(value)
                    self._replied.notify_all()


def _become_agent(server: tuple[Any, int], env: dict[str, str], cwd: str) -> None:
    """This fork of the warm server takes the node's place: it dies with the server (which
    dies with the Hydra process), gets the signal dispositions a worker's parent has, and
    starts its workers from the same server instead of a new one."""
    from multiprocessing import forkserver

    from hydra_torchrun_callback._proc import die_with_parent, restore_signals

    die_with_parent(os.getppid())  # the server, which dies with the Hydra process
    restore_signals()  # what the server ignores (see _proc.SHIELDED); blocked by the caller
    address, pid = server
    fs: Any = forkserver._forkserver
    fs._forkserver_address, fs._forkserver_pid = address, pid
    fs.ensure_running = lambda: None
    forkserver.ensure_running = fs.ensure_running  # the module's name was bound at import
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)


def _log_to_parent(
    send: Callable[[Any], None], level: int, levels: dict[str, tuple[int, bool]]
) -> None:
    """Every record goes to the Hydra process, filtered as the job's logging config does."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_PipeHandler(send))
    root.setLevel(level)
    for name, (own_level, disabled) in levels.items():  # the job's logging config's
        named = logging.getLogger(name)
        named.setLevel(own_level)
        named.disabled = disabled


def agent_main(
    conn: Any,
    blob: bytes,
    env: dict[str, str],
    cwd: str,
    level: int,
    levels: dict[str, tuple[int, bool]],
    server: tuple[Any, int],
    hydra_pid: int,
    blocked: tuple[int, ...],
) -> None:
    """The agent's process: a fork of the warm server (torch imported already)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, set(blocked))  # before any thread starts
    from hydra_torchrun_callback._node.agent import _raise_signal
    from hydra_torchrun_callback._node.job import run_node
    from hydra_torchrun_callback._proc import AgentHost, set_agent_host
    from hydra_torchrun_callback._wire import pickling as _pickling

    _become_agent(server, env, cwd)
    channel = Channel(conn)
    _log_to_parent(channel.send, level, levels)
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_signal)  # a Python handler, for interrupt_main
    link = _ParentLink(conn, channel)
    set_agent_host(AgentHost(hydra_pid, server[1], link.raise_in_main, link.preempted))
    _rank_nodes_by_hydra_pid(hydra_pid)
    outcome: tuple[PipeMessage, Any]
    try:
        outcome = (PipeMessage.DONE, run_node(_pickling.loads(blob), link.adopt))
    except BaseException as exc:  # every outcome goes to the parent
        outcome = (PipeMessage.ERROR, _portable(exc))
    channel.send(outcome)
    channel.close()
