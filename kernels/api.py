"""`trd_loss`: argument checks, then dispatch to a backend."""

import functools
from typing import Optional

import torch

from .fused import fused_trd_loss
from .naive import naive_trd_loss
from .trd_torch import torch_engine
from .validation import BACKENDS, validate


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cuda" and dtype != torch.float64 and _triton_available():
        return "triton"
    return "torch"


def trd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    margin: float = 0.1,
    mode: str = "full",
    tokens_per_frame: Optional[int] = None,
    backend: str = "auto",
    deterministic: bool = True,
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
        deterministic: triton only. True: every program owns its gradient rows, bitwise reproducible. False: visit
            only the upper-triangle tiles (half the Gram work) and add the mirrored gradient with float atomics.

    Returns:
        0-dim float32 tensor. Gradients reach student (and teacher) in their own dtypes.
    """
    problem = validate(student, teacher, margin, mode, tokens_per_frame)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    chosen = resolve_backend(backend, problem.student.device, problem.student.dtype)
    if chosen == "naive":
        return naive_trd_loss(problem)
    if chosen == "torch":
        return fused_trd_loss(problem, torch_engine)
    from .trd_triton import triton_engine  # imports triton: only when asked for

    return fused_trd_loss(problem, functools.partial(triton_engine, deterministic=deterministic))
