"""Frozen self-supervised video teachers, as transformers models: VideoMAEv2 (its official checkpoint converted into
VideoMAEModel, the same ViT), VideoMAE and V-JEPA 2 from local transformers directories, or a tiny VideoMAE built
in code. A teacher maps pixel video (B, F, 3, H, W) in [-1, 1] to a token grid (B, T', H', W', D).

Preprocessing as the paper: the first frame is dropped (CogVideoX's VAE encodes it alone as the first latent
frame), frames are resized bicubic without antialiasing to the teacher's input size and ImageNet-normalised, and
VideoMAE's fixed sinusoid position table is fitted to the input grid (bicubic in space, linear in time), since the
pretrained table describes the 16×224² grid. Features are the last block's output, before any final norm.
"""

import os
import re

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEACHERS = ("videomaev2", "videomae", "vjepa2", "tiny")


def teacher_pixels(video: torch.Tensor, height: int, width: int, tubelet: int) -> torch.Tensor:
    """Pixel video (B, F, 3, H, W) in [-1, 1] -> the teacher's input: first frame dropped, whole tubelets kept,
    resized to height × width, ImageNet-normalised."""
    frames = video[:, 1:]
    frames = frames[:, :(frames.shape[1] // tubelet) * tubelet]
    b, f = frames.shape[:2]
    # official: finetune/models/cogvideox_t2v_align/lora_trainer.py, compute_loss: F.interpolate(...,
    # mode='bicubic'), no antialias. It normalises first; both steps are linear, so the order does not matter.
    frames = F.interpolate(frames.flatten(0, 1).float(), size=(height, width), mode="bicubic",
                           align_corners=False, antialias=False).unflatten(0, (b, f))
    mean = torch.tensor(IMAGENET_MEAN, device=frames.device).view(1, 1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=frames.device).view(1, 1, 3, 1, 1)
    return ((frames + 1) / 2 - mean) / std


class VideoTeacher(nn.Module):
    def __init__(self, model: nn.Module, kind: str, height: int, width: int, patch: int, tubelet: int):
        super().__init__()
        self.model, self.kind = model, kind
        self.height, self.width, self.patch, self.tubelet = height, width, patch, tubelet
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always in eval mode

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def grid(self, num_frames: int) -> tuple[int, int, int]:
        """Token grid (T', H', W') for `num_frames` input video frames (the first is dropped)."""
        return (num_frames - 1) // self.tubelet, self.height // self.patch, self.width // self.patch

    def preprocess(self, video: torch.Tensor) -> torch.Tensor:
        return teacher_pixels(video, self.height, self.width, self.tubelet)

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(video).to(next(self.model.parameters()).dtype)
        t, h, w = self.grid(video.shape[1])
        if self.kind == "vjepa2":  # its final norm is an Identity (load_teacher)
            tokens = self.model(pixel_values_videos=pixels, skip_predictor=True).last_hidden_state
        else:
            # The encoder's last hidden state, before any final LayerNorm (the paper aligns to that).
            tokens = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        return tokens.reshape(video.shape[0], t, h, w, -1)


def fit_position_table(model, frames: int, height: int, width: int) -> None:
    """Resample VideoMAE's sinusoid position table from its config's grid to the input grid, in place."""
    cfg = model.config
    size = cfg.image_size if isinstance(cfg.image_size, (tuple, list)) else (cfg.image_size, cfg.image_size)
    src = (cfg.num_frames // cfg.tubelet_size, size[0] // cfg.patch_size, size[1] // cfg.patch_size)
    dst = (frames // cfg.tubelet_size, height // cfg.patch_size, width // cfg.patch_size)
    table = model.embeddings.position_embeddings  # (1, T·H·W, D)
    if src != dst:
        grid = table.reshape(*src, -1).permute(0, 3, 1, 2).float()  # (T, D, H, W)
        grid = F.interpolate(grid, size=dst[1:], mode="bicubic", align_corners=False)
        grid = grid.permute(1, 2, 3, 0).reshape(1, -1, src[0])  # (1, D·H'·W', T)
        grid = F.interpolate(grid, size=dst[0], mode="linear", align_corners=False)
        table = grid.reshape(-1, dst[1] * dst[2], dst[0]).permute(2, 1, 0).reshape(1, -1, table.shape[-1])
    model.embeddings.position_embeddings = table.contiguous()
    embed = model.embeddings.patch_embeddings
    embed.image_size = (height, width)
    embed.num_patches = model.embeddings.num_patches = dst[0] * dst[1] * dst[2]


# Official VideoMAEv2 (timm-style ViT) names -> transformers VideoMAEModel names.
_VIDEOMAEV2_RENAMES = [
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layer.\1.layernorm_before."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layer.\1.layernorm_after."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^blocks\.(\d+)\.attn\.q_bias$", r"encoder.layer.\1.attention.attention.query.bias"),
    (r"^blocks\.(\d+)\.attn\.v_bias$", r"encoder.layer.\1.attention.attention.value.bias"),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
]
_VIDEOMAEV2_DROPPED = re.compile(r"^(norm|fc_norm|head)\.|^pos_embed$")  # final norm/head: unused; positions: fixed


def default_heads(hidden: int) -> int:
    """Head count, which weights do not reveal: 64-wide heads (ViT-S/B/L) except ViT-g (1408 = 16 × 88)."""
    return 16 if hidden == 1408 else max(1, hidden // 64)


def convert_videomaev2_state_dict(state: dict, num_heads: int | None = None):
    """(VideoMAEConfig, state dict for VideoMAEModel) from an official VideoMAEv2 checkpoint's state dict."""
    from transformers import VideoMAEConfig

    for wrapper in ("model", "module", "state_dict"):
        if wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    state = {re.sub(r"^(module\.|encoder\.)", "", k): v for k, v in state.items()}
    if "patch_embed.proj.weight" not in state:
        raise ValueError("not a VideoMAEv2 checkpoint: no 'patch_embed.proj.weight' key")
    proj = state["patch_embed.proj.weight"]  # (D, 3, tubelet, patch, patch)
    hidden, tubelet, patch = proj.shape[0], proj.shape[2], proj.shape[3]
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    converted = {}
    for key, value in state.items():
        if _VIDEOMAEV2_DROPPED.search(key):
            continue
        qkv = re.match(r"^blocks\.(\d+)\.attn\.qkv\.weight$", key)
        if qkv:
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                converted[f"encoder.layer.{qkv.group(1)}.attention.attention.{name}.weight"] = part
            continue
        new = key
        for pattern, replacement in _VIDEOMAEV2_RENAMES:
            new = re.sub(pattern, replacement, new)
        if new == key:
            raise ValueError(f"unexpected key {key!r} in the VideoMAEv2 checkpoint")
        converted[new] = value
    # official: finetune/models/cogvideox_t2v_align/models/ssl/VideoMAEv2.py, norm_layer=partial(nn.LayerNorm,
    # eps=1e-6). `qkv_bias` is the 4.x name; 5.x reads it as `qv_bias`.
    config = VideoMAEConfig(
        image_size=224, patch_size=patch, num_frames=16, tubelet_size=tubelet, hidden_size=hidden,
        num_hidden_layers=layers, num_attention_heads=num_heads or default_heads(hidden),
        intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0], qkv_bias="blocks.0.attn.q_bias" in state,
        use_mean_pooling=True, layer_norm_eps=1e-6,
    )
    return config, converted


def fit_attention_bias_names(state: dict, model_keys) -> dict:
    """`state` with VideoMAE's query and value biases named as `model_keys` name them: transformers 4.x keeps them
    as parameters of their own (attention.attention.q_bias / v_bias), 5.x as the projections' biases
    (attention.attention.query.bias / value.bias, which the conversion writes)."""
    if not any(k.endswith("attention.attention.q_bias") for k in model_keys):
        return state
    names = {"query.bias": "q_bias", "value.bias": "v_bias"}
    projection_bias = re.compile(r"(?<=attention\.attention\.)(query|value)\.bias$")
    return {projection_bias.sub(lambda m: names[m.group(0)], k): v for k, v in state.items()}


def load_videomaev2(path: str):
    """VideoMAEModel holding the official VideoMAEv2 checkpoint at `path`, whichever transformers version runs."""
    from transformers import VideoMAEModel

    config, state = convert_videomaev2_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model = VideoMAEModel(config)
    state = fit_attention_bias_names(state, model.state_dict().keys())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"VideoMAEv2 conversion mismatch: missing {missing}, unexpected {unexpected}")
    return model


def load_teacher(kind: str, path: str | None, height: int, width: int, num_frames: int) -> VideoTeacher:
    """A frozen teacher for video of `num_frames` frames, resized to height × width."""
    if kind not in TEACHERS:
        raise ValueError(f"--teacher must be one of {TEACHERS}, got {kind!r}")
    if kind == "tiny":  # the tiny world's VideoMAE, pretrained on its clips
        from .world import teacher_path

        kind, path = "videomae", teacher_path()
    if not path or not os.path.exists(path):
        raise ValueError(f"--teacher {kind} needs --teacher-path pointing at local weights, got {path!r}")
    frames = num_frames - 1
    if kind == "videomaev2":
        model = load_videomaev2(path)
    elif kind == "videomae":
        from transformers import VideoMAEModel

        model = VideoMAEModel.from_pretrained(path)
    else:
        try:
            from transformers import VJEPA2Model
        except ImportError as err:
            raise ImportError("--teacher vjepa2 needs transformers >= 4.53 (VJEPA2Model)") from err

        if height != width:
            raise ValueError(f"V-JEPA 2 takes square input; got teacher size {height}×{width}")
        # Its rotary positions assume the crop_size grid: set it to the input or positions are silently wrong.
        model = VJEPA2Model.from_pretrained(path, crop_size=height, frames_per_clip=frames)
        # Features before the final norm. official: finetune/models/cogvideox_t2v_align/lora_trainer.py,
        # `self.vision_encoder.norm = torch.nn.Identity()`
        model.encoder.layernorm = nn.Identity()
        cfg = model.config
        return VideoTeacher(model, kind, height, width, cfg.patch_size, cfg.tubelet_size)
    fit_position_table(model, (frames // model.config.tubelet_size) * model.config.tubelet_size, height, width)
    return VideoTeacher(model, kind, height, width, model.config.patch_size, model.config.tubelet_size)
