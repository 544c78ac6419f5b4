"""Glue shared by the fused backends (Triton and blockwise PyTorch).

An engine computes, in one pass over the token-pair tiles, the loss sum and, when asked, the unscaled gradient
with respect to the normalised tokens: Σ_j g_ij x̂_j with g_ij = sign(Δ_ij)·[|Δ_ij| > margin] over kept pairs.
The loss is a scalar with no row normaliser, so that gradient is final up to constants; it is finished here and
handed to autograd, whose backward only scales it by grad_output (the fused-linear-cross-entropy idea).
"""

from typing import Callable, Optional

import torch

from .normalization import inverse_norms, normalization_backward
from .validation import TRDProblem

# engine(problem, inv_norm_student, inv_norm_teacher, need_student_grad, need_teacher_grad)
#   -> (loss_sum, Σ g ŝ or None, Σ g t̂ or None), all in the inverse norms' dtype
Engine = Callable[..., tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]


class _PrecomputedGradient(torch.autograd.Function):
    """Returns `loss`; backward hands out gradients computed in forward, scaled by grad_output."""

    @staticmethod
    def forward(ctx, loss, student, teacher, grad_student, grad_teacher):
        ctx.save_for_backward(grad_student, grad_teacher)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_student, grad_teacher = ctx.saved_tensors
        scaled = [None if g is None else g * grad_output.to(g.dtype) for g in (grad_student, grad_teacher)]
        return None, scaled[0], scaled[1], None, None


def fused_trd_loss(problem: TRDProblem, engine: Engine) -> torch.Tensor:
    s, t = problem.student, problem.teacher
    grad_enabled = torch.is_grad_enabled()
    need_s, need_t = grad_enabled and s.requires_grad, grad_enabled and t.requires_grad
    # Autocast off: under a training loop's bf16 autocast the blockwise engine's Gram blocks and the normalisation
    # backward would otherwise drop to bf16 matmuls; the inputs keep whatever dtype they arrive in.
    with torch.no_grad(), torch.autocast(s.device.type, enabled=False):
        r_s, clamped_s = inverse_norms(s)
        r_t, clamped_t = inverse_norms(t)
        loss_sum, hat_s, hat_t = engine(problem, r_s, r_t, need_s, need_t)
        loss = (loss_sum / problem.num_pairs).float()
        # dL/dŝ_i = (2/P) Σ_j g_ij ŝ_j: the pair (i, j) and its mirror (j, i) both hold ŝ_i. Δ = Gs − Gt flips the
        # sign for the teacher.
        scale = 2.0 / problem.num_pairs
        grad_s = normalization_backward(s, r_s, clamped_s, hat_s.mul_(scale)).to(s.dtype) if need_s else None
        grad_t = normalization_backward(t, r_t, clamped_t, hat_t.mul_(-scale)).to(t.dtype) if need_t else None
    if not (need_s or need_t):
        return loss
    return _PrecomputedGradient.apply(loss, s, t, grad_s, grad_t)
