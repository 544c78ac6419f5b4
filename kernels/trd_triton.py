"""Fused Triton TRD engine: loss and gradient in one pass over (row block I, column block J) tiles.

Per tile: two Gram products (K = Dt, then K = Ds) chained into one float32 accumulator and scaled by the pre-pass
inverse norms into Δ = Ŝ − T̂, then |Δ| − margin, relu and a row sum, and, when a gradient is wanted, a third
matmul per tile: g_IJ·diag(r_J) @ X_J, added to the rows of I in a float32 buffer. Nothing N×N ever exists
outside the tile being worked on.

Two schedules:
- deterministic (default): program I visits every J it needs and owns the gradient rows of I outright, so it
  accumulates them with plain loads and stores in a fixed order. Bitwise reproducible.
- symmetric: both Gram matrices are symmetric, so program I visits only J ≥ I and pairs j > i count twice; the
  mirrored tile's gradient goes to rows J by float atomics. Half the Gram work; run-to-run bits may differ.

Modes: "spatial" loops only over the columns of the frames its rows lie in (O(N·T·D)); "temporal" masks the
same-frame pairs. Row and column masks cover any N and D.
"""

import os

import torch
import triton
import triton.language as tl

from .validation import TRDProblem

MODE_IDS = {"full": 0, "spatial": 1, "temporal": 2}
# Configuration used where nothing is tuned: the interpreter on CPU, where small tiles keep it fast.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": 32}


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    if PRECISION == "widen":
        # Triton's interpreter multiplies bfloat16 tiles as their raw uint16 bits; widened to float32 the products
        # are exact, as on tensor cores.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _gram_acc(X, b, rows, cols, row_ok, col_ok, acc, D, stride_b, stride_n, stride_d,
              BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc + x_rows · x_colsᵀ for one tile (unnormalised tokens), float32."""
    base = X + b * stride_b
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a = tl.load(base + rows[:, None] * stride_n + ks[None, :] * stride_d,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        bt = tl.load(base + cols[None, :] * stride_n + ks[:, None] * stride_d,
                     mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = _dot(a, bt, acc, PRECISION)
    return acc


@triton.jit
def _add_rows(OUT, X, b, out_rows, out_ok, src_rows, src_ok, w, accumulate, D,
              stride_b, stride_n, stride_d, out_stride_b, out_stride_n,
              BLOCK_D: tl.constexpr, ATOMIC: tl.constexpr, PRECISION: tl.constexpr):
    """OUT[out_rows] += w @ X[src_rows], D columns at a time. Where this program owns the rows: a plain store, on
    top of what is there only when `accumulate` (so the buffer needs no zeroing); else float atomics."""
    w = w.to(X.dtype.element_ty)
    src = X + b * stride_b
    dst = OUT + b * out_stride_b
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        x = tl.load(src + src_rows[:, None] * stride_n + ds[None, :] * stride_d,
                    mask=src_ok[:, None] & d_ok[None, :], other=0.0)
        ptrs = dst + out_rows[:, None] * out_stride_n + ds[None, :]
        mask = out_ok[:, None] & d_ok[None, :]
        if ATOMIC:
            tl.atomic_add(ptrs, _dot(w, x, tl.zeros((w.shape[0], BLOCK_D), dtype=tl.float32), PRECISION), mask=mask)
        else:
            # The rows so far are the matmul's accumulator (zeros on the first visit): no second tile in registers.
            tl.store(ptrs, _dot(w, x, tl.load(ptrs, mask=mask & accumulate, other=0.0), PRECISION), mask=mask)


@triton.jit
def _trd_kernel(
    S, T, RS, RT, LOSS_ROWS, GS, GT,
    N, DS, DT, FRAME, N_BUCKET, margin,
    s_stride_b, s_stride_n, s_stride_d, t_stride_b, t_stride_n, t_stride_d,
    gs_stride_b, gs_stride_n, gt_stride_b, gt_stride_n,
    MODE: tl.constexpr, SYMMETRIC: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION_S: tl.constexpr, PRECISION_T: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    # Masked rows and columns read inverse norms of 1, which keeps the ratios below finite; nothing they touch
    # survives the `keep` mask.
    rs_rows = tl.load(RS + b * N + rows, mask=row_ok, other=1.0)
    rt_rows = tl.load(RT + b * N + rows, mask=row_ok, other=1.0)
    row_frame = rows // FRAME

    if MODE == 1:  # spatial: only the columns of the frames that rows m0 .. m0+BLOCK_M-1 lie in
        j_lo = (m0 // FRAME) * FRAME
        j_hi = tl.minimum(N, ((tl.minimum(m0 + BLOCK_M, N) - 1) // FRAME + 1) * FRAME)
    else:
        j_lo = 0
        j_hi = N
    if SYMMETRIC:
        j_lo = tl.maximum(j_lo, m0)

    loss_rows = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j0 in range(j_lo, j_hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < j_hi
        rs_cols = tl.load(RS + b * N + cols, mask=col_ok, other=1.0)
        rt_cols = tl.load(RT + b * N + cols, mask=col_ok, other=1.0)
        # Δ = rs_i rs_j (S_ij − T_ij · (rt_i/rs_i)(rt_j/rs_j)): the teacher's Gram, rescaled to the student's
        # magnitude, seeds the student's, so one float32 accumulator holds the tile instead of two. Scaling by the
        # row ratio and then the column ratio (never their product first) cannot underflow while Δ is in range.
        delta = _gram_acc(T, b, rows, cols, row_ok, col_ok, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DT,
                          t_stride_b, t_stride_n, t_stride_d, BLOCK_K, PRECISION_T)
        delta = -delta * (rt_rows / rs_rows)[:, None] * (rt_cols / rs_cols)[None, :]
        delta = _gram_acc(S, b, rows, cols, row_ok, col_ok, delta, DS, s_stride_b, s_stride_n, s_stride_d,
                          BLOCK_K, PRECISION_S)
        delta *= rs_rows[:, None] * rs_cols[None, :]
        keep = row_ok[:, None] & col_ok[None, :]
        if MODE == 1:
            keep &= row_frame[:, None] == (cols // FRAME)[None, :]
        if MODE == 2:
            keep &= row_frame[:, None] != (cols // FRAME)[None, :]
        if SYMMETRIC:
            keep &= cols[None, :] >= rows[:, None]
        excess = tl.abs(delta) - margin
        active = keep & (excess > 0)
        weight = 1.0
        if SYMMETRIC:
            weight = tl.where(cols[None, :] > rows[:, None], 2.0, 1.0)  # the mirrored pair (j, i) is not visited
        loss_rows += tl.sum(tl.where(active, excess * weight, 0.0), axis=1)

        if GRAD_S or GRAD_T:
            g = tl.where(active, tl.where(delta > 0, 1.0, -1.0), 0.0)
            accumulate = tl.full((1,), j0, tl.int32) > j_lo  # a tensor, so it can join load masks
            # Row side: rows I gain Σ_j g_ij x̂_j = (g·diag(r_J)) @ X_J.
            if GRAD_S:
                _add_rows(GS, S, b, rows, row_ok, cols, col_ok, g * rs_cols[None, :], accumulate, DS, s_stride_b,
                          s_stride_n, s_stride_d, gs_stride_b, gs_stride_n, BLOCK_D, SYMMETRIC, PRECISION_S)
            if GRAD_T:
                _add_rows(GT, T, b, rows, row_ok, cols, col_ok, g * rt_cols[None, :], accumulate, DT, t_stride_b,
                          t_stride_n, t_stride_d, gt_stride_b, gt_stride_n, BLOCK_D, SYMMETRIC, PRECISION_T)
            if SYMMETRIC:
                # Column side, for the unvisited mirror tile: rows J gain Σ_i g_ij x̂_i, for j > i only (i == j is
                # already counted once on the row side).
                g_mirror = tl.trans(tl.where(cols[None, :] > rows[:, None], g, 0.0))
                if GRAD_S:
                    _add_rows(GS, S, b, cols, col_ok, rows, row_ok, g_mirror * rs_rows[None, :], accumulate, DS,
                              s_stride_b, s_stride_n, s_stride_d, gs_stride_b, gs_stride_n, BLOCK_D, True,
                              PRECISION_S)
                if GRAD_T:
                    _add_rows(GT, T, b, cols, col_ok, rows, row_ok, g_mirror * rt_rows[None, :], accumulate, DT,
                              t_stride_b, t_stride_n, t_stride_d, gt_stride_b, gt_stride_n, BLOCK_D, True,
                              PRECISION_T)

    tl.store(LOSS_ROWS + b * N + rows, loss_rows, mask=row_ok)


def _configs(shapes):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=st)
            for bm, bn, bk, bd, w, st in shapes]


# Chosen from ahead-of-time sm_90 compiles (bench/compile_report.py, bench/NOTES.md v3): for 16-bit inputs every
# tile shape here keeps the bf16 training case (deterministic, student gradient) free of register spills.
_CONFIGS_16BIT = _configs([
    (128, 128, 64, 64, 8, 3),
    (128, 64, 64, 64, 8, 3),
    (128, 64, 64, 32, 8, 4),
    (64, 128, 64, 64, 4, 3),
    (64, 64, 64, 64, 4, 4),
])
# Three-TF32 dots hold high and low parts of both operands: only narrow K and D chunks stay near spill-free.
_CONFIGS_FP32 = _configs([
    (128, 64, 32, 32, 8, 4),
    (128, 64, 32, 32, 8, 2),
    (64, 64, 32, 32, 4, 4),
])
_CONFIGS = _CONFIGS_16BIT + _CONFIGS_FP32


def candidate_configs(student_dtype: torch.dtype, teacher_dtype: torch.dtype, tokens: int) -> list:
    """The autotune configs worth timing: the float32 family when either input is float32 (its dots are three-TF32
    wherever it is), and no tile much taller than the problem (a 128-row tile on N = 40 only multiplies zeros)."""
    family = _CONFIGS_FP32 if torch.float32 in (student_dtype, teacher_dtype) else _CONFIGS_16BIT
    fitting = [c for c in family if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(tokens))]
    return fitting or [min(family, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _prune_configs(configs, named_args, **kwargs):
    return candidate_configs(named_args["S"].dtype, named_args["T"].dtype, named_args["N"])


# N enters the key bucketed (N_BUCKET = next power of two), so a new N of similar size reuses the tuned config.
_trd_kernel_tuned = triton.autotune(
    configs=_CONFIGS,
    key=["N_BUCKET", "DS", "DT", "MODE", "SYMMETRIC", "GRAD_S", "GRAD_T"],
    prune_configs_by={"early_config_prune": _prune_configs},
    reset_to_zero=["GS", "GT"],  # the symmetric schedule accumulates with atomics: each timed run starts clean
)(_trd_kernel)


def new_output(shape, device) -> torch.Tensor:
    """Buffers the kernel fills completely (a separate function so tests can poison it with NaN)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _gradient_buffer(shape, device, symmetric: bool) -> torch.Tensor:
    # The symmetric schedule adds into rows from several programs, so it starts from zeros; in the deterministic
    # one each program's first store initialises its own rows.
    return torch.zeros(shape, dtype=torch.float32, device=device) if symmetric else new_output(shape, device)


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs need float32-accurate products: plain TF32 (10-bit mantissa) moves Gram entries by ~1e-3 and
    # flips pairs near the margin. Three TF32 products (hi·hi + hi·lo + lo·hi) match float32's error and keep the
    # tensor cores; "ieee" would fall back to FMA loops. The interpreter computes every dot in float32 anyway.
    if dtype == torch.float32:
        return "tf32x3"
    return "widen" if dtype == torch.bfloat16 and interpreter_enabled() else "tf32"


def kernel_arguments(problem: TRDProblem, r_s, r_t, loss_rows, grad_s, grad_t, symmetric: bool):
    """Positional arguments and compile-time flags of one `_trd_kernel` launch; a gradient given as None is one the
    kernel is compiled not to touch."""
    s, t = problem.student, problem.teacher
    # An untouched gradient still needs a pointer argument: the loss buffer stands in.
    gs = loss_rows if grad_s is None else grad_s
    gt = loss_rows if grad_t is None else grad_t
    args = (
        s, t, r_s, r_t, loss_rows, gs, gt,
        problem.tokens, s.shape[2], t.shape[2], problem.tokens_per_frame, triton.next_power_of_2(problem.tokens),
        problem.margin, *s.stride(), *t.stride(), gs.stride(0), gs.stride(1), gt.stride(0), gt.stride(1),
    )
    flags = dict(MODE=MODE_IDS[problem.mode], SYMMETRIC=symmetric, GRAD_S=grad_s is not None,
                 GRAD_T=grad_t is not None, PRECISION_S=_dot_precision(s.dtype), PRECISION_T=_dot_precision(t.dtype))
    return args, flags


def triton_engine(problem: TRDProblem, r_s, r_t, need_s: bool, need_t: bool,
                  deterministic: bool = True, config: dict | None = None):
    s, t = problem.student, problem.teacher
    for name, x in (("student", s), ("teacher", t)):
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"backend 'triton' takes float32, bfloat16 or float16 {name}, got {x.dtype}; "
                            "use backend='torch' for it")
    if not (s.is_cuda or interpreter_enabled()):
        raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {s.device}; "
                         "use backend='torch' or 'auto'")
    batch, tokens, device = problem.batch, problem.tokens, s.device
    symmetric = not deterministic
    grad_s = _gradient_buffer((batch, tokens, s.shape[2]), device, symmetric) if need_s else None
    grad_t = _gradient_buffer((batch, tokens, t.shape[2]), device, symmetric) if need_t else None
    loss_rows = new_output((batch, tokens), device)
    args, flags = kernel_arguments(problem, r_s, r_t, loss_rows, grad_s, grad_t, symmetric)
    if config or interpreter_enabled():
        kernel, meta = _trd_kernel, dict(config or INTERPRETER_CONFIG)
    else:
        kernel, meta = _trd_kernel_tuned, {}

    def grid(meta):
        return triton.cdiv(tokens, meta["BLOCK_M"]), batch

    kernel[grid](*args, **flags, **meta)
    return loss_rows.sum(), grad_s, grad_t
