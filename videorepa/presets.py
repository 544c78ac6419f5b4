"""Named training presets: video size, where to align, head widths, and the optimisation recipe.

`cogvideox-2b` and `cogvideox-5b` follow the paper's runs (official: finetune/scripts/multigpu_VideoREPA_2B_sft.sh,
multigpu_VideoREPA_5B_lora.sh, configs/zero2.yaml): 49×480×720 video, the output of the 18th block aligned, teacher
at 160×240, 4 clips per GPU, DeepSpeed's WarmupDecayLR as the official run; 2B a full finetune at lr 2e-6 for 4
epochs, 5B LoRA r = 128, α = 64 at lr 1e-4 for 1 epoch. `tiny` is the embedded default, the tiny world of
videorepa/world.py: its pretrained VAE and teacher, a transformer trained from scratch, small enough to train on a
CPU in minutes; it aligns the output of the second of its four blocks.
"""

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Preset:
    name: str
    num_frames: int  # pixel frames fed to the VAE: 4k + 1
    height: int
    width: int
    # The output of the align_layer-th transformer block is aligned, counted from 1 as the paper's --align_layer: 18
    # means after 18 blocks, transformer_blocks[17].
    align_layer: int
    projector_hidden: int  # projector MLP: D_student -> hidden -> hidden -> D_teacher
    teacher_height: int  # teacher input resolution
    teacher_width: int
    learning_rate: float  # full finetune
    lora_learning_rate: float
    lora_rank: int  # 0: full finetune
    lora_alpha: float | None  # None: the rank (α/r = 1)
    batch_size: int  # clips per process
    lr_scheduler: str  # constant, linear or cosine after a linear warm-up, or warmup-decay (DeepSpeed's)
    warmup_steps: int
    max_steps: int | None  # the run's length: optimizer steps, or
    num_epochs: int | None  # passes over the data
    # Classifier-free guidance sample.py uses for this preset's outputs (train.py records it beside them).
    guidance_scale: float


# official: DeepSpeed's WarmupDecayLR (finetune/configs/zero2.yaml: every parameter "auto"). accelerate 1.3.0
# fills warmup_num_steps from DummyScheduler.warmup_num_steps (accelerator.py, _prepare_deepspeed), but
# finetune/trainer.py (prepare_optimizer) passes `num_warmup_steps=`, which DummyScheduler keeps in **kwargs, so
# the trainer's 100 never arrives: the 0 default goes in, DeepSpeed 0.16.3 raises it to its minimum of 2 with its
# default log-shaped warm-up (lr 0, 0, then the peak), and decays linearly over the run (train.warmup_decay).
_PAPER = dict(num_frames=49, height=480, width=720, align_layer=18, projector_hidden=2048, teacher_height=160,
              teacher_width=240, batch_size=4, lr_scheduler="warmup-decay", warmup_steps=2, max_steps=None,
              guidance_scale=6.0)  # official: inference/generate.py

PRESETS = {
    # The tiny world (videorepa/world.py): aligned after 2 of its 4 blocks; teacher at the clip's own size. Sampled
    # without guidance: trained from scratch on captions alone (no caption dropout, as the paper's runs), it has no
    # unconditional prediction to guide away from, and guidance 6 blew its balls up into blocks of colour.
    "tiny": Preset("tiny", num_frames=17, height=64, width=96, align_layer=2, projector_hidden=128, teacher_height=64,
                   teacher_width=96, learning_rate=1e-3, lora_learning_rate=1e-3, lora_rank=0, lora_alpha=None,
                   batch_size=8, lr_scheduler="constant", warmup_steps=0, max_steps=1000, num_epochs=None,
                   guidance_scale=1.0),
    "cogvideox-2b": Preset("cogvideox-2b", **_PAPER, learning_rate=2e-6, lora_learning_rate=1e-4, lora_rank=0,
                           lora_alpha=None, num_epochs=4),
    "cogvideox-5b": Preset("cogvideox-5b", **_PAPER, learning_rate=2e-6, lora_learning_rate=1e-4, lora_rank=128,
                           lora_alpha=64, num_epochs=1),
}


def get_preset(name: str, **overrides) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def video_size_error(num_frames: int | None, height: int | None, width: int | None) -> str | None:
    """Why CogVideoX cannot take this video size (unset values pass), or None: the VAE needs 4k + 1 frames and
    sides that are multiples of 16 (×8 in the VAE, then 2×2 patches)."""
    if num_frames is not None and (num_frames < 5 or (num_frames - 1) % 4):
        return f"--num-frames must be 4k + 1 and at least 5 (CogVideoX's VAE), got {num_frames}"
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value <= 0 or value % 16):
            return f"--{name} must be a positive multiple of 16 (multiples of 16 fit the VAE and patches), got {value}"
    return None
