"""The workdir lock against the two attacks on its record file: deleting it
while a run holds the lock, and planting a symbolic link in its place.

flock(2) locks belong to an open file description, so two `acquire` calls in
one process contend exactly as two processes do (tests/test_run_safety.py
shows the same with real training runs).
"""

from __future__ import annotations

import json
import os

import pytest

from cips_jax import errors
from cips_jax import workdir_lock


def test_deleting_the_record_does_not_free_the_lock(tmp_path):
  held = workdir_lock.acquire(str(tmp_path))
  try:
    record = json.loads((tmp_path / 'lock').read_text())
    assert record['pid'] == os.getpid()
    (tmp_path / 'lock').unlink()
    with pytest.raises(errors.WorkdirLockedError, match='another process'):
      workdir_lock.acquire(str(tmp_path))
  finally:
    workdir_lock.release(held)
  # Released: the next run takes it.
  workdir_lock.release(workdir_lock.acquire(str(tmp_path)))


def test_a_planted_link_is_replaced_and_its_target_untouched(tmp_path):
  victim = tmp_path / 'victim.txt'
  victim.write_text('precious')
  workdir = tmp_path / 'run'
  workdir.mkdir()
  os.symlink(victim, workdir / 'lock')
  held = workdir_lock.acquire(str(workdir))
  try:
    assert victim.read_text() == 'precious'
    assert not (workdir / 'lock').is_symlink()
    assert json.loads((workdir / 'lock').read_text())['pid'] == os.getpid()
    # A refused run names the holder and writes nothing.
    with pytest.raises(
      errors.WorkdirLockedError, match=f'process {os.getpid()}'
    ):
      workdir_lock.acquire(str(workdir))
  finally:
    workdir_lock.release(held)
  assert victim.read_text() == 'precious'
  assert sorted(os.listdir(workdir)) == []  # our record removed, nothing left


def test_a_link_planted_while_held_is_neither_followed_nor_removed(tmp_path):
  victim = tmp_path / 'victim.txt'
  victim.write_text('precious')
  workdir = tmp_path / 'run'
  workdir.mkdir()
  held = workdir_lock.acquire(str(workdir))
  (workdir / 'lock').unlink()
  os.symlink(victim, workdir / 'lock')
  with pytest.raises(errors.WorkdirLockedError, match='another process'):
    workdir_lock.acquire(str(workdir))  # reads no record through the link
  workdir_lock.release(held)
  # The link is not our record: left as it is, and its target untouched.
  assert (workdir / 'lock').is_symlink()
  assert victim.read_text() == 'precious'


def test_a_refused_holder_leaves_no_lock_and_no_empty_workdir(tmp_path):
  # A run that created its workdir and was refused removes it, lock and all;
  # a workdir with anything else in it stays, less our record.
  fresh = tmp_path / 'fresh'
  fresh.mkdir()
  with pytest.raises(errors.ConfigError):
    with workdir_lock.hold(str(fresh), remove_if_empty=True):
      assert (fresh / 'lock').is_file()
      raise errors.ConfigError('refused')
  assert not fresh.exists()
  kept = tmp_path / 'kept'
  kept.mkdir()
  (kept / 'notes.txt').write_text('mine')
  with workdir_lock.hold(str(kept), remove_if_empty=True):
    pass
  assert sorted(os.listdir(kept)) == ['notes.txt']
  # Without remove_if_empty, an empty workdir stays (it was the user's).
  fresh.mkdir()
  with workdir_lock.hold(str(fresh)):
    pass
  assert os.listdir(fresh) == []


def test_a_record_that_cannot_be_written_leaves_no_file(tmp_path, monkeypatch):
  def full_disk(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(os, 'replace', full_disk)
  with pytest.raises(OSError, match='No space left'):
    workdir_lock.acquire(str(tmp_path))
  assert os.listdir(tmp_path) == []
  monkeypatch.undo()
  workdir_lock.release(workdir_lock.acquire(str(tmp_path)))  # not held
  assert os.listdir(tmp_path) == []
