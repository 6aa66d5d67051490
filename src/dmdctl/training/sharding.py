"""``distill --fsdp``: the generator and the fake score sharded with torch's FSDP2.

dmdctl calls ``torch.distributed.fsdp.fully_shard`` itself instead of asking Accelerate for
FSDP: Accelerate 1.15 runs an FSDP config as plain DDP when the processes are on the CPU, so
only this way is the sharded path the same code on a CPU (gloo) and on GPUs (nccl), and tested.
Each repeated block (diffusers UNet down/mid/up blocks, the EDM networks' encoder/decoder
blocks, an SD3 transformer's joint blocks, FLUX's double- and single-stream blocks, the blocks a
diffusers model lists as its ``_repeated_blocks``: Wan's) is one FSDP unit, then the whole
network; a small network (toy2d's MLP) is one unit. The frozen real score and the VAE are not
trained and stay whole on every process; the trained networks are not given to
``accelerator.prepare`` (it would wrap them in DDP), only their optimisers are.

Checkpoints hold *full* tensors, gathered one at a time (``DTensor.full_tensor``) in the order
of the module's ``state_dict`` and of the optimiser's own ``state_dict``: the files have
exactly the keys, shapes and layout of a DDP run's, so ``export`` and ``--resume`` read either.
Resuming cuts each full tensor to this process's shard locally (every process reads the
files; no communication).

The EMA of a sharded generator is kept on the local shards (an elementwise lerp, so the same
numbers as on whole tensors) and gathered when a checkpoint, a sample plot, an evaluation or
the generator file needs it (:func:`gather_state`).
"""

from __future__ import annotations

import torch
from torch import nn

from dmdctl.training.speed import repeated_blocks


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t) -> bool:
    return isinstance(t, _dtensor())


def ensure_process_group(device: torch.device) -> None:
    """A 1-process run (no launcher) has no process group; FSDP needs one (of size 1)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def mesh(device: torch.device):
    """All processes of the launch, one dimension (plain FSDP, no hybrid sharding)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    ensure_process_group(device)
    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard_units(net: nn.Module) -> list[nn.Module]:
    """The blocks sharded one by one before the whole network."""
    blocks = repeated_blocks(net)
    if blocks:
        return blocks
    for m in net.modules():
        tb = getattr(m, "transformer_blocks", None)  # SD3's MMDiT, FLUX's (diffusers)
        if isinstance(tb, nn.ModuleList) and len(tb):
            return [*tb, *getattr(m, "single_transformer_blocks", [])]
    for m in net.modules():
        # a diffusers model that names its repeated block classes (Wan's transformer blocks)
        names = getattr(type(m), "_repeated_blocks", None)
        if names:
            return [b for b in m.modules() if type(b).__name__ in names]
    return []


def shard(net: nn.Module, device_mesh) -> int:
    """``fully_shard`` each repeated block, then ``net``; returns the number of units."""
    from torch.distributed.fsdp import fully_shard

    units = shard_units(net)
    for block in units:
        fully_shard(block, mesh=device_mesh)
    fully_shard(net, mesh=device_mesh)
    return len(units) + 1


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor; a whole tensor as it is."""
    return t.to_local() if is_sharded(t) else t


def gather(t: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """The full tensor on the CPU (a collective for a sharded one: every process calls it);
    ``keep``: whether this process wants the result (the others get None)."""
    if is_sharded(t):
        t = t.full_tensor()
    return t.detach().cpu().contiguous() if keep else None


def gather_state(state: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Full tensors of a state dict (collective; in the dict's order, the same everywhere)."""
    out = {k: gather(v, keep) for k, v in state.items()}
    return out if keep else {}


def gather_optimizer(opt: torch.optim.Optimizer, keep: bool) -> dict:
    """The optimiser's own ``state_dict`` with every sharded state tensor made whole
    (the layout :func:`~dmdctl.training.checkpoint.flatten_optimizer` writes for DDP runs)."""
    sd = opt.state_dict()
    state = {
        pid: {name: gather(v, keep) if torch.is_tensor(v) else v for name, v in per.items()}
        for pid, per in sd["state"].items()
    }
    return {"state": state, "param_groups": sd["param_groups"]} if keep else {}


def cut_like(full: torch.Tensor, like: torch.Tensor, keep_dtype: bool = False) -> torch.Tensor:
    """``full`` as ``like`` holds it: this process's shard (a DTensor) of a sharded ``like``."""
    full = full.to(like.device) if keep_dtype else full.to(like.device, like.dtype)
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every process has the full tensor; each keeps its own chunk
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def load_module(net: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Load a full state dict into a sharded network (strict, as ``load_state_dict``)."""
    ref = net.state_dict()
    net.load_state_dict({k: cut_like(v, ref[k]) if k in ref else v for k, v in full.items()})


def shard_optimizer_state(opt: torch.optim.Optimizer, full: dict) -> dict:
    """A full optimiser state dict cut to the shards of ``opt``'s parameters (by position)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for pid, per in full["state"].items():
        p = params[int(pid)] if int(pid) < len(params) else None
        state[pid] = {
            name: cut_like(v, p)
            if p is not None and torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape)
            else v
            for name, v in per.items()
        }
    return {"state": state, "param_groups": full["param_groups"]}


def gather_like(shards: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], keep: bool) -> dict:
    """Whole tensors from local shards laid out as the (sharded) ``ref`` (the EMA shadow of a
    sharded network). Collective."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in shards.items():
        r = ref[k]
        if is_sharded(r):
            v = DTensor.from_local(v, r.device_mesh, r.placements, shape=r.shape, stride=r.stride())
        out[k] = gather(v, keep)
    return out if keep else {}


def cut_state_like(full: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict:
    """Local shards of whole tensors, cut as ``ref`` is sharded (their own dtype kept)."""
    return {k: local(cut_like(v, ref[k], keep_dtype=True)) for k, v in full.items()}


def reshard(*nets: nn.Module | None) -> None:
    """Put the sharded parameters back in place. FSDP2 leaves a root module's gathered
    parameters registered after a forward pass until its backward pass (or this): a forward
    without one (a no-grad probe) would otherwise leave ``parameters()`` and ``state_dict()``
    naming whole tensors that the optimiser does not hold."""
    from torch.distributed.fsdp import FSDPModule

    for net in nets:
        if isinstance(net, FSDPModule):
            net.reshard()
