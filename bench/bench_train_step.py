"""One VideoREPA training step (forward + backward) at real size with random weights, per TRD backend.

    python bench/bench_train_step.py --device cuda --json bench/results/train-step-h100-DATE.json
    python bench/bench_train_step.py --device cpu --model-size tiny          # smoke run

A CogVideoX-2B-sized transformer (30 blocks, 1920 wide) with random weights gets random latents (13×60×90),
text embeddings (226×4096) and teacher tokens (24×10×15×768); the step is the diffusion loss plus 0.5 × TRD on
the output of the 18th block, with the paper's token matching (N = 3,600) and with the teacher at the student's
full grid (N = 32,400). Reported: median step time and peak memory for each TRD backend, one JSON row each.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_trd import environment, is_oom, wall_clock_ms  # noqa: E402
from videorepa.alignment import TokenAligner  # noqa: E402
from videorepa.memory import PeakMemory  # noqa: E402
from videorepa.models import build_scheduler, build_transformer  # noqa: E402
from videorepa.presets import get_preset  # noqa: E402
from videorepa.training import VideoREPAModel  # noqa: E402

TEACHER_DIM = {"tiny": 32, "cogvideox-2b": 768}


def build(size: str, trd_backend: str, relation_grid: str, device, checkpointing: bool):
    preset = get_preset(size)
    transformer = build_transformer(size).to(device).train()
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    cfg = transformer.config
    student_grid = ((cfg.sample_frames - 1) // 4 + 1, cfg.sample_height // cfg.patch_size,
                    cfg.sample_width // cfg.patch_size)
    teacher_grid = ((preset.num_frames - 1) // 2, preset.teacher_height // 16, preset.teacher_width // 16)
    aligner = TokenAligner(cfg.num_attention_heads * cfg.attention_head_dim, TEACHER_DIM[size], preset.projector_hidden,
                           student_grid, teacher_grid, relation_grid).to(device)
    model = VideoREPAModel(transformer, build_scheduler(), aligner, preset.align_layer, trd_backend=trd_backend)
    return model, student_grid, teacher_grid


def inputs(model, student_grid, teacher_grid, batch, size, device):
    cfg = model.transformer.config
    latents = torch.randn(batch, student_grid[0], cfg.in_channels, cfg.sample_height, cfg.sample_width, device=device)
    text = torch.randn(batch, cfg.max_text_seq_length, cfg.text_embed_dim, device=device)
    teacher = torch.randn(batch, *teacher_grid, TEACHER_DIM[size], device=device)
    return latents, text, teacher


def measure(model, batch_inputs, device, steps: int):
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    generator = torch.Generator().manual_seed(0)

    def step():
        model.zero_grad(set_to_none=True)
        with autocast:
            out = model(*batch_inputs, generator=generator)
        out["loss"].backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    step()  # warm-up: autotuning, allocator
    ms, p20, p80 = wall_clock_ms(step, steps)
    with PeakMemory(device) as mem:
        out = step()
    return {"ms": ms, "ms_p20": p20, "ms_p80": p80, "peak_mib": round(mem.peak_mib, 1),
            "loss_trd": out["loss_align"].item()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model-size", choices=sorted(TEACHER_DIM), default="cogvideox-2b")
    p.add_argument("--backends", nargs="+", choices=["triton", "torch", "naive"],
                   help="TRD backends (default: triton and naive on cuda, torch and naive on cpu)")
    p.add_argument("--relation-grids", nargs="+", choices=["teacher", "student"], default=["teacher", "student"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    args.backends = args.backends or (["triton", "naive"] if args.device == "cuda" else ["torch", "naive"])
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    env = environment(args.device)
    rows = []
    for grid in args.relation_grids:
        for backend in args.backends:
            torch.manual_seed(0)
            model, student_grid, teacher_grid = build(args.model_size, backend, grid, device,
                                                      not args.no_gradient_checkpointing)
            tokens = model.aligner.tokens_per_frame * teacher_grid[0]
            row = {"model": args.model_size, "trd_backend": backend, "relation_grid": grid, "B": args.batch_size,
                   "N": tokens, **env}
            try:
                row.update(measure(model, inputs(model, student_grid, teacher_grid, args.batch_size,
                                                 args.model_size, device), device, args.steps))
            except Exception as err:  # noqa: BLE001  an out-of-memory step is a result, not a crash
                if not is_oom(err):
                    raise
                row["oom"] = True
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in ("relation_grid", "N", "trd_backend", "ms", "peak_mib",
                                                      "oom")}), flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
