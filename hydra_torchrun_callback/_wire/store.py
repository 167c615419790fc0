"""Everything that crosses the network through a job's TCPStore: keys, signing, encoding.

torch's TCPStore has no authentication: anyone who can reach its port can read, write
and delete keys. So nothing this project reads back from a store is trusted unless it
carries an HMAC-SHA256 made with a secret the network never sees:

- **The secret.** Multi-node jobs use the user's key file (32 random bytes, created once,
  0600, O_EXCL, under ``~/.config/hydra-torchrun-callback/`` which cluster nodes share
  through the home file system; :data:`.protocol.SECRET_FILE_ENV` points elsewhere). A
  one-machine job uses a fresh random secret that never leaves the process.
- **The session.** Node 0 signs a ``hello`` (the job's run id and a fresh nonce) when it
  hosts the store; every other value is signed over (run id/nonce, key, value), so a value
  is valid for one key of one run of one job only (no replay from another job or key).
- **Values** are ``MAGIC + mac + payload``. One that fails verification is dropped (and
  logged once per key), never decoded: JSON only, except rank 0's result, which is
  unpickled by the caller only after verification.
- **Large values** (rank 0's result) travel in 4 MiB chunks, each signed under its own key:
  TCPStore drops a client that sends more than 8 MiB at once. Error texts are capped.
- **torch's rendezvous state** (a pickle torch keeps in the same store) goes through
  :class:`SignedRendezvousBackend`, registered as the ``hydra-c10d`` rendezvous backend.
- **An elastic job on a shared file system** keeps the same signed keys in a FileStore
  (:func:`open_shared_job_store`) in a 0700 directory of its own: no node hosts it, so no
  node's loss takes it away. The first node there writes the initial keys and the hello.

An attacker who reaches the port can still delete or overwrite keys (denial of service:
the job fails or waits for a timeout), never run code or change a job's outcome unnoticed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

from hydra_torchrun_callback._log import log
from hydra_torchrun_callback._wire.protocol import (
    CREATOR_KEY,
    HELLO_KEY,
    SECRET_FILE_ENV,
    chunk_key,
    hello_session,
)

__all__ = [
    "JobStore",
    "SecretError",
    "Signer",
    "host_job_store",
    "join_job_store",
    "load_secret",
    "open_shared_job_store",
    "private_dir",
    "released_spare",
]


_SECRET_BYTES = 32
MAGIC = b"HTR1"
_MAC_LEN = 32
#: TCPStore closes the connection of a client that sends a value over 8 MiB.
CHUNK = 4 * 1024 * 1024
#: How long a node tries a candidate port whose store never says hello.
HELLO_WAIT_S = 3.0


class SecretError(RuntimeError):
    """The user's key file is unusable (wrong owner or permissions, unreadable)."""


# -- the secret --------------------------------------------------------------------------
def secret_path(env: Mapping[str, str]) -> Path:
    if env.get(SECRET_FILE_ENV):
        return Path(env[SECRET_FILE_ENV]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "hydra-torchrun-callback" / "secret"


def _check_private(path: Path, st: os.stat_result) -> None:
    if st.st_uid != os.geteuid():
        raise SecretError(
            f"the job-store key file {path} belongs to uid {st.st_uid}, not to you "
            f"(uid {os.geteuid()}). Fix: remove it (a new one is created) or point "
            f"{SECRET_FILE_ENV} at your own key file."
        )
    if st.st_mode & 0o077:
        raise SecretError(
            f"the job-store key file {path} has mode {stat.S_IMODE(st.st_mode):04o}: other "
            f"users could read it and forge values in your jobs' stores. Fix: chmod 600 {path}"
        )


def load_secret(env: Mapping[str, str]) -> bytes:
    """The user's secret, created on first use (0600, never overwritten)."""
    path = secret_path(env)
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Written in full under a private name, then linked into place: a node that reads the
    # key file never sees it half written, and a racing node's key is never replaced.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(_SECRET_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # another node was first: use its key
            os.link(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        _check_private(path, os.fstat(fd))
        text = os.read(fd, 4096).decode(errors="replace").strip()
    finally:
        os.close(fd)
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) < 16:
        raise SecretError(
            f"the job-store key file {path} does not hold a key (64 hex digits). "
            "Fix: remove it; a new one is created at the next job."
        )
    return secret


# -- signing -----------------------------------------------------------------------------
class Signer:
    """HMAC-SHA256 over (session, key, value) with the secret."""

    def __init__(self, secret: bytes, session: str) -> None:
        self._secret = secret
        self.session = session

    def with_session(self, session: str) -> Signer:
        return Signer(self._secret, session)

    def _mac(self, key: str, payload: bytes) -> bytes:
        msg = b"\0".join([self.session.encode(), key.encode(), payload])
        return hmac.new(self._secret, msg, hashlib.sha256).digest()

    def seal(self, key: str, payload: bytes) -> bytes:
        return MAGIC + self._mac(key, payload) + payload

    def open(self, key: str, blob: bytes) -> Optional[bytes]:
        """The payload if ``blob`` was sealed for ``key`` in this session, else None."""
        head = len(MAGIC) + _MAC_LEN
        if len(blob) < head or not blob.startswith(MAGIC):
            return None
        payload = blob[head:]
        if not hmac.compare_digest(blob[len(MAGIC) : head], self._mac(key, payload)):
            return None
        return payload


_rejected: set[str] = set()
_rejected_lock = threading.Lock()


def reset_rejections() -> None:
    """A new job: log its first forged value per key again."""
    with _rejected_lock:
        _rejected.clear()


def rejected_keys() -> list[str]:
    """The keys whose forged values this process dropped (for error messages)."""
    with _rejected_lock:
        return sorted(_rejected)


def reject(key: str) -> None:
    """Log (once per key) that a value failed verification; it is dropped."""
    with _rejected_lock:
        if key in _rejected:
            return
        _rejected.add(key)
    log.warning(
        "rejected a forged value for key %r from the store: it does not carry this job's "
        "signature (another process on the network wrote it); it was dropped unread",
        key,
    )


# -- the job's key space -------------------------------------------------------------------
class JobStore:
    """One job's signed key space in a TCPStore (node 0 hosts it) or a shared FileStore."""

    def __init__(self, store: Any, prefix: str, signer: Signer) -> None:
        self.store = store
        self.prefix = prefix
        self.signer = signer
        self.calls = 0  # store round trips (the coordination simulation reports them)

    def key(self, name: str) -> str:
        return self.prefix + name

    # raw access, counted
    def _call(self, op: str, *args: Any) -> Any:
        self.calls += 1
        return getattr(self.store, op)(*args)

    def set(self, name: str, payload: bytes) -> None:
        key = self.key(name)
        self._call("set", key, self.signer.seal(key, payload))

    def get(self, name: str) -> Optional[bytes]:
        """The verified payload, or None when absent or forged (never blocks)."""
        key = self.key(name)
        if not self._call("check", [key]):
            return None
        return self._open(key, bytes(self._call("get", key)))

    def get_present(self, name: str) -> Optional[bytes]:
        """Like :meth:`get` for a key known to exist (one round trip)."""
        key = self.key(name)
        return self._open(key, bytes(self._call("get", key)))

    def multi_get(self, names: Sequence[str]) -> list[Optional[bytes]]:
        """Keys known to exist, in one round trip."""
        keys = [self.key(n) for n in names]
        blobs = self._call("multi_get", keys)
        return [self._open(k, bytes(v)) for k, v in zip(keys, blobs, strict=True)]

    def _open(self, key: str, blob: bytes) -> Optional[bytes]:
        payload = self.signer.open(key, blob)
        if payload is None:
            reject(key)
        return payload

    def delete(self, name: str) -> None:
        """Remove ``name`` (absent already: nothing happens)."""
        self._call("delete_key", self.key(name))

    def claim(self, name: str, payload: bytes) -> bool:
        """Set ``name`` to ``payload`` if it is unset; True if ours is there now."""
        key = self.key(name)
        sealed = self.signer.seal(key, payload)
        return bytes(self._call("compare_set", key, "", sealed)) == sealed

    def replace_if(self, name: str, expected: bytes, payload: bytes) -> bool:
        """Set ``name`` to ``payload`` if it holds ``expected`` now (both signed)."""
        key = self.key(name)
        old, new = self.signer.seal(key, expected), self.signer.seal(key, payload)
        return bytes(self._call("compare_set", key, old, new)) == new

    def set_json(self, name: str, data: Any) -> None:
        self.set(name, json.dumps(data).encode())

    def get_json(self, name: str) -> Any:
        payload = self.get(name)
        return None if payload is None else json.loads(payload)

    def counter(self, name: str, step: int = 0) -> int:
        """An unsigned counter (only ever a hint to read signed keys it numbers)."""
        return int(self._call("add", self.key(name), step))

    # large values
    def put_large(self, name: str, data: bytes) -> None:
        """``data`` of any size, in signed chunks; the manifest is written last."""
        count = max(1, -(-len(data) // CHUNK))
        for i in range(count):
            self.set(chunk_key(name, i), data[i * CHUNK : (i + 1) * CHUNK])
        digest = hashlib.sha256(data).hexdigest()
        self.set_json(name, {"chunks": count, "size": len(data), "sha256": digest})

    def get_large(self, name: str) -> Optional[bytes]:
        manifest = self.get_json(name)
        if not isinstance(manifest, dict):
            return None
        parts = []
        for i in range(int(manifest["chunks"])):
            part = self.get(chunk_key(name, i))
            if part is None:
                return None
            parts.append(part)
        data = b"".join(parts)
        if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
            reject(self.key(name))
            return None
        return data


# -- opening the store ---------------------------------------------------------------------
def _tcp_store(host: str, port: int, server: bool, timeout: float) -> Any:
    import torch.distributed as dist

    return dist.TCPStore(  # type: ignore[attr-defined]
        host_name=host,
        port=port,
        world_size=None,
        is_master=server,
        timeout=timedelta(seconds=timeout),
        wait_for_workers=False,
        multi_tenant=False,
    )


def _connect(host: str, port: int, timeout: float) -> Any:
    """A client, within ``timeout``: a handshake with something that is not a TCPStore
    can block for ever, so it runs in a helper thread abandoned past the deadline."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["store"] = _tcp_store(host, port, False, timeout)
        except Exception as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name="torchrun-store-connect", daemon=True)
    thread.start()
    thread.join(timeout + 1)
    if "store" in box:
        return box["store"]
    raise box.get("error") or TimeoutError(f"no store answered at {host}:{port}")


def _in_use(exc: BaseException) -> bool:
    text = f"{exc!r} {exc.__cause__!r}".lower()
    return "eaddrinuse" in text or "address already in use" in text


class ForeignStoreError(RuntimeError):
    """No candidate port held this job's store within the wait."""


def hello_signer(secret: bytes, run_id: str) -> Signer:
    return Signer(secret, hello_session(run_id))


def _create_job_store(
    store: Any, secret: bytes, run_id: str, prefix: str, initial: Optional[Mapping[str, bytes]]
) -> JobStore:
    """The node that creates the job's key space: a fresh session nonce, the ``initial``
    keys, then the hello (a node that saw hello finds them all)."""
    nonce = secrets.token_hex(16)
    job_store = JobStore(store, prefix, Signer(secret, f"{run_id}/{nonce}"))
    for name, value in (initial or {}).items():
        job_store.set(name, value)
    key = prefix + HELLO_KEY
    payload = json.dumps({"run_id": run_id, "nonce": nonce}).encode()
    store.set(key, hello_signer(secret, run_id).seal(key, payload))
    return job_store


def host_job_store(
    host: str,
    ports: Sequence[int],
    secret: bytes,
    run_id: str,
    prefix: str,
    timeout: float,
    initial: Optional[Mapping[str, bytes]] = None,
) -> tuple[JobStore, int]:
    """Node 0: host the store on the first candidate port that is free; write the
    ``initial`` keys, then say hello (a node that saw hello finds them all)."""
    last: Optional[BaseException] = None
    for port in ports:
        try:
            store = _tcp_store(host, port, True, timeout)
        except Exception as exc:
            if not _in_use(exc):
                raise
            last = exc
            log.warning("rendezvous port %d is taken by another process; trying the next", port)
            continue
        return _create_job_store(store, secret, run_id, prefix, initial), port
    raise OSError(
        errno.EADDRINUSE, f"every candidate port {list(ports)} is taken ({last})"
    ) from last


def join_job_store(
    host: str,
    ports: Sequence[int],
    secret: bytes,
    run_id: str,
    prefix: str,
    timeout: float,
    op_timeout: float = 30.0,
) -> tuple[JobStore, int]:
    """Other nodes: find the candidate port whose store proves it is this job's.

    A store that answers with no hello within :data:`HELLO_WAIT_S`, or a hello not signed
    for this run id, belongs to someone else (ports derived from job ids collide): the
    next candidate is tried. Node 0 may start late, so the list is tried again until
    ``timeout``."""
    hello = hello_signer(secret, run_id)
    key = prefix + HELLO_KEY
    deadline = time.monotonic() + timeout
    foreign: set[int] = set()
    while True:
        for port in ports:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:  # a refused connection costs nothing; TCPStore would retry it until timeout
                socket.create_connection((host, port), timeout=1.0).close()
            except OSError:
                continue  # nothing listens there (yet)
            try:
                store = _connect(host, port, min(op_timeout, max(remaining, 1.0), 5.0))
            except Exception:  # something listens that is no TCPStore (or too slow)
                if port not in foreign:
                    foreign.add(port)
                    log.warning("%s:%d does not answer as a job store; trying the next", host, port)
                continue
            waited_until = time.monotonic() + HELLO_WAIT_S
            blob = None
            with contextlib.suppress(Exception):
                while time.monotonic() < waited_until:
                    if store.check([key]):
                        blob = bytes(store.get(key))
                        break
                    time.sleep(0.1)
            payload = hello.open(key, blob) if blob is not None else None
            if payload is not None:
                data = json.loads(payload)
                if data.get("run_id") == run_id:
                    signer = Signer(secret, f"{run_id}/{data['nonce']}")
                    return JobStore(store, prefix, signer), port
            if port not in foreign:
                foreign.add(port)
                log.warning(
                    "the store at %s:%d is not this job's (%s); trying the next candidate port",
                    host,
                    port,
                    "no hello" if blob is None else "hello not signed for this job",
                )
        if time.monotonic() >= deadline or foreign == set(ports):
            raise ForeignStoreError(
                f"no store at {host} on port(s) {list(ports)} proved it belongs to job {run_id}"
                + (
                    f"; port(s) {sorted(foreign)} are held by another job or program"
                    if foreign
                    else "; nothing listened there"
                )
            )
        time.sleep(0.5)


def private_dir(path: str) -> None:
    """Create ``path`` (and its parents) for this user alone, or check that it is: a
    directory owned by us that nobody else can enter (0700, as ~/.ssh)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise OSError(
            errno.EPERM,
            f"{path} must be a directory of yours that only you can enter (mode 0700); "
            f"it is mode {stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid}. Fix: remove it",
        )


def open_shared_job_store(
    directory: str,
    secret: bytes,
    run_id: str,
    prefix: str,
    timeout: float,
    initial: Optional[Mapping[str, bytes]] = None,
) -> tuple[JobStore, bool]:
    """Any node of an elastic job: the job's store as a FileStore in ``directory`` (shared
    by the nodes). The first node to get there (an atomic ``add``) writes the ``initial``
    keys, then says hello; the others wait up to ``timeout`` for a hello signed for this
    run id. Returns the store and whether this node created it."""
    import torch.distributed as dist

    private_dir(directory)
    store: Any = dist.FileStore(os.path.join(directory, "job"), -1)  # type: ignore[attr-defined]
    store.set_timeout(timedelta(seconds=30))
    key = prefix + HELLO_KEY
    hello = hello_signer(secret, run_id)
    if store.add(prefix + CREATOR_KEY, 1) == 1:
        return _create_job_store(store, secret, run_id, prefix, initial), True
    deadline = time.monotonic() + timeout
    while True:
        if store.check([key]):
            opened = hello.open(key, bytes(store.get(key)))
            data = json.loads(opened) if opened is not None else {}
            if data.get("run_id") != run_id:
                raise ForeignStoreError(
                    f"the job store in {directory} has no hello signed for job {run_id} "
                    "(another user's key, or a forgery)"
                )
            return JobStore(store, prefix, Signer(secret, f"{run_id}/{data['nonce']}")), False
        if time.monotonic() >= deadline:
            raise ForeignStoreError(
                f"the job store in {directory} got no hello within {timeout:.0f}s"
            )
        time.sleep(0.1)


# -- torch's rendezvous state, signed -------------------------------------------------------
BACKEND_NAME = "hydra-c10d"
_signers: dict[str, Signer] = {}
_signers_lock = threading.Lock()


@contextlib.contextmanager
def rendezvous_signer(run_id: str, signer: Signer) -> Iterator[None]:
    """Make the ``hydra-c10d`` backend sign run ``run_id``'s state with ``signer``."""
    register_backend()
    with _signers_lock:
        _signers[run_id] = signer
    try:
        yield
    finally:
        with _signers_lock:
            _signers.pop(run_id, None)


def register_backend() -> None:
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry as registry

    with contextlib.suppress(ValueError):  # already registered by this module
        registry.register(BACKEND_NAME, _create_handler)


def _create_handler(params: Any) -> Any:
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    with _signers_lock:
        signer = _signers.get(params.run_id)
    if signer is None:
        raise RuntimeError(f"no signer for rendezvous {params.run_id!r} (internal error)")
    backend, store = create_backend(params)
    handler = create_handler(store, SignedRendezvousBackend(backend, signer), params)  # type: ignore[arg-type]  # duck-typed
    return SpareAwareHandler(handler, params.run_id)


#: Rendezvous ids whose node was a spare when the rendezvous closed (see SpareAwareHandler).
_released: set[str] = set()


def released_spare(run_id: str) -> bool:
    """Whether this process's node waited as a spare until rendezvous ``run_id`` closed
    (the job ended without needing it); cleared by asking."""
    with _signers_lock:
        found = run_id in _released
        _released.discard(run_id)
    return found


class SpareAwareHandler:
    """torch's rendezvous handler, noting when a spare is released.

    A node beyond MAX waits on torch's redundancy list; when the job ends the rendezvous
    closes and torch's agent returns None from ``run()``, which ``launch_agent`` then
    fails on (``'NoneType' object has no attribute 'is_failed'``). The launch asks
    :func:`released_spare` to tell that from a real failure. Everything else is torch's."""

    def __init__(self, inner: Any, run_id: str) -> None:
        self._inner = inner
        self._run_id = run_id
        self._joined = False

    def next_rendezvous(self) -> Any:
        from torch.distributed.elastic.rendezvous import (
            RendezvousClosedError,
            RendezvousGracefulExitError,
        )

        try:
            info = self._inner.next_rendezvous()
        except (RendezvousGracefulExitError, RendezvousClosedError) as exc:
            # A spare (or a late node still waiting) when the job ended; a node that was
            # in a group and finds the rendezvous closed failed with the job.
            if isinstance(exc, RendezvousGracefulExitError) or not self._joined:
                with _signers_lock:
                    _released.add(self._run_id)
            raise
        self._joined = True
        return info

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class SignedRendezvousBackend:
    """torch's c10d rendezvous backend with its state blob signed and verified.

    torch unpickles the state it gets from the backend; this one hands it only blobs that
    carry the job's signature. In place of a forged blob it hands back the last state it
    verified, and the next update overwrites the forgery (its token is the forged value),
    so the rendezvous keeps its members. An attacker who keeps overwriting the key can
    delay or break the rendezvous (denial of service), never run code.

    It implements torch's ``RendezvousBackend`` interface (``name``, ``get_state``,
    ``set_state``) without subclassing it, so importing this module needs no torch."""

    def __init__(self, inner: Any, signer: Signer) -> None:
        self.inner = inner
        self.signer = signer
        self.key = str(getattr(inner, "_key", "torch.rendezvous"))
        self._last: Optional[tuple[bytes, Any]] = None  # the last verified (state, token)

    @property
    def name(self) -> str:
        return BACKEND_NAME

    def _verified(self, blob: bytes, token: Any) -> Optional[bytes]:
        payload = self.signer.open(self.key, bytes(blob))
        if payload is None:
            reject(self.key)
            return None
        self._last = (payload, token)
        return payload

    def get_state(self) -> Any:
        try:
            got = self.inner.get_state()
        except Exception:  # not even base64: written by someone else
            reject(self.key)
            return self._last
        if got is None:
            # The empty sentinel after a verified state: torch never writes it back.
            if self._last is not None:
                reject(self.key)
            return self._last
        payload = self._verified(got[0], got[1])
        if payload is None:
            return self._last
        return payload, got[1]

    def set_state(self, state: bytes, token: Any = None) -> Any:
        sealed = self.signer.seal(self.key, state)
        try:
            got = self.inner.set_state(sealed, token)
        except Exception:  # the stored value is not base64: someone else's
            reject(self.key)
            got = self._overwrite_raw(sealed, token)
        if got is None:
            return None
        if self.signer.open(self.key, bytes(got[0])) is None:
            reject(self.key)
            last_token = self._last[1] if self._last is not None else None
            if token != last_token:
                # The caller's state is older than the last verified one: overwriting the
                # forgery with it would lose another node's update. Let it sync first.
                return None if self._last is None else (*self._last, False)
            # A forgery sits on the last verified state: overwrite it (its token is the
            # forged value itself).
            got = self.inner.set_state(sealed, got[1])
            if got is None:
                return None
        payload = self._verified(got[0], got[1])
        if payload is None:  # forged again meanwhile: the caller retries with our last
            return None if self._last is None else (*self._last, False)
        return payload, got[1], got[2]

    def _overwrite_raw(self, sealed: bytes, token: Any) -> Any:
        """Replace an undecodable value, if the caller's state is the last verified one."""
        last_token = self._last[1] if self._last is not None else None
        store = getattr(self.inner, "_store", None)
        if store is None or token != last_token:
            return None if self._last is None else (*self._last, False)
        import base64

        raw = store.get(self.key)
        store.compare_set(self.key, raw, base64.b64encode(sealed).decode())
        got = self.inner.get_state()
        return None if got is None else (*got, got[0] == sealed)
