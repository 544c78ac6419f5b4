"""Loss and gradient in one forward call, for the paths that produce the gradient in forward: the blockwise
PyTorch engine, the one-pass Triton kernel, and every backend when the tokens are split across processes.

An engine computes, in one pass over the token-pair tiles of the problem's rows, the per-clip loss sums and, when
asked, the unscaled gradient with respect to the normalised tokens: Σ_j g_ij x̂_j with
g_ij = sign(Δ_ij)·[|Δ_ij| > margin] over kept pairs. The loss is a scalar with no row normaliser, so that gradient
is final up to a per-clip constant that needs only the loss sums (all processes' sums, under sequence
parallelism); it is finished here, and autograd's backward only scales it by grad_output (the
fused-linear-cross-entropy idea).
"""

import functools
from typing import Callable, Optional

import torch

from .normalization import inverse_norms, normalization_backward
from .trd_torch import torch_engine
from .validation import TRDProblem

# engine(problem, need_student_grad, need_teacher_grad) -> (per-clip loss sums (B,) of the problem's rows, finish)
#   finish(clip_sums (B,)) -> (dL/dstudent, dL/dteacher) of those rows, in the inputs' dtypes, or None where not
#   asked, given the per-clip loss sums of all rows (every process's): they set the scale (see `gradient_scale`).
Finish = Callable[[torch.Tensor], tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]
Engine = Callable[[TRDProblem, bool, bool], tuple[torch.Tensor, Finish]]


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


def gradient_scale(clip_sums: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """Per clip, the factor from Σ_j g_ij x̂_j to dL/dx̂_i: 2/P, since the pair (i, j) and its mirror (j, i) both
    hold x̂_i (Δ = Ŝ − T̂ flips it for the teacher). Adding 0·(the clip's loss sum) makes the gradient of a clip
    whose loss is NaN all NaN, as PyTorch's formula gives it."""
    return clip_sums * 0.0 + 2.0 / num_pairs


def hat_engine(engine) -> Engine:
    """An engine from one that returns (loss sums, Σ_j g_ij x̂_j of the rows or None, the same for t̂), given the
    inverse norms: its finish carries that through the scale and the normalisation's backward."""

    def run(problem: TRDProblem, need_s: bool, need_t: bool):
        norms_s, norms_t = inverse_norms(problem.student), inverse_norms(problem.teacher)
        clip_sums, hat_s, hat_t = engine(problem, norms_s, norms_t, need_s, need_t)
        rows = slice(*problem.row_range)

        def finish(all_clip_sums):
            scale = gradient_scale(all_clip_sums, problem.num_pairs)
            grads = []
            for x, (r, clamped), hat, sign in ((problem.student, norms_s, hat_s, 1.0),
                                               (problem.teacher, norms_t, hat_t, -1.0)):
                if hat is None:
                    grads.append(None)
                    continue
                hat.mul_(scale.to(hat.dtype)[:, None, None] * sign)
                grads.append(normalization_backward(x[:, rows], r[:, rows], clamped[:, rows], hat).to(x.dtype))
            return tuple(grads)

        return clip_sums, finish

    return run


def engine_for(problem: TRDProblem, backend: str, schedule: str, need_s: bool, need_t: bool) -> Engine:
    """The engine of a resolved backend ("torch" or "triton") and, for triton, schedule."""
    if backend == "torch":
        return hat_engine(torch_engine)
    # Imports triton: only when asked for.
    from .triton_fused import fused_engine
    from .triton_two_pass import resolve_schedule, two_pass_engine

    if resolve_schedule(problem, schedule, need_s, need_t) == "two-pass":
        return two_pass_engine
    return hat_engine(fused_engine)


def loss_and_gradient(problem: TRDProblem, engine: Engine, need_s: bool, need_t: bool,
                      all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
    """(loss, dL/dstudent or None, dL/dteacher or None) for the problem's rows. `all_reduce` sums the per-clip
    loss sums over the processes that share the token axis, when the problem holds only this process's rows."""
    s = problem.student
    start, end = problem.row_range
    # Autocast off: under a training loop's bf16 autocast the blockwise engine's Gram blocks and the normalisation
    # backward would otherwise drop to bf16 matmuls; the inputs keep whatever dtype they arrive in.
    with torch.no_grad(), torch.autocast(s.device.type, enabled=False):
        if start < end:
            clip_sums, finish = engine(problem, need_s, need_t)
        else:  # a process holding no tokens still joins the reduction and gets its (empty) gradients
            clip_sums = torch.zeros(problem.batch, dtype=torch.float64, device=s.device)

            def finish(all_clip_sums):
                return tuple(x[:, start:end].clone() if need else None
                             for x, need in ((problem.student, need_s), (problem.teacher, need_t)))

        if all_reduce is not None:
            clip_sums = all_reduce(clip_sums.double())
        loss = (clip_sums.sum() / problem.num_pairs).float()
        grads = finish(clip_sums) if need_s or need_t else (None, None)
    return (loss, *grads)
