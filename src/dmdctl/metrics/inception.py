"""Inception-v3 pool3 features (TF "inception-2015-12-05", 2048-d) through torch-fidelity.

The network is torch-fidelity's ``FeatureExtractorInceptionV3`` (a port of the TF graph used by
EDM, ADM, clean-fid and the original TTUR code). dmdctl builds it with the library's own weight
loading disabled, so torch-fidelity never downloads anything and never unpickles a file: the
weights file is checked against its known sha256 and then read with
``torch.load(weights_only=True)`` by dmdctl, and loaded with ``strict=True``.

The weights file is torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``
(release v0.2.0 of toshas/torch-fidelity). Where it is looked for:
``--inception-weights PATH``, else torch-fidelity's usual cache location
``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``
(``torch.hub.get_dir()/checkpoints``). It is never downloaded by dmdctl.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import nn

from dmdctl.errors import UserError
from dmdctl.files import sha256_file
from dmdctl.metrics.protocols import Protocol, get_protocol

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_FILENAME
)
# sha256 of torch-fidelity's weights-inception-2015-12-05-6726825d.pth (95,628,359 bytes), the
# same bytes as pytorch-fid's pt_inception-2015-12-05-6726825d.pth. Its first 8 hex digits are
# the "6726825d" of the file name (torch.hub's convention: the name carries the sha256 prefix).
# The full value is not published by torch-fidelity itself; it is the one several independent
# public projects pin for these files (e.g. a GenForce-style `_MODEL_URL_SHA256["tf_inception_v3"]`
# table for pytorch-fid's URL, and evaluation configs pinning torch-fidelity's v0.2.0 file). It
# could not be checked against the file here (no downloads); a mismatch stops with a UserError.
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FEATURE_DIM = 2048
FEATURE_NAME = "inception-2015-12-05 pool3 (2048-d)"
# the children of FeatureExtractorInceptionV3 up to pool3, in forward order
_POOL3_LAYERS = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
    "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
    "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool",
)  # fmt: skip
_NOT_LOADED = object()


def default_weights_path() -> Path:
    """torch-fidelity's cache location: torch.hub's checkpoints folder ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def library_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("torch-fidelity")
    except Exception:
        return None


def _tfi():
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as tfi
    except ImportError:
        raise UserError(
            "Inception features need torch-fidelity: pip install 'dmdctl[fid]' "
            "(or pip install torch-fidelity)"
        ) from None
    return tfi


def build_network() -> nn.Module:
    """torch-fidelity's InceptionV3 with its default (random) initialisation and no weights read.

    The library's loader is replaced while the module is built: it can neither download
    (``load_state_dict_from_url``) nor unpickle a file (``feature_extractor_weights_path`` is
    left unset, so its ``torch.load`` is never reached).
    """
    tfi = _tfi()

    class _Extractor(tfi.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):
            if state_dict is _NOT_LOADED:  # the constructor's own load: skipped
                return None
            return super().load_state_dict(state_dict, *args, **kwargs)

    def no_download(*args, **kwargs):
        return _NOT_LOADED

    with mock.patch.object(tfi, "load_state_dict_from_url", no_download):
        net = _Extractor("inception-v3-compat", ["2048"], feature_extractor_weights_path=None)
    names = tuple(n for n, _ in net.named_children())
    if names[: len(_POOL3_LAYERS)] != _POOL3_LAYERS:
        raise UserError(
            f"torch-fidelity {library_version()} has an InceptionV3 layout dmdctl does not know "
            f"({', '.join(names)}); use torch-fidelity 0.3 or 0.4"
        )
    return net.eval().requires_grad_(False)


def missing_weights_message(path: Path) -> str:
    return (
        f"Inception weights not found at {path}: put torch-fidelity's {WEIGHTS_FILENAME} "
        f"(sha256 {WEIGHTS_SHA256}, from {WEIGHTS_URL}) there, or pass --inception-weights PATH; "
        "dmdctl never downloads it"
    )


def load_network(
    weights: str | Path | None = None, sha256: str | None = None
) -> tuple[nn.Module, dict]:
    """The network with verified weights, and a record of the file (path, sha256, official)."""
    path = Path(weights) if weights else default_weights_path()
    if not path.is_file():
        raise UserError(missing_weights_message(path))
    expected = (sha256 or WEIGHTS_SHA256).strip().lower()
    got = sha256_file(path)
    if got != expected:
        hint = (
            "it is not torch-fidelity's " + WEIGHTS_FILENAME
            if sha256 is None
            else "it does not match --inception-sha256"
        )
        raise UserError(
            f"{path} has sha256 {got}, expected {expected}: {hint}. Refusing to load it "
            f"(get the file from {WEIGHTS_URL})"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise UserError(f"{path} is not a plain state dict ({str(e).splitlines()[0]})") from None
    net = build_network()
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UserError(
            f"{path}: weights do not fit torch-fidelity's InceptionV3 ({str(e).splitlines()[0]})"
        ) from None
    official = got == WEIGHTS_SHA256
    return net, {"path": str(path), "sha256": got, "official": official}


def pool3_from_normalized(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """pool3 features of network-ready input ((x - 128) / 128 at 299x299): torch-fidelity's own
    layers in their forward order, without its uint8-only input check."""
    for name in _POOL3_LAYERS:
        x = getattr(net, name)(x)
    return torch.flatten(x, 1).float()


class InceptionFeatures:
    """Features of samples or images under one protocol, in chunks of ``batch_size`` images."""

    dim = FEATURE_DIM

    def __init__(
        self,
        protocol: str | Protocol = "edm",
        weights: str | Path | None = None,
        sha256: str | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        net: nn.Module | None = None,
    ):
        self.protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
        if net is None:
            net, self.weights = load_network(weights, sha256)
        else:
            self.weights = {"path": None, "sha256": None, "official": False}
        self.device = torch.device(device)
        self.net = net.to(self.device)
        self.batch_size = batch_size

    def feature_name(self) -> str:
        return f"{FEATURE_NAME}, torch-fidelity {library_version()}"

    @torch.no_grad()
    def _run(self, kind: str, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device)
        if kind == "uint8":
            return self.net(batch)[0].float()
        return pool3_from_normalized(self.net, (batch.float() - 128) / 128)

    @torch.no_grad()
    def from_uint8(self, images: Sequence[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """Images already in uint8 (a list of HWC arrays, or an NCHW tensor)."""
        out = []
        for i in range(0, len(images), self.batch_size):
            for kind, batch in self.protocol.network_batches(images[i : i + self.batch_size]):
                out.append(self._run(kind, batch).cpu())
        if not out:
            return torch.zeros(0, self.dim)
        return torch.cat(out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Generated samples in [-1, 1] (NCHW float): quantised by the protocol first."""
        return self.from_uint8(self.protocol.to_uint8(x))
