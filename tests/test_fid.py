"""Streaming feature statistics, the Fréchet distance and the reference-statistics files."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from dmdctl.errors import UserError
from dmdctl.metrics.fid import FeatureStats, frechet_distance, load_stats_npz, save_stats_npz


def textbook_fid(mu1, s1, mu2, s2) -> float:
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(diff @ diff + np.trace(s1 + s2 - 2 * covmean))


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


# ---------------------------------------------------------------- FeatureStats


def test_feature_stats_streaming_matches_numpy():
    rng = np.random.default_rng(0)
    # features with a non-zero mean and correlations, fed in uneven batches
    mix = rng.standard_normal((6, 6))
    feats = rng.standard_normal((203, 6)) @ mix + rng.uniform(-3, 3, 6)
    stats = FeatureStats(6)
    for lo, hi in [(0, 1), (1, 64), (64, 150), (150, 203)]:
        stats.update(feats[lo:hi])
    assert stats.n == 203
    np.testing.assert_allclose(stats.mu, feats.mean(axis=0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-10)


def test_feature_stats_accepts_torch_and_flattens():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((40, 2, 3))
    stats = FeatureStats(6)
    stats.update(torch.from_numpy(feats[:25]).float())
    stats.update(torch.from_numpy(feats[25:]))
    flat = feats.reshape(40, 6)
    # the float32 batch was rounded to float32 before being accumulated
    ref = np.concatenate([flat[:25].astype(np.float32).astype(np.float64), flat[25:]])
    np.testing.assert_allclose(stats.mu, ref.mean(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(ref, rowvar=False), rtol=1e-10, atol=1e-12)


def test_feature_stats_merge_equals_single_pass():
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((90, 4)) + 5
    a, b, whole = FeatureStats(4), FeatureStats(4), FeatureStats(4)
    a.update(feats[:30])
    b.update(feats[30:])
    whole.update(feats)
    merged = a.merge(b)
    assert merged.n == 90
    np.testing.assert_allclose(merged.mu, whole.mu, rtol=1e-12)
    np.testing.assert_allclose(merged.sigma, np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-10)


def test_feature_stats_wrong_dimension_and_too_few_samples():
    stats = FeatureStats(3)
    with pytest.raises(ValueError, match="3"):
        stats.update(np.zeros((2, 4)))
    stats.update(np.ones((1, 3)))
    with pytest.raises(UserError):
        _ = stats.sigma


# ---------------------------------------------------------------- frechet_distance


@pytest.mark.parametrize("d", [2, 16, 64])
def test_frechet_distance_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    want = textbook_fid(mu1, s1, mu2, s2)
    assert want > 0
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("d", [2, 16, 64])
def test_frechet_distance_covariance_only(d):
    # equal means: the whole distance comes from the trace term
    rng = np.random.default_rng(100 + d)
    mu = rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(textbook_fid(mu, s1, mu, s2), rel=1e-6)


def test_frechet_distance_identical_statistics_is_zero():
    rng = np.random.default_rng(3)
    for d in (2, 16, 64):
        mu, s = rng.standard_normal(d), random_spd(rng, d)
        assert abs(frechet_distance(mu, s, mu, s)) < 1e-8


def test_frechet_distance_is_symmetric():
    rng = np.random.default_rng(4)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = random_spd(rng, 16), random_spd(rng, 16)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        frechet_distance(mu2, s2, mu1, s1), rel=1e-10
    )


@pytest.mark.parametrize(
    "m1,s1,m2,s2", [(0.0, 1.0, 0.0, 2.0), (1.5, 0.3, -0.5, 0.3), (2.0, 0.1, -1.0, 4.0)]
)
def test_frechet_distance_one_dimensional(m1, s1, m2, s2):
    # for 1-D Gaussians the W2 distance squared is (m1 - m2)^2 + (s1 - s2)^2 (s = std)
    got = frechet_distance(np.array([m1]), np.array([[s1**2]]), np.array([m2]), np.array([[s2**2]]))
    assert got == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-10, abs=1e-12)


def test_frechet_distance_diagonal_covariances():
    # independent dimensions: sum over dimensions of the 1-D distance
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    sd1, sd2 = np.array([1.0, 0.5, 2.0]), np.array([2.0, 0.5, 0.1])
    got = frechet_distance(m1, np.diag(sd1**2), m2, np.diag(sd2**2))
    assert got == pytest.approx(((m1 - m2) ** 2 + (sd1 - sd2) ** 2).sum(), rel=1e-10)


def test_frechet_distance_from_sampled_statistics():
    # end to end: statistics of two sample sets, compared with scipy on the same statistics
    rng = np.random.default_rng(5)
    a = rng.standard_normal((500, 8))
    b = rng.standard_normal((400, 8)) * 1.5 + 0.5
    sa, sb = FeatureStats(8), FeatureStats(8)
    sa.update(a)
    sb.update(b)
    want = textbook_fid(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma) == pytest.approx(want, rel=1e-6)


def test_frechet_distance_shape_mismatch():
    with pytest.raises(UserError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- npz files


def test_save_and_load_stats_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    mu, sigma = rng.standard_normal(5).astype(np.float32), random_spd(rng, 5)
    path = save_stats_npz(tmp_path / "sub" / "ref.npz", mu, sigma, num_samples=np.array(100))
    assert path.is_file()
    mu2, sigma2 = load_stats_npz(path)
    assert mu2.dtype == np.float64 and sigma2.dtype == np.float64
    np.testing.assert_array_equal(mu2, mu.astype(np.float64))
    np.testing.assert_array_equal(sigma2, sigma)


def test_save_stats_returns_the_written_file(tmp_path):
    # np.savez appends ".npz" to names without it; the returned path must be the file written
    mu, sigma = np.zeros(2), np.eye(2)
    path = save_stats_npz(tmp_path / "ref_stats", mu, sigma)
    assert path.is_file(), f"save_stats_npz returned {path}, but wrote {list(tmp_path.iterdir())}"
    np.testing.assert_array_equal(load_stats_npz(path)[1], sigma)


def test_load_stats_missing_keys(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, mean=np.zeros(2), cov=np.eye(2))
    with pytest.raises(UserError) as e:
        load_stats_npz(path)
    assert str(path) in str(e.value)
    # only one of the two arrays is not enough either
    path2 = tmp_path / "half.npz"
    np.savez(path2, mu=np.zeros(2))
    with pytest.raises(UserError, match="half.npz"):
        load_stats_npz(path2)


def test_load_stats_missing_file(tmp_path):
    path = tmp_path / "nope" / "ref.npz"
    with pytest.raises(UserError) as e:
        load_stats_npz(path)
    assert str(path) in str(e.value)


def test_load_stats_not_an_npz(tmp_path):
    path = tmp_path / "ref.npz"
    path.write_text("this is not numpy data")
    with pytest.raises(UserError) as e:
        load_stats_npz(path)
    assert str(path) in str(e.value)


def test_load_stats_plain_npy_file(tmp_path):
    # a single .npy array has no 'mu' and 'sigma': a user mistake, reported as such
    path = tmp_path / "mu.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(UserError) as e:
        load_stats_npz(path)
    assert str(path) in str(e.value)
