"""Precision/recall/density/coverage, KID intervals and the separation rule, on sets whose answer
is known: identical sets, far-apart sets, a collapsed generator, two draws of one Gaussian."""

from __future__ import annotations

import numpy as np
import pytest

from dmdctl.errors import UserError
from dmdctl.metrics.intervals import (
    bootstrap_mean_interval,
    compare_intervals,
    hull,
    kid_bootstrap,
    separated,
    standardize,
)
from dmdctl.metrics.kid import kid, polynomial_mmd2_unbiased
from dmdctl.metrics.prdc import knn_radii, prdc, prdc_bootstrap


def gauss(n, d, seed, shift=0.0, scale=1.0):
    return np.random.default_rng(seed).standard_normal((n, d)) * scale + shift


def test_identical_sets_score_one_everywhere():
    x = gauss(400, 8, 0)
    r = prdc(x, x.copy())
    assert r["precision"] == 1.0 and r["recall"] == 1.0 and r["coverage"] == 1.0
    assert r["density"] >= 1.0  # each point is in its own ball and in its neighbours'


def test_far_apart_sets_score_zero():
    r = prdc(gauss(300, 8, 0), gauss(300, 8, 1, shift=100.0))
    assert r["precision"] == 0.0 and r["recall"] == 0.0
    assert r["density"] == 0.0 and r["coverage"] == 0.0


def test_collapsed_generator_is_precise_but_has_low_recall():
    real = gauss(1000, 4, 0)
    # a generator that only produces points near one real sample: sharp, no diversity
    collapsed = real[0] + 0.01 * gauss(1000, 4, 1)
    r = prdc(real, collapsed)
    assert r["precision"] > 0.95
    assert r["recall"] < 0.05 and r["coverage"] < 0.05
    # a blurred but diverse generator: the opposite
    blurred = gauss(1000, 4, 2, scale=3.0)
    b = prdc(real, blurred)
    assert b["recall"] > 0.9 and b["precision"] < 0.5


def test_same_distribution_scores_near_one_and_chunking_does_not_change_anything():
    real, fake = gauss(600, 4, 0), gauss(600, 4, 1)
    r = prdc(real, fake)
    for name in ("precision", "recall", "coverage"):
        assert 0.8 < r[name] <= 1.0, (name, r[name])
    assert 0.7 < r["density"] < 1.3
    small = prdc(real, fake, chunk=37)
    assert {k: small[k] for k in r} == r


def test_knn_radii_are_the_kth_nearest_other_point():
    x = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    np.testing.assert_allclose(knn_radii(x, k=1), [1, 1, 2, 3, 4])
    np.testing.assert_allclose(knn_radii(x, k=2), [3, 2, 3, 4, 7])
    with pytest.raises(UserError, match="at least 4 samples"):
        knn_radii(x[:3], k=3)


def test_prdc_bootstrap_intervals_hold_the_estimate():
    r = prdc(gauss(500, 4, 0), gauss(500, 4, 1, shift=0.5), per_sample=True)
    ivs = prdc_bootstrap(r, rounds=100)
    for name, (lo, hi) in ivs.items():
        assert lo <= r[name] <= hi and hi - lo > 0, name


def test_kid_of_two_draws_of_one_gaussian_has_an_interval_holding_zero():
    a, b = gauss(800, 16, 0), gauss(600, 16, 1)
    res = kid_bootstrap(a, b, rounds=200)
    lo, hi = res["kid_interval"]
    assert lo < 0 < hi
    apart = kid_bootstrap(a, gauss(600, 16, 2, shift=0.5), rounds=200)
    assert apart["kid_interval"][0] > 0  # a real difference is separated from 0
    assert compare_intervals(res["kid_interval"], apart["kid_interval"]) == "lower"


def test_kid_on_all_features_is_the_unbiased_estimate():
    a, b = gauss(300, 8, 3), gauss(300, 8, 4, shift=0.2)
    res = kid_bootstrap(a, b, rounds=20)
    assert res["kid_all"] == pytest.approx(polynomial_mmd2_unbiased(a, b), rel=1e-10)
    # on one subset holding every feature, the subset KID is the same number
    assert kid(a, b, subsets=1, subset_size=300)["kid"] == pytest.approx(res["kid_all"], rel=1e-10)


def test_standardize_makes_kid_of_large_features_sane_and_keeps_neighbours():
    # features like the digits classifier's: large norms, so x.y/d is ~50 and raw KID explodes
    a, b = gauss(300, 16, 0, shift=7.0, scale=3.0), gauss(300, 16, 1, shift=7.0, scale=3.0)
    raw = kid(a, b, subsets=10, subset_size=200)
    ra, sb = standardize(a, b)
    std = kid(ra, sb, subsets=10, subset_size=200)
    assert abs(raw["kid"]) > 100 * abs(std["kid"])
    assert abs(ra.mean(0)).max() < 1e-9 and ra.var(0, ddof=1).mean() == pytest.approx(1.0)
    assert prdc(a, b) == prdc(ra, sb)  # one scale for all dimensions: same neighbours


def test_separation_rule():
    assert compare_intervals([0, 1], [2, 3]) == "lower"
    assert compare_intervals([2, 3], [0, 1]) == "higher"
    assert compare_intervals([0, 2], [1, 3]) == "not separated"
    assert compare_intervals([0, 1], [1, 2]) == "not separated"  # touching is not separated
    assert separated([0, 1], [1.5, 2]) and not separated([0, 1], [0.5, 2])
    assert hull([[0, 1], [0.5, 3], [-1, 0]]) == [-1, 3]


def test_bootstrap_mean_interval_covers_the_mean():
    v = np.random.default_rng(0).random(1000)
    lo, hi = bootstrap_mean_interval(v, rounds=200)
    assert lo < v.mean() < hi and hi - lo < 0.1
