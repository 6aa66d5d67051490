"""NVlabs EDM2 pickles read as data: the network of the ``ema`` entry and the ``encoder``.

An EDM2 network pickle (``edm2-img512-s-2147483-0.130.pkl``, a training run's
``network-snapshot-*.pkl``) is a ``dnnlib.EasyDict`` with

- ``ema``: a ``training.networks_edm2.Precond`` (``unet``: the ``UNet`` of ``Block`` /
  ``MPConv`` / ``MPFourier`` modules; ``logvar_fourier``, ``logvar_linear``), stored in float16;
- ``encoder``: ``StandardRGBEncoder`` (pixels in [-1, 1]) or ``StabilityVAEEncoder`` (the SD VAE
  named by ``vae_name``, its raw latents mapped to the model's by ``x * scale + bias``, float32
  arrays of 4 values; the VAE itself is not in the file);
- ``loss_fn`` (``EDM2Loss``) and ``dataset_kwargs``.

Every object is a persistence record (see :mod:`dmdctl.teachers.edm.pickle_loader`), read by the
same restricted unpickler as EDM's pickles, limited to EDM2's classes: nothing in the file runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dmdctl.errors import UserError
from dmdctl.teachers.edm.pickle_loader import (
    EDMCheckpoint,
    NDArrayRecord,
    PersistentRecord,
    _plain,
    read_pickle,
    read_statistics_pickle,
    state_dict_of,
)
from dmdctl.teachers.edm2.networks import GAIN_KEYS, UNET_KWARGS

PRECOND_KWARGS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data",
                  "logvar_channels")  # fmt: skip
ENCODERS = ("StandardRGBEncoder", "StabilityVAEEncoder")
# StabilityVAEEncoder's defaults (NVlabs/edm2 training/encoders.py): the VAE and the raw latent
# statistics its scale and bias come from, for files whose encoder state lacks them
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
RAW_STD = (4.17, 4.62, 3.71, 3.28)


def _floats(v, n: int, what: str, path: Path) -> list[float]:
    try:
        vals = _plain(v)
    except UserError:
        vals = None
    if isinstance(vals, (int, float)):
        vals = [float(vals)] * n
    if (
        not isinstance(vals, list)
        or len(vals) != n
        or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in vals)
    ):
        raise UserError(f"{path}: the encoder's {what} is not {n} finite numbers")
    return [float(x) for x in vals]


def encoder_config(rec, path: Path, channels: int) -> dict:
    """The ``encoder`` entry as dmdctl's teacher config records it."""
    if rec is None:  # NVIDIA's generate_images.py: no encoder means the standard RGB one
        rec_name = "StandardRGBEncoder"
    elif isinstance(rec, PersistentRecord) and rec.class_name in ENCODERS:
        rec_name = rec.class_name
    else:
        found = rec.class_name if isinstance(rec, PersistentRecord) else type(rec).__name__
        raise UserError(f"{path}: its 'encoder' is a {found}, not one of EDM2's encoders")
    if rec_name == "StandardRGBEncoder":
        if channels != 3:
            raise UserError(f"{path}: a {channels}-channel network with the RGB encoder")
        return {"class": rec_name}
    if channels != 4:
        raise UserError(f"{path}: a {channels}-channel network with the VAE encoder (4 latents)")
    state, kwargs = rec.state, rec.init_kwargs
    vae = state.get("vae_name", kwargs.get("vae_name", DEFAULT_VAE))
    if not isinstance(vae, str) or not vae:
        raise UserError(f"{path}: the encoder's vae_name is not a name")
    if "scale" in state and "bias" in state:
        scale = _floats(state["scale"], 4, "scale", path)
        bias = _floats(state["bias"], 4, "bias", path)
    else:  # the constructor's formula on its (recorded or default) arguments
        mean = _floats(kwargs.get("raw_mean", RAW_MEAN), 4, "raw_mean", path)
        std = _floats(kwargs.get("raw_std", RAW_STD), 4, "raw_std", path)
        fmean = _floats(kwargs.get("final_mean", 0.0), 4, "final_mean", path)
        fstd = _floats(kwargs.get("final_std", 0.5), 4, "final_std", path)
        scale = [f / s for f, s in zip(fstd, std, strict=True)]
        bias = [fm - m * s for fm, m, s in zip(fmean, mean, scale, strict=True)]
    if any(s == 0 for s in scale):
        raise UserError(f"{path}: the encoder's scale has a zero")
    return {"class": rec_name, "vae": vae, "scale": scale, "bias": bias}


def edm2_checkpoint_of(data, path: Path, entry: str = "ema") -> EDMCheckpoint:
    """The network under ``entry`` (and the file's encoder) as an ``edm2`` teacher config +
    state; ``data`` is the unpickled file (:func:`read_pickle` with family "EDM2")."""
    path = Path(path)
    if not isinstance(data, dict) or entry not in data:
        keys = ", ".join(sorted(map(str, data))) if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{path} has no '{entry}' network (it holds: {keys})")
    net = data[entry]
    if not isinstance(net, PersistentRecord) or net.class_name != "Precond":
        found = net.class_name if isinstance(net, PersistentRecord) else type(net).__name__
        raise UserError(f"{path}: '{entry}' is a {found}, not EDM2's Precond")
    if net.state.get("_init_args"):
        raise UserError(f"{path}: '{entry}' was built with positional arguments dmdctl cannot read")
    mods = net.state.get("_modules") or {}
    parts = {"unet": "UNet", "logvar_fourier": "MPFourier", "logvar_linear": "MPConv"}
    for name, cls in parts.items():
        m = mods.get(name)
        if not isinstance(m, PersistentRecord) or m.class_name != cls:
            raise UserError(f"{path}: '{entry}' has no {cls} '{name}' (not an EDM2 network)")
    kwargs = dict(net.init_kwargs)
    try:
        img_resolution = int(kwargs.pop("img_resolution"))
        img_channels = int(kwargs.pop("img_channels"))
        label_dim = int(kwargs.pop("label_dim"))
    except (KeyError, TypeError, ValueError):
        raise UserError(
            f"{path}: the network's init_kwargs lack img_resolution/img_channels/label_dim"
        ) from None
    use_fp16 = bool(kwargs.pop("use_fp16", True))
    sigma_data = float(kwargs.pop("sigma_data", net.state.get("sigma_data", 0.5)))
    logvar_channels = int(kwargs.pop("logvar_channels", 128))
    unknown = sorted(set(kwargs) - set(UNET_KWARGS))
    if unknown:
        raise UserError(f"{path}: unknown EDM2 network argument(s) {', '.join(unknown)}")
    model_kwargs = {k: _plain(v) for k, v in kwargs.items()}
    trained_dropout = model_kwargs.get("dropout", 0.0)
    model_kwargs["dropout"] = 0.0  # distilled without dropout; the teacher runs in eval mode
    config = {
        "img_resolution": img_resolution,
        "img_channels": img_channels,
        "label_dim": label_dim,
        "logvar_channels": logvar_channels,
        "model_kwargs": model_kwargs,
        "sigma_data": sigma_data,
        # EDM2's sampler range (generate_images.py: sigma_min 0.002, sigma_max 80)
        "sigma_min": 0.002,
        "sigma_max": 80.0,
        "encoder": encoder_config(data.get("encoder"), path, img_channels),
    }
    raw = state_dict_of(net)
    # float32 (the published files hold float16); the 0-d gains as dmdctl's 1-element vectors
    state = {
        k: v.float().reshape(1) if v.ndim == 0 and k.endswith(GAIN_KEYS) else v.float()
        for k, v in raw.items()
    }
    info = {
        "source": path.name,
        "source_class": "Precond/UNet",
        "source_persistence_version": str(net.version),
        "source_module_src_sha256": net.module_src_sha256,
        "trained_dropout": trained_dropout,
        "trained_use_fp16": use_fp16,
        "source_dtype": str(next(iter(raw.values())).dtype).replace("torch.", "") if raw else "",
    }
    return EDMCheckpoint(config, state, info)


def read_edm2_checkpoint(path: Path, entry: str = "ema") -> EDMCheckpoint:
    """An EDM2 pickle's network as an ``edm2`` teacher config + state (nothing in it runs)."""
    return edm2_checkpoint_of(read_pickle(path, "EDM2"), path, entry)


def edm2_reference(path: Path, metric: str) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(mu, sigma, number of images) of one metric ("fid" or "fd_dinov2") of an EDM2 reference
    statistics pickle (``dict(num_images=N, fid=dict(mu, sigma), fd_dinov2=dict(mu, sigma))``,
    NVlabs/edm2 calculate_metrics.py), read as data."""
    path = Path(path)
    data = read_statistics_pickle(path)
    if not isinstance(data, dict) or metric not in data:
        keys = ", ".join(sorted(map(str, data))) if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{path} holds no '{metric}' statistics (it holds: {keys})")
    entry = data[metric]
    arrays = {}
    for key in ("mu", "sigma"):
        v = entry.get(key) if isinstance(entry, dict) else None
        if not isinstance(v, NDArrayRecord) or v.array is None:
            raise UserError(f"{path}: '{metric}' has no '{key}' array")
        arrays[key] = v.array.astype(np.float64)
    mu, sigma = arrays["mu"], arrays["sigma"]
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{path}: '{metric}' has no finite 1-d mu with a matching square sigma")
    n = data.get("num_images")
    return mu, sigma, int(n) if isinstance(n, int) else None
