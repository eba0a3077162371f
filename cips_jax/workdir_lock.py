"""One training run per workdir: an exclusive lock held for the run's life.

    with workdir_lock.hold(workdir):
      ...  # train

Two runs on one workdir would each save and prune checkpoints from their own
lists, so the second silently replaces the first's. The lock is `flock(2)` on
the workdir itself (its directory), which nothing can delete from under a
running run, and `WORKDIR/lock` records who holds it (host, pid, start time,
command) as JSON, for the messages only:
- a second run refuses at once with `errors.WorkdirLockedError` naming the
  holder (or "another process" when the record is missing or unreadable);
- the kernel drops a flock when its process dies, however it dies, so a lock
  left by a killed run is free: the next run takes it over and says whose it
  was (the record it left);
- deleting `WORKDIR/lock` does not free the lock (the record is not the lock);
- the record is never opened through a symbolic link, never truncated and
  never written in place: a new record is written to a file this process
  creates and renamed over `lock` (which replaces a planted link, not what it
  points to), and the holder removes it when the run ends;
- a multi-host run takes it in process 0, and every process learns the outcome
  (a refused run stops on all hosts, not only on the first).
It does not protect against another user who can write into the workdir
(they can delete the checkpoints themselves), nor across hosts on file systems
that do not share flocks (some NFS mounts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import socket
import stat
import sys
from typing import Iterator, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from cips_jax import errors

LOCK_FILE = 'lock'


@dataclasses.dataclass(frozen=True)
class _Holder:
  """Who holds (or held) a workdir's lock."""

  host: str
  pid: int
  started: str  # ISO 8601, local time with its offset
  command: str

  @classmethod
  def this_process(cls) -> _Holder:
    """The holder this process writes."""
    return cls(
      host=socket.gethostname(),
      pid=os.getpid(),
      started=datetime.datetime.now()
      .astimezone()
      .isoformat(timespec='seconds'),
      command=' '.join(sys.argv)[:500],
    )

  def describe(self) -> str:
    """'process 123 on host, started 2026-12-06T10:00:00+00:00'."""
    return f'process {self.pid} on {self.host}, started {self.started}'


# A record is a few hundred bytes; more than that is not ours.
_MAX_RECORD_BYTES = 4096


def _read_holder(dir_fd: int) -> Optional[_Holder]:
  """The holder `lock` records; None if absent, a link, or unreadable."""
  try:
    fd = os.open(
      LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd
    )
  except OSError:  # none, or a symbolic link (ELOOP), or unreadable
    return None
  try:
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device: not ours
      return None
    text = os.read(fd, _MAX_RECORD_BYTES).decode('utf-8', 'replace')
  except OSError:
    return None
  finally:
    os.close(fd)
  try:
    record = json.loads(text)
    return _Holder(
      host=str(record['host']),
      pid=int(record['pid']),
      started=str(record['started']),
      command=str(record.get('command', '')),
    )
  except (ValueError, KeyError, TypeError):
    return None


def _write_holder(dir_fd: int, holder: _Holder) -> int:
  """Writes the record to a new file renamed over `lock`.

  Returns a descriptor of the record, held open until the run ends: while it
  is open its inode cannot be reused, so `release` can tell our record from
  anything put in its place.
  """
  temporary = f'.lock.{os.getpid()}.tmp'
  with contextlib.suppress(FileNotFoundError):  # a leftover of a killed run
    os.unlink(temporary, dir_fd=dir_fd)
  fd = os.open(
    temporary,
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
    0o644,
    dir_fd=dir_fd,
  )
  try:
    os.write(fd, json.dumps(dataclasses.asdict(holder)).encode())
    os.fsync(fd)
    os.replace(temporary, LOCK_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
  except OSError:
    os.close(fd)
    with contextlib.suppress(OSError):  # a full disk: leave no empty file
      os.unlink(temporary, dir_fd=dir_fd)
    raise
  return fd


@dataclasses.dataclass(frozen=True)
class _Held:
  """A held workdir lock: the directory's descriptor and our record's."""

  dir_fd: int
  record_fd: int
  workdir: str


def acquire(workdir: str) -> _Held:
  """Takes WORKDIR's lock for this process.

  Raises:
    errors.WorkdirLockedError: another live process holds it (named).
  """
  dir_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
  try:
    fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _read_holder(dir_fd)
    os.close(dir_fd)
    who = holder.describe() if holder else 'another process'
    command = f' ({errors.bounded_repr(holder.command)})' if holder else ''
    raise errors.WorkdirLockedError(
      f'{workdir} is in use by another training run: {who}{command}. Wait '
      'for it to end or stop it, or train in another --workdir; two runs on '
      "one workdir would overwrite each other's checkpoints"
    ) from None
  previous = _read_holder(dir_fd)
  if previous is not None:
    # The flock was free, so its recorded holder died without releasing it.
    logging.warning(
      'taking over the lock of %s in %s: that run ended without releasing it '
      '(killed or crashed); its checkpoints are kept',
      previous.describe(),
      workdir,
    )
  try:
    record_fd = _write_holder(dir_fd, _Holder.this_process())
  except OSError:
    os.close(dir_fd)
    raise
  return _Held(dir_fd=dir_fd, record_fd=record_fd, workdir=workdir)


def release(held: _Held, remove_if_empty: bool = False) -> None:
  """Removes our record (if it is still ours) and lets go of the lock.

  `remove_if_empty`: then removes the workdir too if nothing else is in it
  (a run that created it and was refused), while the lock is still held.
  """
  try:
    current = os.stat(LOCK_FILE, dir_fd=held.dir_fd, follow_symlinks=False)
    ours = os.fstat(held.record_fd)
    if (current.st_dev, current.st_ino) == (ours.st_dev, ours.st_ino):
      os.unlink(LOCK_FILE, dir_fd=held.dir_fd)
  except OSError:  # removed or replaced meanwhile: not ours to touch
    pass
  if remove_if_empty:
    with contextlib.suppress(OSError):  # not empty, or gone: left as it is
      os.rmdir(held.workdir)
  os.close(held.record_fd)
  fcntl.flock(held.dir_fd, fcntl.LOCK_UN)
  os.close(held.dir_fd)


@contextlib.contextmanager
def hold(workdir: str, remove_if_empty: bool = False) -> Iterator[None]:
  """Holds WORKDIR's lock for the body (in process 0 of a multi-host run).

  Raises errors.WorkdirLockedError in every process when the lock is taken.
  `remove_if_empty`: remove the workdir at the end if nothing is left in it
  (for a run that created it: refused, it leaves nothing behind).
  """
  held, refusal = None, None
  if jax.process_index() == 0:
    try:
      held = acquire(workdir)
    except errors.WorkdirLockedError as error:
      refusal = error
  if jax.process_count() > 1:
    # Every process must stop if process 0 was refused, or the others would
    # wait for it in the first collective.
    refused = multihost_utils.broadcast_one_to_all(
      np.int32(refusal is not None)
    )
    if refusal is None and int(refused):
      raise errors.WorkdirLockedError(
        f'{workdir} is in use by another training run (process 0 was refused '
        'its lock)'
      )
  if refusal is not None:
    raise refusal
  try:
    yield
  finally:
    if held is not None:
      release(held, remove_if_empty)
