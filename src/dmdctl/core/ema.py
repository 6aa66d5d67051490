"""Exponential moving average of a model's parameters.

For a network sharded with FSDP (``distill --fsdp``) the shadow holds this process's shards
(``DTensor.to_local()``): the lerp is elementwise, so it gives the same numbers as on whole
tensors; training/sharding.py gathers the shadow when a whole copy is needed."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copy of the parameters, updated as ``ema = d * ema + (1 - d) * param``.

    The effective decay warms up as ``min(decay, (1 + n) / (10 + n))`` so an early EMA is not
    dominated by the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {k: _local(v).detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        shadows, values = [], []
        for k, v in model.state_dict().items():
            s, v = self.shadow[k], _local(v)
            if v.dtype.is_floating_point:
                shadows.append(s)
                values.append(v.detach().float())
            else:
                s.copy_(v)
        if shadows:
            # one multi-tensor lerp instead of one kernel launch per tensor
            torch._foreach_lerp_(shadows, values, 1 - d)

    def copy_to(self, model: nn.Module) -> nn.Module:
        ref = model.state_dict()
        model.load_state_dict({k: v.to(ref[k].dtype) for k, v in self.shadow.items()})
        return model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        for k in self.shadow:
            self.shadow[k].copy_(state[k])
        self.num_updates = int(num_updates)


def _local(v: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value's local shard; a plain tensor as it is."""
    return v.to_local() if hasattr(v, "to_local") else v
