"""Data parallelism for train.py: DDP (replicated weights) or FSDP (weights, gradients and optimizer state sharded
across ranks, for full finetunes too big to replicate, like CogVideoX-5B), and full-state save/restore that works
the same for a plain, a DDP and an FSDP model.
"""

import contextlib
import datetime

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
# How long ranks wait for work that only some of them do; a rank that fails ends the wait at once (its peers see
# the connection close, and torchrun stops the others).
RANK_LOCAL_WORK_LIMIT = datetime.timedelta(days=1)


def init_process_groups(backend: str, timeout_s: int):
    """The default process group, whose collectives time out after `timeout_s`, and a CPU (gloo) group for waiting
    at a barrier while some ranks work alone (rank 0 writing validation videos, checkpoints or the final weights;
    the feature cache filled unevenly): an unbounded phase there must not meet the collective timeout."""
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return torch.distributed.new_group(backend="gloo", timeout=RANK_LOCAL_WORK_LIMIT)


def wait_for_everyone(waiting) -> None:
    """Barrier in the group from init_process_groups; a no-op for a single process (None)."""
    if waiting is not None:
        torch.distributed.barrier(group=waiting)


def shard(model: torch.nn.Module, device: torch.device, world: int) -> None:
    """FSDP2 in place: each transformer block is a shard unit, the transformer's remaining layers another (so the
    pipeline can call the transformer alone, for validation videos), the alignment heads the root's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for block in model.transformer.transformer_blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model.transformer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def wrap(model: torch.nn.Module, mode: str, device: torch.device, world: int, find_unused: bool):
    """The module to call for training: the model itself (single process, or FSDP, which shards in place) or DDP."""
    if mode == "fsdp":
        shard(model, device, world)
        return model
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused)
    return model


def no_gradient_sync(trained, mode: str):
    """Context for gradient-accumulation micro-steps that must not all-reduce yet."""
    if mode == "ddp":
        return trained.no_sync()
    if mode == "fsdp":
        return _fsdp_no_sync(trained)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def gather_state(model: torch.nn.Module, optimizer=None):
    """(trainable weights, optimizer state), full and on CPU, keyed by parameter name. A collective under FSDP:
    every rank calls it; ranks other than 0 get empty dicts."""
    names = trainable_names(model)
    weights = {k: v.contiguous() for k, v in get_model_state_dict(model, options=FULL).items() if k in names}
    optim = get_optimizer_state_dict(model, optimizer, options=FULL) if optimizer is not None else None
    return weights, optim


def restore_state(model: torch.nn.Module, optimizer, weights: dict, optim: dict) -> None:
    """Inverse of gather_state; every rank passes the full state."""
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True))
