"""The paper's formulation: full N×N Gram matrices and autograd. Reference and benchmark baseline; O(N²) memory."""

import torch
import torch.nn.functional as F

from .validation import TRDProblem


def naive_trd_loss(problem: TRDProblem) -> torch.Tensor:
    s = F.normalize(problem.student, dim=-1)
    t = F.normalize(problem.teacher, dim=-1)
    excess = F.relu(((s @ s.mT) - (t @ t.mT)).abs() - problem.margin)
    if problem.mode == "full":
        return excess.float().mean()
    frame = torch.arange(problem.tokens, device=s.device) // problem.tokens_per_frame
    same = frame[:, None] == frame[None, :]
    keep = same if problem.mode == "spatial" else ~same
    return excess.float()[:, keep].sum() / problem.num_pairs
