"""Fuzzing torch_pickle.load and convert's readers with hostile checkpoints.

A seeded mutator (torch_hostile.Mutator) turns the real fixtures
(tests/data/*.pt) into damaged, malformed or malicious files (flipped bytes,
truncations, edited zip headers, duplicated, removed or compressed records,
rewritten data.pkl opcodes and ints, changed objects, bombs, payloads, random
opcode programs) for FUZZ_SECONDS, and one worker subprocess loads each with
``torch_pickle.load``, ``convert.load_torch_checkpoint`` or
``convert.load_training_run``, under a memory limit and a per-case time limit.
Every outcome must be a load or a one-line ``cips_jax.errors.Error``; no case
may crash or hang the worker, run a payload, or use more memory than the
reader's budget (4 x the file + 64 MiB) or more time than CASE_SECONDS_BOUND.

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

# The time the cases run, the worker's start (about 3 s) included.
FUZZ_SECONDS = 14
SEED = 20240611
# At least this many cases must run in that time.
MIN_CASES = 100
# The per-case limit in the worker (a case past it kills the worker), and the
# slowest a case may be (measured under tracemalloc, which makes the scan of a
# pickle about ten times slower).
CASE_SECONDS = 20
CASE_SECONDS_BOUND = 10.0


def test_hostile_checkpoints_give_a_load_or_a_one_line_error(tmp_path):
  began = time.monotonic()
  work = tmp_path / 'cases'
  work.mkdir()
  spec = {
    'fuzz': {
      'seed': SEED,
      'workdir': str(work),
      'end': time.time() + FUZZ_SECONDS,
    },
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
  slow = [
    (o['index'], o['name'], o['seconds'])
    for o in measured
    if o['seconds'] > CASE_SECONDS_BOUND
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
  assert len(outcomes) >= MIN_CASES, summary
  assert not bad, bad[:10]
  assert not over_memory, over_memory[:10]
  assert not slow, slow[:10]
  # The unchanged fixtures among the cases loaded.
  controls = [o for o in outcomes if o['name'].startswith('control')]
  assert all(o['outcome'] == 'ok' for o in controls), controls
