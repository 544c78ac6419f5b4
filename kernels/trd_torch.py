"""Blockwise PyTorch TRD engine: the fallback off CUDA. Row blocks of R tokens against all N, so memory is O(R·N).

Like the Triton kernel it never builds normalised copies of the tokens: Gram blocks of the raw tokens are scaled
by the inverse norms, and the gradient block is (g·diag(r)) @ X. Full and temporal modes visit only the upper
triangle of blocks (both Gram matrices are symmetric); spatial mode only the frames' own blocks. A share of the
rows (sequence parallelism) goes against all columns, each pair once.
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


def _spatial_frames(problem, s, t, r_s, r_t, start, end, out_s, out_t, loss, need_grad, block_rows):
    """Rows [start, end), whole frames only, each frame against itself: O(N·T·D) work. Gradients go to
    out[:, start − offset ...], where offset is the first row the outputs hold."""
    frame_len = problem.tokens_per_frame
    offset = problem.row_range[0]
    step = max(1, block_rows // frame_len) * frame_len
    for first in range(start, end, step):
        sl = slice(first, min(end, first + step))
        # (B, frames, T, D) tokens and (B, frames, T) inverse norms; each frame is both rows and columns.
        sb, tb, rsb, rtb = (x[:, sl].unflatten(1, (-1, frame_len)) for x in (s, t, r_s, r_t))
        excess, g = _pair_block((sb, sb, rsb, rsb), (tb, tb, rtb, rtb), problem.margin, None, need_grad)
        loss += excess.sum(dim=(1, 2, 3))
        out_rows = slice(sl.start - offset, sl.stop - offset)
        for x, r, out in ((sb, rsb, out_s), (tb, rtb, out_t)):
            if out is not None:
                out[:, out_rows] = _row_gradient(g, x, r).flatten(1, 2)


def _rectangle(problem, s, t, r_s, r_t, rows, cols, out_s, out_t, loss, need_grad):
    """Rows `rows` against columns `cols` (slices of the N tokens), every kept pair once; gradients of the rows."""
    excess, g = _pair_block((s[:, rows], s[:, cols], r_s[:, rows], r_s[:, cols]),
                            (t[:, rows], t[:, cols], r_t[:, rows], r_t[:, cols]), problem.margin,
                            problem.kept_pairs(rows, cols), need_grad)
    loss += excess.sum(dim=(1, 2))
    offset = problem.row_range[0]
    for x, r, out in ((s, r_s, out_s), (t, r_t, out_t)):
        if out is not None:
            out[:, rows.start - offset:rows.stop - offset] = _row_gradient(g, x[:, cols], r[:, cols])


def torch_engine(problem: TRDProblem, norms_s, norms_t, need_s: bool, need_t: bool, block_rows: int = BLOCK_ROWS):
    r_s, r_t = norms_s[0], norms_t[0]
    s = problem.student.to(r_s.dtype)  # no copy for float32 inputs
    t = problem.teacher.to(r_t.dtype)
    row_start, row_end = problem.row_range
    out_s = s.new_empty((s.shape[0], row_end - row_start, s.shape[2])) if need_s else None
    out_t = t.new_empty((t.shape[0], row_end - row_start, t.shape[2])) if need_t else None
    loss = r_s.new_zeros(problem.batch)  # per clip
    tokens, frame_len, need_grad = problem.tokens, problem.tokens_per_frame, need_s or need_t

    if problem.mode == "spatial":
        # Only same-frame pairs. A share of the rows may start or end inside a frame: those (at most two) partial
        # frames go against their frame's columns as rectangles, the whole frames between them frame by frame.
        whole_start = -(-row_start // frame_len) * frame_len
        whole_end = max(whole_start, row_end // frame_len * frame_len)
        for first, last in ((row_start, min(whole_start, row_end)), (max(whole_end, row_start), row_end)):
            if first < last:
                columns = slice(first // frame_len * frame_len, -(-last // frame_len) * frame_len)
                _rectangle(problem, s, t, r_s, r_t, slice(first, last), columns, out_s, out_t, loss, need_grad)
        _spatial_frames(problem, s, t, r_s, r_t, whole_start, whole_end, out_s, out_t, loss, need_grad, block_rows)
        return loss, out_s, out_t

    if problem.rows is not None:
        # A share of the rows: each row block against all N columns, as the other processes' rows are not here.
        for start in range(row_start, row_end, block_rows):
            rows = slice(start, min(row_end, start + block_rows))
            _rectangle(problem, s, t, r_s, r_t, rows, slice(0, tokens), out_s, out_t, loss, need_grad)
        return loss, out_s, out_t

    # Both Gram matrices are symmetric: row block [start, end) meets only columns j >= start. Its own square holds
    # both (i, j) and (j, i); every pair right of it stands for its unvisited mirror too, so it counts twice and
    # also hands the mirror's gradient to the rows of its column. Half the Gram work, no atomics, fixed order.
    for grad in (out_s, out_t):
        if grad is not None:
            grad.zero_()
    for start in range(0, tokens, block_rows):
        end = min(tokens, start + block_rows)
        rows, cols, size = slice(start, end), slice(start, None), end - start
        excess, g = _pair_block((s[:, rows], s[:, cols], r_s[:, rows], r_s[:, cols]),
                                (t[:, rows], t[:, cols], r_t[:, rows], r_t[:, cols]), problem.margin,
                                problem.kept_pairs(rows, cols), need_grad)
        loss += excess[..., :size].sum(dim=(1, 2)) + 2.0 * excess[..., size:].sum(dim=(1, 2))
        del excess
        for x, r, out in ((s, r_s, out_s), (t, r_t, out_t)):
            if out is not None:
                out[:, rows] += _row_gradient(g, x[:, cols], r[:, cols])
                out[:, end:] += _row_gradient(g[..., size:].mT, x[:, rows], r[:, rows])
    return loss, out_s, out_t
