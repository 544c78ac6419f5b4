"""Named training presets: resolution, frames, where to align, head widths and learning rate.

`cogvideox-2b` follows the paper's recipe (49×480×720 video, the output of the 18th block, teacher at 160×240, lr
2e-6). `tiny` is the embedded default: models built in code with random weights, small enough to train on a CPU in
minutes; it aligns the output of the first of its two blocks.
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
    learning_rate: float
    lora_learning_rate: float


PRESETS = {
    "tiny": Preset("tiny", 9, 64, 96, 1, 64, 32, 48, 1e-3, 1e-3),
    "cogvideox-2b": Preset("cogvideox-2b", 49, 480, 720, 18, 2048, 160, 240, 2e-6, 1e-4),
    "cogvideox-5b": Preset("cogvideox-5b", 49, 480, 720, 18, 2048, 160, 240, 2e-6, 1e-4),
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
