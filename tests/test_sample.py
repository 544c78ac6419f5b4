"""sample.py on CPU with tiny train.py outputs: full and LoRA models, seeds, files, frames, errors."""

import logging
import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sample  # noqa: E402
import train  # noqa: E402
from videorepa.synthetic import write_dataset  # noqa: E402
from videorepa.video_io import read_video  # noqa: E402

FAST = ["--steps", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 2-step train.py outputs on the same clips: a full finetune and a LoRA."""
    root = tmp_path_factory.mktemp("runs")
    data = write_dataset(str(root / "data"), num_clips=4, seed=1)
    for name, extra in (("full", []), ("lora", ["--lora-rank", "4", "--learning-rate", "0.05"])):
        train.main(["--output-dir", str(root / name), "--max-steps", "2", "--data", data, *extra])
    return root


def frames_for(model, seed=0, extra=()):
    args = sample.parse_args(["--model", str(model), "--seed", str(seed), *FAST, *extra])
    pipe = sample.load(args, sample.torch.device("cpu"), sample.torch.float32)
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
    assert np.array_equal(frames_for(runs / "full", extra=["--vae-tiling"]), frames_for(runs / "full"))


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
    assert [os.path.basename(p) for p in written] == ["000-a-ball-bounces-seed0.mp4", "001-a-ball-rolls-seed0.mp4"]


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
    for argv in (["--num-frames", "10"], ["--height", "100"], ["--output", "x.mp4", "--seed", "1", "2"]):
        with pytest.raises(SystemExit):
            sample.parse_args(argv)


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
    pipe = sample.load(cut, torch.device("cpu"), torch.float32)
    assert np.array_equal(read_video(str(out)), sample.generate(pipe, cut.prompt[0], cut.seed[0], cut))
