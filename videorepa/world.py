"""The tiny world of the embedded default: synthetic physics clips, and a VAE and a video teacher pretrained on them.

`pretrain_world.py` trains the two once (the VAE to reconstruct the clips, the teacher by VideoMAE's masked video
modelling) and writes them to `videorepa/assets/tiny-world/`, which is committed: `python train.py` then only
trains the transformer, and what it learns shows in the videos. Every size of the world lives here, so the code
that builds the models and the committed weights cannot drift apart (a test loads the weights against these
configs).
"""

import hashlib
import os

import torch

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny-world")
REGENERATE = "python pretrain_world.py"

# Clips: 17 frames of 64×96 at 12 frames per second (1.4 s: a drop and two bounces). The rate is the world's
# clock: the physics metric converts the renderer's gravity into pixels per frame² with it.
CLIP = dict(num_frames=17, height=64, width=96, fps=12)
TRAIN_CLIPS = 128  # clips train.py renders for the embedded default

# Spatial ×4 (three levels), temporal ×4 as CogVideoX: 17×64×96 video -> 5×16×24 latents of 8 channels -> with
# 2×2 patches 5×8×12 = 480 video tokens. A fourth level (×8) leaves a ball less than one latent pixel wide. Narrow
# levels (8, 16, 16): a training step costs a quarter of (16, 32, 32)'s, and sky, floor and disks need little.
VAE_CONFIG = dict(
    block_out_channels=(8, 16, 16), latent_channels=8, layers_per_block=1, norm_num_groups=4,
    down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
    temporal_compression_ratio=4,
    # CogVideoX's own sample size, which sets only the tile size of VAE tiling (half of it, 240×360): tiling then
    # leaves the world's video whole, as it splits a real one. Tiles of half the clip size do not divide it, and
    # diffusers' tiled decode returns frames of the wrong size (70×102 for 64×96).
    sample_height=480, sample_width=720,
)

# 4 blocks × 4 heads × 32 (1.2 M parameters); text from the 1-layer T5 (width 32) of models.assemble_pipeline.
TRANSFORMER_CONFIG = dict(
    num_attention_heads=4, attention_head_dim=32, in_channels=8, out_channels=8, time_embed_dim=64,
    text_embed_dim=32, num_layers=4, sample_width=CLIP["width"] // 4, sample_height=CLIP["height"] // 4,
    sample_frames=CLIP["num_frames"], patch_size=2, temporal_compression_ratio=4, max_text_seq_length=128,
)

# A VideoMAE ViT at the clip's own size: 8×8 patches, tubelets of 2 frames -> 8×8×12 tokens of width 64, the same
# spatial grid as the transformer's tokens. Pretrained with 4 blocks; the teacher keeps the first TEACHER_BLOCKS.
# After all 4, the tokens of a clip share one direction (cosine 0.99 ± 0.01 between them), so their relations lie
# within TRD's 0.1 margin of any collapsed student and the loss is zero from the first step; after 2 blocks the
# cosines spread (0.90 ± 0.16) and TRD has relations to distil.
TEACHER_BLOCKS = 2
TEACHER_CONFIG = dict(
    image_size=(CLIP["height"], CLIP["width"]), patch_size=8, num_frames=CLIP["num_frames"] - 1, tubelet_size=2,
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, qkv_bias=True,
    use_mean_pooling=True, decoder_hidden_size=64, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
    decoder_intermediate_size=128, norm_pix_loss=True,
)


def build_vae():
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX(**VAE_CONFIG)


def teacher_config():
    from transformers import VideoMAEConfig

    return VideoMAEConfig(**TEACHER_CONFIG)


def _missing(path: str, what: str) -> ValueError:
    return ValueError(f"the tiny world's pretrained {what} is missing from {path!r}; regenerate it with `{REGENERATE}`")


def load_vae(path: str = ASSETS):
    from diffusers import AutoencoderKLCogVideoX

    folder = os.path.join(path, "vae")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise _missing(path, "VAE")
    return AutoencoderKLCogVideoX.from_pretrained(folder, torch_dtype=torch.float32).eval()


def teacher_path(path: str = ASSETS) -> str:
    """The pretrained teacher: a transformers VideoMAEModel directory."""
    folder = os.path.join(path, "teacher")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise _missing(path, "teacher")
    return folder


def fingerprint(path: str = ASSETS) -> str:
    """A hash of the pretrained weights and configs: feature caches of the world key on it, so regenerated weights
    never meet latents or teacher tokens of the old ones."""
    digest = hashlib.sha1()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            if name.endswith((".json", ".safetensors")) and not name.startswith("pretrain-"):
                with open(os.path.join(root, name), "rb") as f:
                    digest.update(name.encode() + f.read())
    return digest.hexdigest()[:16]


def build_pipeline(seed: int = 0, path: str = ASSETS):
    """The world's CogVideoX pipeline: the pretrained VAE, the tiny text encoder (always the same one, like the
    VAE a fixed part of the world) and a fresh transformer initialised from `seed`: what training learns."""
    from .models import assemble_pipeline, build_transformer

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    transformer = build_transformer("tiny")
    torch.random.set_rng_state(generator_state)
    return assemble_pipeline(load_vae(path), transformer, seed=0)


def write_dataset(folder: str, num_clips: int, seed: int = 0) -> str:
    """The world's clips (`CLIP` sizes) as mp4 + captions.csv."""
    from .synthetic import write_dataset as write

    return write(folder, num_clips=num_clips, seed=seed, **CLIP)
