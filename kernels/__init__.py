"""Token Relation Distillation (TRD) loss kernels, installed as `videorepa.kernels`.

    from videorepa.kernels import trd_loss
    loss = trd_loss(student, teacher, margin=0.1, mode="full", tokens_per_frame=None, backend="auto")
"""

import sys

if __name__ != "videorepa.kernels":
    # A source checkout puts this folder on sys.path as a top-level `kernels`, which transformers imports when it
    # looks for Hugging Face's package of that name. A second copy would register the loss's operators again (the
    # last registration wins, for every caller): `kernels` is made the one `videorepa.kernels` instead.
    import videorepa.kernels

    sys.modules[__name__] = videorepa.kernels
else:
    from .api import trd_loss
    from .validation import BACKENDS, MODES, count_pairs

    __all__ = ["trd_loss", "count_pairs", "MODES", "BACKENDS"]
