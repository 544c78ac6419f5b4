"""sample.py on CPU with tiny train.py outputs (full and LoRA models, seeds, files, frames, errors), the official
inference settings and long prompts."""

import logging
import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline  # noqa: E402

import sample  # noqa: E402
import train  # noqa: E402
from videorepa.models import build_tiny_pipeline  # noqa: E402
from videorepa.synthetic import write_dataset  # noqa: E402
from videorepa.video_io import read_video  # noqa: E402

FAST = ["--steps", "2"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 2-step train.py outputs on the same clips: a full finetune and a LoRA."""
    root = tmp_path_factory.mktemp("runs")
    data = write_dataset(str(root / "data"), num_clips=4, seed=1)
    for name, extra in (("full", []), ("lora", ["--lora-rank", "4", "--learning-rate", "0.05"])):
        train.main(["--output-dir", str(root / name), "--max-steps", "2", "--data", data, *extra])
    return root


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny stand-in for a downloaded CogVideoX-2b: its scheduler is CogVideoXDDIMScheduler, as the real one's.
    Spacing "leading" here, so that the test sees sample.py set trailing itself."""
    folder = tmp_path_factory.mktemp("models") / "CogVideoX-2b"
    pipe = build_tiny_pipeline()
    pipe.scheduler = CogVideoXDDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    pipe.save_pretrained(folder)
    return folder


def frames_for(model, seed=42, extra=()):
    args = sample.parse_args(["--model", str(model), "--seed", str(seed), *FAST, *extra])
    pipe = sample.load(args, CPU, torch.float32)
    return sample.generate(pipe, args.prompt[0], seed, args)


def test_full_finetune_writes_the_requested_frames(runs, tmp_path):
    out = tmp_path / "clip.mp4"
    sample.main(["--model", str(runs / "full" / "final"), "--prompt", "A ball rolls.", "--output", str(out), *FAST])
    video = read_video(str(out))
    assert video.shape == (9, 64, 96, 3)


def test_frames_reach_the_file_exactly(runs, tmp_path):
    frames = frames_for(runs / "full")
    assert frames.dtype == np.uint8 and frames.std() > 1
    sample.main(["--model", str(runs / "full"), "--output", str(tmp_path / "exact.mp4"), "--lossless", *FAST])
    assert np.array_equal(read_video(str(tmp_path / "exact.mp4")), frames)
    # The default yuv420p file is lossy but keeps the scale: a second ×255 would saturate it.
    sample.main(["--model", str(runs / "full"), "--output", str(tmp_path / "a.mp4"), *FAST])
    assert abs(read_video(str(tmp_path / "a.mp4")).mean() - frames.mean()) < 2


def test_same_seed_same_video_other_seed_other_video(runs):
    a, b, c = frames_for(runs / "full", 3), frames_for(runs / "full", 3), frames_for(runs / "full", 4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_lora_output_loads_with_its_scale(runs):
    lora_full = frames_for(runs / "lora")
    lora_off = frames_for(runs / "lora", extra=["--lora-scale", "0"])
    base = frames_for(runs / "lora" / "base-model")
    assert np.array_equal(lora_off, base)
    assert not np.array_equal(lora_full, base)


def test_vae_tiling_leaves_the_tiny_video_whole(runs):
    assert np.array_equal(frames_for(runs / "full", extra=["--no-vae-tiling"]), frames_for(runs / "full"))


def test_one_file_per_prompt_and_seed(runs, tmp_path):
    written = sample.main(["--model", str(runs / "full"), "--prompt", "A ball falls.", "--prompt", "A ball falls.",
                           "--seed", "0", "1", "--output-dir", str(tmp_path), "--format", "gif", *FAST])
    assert len(set(written)) == 4 and all(os.path.isfile(p) and p.endswith(".gif") for p in written)
    assert read_video(written[0]).shape[0] == 9


def test_prompts_file_and_default_model(runs, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\nA ball bounces.\n\nA ball rolls.\n")
    monkeypatch.setattr(sample, "DEFAULT_RUN", str(runs / "full"))
    written = sample.main(["--prompts", str(prompts), "--output-dir", str(tmp_path / "out"), *FAST])
    assert [os.path.basename(p) for p in written] == ["000-a-ball-bounces-seed42.mp4", "001-a-ball-rolls-seed42.mp4"]


def test_paper_prompts_file_parses():
    args = sample.parse_args(["--prompts", os.path.join(os.path.dirname(__file__), "..", "prompts",
                                                       "videorepa_demos.txt")])
    assert len(args.prompt) == 18 and "Glass shatters on the floor." in args.prompt


def test_errors_name_the_problem(runs, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not a CogVideoX pipeline"):
        sample.main(["--model", str(tmp_path), *FAST])
    monkeypatch.setattr(sample, "DEFAULT_RUN", str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="run `python train.py` first"):
        sample.main(FAST)
    for argv in (["--num-frames", "10"], ["--height", "100"], ["--output", "x.mp4", "--seed", "1", "2"],
                 ["--scheduler", "euler"], ["--timestep-spacing", "middle"]):
        with pytest.raises(SystemExit):
            sample.parse_args(argv)


# The official inference's settings (inference/generate.py), by default and each changed by its flag.

def spy_on_pipeline(monkeypatch):
    """Records (pipeline, keyword arguments) of every CogVideoXPipeline call, then runs it."""
    calls = []
    run = CogVideoXPipeline.__call__

    def spy(self, *args, **kwargs):
        calls.append((self, kwargs))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(CogVideoXPipeline, "__call__", spy)
    return calls


def fps_of(path):
    import av

    with av.open(str(path)) as container:
        return container.streams.video[0].average_rate


def test_defaults_are_the_official_inference():
    args = sample.parse_args([])
    assert (args.scheduler, args.timestep_spacing, args.dynamic_cfg, args.guidance_scale, args.steps, args.seed,
            args.fps, args.vae_slicing, args.vae_tiling) == ("dpm", "trailing", True, 6.0, 50, [42], 8, True, True)


def test_pipeline_runs_with_the_official_settings(base_model, tmp_path, monkeypatch):
    calls = spy_on_pipeline(monkeypatch)
    sample.main(["--model", str(base_model), "--output", str(tmp_path / "a.mp4"), *FAST])
    (pipe, kwargs), = calls
    # The model's own noise schedule under CogVideoXDPMScheduler with trailing spacing: 2 steps are 999 and 499.
    assert type(pipe.scheduler) is CogVideoXDPMScheduler and pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.scheduler.timesteps.tolist() == [999, 499]
    model_schedule = CogVideoXDDIMScheduler.from_pretrained(base_model, subfolder="scheduler").config
    for key in ("prediction_type", "rescale_betas_zero_snr", "snr_shift_scale", "beta_schedule"):
        assert pipe.scheduler.config[key] == model_schedule[key]
    assert kwargs["use_dynamic_cfg"] is True and kwargs["guidance_scale"] == 6.0
    assert kwargs["num_inference_steps"] == 2 and kwargs["generator"].initial_seed() == 42
    assert pipe.vae.use_slicing and pipe.vae.use_tiling
    assert fps_of(tmp_path / "a.mp4") == 8


def test_flags_change_each_setting(base_model, tmp_path, monkeypatch):
    calls = spy_on_pipeline(monkeypatch)
    sample.main(["--model", str(base_model), "--output", str(tmp_path / "b.mp4"), "--scheduler", "ddim",
                 "--timestep-spacing", "leading", "--no-dynamic-cfg", "--guidance-scale", "3", "--seed", "7",
                 "--fps", "12", "--no-vae-tiling", "--no-vae-slicing", "--steps", "3"])
    (pipe, kwargs), = calls
    assert type(pipe.scheduler) is CogVideoXDDIMScheduler and pipe.scheduler.config.timestep_spacing == "leading"
    assert pipe.scheduler.timesteps.tolist() == [666, 333, 0]
    assert kwargs["use_dynamic_cfg"] is False and kwargs["guidance_scale"] == 3.0
    assert kwargs["num_inference_steps"] == 3 and kwargs["generator"].initial_seed() == 7
    assert not pipe.vae.use_slicing and not pipe.vae.use_tiling
    assert fps_of(tmp_path / "b.mp4") == 12


# Prompts over the text encoder's limit: truncated with the stock pipeline's warning, not refused.

def test_long_prompt_is_truncated_with_a_warning(runs, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("diffusers"), "propagate", True)
    long_prompt = "A red ball falls off a table, bounces twice and rolls away. " * 5  # 300 bytes
    out = tmp_path / "long.mp4"
    with caplog.at_level(logging.WARNING):
        sample.main(["--model", str(runs / "full"), "--prompt", long_prompt, "--output", str(out), "--lossless",
                     *FAST])
    assert any("truncated" in record.getMessage() for record in caplog.records)
    # ByT5 reads one token per byte, and its end-of-text token makes 128: the first 127 bytes are what counts.
    cut = sample.parse_args(["--model", str(runs / "full"), "--prompt", long_prompt[:127], *FAST])
    pipe = sample.load(cut, CPU, torch.float32)
    assert np.array_equal(read_video(str(out)), sample.generate(pipe, cut.prompt[0], cut.seed[0], cut))

