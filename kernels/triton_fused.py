"""One-pass ("fused") Triton TRD: loss and gradient in a single pass over (row block I, column block J) tiles, in
O(N·D) memory. The low-memory schedule: it keeps no pair map, at the price of computing every Gram tile twice
(both (I, J) and (J, I)) and re-reading its gradient rows once per column tile.

Per tile: two Gram products (K = Dt, then K = Ds) chained into one float32 accumulator and scaled into
Δ = Ŝ − T̂, then |Δ| − margin, relu and a row sum, and, when a gradient is wanted, a third matmul per tile:
(g·diag(r_J)) @ X_J, added to the rows of I in a float32 buffer that program I owns outright (no atomics,
same bits every run). Backward only scales that gradient by grad_output.
"""

import torch
import triton
import triton.language as tl

from .triton_common import (MODE_IDS, LaunchConfig, _gram, _kept_pairs, _relu_excess, _weighted_dot,
                            check_inputs, device_of, dot_precision, dtype_family, fitted_block, interpreter_enabled,
                            new_output, wide_weights)
from .validation import TRDProblem


@triton.jit
def _add_rows(OUT, X, b, rows, row_ok, cols, col_ok, w, accumulate, D,
              stride_b, stride_n, stride_d, out_stride_b, out_stride_n,
              BLOCK_D: tl.constexpr, WIDE: tl.constexpr, PRECISION: tl.constexpr):
    """OUT[rows] += w @ X[cols], D columns at a time, on top of what is there only when `accumulate` (so the
    buffer needs no zeroing). The rows so far are the matmul's accumulator: no second tile in registers."""
    src = X + b * stride_b
    dst = OUT + b * out_stride_b
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        x = tl.load(src + cols[:, None] * stride_n + ds[None, :] * stride_d,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        ptrs = dst + rows[:, None] * out_stride_n + ds[None, :]
        mask = row_ok[:, None] & d_ok[None, :]
        tl.store(ptrs, _weighted_dot(w, x, tl.load(ptrs, mask=mask & accumulate, other=0.0), WIDE, PRECISION),
                 mask=mask)


@triton.jit
def _fused_kernel(
    S, T, RS, RT, LOSS_ROWS, GS, GT,
    N, ROW0, ROW_END, DS, DT, FRAME, margin,
    s_stride_b, s_stride_n, s_stride_d, t_stride_b, t_stride_n, t_stride_d,
    gs_stride_b, gs_stride_n, gt_stride_b, gt_stride_n,
    MODE: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, WIDE_S: tl.constexpr, WIDE_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION_S: tl.constexpr, PRECISION_T: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    # Rows ROW0 .. ROW_END − 1 of the N tokens (all of them, or this process's share) against every column; the
    # outputs hold those rows only, from 0.
    m0 = ROW0 + pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < ROW_END
    out_rows = rows - ROW0
    # Masked rows and columns read inverse norms of 1, which keeps the ratios below finite; the keep mask drops them.
    rs_rows = tl.load(RS + b * N + rows, mask=row_ok, other=1.0)
    rt_rows = tl.load(RT + b * N + rows, mask=row_ok, other=1.0)
    if MODE == 1:  # spatial: only the columns of the frames that rows m0 .. m0 + BLOCK_M − 1 lie in
        j_lo = (m0 // FRAME) * FRAME
        j_hi = tl.minimum(N, ((tl.minimum(m0 + BLOCK_M, ROW_END) - 1) // FRAME + 1) * FRAME)
    else:
        j_lo = 0
        j_hi = N

    loss_rows = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j0 in range(j_lo, j_hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < j_hi
        rs_cols = tl.load(RS + b * N + cols, mask=col_ok, other=1.0)
        rt_cols = tl.load(RT + b * N + cols, mask=col_ok, other=1.0)
        # Δ = rs_i rs_j (S_ij − T_ij · (rt_i/rs_i)(rt_j/rs_j)): the teacher's Gram, rescaled to the student's
        # magnitude, seeds the student's, so one float32 accumulator holds the tile instead of two (the gradient
        # matmul below needs the registers). Row ratio, then column ratio: never their product first.
        delta = _gram(T, b, rows, cols, row_ok, col_ok, DT, t_stride_b, t_stride_n, t_stride_d, BLOCK_K,
                      PRECISION_T, BLOCK_M, BLOCK_N)
        delta = -delta * (rt_rows / rs_rows)[:, None] * (rt_cols / rs_cols)[None, :]
        delta += _gram(S, b, rows, cols, row_ok, col_ok, DS, s_stride_b, s_stride_n, s_stride_d, BLOCK_K,
                       PRECISION_S, BLOCK_M, BLOCK_N)
        delta *= rs_rows[:, None] * rs_cols[None, :]
        excess = _relu_excess(delta, _kept_pairs(rows, cols, row_ok, col_ok, FRAME, MODE), margin)
        loss_rows += tl.sum(excess, axis=1)

        if GRAD_S or GRAD_T:
            active = excess > 0
            g = tl.where(active, tl.where(delta > 0, 1.0, -1.0), 0.0)
            accumulate = tl.full((1,), j0, tl.int32) > j_lo  # a tensor, so it can join load masks
            # Rows I gain Σ_j g_ij x̂_j = (g·diag(r_J)) @ X_J.
            if GRAD_S:
                _add_rows(GS, S, b, out_rows, row_ok, cols, col_ok, g * rs_cols[None, :], accumulate, DS,
                          s_stride_b, s_stride_n, s_stride_d, gs_stride_b, gs_stride_n, BLOCK_D, WIDE_S, PRECISION_S)
            if GRAD_T:
                _add_rows(GT, T, b, out_rows, row_ok, cols, col_ok, g * rt_cols[None, :], accumulate, DT,
                          t_stride_b, t_stride_n, t_stride_d, gt_stride_b, gt_stride_n, BLOCK_D, WIDE_T, PRECISION_T)
            # The next column tile re-reads these rows, stored from another register layout by other threads.
            tl.debug_barrier()

    tl.store(LOSS_ROWS + b * (ROW_END - ROW0) + out_rows, loss_rows, mask=row_ok)


def _config(num_warps, num_stages, block_m, block_n, block_k, block_d):
    return LaunchConfig.of(num_warps, num_stages, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                           BLOCK_D=block_d)


# The first of each family is the default. bf16's, timed on an H100 (bench/results/h100-2026-11-25-sweep.json):
# 64×128 tiles ran the training case in 2.05 ms at B = 4, N = 3,600 and 32.3 ms at N = 32,400, against 3.92 and
# 65.6 ms for the spill-free 128×64 tiles, despite register spills in sm_90 compiles (152 bytes with triton 3.6,
# 192 with 3.9). No bf16 operand runs 32-wide D chunks: 8 warps, 4 stages and BLOCK_D = 32 gave NaN gradients for
# bf16 inputs whenever D was not a multiple of 32 (bench/results/h100-2026-11-25/fused-candidates-nan.txt; cause
# not found), so select_config widens them to 64 where a bf16 input meets a float16 or float32 family. Three-TF32
# dots (float32 inputs, and float16's float32 gradient weights) hold high and low parts of their operands: narrow K
# and D chunks.
CANDIDATES = {
    "bf16": [_config(4, 3, 64, 128, 64, 64), _config(8, 3, 128, 64, 64, 64), _config(8, 3, 128, 128, 64, 64),
             _config(4, 4, 64, 64, 64, 64)],
    "fp16": [_config(8, 4, 128, 64, 64, 32), _config(8, 3, 128, 64, 64, 64)],
    "fp32": [_config(8, 4, 128, 64, 32, 32), _config(8, 2, 128, 64, 32, 32), _config(4, 4, 64, 64, 32, 32)],
}
INTERPRETER_CONFIG = _config(1, 1, 32, 32, 32, 32)


def select_config(problem: TRDProblem) -> LaunchConfig:
    """The launch configuration for a problem, by rule: a pure function of its shapes and dtypes."""
    if interpreter_enabled():
        return INTERPRETER_CONFIG
    dtypes = (problem.student.dtype, problem.teacher.dtype)
    family = CANDIDATES[dtype_family(*dtypes)]
    fitting = [c for c in family if c["BLOCK_M"] <= max(16, triton.next_power_of_2(problem.tokens))]
    config = fitting[0] if fitting else min(family, key=lambda c: c["BLOCK_M"] * c["BLOCK_N"])
    if torch.bfloat16 in dtypes and config["BLOCK_D"] < 64:  # mixed with float16 or float32: see CANDIDATES
        config = LaunchConfig.of(config.num_warps, config.num_stages, **{**dict(config.params), "BLOCK_D": 64})
    return config


def fused_launch(problem: TRDProblem, r_s, r_t, need_s: bool, need_t: bool, config: LaunchConfig):
    """(kernel, grid, args, kwargs, (loss_rows, Σ g ŝ or None, Σ g t̂ or None)) of one fused launch, for the
    problem's rows (all N, or this process's share) against all N columns."""
    s, t = problem.student, problem.teacher
    batch, device = problem.batch, s.device
    start, end = problem.row_range
    grad_s = new_output((batch, end - start, s.shape[2]), device) if need_s else None
    grad_t = new_output((batch, end - start, t.shape[2]), device) if need_t else None
    loss_rows = new_output((batch, end - start), device)
    # An untouched gradient still needs a pointer argument: the loss buffer stands in.
    gs = loss_rows if grad_s is None else grad_s
    gt = loss_rows if grad_t is None else grad_t
    args = (s, t, r_s, r_t, loss_rows, gs, gt, problem.tokens, start, end, s.shape[2], t.shape[2],
            problem.tokens_per_frame, problem.margin, *s.stride(), *t.stride(), gs.stride(0), gs.stride(1),
            gt.stride(0), gt.stride(1))
    kwargs = dict(MODE=MODE_IDS[problem.mode], GRAD_S=need_s, GRAD_T=need_t, WIDE_S=wide_weights(s.dtype),
                  WIDE_T=wide_weights(t.dtype), PRECISION_S=dot_precision(s.dtype),
                  PRECISION_T=dot_precision(t.dtype),
                  **{**config.launch_kwargs(), "BLOCK_K": fitted_block(config["BLOCK_K"], max(s.shape[2], t.shape[2])),
                     "BLOCK_D": fitted_block(config["BLOCK_D"], max(s.shape[2], t.shape[2]))})
    grid = (triton.cdiv(end - start, config["BLOCK_M"]), batch)
    return _fused_kernel, grid, args, kwargs, (loss_rows, grad_s, grad_t)


def fused_engine(problem: TRDProblem, norms_s, norms_t, need_s: bool, need_t: bool):
    """Per-clip loss sums of the problem's rows and their unscaled gradients Σ_j g_ij x̂_j (float32), for
    `fused.rows_engine`."""
    check_inputs(problem.student, problem.teacher)
    kernel, grid, args, kwargs, (loss_rows, grad_s, grad_t) = fused_launch(
        problem, norms_s[0], norms_t[0], need_s, need_t, select_config(problem))
    with device_of(problem.student):
        kernel[grid](*args, **kwargs)
    return loss_rows.sum(dim=1, dtype=torch.float64), grad_s, grad_t
