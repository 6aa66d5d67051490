import numpy as np
import torch

from dmdctl.teachers import get_kind, preset_config


def test_reference_moments_match_samples_of_the_mixture():
    for preset in ("toy2d", "toy2d-unbalanced"):
        kind, cfg = preset_config(preset)
        x, _ = kind.sample_data(cfg, 200_000, torch.Generator().manual_seed(0))
        mu, sigma, _ = kind.reference_stats(cfg)
        xs = x.double().numpy()
        np.testing.assert_allclose(xs.mean(0), mu, atol=5e-3)
        np.testing.assert_allclose(np.cov(xs, rowvar=False), sigma, atol=5e-3)


def test_unbalanced_preset_has_unequal_mode_shares():
    kind, cfg = preset_config("toy2d-unbalanced")
    x, _ = kind.sample_data(cfg, 50_000, torch.Generator().manual_seed(0))
    from dmdctl.teachers.toy2d import mode_centers

    share = torch.bincount(torch.cdist(x, mode_centers(cfg)).argmin(1), minlength=8).float() / len(
        x
    )
    assert share[0] > 0.22 and share[7] < 0.06


def test_quality_metrics_tell_sharp_modes_from_collapse():
    kind, cfg = preset_config("toy2d")
    data, _ = kind.sample_data(cfg, 20_000, torch.Generator().manual_seed(1))
    good = kind.quality_metrics(cfg, data)
    assert good["modes_covered"] == 8
    # for a 2-D isotropic Gaussian, P(|x| <= 3 std) = 1 - exp(-4.5)
    assert abs(good["frac_within_3std"] - (1 - np.exp(-4.5))) < 0.005
    collapsed = kind.quality_metrics(cfg, torch.zeros(1000, 2))
    assert collapsed["modes_covered"] == 0 and collapsed["frac_within_3std"] == 0
    one_mode = kind.quality_metrics(cfg, data[torch.cdist(data, data[:1]).squeeze(1) < 0.3])
    assert one_mode["modes_covered"] == 1
    blurred = kind.quality_metrics(
        cfg, data + 0.3 * torch.randn(data.shape, generator=torch.Generator().manual_seed(2))
    )
    assert blurred["frac_within_3std"] < 0.2


def test_registry_knows_presets():
    assert get_kind("toy2d-unbalanced").name == "toy2d"
