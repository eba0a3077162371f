"""Fused Pallas kernels, not used by the generator until a device measures them.

`modulated_dense`: one style-modulated 1x1 layer (product, demodulation, noise,
bias, activation) per pallas_call, for per-image styles; Triton on GPU, Mosaic
on TPU, interpret mode on CPU.
"""

from cips_jax.kernels import modulated_dense

__all__ = ['modulated_dense']
