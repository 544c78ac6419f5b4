"""Blockwise PyTorch TRD engine: the fallback off CUDA. Row blocks of R tokens against all N, so memory is O(R·N)."""

from typing import Optional

import torch

from .validation import TRDProblem

BLOCK_ROWS = 256


def _pair_block(s_rows, s_cols, t_rows, t_cols, margin: float, keep: Optional[torch.Tensor], need_grad: bool):
    """Loss sum over one block of pairs and, if asked, g = sign(Δ)·[|Δ| > margin] on the kept pairs."""
    delta = s_rows @ s_cols.mT
    delta -= t_rows @ t_cols.mT
    excess = delta.abs().sub_(margin)
    if keep is not None:
        excess.masked_fill_(~keep, -1.0)
    loss = excess.clamp_min_(0.0).sum()
    if not need_grad:
        return loss, None
    return loss, delta.sign_().mul_(excess > 0)


def torch_engine(problem: TRDProblem, r_s, r_t, need_s: bool, need_t: bool, block_rows: int = BLOCK_ROWS):
    s_hat = problem.student.to(r_s.dtype) * r_s.unsqueeze(-1)
    t_hat = problem.teacher.to(r_t.dtype) * r_t.unsqueeze(-1)
    out_s = torch.empty_like(s_hat) if need_s else None
    out_t = torch.empty_like(t_hat) if need_t else None
    loss = s_hat.new_zeros(())
    tokens, frame_len = problem.tokens, problem.tokens_per_frame

    if problem.mode == "spatial":
        # Only same-frame pairs: whole frames per block, each frame against itself: O(N·T·D) work.
        step = max(1, block_rows // frame_len) * frame_len
        for start in range(0, tokens, step):
            sl = slice(start, min(tokens, start + step))
            sb, tb = (x[:, sl].unflatten(1, (-1, frame_len)) for x in (s_hat, t_hat))  # (B, frames, T, D)
            part, g = _pair_block(sb, sb, tb, tb, problem.margin, None, need_s or need_t)
            loss += part
            if need_s:
                out_s[:, sl] = (g @ sb).flatten(1, 2)
            if need_t:
                out_t[:, sl] = (g @ tb).flatten(1, 2)
        return loss, out_s, out_t

    frame = torch.arange(tokens, device=s_hat.device) // frame_len
    for start in range(0, tokens, block_rows):
        sl = slice(start, min(tokens, start + block_rows))
        keep = frame[sl, None] != frame[None, :] if problem.mode == "temporal" else None
        part, g = _pair_block(s_hat[:, sl], s_hat, t_hat[:, sl], t_hat, problem.margin, keep, need_s or need_t)
        loss += part
        if need_s:
            out_s[:, sl] = g @ s_hat
        if need_t:
            out_t[:, sl] = g @ t_hat
    return loss, out_s, out_t
