"""How matrix products are computed for a compute dtype.

In bfloat16, every product of the models names the algorithm
BF16_BF16_F32: bfloat16 operands, float32 accumulation. Naming it matters for
the backward pass: JAX transposes a bf16 x bf16 -> f32 product into products of
the float32 cotangent with a bfloat16 operand, which XLA would otherwise run at
float32 operand precision (TF32 on GPUs); with the algorithm they round the
cotangent to bfloat16 as well. In float32, products keep the backend's default.
Convolutions carry no algorithm in StableHLO: their backward passes take
float32 operands at the default precision (README, "Accelerators").
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp


def for_products(dtype: Any) -> Optional[Any]:
  """The `precision` argument of a product whose operands are in `dtype`."""
  if jnp.dtype(dtype) == jnp.bfloat16:
    return jax.lax.DotAlgorithmPreset.BF16_BF16_F32
  return None
