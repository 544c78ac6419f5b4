"""nn.Module wrappers around the alignment losses."""

from typing import Optional

import torch
from torch import nn

from .kernels import trd_loss


class TRDLoss(nn.Module):
    """Token Relation Distillation loss as a module; same arguments as `videorepa.kernels.trd_loss`.

    Example:
        >>> criterion = TRDLoss(margin=0.1, mode="full")
        >>> student = torch.randn(2, 64, 32, requires_grad=True)
        >>> teacher = torch.randn(2, 64, 48)
        >>> criterion(student, teacher).backward()

    With `group` (a torch.distributed process group) each process passes its slice of the token axis and gets the
    loss of the whole clips (sequence parallelism).
    """

    def __init__(
        self,
        margin: float = 0.1,
        mode: str = "full",
        tokens_per_frame: Optional[int] = None,
        backend: str = "auto",
        schedule: str = "auto",
        group=None,
    ):
        super().__init__()
        self.margin = margin
        self.mode = mode
        self.tokens_per_frame = tokens_per_frame
        self.backend = backend
        self.schedule = schedule
        self.group = group

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return trd_loss(
            student,
            teacher,
            margin=self.margin,
            mode=self.mode,
            tokens_per_frame=self.tokens_per_frame,
            backend=self.backend,
            schedule=self.schedule,
            group=self.group,
        )

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, mode={self.mode!r}, tokens_per_frame={self.tokens_per_frame}, "
                f"backend={self.backend!r}, schedule={self.schedule!r}")
