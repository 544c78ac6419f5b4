"""From DiT hidden states to tokens that line up one-to-one with the teacher's, shapes derived, never hard-coded.

Student grid (F, H, W) of the transformer's tokens (latent frames × patches, or latent frame pairs × patches with
CogVideoX 1.5's temporal patches); teacher grid (T', H', W'). Two ways to pair them:
- "teacher" (the paper's): drop the first token frame (it holds the first pixel frame, which the VAE encodes alone
  and the teacher never sees; with 1.5's temporal patches, beside the copy that pads it, or beside the next latent
  frame where nothing pads), resample time trilinearly to T', and a learned Conv2d with kernel = stride = H/H'
  maps space onto the teacher's grid. N = T'·H'·W' (3,600 at CogVideoX-2B).
- "student": the same in time, but the teacher is resampled up to the student's full spatial grid and no conv is
  learned. N = T'·H·W (32,400 at CogVideoX-2B): only a kernel that never builds N×N makes that affordable.
"""

import torch
import torch.nn.functional as F
from torch import nn

GRIDS = ("teacher", "student")


class Projector(nn.Module):
    """The paper's MLP: D_student -> hidden -> hidden -> D_teacher with SiLU."""

    def __init__(self, student_dim: int, hidden: int, teacher_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(student_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, teacher_dim))

    def forward(self, x):
        return self.net(x)


def _resample_time(grid: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, T, H, W, D) -> (B, frames, H, W, D), trilinear (linear in time, identity in space)."""
    if grid.shape[1] == frames:
        return grid
    x = grid.permute(0, 4, 1, 2, 3)  # (B, D, T, H, W)
    x = F.interpolate(x, size=(frames, *x.shape[-2:]), mode="trilinear", align_corners=False)
    return x.permute(0, 2, 3, 4, 1)


class TokenAligner(nn.Module):
    """Student hidden states (B, F·H·W, D_s) + teacher grid (B, T', H', W', D_t) -> matched tokens (B, N, D_t) each,
    plus tokens per frame for the spatial/temporal TRD modes."""

    def __init__(self, student_dim: int, teacher_dim: int, hidden: int, student_grid: tuple[int, int, int],
                 teacher_grid: tuple[int, int, int], relation_grid: str = "teacher"):
        super().__init__()
        if relation_grid not in GRIDS:
            raise ValueError(f"--relation-grid must be one of {GRIDS}, got {relation_grid!r}")
        (f, h, w), (t, th, tw) = student_grid, teacher_grid
        if f < 2:
            raise ValueError(f"the student needs at least 2 latent frames to drop the first, got grid {student_grid}")
        self.student_grid, self.teacher_grid, self.relation_grid = student_grid, teacher_grid, relation_grid
        self.projector = Projector(student_dim, hidden, teacher_dim)
        self.spatial = None
        if relation_grid == "teacher":
            if h % th or w % tw or h // th != w // tw:
                raise ValueError(f"student grid {h}×{w} must be the same integer multiple of the teacher grid "
                                 f"{th}×{tw} in both directions (or use --relation-grid student)")
            k = h // th
            self.spatial = nn.Conv2d(teacher_dim, teacher_dim, kernel_size=k, stride=k)

    @property
    def tokens_per_frame(self) -> int:
        _, h, w = self.student_grid if self.relation_grid == "student" else self.teacher_grid
        return h * w

    def forward(self, hidden: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, h, w = self.student_grid
        frames = teacher.shape[1]
        student = self.projector(hidden.reshape(hidden.shape[0], f, h, w, -1)[:, 1:])
        student = _resample_time(student, frames)  # (B, T', H, W, D_t)
        if self.spatial is not None:
            x = self.spatial(student.flatten(0, 1).permute(0, 3, 1, 2))  # (B·T', D_t, H', W')
            student = x.permute(0, 2, 3, 1).unflatten(0, (-1, frames))
        else:
            x = teacher.flatten(0, 1).permute(0, 3, 1, 2).float()
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
            teacher = x.permute(0, 2, 3, 1).unflatten(0, (-1, frames)).to(teacher.dtype)
        return student.flatten(1, 3), teacher.flatten(1, 3)
