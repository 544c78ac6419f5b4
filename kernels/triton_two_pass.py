"""Two-pass Triton TRD: a triangle of Gram tiles in forward, a plain GEMM for the gradient in backward.

Pass 1 (forward) visits only tiles J ≥ I: both Gram matrices are symmetric, so tile (I, J) also stands for its
mirror (J, I). Per tile it builds Ŝ and T̂ from two matmuls scaled by the inverse norms, Δ = Ŝ − T̂, the tile's
loss partial (pairs weighted 2 off the diagonal), and, when a gradient is wanted, the map of
g = sign(Δ)·[|Δ| > margin] as one int8 per pair, plus the partial row and column sums of g∘Ŝ and g∘T̂, which give
each token's radial term x̂_i·dx̂_i = Σ_j g_ij Ŝ_ij without a second pass over D.
Partials are reduced in a fixed order: no atomics, same bits every run.

Pass 2 (backward) is dX̂ = G·X̂ (−G·T̂ for the teacher): program (I, D-tile) runs over J, reads G_IJ (tiles J < I
from the map of (J, I), transposed), weights it by the column scales and accumulates G_IJ·X_J on chip. Its
epilogue applies the normalisation's backward and grad_output, and stores the gradient in the input dtype once.

The map costs one byte per pair of the triangle, B·N²/2 bytes. A 2-bit map (B·N²/8) was the first version: its
unpacking (shifts, masks, broadcast shared-memory loads) took 922–980 SASS instructions per warp for each 128-pair
step of pass 2 against 1,024 cycles of tensor-core work, so pass 2 could not pass ~52 % of the matmul rate; reading
int8 takes 422–640 (bench/NOTES.md v4).

Spatial mode visits only the band of tiles that share a frame; temporal mode masks same-frame pairs.

When the tokens are split across processes (sequence parallelism), a process computes only its share of the rows
against all columns: pass 1 walks that rectangle of tiles (each pair once, so no mirrors and no column partials)
and pass 2 reads its tiles as stored. `two_pass_engine` then runs both passes in forward.
"""

import torch
import triton
import triton.language as tl

from .normalization import EPS
from .triton_common import (MODE_IDS, LaunchConfig, _band, _gram, _kept_pairs, _relu_excess, _tile_index,
                            _weighted_dot, check_inputs, device_of, dot_precision, dtype_family, fitted_block,
                            interpreter_enabled, new_output, wide_weights)
from .validation import TRDProblem


@triton.jit
def _norms_kernel(X, R, Q, ROWS, N, D, stride_b, stride_n, stride_d, eps,
                  BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per token, in one read: r = 1/max(‖x‖, eps) and the radial factor q = r² (0 where the norm was clamped,
    where x̂ = x/eps is linear in x), float32. A NaN token keeps a NaN norm, as torch's."""
    index = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    ok = index < ROWS
    base = X + (index // N).to(tl.int64) * stride_b + (index % N) * stride_n
    sum_sq = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(base[:, None] + ds[None, :] * stride_d, mask=ok[:, None] & (ds < D)[None, :], other=0.0)
        x = x.to(tl.float32)
        sum_sq += tl.sum(x * x, axis=1)
    norm = tl.sqrt(sum_sq)
    clamped = norm <= eps
    r = 1.0 / tl.where(clamped, eps, norm)
    tl.store(R + index, r, mask=ok)
    tl.store(Q + index, tl.where(clamped, 0.0, r * r), mask=ok)


@triton.jit
def _triangle_row(p, n):
    """Row P of the upper triangle of an n × n grid (row P holds n − P entries) that linear index p falls in."""
    # In float64 and int64: (2n + 1)² passes int32 from n = 23,170, row·n from 46,341. Once per program.
    b2 = tl.cast(2 * n + 1, tl.float64)
    row = ((b2 - tl.sqrt(b2 * b2 - 8.0 * p.to(tl.float64))) * 0.5).to(tl.int64)
    row = tl.where(_triangle_start(row, n) > p, row - 1, row)  # float rounding, either way
    row = tl.where(_triangle_start(row + 1, n) <= p, row + 1, row)
    return row.to(tl.int32)


@triton.jit
def _triangle_start(row, n):
    """Linear index of row `row`'s first entry (int64), as `_triangle_row` counts."""
    return row * n - (row * (row - 1)) // 2


@triton.jit
def _pass1_tile(pid, ROW0, ROW_END, N, FRAME, NB, NBR, NBAND, MODE: tl.constexpr, RECT: tl.constexpr,
                BLOCK: tl.constexpr, GROUP: tl.constexpr):
    """(I, J, valid, first) of program `pid`; `first` is the row block's first band tile (spatial) or 0.
    Spatial: NBAND tiles per row block along its band. Triangle: GROUP × GROUP super-tiles walked column by column
    inside each, so consecutive programs share column tiles and row tiles stay in L2; programs that land below
    the diagonal or past N do nothing. Rectangle (a shard's NBR row blocks × all NB column blocks): GROUP row
    blocks at a time, column by column, as in Triton's matmul tutorial."""
    first = 0
    if MODE == 1:
        row_block = pid // NBAND
        first, last = _band(ROW0 + row_block * BLOCK, ROW_END, N, FRAME, BLOCK)
        col_block = (first if RECT else row_block) + pid % NBAND
        valid = col_block <= last
    elif RECT:
        width = GROUP * NB
        first_row = (pid // width) * GROUP
        rows_here = tl.minimum(NBR - first_row, GROUP)
        row_block = first_row + (pid % width) % rows_here
        col_block = (pid % width) // rows_here
        valid = row_block < NBR
    else:
        supers = (NB + GROUP - 1) // GROUP
        p = pid // (GROUP * GROUP)
        local = pid % (GROUP * GROUP)
        super_row = _triangle_row(p, supers)
        super_col = (super_row + p - _triangle_start(super_row.to(tl.int64), supers)).to(tl.int32)
        row_block = super_row * GROUP + local % GROUP
        col_block = super_col * GROUP + local // GROUP
        valid = (row_block <= col_block) & (col_block < NB)
    return row_block, col_block, valid, first


@triton.jit
def _pass1_kernel(
    S, T, RS, RT, LOSS_PART, MAP, CPART,
    N, ROW0, ROW_END, DS, DT, FRAME, NB, NBR, NBAND, NTILES, margin,
    s_stride_b, s_stride_n, s_stride_d, t_stride_b, t_stride_n, t_stride_d,
    MODE: tl.constexpr, RECT: tl.constexpr, WRITE_MAP: tl.constexpr, C_S: tl.constexpr, C_T: tl.constexpr,
    NWHO: tl.constexpr, WIDE_S: tl.constexpr, WIDE_T: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, PRECISION_S: tl.constexpr, PRECISION_T: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    row_block, col_block, valid, first = _pass1_tile(tl.program_id(0), ROW0, ROW_END, N, FRAME, NB, NBR, NBAND,
                                                     MODE, RECT, BLOCK, GROUP)
    if valid:
        local = tl.arange(0, BLOCK)
        rows = ROW0 + row_block * BLOCK + local
        cols = col_block * BLOCK + local
        row_ok = rows < ROW_END
        col_ok = cols < N
        # Tokens past the rows or N read inverse norm 0: their Ŝ and T̂ are 0 and the keep mask drops them.
        rt_rows = tl.load(RT + b * N + rows, mask=row_ok, other=0.0)
        rt_cols = tl.load(RT + b * N + cols, mask=col_ok, other=0.0)
        rs_rows = tl.load(RS + b * N + rows, mask=row_ok, other=0.0)
        rs_cols = tl.load(RS + b * N + cols, mask=col_ok, other=0.0)
        t_hat = _gram(T, b, rows, cols, row_ok, col_ok, DT, t_stride_b, t_stride_n, t_stride_d, BLOCK_K,
                      PRECISION_T, BLOCK, BLOCK)
        t_hat = t_hat * rt_rows[:, None] * rt_cols[None, :]
        s_hat = _gram(S, b, rows, cols, row_ok, col_ok, DS, s_stride_b, s_stride_n, s_stride_d, BLOCK_K,
                      PRECISION_S, BLOCK, BLOCK)
        s_hat = s_hat * rs_rows[:, None] * rs_cols[None, :]
        delta = s_hat - t_hat
        excess = _relu_excess(delta, _kept_pairs(rows, cols, row_ok, col_ok, FRAME, MODE), margin)
        slot = _tile_index(row_block, col_block, first, NB, NBAND, MODE, RECT)
        if RECT:  # a rectangle visits every pair itself
            weight = 1.0
        else:  # off the triangle's diagonal a tile also stands for its mirror (J, I)
            weight = tl.where(row_block == col_block, 1.0, 2.0)
        tl.store(LOSS_PART + b * NTILES + slot, tl.sum(tl.sum(excess, axis=1), axis=0) * weight)
        if WRITE_MAP:
            g = tl.where(excess > 0, tl.where(delta > 0, 1.0, -1.0), 0.0)
            # Radial terms x̂_i·dx̂_i = Σ_j g_ij Ŝ_ij: row sums feed tokens I, column sums tokens J (through the
            # mirror tile; a rectangle needs none). Pass 2 weights column j by r_j rounded to the input dtype; the
            # same rounding here keeps the radial term exactly the one of the dx̂ that pass 2 computes, so their
            # difference (the gradient) does not inherit that rounding, even when it is much smaller than either.
            partials = CPART + (b * NTILES + slot) * (NWHO * 2 * BLOCK)
            if C_S:
                _store_radial(partials, g * s_hat, _rounding(rs_rows, S, WIDE_S), _rounding(rs_cols, S, WIDE_S),
                              not RECT, BLOCK)
            if C_T:
                _store_radial(partials + (NWHO - 1) * 2 * BLOCK, g * t_hat, _rounding(rt_rows, T, WIDE_T),
                              _rounding(rt_cols, T, WIDE_T), not RECT, BLOCK)
            tl.store(MAP + (b * NTILES + slot) * (BLOCK * BLOCK) + local[:, None] * BLOCK + local[None, :],
                     g.to(tl.int8))


@triton.jit
def _rounding(scale, X, WIDE: tl.constexpr):
    """scale rounded to the gradient weights' dtype (X's, or float32 when WIDE), over scale (1 where it is 0)."""
    if WIDE:
        return tl.full(scale.shape, 1.0, tl.float32)
    rounded = scale.to(X.dtype.element_ty).to(tl.float32)
    return tl.where(scale == 0, 1.0, rounded) / tl.where(scale == 0, 1.0, scale)


@triton.jit
def _store_radial(partials, g_hat, row_rounding, col_rounding, COLUMNS: tl.constexpr, BLOCK: tl.constexpr):
    local = tl.arange(0, BLOCK)
    tl.store(partials + local, tl.sum(g_hat * col_rounding[None, :], axis=1))
    if COLUMNS:
        tl.store(partials + BLOCK + local, tl.sum(g_hat * row_rounding[:, None], axis=0))


@triton.jit
def _add_columns(acc, MAP, b, NTILES, slot, X, R, N, col_block, ds, d_ok, x_stride_b, x_stride_n, x_stride_d,
                 TRANSPOSED: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """acc + (G_IJ·diag(r_J)) @ X_J[:, ds], G_IJ from the map of tile `slot`, stored as (J, I) when TRANSPOSED.
    The weights are cast to the operand dtype before the transpose, which then moves half the bytes."""
    cols = col_block * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < N
    r = tl.load(R + b * N + cols, mask=col_ok, other=0.0)
    local = tl.arange(0, BLOCK)
    g = tl.load(MAP + (b * NTILES + slot) * (BLOCK * BLOCK) + local[:, None] * BLOCK + local[None, :]).to(tl.float32)
    w = g * r[:, None] if TRANSPOSED else g * r[None, :]
    if not WIDE:
        w = w.to(X.dtype.element_ty)
    if TRANSPOSED:
        w = tl.trans(w)
    x = tl.load(X + b * x_stride_b + cols[:, None] * x_stride_n + ds[None, :] * x_stride_d,
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    return _weighted_dot(w, x, acc, WIDE, PRECISION)


@triton.jit(do_not_specialize=["num_pairs"])
def _pass2_kernel(
    X, R, Q, MAP, CPART, CLIP_SUMS, GRAD_OUTPUT, OUT,
    N, ROW0, ROW_END, D, FRAME, NB, NBAND, NTILES, num_pairs,
    x_stride_b, x_stride_n, x_stride_d, out_stride_b, out_stride_n,
    MODE: tl.constexpr, RECT: tl.constexpr, WHO: tl.constexpr, NWHO: tl.constexpr, NEGATE: tl.constexpr,
    WIDE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    row_block = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    local = tl.arange(0, BLOCK)
    rows = ROW0 + row_block * BLOCK + local
    row_ok = rows < ROW_END
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    if MODE == 1:
        first, last = _band(ROW0 + row_block * BLOCK, ROW_END, N, FRAME, BLOCK)
    else:
        first = 0
        last = NB - 1
    partial_row = CPART + b * NTILES * (NWHO * 2 * BLOCK) + WHO * 2 * BLOCK + local
    acc = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
    radial = tl.zeros((BLOCK,), dtype=tl.float32)
    if RECT:  # every tile of the row blocks was visited as it is
        start = first
    else:
        # J < I: only (J, I) was visited; its map and column partials, transposed, hold the pairs (i in I, j in J).
        for col_block in range(first, row_block):
            slot = _tile_index(col_block, row_block, first, NB, NBAND, MODE, RECT)
            radial += tl.load(partial_row + slot * (NWHO * 2 * BLOCK) + BLOCK)
            acc = _add_columns(acc, MAP, b, NTILES, slot, X, R, N, col_block, ds, d_ok, x_stride_b, x_stride_n,
                               x_stride_d, True, WIDE, BLOCK, PRECISION)
        start = row_block
    for col_block in range(start, last + 1):
        slot = _tile_index(row_block, col_block, first, NB, NBAND, MODE, RECT)
        radial += tl.load(partial_row + slot * (NWHO * 2 * BLOCK))
        acc = _add_columns(acc, MAP, b, NTILES, slot, X, R, N, col_block, ds, d_ok, x_stride_b, x_stride_n,
                           x_stride_d, False, WIDE, BLOCK, PRECISION)
    # dL/dx_i = coef·(r_i·dx̂_i − r_i²·(x̂_i·dx̂_i)·x_i); the radial factor r_i² is 0 where the norm was clamped.
    r = tl.load(R + b * N + rows, mask=row_ok, other=0.0)
    q = tl.load(Q + b * N + rows, mask=row_ok, other=0.0)
    mask = row_ok[:, None] & d_ok[None, :]
    x = tl.load(X + b * x_stride_b + rows[:, None] * x_stride_n + ds[None, :] * x_stride_d, mask=mask, other=0.0)
    # coef = 2/P · grad_output (see fused.gradient_scale), in float64 and rounded once; 0·(the clip's loss sum) makes
    # the gradient of a clip whose loss is NaN all NaN. Negated for the teacher (Δ = Ŝ − T̂).
    coef = (tl.load(CLIP_SUMS + b) * 0.0 + 2.0 / num_pairs.to(tl.float64)) * tl.load(GRAD_OUTPUT).to(tl.float64)
    if NEGATE:
        coef = -coef
    grad = coef.to(tl.float32) * (r[:, None] * acc - (q * radial)[:, None] * x.to(tl.float32))
    tl.store(OUT + b * out_stride_b + (rows - ROW0)[:, None] * out_stride_n + ds[None, :],
             grad.to(OUT.dtype.element_ty), mask=mask)


# Launch configurations by rule (no timing), so every process runs the same tiles and gets the same bits. Chosen
# from sm_90 compiles (bench/compile_report.py; bench/NOTES.md v4): the first of each list is the default, the
# others are what `select_configs` falls back to and what a GPU sweep should time. Pass 1 only multiplies in the
# input dtype (bf16 and fp16 alike); pass 2's float16 weights are float32 (three-TF32), which needs smaller tiles.
PASS1_CANDIDATES = {
    "bf16": [LaunchConfig.of(8, 3, BLOCK=128, BLOCK_K=64), LaunchConfig.of(4, 3, BLOCK=64, BLOCK_K=64),
             LaunchConfig.of(8, 4, BLOCK=64, BLOCK_K=64)],
    "fp32": [LaunchConfig.of(4, 3, BLOCK=64, BLOCK_K=32), LaunchConfig.of(8, 3, BLOCK=64, BLOCK_K=32)],
}
PASS1_CANDIDATES["fp16"] = PASS1_CANDIDATES["bf16"]
PASS2_CANDIDATES = {
    "bf16": [LaunchConfig.of(8, 3, BLOCK_D=128), LaunchConfig.of(8, 2, BLOCK_D=256),
             LaunchConfig.of(4, 3, BLOCK_D=64)],
    "fp16": [LaunchConfig.of(4, 3, BLOCK_D=64), LaunchConfig.of(8, 3, BLOCK_D=128)],
    "fp32": [LaunchConfig.of(4, 3, BLOCK_D=64), LaunchConfig.of(8, 3, BLOCK_D=64)],
}
# The interpreter's configuration: small tiles keep it fast, GROUP = 2 walks real super-tiles.
INTERPRETER_CONFIGS = (LaunchConfig.of(1, 1, BLOCK=32, BLOCK_K=32), LaunchConfig.of(1, 1, BLOCK_D=32), 2)
# schedule="auto" takes the two-pass schedule while what it keeps between its passes fits this budget: the int8
# pair map (B·N²/2 bytes) and, per gradient, radial partials of 1/16 of that (128-token tiles). At B = 4,
# N = 3,600 that is 28.5 + 1.8 MB; at B = 1, N = 32,400, 531 + 33 MB; the budget holds B·N² up to ~8e9.
TWO_PASS_MAX_BYTES = 4 << 30
# Row-tile operands (both inputs) above this many bytes no longer stay in L2 across a row of tiles: group them.
L2_GROUP_BYTES = 16 << 20


def select_configs(problem: TRDProblem, need_s: bool, need_t: bool) -> tuple[LaunchConfig, LaunchConfig, int]:
    """(pass 1 config, pass 2 config, GROUP) for a problem: a pure function of its shapes, dtypes and which
    gradients it computes."""
    if interpreter_enabled():
        return INTERPRETER_CONFIGS
    s, t = problem.student, problem.teacher
    family = dtype_family(s.dtype, t.dtype)
    pass1 = PASS1_CANDIDATES[family][0]
    # 64-token tiles where 128 would spill in sm_90 compiles (both gradients' radial sums; float16's float32
    # weights in pass 2) or leave SMs idle (short clips).
    spills = (need_s and need_t) or (family == "fp16" and (need_s or need_t))
    if pass1["BLOCK"] > 64 and (spills or problem.tokens <= 1024):
        pass1 = PASS1_CANDIDATES[family][1]
    # 256-wide D chunks where they divide the width: timed on an H100 at B = 1, N = 32,400, D = 768, pass 2 with
    # them took the step from 10.9 to 8.6 ms (bench/results/h100-2026-11-25-sweep.json).
    pass2 = PASS2_CANDIDATES[family][0]
    if family == "bf16" and all(x.shape[2] % 256 == 0 for x, need in ((s, need_s), (t, need_t)) if need):
        pass2 = PASS2_CANDIDATES[family][1]
    operand_bytes = problem.tokens * (s.shape[2] * s.element_size() + t.shape[2] * t.element_size())
    return pass1, pass2, 8 if operand_bytes > L2_GROUP_BYTES else 1


def pass2_layout(configs) -> list[int]:
    """What pass 2 needs of a problem's launch configurations, as integers an operator takes: pass 1's tile
    (the map's layout) and pass 2's own configuration."""
    pass1, pass2, _ = configs
    return [pass1["BLOCK"], pass2["BLOCK_D"], pass2.num_warps, pass2.num_stages]


def configs_of_layout(layout: list[int]):
    """Launch configurations for `pass2_launch` from `pass2_layout`'s integers (pass 1's other fields unused)."""
    block, block_d, num_warps, num_stages = layout
    return LaunchConfig.of(0, 0, BLOCK=block), LaunchConfig.of(num_warps, num_stages, BLOCK_D=block_d), 1


def tile_grid(problem: TRDProblem, block: int) -> tuple[int, int, int, int]:
    """(column blocks NB, row blocks NBR, band tiles per row block NBAND, per-tile slots NTILES): the triangle of
    all N tokens, or for a share of the rows (`problem.rows`) a rectangle of its row blocks against all columns."""
    blocks = triton.cdiv(problem.tokens, block)
    frame = problem.tokens_per_frame
    if problem.rows is None:
        if problem.mode == "spatial":  # tiles J >= I that share a frame with row block I
            band = min(blocks, (block + frame - 2) // block + 1)
            return blocks, blocks, band, blocks * band
        return blocks, blocks, 1, blocks * (blocks + 1) // 2
    start, end = problem.rows
    row_blocks = triton.cdiv(end - start, block)
    if problem.mode == "spatial":  # rows start anywhere: their frames span up to BLOCK + 2·FRAME − 2 columns
        band = min(blocks, (block + 2 * frame - 3) // block + 2)
        return blocks, row_blocks, band, row_blocks * band
    return blocks, row_blocks, 1, row_blocks * blocks


def pair_map_bytes(problem: TRDProblem, need_s: bool, need_t: bool) -> int:
    """Bytes pass 1 keeps for pass 2: the int8 map, plus 2·BLOCK float32 radial partials per tile and gradient."""
    if not (need_s or need_t):
        return 0
    block = select_configs(problem, need_s, need_t)[0]["BLOCK"]
    tiles = problem.batch * tile_grid(problem, block)[3]
    return tiles * (block * block + (need_s + need_t) * 2 * block * 4)


def pass1_launch(problem, r_s, r_t, need_s: bool, need_t: bool, configs):
    """(kernel, grid, args, kwargs, (loss_part, pair_map, radial)) of pass 1: the map and radial partials only
    when a gradient is wanted."""
    pass1, _, group = configs
    block = pass1["BLOCK"]
    s, t = problem.student, problem.teacher
    blocks, row_blocks, band, tiles = tile_grid(problem, block)
    write_map = need_s or need_t
    nwho = int(need_s) + int(need_t)
    # Spatial mode launches NBAND programs per row block, some past the band's end: their slots stay 0.
    loss_part = (torch.zeros if problem.mode == "spatial" else new_output)((problem.batch, tiles), device=s.device)
    pair_map = radial = loss_part  # stand-in pointers for buffers the kernel is compiled not to touch
    if write_map:
        pair_map = new_output((problem.batch, tiles, block, block), s.device, torch.int8)
        radial = new_output((problem.batch, tiles, nwho, 2, block), s.device)
    if problem.mode == "spatial" or problem.rows is not None:
        programs = tiles
    else:
        supers = triton.cdiv(blocks, group)
        programs = supers * (supers + 1) // 2 * group * group
    args = (s, t, r_s, r_t, loss_part, pair_map, radial, problem.tokens, *problem.row_range, s.shape[2],
            t.shape[2], problem.tokens_per_frame, blocks, row_blocks, band, tiles, problem.margin, *s.stride(),
            *t.stride())
    kwargs = dict(MODE=MODE_IDS[problem.mode], RECT=problem.rows is not None, WRITE_MAP=write_map, C_S=need_s,
                  C_T=need_t, NWHO=max(nwho, 1), WIDE_S=wide_weights(s.dtype), WIDE_T=wide_weights(t.dtype),
                  GROUP=group, PRECISION_S=dot_precision(s.dtype), PRECISION_T=dot_precision(t.dtype),
                  **{**pass1.launch_kwargs(), "BLOCK_K": fitted_block(pass1["BLOCK_K"], max(s.shape[2], t.shape[2]))})
    return _pass1_kernel, (programs, problem.batch), args, kwargs, (loss_part, pair_map, radial)


def pass2_launch(problem, x, norms, pair_map, radial, clip_sums, grad_output, teacher: bool, who: int, nwho: int,
                 configs):
    """(kernel, grid, args, kwargs, gradient) of pass 2 for input x (the student's or the teacher's, all N
    tokens, with `norms_launch`'s output for it): the gradient of the problem's rows, given the per-clip loss sums
    of all rows and grad_output (1 element)."""
    pass1, pass2, _ = configs
    block = pass1["BLOCK"]
    blocks, row_blocks, band, tiles = tile_grid(problem, block)
    start, end = problem.row_range
    out = new_output((x.shape[0], end - start, x.shape[2]), x.device, x.dtype)
    block_d = fitted_block(pass2["BLOCK_D"], x.shape[2])
    grid = (row_blocks, triton.cdiv(x.shape[2], block_d), problem.batch)
    args = (x, norms[0], norms[1], pair_map, radial, clip_sums, grad_output, out, problem.tokens, start, end,
            x.shape[2], problem.tokens_per_frame, blocks, band, tiles, problem.num_pairs, *x.stride(), out.stride(0),
            out.stride(1))
    kwargs = dict(MODE=MODE_IDS[problem.mode], RECT=problem.rows is not None, WHO=who, NWHO=nwho, NEGATE=teacher,
                  WIDE=wide_weights(x.dtype), BLOCK=block, PRECISION=dot_precision(x.dtype),
                  **{**pass2.launch_kwargs(), "BLOCK_D": block_d})
    return _pass2_kernel, grid, args, kwargs, out


def norms_launch(x):
    """(kernel, grid, args, kwargs, norms) of the inverse-norm pre-pass for x (B, N, D): norms (2, B, N) holds r
    and the radial factor q, for pass 1 and for x's pass 2."""
    batch, tokens, dim = x.shape
    norms = new_output((2, batch, tokens), x.device)
    rows = batch * tokens
    args = (x, norms[0], norms[1], rows, tokens, dim, *x.stride(), EPS)
    kwargs = dict(BLOCK_ROWS=16, BLOCK_D=fitted_block(128, dim), num_warps=4)
    return _norms_kernel, (triton.cdiv(rows, 16),), args, kwargs, norms


def launch(kernel, grid, args, kwargs, outputs):
    kernel[grid](*args, **kwargs)
    return outputs


def clip_sum(loss_part: torch.Tensor) -> torch.Tensor:
    """Per clip, a fixed-order reduction of the tile partials in float64: the same bits in every run."""
    return loss_part.sum(dim=1, dtype=torch.float64)


def two_pass_forward(problem: TRDProblem, need_s: bool, need_t: bool, configs):
    """Pass 1: (per-clip loss sums of the problem's rows, pair map, radial partials, the student's and the
    teacher's norms); the map and partials are stand-ins unless a gradient is wanted."""
    check_inputs(problem.student, problem.teacher)
    with device_of(problem.student):
        norms_s, norms_t = launch(*norms_launch(problem.student)), launch(*norms_launch(problem.teacher))
        loss_part, pair_map, radial = launch(*pass1_launch(problem, norms_s[0], norms_t[0], need_s, need_t, configs))
    return clip_sum(loss_part), pair_map, radial, norms_s, norms_t


def two_pass_gradient(problem: TRDProblem, x, norms, pair_map, radial, clip_sums, grad_output, teacher: bool,
                      who: int, nwho: int, configs):
    """Pass 2: dL/dx of the problem's rows for x (all N tokens of the student or of the teacher) from pass 1's
    map, partials and x's norms; `clip_sums` are the per-clip loss sums of all rows (every process's)."""
    with device_of(x):
        return launch(*pass2_launch(problem, x, norms, pair_map, radial, clip_sums, grad_output, teacher, who, nwho,
                                    configs))


def two_pass_engine(problem: TRDProblem, need_s: bool, need_t: bool):
    """Both passes in one call (a `fused.Engine`): for a share of the rows, whose gradient is computed in forward
    so that backward needs neither the other processes nor their tokens, and for the loss alone."""
    configs = select_configs(problem, need_s, need_t)
    clip_sums, pair_map, radial, norms_s, norms_t = two_pass_forward(problem, need_s, need_t, configs)
    nwho = int(need_s) + int(need_t)

    def finish(all_clip_sums):
        unit = all_clip_sums.new_ones(1)  # grad_output: autograd's backward scales the finished gradient
        return tuple(two_pass_gradient(problem, x, norms, pair_map, radial, all_clip_sums, unit, teacher, who, nwho,
                                       configs) if need else None
                     for x, norms, need, teacher, who in ((problem.student, norms_s, need_s, False, 0),
                                                          (problem.teacher, norms_t, need_t, True, nwho - 1)))

    return clip_sums, finish


def resolve_schedule(problem: TRDProblem, schedule: str, need_s: bool, need_t: bool) -> str:
    """"two-pass" or "fused" for schedule "auto", "two-pass" or "fused": "auto" takes two-pass while what it keeps
    between its passes fits `TWO_PASS_MAX_BYTES`; the loss alone is pass 1 without a map, the least work."""
    if not (need_s or need_t):
        return "two-pass"
    if schedule == "auto":
        return "two-pass" if pair_map_bytes(problem, need_s, need_t) <= TWO_PASS_MAX_BYTES else "fused"
    return schedule
