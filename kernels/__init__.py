"""Token Relation Distillation (TRD) loss kernels, installed as `videorepa.kernels`.

    from videorepa.kernels import trd_loss
    loss = trd_loss(student, teacher, margin=0.1, mode="full", tokens_per_frame=None, backend="auto")
"""

from .api import trd_loss
from .validation import BACKENDS, MODES, count_pairs

__all__ = ["trd_loss", "count_pairs", "MODES", "BACKENDS"]
