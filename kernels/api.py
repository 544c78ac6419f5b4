"""`trd_loss`: argument checks, then dispatch to a backend and, for Triton, a schedule."""

from typing import Optional

import torch

from .fused import fused_trd_loss
from .naive import naive_trd_loss
from .trd_torch import torch_engine
from .validation import BACKENDS, SCHEDULES, validate

# schedule="auto" takes the two-pass schedule while what it keeps between its passes fits this budget: the int8
# pair map (B·N²/2 bytes) and, per gradient, radial partials of 1/16 of that (128-token tiles). At B = 4,
# N = 3,600 that is 28.5 + 1.8 MB; at B = 1, N = 32,400, 531 + 33 MB; the budget holds B·N² up to ~8e9.
TWO_PASS_MAX_BYTES = 4 << 30
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


def trd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    margin: float = 0.1,
    mode: str = "full",
    tokens_per_frame: Optional[int] = None,
    backend: str = "auto",
    schedule: str = "auto",
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

    Returns:
        0-dim float32 tensor. Gradients reach student (and teacher) in their own dtypes.
    """
    problem = validate(student, teacher, margin, mode, tokens_per_frame)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    chosen = resolve_backend(backend, problem.student.device, problem.student.dtype, problem.teacher.dtype)
    if chosen == "naive":
        return naive_trd_loss(problem)
    if chosen == "torch":
        return fused_trd_loss(problem, torch_engine)
    # Imports triton: only when asked for.
    from .triton_fused import fused_engine
    from .triton_two_pass import pair_map_bytes, two_pass_trd_loss

    need_s = torch.is_grad_enabled() and problem.student.requires_grad
    need_t = torch.is_grad_enabled() and problem.teacher.requires_grad
    if schedule == "auto":
        schedule = "two-pass" if pair_map_bytes(problem, need_s, need_t) <= TWO_PASS_MAX_BYTES else "fused"
    if schedule == "two-pass" or not (need_s or need_t):  # the loss alone: pass 1 without a map is the least work
        return two_pass_trd_loss(problem)
    return fused_trd_loss(problem, fused_engine)
