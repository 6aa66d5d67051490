"""LoRA generators and fake scores (``--lora-rank``, ``--fake-lora-rank``) through peft.

Any teacher whose denoiser wraps a diffusers model as ``.network`` (the Stable Diffusion kinds:
SD1.x/2.x and SDXL UNets, SD3's transformer) takes adapters: ``add_adapter(LoraConfig)``
(diffusers' PeftAdapterMixin) on a copy of the teacher's network. The base weights stay frozen (in the compute dtype under mixed
precision); only the adapters train, and only they go to the optimiser, the EMA and the
checkpoints (the base is rebuilt from the teacher on resume).

A generator file of a LoRA run holds the merged UNet (what ``sample``, ``eval-fid`` and
``export --format diffusers`` read, unchanged) and, under ``generators.ADAPTER_PREFIX``, the
adapter tensors in peft's layout with the LoRA config in the metadata (the file format:
``dmdctl/generators.py``; ``export --format lora`` writes them for ``pipe.load_lora_weights``:
``commands/export.py``, ``teachers/sd/generate.py``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import torch
from torch import nn

from dmdctl.errors import UserError
from dmdctl.generators import ADAPTER_PREFIX, LORA_META_KEY


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.targets),
            lora_dropout=0.0,
            init_lora_weights=True,
        )

    def as_meta(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_meta(cls, meta: dict) -> LoraSpec:
        return cls(int(meta["rank"]), float(meta["alpha"]), tuple(meta["targets"]))


def parse_targets(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in str(text).split(",") if t.strip())


def specs(cfg) -> tuple[LoraSpec | None, LoraSpec | None]:
    """(generator's, fake score's) LoRA of a distill config; None: full fine-tuning."""

    def one(rank):
        if not rank:
            return None
        alpha = cfg.lora_alpha if cfg.lora_alpha is not None else rank
        return LoraSpec(int(rank), float(alpha), parse_targets(cfg.lora_targets))

    return one(cfg.lora_rank), one(cfg.fake_lora_rank)


def unet_of(denoiser: nn.Module) -> nn.Module:
    """The diffusers network inside a denoiser (a UNet, or SD3's transformer)."""
    unet = getattr(denoiser, "network", None)
    if unet is None or not callable(getattr(unet, "add_adapter", None)):
        raise UserError(
            "--lora-rank / --fake-lora-rank need a Stable Diffusion teacher (a diffusers UNet); "
            "train this teacher's generator fully (leave them out)"
        )
    return unet


def check(denoiser: nn.Module, spec: LoraSpec) -> None:
    """Refuse, before anything is written, a teacher without a UNet or targets that name no
    module of it (peft matches a target as the module's name or its dotted suffix)."""
    names = [n for n, _ in unet_of(denoiser).named_modules()]
    if not any(n == t or n.endswith("." + t) for t in spec.targets for n in names):
        raise UserError(
            f"--lora-targets {','.join(spec.targets)} names no module of the UNet (give module "
            "name suffixes such as to_q,to_k,to_v,to_out.0)"
        )


def add_lora(
    denoiser: nn.Module, spec: LoraSpec, seed: int, compute: torch.dtype | None
) -> list[str]:
    """Adapters on ``denoiser.unet``; the base frozen (its weights cast to ``compute`` when
    given). Returns the trainable parameters' names. The adapters' initial weights follow
    ``seed`` (peft draws lora_A from the global RNG)."""
    unet = unet_of(denoiser)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            unet.add_adapter(spec.peft_config())
        except ValueError as e:  # no module matched --lora-targets
            raise UserError(f"--lora-targets: {str(e).splitlines()[0]}") from None
    denoiser.requires_grad_(False)
    names = []
    for n, p in denoiser.named_parameters():
        if ".lora_A." in n or ".lora_B." in n:
            p.requires_grad_(True)
            names.append(n)
        elif compute is not None and p.dtype.is_floating_point:
            p.data = p.data.to(compute)
    return names


class TrainableState:
    """The state dict of a network's trainable (LoRA) parameters only, by name: what the EMA
    averages and checkpoints hold. ``load_state_dict`` copies into the parameters, strictly."""

    def __init__(self, module: nn.Module, names: list[str]):
        self.module, self.names = module, list(names)

    def state_dict(self) -> dict[str, torch.Tensor]:
        params = dict(self.module.named_parameters())
        return {n: params[n].detach() for n in self.names}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True):
        if set(state) != set(self.names):
            missing = sorted(set(self.names) - set(state))
            extra = sorted(set(state) - set(self.names))
            raise RuntimeError(
                f"LoRA parameters differ: missing {missing[:2]}, unexpected {extra[:2]}"
            )
        params = dict(self.module.named_parameters())
        for n in self.names:
            params[n].copy_(state[n])


def adapter_state(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters in peft's layout (keys relative to the UNet, no adapter name)."""
    from peft.utils import get_peft_model_state_dict

    unet = unet_of(denoiser)
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def merged(denoiser: nn.Module) -> nn.Module:
    """A copy of ``denoiser`` with the adapters merged into plain layers, in fp32: the network
    a generator file stores."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    d = copy.deepcopy(denoiser).float()
    for m in d.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    state = {
        k.replace(".base_layer.", "."): v
        for k, v in d.state_dict().items()
        if ".lora_A." not in k and ".lora_B." not in k
    }
    unet_of(d).unload_lora()  # plain diffusers layers again
    d.load_state_dict(state)
    return d


class GeneratorFileState(nn.Module):
    """What a LoRA run's generator file holds: the merged network's state dict plus the adapter
    tensors under :data:`ADAPTER_PREFIX` (``save_generator`` calls ``state_dict`` only)."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.full = merged(denoiser)
        self.adapters = adapter_state(denoiser)
        self.sigma_max = denoiser.sigma_max

    def state_dict(self, *args, **kwargs):
        out = dict(self.full.state_dict())
        out.update({ADAPTER_PREFIX + k: v for k, v in self.adapters.items()})
        return out


def file_metadata(spec: LoraSpec) -> dict[str, str]:
    return {LORA_META_KEY: json.dumps(spec.as_meta())}


# --- the network of a LoRA checkpoint ----------------------------------------------------------
def is_lora_checkpoint(state: dict) -> bool:
    return bool((state.get("lora") or {}).get("generator"))


def checkpoint_network(
    state: dict,
    weights: dict[str, torch.Tensor],
    teacher_path: str | None = None,
    offline: bool = False,
    base: bool = True,
) -> nn.Module:
    """The generator of a LoRA checkpoint: the teacher's network (``base``; otherwise the kind's
    network with fresh weights, enough for the adapters alone) with the adapters loaded."""
    from pathlib import Path

    from dmdctl.teachers import get_kind, resolve_teacher

    spec = LoraSpec.from_meta(state["lora"]["generator"])
    if base:
        cfg = state.get("config", {})
        where = teacher_path or cfg.get("teacher_path")
        teacher = resolve_teacher(
            cfg.get("teacher"),
            Path(where) if where else None,
            offline,
            cfg.get("no_t5", False),
            cfg.get("video_size"),
        )
        if teacher.sha256 != state.get("teacher_sha256"):
            raise UserError(
                f"{where or cfg.get('teacher')} is not the teacher this LoRA run was distilled "
                "from (its sha256 differs); pass --teacher-path with the teacher's pipeline"
            )
        denoiser = teacher.denoiser
    else:
        denoiser = get_kind(state["teacher_kind"]).build(state["teacher_config"])
    names = add_lora(denoiser, spec, 0, None)
    try:
        TrainableState(denoiser, names).load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"the checkpoint's adapters do not fit its LoRA settings ({e})") from None
    return denoiser.eval().requires_grad_(False)
