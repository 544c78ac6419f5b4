"""Blockwise PyTorch TRD engine: the fallback off CUDA. Row blocks of R tokens against all N, so memory is O(R·N).

Like the Triton kernel it never builds normalised copies of the tokens: Gram blocks of the raw tokens are scaled
by the inverse norms, and the gradient block is (g·diag(r)) @ X. Full and temporal modes visit only the upper
triangle of blocks (both Gram matrices are symmetric); spatial mode only the frames' own blocks.
"""

from typing import Optional

import torch

from .validation import TRDProblem

BLOCK_ROWS = 256


def _scaled_gram(rows, cols, r_rows, r_cols):
    """x̂_rows · x̂_colsᵀ from raw tokens and inverse norms."""
    return (rows @ cols.mT).mul_(r_rows.unsqueeze(-1)).mul_(r_cols.unsqueeze(-2))


def _pair_block(s_part, t_part, margin: float, keep: Optional[torch.Tensor], need_grad: bool):
    """relu(|Δ| − margin) over one block of pairs (0 where not kept) and, if asked, g = sign(Δ)·[|Δ| > margin].
    Each part is (row tokens, column tokens, row inverse norms, column inverse norms)."""
    delta = _scaled_gram(*s_part)
    delta -= _scaled_gram(*t_part)
    excess = delta.abs().sub_(margin)
    if keep is not None:
        excess.masked_fill_(~keep, -1.0)
    excess.clamp_min_(0.0)
    if not need_grad:
        return excess, None
    return excess, delta.sign_().mul_(excess > 0)


def _row_gradient(g, cols, r_cols):
    """Σ_j g_ij x̂_j for the block's rows."""
    return (g * r_cols.unsqueeze(-2)) @ cols


def torch_engine(problem: TRDProblem, norms_s, norms_t, need_s: bool, need_t: bool, block_rows: int = BLOCK_ROWS):
    r_s, r_t = norms_s[0], norms_t[0]
    s = problem.student.to(r_s.dtype)  # no copy for float32 inputs
    t = problem.teacher.to(r_t.dtype)
    out_s = s.new_empty(s.shape) if need_s else None
    out_t = t.new_empty(t.shape) if need_t else None
    loss = r_s.new_zeros(problem.batch)  # per clip
    tokens, frame_len = problem.tokens, problem.tokens_per_frame

    if problem.mode == "spatial":
        # Only same-frame pairs: whole frames per block, each frame against itself: O(N·T·D) work.
        step = max(1, block_rows // frame_len) * frame_len
        for start in range(0, tokens, step):
            sl = slice(start, min(tokens, start + step))
            # (B, frames, T, D) tokens and (B, frames, T) inverse norms; each frame is both rows and columns.
            sb, tb, rsb, rtb = (x[:, sl].unflatten(1, (-1, frame_len)) for x in (s, t, r_s, r_t))
            excess, g = _pair_block((sb, sb, rsb, rsb), (tb, tb, rtb, rtb), problem.margin, None, need_s or need_t)
            loss += excess.sum(dim=(1, 2, 3))
            for x, r, out in ((sb, rsb, out_s), (tb, rtb, out_t)):
                if out is not None:
                    out[:, sl] = _row_gradient(g, x, r).flatten(1, 2)
        return loss, out_s, out_t

    # Both Gram matrices are symmetric: row block [start, end) meets only columns j >= start. Its own square holds
    # both (i, j) and (j, i); every pair right of it stands for its unvisited mirror too, so it counts twice and
    # also hands the mirror's gradient to the rows of its column. Half the Gram work, no atomics, fixed order.
    for grad in (out_s, out_t):
        if grad is not None:
            grad.zero_()
    frame = torch.arange(tokens, device=s.device) // frame_len
    for start in range(0, tokens, block_rows):
        end = min(tokens, start + block_rows)
        rows, cols, size = slice(start, end), slice(start, None), end - start
        keep = frame[rows, None] != frame[None, cols] if problem.mode == "temporal" else None
        excess, g = _pair_block((s[:, rows], s[:, cols], r_s[:, rows], r_s[:, cols]),
                                (t[:, rows], t[:, cols], r_t[:, rows], r_t[:, cols]), problem.margin, keep,
                                need_s or need_t)
        loss += excess[..., :size].sum(dim=(1, 2)) + 2.0 * excess[..., size:].sum(dim=(1, 2))
        del excess
        for x, r, out in ((s, r_s, out_s), (t, r_t, out_t)):
            if out is not None:
                out[:, rows] += _row_gradient(g, x[:, cols], r[:, cols])
                out[:, end:] += _row_gradient(g[..., size:].mT, x[:, rows], r[:, rows])
    return loss, out_s, out_t
