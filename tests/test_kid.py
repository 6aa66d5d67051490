"""KID against torch-fidelity's implementation, and the bounded feature reservoir behind it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmdctl.errors import UserError
from dmdctl.metrics.kid import KID_SEED, Reservoir, kid, polynomial_mmd2_unbiased

tf_kid = pytest.importorskip("torch_fidelity.metric_kid")


def feats(n, d, seed, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) * scale + shift


def torch_fidelity_kid(f1, f2, subsets, size, seed=KID_SEED):
    out = tf_kid.kid_features_to_metric(
        torch.from_numpy(f1), torch.from_numpy(f2),
        kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False,
    )  # fmt: skip
    return out[tf_kid.KEY_METRIC_KID_MEAN], out[tf_kid.KEY_METRIC_KID_STD]


@pytest.mark.parametrize("n1,n2,d,size", [(300, 250, 32, 100), (500, 500, 64, 200)])
def test_kid_equals_torch_fidelity(n1, n2, d, size):
    f1, f2 = feats(n1, d, 0), feats(n2, d, 1, shift=0.2, scale=1.1)
    want_mean, want_std = torch_fidelity_kid(f1, f2, 20, size)
    got = kid(f1, f2, subsets=20, subset_size=size)
    assert got["kid"] == pytest.approx(want_mean, rel=1e-10)
    assert got["kid_std"] == pytest.approx(want_std, rel=1e-10)
    assert got["kid_subset_size"] == size and got["kid_subsets"] == 20


def test_mmd_estimate_equals_torch_fidelity_kernel_and_mmd2():
    x, y = feats(50, 16, 2), feats(50, 16, 3, shift=0.5)
    k = tf_kid.kernel_poly  # (x y^T / d + 1)^3 with torch-fidelity's defaults
    kw = dict(kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
    want = tf_kid.mmd2(k(x, x, **kw), k(x, y, **kw), k(y, y, **kw))
    assert polynomial_mmd2_unbiased(x, y) == pytest.approx(want, rel=1e-12)


def test_kid_defaults_and_subset_cap():
    f1, f2 = feats(120, 8, 4), feats(90, 8, 5)
    got = kid(f1, f2)  # defaults: 100 subsets of 1000, capped at the smaller set
    assert got["kid_subsets"] == 100 and got["kid_subset_size"] == 90
    want_mean, want_std = torch_fidelity_kid(f1, f2, 100, 90)
    assert got["kid"] == pytest.approx(want_mean, rel=1e-10)
    assert got["kid_std"] == pytest.approx(want_std, rel=1e-10)


def test_kid_near_zero_for_the_same_distribution_and_positive_otherwise():
    same = kid(feats(400, 16, 6), feats(400, 16, 7), subsets=20, subset_size=200)
    apart = kid(feats(400, 16, 6), feats(400, 16, 8, shift=1.0), subsets=20, subset_size=200)
    assert abs(same["kid"]) < 3 * same["kid_std"] + 1e-3
    assert apart["kid"] > 10 * max(abs(same["kid"]), same["kid_std"])


def test_kid_rejects_bad_inputs():
    with pytest.raises(UserError):
        kid(feats(10, 4, 0), feats(10, 5, 0))
    with pytest.raises(UserError):
        kid(feats(1, 4, 0), feats(10, 4, 0))


# ---------------------------------------------------------------- reservoir


def stream(res: Reservoir, f: np.ndarray, batches=(7, 30, 1, 100)):
    lo = 0
    for b in batches * 100:
        if lo >= len(f):
            break
        res.update(f[lo : lo + b], np.arange(lo, min(lo + b, len(f))))
        lo += b


def test_reservoir_below_cap_keeps_everything_in_order():
    f = feats(150, 3, 9).astype(np.float32)
    res = Reservoir(3, cap=200)
    stream(res, f)
    assert res.n_seen == 150
    np.testing.assert_array_equal(res.features, f)


def test_reservoir_is_bounded_and_uniform():
    n, cap, trials = 200, 20, 400
    f = np.arange(n, dtype=np.float32)[:, None]
    hits = np.zeros(n)
    for t in range(trials):
        res = Reservoir(1, cap=cap, seed=t)
        stream(res, f)
        assert res.rows.shape == (cap, 1) and res.n_seen == n
        kept = res.features[:, 0].astype(int)
        assert len(set(kept)) == cap and np.all(np.diff(kept) > 0)
        hits[kept] += 1
    # each row is kept with probability cap / n = 0.1: 40 expected hits of 400 trials
    expected = trials * cap / n
    assert abs(hits[: n // 2].mean() - expected) < 4 and abs(hits[n // 2 :].mean() - expected) < 4
    chi2 = ((hits - expected) ** 2 / expected).sum()
    assert chi2 < 1.5 * n  # ~n for a uniform sample; a biased one is far larger


def test_reservoir_merge_equals_one_stream_below_cap():
    f = feats(90, 4, 10).astype(np.float32)
    whole, a, b = Reservoir(4, 100), Reservoir(4, 100, seed=1), Reservoir(4, 100, seed=2)
    whole.update(f)
    # two processes taking alternate batches of 10
    for k, lo in enumerate(range(0, 90, 10)):
        (a if k % 2 == 0 else b).update(f[lo : lo + 10], np.arange(lo, lo + 10))
    merged = Reservoir.merge([a, b])
    np.testing.assert_array_equal(merged.features, whole.features)
    assert merged.n_seen == 90


def test_reservoir_merge_above_cap_is_proportional():
    counts = np.zeros(2)
    for t in range(200):
        a, b = Reservoir(1, 10, seed=t), Reservoir(1, 10, seed=1000 + t)
        a.update(np.zeros((300, 1)), np.arange(300))
        b.update(np.ones((100, 1)), np.arange(300, 400))
        m = Reservoir.merge([a, b], seed=t)
        assert m.rows.shape == (10, 1) and m.n_seen == 400
        counts += [np.sum(m.rows == 0), np.sum(m.rows == 1)]
    assert counts[0] / counts.sum() == pytest.approx(0.75, abs=0.04)
