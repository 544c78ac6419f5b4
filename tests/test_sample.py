"""sample.py on CPU with tiny train.py outputs (full and LoRA models, seeds, files, frames, errors), the official
inference settings, long prompts, and tiny stand-ins for the released VideoREPA checkpoints in their layouts."""

import json
import logging
import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel,
)
from safetensors.torch import save_file  # noqa: E402

import sample  # noqa: E402
import train  # noqa: E402
from test_components import transformer_inputs  # noqa: E402
from videorepa.models import TRANSFORMER_CONFIGS, build_transformer, generate_video, text_length  # noqa: E402
from videorepa.synthetic import write_dataset  # noqa: E402
from videorepa.video_io import read_video  # noqa: E402
from videorepa.world import build_pipeline  # noqa: E402

FAST = ["--steps", "2", "--num-frames", "9"]  # fewer frames than the model's 17: faster
CPU = torch.device("cpu")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


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
    pipe = build_pipeline()
    pipe.scheduler = CogVideoXDDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    pipe.save_pretrained(folder)
    return folder


def load(argv):
    return sample.load(sample.parse_args([*argv, *FAST]), CPU, torch.float32)


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
    with pytest.raises(ValueError, match="--lora .*no such file"):
        sample.main(["--model", str(runs / "full"), "--lora", str(tmp_path / "missing.safetensors"), *FAST])
    with pytest.raises(ValueError, match="is a LoRA output already"):
        sample.main(["--model", str(runs / "lora"), "--lora", str(runs / "lora" / "final"), *FAST])
    with pytest.raises(ValueError, match="--lora-scale needs LoRA weights"):
        sample.main(["--model", str(runs / "full"), "--lora-scale", "0.5", *FAST])
    with pytest.raises(ValueError, match="--transformer .*no config.json"):
        sample.main(["--model", str(runs / "full"), "--transformer", str(tmp_path), *FAST])
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
    assert (args.scheduler, args.timestep_spacing, args.dynamic_cfg, args.steps, args.seed, args.fps,
            args.vae_slicing, args.vae_tiling) == ("dpm", "trailing", True, 50, [42], 8, True, True)
    assert args.guidance_scale is None  # the model's recorded scale, else the official 6 (next test)


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


@pytest.mark.parametrize("run", ["full", "lora"])
def test_tiny_world_outputs_sample_at_the_guidance_their_preset_recorded(runs, tmp_path, monkeypatch, run):
    """train.py records its preset's guidance beside the weights (tiny: 1, no unconditional model to guide with);
    sample.py takes it unless --guidance-scale says otherwise."""
    assert json.loads((runs / run / "final" / "sampling.json").read_text()) == {"guidance_scale": 1.0}
    calls = spy_on_pipeline(monkeypatch)
    sample.main(["--model", str(runs / run), "--output", str(tmp_path / "a.mp4"), *FAST])
    sample.main(["--model", str(runs / run), "--output", str(tmp_path / "b.mp4"), "--guidance-scale", "4", *FAST])
    assert [kwargs["guidance_scale"] for _, kwargs in calls] == [1.0, 4.0]


def test_recorded_guidance_travels_with_the_weights_that_sample(runs, base_model, tmp_path, monkeypatch):
    """A train.py LoRA or transformer put on another pipeline samples at the scale recorded beside it, and that
    pipeline alone at the official 6; so does a LoRA run's saved base."""
    calls = spy_on_pipeline(monkeypatch)
    for extra in (["--lora", str(runs / "lora" / "final" / "pytorch_lora_weights.safetensors")],
                  ["--transformer", str(runs / "full" / "final" / "transformer")], []):
        sample.main(["--model", str(base_model), "--output", str(tmp_path / f"{len(calls)}.mp4"), *extra, *FAST])
    sample.main(["--model", str(runs / "lora" / "base-model"), "--output", str(tmp_path / "base.mp4"), *FAST])
    assert [kwargs["guidance_scale"] for _, kwargs in calls] == [1.0, 1.0, 6.0, 1.0]


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
    long_prompt = "A red ball falls off a table, bounces twice and rolls away. " * 5  # 70 words and marks
    out = tmp_path / "long.mp4"
    with caplog.at_level(logging.WARNING):
        sample.main(["--model", str(runs / "full"), "--prompt", long_prompt, "--output", str(out), "--lossless",
                     *FAST])
    assert any("truncated" in record.getMessage() for record in caplog.records)
    # What counts is the prompt's first tokens, as many as the end token leaves room for.
    args = sample.parse_args(["--model", str(runs / "full"), *FAST])
    pipe = sample.load(args, CPU, torch.float32)
    kept = pipe.tokenizer.decode(pipe.tokenizer(long_prompt).input_ids[:text_length(pipe) - 1])
    assert len(kept) < len(long_prompt) / 2
    assert np.array_equal(read_video(str(out)), sample.generate(pipe, kept, args.seed[0], args))


# The released checkpoints, as tiny stand-ins in their exact layouts (official: inference/models/cogvideox_align.py,
# finetune/scripts/merge.sh, inference/generate.py).

TINY = TRANSFORMER_CONFIGS["tiny"]
WIDTH = TINY["num_attention_heads"] * TINY["attention_head_dim"]
PROJECTOR = {  # CogVideoXTransformer3DModelAlign's extras at the tiny width, projector_dim 16, align_dims [12]
    "projectors.0.0.weight": (16, WIDTH), "projectors.0.0.bias": (16,), "projectors.0.2.weight": (16, 16),
    "projectors.0.2.bias": (16,), "projectors.0.4.weight": (12, 16), "projectors.0.4.bias": (12,),
    "downsampler_cogvideo_output.weight": (12, 12, 3, 3), "downsampler_cogvideo_output.bias": (12,),
}


def trained_transformer():
    """Tiny transformer weights other than the base's (seed 0), standing in for finetuned ones."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return build_transformer("tiny").eval()


def write_videorepa_2b(folder, transformer, shards=False, drop=()):
    """VideoREPA-2B's transformer/: config.json naming CogVideoXTransformer3DModelAlign with its extra keys, and
    the stock weights plus the projector in fp32 safetensors, as one file or as the shards of zero_to_fp32 with the
    index that merge.sh renames to diffusers' name."""
    os.makedirs(folder)
    config = {key: value for key, value in transformer.config.items() if not key.startswith("_")}
    config.update(_class_name="CogVideoXTransformer3DModelAlign", _diffusers_version="0.32.1", align_layer=2,
                  align_dims=[12], projector_dim=16)
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)
    generator = torch.Generator().manual_seed(3)
    tensors = {key: value.contiguous() for key, value in transformer.state_dict().items() if key not in drop}
    tensors.update({key: torch.randn(shape, generator=generator) for key, shape in PROJECTOR.items()})
    if not shards:
        save_file(tensors, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        return
    names = sorted(tensors)
    files = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in files.items():
        save_file({key: tensors[key] for key in keys}, folder / file, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {key: file for file, keys in files.items() for key in keys}}
    with open(folder / "diffusion_pytorch_model.safetensors.index.json", "w") as f:
        json.dump(index, f)


def test_released_2b_transformer_loads_into_the_stock_model(base_model, tmp_path, capsys):
    trained = trained_transformer()
    write_videorepa_2b(tmp_path / "transformer", trained)
    pipe = load(["--model", str(base_model), "--transformer", str(tmp_path / "transformer")])
    assert type(pipe.transformer) is CogVideoXTransformer3DModel
    got, want = pipe.transformer.state_dict(), trained.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in want)
    report = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--transformer")]
    assert len(report) == 1
    assert "8 tensors (downsampler_cogvideo_output, projectors)" in report[0]
    assert "config keys align_dims, align_layer, projector_dim" in report[0]


def test_released_2b_samples_as_its_weights_do(base_model, tmp_path):
    """The sharded layout, end to end: the video equals the base pipeline's with the finetuned weights put in."""
    trained = trained_transformer()
    write_videorepa_2b(tmp_path / "transformer", trained, shards=True)
    out = tmp_path / "2b.mp4"
    sample.main(["--model", str(base_model), "--transformer", str(tmp_path / "transformer"), "--output", str(out),
                 "--lossless", *FAST])
    pipe = CogVideoXPipeline.from_pretrained(base_model, transformer=trained)
    pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    want = generate_video(pipe, sample.parse_args([]).prompt[0], 42, num_frames=9, steps=2, use_dynamic_cfg=True)
    assert np.array_equal(read_video(str(out)), want)


def test_transformer_missing_a_stock_weight_is_an_error(base_model, tmp_path):
    write_videorepa_2b(tmp_path / "transformer", trained_transformer(), drop=["norm_final.weight"])
    with pytest.raises(ValueError, match="lacks 1 weights of CogVideoXTransformer3DModel: norm_final.weight"):
        load(["--model", str(base_model), "--transformer", str(tmp_path / "transformer")])


def lora_tensors(rank=4, seed=5):
    """Random LoRA A and B for every targeted layer of the tiny transformer, in diffusers key names."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for block in range(TINY["num_layers"]):
        for target in LORA_TARGETS:
            key = f"transformer.transformer_blocks.{block}.attn1.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, WIDTH, generator=generator) / WIDTH ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(WIDTH, rank, generator=generator) / rank ** 0.5
    return tensors


def fused(weights, tensors, scale):
    """W + scale·BA for every layer the LoRA tensors adapt: the official fuse_lora(lora_scale=α/r)."""
    out = dict(weights)
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            layer = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            up = tensors[key.replace("lora_A", "lora_B")]
            out[f"{layer}.weight"] = weights[f"{layer}.weight"] + scale * up @ tensors[key]
    return out


def test_released_5b_lora_fuses_at_the_given_scale(base_model, tmp_path):
    """VideoREPA-5B's pytorch_lora_weights.safetensors (diffusers keys, no α recorded, trained at α/r = 64/128):
    --lora-scale 0.5 gives the official fusion at α/r = 0.5; a folder holding the file works alike."""
    tensors = lora_tensors()
    save_file(tensors, tmp_path / "pytorch_lora_weights.safetensors", metadata={"format": "pt"})
    base = CogVideoXTransformer3DModel.from_pretrained(base_model, subfolder="transformer").state_dict()
    want = fused(base, tensors, 0.5)
    for lora in (tmp_path / "pytorch_lora_weights.safetensors", tmp_path):
        got = load(["--model", str(base_model), "--lora", str(lora), "--lora-scale", "0.5"]).transformer.state_dict()
        assert got.keys() == want.keys()  # fused: plain layers, no adapter left
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)


def transformer_output(transformer):
    with torch.no_grad():
        return transformer(**transformer_inputs(transformer.config)).sample


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_trained_lora_alpha_is_honoured(base_model, tmp_path, scale):
    """A LoRA final/ whose file records α = 8 at r = 4 in diffusers' adapter metadata: sampling applies
    --lora-scale × α/r, not the α = r that a file without α gets."""
    from peft import LoraConfig

    tensors = lora_tensors()
    final = tmp_path / "final"
    CogVideoXPipeline.save_lora_weights(
        final, transformer_lora_layers={key.removeprefix("transformer."): t for key, t in tensors.items()},
        transformer_lora_adapter_metadata=LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS).to_dict())
    with open(final / "videorepa.json", "w") as f:
        json.dump({"base_model": str(base_model), "lora_rank": 4}, f)
    pipe = load(["--model", str(final), "--lora-scale", str(scale)])
    reference = CogVideoXTransformer3DModel.from_pretrained(base_model, subfolder="transformer")
    reference.load_state_dict(fused(reference.state_dict(), tensors, 8 / 4 * scale))
    torch.testing.assert_close(transformer_output(pipe.transformer), transformer_output(reference))
