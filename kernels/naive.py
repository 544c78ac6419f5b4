"""The paper's formulation: full N×N Gram matrices and autograd. Reference and benchmark baseline; O(N²) memory."""

from typing import Callable

import torch
import torch.nn.functional as F

from .fused import differentiable_once
from .normalization import compute_dtype
from .validation import TRDProblem


def _normalize(x: torch.Tensor) -> torch.Tensor:
    # Norms in float32, as the fused backends take them: in float16, F.normalize's eps (1e-12) rounds to 0, so a
    # zero token becomes 0/0 and its NaN reaches every token's gradient through the Gram matrix.
    return F.normalize(x.to(compute_dtype(x)), dim=-1).to(x.dtype)


def _kept_sum(problem: TRDProblem, s_rows, t_rows, s_cols, t_cols) -> torch.Tensor:
    """Σ relu(|Ŝ − T̂| − margin), in float32 (float64 for float64 inputs), over the pairs the mode keeps: the
    problem's rows against all columns."""
    excess = F.relu(((s_rows @ s_cols.mT) - (t_rows @ t_cols.mT)).abs() - problem.margin)
    excess = excess.to(compute_dtype(excess))
    keep = problem.kept_pairs(slice(*problem.row_range), slice(None))
    return excess.sum() if keep is None else excess[:, keep].sum()


def naive_trd_loss(problem: TRDProblem) -> torch.Tensor:
    s = _normalize(problem.student)
    t = _normalize(problem.teacher)
    # The float32 loss is the last step: dividing a float32 sum by the pair count would round 1/P in the gradient.
    return (_kept_sum(problem, s, t, s, t) / problem.num_pairs).float()


class _Doubled(torch.autograd.Function):
    """2·x, first-order only."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    @differentiable_once
    def backward(ctx, grad):
        return (2 * grad,)


def naive_shard_trd_loss(problem: TRDProblem, student_rows: torch.Tensor, teacher_rows: torch.Tensor,
                         all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The formula when the tokens are split across processes: `problem` holds every token as data, and this
    process's rows (`student_rows`, `teacher_rows`, which carry autograd) meet all of them. `all_reduce` sums over
    the processes. Each pair (j, i) of another process's rows holds these rows' tokens as columns and gives them
    the gradient that (i, j) gives them as rows (both Gram matrices are symmetric), so the rows' own gradient,
    doubled, is the exact one; the columns stay constants."""
    own = _kept_sum(problem, _normalize(student_rows), _normalize(teacher_rows), _normalize(problem.student),
                    _normalize(problem.teacher))
    total = all_reduce(own.detach().double()).to(own.dtype)
    return ((total + (_Doubled.apply(own) - 2 * own.detach())) / problem.num_pairs).float()
