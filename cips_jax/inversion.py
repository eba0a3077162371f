"""Projecting an image into the generator's latent space with optax.

    result = inversion.invert(gen, variables, target, space='w', steps=300)
    result = inversion.invert(
        gen, variables, target, space='pixel_w', steps=300
    )
    # latent, reconstruction, PSNR (dB) per step:
    result.w, result.image, result.psnr
    # with a progress bar over the steps on stderr:
    inversion.invert(gen, variables, target, progress=ProgressBar(unit='steps'))

space 'w' optimises one style w (1, D) for the whole image; space 'pixel_w'
optimises a style per pixel (1, H, W, D), which the per-pixel modulation of CIPS
renders without a model copy and which can reconstruct detail a single w cannot
(the paper's claim, checked in the tests). The loss is the mean squared pixel
error, plus `perceptual_weight` times an optional
`perceptual(images, targets) -> scalar`; `inception_distance()` gives one, the
mean squared distance between the Inception-v3 pool features of FID (needs the
Inception weights):

    result = inversion.invert(
        gen, variables, target,
        perceptual=inversion.inception_distance(), perceptual_weight=0.01,
    )
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cips_jax import errors
from cips_jax import grids
from cips_jax import sampling
from cips_jax.metrics import inception

SPACES = ('w', 'pixel_w')


@dataclasses.dataclass
class Inversion:
  """What `invert` found.

  Attributes:
    w: (1, D) for space 'w', (1, H, W, D) for 'pixel_w'.
    image: (H, W, 3) float32 reconstruction, in the target's [-1, 1] scale.
    psnr: PSNR in dB after each step (psnr[0] is at the starting point, before
      any step).
    loss: the objective after each step (same indexing).
  """

  w: np.ndarray
  image: np.ndarray
  psnr: list[float]
  loss: list[float]


def inception_distance(params=None) -> Callable:
  """A perceptual term: mean squared distance of Inception-v3 pool features.

  The features are (B, 2048).

  `params`: Inception parameters (default: `inception.load_params()`, which
  finds the weights or says where to get them). Images are float in [-1, 1], any
  size (resized to 299 inside, differentiably).
  """
  params = inception.load_params() if params is None else params
  # The weights are an argument, not a closed-over constant: XLA would
  # otherwise constant-fold the network on constant inputs while compiling.
  return functools.partial(_inception_distance, params)


@jax.jit
def _inception_distance(params, images, targets):
  network = inception.InceptionV3()
  features = network.apply({'params': params}, inception.preprocess(images))
  target_features = network.apply(
    {'params': params}, inception.preprocess(targets)
  )
  # The target's features are a constant of the objective: no gradient flows
  # into them.
  return jnp.mean(jnp.square(features - jax.lax.stop_gradient(target_features)))


def psnr(image, target) -> float:
  """Peak signal-to-noise ratio in dB of images in [-1, 1].

  The peak-to-peak range is 2, so MAX^2 = 4.
  """
  mse = float(
    np.mean(
      (np.asarray(image, np.float64) - np.asarray(target, np.float64)) ** 2
    )
  )
  return float('inf') if mse == 0 else 10.0 * np.log10(4.0 / mse)


def as_signed_image(target) -> np.ndarray:
  """uint8 [0, 255] or float [-1, 1] (H, W, 3) -> float32 [-1, 1]."""
  target = np.asarray(target)
  if target.ndim != 3 or target.shape[-1] != 3:
    raise errors.InputError(
      f'the target must be one RGB image (H, W, 3), got shape {target.shape}'
    )
  if target.dtype == np.uint8:
    # The scaling of the training data (data.pipeline), so a real image and a
    # render are compared in the same units.
    return target.astype(np.float32) / 127.5 - 1.0
  return target.astype(np.float32)


def invert(
  gen,
  variables,
  target,
  space: str = 'w',
  steps: int = 300,
  learning_rate: float = 0.03,
  w_init: Optional[jax.Array] = None,
  perceptual: Optional[Callable] = None,
  perceptual_weight: float = 0.0,
  seed: int = 0,
  progress: Optional[Callable[[int, int], None]] = None,
) -> Inversion:
  """Finds a style (or a style per pixel) whose render matches `target`.

  Args:
    gen, variables: the generator and its variables.
    target: (H, W, 3), uint8 or float in [-1, 1], rendered on
      `grids.uniform(H, W)`.
    space: 'w' (one w) or 'pixel_w' (a w per pixel).
    steps: Adam steps.
    learning_rate: Adam's step size (in W units).
    w_init: the start (1, D); default the mean w of 4096 random latents
      (`sampling.w_avg`).
    perceptual: optional term
      `(images (1, H, W, 3), targets (1, H, W, 3)) -> scalar`.
    perceptual_weight: its weight.
    seed: seeds the w_avg estimate.
    progress: called as progress(steps_done, steps) after each step, e.g. a
      `progress.ProgressBar(unit='steps')`; the last call has steps_done ==
      steps.
  Returns:
    an `Inversion`.
  """
  if space not in SPACES:
    raise errors.InputError(f'space must be one of {SPACES}, got {space!r}')
  if steps < 0:
    raise errors.InputError(f'steps must be >= 0, got {steps}')
  if perceptual_weight and perceptual is None:
    raise errors.InputError('perceptual_weight > 0 needs a perceptual function')
  target = jnp.asarray(as_signed_image(target))[None]
  height, width = target.shape[1:3]
  coords = grids.uniform(height, width)
  if w_init is None:
    w_init = sampling.w_avg(
      gen, variables, jax.random.PRNGKey(seed), num_samples=4096
    )
  w = jnp.asarray(w_init, jnp.float32).reshape(1, gen.style_dim)
  # Every pixel starts from the same w: both spaces start from the same image.
  if space == 'pixel_w':
    w = jnp.broadcast_to(w[:, None, None, :], (1, height, width, gen.style_dim))

  # The target and the coordinates are arguments of the compiled functions:
  # as constants, XLA would fold whatever depends only on them at compile time.
  def objective(w, variables, target, coords):
    image = sampling.synthesize(gen, variables, w, coords)
    mse = jnp.mean((image - target) ** 2)
    loss = mse
    if perceptual is not None and perceptual_weight:
      loss = loss + perceptual_weight * perceptual(image, target)
    return loss, (mse, image)

  optimizer = optax.adam(learning_rate)

  # Compiled per call: it closes over gen, the optimizer and `perceptual`.
  # One jitted step per call, not a loop of steps in one program: XLA:CPU ran
  # the Inception term's convolutions inside a while loop some 17x slower.
  @jax.jit
  def step(w, opt_state, variables, target, coords):
    (loss, (mse, _)), grad = jax.value_and_grad(objective, has_aux=True)(
      w, variables, target, coords
    )
    updates, opt_state = optimizer.update(grad, opt_state, w)
    return optax.apply_updates(w, updates), opt_state, loss, mse

  losses, mses = [], []
  opt_state = optimizer.init(w)
  for done in range(1, steps + 1):
    # Loss and mse before the update; float() waits for the step, so at most
    # one is in flight.
    w, opt_state, loss, mse = step(w, opt_state, variables, target, coords)
    losses.append(float(loss))
    mses.append(float(mse))
    if progress is not None:
      progress(done, steps)
  # One more evaluation at the final w, so psnr[-1] and `image` describe the
  # latent returned.
  loss, (mse, image) = jax.jit(objective)(w, variables, target, coords)
  losses.append(float(loss))
  mses.append(float(mse))
  psnrs = [float('inf') if m == 0 else 10.0 * np.log10(4.0 / m) for m in mses]
  return Inversion(
    w=np.asarray(w), image=np.asarray(image[0]), psnr=psnrs, loss=losses
  )
