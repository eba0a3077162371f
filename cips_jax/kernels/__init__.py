"""Fused Pallas kernels: the generator's opt-in per_image_form='fused'.

`modulated_dense`: one style-modulated 1x1 layer (product, demodulation, noise,
bias, activation) per pallas_call, for per-image styles; Triton on GPU, Mosaic
on TPU, interpret mode on CPU.
"""

from cips_jax.kernels import modulated_dense

__all__ = ['modulated_dense']
