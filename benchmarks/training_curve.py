r"""A training run's curve, from its TensorBoard events: one PNG and one JSON.

    python benchmarks/training_curve.py --workdir=RUN --out=curve.png \
        --title='Noto Emoji CIPSskip-32' > curve.json

The PNG plots FID during training (`logging.eval_every_steps`) with the
discriminator's and generator's losses on a log axis; the JSON lists every
evaluation (step, FID, KID), the SWD points and the losses' last values, so
the numbers a model card quotes come from the same events as its picture.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import common

from cips_jax import images
from cips_jax import summary

_WORKDIR = flags.DEFINE_string('workdir', None, 'The training run.')
_OUT = flags.DEFINE_string('out', None, 'Where to write the PNG.')
_TITLE = flags.DEFINE_string('title', '', 'The plot title (before ": ...").')
_EVAL_LABEL = flags.DEFINE_string(
  'eval_label', 'FID', 'The FID curve legend, e.g. its sample counts.'
)


def curve_report(scalars: dict[str, list[tuple[int, float]]]) -> dict:
  """The evaluations, SWD points and last losses of `read_scalars` output."""
  fid = dict(scalars.get('eval/fid', []))
  kid = dict(scalars.get('eval/kid', []))
  return {
    'evaluations': [
      {'step': step, 'fid': fid[step], 'kid': kid.get(step)}
      for step in sorted(fid)
    ],
    'swd_mean': [
      {'step': step, 'swd_mean': value}
      for step, value in scalars.get('swd/swd_mean', [])
    ],
    'last_losses': {
      name: scalars[name][-1]
      for name in ('d_loss', 'g_loss')
      if scalars.get(name)
    },
  }


def main(argv):
  common.check_no_arguments(argv)
  scalars = summary.read_scalars(os.path.join(_WORKDIR.value, 'tensorboard'))
  curves = {}
  for tag, label in (
    ('eval/fid', _EVAL_LABEL.value),
    ('d_loss', 'D loss'),
    ('g_loss', 'G loss'),
  ):
    if scalars.get(tag):
      steps, values = zip(*scalars[tag])
      curves[label] = (steps, values)
  title = f'{_TITLE.value}: FID and losses' if _TITLE.value else ''
  images.save_line_plot(
    _OUT.value,
    curves,
    x_label='training step',
    y_label='value (log10)',
    log_y=True,
    title=title,
  )
  common.print_json(
    {
      'workdir': _WORKDIR.value,
      'out': _OUT.value,
      **curve_report(scalars),
      'machine': common.machine(),
    }
  )


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(main)
