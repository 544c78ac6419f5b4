"""The tiny world: the committed VAE and teacher load, match the configs the code builds and have learned the clips;
pretrain_world.py regenerates them."""

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import pretrain_world  # noqa: E402
from videorepa import world  # noqa: E402
from videorepa.physics import track_balls  # noqa: E402
from videorepa.synthetic import make_clip  # noqa: E402


def assets_size_mib() -> float:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(world.ASSETS) for f in files) / 2**20


def test_committed_weights_match_the_code_and_stay_small():
    vae = world.load_vae()
    for key, value in world.VAE_CONFIG.items():
        assert vae.config[key] == (list(value) if isinstance(value, tuple) else value), key
    assert vae.config.scaling_factor != 1.15258426  # set from the trained latents, not diffusers' default
    built = world.build_vae()
    assert vae.state_dict().keys() == built.state_dict().keys()
    assert all(vae.state_dict()[k].shape == v.shape for k, v in built.state_dict().items())
    from transformers import VideoMAEModel

    teacher = VideoMAEModel.from_pretrained(world.teacher_path())
    expected = world.teacher_config()
    assert teacher.config.num_hidden_layers == world.TEACHER_BLOCKS
    for key in ("image_size", "patch_size", "num_frames", "tubelet_size", "hidden_size"):
        got = getattr(teacher.config, key)
        assert (list(got) if isinstance(got, tuple) else got) == (
            list(getattr(expected, key)) if isinstance(getattr(expected, key), tuple) else getattr(expected, key)), key
    assert assets_size_mib() < 5


@torch.no_grad()
def test_committed_vae_reconstructs_the_balls():
    """A held-out clip of each scene through the VAE: every ball is found again, in its colour, in nearly every
    frame and near where it was (a latent frame holds 4 frames, and the VAE smears a fast ball over them)."""
    vae = world.load_vae()
    for seed in range(30_000_000, 30_000_004):
        frames, _ = make_clip(seed, **world.CLIP)
        video = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        latents = vae.encode(video).latent_dist.mean
        assert latents.shape[2:] == (5, 16, 24)
        out = vae.decode(latents).sample[0].permute(1, 2, 3, 0)
        recon = ((out + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        truth = {t.color: t for t in track_balls(frames)}
        found = {t.color: t for t in track_balls(recon)}
        assert truth.keys() <= found.keys(), seed  # blurred rims can add a few pixels of a neighbouring hue
        for color, tr in truth.items():
            got = found[color]
            assert got.present.mean() >= 0.9, (seed, color)
            ok = got.present & tr.present
            assert np.median(np.hypot(got.x[ok] - tr.x[ok], got.y[ok] - tr.y[ok])) < 6.0, (seed, color)


@torch.no_grad()
def test_teacher_tokens_have_relations_beyond_the_margin():
    """TRD needs teacher relations that a collapsed student misses by more than the 0.1 margin."""
    from videorepa.teachers import load_teacher

    teacher = load_teacher("tiny", None, world.CLIP["height"], world.CLIP["width"], world.CLIP["num_frames"])
    frames, _ = make_clip(30_000_005, **world.CLIP)
    tokens = teacher(torch.from_numpy(frames).permute(0, 3, 1, 2)[None].float() / 127.5 - 1).flatten(1, 3)[0]
    gram = torch.nn.functional.normalize(tokens, dim=-1) @ torch.nn.functional.normalize(tokens, dim=-1).T
    assert ((1 - gram) > 0.1).float().mean() > 0.2


def test_world_pipeline_and_teacher_shapes():
    from videorepa.teachers import load_teacher

    pipe = world.build_pipeline(seed=0)
    assert pipe.vae_scale_factor_spatial == 4 and pipe.vae_scale_factor_temporal == 4
    teacher = load_teacher("tiny", None, world.CLIP["height"], world.CLIP["width"], world.CLIP["num_frames"])
    video = torch.zeros(1, world.CLIP["num_frames"], 3, world.CLIP["height"], world.CLIP["width"])
    assert teacher(video).shape == (1, 8, 8, 12, 64)
    other = world.build_pipeline(seed=1)
    assert not torch.equal(pipe.transformer.proj_out.weight, other.transformer.proj_out.weight)
    assert all(torch.equal(a, b) for a, b in zip(pipe.text_encoder.parameters(), other.text_encoder.parameters()))


def test_tokenizer_reads_each_caption_word_as_one_token():
    """Every word of every caption has a token of its own (colours among them), other words read as <unk>, each
    prompt ends in T5's end token."""
    from videorepa.synthetic import COLORS, caption_texts

    tokenizer = world.build_tokenizer()
    unk = tokenizer.unk_token_id
    for text in caption_texts():
        ids = tokenizer(text).input_ids
        assert ids[-1] == tokenizer.eos_token_id and unk not in ids and len(ids) <= world.TEXT_TOKENS
    colours = [tokenizer(f"A {c} ball").input_ids[1] for c in COLORS]
    assert len(set(colours)) == len(COLORS)
    assert tokenizer("A RED ball, wobbling.").input_ids == [*tokenizer("a red ball").input_ids[:3],
                                                           tokenizer.convert_tokens_to_ids(","), unk,
                                                           tokenizer.convert_tokens_to_ids("."), 1]


def test_world_pipeline_saves_and_loads_its_text_encoder(tmp_path):
    from diffusers import CogVideoXPipeline

    from videorepa.diffusion import encode_prompts
    from videorepa.synthetic import falling_caption

    pipe = world.build_pipeline(seed=0)
    pipe.save_pretrained(str(tmp_path))
    loaded = CogVideoXPipeline.from_pretrained(str(tmp_path))
    prompts = [falling_caption("red"), falling_caption("blue")]
    embeds = encode_prompts(pipe, prompts, "cpu")
    assert embeds.shape == (2, world.TEXT_TOKENS, world.TEXT_ENCODER_CONFIG["d_model"])
    torch.testing.assert_close(encode_prompts(loaded, prompts, "cpu"), embeds, rtol=0, atol=0)
    assert not torch.allclose(embeds[0], embeds[1])  # the colour is in the text


def test_pretrain_script_writes_loadable_weights(tmp_path):
    pretrain_world.main(["--output-dir", str(tmp_path), "--vae-steps", "1", "--teacher-steps", "1",
                         "--teacher-batch-size", "2", "--vae-batch-size", "1"])
    vae = world.load_vae(str(tmp_path))
    assert vae.config.latent_channels == world.VAE_CONFIG["latent_channels"]
    assert os.path.isfile(os.path.join(world.teacher_path(str(tmp_path)), "model.safetensors"))
    settings = json.loads((tmp_path / "pretrain-vae.json").read_text())
    assert settings["vae_steps"] == 1 and "teacher_steps" not in settings
    assert world.fingerprint(str(tmp_path)) != world.fingerprint()


def test_missing_weights_name_the_command(tmp_path):
    with pytest.raises(ValueError, match="python pretrain_world.py"):
        world.load_vae(str(tmp_path))
    with pytest.raises(ValueError, match="python pretrain_world.py"):
        world.teacher_path(str(tmp_path))


def test_dataset_is_rendered_again_when_the_renderer_seed_or_count_changed(tmp_path, monkeypatch, caplog):
    from videorepa import synthetic
    from videorepa.video_io import read_video

    folder = str(tmp_path / "data")
    assert world.ensure_dataset(folder, num_clips=2, seed=5)
    video = os.path.join(folder, "videos", "clip_00005.mp4")
    written = os.stat(video).st_ino
    assert not world.ensure_dataset(folder, num_clips=2, seed=5)
    assert os.stat(video).st_ino == written  # the same clips: reused, not rendered again

    render = synthetic.make_clip
    monkeypatch.setattr(synthetic, "make_clip", lambda seed, **kw: (255 - render(seed, **kw)[0], render(seed, **kw)[1]))
    with caplog.at_level("WARNING", logger="videorepa.world"):
        assert world.ensure_dataset(folder, num_clips=2, seed=5)  # what an updated renderer draws differs
    assert "another renderer" in caplog.text
    assert abs(read_video(video).astype(float).mean() - (255 - render(5, **world.CLIP)[0]).mean()) < 3
    monkeypatch.undo()

    assert world.ensure_dataset(folder, num_clips=3, seed=6)
    assert sorted(os.listdir(os.path.join(folder, "videos"))) == [f"clip_{i:05d}.mp4" for i in (6, 7, 8)]
    os.remove(os.path.join(folder, "videos", "clip_00007.mp4"))  # a clip gone: the folder is incomplete
    assert world.dataset_manifest(folder) is None and world.ensure_dataset(folder, num_clips=3, seed=6)
    os.remove(os.path.join(folder, world.DATA_MANIFEST))  # a dataset written before the manifest existed
    assert world.ensure_dataset(folder, num_clips=3, seed=6) and world.dataset_manifest(folder)["seed"] == 6
    assert sorted(os.listdir(tmp_path)) == ["data", "data.lock"]


def test_tube_mask_hides_the_same_patches_in_every_tubelet():
    mask = pretrain_world.tube_mask(3, (4, 2, 5), 0.7, torch.Generator().manual_seed(0))
    assert mask.shape == (3, 40) and (mask.view(3, 4, 10).sum(-1) == 7).all()
    assert (mask.view(3, 4, 10) == mask.view(3, 4, 10)[:, :1]).all()
