"""`trd_loss`: argument checks, then dispatch to a backend and, for Triton, a schedule, each an operator that
torch.compile keeps whole (`ops`); with `group=`, to the sequence-parallel path (`sequence_parallel`)."""

from typing import Optional

import torch
import torch.distributed as dist

from . import ops
from .naive import naive_trd_loss
from .validation import BACKENDS, SCHEDULES, check_shard, validate

TRITON_DTYPES = {torch.float32, torch.bfloat16, torch.float16}


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, *dtypes: torch.dtype) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cuda" and set(dtypes) <= TRITON_DTYPES and _triton_available():
        return "triton"
    return "torch"


def _check_options(student, teacher, backend: str, schedule: str):
    """(the resolved backend, student, teacher): for Triton, contiguous copies of inputs whose strides its int32
    indexing cannot take ("auto" takes torch for clips of more than 2³¹ elements); bad options and inputs the
    chosen backend cannot take raise."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    chosen = resolve_backend(backend, student.device, student.dtype, teacher.dtype)
    if chosen == "triton":
        from .triton_common import check_inputs, indexable, too_large

        if backend == "auto" and (too_large(student) or too_large(teacher)):
            return "torch", student, teacher  # clips past the kernels' int32 indexing
        student, teacher = indexable(student), indexable(teacher)
        check_inputs(student, teacher)
    return chosen, student, teacher


def trd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    margin: float = 0.1,
    mode: str = "full",
    tokens_per_frame: Optional[int] = None,
    backend: str = "auto",
    schedule: str = "auto",
    group: Optional["dist.ProcessGroup"] = None,
) -> torch.Tensor:
    """Token Relation Distillation loss: mean over kept token pairs of relu(|ŝ_i·ŝ_j − t̂_i·t̂_j| − margin).

    Args:
        student: (B, N, Ds) or (N, Ds) tokens; float32, bfloat16 or float16 (float64 on the torch/naive backends).
        teacher: (B, N, Dt) or (N, Dt) tokens; Dt may differ from Ds. Gets a gradient only if it requires one.
        margin: pairs whose relation differs by at most this much cost nothing (>= 0).
        mode: "full" (all N² pairs), "spatial" (pairs within a frame), "temporal" (pairs across frames).
        tokens_per_frame: tokens in one frame (frames are consecutive runs of tokens); needed unless mode="full".
        backend: "auto" (triton on CUDA, else torch), "triton" (fused kernels), "torch" (blockwise PyTorch,
            O(N·D) memory), "naive" (full Gram matrices, the paper's formula).
        schedule: triton only. "two-pass": the upper triangle of Gram tiles in forward, keeping an int8 map of the
            active pairs (B·N²/2 bytes), and a GEMM for the gradient in backward. "fused": loss and gradient in
            one pass in O(N·D) memory, with twice the Gram work. "auto": two-pass while its map fits
            `TWO_PASS_MAX_BYTES` (4 GiB), else fused. Both are deterministic: the same bits in every run and
            process. Without a gradient to compute (no_grad, or inputs that need none) both run pass 1 alone.
        group: a torch.distributed process group across which the token axis is split (sequence parallelism):
            each process passes its contiguous slice of the N tokens, in rank order, of any size (the same B, D,
            dtypes and arguments everywhere). Every process gets the loss of the whole clips, and its slices get
            the exact gradient of that loss. Frames count on the whole token axis. Costs an all-gather of the
            tokens (no autograd) and a sum of B numbers; the gradient is computed in forward, so backward needs
            no collective. None (or a group of one process): the tokens are all here.

    Returns:
        0-dim float32 tensor. Gradients reach student (and teacher) in their own dtypes.
    """
    if group is not None:
        world = dist.get_world_size(group)
        if world < 1:
            raise ValueError("group: this process is not a member of the process group it passed")
        if world > 1:
            return _sharded_trd_loss(student, teacher, margin, mode, tokens_per_frame, backend, schedule, group)
    problem = validate(student, teacher, margin, mode, tokens_per_frame)
    chosen, s, t = _check_options(problem.student, problem.teacher, backend, schedule)
    if chosen == "naive":
        return naive_trd_loss(problem)
    need_s = torch.is_grad_enabled() and s.requires_grad
    need_t = torch.is_grad_enabled() and t.requires_grad
    arguments = (problem.margin, mode, None if mode == "full" else tokens_per_frame)
    if chosen == "triton":
        from .triton_two_pass import resolve_schedule

        schedule = resolve_schedule(problem, schedule, need_s, need_t)
        if schedule == "two-pass":
            return ops.two_pass_op(s, t, *arguments, need_s, need_t)[0]
    return ops.loss_and_gradient_op(s, t, *arguments, chosen, schedule, need_s, need_t, "")[0]


def _sharded_trd_loss(student, teacher, margin, mode, tokens_per_frame, backend, schedule, group) -> torch.Tensor:
    from .sequence_parallel import announce_failure, naive_sharded_trd_loss

    try:
        s, t = check_shard(student, teacher, margin, mode, tokens_per_frame)
        chosen, s, t = _check_options(s, t, backend, schedule)
    except (TypeError, ValueError):
        announce_failure(group, student)  # the other processes raise instead of waiting for this one
        raise
    arguments = (float(margin), mode, None if mode == "full" else tokens_per_frame)
    if chosen == "naive":
        return naive_sharded_trd_loss(s, t, *arguments, group)
    need_s = torch.is_grad_enabled() and s.requires_grad
    need_t = torch.is_grad_enabled() and t.requires_grad
    return ops.loss_and_gradient_op(s, t, *arguments, chosen, schedule, need_s, need_t, group.group_name)[0]
