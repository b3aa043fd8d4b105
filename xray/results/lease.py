"""One writer per output folder: the lease object <out>/_lease.json.

    with OutputLease(out_uri, run_id) as lease:     # raises LeaseHeld while another holds it
        ...                                         # renewed every ttl / 4 s by a thread
        lease.check()                               # raises LeaseLost if it was taken over

Two drivers scanning into the same folder both plan from the same scored set and do all the
work twice; two `xray zoo build`s into the same round both train every pending model and write
the same model folders. The lease makes the second one refuse, naming the holder and when its
lease expires, before it plans anything.

Taking it is an exclusive create (open mode "xb"): O_EXCL on local disks, a conditional PUT
(If-None-Match: *) on S3 (s3fs), so of two drivers starting together exactly one wins. A
lease is stale, and is taken over (deleted, then created exclusively again), when it has not
been renewed for `ttl` seconds (its driver died or lost the storage), or when its holder ran on
this host and that process is gone (a driver killed with kill -9 and re-run at once). The
holder renews it by overwriting it after reading it back: if the token is no longer its own (it
stalled past the ttl and another driver took over), it stops with LeaseLost instead of writing
beside the new holder. Released (deleted) on exit, however the block ends.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from xray.io import storage

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
DEFAULT_TTL_S = 60.0
# Tokens of the leases this process holds now. A lease naming this process with another token
# was released by it, but left on a store that was down at release time (`xray.scan` called
# again after a storage error): stale at once, not only after the ttl.
_HELD_TOKENS: set[str] = set()


class LeaseHeld(RuntimeError):
    """Another live driver holds the output folder."""


class LeaseLost(RuntimeError):
    """This driver's lease was taken over (it stalled for longer than the ttl)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class OutputLease:
    """`command` and `conflict` word the refusal: who holds the folder, what two writers would
    do (the scan's by default)."""

    def __init__(self, out_uri: str, run_id: str, *, ttl: float = DEFAULT_TTL_S,
                 command: str = "xray scan",
                 conflict: str = "two drivers would scan every model twice") -> None:
        self.uri = storage.join(out_uri, LEASE_FILE)
        self.run_id, self.ttl = run_id, float(ttl)
        self.command, self.conflict = command, conflict
        self.token = uuid.uuid4().hex
        self.fs, self.path = storage.filesystem(self.uri)
        self._stop = threading.Event()
        self._lost: str | None = None
        self._thread: threading.Thread | None = None

    # -- the lease object
    def _body(self) -> bytes:
        return json.dumps({"token": self.token, "run_id": self.run_id,
                           "host": socket.gethostname(), "pid": os.getpid(),
                           "renewed_at": time.time(), "ttl_s": self.ttl}).encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(storage.with_retries(lambda: self.fs.cat_file(self.path)))
        except FileNotFoundError:
            return None
        except ValueError:  # half-written or foreign: treat as stale
            return {}

    def _create(self) -> bool:
        """Exclusive create; False when the object already exists."""
        parent = os.path.dirname(self.path) if storage.is_local(self.uri) else None
        if parent:
            os.makedirs(parent, exist_ok=True)
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(self._body())
            return True
        except FileExistsError:
            return False

    def _stale(self, held: dict[str, Any]) -> str | None:
        """Why `held` may be taken over, or None while its holder is alive."""
        age = time.time() - float(held.get("renewed_at", 0.0))
        if not held or age > float(held.get("ttl_s", self.ttl)):
            return f"not renewed for {age:.0f} s"
        if held.get("host") == socket.gethostname() and not _pid_alive(int(held.get("pid", 0))):
            return f"its driver (pid {held.get('pid')} on this host) is gone"
        if (held.get("host") == socket.gethostname() and int(held.get("pid", 0)) == os.getpid()
                and held.get("token") not in _HELD_TOKENS):
            return "this process released it (the store was down then)"
        return None

    # -- taking, renewing, releasing
    def acquire(self) -> None:
        for _ in range(3):  # a stale lease removed under us by another taker: try again
            if self._create():
                _HELD_TOKENS.add(self.token)
                self._start_renewing()
                return
            held = self._read()
            if held is None:
                continue
            reason = self._stale(held)
            if reason is None:
                age = time.time() - float(held["renewed_at"])
                raise LeaseHeld(
                    f"{self.uri}: another {self.command} is writing to this folder (run "
                    f"{held.get('run_id')}, {held.get('host')} pid {held.get('pid')}, renewed "
                    f"{age:.0f} s ago): {self.conflict}. Wait for it "
                    f"to finish; if it died, its lease expires in "
                    f"{max(0.0, float(held.get('ttl_s', self.ttl)) - age):.0f} s.")
            try:
                self.fs.rm_file(self.path)  # stale: its holder cannot write any more
            except FileNotFoundError:
                pass
        raise LeaseHeld(f"{self.uri}: could not take the lease (other drivers keep taking it)")

    def _start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="xray-lease",
                                        daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except LeaseLost as err:
                self._lost = str(err)
                return
            except Exception:  # a storage blip: the next renewal tries again
                continue

    def renew(self) -> None:
        held = self._read()
        if not held or held.get("token") != self.token:
            raise LeaseLost(f"{self.uri}: this driver's lease was taken over by run "
                            f"{(held or {}).get('run_id')}; stopping without writing more")
        storage.with_retries(lambda: self.fs.pipe_file(self.path, self._body()))

    def check(self) -> None:
        """Raise LeaseLost when the renewing thread found the lease taken over."""
        if self._lost:
            raise LeaseLost(self._lost)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours. A store that fails here
        does not mask the error the run may be ending with: the lease then expires by itself."""
        self._stop.set()
        _HELD_TOKENS.discard(self.token)
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        try:
            held = self._read()
            if held and held.get("token") == self.token:
                self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass
        except Exception as err:
            log.warning("%s: could not release the lease (%s); it expires after %.0f s",
                        self.uri, err, self.ttl)

    def __enter__(self) -> "OutputLease":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
