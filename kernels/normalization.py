"""Row L2 normalisation x̂ = x / max(‖x‖, eps), as torch.nn.functional.normalize, split into its two O(N·D) halves.

The fused backends never build x̂ for their Gram tiles: they take inverse norms from `inverse_norms` and scale the
tile products. Their gradient comes out with respect to x̂; `normalization_backward` carries it back to x.
"""

import torch

EPS = 1e-12  # torch.nn.functional.normalize's default


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def inverse_norms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, D) -> (r, clamped): r = 1 / max(‖x‖, eps), float32 (float64 for float64 x), and where eps was taken."""
    norms = torch.linalg.vector_norm(x, dim=-1, dtype=compute_dtype(x))
    return 1.0 / norms.clamp_min(EPS), norms <= EPS


def normalization_backward(
    x: torch.Tensor, inv_norm: torch.Tensor, clamped: torch.Tensor, grad_hat: torch.Tensor
) -> torch.Tensor:
    """dL/dx from dL/dx̂ (overwriting `grad_hat`): r·(g − x̂(x̂·g)) = r·g − r³(x·g)·x; where the norm was clamped,
    x̂ = x/eps is linear in x and it is r·g. No temporary of x's size beyond x in the accumulation dtype."""
    x = x.to(grad_hat.dtype)
    r = inv_norm.unsqueeze(-1)
    x_dot_g = (x.unsqueeze(-2) @ grad_hat.unsqueeze(-1)).squeeze(-1)  # row dot products, no (N, D) product
    coef = (x_dot_g * r.pow(3)).masked_fill_(clamped.unsqueeze(-1), 0.0)
    return grad_hat.mul_(r).addcmul_(x, coef, value=-1.0)

