"""Pieces shared by the Triton TRD kernels: dot precision, the Gram tile loop, pair masks, tile
indexing and launch configurations (fixed by rule, so the same inputs give the same bits in every process)."""

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MODE_IDS = {"full": 0, "spatial": 1, "temporal": 2}


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs need float32-accurate products: plain TF32 (10-bit mantissa) moves Gram entries by ~1e-3 and
    # flips pairs near the margin. Three TF32 products (hi·hi + hi·lo + lo·hi) match float32's error and keep the
    # tensor cores; "ieee" would fall back to FMA loops. The interpreter computes every dot in float32 anyway.
    if dtype == torch.float32:
        return "tf32x3"
    return "widen" if dtype == torch.bfloat16 and interpreter_enabled() else "tf32"


def wide_weights(dtype: torch.dtype) -> bool:
    """Gradient weights g_ij·r_j leave float16's range (65504) once a token's norm is below ~1.5e-5, every zero
    token included (r = 1/eps = 1e12): float16 gradient matmuls run on float32 weights (three-TF32) instead."""
    return dtype == torch.float16


# The kernels index the elements inside one clip in int32 (the clip's own offset is int64): a clip's token and
# feature offsets must stay below this.
INT32_OFFSETS = 2**31


def clip_extent(x: torch.Tensor) -> int:
    """1 + the largest element offset inside one clip of x (B, N, D): N·D for a contiguous x."""
    return 1 + sum((size - 1) * stride for size, stride in zip(x.shape[1:], x.stride()[1:]))


def too_large(x: torch.Tensor) -> bool:
    """Whether one clip of x (B, N, D) holds more elements than int32 offsets reach, however it is laid out."""
    return x.shape[1] * x.shape[2] > INT32_OFFSETS


def indexable(x: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), or a contiguous copy where its strides spread one clip past int32 offsets although its elements
    would fit (a sequence-first tensor transposed, a slice of a wider buffer): the kernels would read wrapped
    addresses, silently."""
    return x.contiguous() if clip_extent(x) > INT32_OFFSETS and not too_large(x) else x


def check_inputs(student: torch.Tensor, teacher: torch.Tensor) -> None:
    for name, x in (("student", student), ("teacher", teacher)):
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"backend 'triton' takes float32, bfloat16 or float16 {name}, got {x.dtype}; "
                            "use backend='torch' for it")
        if too_large(x):
            raise ValueError(f"backend 'triton' indexes one clip's elements in int32, but one clip of {name} holds "
                             f"N·D = {x.shape[1] * x.shape[2]} elements (> 2**31); use backend='torch'")
        extent = clip_extent(x)
        if extent > INT32_OFFSETS:
            raise ValueError(f"backend 'triton' indexes one clip's elements in int32, but the strides of {name} "
                             f"{x.stride()} spread one clip over {extent} elements (> 2**31); pass it contiguous")
    if not (student.is_cuda or interpreter_enabled()):
        raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device "
                         f"{student.device}; use backend='torch' or 'auto'")


def device_of(x: torch.Tensor):
    """Context that makes x's GPU the current one: Triton launches on the current device, whatever device the
    tensors are on (a no-op on CPU)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def fitted_block(block: int, dim: int) -> int:
    """A feature-dimension tile no wider than the features need (D = 20 multiplies 32 columns, not 128); 16 is
    the narrowest tensor-core operand."""
    return min(block, max(16, triton.next_power_of_2(dim)))


def new_output(shape, device, dtype=torch.float32) -> torch.Tensor:
    """Buffers a kernel fills completely (one function, so tests can poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch shape of one kernel. `params` are the kernel's tile constexprs."""

    params: tuple  # ((name, value), ...), hashable
    num_warps: int
    num_stages: int

    @classmethod
    def of(cls, num_warps: int, num_stages: int, **params):
        return cls(tuple(sorted(params.items())), num_warps, num_stages)

    def __getitem__(self, name):
        return dict(self.params)[name]

    def launch_kwargs(self) -> dict:
        return {**dict(self.params), "num_warps": self.num_warps, "num_stages": self.num_stages}

    def triton_config(self) -> triton.Config:
        return triton.Config(dict(self.params), num_warps=self.num_warps, num_stages=self.num_stages)


def dtype_family(*dtypes) -> str:
    """The launch-configuration family of a problem's input dtypes: float32 anywhere means three-TF32 dots
    ("fp32"); else float16 anywhere means float32 gradient weights ("fp16"); else "bf16"."""
    return "fp32" if torch.float32 in dtypes else "fp16" if torch.float16 in dtypes else "bf16"


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    if PRECISION == "widen":
        # Triton's interpreter multiplies bfloat16 tiles as their raw uint16 bits; widened to float32 the products
        # are exact, as on tensor cores.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _weighted_dot(w, x, acc, WIDE: tl.constexpr, PRECISION: tl.constexpr):
    """acc + w @ x for gradient weights w = g·diag(r) (float32): in x's dtype, or in float32 when WIDE."""
    if WIDE:
        return _dot(w, x.to(tl.float32), acc, "tf32x3")
    return _dot(w.to(x.dtype), x, acc, PRECISION)


@triton.jit
def _gram(X, b, rows, cols, row_ok, col_ok, D, stride_b, stride_n, stride_d,
          BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """x_rows · x_colsᵀ for one tile of raw tokens, float32, K in ascending chunks."""
    base = X + b * stride_b
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
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
def _kept_pairs(rows, cols, row_ok, col_ok, FRAME, MODE: tl.constexpr):
    """Pairs of the tile that exist (inside N) and that the mode keeps: same frame (spatial), other frame
    (temporal), all (full)."""
    keep = row_ok[:, None] & col_ok[None, :]
    if MODE == 1:
        keep &= (rows // FRAME)[:, None] == (cols // FRAME)[None, :]
    if MODE == 2:
        keep &= (rows // FRAME)[:, None] != (cols // FRAME)[None, :]
    return keep


@triton.jit
def _relu_excess(delta, keep, margin):
    """relu(|Δ| − margin) where kept, 0 elsewhere; a NaN Δ stays NaN (it fails `<= 0`), so a NaN anywhere in the
    inputs reaches the loss as it does in PyTorch's formula instead of vanishing from the sum."""
    excess = tl.abs(delta) - margin
    return tl.where(keep & ~(excess <= 0), excess, 0.0)


@triton.jit
def _band(m0, row_end, N, FRAME, BLOCK: tl.constexpr):
    """First and last column block of BLOCK tokens that share a frame with rows m0 .. min(m0 + BLOCK, row_end) − 1
    (spatial mode). m0 need not be a multiple of BLOCK: a shard's rows start anywhere."""
    first = (m0 // FRAME) * FRAME // BLOCK
    last_row = tl.minimum(m0 + BLOCK, row_end) - 1
    last = (tl.minimum(N, (last_row // FRAME + 1) * FRAME) - 1) // BLOCK
    return first, last


@triton.jit
def _tile_index(I, J, first, NB, NBAND, MODE: tl.constexpr, RECT: tl.constexpr):
    """Slot of tile (row block I, column block J) in the per-tile buffers. The triangle (J ≥ I): packed, or for
    spatial mode a band of NBAND tiles per row block starting at I. A rectangle (a shard's row blocks against all
    column blocks): NB slots per row block, or for spatial mode NBAND starting at the band's first column block
    `first`. int64: slots times per-tile sizes pass 2³¹ at a few hundred thousand tokens."""
    row = tl.cast(I, tl.int64)
    if MODE == 1:
        if RECT:
            return row * NBAND + (J - first)
        return row * NBAND + (J - I)
    if RECT:
        return row * NB + J
    return row * NB - (row * (row - 1)) // 2 + (J - I)

