"""Fuzzing torch_pickle.load and convert's readers with hostile checkpoints.

A seeded mutator (torch_hostile.Mutator) turns the real fixtures
(tests/data/*.pt) into damaged, malformed or malicious files (flipped bytes,
truncations, edited zip headers, duplicated, removed or compressed records,
rewritten data.pkl opcodes and ints, changed objects, bombs, payloads, random
opcode programs): a fixed, seeded list of CASES cases, the same on every
machine.  One worker subprocess loads each with
``torch_pickle.load``, ``convert.load_torch_checkpoint`` or
``convert.load_training_run``, under a memory limit and a per-case time limit.
Every outcome must be a load or a one-line ``cips_jax.errors.Error``; no case
may crash or hang the worker, run a payload, or use more memory than the
reader's budget (4 x the file + 64 MiB).  Time is only a hang limit: a case
still running after CASE_SECONDS kills the worker, which counts as a crash.

Run with ``-s`` to see the numbers: cases tried, the worst memory and time of
one load, and the outcomes by type; they are also written to fuzz.json in the
test's temporary folder.  A failure names the case: rebuild its file with
``torch_hostile.Mutator(SEED, folder, fixture).case(index)``.
"""

from __future__ import annotations

import collections
import json
import time

import torch_hostile

# Cases 0 .. CASES - 1 of the seeded mutator: every kind of damage appears
# among them (asserted), and all of them run in about 15 s on the slower 2-core
# CPU.
CASES = 120
SEED = 20240611
# The per-case hang limit in the worker (a case past it kills the worker).  The
# slowest case takes under 2 s here, under tracemalloc (which makes the scan of
# a pickle about ten times slower); a hang is far beyond either.
CASE_SECONDS = 60


def test_hostile_checkpoints_give_a_load_or_a_one_line_error(tmp_path):
  began = time.monotonic()
  work = tmp_path / 'cases'
  work.mkdir()
  spec = {
    'fuzz': {'seed': SEED, 'workdir': str(work), 'count': CASES},
    'case_seconds': CASE_SECONDS,
  }
  outcomes = torch_hostile.run_cases(spec, tmp_path, timeout=10 * 60)

  bad = [
    (o['index'], o['name'], why, o['type'], o['message'][:300])
    for o in outcomes
    if (why := torch_hostile.acceptable(o))
  ]
  measured = [o for o in outcomes if o['peak'] is not None]
  over_memory = [
    (o['index'], o['name'], o['peak'], o['file_size'])
    for o in measured
    if o['peak'] > torch_hostile.memory_bound(o['file_size'])
  ]
  worst_memory = max(measured, key=lambda o: o['peak'])
  worst_time = max(measured, key=lambda o: o['seconds'])
  summary = {
    'cases': len(outcomes),
    'loaded': sum(o['outcome'] == 'ok' for o in outcomes),
    'by_type': collections.Counter(o['type'] for o in outcomes),
    'by_call': collections.Counter(o['call'] for o in outcomes),
    'worst_peak_bytes': worst_memory['peak'],
    'worst_peak_case': worst_memory['name'],
    'worst_peak_file_size': worst_memory['file_size'],
    'worst_seconds': worst_time['seconds'],
    'worst_seconds_case': worst_time['name'],
    'total_seconds': time.monotonic() - began,
  }
  (tmp_path / 'fuzz.json').write_text(json.dumps(summary, indent=2))
  print('\nfuzz:', json.dumps(summary, indent=2))

  assert not (work / 'PAYLOAD_RAN').exists(), 'a payload ran'
  assert [o['index'] for o in outcomes] == list(range(CASES)), summary
  kinds = {o['name'].split()[0] for o in outcomes}
  assert kinds == set(torch_hostile.CASE_KINDS), kinds
  assert not bad, bad[:10]
  assert not over_memory, over_memory[:10]
  # The unchanged fixtures among the cases loaded.
  controls = [o for o in outcomes if o['name'].startswith('control')]
  assert all(o['outcome'] == 'ok' for o in controls), controls
