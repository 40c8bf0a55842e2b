"""Inter-Scale Consistency Score (ISCS, AID-VAR paper §4, eqs. 8-10), the Fréchet distance it is built on, and the
paired bootstrap of FID differences.

Features in, numbers out (evaluate.py decodes the images and runs the networks). For each transition k-1 -> k,
z_k = [f(x_{k-1}), f(x_k)] joins the L2-normalised CLS features f of the images decoded from the token prefixes
of scales 0..k-1 and 0..k; FD_k is the Fréchet distance between real and generated z_k, S_k = 1 / max(FD_k,
FD_EPS), ISCS = sum_k w_k S_k with w_k = exp(k) / sum_j exp(j). Higher is better. The Fréchet distance is
pytorch-fid's and the ADM evaluator's. Definitions and the FD_EPS decision: docs/iscs.md.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

__all__ = ['feature_stats', 'frechet_distance', 'paired_fid_bootstrap', 'FD_EPS', 'iscs_weights', 'l2_normalize',
           'joint_features', 'joint_stats', 'iscs_from_stats', 'iscs_from_features']

FD_EPS = 1e-4


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


# --------------------------------------------------------------------------------------
# ISCS
# --------------------------------------------------------------------------------------

def paired_fid_bootstrap(feats_list, ref_mu, ref_sigma, n_boot: int, seed: int = 0, paired: bool = True) -> list:
    """Paired bootstrap of FID(set i) - FID(set 0), i >= 1, over [(N, D)] features of row-paired sample sets: every
    replicate resamples the same rows in every set (resampling inflates each FID, but alike, so the difference keeps
    its meaning); the reference ref_mu (D,), ref_sigma (D, D) is held fixed. paired=False resamples every set on its
    own (sets of independent draws, any sizes). Per set i >= 1: dict(ci95=[2.5th, 97.5th percentile], p_lower=share
    of replicates where set i has the lower FID, n_boot)."""
    rng = np.random.default_rng(seed)
    d_BI = np.empty((n_boot, len(feats_list) - 1))
    n = len(feats_list[0])
    for b in range(n_boot):
        rows = [rng.integers(0, n, n)] * len(feats_list) if paired else [rng.integers(0, len(f), len(f)) for f in feats_list]
        fids = [frechet_distance(*feature_stats(f[r]), ref_mu, ref_sigma) for f, r in zip(feats_list, rows)]
        d_BI[b] = np.asarray(fids[1:]) - fids[0]
    return [dict(ci95=[float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))], p_lower=float(np.mean(d < 0)),
                 n_boot=n_boot) for d in d_BI.T]


def iscs_weights(num_scales: int) -> np.ndarray:
    """w_k = exp(k) / sum_{j=1..K-1} exp(j) for k = 1..K-1.

    Args:
        num_scales: K, the number of VAR scales (>= 2).
    Returns:
        w: float64 (K-1,), entry i is the weight of transition k = i + 1; sums to 1.
    """
    if num_scales < 2:
        raise ValueError(f'ISCS needs at least 2 scales (one transition), got {num_scales}')
    k = np.arange(1, num_scales, dtype=np.float64)
    # shifted by the max: exp(k) overflows nothing for K <= 700, but the shift costs nothing
    e = np.exp(k - k.max())
    return e / e.sum()


def l2_normalize(feats_ND) -> np.ndarray:
    """Rows scaled to unit L2 norm, float64 (N, D). A zero row is an error, not a silent NaN."""
    feats_ND = np.asarray(feats_ND, dtype=np.float64)
    if feats_ND.ndim != 2:
        raise ValueError(f'expected (N, D) features, got shape {feats_ND.shape}')
    norm_N1 = np.linalg.norm(feats_ND, axis=1, keepdims=True)
    if not np.all(np.isfinite(norm_N1)):
        raise ValueError('ISCS features contain NaN or inf')
    if np.any(norm_N1 == 0):
        raise ValueError(f'{int(np.sum(norm_N1 == 0))} feature rows are all zero and cannot be L2-normalised')
    return feats_ND / norm_N1


def joint_features(feats_prev_ND, feats_next_ND) -> np.ndarray:
    """The ISCS joint feature of one transition: [f(x_{k-1}), f(x_k)], each half L2-normalised.

    Args:
        feats_prev_ND: (N, D) raw CLS features of the images decoded up to scale k-1.
        feats_next_ND: (N, D) raw CLS features of the same samples decoded up to scale k
            (row i of both belongs to the same sample).
    Returns:
        z_N2D: float64 (N, 2D).
    """
    a_ND, b_ND = l2_normalize(feats_prev_ND), l2_normalize(feats_next_ND)
    if a_ND.shape != b_ND.shape:
        raise ValueError(f'features of scales k-1 and k must have the same shape, got {a_ND.shape} and {b_ND.shape}')
    return np.concatenate([a_ND, b_ND], axis=1)


def _as_scale_list(feats_per_scale) -> list:
    # (N, K, D) array or a sequence of K (N, D) arrays -> list of K (N, D) arrays
    if isinstance(feats_per_scale, np.ndarray) and feats_per_scale.ndim == 3:
        return [feats_per_scale[:, k] for k in range(feats_per_scale.shape[1])]
    return list(feats_per_scale)


def joint_stats(feats_per_scale) -> list:
    """Gaussian statistics of the joint features of every transition k = 1..K-1.

    Args:
        feats_per_scale: (N, K, D) array, or a sequence of K arrays (N, D): raw (un-normalised)
            CLS features of the images decoded from the token prefixes 0..k, k = 0..K-1.
    Returns:
        list of K-1 tuples (mu (2D,), sigma (2D, 2D)), float64; entry i is transition k = i + 1.
        One transition's joint features are built at a time, so memory stays at one (N, 2D) array.
    """
    scales = _as_scale_list(feats_per_scale)
    if len(scales) < 2:
        raise ValueError(f'ISCS needs features of at least 2 scales, got {len(scales)}')
    return [feature_stats(joint_features(scales[k - 1], scales[k])) for k in range(1, len(scales))]


def iscs_from_stats(real_stats, gen_stats, eps: float = FD_EPS) -> dict:
    """ISCS from per-transition Gaussian statistics (see the module docstring).

    Args:
        real_stats, gen_stats: lists of K-1 (mu, sigma) pairs from ``joint_stats``, transition order.
        eps: FD floor for S_k = 1 / max(FD_k, eps).
    Returns:
        dict with 'ISCS' (float), and per transition k = 1..K-1 (lists of length K-1):
        'k', 'S_k', 'FD_k' (raw, may be ~ -1e-7 for identical sets), 'w_k'; plus 'eps' and
        'clipped_k' (the k with FD_k < eps, whose S_k is the cap 1 / eps).
    """
    if len(real_stats) != len(gen_stats):
        raise ValueError(f'real and generated statistics cover {len(real_stats)} and {len(gen_stats)} transitions')
    w_k = iscs_weights(len(real_stats) + 1)
    fd_k = np.array([frechet_distance(mu_r, sig_r, mu_g, sig_g)
                     for (mu_r, sig_r), (mu_g, sig_g) in zip(real_stats, gen_stats)], dtype=np.float64)
    if not np.all(np.isfinite(fd_k)):
        raise ValueError(f'ISCS: non-finite Fréchet distance(s) {fd_k.tolist()}')
    s_k = 1.0 / np.maximum(fd_k, eps)
    ks = list(range(1, len(fd_k) + 1))
    return {'ISCS': float(np.dot(w_k, s_k)), 'k': ks, 'S_k': s_k.tolist(), 'FD_k': fd_k.tolist(),
            'w_k': w_k.tolist(), 'eps': float(eps), 'clipped_k': [k for k, fd in zip(ks, fd_k) if fd < eps]}


def iscs_from_features(real_feats_per_scale, gen_feats_per_scale, eps: float = FD_EPS) -> dict:
    """ISCS of a generated set against a real set.

    Args:
        real_feats_per_scale: (N, K, D) array or K arrays (N, D): raw CLS features f of the real
            images decoded from ground-truth token prefixes 0..k, for k = 0..K-1.
        gen_feats_per_scale: the same for generated samples, (M, K, D) (M need not equal N; the
            rows of one set must be in the same sample order across scales).
        eps: FD floor (FD_EPS).
    Returns:
        the dict of ``iscs_from_stats``: 'ISCS', 'k', 'S_k', 'FD_k', 'w_k', 'eps', 'clipped_k'.
    """
    real, gen = _as_scale_list(real_feats_per_scale), _as_scale_list(gen_feats_per_scale)
    if len(real) != len(gen):
        raise ValueError(f'real and generated features have {len(real)} and {len(gen)} scales')
    return iscs_from_stats(joint_stats(real), joint_stats(gen), eps)
