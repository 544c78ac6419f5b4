"""Blockwise PyTorch TRD engine: the fallback off CUDA. Row blocks of R tokens against all N, so memory is O(R·N).

Like the Triton kernel it never builds normalised copies of the tokens: Gram blocks of the raw tokens are scaled
by the inverse norms, and the gradient block is (g·diag(r)) @ X.
"""

from typing import Optional

import torch

from .validation import TRDProblem

BLOCK_ROWS = 256


def _scaled_gram(rows, cols, r_rows, r_cols):
    """x̂_rows · x̂_colsᵀ from raw tokens and inverse norms."""
    return (rows @ cols.mT).mul_(r_rows.unsqueeze(-1)).mul_(r_cols.unsqueeze(-2))


def _pair_block(s_part, t_part, margin: float, keep: Optional[torch.Tensor], need_grad: bool):
    """Loss sum over one block of pairs and, if asked, g = sign(Δ)·[|Δ| > margin] on the kept pairs.
    Each part is (row tokens, column tokens, row inverse norms, column inverse norms)."""
    delta = _scaled_gram(*s_part)
    delta -= _scaled_gram(*t_part)
    excess = delta.abs().sub_(margin)
    if keep is not None:
        excess.masked_fill_(~keep, -1.0)
    loss = excess.clamp_min_(0.0).sum()
    if not need_grad:
        return loss, None
    return loss, delta.sign_().mul_(excess > 0)


def _row_gradient(g, cols, r_cols):
    """Σ_j g_ij x̂_j for the block's rows."""
    return (g * r_cols.unsqueeze(-2)) @ cols


def torch_engine(problem: TRDProblem, r_s, r_t, need_s: bool, need_t: bool, block_rows: int = BLOCK_ROWS):
    s = problem.student.to(r_s.dtype)  # no copy for float32 inputs
    t = problem.teacher.to(r_t.dtype)
    out_s = s.new_empty(s.shape) if need_s else None
    out_t = t.new_empty(t.shape) if need_t else None
    loss = r_s.new_zeros(())
    tokens, frame_len = problem.tokens, problem.tokens_per_frame

    if problem.mode == "spatial":
        # Only same-frame pairs: whole frames per block, each frame against itself: O(N·T·D) work.
        step = max(1, block_rows // frame_len) * frame_len
        for start in range(0, tokens, step):
            sl = slice(start, min(tokens, start + step))
            # (B, frames, T, D) tokens and (B, frames, T) inverse norms; each frame is both rows and columns.
            sb, tb, rsb, rtb = (x[:, sl].unflatten(1, (-1, frame_len)) for x in (s, t, r_s, r_t))
            part, g = _pair_block((sb, sb, rsb, rsb), (tb, tb, rtb, rtb), problem.margin, None, need_s or need_t)
            loss += part
            if need_s:
                out_s[:, sl] = _row_gradient(g, sb, rsb).flatten(1, 2)
            if need_t:
                out_t[:, sl] = _row_gradient(g, tb, rtb).flatten(1, 2)
        return loss, out_s, out_t

    frame = torch.arange(tokens, device=s.device) // frame_len
    for start in range(0, tokens, block_rows):
        sl = slice(start, min(tokens, start + block_rows))
        keep = frame[sl, None] != frame[None, :] if problem.mode == "temporal" else None
        part, g = _pair_block((s[:, sl], s, r_s[:, sl], r_s), (t[:, sl], t, r_t[:, sl], r_t), problem.margin, keep,
                              need_s or need_t)
        loss += part
        if need_s:
            out_s[:, sl] = _row_gradient(g, s, r_s)
        if need_t:
            out_t[:, sl] = _row_gradient(g, t, r_t)
    return loss, out_s, out_t
