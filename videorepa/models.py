"""CogVideoX pipelines and transformers: the transformers of each preset (the tiny world's pipeline is assembled in
videorepa/world.py), a local CogVideoX directory, the released VideoREPA-2B transformer.

Everything is stock diffusers/transformers; no custom pipeline class, so whatever train.py saves loads with
`CogVideoXPipeline.from_pretrained`.
"""

import inspect
import json
import os

import torch

from .world import TRANSFORMER_CONFIG as TINY_WORLD_TRANSFORMER

# Transformer configurations, one per preset: the tiny world's (the embedded default), and CogVideoX-2B's and -5B's
# (for random-weight benchmarks and real-size shape checks; real weights come from a local directory).
_COGVIDEOX = dict(attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512, text_embed_dim=4096,
                  sample_width=90, sample_height=60, sample_frames=49, patch_size=2, temporal_compression_ratio=4,
                  max_text_seq_length=226)
TRANSFORMER_CONFIGS = {
    "tiny": TINY_WORLD_TRANSFORMER,
    "cogvideox-2b": dict(_COGVIDEOX, num_attention_heads=30, num_layers=30),
    "cogvideox-5b": dict(_COGVIDEOX, num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True),
}


def build_transformer(name: str):
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(**TRANSFORMER_CONFIGS[name])


def build_scheduler():
    """CogVideoX-2B's scheduler settings: v-prediction on a zero-terminal-SNR schedule."""
    from diffusers import CogVideoXDPMScheduler

    return CogVideoXDPMScheduler(
        beta_schedule="scaled_linear", prediction_type="v_prediction", rescale_betas_zero_snr=True,
        clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing", snr_shift_scale=3.0,
    )


def load_pipeline(path: str, dtype: torch.dtype | dict = torch.float32):
    """A local CogVideoX pipeline directory (model_index.json at its root); `dtype` may map component names to
    dtypes, with "default" for the rest."""
    from diffusers import CogVideoXPipeline

    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ValueError(f"--model {path!r} is not a diffusers pipeline directory (no model_index.json)")
    pipe = CogVideoXPipeline.from_pretrained(path, torch_dtype=dtype)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
        module.eval()
    return pipe


def load_transformer(path: str, dtype: torch.dtype = torch.float32):
    """A CogVideoX transformer folder as stock `CogVideoXTransformer3DModel`: (model, left-out tensor names,
    left-out config keys).

    Takes the released VideoREPA-2B `transformer/` as it is: its config names the training class
    CogVideoXTransformer3DModelAlign and adds align_layer, align_dims and projector_dim, and its weights add the
    training-only projector (projectors.*, downsampler_cogvideo_output.*), which sampling never runs (official:
    inference/models/cogvideox_align.py). Those are left out and returned; a stock weight the folder lacks is an
    error (diffusers would leave it uninitialised), as is one of the wrong shape.
    """
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.utils import logging as diffusers_logging

    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"--transformer {path!r} is not a transformer folder (no config.json)")
    with open(config_file) as f:
        config = json.load(f)
    if not str(config.get("_class_name", "")).startswith("CogVideoXTransformer3DModel"):
        raise ValueError(f"--transformer {path!r} holds a {config.get('_class_name')!r}, not a CogVideoX transformer")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its warnings on the extras, multi-line; the caller reports them
    try:
        model, info = CogVideoXTransformer3DModel.from_pretrained(path, torch_dtype=dtype, output_loading_info=True)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        raise ValueError(f"--transformer {path!r} lacks {len(info['missing_keys'])} weights of "
                         f"CogVideoXTransformer3DModel: {', '.join(sorted(info['missing_keys']))}")
    stock_keys = inspect.signature(CogVideoXTransformer3DModel.__init__).parameters
    extra_config = sorted(k for k in config if not k.startswith("_") and k not in stock_keys)
    return model.eval(), sorted(info["unexpected_keys"]), extra_config


SAMPLING_FILE = "sampling.json"  # in the pipelines and LoRA folders train.py writes: the preset's sampling settings


def record_sampling(folder: str, guidance_scale: float) -> None:
    """Record the guidance scale that sample.py takes by default for the weights in `folder`."""
    with open(os.path.join(folder, SAMPLING_FILE), "w") as f:
        json.dump({"guidance_scale": guidance_scale}, f, indent=1)


def recorded_guidance(folder: str) -> float | None:
    """The guidance scale train.py recorded for the weights in `folder`, or None (any other CogVideoX model)."""
    path = os.path.join(folder, SAMPLING_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return float(json.load(f)["guidance_scale"])


def text_length(pipe) -> int:
    """Text tokens the transformer was built for (226 for CogVideoX)."""
    return pipe.transformer.config.max_text_seq_length


def generate_video(pipe, prompt: str, seed: int, num_frames: int | None = None, height: int | None = None,
                   width: int | None = None, steps: int = 50, guidance_scale: float = 6.0,
                   use_dynamic_cfg: bool = False):
    """uint8 frames (F, H, W, 3) from a CogVideoX pipeline; unset sizes default to the model's own. A prompt longer
    than the text encoder's limit is truncated, with the pipeline's warning."""
    frames = pipe(prompt, num_frames=num_frames or pipe.transformer.config.sample_frames, height=height, width=width,
                  num_inference_steps=steps, guidance_scale=guidance_scale, use_dynamic_cfg=use_dynamic_cfg,
                  max_sequence_length=text_length(pipe), generator=torch.Generator().manual_seed(seed),
                  output_type="np").frames[0]
    # Floats in [0, 1] become uint8 exactly once, here; the video writer takes uint8 as is.
    return (frames * 255).round().clip(0, 255).astype("uint8")
