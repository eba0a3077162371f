r"""The emoji recipe chosen by measurement: variants at equal wall-clock time.

Each variant is `experiments/emoji.py` with a few config overrides. Every
variant trains through `python -m cips_jax.main` for the same wall-clock
budget, counted from its process's start (so compiling counts), pinned to one
CPU core; `--parallel` variants run at once, one per core. At the budget the
run gets SIGTERM, which ends it with a checkpoint. Then each run's EMA
generator is scored by the evaluate command, the same command the model card
uses:

    python -m cips_jax.evaluate --workdir=RUN --data_dir=DATA \
        --num_samples=1000 --num_real=3786

A 64x64 variant is scored against the 64x64 emoji (its own frame; by default
1,000 of them, a second set of real statistics): its FID is not on the 32x32
variants' scale.

    python benchmarks/emoji_ablation.py --data_dir=DATA --root=/tmp/ablation \
        --budget_minutes=22 --out=benchmarks/results/emoji_ablation.json \
        --table=docs/emoji_ablation.md

DATA holds image_folder/noto_emoji (and noto_emoji64 for the 64x64 variant),
prepared as the model card says. The script resumes: a variant whose run or
scores are already in --out is not run again.
"""

from __future__ import annotations

from concurrent import futures
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags
import common

from cips_jax import loading

# The data-efficient options as the ablation turns them on: DiffAugment's
# three policies and StyleGAN2-ADA's EMA ramp-up of 0.05.
_DIFFAUG = {
  'train.augment': 'color,translation,cutout',
  'train.ema_rampup': 0.05,
}

# Width 64 in G and D alike.
_WIDTH_64 = {
  'model.hidden_size': 64,
  'model.max_channels': 64,
  'model.d_max_channels': 64,
}

# name -> (what it changes, config overrides on experiments/emoji.py)
VARIANTS = {
  'card': ("the first model's recipe (emoji.py)", {}),
  'diffaug': (
    '+ DiffAugment colour, translation, cutout; EMA ramp-up',
    _DIFFAUG,
  ),
  'diffaug_tc': (
    'DiffAugment translation and cutout only (no colour)',
    {**_DIFFAUG, 'train.augment': 'translation,cutout'},
  ),
  'diffaug_w64': ('diffaug at width 64 (G and D)', {**_DIFFAUG, **_WIDTH_64}),
  'w64': ('the card recipe at width 64 (G and D), no DiffAugment', _WIDTH_64),
  'diffaug_w64_gamma001': (
    'diffaug at width 64 with R1 gamma 0.01',
    {**_DIFFAUG, **_WIDTH_64, 'train.r1_gamma': 0.01},
  ),
  'diffaug_gamma001': (
    'diffaug with R1 gamma 0.01 (StyleGAN2-ADA rule: 0.0002 * 32^2 / 16)',
    {**_DIFFAUG, 'train.r1_gamma': 0.01},
  ),
  'diffaug_b32': (
    'diffaug at batch 32, learning rates x sqrt(2)',
    {
      **_DIFFAUG,
      'train.global_batch_size': 32,
      'train.g_lr': 0.0016 * 2**0.5,
      'train.d_lr': 0.0018823529411764706 * 2**0.5,
    },
  ),
  'patches64': (
    'diffaug on the 64x64 originals: 32x32 multi-scale patches',
    {
      **_DIFFAUG,
      'model.size': 64,
      'data.name': 'image_folder/noto_emoji64',
      'data.resolution': 64,
      'data.crop': 32,
    },
  ),
}

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Prepared data sets.')
_ROOT = flags.DEFINE_string('root', '/tmp/emoji_ablation', 'Run folders.')
_VARIANTS = flags.DEFINE_list(
  'variants',
  [
    'card',
    'diffaug',
    'diffaug_w64',
    'diffaug_gamma001',
    'diffaug_b32',
    'patches64',
    'w64',
    'diffaug_w64_gamma001',
  ],
  f'Which to run, of {", ".join(VARIANTS)}.',
)
_BUDGET = flags.DEFINE_float(
  'budget_minutes', 22.0, 'Wall-clock training time per variant.'
)
_PARALLEL = flags.DEFINE_integer(
  'parallel', 2, 'Variants training at once, each pinned to its own core.'
)
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1000, 'Generated images.')
_NUM_REAL = flags.DEFINE_integer('num_real', 3786, 'Real images.')
_NUM_REAL_64 = flags.DEFINE_integer(
  'num_real_64', 1000, 'Real images for the 64x64 variant (another scale).'
)
_OUT = flags.DEFINE_string('out', None, 'The JSON of all variants.')
_TABLE = flags.DEFINE_string('table', None, 'Also write a Markdown table.')
_STAGE = flags.DEFINE_enum(
  'stage', 'all', ['all', 'train', 'evaluate', 'table'], 'What to do.'
)

_RUN_OVERRIDES = {
  # The budget ends the run, not the step count.
  'train.num_steps': 1_000_000,
  # No FID or samples during training: the budget is all training.
  'logging.eval_every_steps': 0,
  'logging.sample_every': 1_000_000,
  'logging.checkpoint_every': 500,
  'logging.log_every': 50,
}


def _update(name: str, entry: dict) -> dict:
  """Merges one variant's entry into --out under a lock; the whole document."""
  path = _OUT.value
  with open(path + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    document = _read()
    document.setdefault('variants', {}).setdefault(name, {}).update(entry)
    document['machine'] = common.machine()
    document['budget_minutes'] = _BUDGET.value
    common.print_json(document, out=path)
    return document


def _read() -> dict:
  if _OUT.value and os.path.exists(_OUT.value):
    with open(_OUT.value) as f:
      return json.load(f)
  return {}


def config_arguments(name: str, data_dir: str) -> list[str]:
  """The main command's --config flags for variant `name`."""
  _, overrides = VARIANTS[name]
  return [
    '--config=experiments/emoji.py',
    f'--config.data.data_dir={data_dir}',
  ] + [
    f'--config.{key}={value}'
    for key, value in {**_RUN_OVERRIDES, **overrides}.items()
  ]


def _train(name: str, core: int) -> dict:
  """Trains one variant for the budget on `core`; its steps and images."""
  what, overrides = VARIANTS[name]
  workdir = os.path.join(_ROOT.value, name)
  os.makedirs(workdir, exist_ok=True)
  argv = [
    sys.executable,
    '-m',
    'cips_jax.main',
    f'--workdir={workdir}',
  ] + config_arguments(name, _DATA_DIR.value)
  budget = _BUDGET.value * 60
  with open(os.path.join(_ROOT.value, f'{name}.log'), 'w') as log:
    start = time.monotonic()
    process = subprocess.Popen(
      argv,
      cwd=common.REPO,
      stdout=log,
      stderr=subprocess.STDOUT,
      preexec_fn=lambda: os.sched_setaffinity(0, {core}),
    )
    try:
      process.wait(timeout=budget)
      raise RuntimeError(f'{name} ended before its budget: see its log')
    except subprocess.TimeoutExpired:
      process.send_signal(signal.SIGTERM)  # a checkpoint, then the end
    process.wait(timeout=600)
  steps = loading.latest_checkpoint_step(workdir)
  batch = overrides.get('train.global_batch_size', 16)
  return {
    'what': what,
    'overrides': overrides,
    'steps': steps,
    'images_seen': steps * batch,
    'seconds': round(time.monotonic() - start, 1),
    'core': core,
  }


def _evaluate(name: str) -> dict:
  """The evaluate command's FID/KID of one trained variant."""
  workdir = os.path.join(_ROOT.value, name)
  out = os.path.join(_ROOT.value, f'{name}.scores.json')
  at_64 = VARIANTS[name][1].get('data.resolution', 32) == 64
  num_real = _NUM_REAL_64.value if at_64 else _NUM_REAL.value
  subprocess.run(
    [
      sys.executable,
      '-m',
      'cips_jax.evaluate',
      f'--workdir={workdir}',
      f'--data_dir={_DATA_DIR.value}',
      f'--cache_dir={os.path.join(_DATA_DIR.value, "fid_stats")}',
      f'--num_samples={_NUM_SAMPLES.value}',
      f'--num_real={num_real}',
      f'--out={out}',
    ],
    cwd=common.REPO,
    check=True,
  )
  with open(out) as f:
    scores = json.load(f)
  return {
    key: scores[key]
    for key in ('fid', 'kid', 'kid_std', 'num_real', 'num_fake', 'resolution')
  }


def write_table(document: dict, path: str) -> None:
  """docs' page of `document` (this script's JSON): the protocol and table."""
  variants = {
    name: entry
    for name, entry in document.get('variants', {}).items()
    if 'fid' in entry
  }
  num_real = {entry['num_real'] for entry in variants.values()}
  lines = [
    '# The emoji recipe, chosen at equal wall-clock time',
    '',
    'Written by `python benchmarks/emoji_ablation.py` (see its docstring for',
    'the command) from `benchmarks/results/emoji_ablation.json`.',
    '',
    f'- Machine: {document["machine"]["cpu"]}, 2 cores; each variant pinned',
    '  to one core, two variants training at once.',
    f'- Budget: {document["budget_minutes"]:g} minutes of wall-clock time per',
    '  variant, from its process start (compiling included) to SIGTERM.',
    '- Every variant is `experiments/emoji.py` plus the overrides in the',
    '  JSON; batch 16 unless it says otherwise.',
    "- Scores: the evaluate command on the run's EMA generator, "
    f'{sorted({e["num_fake"] for e in variants.values()})[0]:,} samples',
    f'  against {" or ".join(f"{n:,}" for n in sorted(num_real))} real'
    ' emoji. A 64² variant is',
    '  scored against the 64² emoji: its FID is on another scale.',
    '- What the table says, and the recipe it chose: the model card,',
    '  [pretrained/noto_emoji/README.md](../pretrained/noto_emoji/README.md).',
    '',
    '| variant | what it changes | steps | images seen | FID | KID |',
    '|---|---|---:|---:|---:|---:|',
  ]
  for name, entry in variants.items():
    scale = (
      ''
      if entry['resolution'] == 32
      else f' (at {entry["resolution"]}², {entry["num_real"]:,} reals)'
    )
    lines.append(
      f'| `{name}` | {entry["what"]} | {entry["steps"]:,} | '
      f'{entry["images_seen"]:,} | {entry["fid"]:.1f}{scale} | '
      f'{entry["kid"]:.4f} ± {entry["kid_std"]:.4f} |'
    )
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def main(argv):
  common.check_no_arguments(argv)
  if not _OUT.value:
    raise app.UsageError('--out is required')
  unknown = [name for name in _VARIANTS.value if name not in VARIANTS]
  if unknown:
    raise app.UsageError(f'unknown variants {unknown}; known: {list(VARIANTS)}')
  done = _read().get('variants', {})
  if _STAGE.value in ('all', 'train'):
    if not _DATA_DIR.value:
      raise app.UsageError('--data_dir is required to train')
    todo = [
      name for name in _VARIANTS.value if 'steps' not in done.get(name, {})
    ]
    cores = sorted(os.sched_getaffinity(0))[: _PARALLEL.value]
    free = list(cores)
    with futures.ThreadPoolExecutor(len(cores)) as pool:
      running = {}
      for name in todo:
        if not free:
          finished, _ = futures.wait(running, return_when='FIRST_COMPLETED')
          for future in finished:
            free.append(running.pop(future))
            future.result()
        core = free.pop(0)
        future = pool.submit(lambda n, c: _update(n, _train(n, c)), name, core)
        running[future] = core
      for future in running:
        future.result()
  if _STAGE.value in ('all', 'evaluate'):
    for name in _VARIANTS.value:
      entry = _read().get('variants', {}).get(name, {})
      if 'steps' in entry and 'fid' not in entry:
        _update(name, _evaluate(name))
  if _TABLE.value:
    write_table(_read(), _TABLE.value)


if __name__ == '__main__':
  app.run(main)
