"""Generate videos with a CogVideoX pipeline: a train.py output (full finetune or LoRA), any CogVideoX directory, or
the released VideoREPA checkpoints on their base models.

    python sample.py                                          # newest output of `python train.py` (runs/tiny)
    python sample.py --model runs/2b/final --prompts prompts/videorepa_demos.txt --output-dir videos --seed 0 1
    python sample.py --model runs/2b-lora/final --lora-scale 0.8 --prompt "Glass shatters on the floor." --output a.mp4
    python sample.py --model CogVideoX-2b --transformer VideoREPA/transformer
    python sample.py --model CogVideoX-5b --lora VideoREPA/pytorch_lora_weights.safetensors --lora-scale 0.5

The last two run the released VideoREPA-2B and VideoREPA-5B on their base models, as downloaded. Defaults are the
official inference's (inference/generate.py): CogVideoXDPMScheduler with trailing timestep spacing, dynamic
classifier-free guidance at scale 6 (or the scale train.py recorded for its preset: 1 for the tiny world), 50
steps, seed 42, 8 fps, VAE slicing and tiling. Stock diffusers CogVideoXPipeline throughout: LoRA weights are fused
with `load_lora_weights` and `fuse_lora`.
"""

import argparse
import json
import os
import re
import sys

import torch

from videorepa.attention import ATTENTION, attention_kernel, resolve_attention
from videorepa.models import generate_video, load_transformer, recorded_guidance
from videorepa.presets import video_size_error
from videorepa.synthetic import falling_caption

DEFAULT_RUN = os.path.join("runs", "tiny")
SCHEDULERS = {"dpm": "CogVideoXDPMScheduler", "ddim": "CogVideoXDDIMScheduler"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", help=f"pipeline directory, train.py's final/ (full or LoRA) or its output directory "
                   f"(default: {DEFAULT_RUN}, the embedded default's output)")
    m.add_argument("--transformer", help="transformer folder that replaces the pipeline's, e.g. the released "
                   "VideoREPA-2B transformer/ (its training-only projector is left out and reported)")
    m.add_argument("--lora", help="LoRA weights fused onto --model: a .safetensors file in diffusers key names or a "
                   "folder holding pytorch_lora_weights.safetensors, e.g. the released VideoREPA-5B")
    m.add_argument("--lora-scale", type=float, default=1.0,
                   help="multiplier on the LoRA's own alpha/rank (default 1: as trained). A file that records no "
                   "alpha counts alpha = rank: the released VideoREPA-5B (alpha/rank = 64/128) takes 0.5")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="a prompt (repeatable); prompts over the text encoder's "
                     "limit (226 tokens for CogVideoX) are truncated with a warning")
    src.add_argument("--prompts", help="text file with one prompt per line (# starts a comment)")
    dst = p.add_mutually_exclusive_group()
    dst.add_argument("--output", help="the video file (one prompt and one seed)")
    dst.add_argument("--output-dir", help="folder for one video per prompt and seed (default: samples/)")
    p.add_argument("--num-frames", type=int, help="4k + 1 frames (default: the model's, 49 for CogVideoX)")
    p.add_argument("--height", type=int, help="multiple of 16 (default: the model's)")
    p.add_argument("--width", type=int, help="multiple of 16 (default: the model's)")
    g = p.add_argument_group("sampling (defaults: the official inference's)")
    g.add_argument("--scheduler", choices=list(SCHEDULERS), default="dpm",
                   help="CogVideoXDPMScheduler or CogVideoXDDIMScheduler, on the model's noise schedule")
    g.add_argument("--timestep-spacing", choices=["trailing", "leading", "linspace"], default="trailing")
    g.add_argument("--steps", type=int, default=50, help="denoising steps")
    g.add_argument("--guidance-scale", type=float, help="default: what train.py recorded for its preset (1 for the "
                   "tiny world, which has no unconditional prediction to guide with), else the official 6")
    g.add_argument("--dynamic-cfg", action=argparse.BooleanOptionalAction, default=True,
                   help="CogVideoX's guidance scale that rises over the steps")
    g.add_argument("--seed", type=int, nargs="+", default=[42], help="one or more seeds: one video per seed")
    g.add_argument("--fps", type=int, default=8)
    g.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=True,
                   help="decode the video in tiles (less GPU memory)")
    g.add_argument("--vae-slicing", action=argparse.BooleanOptionalAction, default=True,
                   help="decode one video of the batch at a time")
    p.add_argument("--format", choices=["mp4", "gif"], default="mp4")
    p.add_argument("--lossless", action="store_true", help="mp4 that stores every RGB value exactly (H.264 RGB, "
                   "qp 0): for evaluation; fewer players take it")
    p.add_argument("--attention", choices=ATTENTION, default="auto")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--cpu-offload", action="store_true", help="keep models on CPU, move each to the GPU when used")
    args = p.parse_args(argv)
    if args.prompts:
        if not os.path.isfile(args.prompts):
            p.error(f"--prompts {args.prompts!r}: no such file")
        with open(args.prompts, encoding="utf-8") as f:
            args.prompt = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        if not args.prompt:
            p.error(f"--prompts {args.prompts!r} holds no prompt")
    args.prompt = args.prompt or [falling_caption("red")]
    if args.output and len(args.prompt) * len(args.seed) > 1:
        p.error("--output takes one prompt and one seed; use --output-dir for several")
    size_error = video_size_error(args.num_frames, args.height, args.width)
    if size_error:
        p.error(size_error)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    return args


def resolve_model(path: str | None) -> tuple[str, str | None]:
    """(pipeline directory, LoRA directory or None) for what --model names."""
    path = path or DEFAULT_RUN
    if not os.path.isdir(path):
        hint = " (run `python train.py` first)" if path == DEFAULT_RUN else ""
        raise ValueError(f"--model {path!r} is not a directory{hint}")
    if not os.path.exists(os.path.join(path, "model_index.json")) and os.path.isdir(os.path.join(path, "final")):
        path = os.path.join(path, "final")  # a train.py output directory
    lora_info = os.path.join(path, "videorepa.json")
    if os.path.exists(lora_info):
        with open(lora_info) as f:
            base = json.load(f)["base_model"]
        if not os.path.exists(os.path.join(base, "model_index.json")):
            raise ValueError(f"LoRA output {path!r} names base model {base!r}, which is not a pipeline directory")
        return base, path
    if not os.path.exists(os.path.join(path, "model_index.json")):
        raise ValueError(f"--model {path!r} is not a CogVideoX pipeline (no model_index.json) nor a train.py output")
    return path, None


def default_guidance(base: str, lora: str | None, transformer: str | None) -> float:
    """The scale train.py recorded for the weights that sample (its final/ beside a LoRA or a transformer folder, or
    the pipeline itself), else the official 6."""
    places = [os.path.dirname(lora) if lora and os.path.isfile(lora) else lora,
              os.path.dirname(os.path.normpath(transformer)) if transformer else None, base]
    recorded = [recorded_guidance(p) for p in places if p]
    return next((g for g in recorded if g is not None), 6.0)


def lora_file(path: str) -> str:
    """The LoRA weights --lora names: a file, or a folder holding diffusers' pytorch_lora_weights.safetensors."""
    if os.path.isdir(path):
        path = os.path.join(path, "pytorch_lora_weights.safetensors")
    if not os.path.isfile(path):
        raise ValueError(f"--lora {path!r}: no such file")
    return path


def fuse_lora(pipe, path: str, scale: float):
    """W + scale·(α/r)·BA in every adapted layer, α and r as stock `load_lora_weights` reads them from the file
    (α = r where its metadata records no α); fused as the official inference does (inference/generate.py), so
    sampling runs plain layers."""
    pipe.load_lora_weights(path, adapter_name="videorepa")
    pipe.fuse_lora(components=["transformer"], lora_scale=scale)
    pipe.unload_lora_weights()


def report_left_out(path: str, tensors: list[str], config_keys: list[str]):
    """One line on what a --transformer folder holds beyond the stock model (the released VideoREPA-2B: its
    projector)."""
    left_out = []
    if tensors:
        left_out.append(f"{len(tensors)} tensors ({', '.join(sorted({t.split('.')[0] for t in tensors}))})")
    if config_keys:
        left_out.append(f"config keys {', '.join(config_keys)}")
    if left_out:
        print(f"--transformer {path}: left out {' and '.join(left_out)}, which stock CogVideoXTransformer3DModel "
              "has no use for")


def load(args, device, dtype):
    import diffusers

    base, lora = resolve_model(args.model)
    if args.lora:
        if lora:
            raise ValueError(f"--lora: --model {args.model!r} is a LoRA output already; name its base as --model")
        lora = lora_file(args.lora)
    if args.guidance_scale is None:
        args.guidance_scale = default_guidance(base, lora, args.transformer)
    if args.lora_scale != 1.0 and not lora:
        raise ValueError("--lora-scale needs LoRA weights: --lora, or a LoRA output as --model")
    components = {}
    if args.transformer:
        transformer, tensors, config_keys = load_transformer(args.transformer, dtype)
        report_left_out(args.transformer, tensors, config_keys)
        components["transformer"] = transformer
    pipe = diffusers.CogVideoXPipeline.from_pretrained(base, torch_dtype=dtype, **components)
    if lora:
        fuse_lora(pipe, lora, args.lora_scale)
    # official: inference/generate.py swaps in CogVideoXDPMScheduler with trailing spacing on the model's schedule
    scheduler = getattr(diffusers, SCHEDULERS[args.scheduler])
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config, timestep_spacing=args.timestep_spacing)
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    if args.vae_slicing:
        pipe.vae.enable_slicing()
    if args.cpu_offload and device.type == "cuda":
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    return pipe


def output_paths(args) -> list[tuple[str, int, str]]:
    """(prompt, seed, file) for every video; names carry the prompt's index and the seed, so none collide."""
    if args.output:
        return [(args.prompt[0], args.seed[0], args.output)]
    folder = args.output_dir or "samples"
    jobs = []
    for i, prompt in enumerate(args.prompt):
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "prompt"
        for seed in args.seed:
            jobs.append((prompt, seed, os.path.join(folder, f"{i:03d}-{slug}-seed{seed}.{args.format}")))
    return jobs


def generate(pipe, prompt, seed, args):
    """uint8 frames (F, H, W, 3)."""
    return generate_video(pipe, prompt, seed, args.num_frames, args.height, args.width, args.steps,
                          args.guidance_scale, use_dynamic_cfg=args.dynamic_cfg)


def main(argv=None):
    args = parse_args(argv)
    from videorepa.video_io import write_video

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    pipe = load(args, device, dtype)
    attention = resolve_attention(args.attention, device, dtype)
    written = []
    for prompt, seed, path in output_paths(args):
        with attention_kernel(attention):
            frames = generate(pipe, prompt, seed, args)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_video(path, frames, fps=args.fps, lossless=args.lossless)
        print(f"wrote {path} ({len(frames)} frames, seed {seed}): {prompt}")
        written.append(path)
    return written


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        sys.exit(f"sample.py: error: {err}")
