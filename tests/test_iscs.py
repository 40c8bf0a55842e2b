"""ISCS (iscs.py) on synthetic features: the properties the metric must have, no networks."""
import math
import subprocess
import sys

import numpy as np
import pytest

import iscs
from conftest import REPO
from iscs import FD_EPS, frechet_distance, iscs_from_features, iscs_weights, joint_features

N, K, D = 400, 5, 6  # samples, scales, feature width (joint 12-d: sqrtm stays instant)


def _feats(seed, n=N):
    """Per-scale CLS-like features (n, K, D) with structure across scales (each scale refines the last)."""
    rng = np.random.default_rng(seed)
    f = [rng.normal(size=(n, D)) + 2.0]
    for _ in range(1, K):
        f.append(0.7 * f[-1] + 0.5 * rng.normal(size=(n, D)))
    return np.stack(f, axis=1)


def test_weights_sum_to_one_and_favour_fine_scales():
    for k in (2, 6, 10):
        w = iscs_weights(k)
        assert w.shape == (k - 1,)
        assert math.isclose(w.sum(), 1.0, rel_tol=1e-12)
        assert np.all(np.diff(w) > 0)
        e = np.exp(np.arange(1, k))
        np.testing.assert_allclose(w, e / e.sum(), rtol=1e-12)
    assert math.isclose(iscs_weights(10)[-1], 1 / sum(math.exp(-j) for j in range(9)), rel_tol=1e-12)
    res = iscs_from_features(_feats(0), _feats(1))
    assert math.isclose(sum(res['w_k']), 1.0, rel_tol=1e-12)
    assert res['k'] == list(range(1, K))
    with pytest.raises(ValueError):
        iscs_weights(1)


def test_identical_sets_give_zero_fd_and_the_documented_finite_score():
    real = _feats(0)
    res = iscs_from_features(real, real.copy())
    assert all(abs(fd) < 1e-6 for fd in res['FD_k'])          # round-off only
    assert res['clipped_k'] == list(range(1, K))              # reported, not hidden
    assert res['S_k'] == [1 / FD_EPS] * (K - 1)
    assert math.isfinite(res['ISCS'])
    assert math.isclose(res['ISCS'], 1 / FD_EPS, rel_tol=1e-12)  # weights sum to 1
    assert res['eps'] == FD_EPS


def _fd_by_hand(x_ND, y_MD):
    """Fréchet distance of the Gaussian fits of two sample sets, from scratch (no iscs, no scipy.linalg.sqrtm):
    tr sqrtm(S1 S2) = tr sqrtm(A S2 A), A = S1^(1/2), whose argument is symmetric PSD (eigh)."""
    stats = []
    for z in (x_ND, y_MD):
        mu = z.sum(0) / len(z)
        stats.append((mu, (z - mu).T @ (z - mu) / (len(z) - 1)))
    (mu1, s1), (mu2, s2) = stats
    lam, vec = np.linalg.eigh(s1)
    a = (vec * np.sqrt(np.clip(lam, 0, None))) @ vec.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(a @ s2 @ a), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def test_frechet_distance_closed_form():
    # diagonal covariances: |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 = 25 + 1 + 1
    assert frechet_distance([0, 0], np.diag([1.0, 4.0]), [3, 4], np.diag([4.0, 9.0])) == pytest.approx(27, rel=1e-12)
    # the same pair rotated (means and covariances alike): the distance is rotation invariant
    c, s = math.cos(0.7), math.sin(0.7)
    r = np.array([[c, -s], [s, c]])
    fd = frechet_distance([0, 0], r @ np.diag([1.0, 4.0]) @ r.T, r @ [3, 4], r @ np.diag([4.0, 9.0]) @ r.T)
    assert fd == pytest.approx(27, rel=1e-9)


def test_matches_the_definition():
    real, gen = _feats(0), _feats(1, n=300)  # set sizes may differ
    res = iscs_from_features(real, gen)
    unit = lambda f: f / np.sqrt((f ** 2).sum(1, keepdims=True))
    fds = np.array([_fd_by_hand(np.concatenate([unit(real[:, k - 1]), unit(real[:, k])], 1),
                                np.concatenate([unit(gen[:, k - 1]), unit(gen[:, k])], 1)) for k in range(1, K)])
    w = np.exp(np.arange(1, K)) / np.exp(np.arange(1, K)).sum()
    assert np.all(fds > 1e-3)  # no transition clipped: the sets really differ
    np.testing.assert_allclose(res['FD_k'], fds, rtol=1e-8)
    np.testing.assert_allclose(res['S_k'], 1 / fds, rtol=1e-8)
    assert math.isclose(res['ISCS'], float(np.dot(w, 1 / fds)), rel_tol=1e-8)
    assert res['clipped_k'] == []
    # a list of K (N, D) arrays is the same input as an (N, K, D) array
    res_list = iscs_from_features([real[:, k] for k in range(K)], [gen[:, k] for k in range(K)])
    assert res_list == res


def test_joint_feature_is_two_unit_halves():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(10, D)) * 5, rng.normal(size=(10, D))
    z = joint_features(a, b)
    assert z.shape == (10, 2 * D)
    np.testing.assert_allclose(np.linalg.norm(z[:, :D], axis=1), 1, rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(z[:, D:], axis=1), 1, rtol=1e-12)
    np.testing.assert_allclose(z[:, :D], a / np.linalg.norm(a, axis=1, keepdims=True), rtol=1e-12)
    # L2 normalisation makes the metric blind to feature scale
    real, gen = _feats(0), _feats(1)
    np.testing.assert_allclose(iscs_from_features(real, gen)['FD_k'], iscs_from_features(3 * real, gen)['FD_k'],
                               rtol=1e-9, atol=1e-12)


def test_invariant_to_sample_order():
    real, gen = _feats(0), _feats(1)
    res = iscs_from_features(real, gen)
    rng = np.random.default_rng(7)
    res_perm = iscs_from_features(real[rng.permutation(len(real))], gen[rng.permutation(len(gen))])
    np.testing.assert_allclose(res_perm['FD_k'], res['FD_k'], rtol=1e-9)
    assert math.isclose(res_perm['ISCS'], res['ISCS'], rel_tol=1e-9)


def test_decreases_monotonically_with_corruption():
    real = _feats(0)
    noise = np.random.default_rng(5).normal(size=real.shape)
    scores, fds = [], []
    for sigma in (0.0, 0.1, 0.2, 0.4, 0.8, 1.6):  # 0: identical sets, the capped score
        res = iscs_from_features(real, real + sigma * noise)
        assert res['clipped_k'] == ([] if sigma else list(range(1, K)))
        scores.append(res['ISCS'])
        fds.append(res['FD_k'])
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    fds = np.array(fds[1:])
    assert np.all(np.diff(fds, axis=0) > 0), fds  # and every transition's FD grows


def test_corrupting_only_the_fine_scale_lowers_only_the_transitions_touching_it():
    real = _feats(0)
    gen = real.copy()
    gen[:, K - 1] += 0.3 * np.random.default_rng(2).normal(size=(N, D))
    res = iscs_from_features(real, gen)
    assert res['clipped_k'] == list(range(1, K - 1))  # untouched transitions: identical, capped
    assert res['FD_k'][-1] > FD_EPS


def test_bad_features_raise():
    real = _feats(0)
    bad = real.copy()
    bad[3, 1, 0] = np.nan
    with pytest.raises(ValueError, match='NaN'):
        iscs_from_features(real, bad)
    zero = real.copy()
    zero[0, 2] = 0
    with pytest.raises(ValueError, match='zero'):
        iscs_from_features(real, zero)
    with pytest.raises(ValueError, match='scales'):
        iscs_from_features(real, real[:, :3])
    with pytest.raises(ValueError):
        iscs_from_features(real[:, :1], real[:, :1])


def test_importable_alone():
    """iscs.py needs numpy and scipy only: importing it in a fresh interpreter loads no torch."""
    assert set(iscs.__all__) >= {'iscs_from_features', 'iscs_from_stats', 'joint_features', 'iscs_weights'}
    code = "import sys, iscs; assert 'torch' not in sys.modules, 'iscs imports torch'"
    r = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
