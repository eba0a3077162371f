"""One training run per workdir: an exclusive lock held for the run's life.

    with workdir_lock.hold(workdir):
      ...  # train

Two runs on one workdir would each save and prune checkpoints from their own
lists, so the second silently replaces the first's. The lock is `flock(2)` on
`WORKDIR/lock`, which also holds who took it (host, pid, start time, command)
as JSON:
- a second run refuses at once with `errors.WorkdirLockedError` naming the
  holder;
- the kernel drops a flock when its process dies, however it dies, so a lock
  left by a killed run is free: the next run takes it over and says whose it
  was;
- a multi-host run takes it in process 0, and every process learns the outcome
  (a refused run stops on all hosts, not only on the first).
The file stays after a run ends (emptied): removing it could race a second
process that opened it meanwhile. File systems that do not share flocks
between hosts (some NFS mounts) only protect against runs on the same host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import socket
import sys
from typing import Iterator, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from cips_jax import errors

LOCK_FILE = 'lock'


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds (or held) a workdir's lock."""

  host: str
  pid: int
  started: str  # ISO 8601, local time with its offset
  command: str

  @classmethod
  def this_process(cls) -> Holder:
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


def _read_holder(fd: int) -> Optional[Holder]:
  """The holder the open lock file records; None if empty or unreadable."""
  os.lseek(fd, 0, os.SEEK_SET)
  # A record is a few hundred bytes; more than that is not ours.
  text = os.read(fd, 4096).decode('utf-8', 'replace')
  try:
    record = json.loads(text)
    return Holder(
      host=str(record['host']),
      pid=int(record['pid']),
      started=str(record['started']),
      command=str(record.get('command', '')),
    )
  except (ValueError, KeyError, TypeError):
    return None


def _write_holder(fd: int, holder: Holder) -> None:
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, json.dumps(dataclasses.asdict(holder)).encode())
  os.fsync(fd)


def acquire(workdir: str) -> int:
  """Takes WORKDIR's lock for this process; returns the open file descriptor.

  Raises:
    errors.WorkdirLockedError: another live process holds it (named).
  """
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _read_holder(fd)
    os.close(fd)
    who = holder.describe() if holder else 'another process'
    command = f' ({errors.bounded_repr(holder.command)})' if holder else ''
    raise errors.WorkdirLockedError(
      f'{workdir} is in use by another training run: {who}{command}. Wait '
      'for it to end or stop it, or train in another --workdir; two runs on '
      "one workdir would overwrite each other's checkpoints"
    ) from None
  previous = _read_holder(fd)
  if previous is not None:
    # The flock was free, so its recorded holder died without releasing it.
    logging.warning(
      'taking over the lock of %s in %s: that run ended without releasing it '
      '(killed or crashed); its checkpoints are kept',
      previous.describe(),
      workdir,
    )
  _write_holder(fd, Holder.this_process())
  return fd


def release(fd: int) -> None:
  """Empties the lock file (the run ended cleanly) and lets go of it."""
  os.ftruncate(fd, 0)
  fcntl.flock(fd, fcntl.LOCK_UN)
  os.close(fd)


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds WORKDIR's lock for the body (in process 0 of a multi-host run).

  Raises errors.WorkdirLockedError in every process when the lock is taken.
  """
  fd, refusal = None, None
  if jax.process_index() == 0:
    try:
      fd = acquire(workdir)
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
    if fd is not None:
      release(fd)
