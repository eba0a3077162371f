"""cips_jax: CIPS (Conditionally-Independent Pixel Synthesis) in JAX/Flax."""

import pathlib
import re

from setuptools import find_packages
from setuptools import setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(
  r"__version__ = '([^']+)'", (HERE / 'cips_jax' / '__init__.py').read_text()
)[1]


def requirements(name):
  lines = (HERE / name).read_text().splitlines()
  return [
    line.split('#')[0].strip() for line in lines if line.split('#')[0].strip()
  ]


setup(
  name='cips_jax',
  version=VERSION,
  description=(
    'CIPS (Conditionally-Independent Pixel Synthesis) generators in JAX/Flax'
  ),
  long_description=(HERE / 'README.md').read_text(),
  long_description_content_type='text/markdown',
  packages=find_packages(include=['cips_jax', 'cips_jax.*']),
  python_requires='>=3.11',
  install_requires=requirements('requirements.txt'),
  extras_require={
    # scipy: an independent sqrtm for the FID test; nbclient, nbformat,
    # ipykernel: the notebook test executes notebooks/cips_jax_demo.ipynb;
    # pytest-xdist and filelock: the suite on two workers sharing its fixtures;
    # ruff (pinned, so a release cannot fail CI with no code change): the style
    # check (pyproject.toml); lmdb: the LMDB data tests.
    'test': [
      'pytest>=8',
      'pytest-xdist',
      'filelock',
      'scipy',
      'nbclient',
      'nbformat',
      'ipykernel',
      'ruff==0.17.6',
      'lmdb',
    ],
    # The real XLA:TPU compiler (libtpu, the version that matches jax) for
    # benchmarks/tpu_compile.py and tests/test_tpu_compile.py: compiling for
    # TPU slices on a machine without one. About 680 MB.
    'tpu': ['jax[tpu]'],
    # TensorBoard, to read a workdir's curves and sample grids (training
    # writes its event files without it).
    'tensorboard': ['tensorboard'],
    # Preparing a data set from an LMDB (LSUN's own, or the reference
    # prepare_data.py's): python -m cips_jax.data lmdb.
    'lmdb': ['lmdb'],
    # Preparing LSUN with the tfds catalog builder needs TensorFlow (training
    # does not).
    'lsun': ['tensorflow-cpu', 'tensorflow-io'],
  },
  license='MIT',
)
