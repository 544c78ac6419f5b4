"""The paper's formulation: full N×N Gram matrices and autograd. Reference and benchmark baseline; O(N²) memory."""

import torch
import torch.nn.functional as F

from .normalization import compute_dtype
from .validation import TRDProblem


def _normalize(x: torch.Tensor) -> torch.Tensor:
    # Norms in float32, as the fused backends take them: in float16, F.normalize's eps (1e-12) rounds to 0, so a
    # zero token becomes 0/0 and its NaN reaches every token's gradient through the Gram matrix.
    return F.normalize(x.to(compute_dtype(x)), dim=-1).to(x.dtype)


def naive_trd_loss(problem: TRDProblem) -> torch.Tensor:
    s = _normalize(problem.student)
    t = _normalize(problem.teacher)
    excess = F.relu(((s @ s.mT) - (t @ t.mT)).abs() - problem.margin)
    if problem.mode == "full":
        return excess.float().mean()
    frame = torch.arange(problem.tokens, device=s.device) // problem.tokens_per_frame
    same = frame[:, None] == frame[None, :]
    keep = same if problem.mode == "spatial" else ~same
    return excess.float()[:, keep].sum() / problem.num_pairs
