"""The agent in a fork of the warm server, so that a node's Hydra process never imports torch.

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

Nothing outlives the parent: the server dies with it (``_warm``), the agent and the
workers with the server (their death signal); when the agent ends, the parent kills
whatever the job left under the server (a worker of an agent that was killed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import signal
import threading
from collections.abc import Callable
from typing import Any, Optional

from hydra_torchrun_callback._protocol import STACKS_SIGNAL, STOP_SIGNALS, PipeMessage

__all__ = ["run_in_warm_server"]

#: How long the parent waits for the agent to wind down after it raised (a stop,
#: submitit's requeue): its workers stop within torch's 30 s close timeout.
WIND_DOWN_S = 45.0


class _RemoteTraceback(Exception):
    """The agent's traceback, chained to an unexpected error it raised (tracebacks do
    not pickle)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class _Channel:
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


def _logger_levels() -> dict[str, tuple[int, bool]]:
    """The Hydra process's named loggers that have a level or are disabled (Hydra's job
    logging config sets them), for the agent to filter its records the same way."""
    found = {}
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and (logger.level or logger.disabled):
            found[name] = (logger.level, logger.disabled)
    return found


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


def _child(
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
    import _thread
    from multiprocessing import forkserver

    from hydra_torchrun_callback import _pickling
    from hydra_torchrun_callback._launch import _raise_signal
    from hydra_torchrun_callback._node_job import run_node
    from hydra_torchrun_callback._proc import AgentHost, die_with_parent, set_agent_host
    from hydra_torchrun_callback._warm import restore_signals

    die_with_parent(os.getppid())  # the server, which dies with the Hydra process
    restore_signals()  # what the server ignores (see _warm.SHIELDED); blocked above
    # Workers come from the same server: point multiprocessing at it instead of a new one.
    address, pid = server
    fs: Any = forkserver._forkserver
    fs._forkserver_address, fs._forkserver_pid = address, pid
    fs.ensure_running = lambda: None
    forkserver.ensure_running = fs.ensure_running  # the module's name was bound at import
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)

    channel = _Channel(conn)
    send = channel.send
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_PipeHandler(send))
    root.setLevel(level)
    for name, (own_level, disabled) in levels.items():  # the job's logging config's
        named = logging.getLogger(name)
        named.setLevel(own_level)
        named.disabled = disabled
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_signal)  # a Python handler, for interrupt_main

    replies: dict[PipeMessage, list[Any]] = {}
    replied = threading.Condition()

    def ask(kind: PipeMessage, value: Any) -> Any:
        with replied:
            send((kind, value))
            replied.wait_for(lambda: bool(replies.get(kind)) or not reader.is_alive())
            if not replies.get(kind):
                raise RuntimeError("the Hydra process is gone")
            return replies[kind].pop(0)

    def raise_in_main(signum: int) -> None:
        _thread.interrupt_main(signal.Signals(signum))  # 3.10+: raise this signal

    def preempted(signum: int, frame: Any) -> None:
        ask(PipeMessage.PREEMPTED, signum)  # the parent runs submitit's handler, then answers

    def read() -> None:
        while True:
            try:
                kind, value = conn.recv()
            except (EOFError, OSError):
                with replied:
                    replied.notify_all()
                return
            if kind == PipeMessage.SIGNAL:
                handler = signal.getsignal(value)
                if callable(handler):
                    raise_in_main(int(value))
                elif value not in STOP_SIGNALS:  # preemption before the agent watches
                    send((PipeMessage.PREEMPTED_NOW, int(value)))
            else:
                with replied:
                    replies.setdefault(kind, []).append(value)
                    replied.notify_all()

    reader = threading.Thread(target=read, name="torchrun-agent-host", daemon=True)
    reader.start()
    set_agent_host(AgentHost(hydra_pid, pid, raise_in_main, preempted))
    _rank_nodes_by_hydra_pid(hydra_pid)

    def adopt(config: Any, own_dir: str, job_dir: str) -> bool:
        """Node 0's output dir: the parent moves its log and config there, then this copy
        follows (the config the workers get, and the cwd)."""
        from omegaconf import read_write

        if not ask(PipeMessage.ADOPT, (own_dir, job_dir)):
            return False
        with read_write(config.hydra.runtime):
            config.hydra.runtime.output_dir = job_dir
        here = os.path.realpath(os.getcwd()) if os.path.isdir(".") else ""
        if here in ("", os.path.realpath(own_dir)):
            os.chdir(job_dir)
        return True

    outcome: tuple[PipeMessage, Any]
    try:
        job = _pickling.loads(blob)
        outcome = (PipeMessage.DONE, run_node(job, adopt))
    except BaseException as exc:  # every outcome goes to the parent
        outcome = (PipeMessage.ERROR, _portable(exc))
    send(outcome)
    channel.close()


def run_in_warm_server(
    blob: bytes,
    config: Any,
    adopt: Callable[[Any, str, str], bool],
    preemption: Optional[signal.Signals],
) -> Optional[bytes]:
    """In the Hydra process: run the pickled :class:`._node_job.NodeJob` with
    :func:`._node_job.run_node` in a fork of the warm server; return what it returned
    (rank 0's pickled value) or raise what it raised."""
    import multiprocessing
    from multiprocessing import forkserver

    from hydra_torchrun_callback._proc import descendants
    from hydra_torchrun_callback._warm import no_main_reimport, start_warm

    server_pid = start_warm()
    fs: Any = forkserver._forkserver
    if server_pid is None or fs._forkserver_address is None:
        raise RuntimeError("the warm server did not start")
    ctx = multiprocessing.get_context("forkserver")
    ours, theirs = ctx.Pipe()
    blocked = STOP_SIGNALS + ((preemption,) if preemption is not None else ())
    child = ctx.Process(
        target=_child,
        args=(
            theirs,
            blob,
            dict(os.environ),
            os.getcwd(),
            logging.getLogger().getEffectiveLevel(),
            _logger_levels(),
            (fs._forkserver_address, server_pid),
            os.getpid(),
            blocked,
        ),
        name="torchrun-agent",
        daemon=False,
    )
    channel = _Channel(ours)
    send = channel.send

    def forward(signum: int, frame: Any) -> None:
        send((PipeMessage.SIGNAL, signum))

    def stacks(signum: int, frame: Any) -> None:
        with contextlib.suppress(OSError, TypeError):
            os.kill(child.pid, signum)  # type: ignore[arg-type]

    handlers: dict[int, Any] = {sig: forward for sig in blocked}
    handlers[STACKS_SIGNAL] = stacks
    previous = {sig: signal.getsignal(sig) for sig in handlers}
    preempt_handler = previous.get(preemption) if preemption is not None else None
    with no_main_reimport():
        child.start()
    theirs.close()
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    raised: Optional[BaseException] = None  # from submitit's handler, run here
    finished = False  # the agent sent its outcome
    try:
        while True:
            try:
                if raised is not None and not ours.poll(WIND_DOWN_S):
                    break  # the agent did not wind down: the finally kills it
                kind, value = ours.recv()
            except (EOFError, OSError):
                if raised is not None:
                    break
                child.join(5)
                raise RuntimeError(
                    f"the torchrun agent's process (pid {child.pid}) ended without a result "
                    f"(exit code {child.exitcode}); its workers were stopped"
                ) from None
            if kind == PipeMessage.LOG:
                record = logging.makeLogRecord(value)
                logging.getLogger(record.name).handle(record)  # levels applied in the agent
            elif kind == PipeMessage.ADOPT:
                send((PipeMessage.ADOPT, adopt(config, *value)))
            elif kind in (PipeMessage.PREEMPTED, PipeMessage.PREEMPTED_NOW):
                if kind == PipeMessage.PREEMPTED:
                    send((PipeMessage.PREEMPTED, None))  # the agent's handler returns first
                if callable(preempt_handler):
                    try:
                        preempt_handler(value, None)  # submitit: checkpoint, requeue, exit
                    except BaseException as exc:
                        raised = exc
                        send((PipeMessage.SIGNAL, signal.SIGTERM))  # the agent stops, then we go
            elif kind in (PipeMessage.DONE, PipeMessage.ERROR):
                finished = True
                if raised is not None:
                    break
                if kind == PipeMessage.DONE:
                    return value  # type: ignore[no-any-return]
                error, text = value
                if text is not None:
                    error.__cause__ = _RemoteTraceback(f"\n\nIn the torchrun agent:\n{text}")
                raise error
        assert raised is not None
        raise raised
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if not finished and child.is_alive():  # we leave first (an error here): stop it
            send((PipeMessage.SIGNAL, signal.SIGTERM))
        child.join(WIND_DOWN_S)
        if child.is_alive():
            child.kill()
            child.join(5)
        # What the job left under the server (workers of an agent that was killed):
        # the server itself stays for the next job of a multirun.
        for pid in descendants(server_pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        channel.close(timeout=1.0)
        ours.close()
