"""CogVideoX's training objective and the encoders that feed it, on stock diffusers components.

Loss: the transformer predicts v; CogVideoXDPMScheduler.get_velocity(v, x_t, t) turns it into the x₀ estimate
√ᾱ·x_t − √(1−ᾱ)·v, whose squared error against the clean latents is weighted by 1/(1−ᾱ_t) — the v-prediction MSE
of the paper and of diffusers' CogVideoX finetuning script.
"""

import numpy as np
import torch

from .models import text_length


def encode_video_distribution(vae, video: torch.Tensor) -> torch.Tensor:
    """Pixel video (B, F, 3, H, W) in [-1, 1] -> the VAE's latent distribution parameters (B, 2C, F', H', W'), which
    the feature cache keeps; `sample_latents` draws from them."""
    dtype = next(vae.parameters()).dtype
    return vae.encode(video.permute(0, 2, 1, 3, 4).to(dtype)).latent_dist.parameters


def latent_seed(seed: int, clip: int) -> int:
    """The seed of one clip's latent sample: fixed for the run, independent of rank, epoch and batch."""
    return int(np.random.SeedSequence([seed, clip, 0x1A7E27]).generate_state(1, np.uint64)[0] >> 1)


def sample_latents(vae, parameters: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """A scaled latent sample (B, F', C, H', W') from distribution parameters, clip i's from seeds[i]: with
    `latent_seed`, each clip is trained on one fixed latent sample, every epoch, as the official run, which caches
    `latent_dist.sample() * scaling_factor` once per clip and reuses it.
    official: finetune/models/cogvideox_t2v_align/lora_trainer.py (encode_video), finetune/datasets/t2v_dataset.py
    """
    if len(seeds) != parameters.shape[0]:
        raise ValueError(f"one seed per clip: {len(seeds)} seeds for {parameters.shape[0]} clips")
    mean, logvar = parameters.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    # CPU generators keep one stream per clip on any device.
    noise = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
    return ((mean + std * noise.to(mean)) * vae.config.scaling_factor).permute(0, 2, 1, 3, 4)


def encode_prompts(pipe, captions: list[str], device) -> torch.Tensor:
    embeds, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=text_length(pipe),
                                   device=device)
    return embeds


def pad_latent_frames(latents: torch.Tensor, patch_size_t: int | None) -> torch.Tensor:
    """Latents (B, F', C, H', W') with copies of the first frame in front until F' is a multiple of the
    transformer's temporal patch (CogVideoX 1.5's patch_size_t; None: unchanged). CogVideoXPipeline samples the
    same number of extra frames and drops them before decoding.
    official: zai-org/CogVideo finetune/models/cogvideox_t2v/lora_trainer.py (compute_loss)"""
    extra = -latents.shape[1] % patch_size_t if patch_size_t else 0
    return torch.cat([latents[:, :1].expand(-1, extra, -1, -1, -1), latents], 1) if extra else latents


def token_grid(transformer_config, latent_shape) -> tuple[int, int, int]:
    """(frames, height, width) of the transformer's video tokens for latents (B, F', C, H', W') padded as
    `pad_latent_frames` does."""
    patch, patch_t = transformer_config.patch_size, transformer_config.patch_size_t or 1
    _, frames, _, h, w = latent_shape
    return -(-frames // patch_t), h // patch, w // patch


def rotary_embeddings(transformer, latents: torch.Tensor):
    """3-D rotary position embeddings for transformers that use them (CogVideoX-5B, the tiny world's), else None:
    CogVideoXPipeline's own, as it computes them when it samples, for latents (B, F', C, H', W'). It reads sizes in
    pixels and divides by the VAE's spatial factor; latent sizes with a factor of 1 give the same grid."""
    if not transformer.config.use_rotary_positional_embeddings:
        return None
    from types import SimpleNamespace

    from diffusers import CogVideoXPipeline

    _, frames, _, h, w = latents.shape
    sizes = SimpleNamespace(transformer=transformer, vae_scale_factor_spatial=1)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(sizes, h, w, frames, latents.device)


def diffusion_loss(transformer, scheduler, latents, prompt_embeds, generator=None) -> torch.Tensor:
    """The objective for latents (B, F', C, H', W') padded to the transformer's temporal patches, with the rotary
    positions of transformers that use them computed here: without them such a transformer has no positions at all."""
    b = latents.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(latents.device)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    noisy = scheduler.add_noise(latents, noise, t)
    dtype = next(transformer.parameters()).dtype
    v_pred = transformer(hidden_states=noisy.to(dtype), encoder_hidden_states=prompt_embeds.to(dtype), timestep=t,
                         image_rotary_emb=rotary_embeddings(transformer, latents), return_dict=False)[0]
    x0_pred = scheduler.get_velocity(v_pred.float(), noisy, t)
    alphas = scheduler.alphas_cumprod.to(latents.device)[t]
    weights = (1.0 / (1.0 - alphas)).view(b, 1, 1, 1, 1)
    return (weights * (x0_pred - latents) ** 2).mean()


class BlockOutput:
    """Forward hook keeping the video hidden states (B, F·H·W, D) after one transformer block. It overwrites on
    every call, so a block run twice (reentrant checkpointing) leaves the same tensor."""

    def __init__(self, block: torch.nn.Module):
        self.hidden = None
        self.handle = block.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.hidden = output[0]

    def pop(self) -> torch.Tensor:
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError("the aligned transformer block did not run")
        return hidden
