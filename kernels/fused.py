"""Glue for the backends that produce the gradient in forward (blockwise PyTorch, and the one-pass Triton kernel).

An engine computes, in one pass over the token-pair tiles, the loss sum and, when asked, the unscaled gradient
with respect to the normalised tokens: Σ_j g_ij x̂_j with g_ij = sign(Δ_ij)·[|Δ_ij| > margin] over kept pairs.
The loss is a scalar with no row normaliser, so that gradient is final up to constants; it is finished here and
handed to autograd, whose backward only scales it by grad_output (the fused-linear-cross-entropy idea).
"""

import functools
from typing import Callable, Optional

import torch

from .normalization import inverse_norms, normalization_backward
from .validation import TRDProblem

# engine(problem, (r_s, clamped_s), (r_t, clamped_t), need_student_grad, need_teacher_grad)
#   -> (per-clip loss sums (B,), Σ g ŝ or None, Σ g t̂ or None), in the inverse norms' dtype (the sums may be
#      float64)
Engine = Callable[..., tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]


def differentiable_once(backward):
    """Marks a backward as first-order only, like torch.autograd.function.once_differentiable, but also when
    grad_output needs no gradient (a loss's usual case): under create_graph=True the gradients it returns raise on
    differentiation instead of silently counting as constants in a second-order term."""

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not create_graph:
            return grads
        error = torch._C._functions.DelayedError(
            b"trd_loss is differentiable once: its gradient has no gradient (double backward)", len(grads))
        marked = [None if g is None else g.detach().requires_grad_() for g in grads]
        return error(*marked)

    return wrapper


class _PrecomputedGradient(torch.autograd.Function):
    """Returns `loss`; backward hands out gradients computed in forward, scaled by grad_output."""

    @staticmethod
    def forward(ctx, loss, student, teacher, grad_student, grad_teacher):
        ctx.save_for_backward(grad_student, grad_teacher)
        return loss

    @staticmethod
    @differentiable_once
    def backward(ctx, grad_output):
        grad_student, grad_teacher = ctx.saved_tensors
        # grad_output stays float32: the product is rounded to the gradient's dtype once.
        scaled = [None if g is None else g * grad_output for g in (grad_student, grad_teacher)]
        return None, scaled[0], scaled[1], None, None


def gradient_scale(clip_sums: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """Per clip, the factor from Σ_j g_ij x̂_j to dL/dx̂_i: 2/P, since the pair (i, j) and its mirror (j, i) both
    hold x̂_i (Δ = Ŝ − T̂ flips it for the teacher). Adding 0·(the clip's loss sum) makes the gradient of a clip
    whose loss is NaN all NaN, as PyTorch's formula gives it."""
    return clip_sums * 0.0 + 2.0 / num_pairs


def fused_trd_loss(problem: TRDProblem, engine: Engine) -> torch.Tensor:
    s, t = problem.student, problem.teacher
    grad_enabled = torch.is_grad_enabled()
    need_s, need_t = grad_enabled and s.requires_grad, grad_enabled and t.requires_grad
    # Autocast off: under a training loop's bf16 autocast the blockwise engine's Gram blocks and the normalisation
    # backward would otherwise drop to bf16 matmuls; the inputs keep whatever dtype they arrive in.
    with torch.no_grad(), torch.autocast(s.device.type, enabled=False):
        norms_s, norms_t = inverse_norms(s), inverse_norms(t)
        clip_sums, hat_s, hat_t = engine(problem, norms_s, norms_t, need_s, need_t)
        loss = (clip_sums.sum() / problem.num_pairs).float()
        scale = gradient_scale(clip_sums, problem.num_pairs).to(norms_s[0].dtype)[:, None, None]
        grad_s = normalization_backward(s, *norms_s, hat_s.mul_(scale)).to(s.dtype) if need_s else None
        grad_t = normalization_backward(t, *norms_t, hat_t.mul_(-scale)).to(t.dtype) if need_t else None
    if not (need_s or need_t):
        return loss
    return _PrecomputedGradient.apply(loss, s, t, grad_s, grad_t)
