"""Image-quality metrics.

SWD and spectra need no weights; FID and KID need the Inception weights.

    from cips_jax.metrics import sliced_wasserstein
    # {'swd_32': ..., 'swd_mean': ...}
    scores = sliced_wasserstein(real_images, fake_images, seed=0)

    from cips_jax.metrics import spectrum
    freqs, power = spectrum.power_spectrum(images)  # azimuthal average

    from cips_jax.metrics import fid, inception
    features = inception.InceptionFeatures()(images)  # (N, 2048)
    score = fid.frechet_distance(
        fid.Statistics.from_features(a), fid.Statistics.from_features(b)
    )
"""

from cips_jax.metrics.swd import sliced_wasserstein

__all__ = ['sliced_wasserstein']
