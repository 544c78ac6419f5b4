"""The tiny world of the embedded default: synthetic physics clips, and a VAE and a video teacher pretrained on them.

`pretrain_world.py` trains the two once (the VAE to reconstruct the clips, the teacher by VideoMAE's masked video
modelling) and writes them to `videorepa/assets/tiny-world/`, which is committed: `python train.py` then only
trains the transformer, and what it learns shows in the videos. Every size of the world lives here, so the code
that builds the models and the committed weights cannot drift apart (a test loads the weights against these
configs).
"""

import hashlib
import json
import logging
import os

import torch

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny-world")
REGENERATE = "python pretrain_world.py"
log = logging.getLogger(__name__)

# Clips: 17 frames of 64×96 at 12 frames per second (1.4 s: a drop and two bounces). The rate is the world's
# clock: the physics metric converts the renderer's gravity into pixels per frame² with it.
CLIP = dict(num_frames=17, height=64, width=96, fps=12)
TRAIN_CLIPS = 128  # clips train.py renders for the embedded default
DATA_MANIFEST = "world-data.json"  # beside a rendered dataset: what rendered it (see ensure_dataset)

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

# Text: a word-level tokenizer over the captions' words and a 1-layer T5 (width 32, random, frozen). A caption is
# at most 21 tokens with its end token. Words, not bytes: CogVideoX gives text tokens no positions, so over bytes
# the transformer sees little more than a bag of letters, in which "red" and "blue" are hard to tell apart (the
# byte-level model drew the average ball colour whatever the prompt said).
TEXT_TOKENS = 32
TEXT_ENCODER_CONFIG = dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, dropout_rate=0.0)
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2

# 4 blocks × 4 heads × 32 (1.2 M parameters), with CogVideoX-5B's 3-D rotary positions: relative positions in
# attention let neighbouring tokens agree on one ball (absolute sincos positions drew more scattered squares). The
# feed-forward's GELU is the exact one, not CogVideoX's tanh approximation, whose backward on CPUs took 8× longer
# (12 % of a training step).
TRANSFORMER_CONFIG = dict(
    num_attention_heads=4, attention_head_dim=32, in_channels=8, out_channels=8, time_embed_dim=64,
    activation_fn="gelu",
    text_embed_dim=TEXT_ENCODER_CONFIG["d_model"], num_layers=4, sample_width=CLIP["width"] // 4,
    sample_height=CLIP["height"] // 4, sample_frames=CLIP["num_frames"], patch_size=2,
    temporal_compression_ratio=VAE_CONFIG["temporal_compression_ratio"], use_rotary_positional_embeddings=True,
    max_text_seq_length=TEXT_TOKENS,
)

# A VideoMAE ViT at the clip's own size: 8×8 patches, tubelets of 2 frames -> 8×8×12 tokens of width 64, the same
# spatial grid as the transformer's tokens. Pretrained with 4 blocks; the teacher keeps the first TEACHER_BLOCKS.
# Deeper, the tokens of a clip come to share one direction, and their relations lie within TRD's 0.1 margin of any
# collapsed student: after 2 blocks, cosines between a clip's tokens are 0.98 ± 0.03 and 1.5 % of the pairs differ
# by more than the margin (all 4 blocks made the loss zero from the first step); after 1 block they spread (0.90 ±
# 0.15, 28 % of the pairs) and TRD has relations to distil.
TEACHER_BLOCKS = 1
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
    """A hash of the pretrained weights and configs and of the text encoder (its tokenizer and weights, as built
    here): feature caches of the world key on it, so regenerated weights or another text encoder never meet
    latents, teacher tokens or text embeddings of the old ones."""
    tokenizer = build_tokenizer()
    digest = hashlib.sha1(f"{tokenizer.backend_tokenizer.to_str()} {TEXT_TOKENS}".encode())
    for name, tensor in build_text_encoder(tokenizer).state_dict().items():
        digest.update(name.encode() + tensor.numpy().tobytes())
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            if name.endswith((".json", ".safetensors")) and not name.startswith("pretrain-"):
                with open(os.path.join(root, name), "rb") as f:
                    digest.update(name.encode() + f.read())
    return digest.hexdigest()[:16]


def build_tokenizer():
    """A word-level tokenizer (lower-cased words and punctuation marks) whose vocabulary is every word of the
    renderer's captions; other words read as <unk>. A stock `PreTrainedTokenizerFast`: it saves and loads with the
    pipeline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from .synthetic import caption_texts

    normalizer, splitter = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    words = sorted({word for text in caption_texts()
                    for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text))})
    pad, eos, unk = SPECIAL_TOKENS
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate([*SPECIAL_TOKENS, *words])}, unk_token=unk))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, splitter
    tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=pad, eos_token=eos, unk_token=unk,
                                   model_max_length=TEXT_TOKENS)


def build_text_encoder(tokenizer, seed: int = 1):
    """The world's T5 encoder (random weights from `seed`, always the same: like the VAE, a fixed part of the world)."""
    from transformers import T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(T5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1,
                                       **TEXT_ENCODER_CONFIG)).eval()


def build_pipeline(seed: int = 0, path: str = ASSETS):
    """The world's CogVideoX pipeline: the pretrained VAE, the tiny text encoder and a fresh transformer initialised
    from `seed`: what training learns."""
    from diffusers import CogVideoXPipeline

    from .models import build_scheduler, build_transformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = build_transformer("tiny").eval()  # train.py switches on what it trains
    tokenizer = build_tokenizer()
    return CogVideoXPipeline(tokenizer=tokenizer, text_encoder=build_text_encoder(tokenizer), vae=load_vae(path),
                             transformer=transformer, scheduler=build_scheduler())


def clips_digest(num_clips: int, seed: int = 0) -> str:
    """A hash of what the renderer draws for these clips (frames and captions, before video encoding): it changes
    with the renderer, the clip sizes, the seed and the count."""
    from .synthetic import make_clip

    digest = hashlib.sha1(json.dumps(CLIP, sort_keys=True).encode())
    for clip_seed in range(seed, seed + num_clips):
        frames, caption = make_clip(clip_seed, **CLIP)
        digest.update(caption.encode() + frames.tobytes())
    return digest.hexdigest()[:16]


def ensure_dataset(folder: str, num_clips: int, seed: int = 0) -> bool:
    """Makes `folder` (captions.csv, videos/) hold the world's clips (`CLIP` sizes, mp4) of these seeds, rendering
    them unless it already does: a folder of an older renderer, another seed or count is replaced whole rather than
    trained on silently (the feature cache keys on the files, so their features are computed again too). Returns
    whether it rendered. Processes sharing the folder wait for each other."""
    from .files import atomic_folder, exclusive
    from .synthetic import write_dataset

    expected = {"clips": num_clips, "seed": seed, "renderer": clips_digest(num_clips, seed)}
    with exclusive(folder):
        found = dataset_manifest(folder)
        if found == expected:
            return False
        if os.path.exists(folder):
            log.warning("%s holds clips of another renderer, seed or count (%s, expected %s): rendering them again",
                        folder, found, expected)
        log.info("rendering %d synthetic physics clips to %s", num_clips, folder)
        with atomic_folder(folder) as tmp:
            write_dataset(tmp, num_clips=num_clips, seed=seed, **CLIP)
            with open(os.path.join(tmp, DATA_MANIFEST), "w", encoding="utf-8") as f:
                json.dump(expected, f)
    return True


def dataset_manifest(folder: str) -> dict | None:
    """What rendered the clips in `folder` (ensure_dataset's record), or None if unknown or any clip is missing."""
    from .data import read_captions

    try:
        with open(os.path.join(folder, DATA_MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        videos = [video for video, _ in read_captions(os.path.join(folder, "captions.csv"))]
    except (OSError, ValueError):
        return None
    complete = len(videos) == manifest.get("clips") and all(map(os.path.exists, videos))
    return manifest if complete else None
