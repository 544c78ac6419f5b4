"""The trained model: CogVideoX's transformer plus the alignment heads, one nn.Module so DDP wraps it whole."""

import torch
import torch.nn.functional as F
from torch import nn

from .alignment import TokenAligner
from .diffusion import BlockOutput, diffusion_loss
from .kernels import trd_loss

ALIGN_LOSSES = ("trd", "repa", "none")


def repa_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """REPA's baseline: 1 − cosine similarity of matched tokens, averaged."""
    return 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1).mean()


def aligned_block(transformer, align_layer: int) -> nn.Module:
    """The block whose output is aligned: the align_layer-th, counted from 1 as the paper's --align_layer.
    official: finetune/models/cogvideox_t2v_align/models/cogvideox_align.py, `if (i + 1) == self.align_layer`"""
    blocks = transformer.transformer_blocks
    if not 1 <= align_layer <= len(blocks):
        raise ValueError(f"--align-layer must be in [1, {len(blocks)}] for this transformer, got {align_layer}")
    return blocks[align_layer - 1]


class VideoREPAModel(nn.Module):
    def __init__(self, transformer, scheduler, aligner: TokenAligner, align_layer: int, align_loss: str = "trd",
                 trd_weight: float = 0.5, margin: float = 0.1, trd_mode: str = "full", trd_backend: str = "auto"):
        super().__init__()
        if align_loss not in ALIGN_LOSSES:
            raise ValueError(f"--align-loss must be one of {ALIGN_LOSSES}, got {align_loss!r}")
        self.transformer, self.aligner = transformer, aligner
        self.scheduler = scheduler
        self.align_loss, self.trd_weight, self.margin = align_loss, trd_weight, margin
        self.trd_mode, self.trd_backend = trd_mode, trd_backend
        self.block_output = BlockOutput(aligned_block(transformer, align_layer))

    def alignment(self, hidden: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        student, target = self.aligner(hidden, teacher)
        if self.align_loss == "repa":
            return repa_loss(student, target)
        frame = None if self.trd_mode == "full" else self.aligner.tokens_per_frame
        return trd_loss(student, target.to(student.dtype), self.margin, self.trd_mode, frame, backend=self.trd_backend)

    def forward(self, latents, prompt_embeds, teacher, generator=None) -> dict:
        """Losses for one batch: latents (B, F', C, H', W'), text embeddings, teacher tokens (B, T', H', W', Dt)."""
        diffusion = diffusion_loss(self.transformer, self.scheduler, latents, prompt_embeds, generator)
        hidden = self.block_output.pop()
        if self.align_loss == "none":
            return {"loss": diffusion, "loss_diffusion": diffusion, "loss_align": torch.zeros_like(diffusion)}
        align = self.alignment(hidden, teacher)
        return {"loss": diffusion + self.trd_weight * align, "loss_diffusion": diffusion, "loss_align": align}
