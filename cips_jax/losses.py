"""GAN losses of the reference.

The non-saturating logistic losses and the R1 penalty.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def discriminator_loss(real_logits: Array, fake_logits: Array) -> Array:
  """mean softplus(-D(real)) + mean softplus(D(fake)).

  The logits are (B, 1); the loss is a scalar.
  """
  # softplus(-x) = -log sigmoid(x): the logistic loss, stable for large |x|
  # (docs/reference.md 3.5).
  return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(
    jax.nn.softplus(fake_logits)
  )


def generator_loss(fake_logits: Array) -> Array:
  """Non-saturating generator loss mean softplus(-D(G(z))); (B, 1) -> scalar."""
  return jnp.mean(jax.nn.softplus(-fake_logits))


def r1_penalty(
  discriminate: Callable[[Array], Array], real_inputs: Array
) -> Array:
  """Mean over the batch of ||grad_x D(x)||^2 at the real inputs.

  The squared norm sums over all elements of each input.

  Args:
    discriminate: inputs (B, H, W, C) -> logits (B, 1).
    real_inputs: (B, H, W, C).
  Returns:
    scalar penalty (the reference's `r1_loss`, before the gamma / 2 * interval
    weighting).
  """
  # The gradient of the summed logits, as the reference's `real_pred.sum()`;
  # the minibatch-stddev channel couples the samples in both.
  grads = jax.grad(lambda x: jnp.sum(discriminate(x)))(real_inputs)
  # Summed over every element (coordinate channels too, for 5-channel inputs);
  # train.py weights it by gamma / 2 * r1_every, 80 in the reference recipe
  # (docs/reference.md 3.2).
  return jnp.mean(
    jnp.sum(jnp.square(grads).reshape(grads.shape[0], -1), axis=1)
  )
