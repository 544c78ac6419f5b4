"""Does token relation distillation make generated motion more physical? The tiny world's answer, on a CPU.

    python bench/physics_experiment.py                      # 5 arms × 6 seeds, then the table
    python bench/physics_experiment.py --seeds 1 &          # runs are independent: one process per seed works too
    python bench/physics_experiment.py --seeds 0 --arms none trd-full --steps 50   # a quick look

Every arm trains the tiny world's transformer from the same initial weights (per seed), on the same clips, in the
same order, for the same number of steps and batch size: no alignment, REPA (cosine), TRD full, TRD spatial, TRD
temporal (train.py's defaults otherwise). Each run is then measured by
- physics: evaluate.py's score of videos generated for prompts of every scene type (1 = the renderer's physics);
- diffusion loss: the training objective on held-out clips, with fixed noise and timesteps;
- velocity probe: a linear (ridge) probe from the tokens at a ball's place to that ball's velocity, fitted on two
  thirds of held-out clips and scored (R²) on the rest; for the transformer at the aligned layer after training,
  and once for the teacher's tokens and for the transformer before training (the paper's motivating probe).

Runs are kept in --output-dir and skipped when their result exists, so an interrupted experiment resumes. The
table (mean ± std over seeds) is printed and written to --markdown, the rows to --json.
"""

import argparse
import glob
import json
import os
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import evaluate  # noqa: E402
import train  # noqa: E402
from videorepa import world  # noqa: E402
from videorepa.files import atomic_path  # noqa: E402
from videorepa.physics import track_balls  # noqa: E402
from videorepa.presets import get_preset  # noqa: E402
from videorepa.synthetic import make_clip  # noqa: E402

ARMS = {
    "none": ["--align-loss", "none"],
    "repa": ["--align-loss", "repa"],
    "trd-full": ["--align-loss", "trd", "--trd-mode", "full"],
    "trd-spatial": ["--align-loss", "trd", "--trd-mode", "spatial"],
    "trd-temporal": ["--align-loss", "trd", "--trd-mode", "temporal"],
}
HELDOUT_SEEDS = 40_000_000  # held-out clips for the loss and the probe
PROBE_TIMESTEP = 200  # the transformer's tokens are read from latents noised to this timestep


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/physics-experiment")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(6)))
    p.add_argument("--steps", type=int, default=300, help="training steps of every run")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--clips", type=int, default=world.TRAIN_CLIPS, help="training clips (the same for every run)")
    p.add_argument("--heldout-clips", type=int, default=48, help="clips for the held-out loss and the probe")
    p.add_argument("--videos-per-scene", type=int, default=3, help="generated videos per scene type and run")
    p.add_argument("--sample-steps", type=int, default=25, help="denoising steps of the generated videos")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: tabulate the runs that have finished (another process may still be running)")
    p.add_argument("--json", help="write the rows here (e.g. bench/results/physics-cpu.json)")
    p.add_argument("--markdown", help="write the table here")
    args = p.parse_args(argv)
    if min(args.steps, args.batch_size, args.clips, args.videos_per_scene, args.sample_steps) < 1:
        p.error("--steps, --batch-size, --clips, --videos-per-scene and --sample-steps must be >= 1")
    if args.heldout_clips < 6:
        p.error(f"--heldout-clips must be >= 6 (the probe splits them in thirds), got {args.heldout_clips}")
    return args


# ------------------------------------------------------------------------------------------------ held-out data


def heldout_set(count: int):
    """Held-out clips: video (N, F, 3, H, W) in [-1, 1], captions, and each ball's track (from the rendered frames)."""
    frames, captions, tracks = [], [], []
    for seed in range(HELDOUT_SEEDS, HELDOUT_SEEDS + count):
        clip, caption = make_clip(seed, **world.CLIP)
        frames.append(clip)
        captions.append(caption)
        tracks.append(track_balls(clip))
    video = torch.from_numpy(np.stack(frames)).permute(0, 1, 4, 2, 3).float() / 127.5 - 1
    return video, captions, tracks


def probe_samples(tracks, features, window: tuple[int, int], cell: int):
    """(X, y, clip) for the probe: per clip, time slot and ball, the token under the ball's mid-window position and
    the ball's mean velocity (pixels / frame) over the window's frames. `features` (N, T, H', W', D); time slot k
    covers frames window[0] + window[1]·k ... + window[1] − 1; tokens are `cell` pixels wide."""
    xs, ys, clips = [], [], []
    first, span = window
    for n, clip_tracks in enumerate(tracks):
        for k in range(features.shape[1]):
            a, b = first + span * k, first + span * k + span - 1
            for tr in clip_tracks:
                if b >= len(tr.x) or not (tr.present[a] and tr.present[b]):
                    continue
                x, y = (tr.x[a] + tr.x[b]) / 2, (tr.y[a] + tr.y[b]) / 2
                row = min(int(y // cell), features.shape[2] - 1)
                col = min(int(x // cell), features.shape[3] - 1)
                xs.append(features[n, k, row, col].numpy())
                ys.append([(tr.x[b] - tr.x[a]) / (b - a), (tr.y[b] - tr.y[a]) / (b - a)])
                clips.append(n)
    return np.array(xs, np.float64), np.array(ys, np.float64), np.array(clips)


def ridge_probe_r2(x, y, clips, ridge: float = 1.0) -> float:
    """R² (mean over vx, vy) on the last third of clips of a ridge regression fitted on the first two thirds, on
    standardised features."""
    train_mask = clips < np.quantile(np.unique(clips), 2 / 3)
    mean, std = x[train_mask].mean(0), x[train_mask].std(0) + 1e-6
    z = (x - mean) / std
    z = np.concatenate([z, np.ones((len(z), 1))], 1)
    a, t = z[train_mask], y[train_mask]
    w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ t)
    pred, truth = z[~train_mask] @ w, y[~train_mask]
    spread = ((truth - truth.mean(0)) ** 2).sum(0)
    varies = spread > 1e-9  # a component constant over the test clips has no R²
    if not varies.any():
        return float("nan")
    return float(np.mean(1 - ((pred - truth) ** 2).sum(0)[varies] / spread[varies]))


# ------------------------------------------------------------------------------------------------ measurements


@torch.no_grad()
def aligned_tokens(transformer, align_layer: int, scheduler, latents, embeds) -> torch.Tensor:
    """The output of the aligned block (the align_layer-th, as train.py counts) as (N, F, H, W, D) on the token grid,
    for latents (N, F', C, H', W') noised to PROBE_TIMESTEP with fixed noise."""
    from videorepa.diffusion import BlockOutput, rotary_embeddings, token_grid
    from videorepa.training import aligned_block

    hook = BlockOutput(aligned_block(transformer, align_layer))
    generator = torch.Generator().manual_seed(0)
    features = []
    for chunk, chunk_embeds in zip(latents.split(8), embeds.split(8)):
        t = torch.full((len(chunk),), PROBE_TIMESTEP)
        noisy = scheduler.add_noise(chunk, torch.randn(chunk.shape, generator=generator), t)
        transformer(hidden_states=noisy, encoder_hidden_states=chunk_embeds, timestep=t,
                    image_rotary_emb=rotary_embeddings(transformer, chunk), return_dict=False)
        features.append(hook.pop().reshape(len(chunk), *token_grid(transformer.config, chunk.shape), -1))
    hook.handle.remove()
    return torch.cat(features)


class Heldout:
    """Held-out clips encoded once: VAE latents (mean), prompt embeddings, teacher tokens, ball tracks."""

    def __init__(self, count: int):
        from videorepa.diffusion import encode_prompts, pad_latent_frames
        from videorepa.teachers import load_teacher

        cfg = get_preset("tiny")
        video, captions, self.tracks = heldout_set(count)
        pipe = world.build_pipeline(0)
        teacher = load_teacher("tiny", None, cfg.teacher_height, cfg.teacher_width, cfg.num_frames)
        with torch.no_grad():
            mean = torch.cat([pipe.vae.encode(v[None].permute(0, 2, 1, 3, 4)).latent_dist.mean for v in video])
            latents = (mean * pipe.vae.config.scaling_factor).permute(0, 2, 1, 3, 4)  # (N, F', C, H', W')
            self.latents = pad_latent_frames(latents, pipe.transformer.config.patch_size_t)
            self.embeds = encode_prompts(pipe, captions, "cpu")
            self.teacher = torch.cat([teacher(v[None]) for v in video])  # (N, T', H', W', D)
        self.scheduler = pipe.scheduler

    def teacher_probe(self) -> float:
        # Teacher slot k: the tubelet of frames 1 + 2k and 2 + 2k (the first frame is dropped); 8-pixel patches.
        return ridge_probe_r2(*probe_samples(self.tracks, self.teacher, (1, 2), 8))

    def student_probe(self, transformer, align_layer: int) -> float:
        features = aligned_tokens(transformer, align_layer, self.scheduler, self.latents, self.embeds)
        # Token frame k >= 1 covers pixel frames 4k - 3 ... 4k (VAE ×4 in time, one latent frame per token); tokens
        # are 8 pixels wide (VAE ×4, patch 2).
        return ridge_probe_r2(*probe_samples(self.tracks, features[:, 1:], (1, 4), 8))

    @torch.no_grad()
    def diffusion_loss(self, transformer, repeats: int = 4) -> float:
        """The training objective on the held-out clips, the same noise and timesteps for every model."""
        from videorepa.diffusion import diffusion_loss

        generator = torch.Generator().manual_seed(1)
        losses = [diffusion_loss(transformer, self.scheduler, latents, embeds, generator).item()
                  for _ in range(repeats)
                  for latents, embeds in zip(self.latents.split(8), self.embeds.split(8))]
        return float(np.mean(losses))


@torch.no_grad()
def vae_ceiling(videos_per_scene: int, output_dir: str) -> dict:
    """Physics scores of the renderer's own clips for the evaluation prompts, as rendered and after a round trip
    through the VAE: what a transformer that generated perfect latents would score."""
    vae = world.load_vae()
    seeds = range(evaluate.EVAL_SEEDS, evaluate.EVAL_SEEDS + videos_per_scene * 4)
    clips = [make_clip(seed, **world.CLIP) for seed in seeds]
    decoded = []
    for frames, caption in clips:
        video = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        out = vae.decode(vae.encode(video).latent_dist.mean).sample[0].permute(1, 2, 3, 0)
        decoded.append(((out + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())
    fps = world.CLIP["fps"]
    return {
        "renderer": evaluate.evaluate([(f"{i:03d}", c, f) for i, (f, c) in enumerate(clips)], fps,
                                      os.path.join(output_dir, "renderer"), plots=False)["score"],
        "renderer_through_vae": evaluate.evaluate([(f"{i:03d}", c, d) for i, ((_, c), d) in
                                                   enumerate(zip(clips, decoded))], fps,
                                                  os.path.join(output_dir, "renderer-vae"), plots=False)["score"],
    }


def load_transformer(run_dir: str):
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel.from_pretrained(os.path.join(run_dir, "final", "transformer")).eval()


def result_path(args, arm: str, seed: int) -> str:
    return os.path.join(args.output_dir, f"{arm}-seed{seed}", "result.json")


def run_one(args, arm: str, seed: int, data: str, cache: str, heldout: Heldout, align_layer: int) -> dict:
    out = os.path.dirname(result_path(args, arm, seed))
    if os.path.exists(result_path(args, arm, seed)):
        with open(result_path(args, arm, seed)) as f:
            return json.load(f)
    train.main(["--output-dir", out, "--data", data, "--cache-dir", cache, "--seed", str(seed),
                "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
                "--checkpoint-every", str(args.steps), *ARMS[arm]])
    report = evaluate.main(["--model", out, "--output-dir", os.path.join(out, "physics"), "--seed", "0",
                            "--videos-per-scene", str(args.videos_per_scene), "--steps", str(args.sample_steps)])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    tail = rows[-max(1, len(rows) // 10):]
    transformer = load_transformer(out)
    result = {
        "arm": arm, "seed": seed, "steps": args.steps, "batch_size": args.batch_size,
        "physics": report["score"], "physics_scenes": report["scenes"], "physics_laws": report["laws"],
        "diffusion_loss_heldout": heldout.diffusion_loss(transformer),
        "diffusion_loss_train_last10pct": float(np.mean([r["loss_diffusion"] for r in tail])),
        "align_loss_last10pct": float(np.mean([r["loss_align"] for r in tail])),
        "probe_r2_after": heldout.student_probe(transformer, align_layer),
        "train_seconds": rows[-1]["seconds"],
    }
    with atomic_path(result_path(args, arm, seed)) as tmp, open(tmp, "w") as f:  # read by --finished-only
        json.dump(result, f, indent=1)
    return result


def mean_std(values) -> str:
    """mean ± sample standard deviation; a single value has no spread to show."""
    values = [v for v in values if v is not None]
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def paired(rows: list[dict], unaligned: dict) -> str:
    """An arm's physics score minus the unaligned run's of the same seed (same initial weights, data order and
    noise): mean ± std, and on how many seeds the arm scored higher."""
    diffs = [r["physics"] - unaligned[r["seed"]] for r in rows if r["seed"] in unaligned]
    if not diffs:
        return "–"
    spread = f" ± {np.std(diffs, ddof=1):.3f}" if len(diffs) > 1 else ""
    return f"{np.mean(diffs):+.3f}{spread} (higher on {sum(d > 0 for d in diffs)} of {len(diffs)})"


def table(results: list[dict], baselines: dict) -> str:
    cols = [("physics", "physics score ↑"), ("diffusion_loss_heldout", "held-out diffusion loss ↓"),
            ("probe_r2_after", "velocity probe R² ↑")]
    lines = ["| arm | runs | " + " | ".join(name for _, name in cols) + " | physics − none, paired by seed |",
             "| --- | --- | " + " | ".join("---" for _ in cols) + " | --- |"]
    unaligned = {r["seed"]: r["physics"] for r in results if r["arm"] == "none"}
    for arm in ARMS:
        rows = [r for r in results if r["arm"] == arm]
        if rows:
            lines.append(f"| {arm} | {len(rows)} | " + " | ".join(mean_std([r[key] for r in rows]) for key, _ in cols)
                         + f" | {paired(rows, unaligned) if arm != 'none' else 'reference'} |")
    lines.append("")
    lines.append(f"Physics score of the renderer's own clips for the same prompts: {baselines['physics']['renderer']:.3f}; "
                 f"of those clips after a round trip through the VAE (the most a transformer can reach with it): "
                 f"{baselines['physics']['renderer_through_vae']:.3f}.")
    lines.append(f"Velocity probe R² of the teacher's tokens: {baselines['teacher']:.3f}; of the transformer's "
                 f"aligned-layer tokens before training: {mean_std(baselines['before'].values())} "
                 f"(over seeds {sorted(baselines['before'])}).")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    data = os.path.join(args.output_dir, "data", "captions.csv")
    if not args.finished_only and world.ensure_dataset(os.path.dirname(data), num_clips=args.clips, seed=0):
        stale = glob.glob(result_path(args, "*", "*"))
        for path in stale:  # trained on other clips: every arm runs on the same ones
            os.remove(path)
        if stale:
            print(f"the clips were rendered again: {len(stale)} earlier results run again", file=sys.stderr)
    cache = os.path.join(args.output_dir, "feature-cache")
    align_layer = get_preset("tiny").align_layer
    heldout = Heldout(args.heldout_clips)
    baselines = {"teacher": heldout.teacher_probe(),
                 "physics": vae_ceiling(args.videos_per_scene, os.path.join(args.output_dir, "reference")),
                 "before": {seed: heldout.student_probe(world.build_pipeline(seed).transformer, align_layer)
                            for seed in args.seeds}}
    # The main comparison first, so an interrupted experiment has it for every seed.
    order = sorted(args.arms, key=["none", "trd-full", "repa", "trd-spatial", "trd-temporal"].index)
    if args.finished_only:
        runs = [(arm, seed) for arm in order for seed in args.seeds if os.path.exists(result_path(args, arm, seed))]
    else:
        runs = [(arm, seed) for arm in order for seed in args.seeds]
    results = [run_one(args, arm, seed, data, cache, heldout, align_layer) for arm, seed in runs]
    text = table(results, baselines)
    print(text)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "markdown", "output_dir")}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "probe_baselines": baselines, "runs": results}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return results, baselines


if __name__ == "__main__":
    main()
