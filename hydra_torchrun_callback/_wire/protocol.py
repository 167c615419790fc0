"""Everything that crosses a process or a host, named in one place.

A job runs in up to four kinds of processes per node: the Hydra process (the callback),
the agent (in a fork of the warm server, or in the Hydra process), the warm server
(a forkserver) and the workers; the nodes of a job meet in one TCPStore that node 0's
agent hosts. What one of them tells another goes through one of these channels, and
each channel's vocabulary is defined here, so a reviewer checks one file for what
crosses a boundary:

- **environment variables** a process sets for the ones it starts (``HYDRA_TORCHRUN_*``,
  the only module that spells them), and the one a user sets (the key file);
- **signals** sent between the processes of a node;
- **the agent pipe** between the Hydra process and the agent in a fork of the warm
  server: :class:`PipeMessage` kinds;
- **the job store**: the key families of a job's signed key space (values are signed,
  encoded and chunked by ``_wire.store``; what each node does with them is
  ``_node.job_ops``);
- **files** the workers, the nodes and the user's shell exchange through the node's
  records folder and the job's output dir, and a sweep's controller, its point jobs and
  the user's shell exchange through the sweep dir (``_wire.sweep_files`` writes them).
"""

from __future__ import annotations

import enum
import re
import signal
from pathlib import Path

__all__ = [
    "AGENT_IN_SERVER_ENV",
    "CONTROLLER_FILE",
    "CONTROLLER_JOB_ENV",
    "CONTROLLER_LOG",
    "CREATOR_KEY",
    "DUMP_SIGNALS",
    "DUMP_WAIT_S",
    "FAILURE_GRACE_ENV",
    "FAILURE_KEY",
    "FIRST_FAILED_KEY",
    "FIRST_FAILURE_KEY",
    "HELLO_KEY",
    "JOBDIR_KEY",
    "JOB_FILE",
    "JOB_STORE_ENV",
    "LEDGER_DIR",
    "LOCAL_SLOT_ENV",
    "POINT_FILE",
    "POINT_VALUE_FILE",
    "QUICK_EXIT_ENV",
    "RECORDS_ENV",
    "REQUEST_ID",
    "RESULT_KEY",
    "RUN_ID_ENV",
    "SECRET_FILE_ENV",
    "STACKS_COUNT_KEY",
    "STACKS_DIR",
    "STACKS_SIGNAL",
    "STOP_SIGNALS",
    "STORE_DIR_NAME",
    "SUMMARY_FILE",
    "SWEEP_FILE",
    "SWEEP_ROLE_ENV",
    "SWEEP_STATE_DIR",
    "WARM_PARENT_ENV",
    "PipeMessage",
    "chunk_key",
    "dump_paths",
    "heartbeat_key",
    "hello_session",
    "job_prefix",
    "node_failure_key",
    "rows_key",
    "stacks_key",
]

# -- environment variables ----------------------------------------------------------------
#: Set by the user: the job-store key file (default ``~/.config/hydra-torchrun-callback/secret``).
SECRET_FILE_ENV = "HYDRA_TORCHRUN_SECRET_FILE"
#: Set by the user: ``0`` keeps the agent in the Hydra process with the warm start (one
#: more torch import per node; to step through the agent with pdb).
AGENT_IN_SERVER_ENV = "HYDRA_TORCHRUN_AGENT_IN_SERVER"
#: "0": the Hydra process that ran the callback exits as Python does by default (see
#: ``_callback.hooks._quick_exit_at_end``).
QUICK_EXIT_ENV = "HYDRA_TORCHRUN_QUICK_EXIT"
#: Hydra process -> workers (the task): the job's run identity, stable across requeues and
#: resumes (a logger's run id: W&B ``id=``, Lightning's ``version=``).
RUN_ID_ENV = "HYDRA_TORCHRUN_RUN_ID"
#: Detaching process -> the sweep's controller: "controller" (never detach again; resume
#: whatever the sweep dir holds).
SWEEP_ROLE_ENV = "HYDRA_TORCHRUN_SWEEP_ROLE"
#: Controller's SLURM job -> the controller: its own job id (the sweep's allocation
#: variables are removed so point jobs do not inherit them).
CONTROLLER_JOB_ENV = "HYDRA_TORCHRUN_CONTROLLER_JOB"
#: Hydra process -> warm server: the pid whose death ends the server.
WARM_PARENT_ENV = "HYDRA_TORCHRUN_WARM_PARENT"
#: Agent -> workers: where to claim the job's first failure, "host:port prefix session" (an
#: elastic job's shared store: "file:<path> prefix session").
JOB_STORE_ENV = "HYDRA_TORCHRUN_JOB_STORE"
#: Agent -> workers: the node's private records folder (worker records, stack dumps).
RECORDS_ENV = "HYDRA_TORCHRUN_RECORDS"
#: Agent -> workers: "offset:host_workers" when the node shares its host with other tasks.
LOCAL_SLOT_ENV = "HYDRA_TORCHRUN_LOCAL_SLOT"
#: Agent -> workers: seconds a raising worker waits before it exits.
FAILURE_GRACE_ENV = "HYDRA_TORCHRUN_FAILURE_GRACE"

# -- signals ------------------------------------------------------------------------------
#: The stops the Hydra process forwards to the agent in a fork of the warm server (which
#: blocks them, so each reaches it once).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
#: Dumps the stacks without stopping anything. SLURM and submitit use SIGUSR1, SIGUSR2
#: and SIGTERM; SIGURG is ignored by default, so sent to the wrong process (or before
#: a handler is in place) it does nothing. Sent to a node's Hydra process, it makes
#: every rank of that node dump its stacks into its log.
STACKS_SIGNAL = signal.SIGURG
#: The signals by which a job stops its workers: each worker dumps its stacks first.
DUMP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# -- the agent pipe (Hydra process <-> the agent in a fork of the warm server) -------------
class PipeMessage(str, enum.Enum):
    """The kind of a ``(kind, value)`` message on the agent pipe."""

    #: agent -> Hydra: a log record (a dict of plain values) for Hydra's handlers.
    LOG = "log"
    #: agent -> Hydra: (own dir, node 0's dir), answered with whether it was adopted.
    ADOPT = "adopt"
    #: agent -> Hydra: the preemption signal reached the agent's handler (answered
    #: once the agent's handler may return); PREEMPTED_NOW: before the agent watched.
    PREEMPTED = "preempted"
    PREEMPTED_NOW = "preempted-now"
    #: Hydra -> agent: a signal to raise in the agent's main thread.
    SIGNAL = "signal"
    #: agent -> Hydra, last: rank 0's pickled value, or (error, traceback text).
    DONE = "done"
    ERROR = "error"


# -- the job store ------------------------------------------------------------------------
#: Node 0's signed ``hello`` under the job's prefix: proves a store belongs to the job.
HELLO_KEY = "hello"
#: The directory, in submitit's folder (shared by a job's nodes), that holds elastic jobs'
#: store and rendezvous files (``<rdzv id>.r<requeue>/job`` and ``/rendezvous``).
STORE_DIR_NAME = ".torchrun_store"
#: An elastic job's shared store: the counter whose first ``add`` makes a node its creator.
CREATOR_KEY = "creator"
#: The job's failure slot: the root cause wins it (an encoded error).
FAILURE_KEY = "failure"
#: Claimed (compare-set) by the first worker that raised, before its exception
#: propagates: peers only fail after it, so the claim orders the root cause first.
FIRST_FAILED_KEY = "first_failed_rank"
#: What the claiming worker raised (JSON), written right after its claim.
FIRST_FAILURE_KEY = "first_failure"
#: Global rank 0's pickled return value (chunked), from a node other than node 0.
RESULT_KEY = "result"
#: Node 0's output dir, where every node of the job works.
JOBDIR_KEY = "jobdir"
#: An elastic job's nodes after its latest loss (JSON: epoch, lost, alive, at, why).
MEMBERSHIP_KEY = "membership"
#: The number of stack requests node 0 relayed.
STACKS_COUNT_KEY = "stacks/count"


def job_prefix(run_id: str) -> str:
    """The job's key space in the store."""
    return f"hydra_torchrun/{run_id}/"


def hello_session(run_id: str) -> str:
    """What node 0's hello is signed for (the job's own session follows from it)."""
    return f"hello/{run_id}"


def heartbeat_key(node: int) -> str:
    """A node's heartbeat (JSON: count, done, its ranks' states, how it ended)."""
    return f"hb/{node}"


def node_failure_key(node: int) -> str:
    """A node's own failure report: its agent's last word on its ranks."""
    return f"{FAILURE_KEY}/{node}"


def rows_key(node: int) -> str:
    """A node's rows of the job summary (JSON, chunked)."""
    return f"rows/{node}"


def stacks_key(number: int) -> str:
    """The id of node 0's ``number``-th relayed stack request."""
    return f"stacks/{number}"


def chunk_key(name: str, index: int) -> str:
    """Part ``index`` of a value stored in chunks (TCPStore refuses values over 8 MiB)."""
    return f"{name}#{index}"


# -- files ---------------------------------------------------------------------------------
#: In the job's output dir: the job summary node 0 writes.
SUMMARY_FILE = "torchrun_summary.json"
#: In the job's output dir: where stack requests and answers meet.
STACKS_DIR = ".torchrun_stacks"
#: In :data:`STACKS_DIR`: what node 0 says of the running job.
JOB_FILE = "job.json"


#: In the sweep dir: the sweep's own state (the controller's, never a job's).
SWEEP_STATE_DIR = ".torchrun_sweep"
#: In :data:`SWEEP_STATE_DIR`: what the sweep is (app, task overrides, id, command).
SWEEP_FILE = "sweep.json"
#: In :data:`SWEEP_STATE_DIR`: the controller (where it runs, its log, its job id).
CONTROLLER_FILE = "controller.json"
#: In :data:`SWEEP_STATE_DIR`: a detached local controller's output.
CONTROLLER_LOG = "controller.log"
#: In :data:`SWEEP_STATE_DIR`: one file per point the controller submitted (its job ids).
LEDGER_DIR = "points"
#: In a point's output dir: its state and attempts, written by its job (node 0).
POINT_FILE = "torchrun_point.json"
#: In a point's output dir: rank 0's value, pickled and signed (HMAC) by its job.
POINT_VALUE_FILE = "torchrun_result.bin"


#: A stack request's id in :data:`STACKS_DIR` (``req-<ID>``): seconds, then random hex.
REQUEST_ID = re.compile(r"^[0-9]{10}-[0-9a-f]{8}$")
#: How long a node waits for its workers' dumps (faulthandler writes at once; a worker
#: that never answers is reported as such); the user's side waits for it too.
DUMP_WAIT_S = 3.0


def dump_paths(folder: str, rank: int, pid: int) -> tuple[Path, Path]:
    """In the node's records folder: (stop dump, on-demand dump) of one worker process."""
    base = Path(folder) / f"{rank}-{pid}"
    return base.with_suffix(".stop"), base.with_suffix(".stacks")
