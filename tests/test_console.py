"""What a newcomer's first commands print: their own progress and result only.

The commands run as a user runs them: without the suite's JAX_PLATFORMS=cpu,
so jax probes every backend it has, and on a data folder tfds has never seen.
(The sampling command's console: tests/test_command_input.py.)
"""

from __future__ import annotations

import os

import support


def _as_a_user_runs_it() -> dict[str, str]:
  env = dict(os.environ)
  env.pop('JAX_PLATFORMS', None)
  env.pop('CIPS_JAX_VERBOSE', None)
  return env


def test_the_oracle_names_the_libraries_lines():
  # Lines as tfds, orbax, jax and libtpu write them; then cips_jax's own.
  theirs = [
    'Downloading and preparing dataset Unknown size (download: Unknown size)',
    'Dataset procedural_landscapes downloaded and prepared to /d/1.0.0.',
    'I1207 12:19:25.229994 139863869143936 checkpoint_manager.py:709] '
    '[process=0] CheckpointManager init',
    'W1207 12:19:25.229994 139863869143936 image_feature.py:339] OpenCV is '
    'not installed.',
    'I1207 12:19:25.22 1398 xla_bridge.py:907] Unable to initialize backend '
    "'tpu'",
    'WARNING: Logging before InitGoogle() is written to STDERR',
  ]
  ours = [
    'I1207 12:23:15.362988 140243546286976 preparation.py:201] generating '
    'procedural_landscapes/s32 in /tmp/qt/data (first use; no download)',
    'I1207 12:21:06.696116 139863869143936 progress.py:163] step 200/3000',
    'rendering [####################] 100%  1.0k/1.0k pixels',
    '2048 train images in /tmp/d/procedural_landscapes/s32/1.0.0',
  ]
  assert support.foreign_console_lines('\n'.join(theirs + ours)) == theirs


def test_first_preparation_of_procedural_data_prints_its_result_only(tmp_path):
  process = support.run_python(
    '-m',
    'cips_jax.data',
    'procedural',
    f'--data_dir={tmp_path}',
    '--config=s32',
    env=_as_a_user_runs_it(),
    timeout=300,
  )
  assert process.returncode == 0, process.stderr[-3000:]
  output = process.stdout + process.stderr
  assert not support.foreign_console_lines(output), output[-3000:]
  (line,) = process.stdout.splitlines()
  assert '2048 train images' in line, line
