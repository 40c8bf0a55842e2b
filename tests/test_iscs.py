"""ISCS (iscs.py) on synthetic features: the properties the metric must have, no networks."""
import math

import numpy as np
import pytest

import iscs
from iscs import FD_EPS, feature_stats, frechet_distance, iscs_from_features, iscs_weights, joint_features

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


def test_matches_the_definition():
    real, gen = _feats(0), _feats(1, n=300)  # set sizes may differ
    res = iscs_from_features(real, gen)
    w = iscs_weights(K)
    fds = []
    for k in range(1, K):
        zr = joint_features(real[:, k - 1], real[:, k])
        zg = joint_features(gen[:, k - 1], gen[:, k])
        fds.append(frechet_distance(*feature_stats(zr), *feature_stats(zg)))
    np.testing.assert_allclose(res['FD_k'], fds, rtol=1e-12)
    np.testing.assert_allclose(res['S_k'], 1 / np.array(fds), rtol=1e-12)
    assert math.isclose(res['ISCS'], float(np.dot(w, 1 / np.array(fds))), rel_tol=1e-12)
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
    assert set(iscs.__all__) >= {'iscs_from_features', 'iscs_from_stats', 'joint_features', 'iscs_weights'}
    assert 'torch' not in iscs.__dict__
