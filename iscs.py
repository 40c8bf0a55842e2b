"""Inter-Scale Consistency Score (ISCS) and the Fréchet distance it is built on.

This module currently holds the Fréchet-distance part: Gaussian feature
statistics and the Fréchet distance between two Gaussians, exactly as
pytorch-fid 0.3.0 and the ADM (guided-diffusion) evaluator compute them
(shared/fixtures/README_fid_metrics.md §5). FID in evaluate.py and the ISCS
metric (added later in this file) both use these two functions, so their
numbers stay comparable with published FIDs.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

__all__ = ['feature_stats', 'frechet_distance']


def feature_stats(feats_ND) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a feature set, in float64.

    Args:
        feats_ND: (N, D) array-like of features (N >= 2), e.g. Inception pool3.
    Returns:
        mu_D: (D,) float64, ``np.mean(axis=0)``.
        sigma_DD: (D, D) float64, ``np.cov(rowvar=False)`` (unbiased, N - 1).
    """
    feats_ND = np.asarray(feats_ND, dtype=np.float64)
    if feats_ND.ndim != 2:
        raise ValueError(f'feature_stats expects an (N, D) array, got shape {feats_ND.shape}')
    if feats_ND.shape[0] < 2:
        raise ValueError(f'feature_stats needs at least 2 rows for a covariance, got {feats_ND.shape[0]}')
    mu_D = np.mean(feats_ND, axis=0)
    # atleast_2d: np.cov returns a 0-d array when D == 1.
    sigma_DD = np.atleast_2d(np.cov(feats_ND, rowvar=False))
    return mu_D, sigma_DD


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))`` with the
    pytorch-fid / ADM safeguards: if ``sqrtm`` yields a non-finite entry it is
    recomputed on ``(S1 + eps I)(S2 + eps I)``; a complex result is accepted
    only if the imaginary part of its diagonal is within 1e-3 of zero, and
    then its real part is used.

    Args:
        mu1, mu2: (D,) means.
        sigma1, sigma2: (D, D) covariances.
        eps: diagonal offset for the non-finite fallback only.
    Returns:
        The distance as a Python float (>= 0 up to round-off).
    Raises:
        ValueError: on shape mismatch or a significantly complex sqrtm.
    """
    mu1_D = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2_D = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1_DD = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2_DD = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1_D.shape[0]
    if mu1_D.shape != (d,) or mu2_D.shape != (d,):
        raise ValueError(f'mean vectors have different or non-1-D shapes: {mu1_D.shape} vs {mu2_D.shape}')
    if sigma1_DD.shape != (d, d) or sigma2_DD.shape != (d, d):
        raise ValueError(f'covariances must be ({d}, {d}), got {sigma1_DD.shape} and {sigma2_DD.shape}')

    diff_D = mu1_D - mu2_D
    # No disp= argument: it is deprecated since SciPy 1.16 and removed in 1.18.
    covmean_DD = scipy.linalg.sqrtm(sigma1_DD.dot(sigma2_DD))
    if not np.isfinite(covmean_DD).all():
        # Singular product: the offset makes both factors positive definite.
        offset_DD = np.eye(d) * eps
        covmean_DD = scipy.linalg.sqrtm((sigma1_DD + offset_DD).dot(sigma2_DD + offset_DD))

    # S1 S2 of two PSD matrices has a real non-negative spectrum; a complex
    # sqrtm is round-off, unless the imaginary part is large.
    if np.iscomplexobj(covmean_DD):
        imag_diag = np.diagonal(covmean_DD).imag
        if not np.allclose(imag_diag, 0, atol=1e-3):
            raise ValueError(
                f'frechet_distance: sqrtm(sigma1 @ sigma2) has an imaginary diagonal component up to '
                f'{np.max(np.abs(imag_diag)):.3g} (tolerance 1e-3); the covariances are probably not '
                f'positive semi-definite or contain NaN/inf.')
        covmean_DD = covmean_DD.real

    tr_covmean = np.trace(covmean_DD)
    return float(diff_D.dot(diff_D) + np.trace(sigma1_DD) + np.trace(sigma2_DD) - 2 * tr_covmean)
