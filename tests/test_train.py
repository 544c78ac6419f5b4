"""train.py end to end on CPU with the tiny models: align losses, LoRA and full, resume, outputs, bad data, DDP."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from safetensors.torch import load_file  # noqa: E402

import train  # noqa: E402
from test_components import transformer_inputs  # noqa: E402
from videorepa.synthetic import write_dataset  # noqa: E402
from videorepa.video_io import write_video  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Eight synthetic clips shared by the tests (rendering is the slow part of a tiny run)."""
    return write_dataset(str(tmp_path_factory.mktemp("data")), num_clips=8, seed=3)


# Runs of the tests: 2 clips a step and 9 frames (3 latent frames), not the tiny preset's 8 and 17: the same code
# paths at a third of the cost. Flags given later override these.
SMALL = ["--batch-size", "2", "--num-frames", "9"]


def run_train(out, *extra, data=None):
    args = ["--output-dir", str(out), *SMALL, *extra]
    if data:
        args += ["--data", data]
    return train.main(args)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("align_loss", ["trd", "repa", "none"])
def test_a_few_steps_with_each_align_loss(tmp_path, clips, align_loss):
    run_train(tmp_path, "--max-steps", "3", "--align-loss", align_loss, data=clips)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"loss", "loss_diffusion", "loss_trd", "lr", "seconds"} <= r.keys()
        assert np.isfinite(r["loss"]) and r["loss_diffusion"] > 0
        assert (r["loss_align"] > 0) == (align_loss != "none")
        assert (r["loss_trd"] is not None) == (align_loss == "trd")
    assert os.path.isfile(tmp_path / "final" / "model_index.json")
    assert os.path.isfile(tmp_path / "alignment-heads.pt")


def test_trd_loss_falls_on_synthetic_data(tmp_path, clips):
    run_train(tmp_path, "--max-steps", "80", "--checkpoint-every", "80", data=clips)
    trd = [r["loss_trd"] for r in metrics(tmp_path)]
    assert np.mean(trd[-20:]) < 0.7 * np.mean(trd[:10])


def test_resume_matches_an_uninterrupted_run(tmp_path, clips):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(straight, "--max-steps", "6", "--checkpoint-every", "3", data=clips)
    # The first run goes on to step 5 but only its step-3 checkpoint survives, as after a crash.
    run_train(resumed, "--max-steps", "5", "--checkpoint-every", "3", data=clips)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoint-5")
    run_train(resumed, "--max-steps", "6", "--checkpoint-every", "3", "--resume", "latest", data=clips)
    a = load_file(straight / "checkpoint-6" / "trainable.safetensors")
    b = load_file(resumed / "checkpoint-6" / "trainable.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["loss"] for r in metrics(straight)] == [r["loss"] for r in metrics(resumed)]


def linear_schedule(peak, warmup, total):
    """lr of optimizer steps 1..total: linear warm-up from 0, then linear decay to 0 at the end of the run."""
    return [peak * (s / warmup if s < warmup else (total - s) / (total - warmup)) for s in range(total)]


def test_linear_schedule_resumes_exactly_after_a_crash(tmp_path, clips, monkeypatch):
    args = ["--max-steps", "6", "--checkpoint-every", "3", "--lr-scheduler", "linear", "--warmup-steps", "2",
            "--learning-rate", "1e-3"]
    run_train(tmp_path / "straight", *args, data=clips)
    lrs = [r["lr"] for r in metrics(tmp_path / "straight")]
    assert lrs == pytest.approx(linear_schedule(1e-3, 2, 6), rel=1e-12, abs=1e-15)

    import videorepa.training as training

    real, calls = training.diffusion_loss, []

    def crash_in_step_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("the machine went away")
        return real(*a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(training, "diffusion_loss", crash_in_step_5)
        with pytest.raises(KeyboardInterrupt):
            run_train(tmp_path / "resumed", *args, data=clips)
    run_train(tmp_path / "resumed", *args, "--resume", "latest", data=clips)
    assert [r["lr"] for r in metrics(tmp_path / "resumed")] == lrs
    a = load_file(tmp_path / "straight" / "checkpoint-6" / "trainable.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoint-6" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name, expected", [
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.0, 0.5, 1.0, 0.5 + 0.5 * np.cos(np.pi / 4), 0.5, 0.5 - 0.5 * np.cos(np.pi / 4)]),
])
def test_lr_schedules_warm_up_then_hold_or_decay(name, expected):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = train.lr_schedule(optimizer, name, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs == pytest.approx([2.0 * e for e in expected])


class DeepSpeedWarmupDecayLR:
    """deepspeed==0.16.3's WarmupDecayLR as the paper's run builds it (deepspeed/runtime/lr_schedules.py: warmup_type
    log, warmup_min_lr 0), transcribed: the lr set at construction, then one step() per optimizer step."""

    def __init__(self, peak, total_num_steps, warmup_num_steps):
        self.peak, self.total, self.warmup = peak, total_num_steps, max(2, warmup_num_steps)
        self.last_batch_iteration = -1
        self.lr = 0.0  # get_lr() before the first step(): warmup_min_lr

    def step(self):
        self.last_batch_iteration += 1
        it = self.last_batch_iteration
        if it < self.warmup:
            gamma = 1.0 / math.log(self.warmup) * math.log(it + 1)
        else:
            gamma = max(0.0, float(self.total - it) / float(max(1.0, self.total - self.warmup)))
        self.lr = self.peak * gamma


@pytest.mark.parametrize("warmup, total", [(0, 8), (2, 8), (2, 4000), (4, 9), (100, 120)])
def test_warmup_decay_is_deepspeeds_schedule(warmup, total):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = train.lr_schedule(optimizer, "warmup-decay", warmup_steps=warmup, total_steps=total)
    reference = DeepSpeedWarmupDecayLR(2.0, total, warmup)
    ours, theirs = [], []
    for _ in range(total):
        ours.append(optimizer.param_groups[0]["lr"])
        theirs.append(reference.lr)
        optimizer.step()
        schedule.step()
        reference.step()
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)
    if warmup <= 2:  # the paper's runs: two steps at lr 0, the peak, then down to 2/(T − 2) of it at the last step
        assert ours[:4] == [0.0, 0.0, 2.0, 2.0] and ours[-1] == pytest.approx(2.0 * 2 / (total - 2))


def test_presets_default_to_the_papers_recipe():
    # official: finetune/scripts/multigpu_VideoREPA_2B_sft.sh and multigpu_VideoREPA_5B_lora.sh
    paper = {"batch_size": 4, "lr_scheduler": "warmup-decay", "warmup_steps": 2, "max_steps": None}
    paths = ["--model", "/m", "--teacher-path", "/t.pth"]
    two_b = train.parse_args(["--preset", "cogvideox-2b", *paths])
    assert {k: getattr(two_b, k) for k in paper} == paper
    assert (two_b.lora_rank, two_b.learning_rate, two_b.num_epochs) == (0, 2e-6, 4)
    five_b = train.parse_args(["--preset", "cogvideox-5b", *paths])
    assert {k: getattr(five_b, k) for k in paper} == paper
    assert (five_b.lora_rank, five_b.lora_alpha, five_b.learning_rate, five_b.num_epochs) == (128, 64, 1e-4, 1)
    full_5b = train.parse_args(["--preset", "cogvideox-5b", *paths, "--lora-rank", "0", "--fsdp"])
    assert (full_5b.lora_rank, full_5b.learning_rate) == (0, 2e-6)
    assert train.parse_args(["--preset", "cogvideox-5b", *paths, "--lora-rank", "16"]).lora_alpha == 16
    tiny = train.parse_args([])
    assert (tiny.batch_size, tiny.lr_scheduler, tiny.max_steps, tiny.num_epochs) == (8, "constant", 1000, None)
    assert train.parse_args(["--num-epochs", "2"]).max_steps is None


def test_readme_commands_train_the_paper_runs(tmp_path):
    import shlex

    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    block = readme[readme.index("torchrun --nproc_per_node 8 train.py --preset cogvideox-2b"):]
    commands = [c for c in block[:block.index("```")].replace("\\\n", " ").splitlines() if c.startswith("torchrun")]
    (tmp_path / "clips.csv").write_text("video,caption\n")
    runs = {}
    for command in commands:
        argv = shlex.split(command)
        assert argv[:4] == ["torchrun", "--nproc_per_node", "8", "train.py"]
        args = train.parse_args([str(tmp_path / "clips.csv") if a.endswith(".csv") else a for a in argv[4:]])
        runs[args.preset] = (args.lora_rank, args.lora_alpha, args.learning_rate, args.num_epochs, args.batch_size,
                             args.lr_scheduler, args.warmup_steps, args.preset_config.align_layer, args.seed)
        defaults = train.parse_args(["--preset", args.preset, "--model", "/m", "--teacher-path", "/t.pth"])
        assert runs[args.preset][:-1] == (defaults.lora_rank, defaults.lora_alpha, defaults.learning_rate,
                                          defaults.num_epochs, defaults.batch_size, defaults.lr_scheduler,
                                          defaults.warmup_steps, defaults.preset_config.align_layer)
    assert runs == {"cogvideox-2b": (0, None, 2e-6, 4, 4, "warmup-decay", 2, 18, 42),
                    "cogvideox-5b": (128, 64, 1e-4, 1, 4, "warmup-decay", 2, 18, 42)}


def test_each_clip_keeps_one_latent_sample_across_epochs(tmp_path, clips, monkeypatch):
    # official: the cache holds one `latent_dist.sample()` per clip (finetune/datasets/t2v_dataset.py), reused by
    # every epoch.
    import videorepa.training as training

    batches, latents = [], []
    real_batch, real_loss = train.next_usable_batch, training.diffusion_loss

    def record_batch(*a, **k):
        batches.append(real_batch(*a, **k))
        return batches[-1]

    def record_latents(transformer, scheduler, x, *a, **k):
        latents.append(x.detach().clone())
        return real_loss(transformer, scheduler, x, *a, **k)

    monkeypatch.setattr(train, "next_usable_batch", record_batch)
    monkeypatch.setattr(training, "diffusion_loss", record_latents)
    run_train(tmp_path, "--num-epochs", "2", "--batch-size", "4", "--checkpoint-every", "100", data=clips)
    seen = {}
    for batch, x in zip(batches, latents):
        for clip, latent in zip(batch["index"], x):
            seen.setdefault(clip, []).append(latent)
    assert sorted(seen) == list(range(8)) and all(len(v) == 2 for v in seen.values())
    for first, second in seen.values():
        assert torch.equal(first, second)
    assert not torch.equal(seen[0][0], seen[1][0])


def test_num_epochs_sets_the_run_length_from_the_data(tmp_path, clips):
    # 8 clips, batch 2: 4 batches per epoch; 2 epochs with 2 batches per optimizer step: 4 steps.
    run_train(tmp_path, "--num-epochs", "2", "--gradient-accumulation-steps", "2", "--checkpoint-every", "100",
              data=clips)
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4]
    state = torch.load(tmp_path / "checkpoint-4" / "training_state.pt", weights_only=False)
    # official: AdamW with weight decay 1e-4 and DeepSpeed's defaults betas (0.9, 0.999), eps 1e-8 (configs/zero2.yaml
    # sets only lr and weight decay).
    group = state["optimizer"]["param_groups"][0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.999), 1e-8, 1e-4)


def test_checkpoints_keep_the_newest(tmp_path, clips):
    run_train(tmp_path, "--max-steps", "4", "--checkpoint-every", "1", "--checkpoints-total-limit", "2", data=clips)
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-4"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_full_finetune_final_loads_in_stock_diffusers(tmp_path, clips):
    from diffusers import CogVideoXPipeline

    run_train(tmp_path, "--max-steps", "2", data=clips)
    pipe = CogVideoXPipeline.from_pretrained(tmp_path / "final")
    trained = load_file(tmp_path / "checkpoint-2" / "trainable.safetensors")
    loaded = {f"transformer.{k}": v for k, v in pipe.transformer.state_dict().items()}
    for key, value in trained.items():
        if key.startswith("transformer."):
            assert torch.equal(loaded[key], value), key


def test_lora_final_loads_onto_its_base(tmp_path, clips):
    from diffusers import CogVideoXPipeline

    run_train(tmp_path, "--max-steps", "2", "--lora-rank", "4", data=clips)
    trained = load_file(tmp_path / "checkpoint-2" / "trainable.safetensors")
    assert trained and all("lora" in k or k.startswith("aligner.") for k in trained)
    with open(tmp_path / "final" / "videorepa.json") as f:
        info = json.load(f)
    pipe = CogVideoXPipeline.from_pretrained(info["base_model"])
    pipe.load_lora_weights(tmp_path / "final")
    state = pipe.transformer.state_dict()
    lora_b = [k for k in trained if k.startswith("transformer.") and "lora_B" in k]
    assert lora_b
    for key in lora_b:  # B starts at zero, so a trained B differs from zero and arrives exactly
        name = key[len("transformer."):].replace(".default.", ".default_0.")
        assert torch.equal(state[name], trained[key]) and trained[key].abs().sum() > 0


def test_a_new_run_in_an_old_folder_replaces_its_final_and_base(tmp_path, clips, caplog):
    """A LoRA run where a full finetune ran before: final/ holds only the adapters (no stale pipeline beside them).
    The base in base-model/ is this run's; a later run of another base replaces it and removes the adapters that
    belong to the old one, while a run of the same base (a resume) leaves both."""
    from videorepa.world import build_pipeline

    run_train(tmp_path, "--max-steps", "1", data=clips)
    assert (tmp_path / "final" / "model_index.json").exists()
    run_train(tmp_path, "--max-steps", "1", "--lora-rank", "4", "--seed", "1", data=clips)
    assert not (tmp_path / "final" / "model_index.json").exists()
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").exists()
    base = tmp_path / "base-model"
    transformer = load_file(base / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, build_pipeline(1).transformer.state_dict()[k]) for k, v in transformer.items())

    args = train.parse_args(["--output-dir", str(tmp_path), "--lora-rank", "4"])
    with caplog.at_level("WARNING", logger="train"):
        train.save_base_model(args, build_pipeline(1))
    assert not caplog.text and (tmp_path / "final").exists()
    with caplog.at_level("WARNING", logger="train"):
        train.save_base_model(args, build_pipeline(2))
    assert "another base model" in caplog.text and not (tmp_path / "final").exists()
    transformer = load_file(base / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, build_pipeline(2).transformer.state_dict()[k]) for k, v in transformer.items())
    assert not [p for p in os.listdir(tmp_path) if p.endswith((".tmp", ".old"))]


def test_default_data_is_rendered_for_the_runs_seed(tmp_path, monkeypatch):
    """Without --data, train.py trains on OUT/synthetic-data rendered for its --seed; a later run of another seed in
    the same folder renders that seed's clips instead of training on the old ones."""
    from videorepa import world

    monkeypatch.setattr(world, "TRAIN_CLIPS", 2)
    for seed in (3, 4):
        run_train(tmp_path, "--max-steps", "1", "--seed", str(seed))
        assert world.dataset_manifest(str(tmp_path / "synthetic-data"))["seed"] == seed
        videos = sorted(os.listdir(tmp_path / "synthetic-data" / "videos"))
        assert videos == [f"clip_{i:05d}.mp4" for i in (seed, seed + 1)]


def test_lora_final_applies_the_trained_alpha_through_the_stock_loader(tmp_path, clips):
    """LoRA at α ≠ r (the 5B recipe's 64/128): a stock `load_lora_weights(final)` reads α from the adapter metadata
    saved with the weights and reproduces the trained transformer."""
    from diffusers import CogVideoXPipeline
    from peft import LoraConfig

    run_train(tmp_path, "--max-steps", "2", "--lora-rank", "4", "--lora-alpha", "2", "--learning-rate", "1e-2",
              data=clips)
    with open(tmp_path / "final" / "videorepa.json") as f:
        info = json.load(f)
    stock = CogVideoXPipeline.from_pretrained(info["base_model"])
    stock.load_lora_weights(tmp_path / "final")

    def trained_transformer(alpha):
        transformer = CogVideoXPipeline.from_pretrained(info["base_model"]).transformer
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        weights = load_file(tmp_path / "checkpoint-2" / "trainable.safetensors")
        missing = transformer.load_state_dict(
            {k[len("transformer."):]: v for k, v in weights.items() if k.startswith("transformer.")}, strict=False)
        assert not missing.unexpected_keys
        return transformer.eval()

    inputs = transformer_inputs(stock.transformer.config)
    with torch.no_grad():
        loaded = stock.transformer.eval()(**inputs).sample
        torch.testing.assert_close(loaded, trained_transformer(2.0)(**inputs).sample)
        assert not torch.allclose(loaded, trained_transformer(4.0)(**inputs).sample, rtol=0, atol=1e-4)
    assert (info["lora_rank"], info["lora_alpha"]) == (4, 2)


def test_bad_videos_are_skipped_and_counted(tmp_path, clips):
    folder = tmp_path / "mixed"
    shutil.copytree(os.path.dirname(clips), folder)
    (folder / "videos" / "corrupt.mp4").write_bytes(os.urandom(2048))
    # A clip shorter than the 9 frames trained on is used, its last frame repeated (as the official loader does).
    write_video(str(folder / "videos" / "short.mp4"), np.zeros((3, 64, 96, 3), np.uint8))
    with open(folder / "captions.csv", "a") as f:
        f.write("videos/missing.mp4,gone\nvideos/corrupt.mp4,noise\nvideos/short.mp4,three frames\n")
    run_train(tmp_path / "out", "--max-steps", "12", "--batch-size", "4", data=str(folder / "captions.csv"))
    assert metrics(tmp_path / "out")[-1]["skipped"] == 2


def test_no_usable_video_is_a_clear_error(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    (tmp_path / "data.csv").write_text("video,caption\nbad.mp4,x\nmissing.mp4,y\n")
    with pytest.raises(RuntimeError, match="no usable clip left: all 2 were skipped"):
        run_train(tmp_path / "out", "--max-steps", "2", data=str(tmp_path / "data.csv"))


def test_feature_cache_is_filled_once_and_reused(tmp_path, clips):
    cache = tmp_path / "cache"
    run_train(tmp_path / "a", "--max-steps", "2", "--cache-dir", str(cache), data=clips)
    entries = sorted(str(p) for p in cache.rglob("*.pt"))
    assert len(entries) == 8
    stamps = [os.stat(p).st_mtime_ns for p in entries]
    run_train(tmp_path / "b", "--max-steps", "2", "--cache-dir", str(cache), data=clips)
    assert [os.stat(p).st_mtime_ns for p in entries] == stamps  # reused, not rewritten
    assert metrics(tmp_path / "b")[-1]["skipped"] == 0
    # VAE tiling (like the frozen encoders' dtype) changes the latents: a run with it has entries of its own
    run_train(tmp_path / "c", "--max-steps", "1", "--vae-tiling", "--cache-dir", str(cache), data=clips)
    assert len(list(cache.rglob("*.pt"))) == 16


@pytest.mark.parametrize("argv, message", [
    (["--preset", "cogvideox-2b"], "needs --model"),
    (["--num-frames", "10"], "4k \\+ 1"),
    (["--height", "70"], "multiples of 16"),
    (["--teacher", "videomae"], "needs --teacher-path"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--data", "/nonexistent.csv"], "no such file"),
    (["--fsdp", "--lora-rank", "4"], "--fsdp shards a full finetune"),
    (["--max-steps", "3", "--num-epochs", "1"], "not allowed with argument"),
    (["--num-epochs", "0"], "--num-epochs must be >= 1"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
])
def test_bad_arguments_fail_fast(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert __import__("re").search(message, capsys.readouterr().err)


def torchrun(out, clips, *extra, port, script=os.path.join(REPO, "train.py")):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           script, "--output-dir", str(out), "--data", clips, "--checkpoint-every", "2", *SMALL, *extra]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(out / f"checkpoint-{extra[extra.index('--max-steps') + 1]}" / "trainable.safetensors")


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_torchrun_two_cpu_processes_resume_exactly(tmp_path, clips, sharding):
    straight = torchrun(tmp_path / "straight", clips, "--max-steps", "4", *sharding, port=29731 + len(sharding))
    assert [r["step"] for r in metrics(tmp_path / "straight")] == [1, 2, 3, 4]
    torchrun(tmp_path / "resumed", clips, "--max-steps", "2", *sharding, port=29741 + len(sharding))
    resumed = torchrun(tmp_path / "resumed", clips, "--max-steps", "4", "--resume", "latest", *sharding,
                       port=29751 + len(sharding))
    assert straight.keys() == resumed.keys()
    for key in straight:  # each rank's noise stream and the data order continue exactly
        assert torch.equal(straight[key], resumed[key]), key
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(tmp_path / "straight" / "final")
    for key, value in straight.items():
        if key.startswith("transformer."):
            assert torch.equal(pipe.transformer.state_dict()[key[len("transformer."):]], value), key
    heads = torch.load(tmp_path / "straight" / "alignment-heads.pt")
    assert heads.keys() == {k[len("aligner."):] for k in straight if k.startswith("aligner.")}


def nine_clips(folder, clips):
    """The eight shared clips plus the first again under another caption: a dataset of 9."""
    with open(clips) as f:
        lines = f.read().splitlines()
    video = lines[1].split(",")[0]
    path = os.path.join(os.path.dirname(clips), f"nine-{os.path.basename(folder)}.csv")
    with open(path, "w") as f:
        f.write("\n".join([*lines, f"{video},the same clip again"]) + "\n")
    return path


def test_torchrun_crosses_an_uneven_epoch_boundary(tmp_path, clips):
    # 9 clips, batch 1, 2 ranks: 5 batches per rank and epoch (one clip twice, as DistributedSampler pads), so step
    # 5 ends the first epoch with one clip for each rank.
    torchrun(tmp_path, nine_clips(tmp_path, clips), "--max-steps", "7", "--batch-size", "1", port=29771)
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, 8))


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    import datetime

    calls = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: calls.append(("init", a, k)))
    monkeypatch.setattr(torch.distributed, "new_group", lambda *a, **k: calls.append(("group", a, k)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    args = train.parse_args(["--dist-timeout", "90"])
    assert train.parse_args([]).dist_timeout == 1800  # as the official run's --nccl_timeout
    rank, world, _, _ = train.setup_distributed(args)
    assert (rank, world) == (1, 2)
    assert calls[0][0] == "init" and calls[0][2]["timeout"] == datetime.timedelta(seconds=90)


SLOW_RANK_ZERO = """
import sys, time
import torch
import train

def slow(phase):
    calls = []

    def run(*args, **kwargs):
        if torch.distributed.get_rank() == 0 and not calls:  # the first call of each phase
            time.sleep(SECONDS)
        calls.append(1)
        return phase(*args, **kwargs)
    return run

for name in ("write_validation_videos", "write_checkpoint", "save_final"):
    setattr(train, name, slow(getattr(train, name)))
train.main(sys.argv[1:])
"""


def test_slow_rank_zero_phases_outlast_the_collective_timeout(tmp_path, clips):
    # Validation videos and the checkpoint after step 1, and the final save, run on rank 0 alone and take twice the
    # collective timeout: rank 1 must wait for them, then train on, without a collective timing out.
    script = tmp_path / "slow_rank_zero.py"
    script.write_text(SLOW_RANK_ZERO.replace("SECONDS", "6"))
    torchrun(tmp_path / "out", clips, "--max-steps", "2", "--dist-timeout", "3", "--validation-every", "1",
             "--validation-steps", "1", "--checkpoint-every", "1", port=29781, script=str(script))
    assert [r["step"] for r in metrics(tmp_path / "out")] == [1, 2]
    assert len(os.listdir(tmp_path / "out" / "validation")) == 2


def test_fsdp_trains_like_ddp(tmp_path, clips):
    ddp = torchrun(tmp_path / "ddp", clips, "--max-steps", "2", port=29761)
    fsdp = torchrun(tmp_path / "fsdp", clips, "--max-steps", "2", "--fsdp", "--validation-every", "2",
                    "--validation-steps", "2", port=29762)
    assert os.listdir(tmp_path / "fsdp" / "validation") == ["step-000002-0.mp4"]  # every rank samples, one writes
    assert ddp.keys() == fsdp.keys()
    for key in ddp:
        # The same averaged gradients, reduced in another order: AdamW's normalised steps (lr 1e-3) can turn that
        # rounding into ~1e-6 moves of near-zero weights, far below one step.
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-4)


def test_accumulation_checkpointing_full_grid_and_validation_videos(tmp_path, clips):
    run_train(tmp_path, "--max-steps", "2", "--gradient-accumulation-steps", "2", "--gradient-checkpointing",
              "--relation-grid", "student", "--trd-mode", "spatial", "--validation-every", "2",
              "--validation-steps", "2", "--mixed-precision", "bf16", data=clips)
    rows = metrics(tmp_path)
    assert len(rows) == 2 and all(np.isfinite(r["loss_trd"]) and r["loss_trd"] > 0 for r in rows)
    videos = os.listdir(tmp_path / "validation")
    assert videos == ["step-000002-0.mp4"]
    from videorepa.video_io import read_video

    assert read_video(str(tmp_path / "validation" / videos[0])).shape == (9, 64, 96, 3)


def test_validation_videos_from_a_saved_pipeline_in_bf16(tmp_path, clips):
    # As with a real model: VAE and T5 load in bf16, the transformer trains in float32.
    from videorepa.world import build_pipeline

    build_pipeline().save_pretrained(tmp_path / "pipeline")
    run_train(tmp_path / "out", "--max-steps", "1", "--model", str(tmp_path / "pipeline"), "--mixed-precision", "bf16",
              "--validation-every", "1", "--validation-steps", "2", data=clips)
    from videorepa.video_io import read_video

    assert read_video(str(tmp_path / "out" / "validation" / "step-000001-0.mp4")).shape == (9, 64, 96, 3)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, clips, monkeypatch):
    import videorepa.training as training

    real, calls = training.diffusion_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(training, "diffusion_loss", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 3.*last checkpoint"):
        run_train(tmp_path, "--max-steps", "5", "--checkpoint-every", "2", data=clips)
    weights = load_file(tmp_path / "checkpoint-2" / "trainable.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not os.path.exists(tmp_path / "final")


def test_non_finite_gradient_stops_before_the_weights_change(tmp_path, clips, monkeypatch):
    """A finite loss whose gradient is NaN (here every gradient of step 3) must not reach the optimizer: before,
    step 3 wrote NaN weights and checkpoint-3 saved them."""
    import videorepa.training as training

    class NaNGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    real, calls = training.diffusion_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return NaNGradient.apply(loss) if len(calls) == 3 else loss

    monkeypatch.setattr(training, "diffusion_loss", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite gradient norm at step 3.*not updated"):
        run_train(tmp_path, "--max-steps", "5", "--checkpoint-every", "1", data=clips)
    assert not os.path.exists(tmp_path / "checkpoint-3") and not os.path.exists(tmp_path / "final")
    weights = load_file(tmp_path / "checkpoint-2" / "trainable.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def _ranks_agree(rank, world):
    """train.py's cross-rank reductions, rank 1 holding a NaN."""
    totals = {"loss": torch.tensor(1.0 + rank), "loss_align": torch.tensor(2.0 * rank)}
    return train.mean_over_ranks(totals, world), train.all_finite(torch.tensor(float("nan") if rank else 1.0), world)


def test_ranks_log_the_mean_loss_and_stop_together():
    from multiprocess import run_processes

    assert run_processes(2, _ranks_agree) == [({"loss": 1.5, "loss_align": 1.0}, False)] * 2


@pytest.fixture
def fake_flash_attn(monkeypatch):
    """An installed `flash_attn` whose kernel is plain attention, saving other tensors for backward than SDPA does
    (as the real one does); it counts its calls."""
    import importlib.machinery
    import types

    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.calls = 0

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
        module.calls += 1
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) * (softmax_scale or q.shape[-1] ** -0.5), dim=-1)
        return (weights @ v).transpose(1, 2)

    module.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return module


def test_gradient_checkpointing_recomputes_on_the_same_attention_kernel(tmp_path, clips, fake_flash_attn):
    """Checkpointed blocks are recomputed in backward: there too on flash-attn, else torch.utils.checkpoint finds
    other saved tensors (CheckpointError) or, on another SDPA kernel, other values."""
    from videorepa.world import TRANSFORMER_CONFIG

    run_train(tmp_path, "--max-steps", "1", "--gradient-checkpointing", "--attention", "flash-attn",
              "--mixed-precision", "bf16", data=clips)
    assert fake_flash_attn.calls == 2 * TRANSFORMER_CONFIG["num_layers"]  # each block in forward and recomputed


def test_training_from_a_local_pipeline_directory(tmp_path, clips):
    # --model with a saved pipeline: frozen parts load in the autocast dtype, the transformer in float32.
    run_train(tmp_path / "first", "--max-steps", "1", data=clips)
    run_train(tmp_path / "second", "--max-steps", "2", "--model", str(tmp_path / "first" / "final"),
              "--mixed-precision", "bf16", data=clips)
    assert [r["step"] for r in metrics(tmp_path / "second")] == [1, 2]
    final = tmp_path / "second" / "final"
    vae = load_file(final / "vae" / "diffusion_pytorch_model.safetensors")
    transformer = load_file(final / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in vae.values()} == {torch.bfloat16}
    assert {v.dtype for v in transformer.values()} == {torch.float32}
