"""One VideoREPA training step (forward + backward) at real size with random weights, per TRD backend.

    python bench/bench_train_step.py --device cuda --json bench/results/train-step-h100-DATE.json
    python bench/bench_train_step.py --device cpu --model-size tiny          # smoke run

A CogVideoX-2B-sized transformer (30 blocks, 1920 wide) with random weights gets random latents (13×60×90),
text embeddings (226×4096) and teacher tokens (24×10×15×768); the step is the diffusion loss plus 0.5 × TRD on
the output of the 18th block, with the paper's token matching (N = 3,600) and with the teacher at the student's
full grid (N = 32,400). Reported: median step time and peak memory for each TRD backend, one JSON row each, the
file rewritten after every row. The transformer is built once (on the device) and shared by every measurement; a
measurement that would start after --time-budget-s is recorded as skipped.
"""

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_trd import environment, is_oom, write_json  # noqa: E402
from measure import synchronize, time_samples  # noqa: E402
from videorepa.alignment import TokenAligner  # noqa: E402
from videorepa.diffusion import token_grid  # noqa: E402
from videorepa.memory import PeakMemory  # noqa: E402
from videorepa.models import build_scheduler, build_transformer  # noqa: E402
from videorepa.presets import get_preset  # noqa: E402
from videorepa.training import VideoREPAModel  # noqa: E402
from videorepa.world import TEACHER_CONFIG as TINY_TEACHER  # noqa: E402

# The teacher's token width and patch side (tubelets of 2 frames): the tiny world's VideoMAE, VideoMAEv2 ViT-B/16.
TEACHER = {"tiny": (TINY_TEACHER["hidden_size"], TINY_TEACHER["patch_size"]), "cogvideox-2b": (768, 16)}


def build_model(size: str, device, checkpointing: bool):
    """The transformer with random weights, created on `device`, wrapped for training; its aligner is set per
    relation grid by `set_relation_grid`."""
    preset = get_preset(size)
    with torch.device(device):  # weights initialised where they live: seconds instead of a CPU init of 1.7 B
        transformer = build_transformer(size).to(device).train()
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    return VideoREPAModel(transformer, build_scheduler(), None, preset.align_layer)


def latent_frames(cfg) -> int:
    """Latent frames of the transformer's default clip (its config's sample_frames through the VAE's time factor)."""
    return (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1


def grids(model, size: str):
    cfg = model.transformer.config
    preset = get_preset(size)
    student_grid = token_grid(cfg, (1, latent_frames(cfg), None, cfg.sample_height, cfg.sample_width))
    patch = TEACHER[size][1]
    teacher_grid = ((preset.num_frames - 1) // 2, preset.teacher_height // patch, preset.teacher_width // patch)
    return student_grid, teacher_grid


def set_relation_grid(model, size: str, relation_grid: str, device):
    """A fresh aligner (same seed for every grid) matching tokens on `relation_grid`."""
    cfg = model.transformer.config
    student_grid, teacher_grid = grids(model, size)
    torch.manual_seed(0)
    model.aligner = TokenAligner(cfg.num_attention_heads * cfg.attention_head_dim, TEACHER[size][0],
                                 get_preset(size).projector_hidden, student_grid, teacher_grid,
                                 relation_grid).to(device)


def inputs(model, teacher_grid, batch, size, device):
    cfg = model.transformer.config
    gen = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(batch, latent_frames(cfg), cfg.in_channels, cfg.sample_height, cfg.sample_width,
                          generator=gen, device=device)
    text = torch.randn(batch, cfg.max_text_seq_length, cfg.text_embed_dim, generator=gen, device=device)
    teacher = torch.randn(batch, *teacher_grid, TEACHER[size][0], generator=gen, device=device)
    return latents, text, teacher


def measure(model, batch_inputs, device, steps: int):
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    outputs = []

    def step():
        model.zero_grad(set_to_none=True)
        generator = torch.Generator().manual_seed(0)  # the same timesteps and noise in every step
        with autocast:
            out = model(*batch_inputs, generator=generator)
        out["loss"].backward()
        outputs.append(out["loss_align"].detach())

    step()  # warm-up: autotuning, allocator
    synchronize(device.type)
    times = time_samples(step, device.type, steps, 0.0)
    with PeakMemory(device) as mem:  # a step of its own: on CPU the tracker slows every operator
        step()
    return {**times, "peak_mib": round(mem.peak_mib, 1), "loss_trd": outputs[-1].item()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model-size", choices=sorted(TEACHER), default="cogvideox-2b")
    p.add_argument("--backends", nargs="+", choices=["triton", "torch", "naive"],
                   help="TRD backends (default: triton and naive on cuda, torch and naive on cpu)")
    p.add_argument("--relation-grids", nargs="+", choices=["teacher", "student"], default=["teacher", "student"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after one warm-up step)")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--time-budget-s", type=float, help="start no measurement after this many seconds")
    p.add_argument("--json", metavar="PATH", help="write the rows here, after every row")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    args.backends = args.backends or (["triton", "naive"] if args.device == "cuda" else ["torch", "naive"])
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.monotonic()
    device = torch.device(args.device)
    env = environment(args.device)
    torch.manual_seed(0)
    model = build_model(args.model_size, device, not args.no_gradient_checkpointing)
    teacher_grid = grids(model, args.model_size)[1]
    rows = []
    for grid in args.relation_grids:
        set_relation_grid(model, args.model_size, grid, device)
        tokens = model.aligner.tokens_per_frame * teacher_grid[0]
        batch_inputs = inputs(model, teacher_grid, args.batch_size, args.model_size, device)
        for backend in args.backends:
            model.trd_backend = backend
            row = {"model": args.model_size, "trd_backend": backend, "relation_grid": grid, "B": args.batch_size,
                   "N": tokens, **env}
            if args.time_budget_s is not None and time.monotonic() - started > args.time_budget_s:
                row["skipped"] = "time budget reached"
            else:
                try:
                    row.update(measure(model, batch_inputs, device, args.steps))
                except Exception as err:  # noqa: BLE001  recorded: out of memory is a result; the other rows run
                    if is_oom(err):
                        row["oom"] = True
                    else:
                        traceback.print_exc()
                        row["error"] = f"{type(err).__name__}: {err}"
                    model.zero_grad(set_to_none=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in ("relation_grid", "N", "trd_backend", "ms", "peak_mib",
                                                      "oom", "skipped", "error")}), flush=True)
            if args.json:
                write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
