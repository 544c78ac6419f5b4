"""Benchmark inputs whose student is correlated with the teacher, so that a chosen share of pairs is active.

A pair is active when |Δ| = |ŝ_i·ŝ_j − t̂_i·t̂_j| exceeds the margin: only then does it add to the loss and put a
±1 into the gradient's weight matrix. Independent randn tokens at D = 768 leave ~5 % of pairs active (Δ is a
difference of two cosines of spread 1/√D), so the gradient matmul multiplies a mostly-zero matrix: the tensor
cores draw less power and hold higher clocks than in training. These inputs instead give both models the low-rank
structure of real features and mix the student's structure with the teacher's:

    z, z' ~ N(0, I_k) per token, k = LATENT_RANK;  A_t (k × Dt), A_s (k × Ds) with orthogonal rows
    teacher = √f · z A_t + √(1 − f) · noise
    student = √f · (ρ z + √(1 − ρ²) z') A_s + √(1 − f) · noise'

so token cosines spread with std ≈ f/√k = 0.15 in both models (f = SIGNAL) and the Grams agree more as ρ → 1.
`calibrate_mixing` bisects ρ until the measured active share hits the target; every benchmark row records the
share measured on its own inputs (`active_share`). bench/NOTES.md gives where the default target comes from.
"""

import functools
import math

import torch

from videorepa.kernels import count_pairs

LATENT_RANK = 16
SIGNAL = 0.6  # share of each token's variance in the low-rank part
DEFAULT_ACTIVE_SHARE = 0.5
CALIBRATION_TOKENS = 1024


def _basis(rank: int, dim: int, gen, device) -> torch.Tensor:
    """(rank, dim) with orthogonal rows of squared norm dim/rank: z @ A keeps z's cosines and has unit-variance
    coordinates."""
    q, _ = torch.linalg.qr(torch.randn(dim, rank, generator=gen, device=device))
    return q[:, :rank].T * math.sqrt(dim / rank)


def _tokens(latent, basis, gen):
    noise = torch.randn(*latent.shape[:-1], basis.shape[1], generator=gen, device=latent.device)
    return math.sqrt(SIGNAL) * (latent @ basis) + math.sqrt(1 - SIGNAL) * noise


def correlated_pair(batch: int, tokens: int, student_dim: int, teacher_dim: int, mixing: float, device, seed: int):
    """float32 (student, teacher), each (batch, tokens, dim), with student-teacher latent correlation `mixing`."""
    if not 0.0 <= mixing <= 1.0:
        raise ValueError(f"mixing must be in [0, 1], got {mixing}")
    gen = torch.Generator(device=device).manual_seed(seed)
    rank = min(LATENT_RANK, student_dim, teacher_dim)
    latent = torch.randn(batch, tokens, rank, generator=gen, device=device)
    private = torch.randn(batch, tokens, rank, generator=gen, device=device)
    teacher = _tokens(latent, _basis(rank, teacher_dim, gen, device), gen)
    student = _tokens(mixing * latent + math.sqrt(1 - mixing**2) * private, _basis(rank, student_dim, gen, device),
                      gen)
    return student, teacher


def active_share(student, teacher, margin: float = 0.1, mode: str = "full", tokens_per_frame=None,
                 block: int = 1024) -> float:
    """Share of the pairs `mode` keeps whose |Δ| exceeds `margin` (diagonal included, as in the loss), computed
    block by block in float32 so no N×N matrix is held."""
    s = torch.nn.functional.normalize(student.detach().float(), dim=-1)
    t = torch.nn.functional.normalize(teacher.detach().float(), dim=-1)
    if s.dim() == 2:
        s, t = s[None], t[None]
    n = s.shape[1]
    frame = torch.arange(n, device=s.device) // (tokens_per_frame or n)
    active = 0
    for start in range(0, n, block):
        rows = slice(start, min(start + block, n))
        hit = ((s[:, rows] @ s.mT) - (t[:, rows] @ t.mT)).abs() > margin
        if mode != "full":
            same = frame[rows, None] == frame[None, :]
            hit &= same if mode == "spatial" else ~same
        active += int(hit.sum())
    return active / (s.shape[0] * count_pairs(n, tokens_per_frame or n, mode))


@functools.lru_cache(maxsize=None)
def calibrate_mixing(target: float, student_dim: int, teacher_dim: int, device: str, margin: float = 0.1,
                     tokens: int = CALIBRATION_TOKENS, iterations: int = 16) -> float:
    """The mixing ρ whose inputs have `target` of their pairs active (full mode), by bisection on a
    `tokens`-token sample: the share falls from its independent-latent value at ρ = 0 to a few % at ρ = 1."""
    def share(mixing):
        return active_share(*correlated_pair(1, tokens, student_dim, teacher_dim, mixing, device, seed=12345), margin)

    high, low = share(0.0), share(1.0)
    if not low <= target <= high:
        raise ValueError(f"--active-share {target} is out of reach for Ds={student_dim}, Dt={teacher_dim}: these "
                         f"inputs give {low:.3f} to {high:.3f}")
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if share(mid) > target else (lo, mid)
    return (lo + hi) / 2
