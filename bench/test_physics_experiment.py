"""The physics experiment end to end at toy sizes, and its probe on data where the answer is known."""

import json

import numpy as np
import pytest

pytest.importorskip("diffusers")

import physics_experiment  # noqa: E402


def test_ridge_probe_recovers_a_linear_map_and_fails_on_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 10))
    clips = np.repeat(np.arange(30), 10)
    y = x[:, :2] @ np.array([[1.0, -2.0], [0.5, 1.0]]) + 0.01 * rng.normal(size=(300, 2))
    assert physics_experiment.ridge_probe_r2(x, y, clips) > 0.99
    assert physics_experiment.ridge_probe_r2(x, rng.normal(size=(300, 2)), clips) < 0.1


def test_probe_samples_read_the_token_under_each_ball():
    from videorepa.physics import Track

    f = 9
    xs = np.linspace(4.0, 36.0, f)  # 4 pixels per frame to the right, on row 1 of 8-pixel tokens
    track = Track("red", np.ones(f, bool), xs, np.full(f, 12.0), np.full(f, 50.0))
    features = np.zeros((1, 4, 2, 6, 1), np.float32)
    for k in range(4):
        features[0, k, 1, :, 0] = np.arange(6) + 10 * k  # token value = column + 10 · time slot
    import torch

    x, y, clips = physics_experiment.probe_samples([[track]], torch.from_numpy(features), (1, 2), 8)
    assert np.allclose(y, [[4.0, 0.0]] * 4) and list(clips) == [0] * 4
    for k in range(4):  # slot k spans frames 1 + 2k, 2 + 2k: the ball is at x = 4 + 4(1.5 + 2k)
        assert x[k, 0] == (4 + 4 * (1.5 + 2 * k)) // 8 + 10 * k


def test_the_student_probe_reads_the_aligned_block():
    """The probe's tokens are the output of the block train.py aligns (the preset's align_layer-th, counted from 1)."""
    import torch

    from videorepa.models import build_scheduler, build_transformer
    from videorepa.presets import get_preset

    transformer = build_transformer("tiny").eval()
    outputs = []
    for block in transformer.transformer_blocks:
        block.register_forward_hook(lambda module, args, output: outputs.append(output[0]))
    cfg = transformer.config
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 2, cfg.in_channels, cfg.sample_height, cfg.sample_width, generator=gen)
    embeds = torch.randn(2, cfg.max_text_seq_length, cfg.text_embed_dim, generator=gen)
    align_layer = get_preset("tiny").align_layer
    tokens = physics_experiment.aligned_tokens(transformer, align_layer, build_scheduler(), latents, embeds)
    assert tokens.shape == (2, 2, cfg.sample_height // 2, cfg.sample_width // 2, outputs[0].shape[-1])
    assert torch.equal(tokens.flatten(1, 3), outputs[align_layer - 1])


def test_table_pairs_each_arm_with_the_unaligned_run_of_its_seed():
    runs = [{"arm": arm, "seed": seed, "physics": score, "diffusion_loss_heldout": 0.2, "probe_r2_after": 0.0}
            for arm, seed, score in [("none", 0, 0.50), ("none", 1, 0.30), ("none", 2, 0.40),
                                     ("trd-full", 0, 0.60), ("trd-full", 1, 0.20), ("trd-full", 2, 0.45),
                                     ("repa", 1, 0.35)]]
    baselines = {"teacher": 0.5, "physics": {"renderer": 1.0, "renderer_through_vae": 0.7}, "before": {0: 0.0}}
    rows = {line.split(" | ")[0][2:]: line for line in physics_experiment.table(runs, baselines).splitlines()}
    assert rows["trd-full"].endswith("| +0.017 ± 0.104 (higher on 2 of 3) |")  # +0.10, −0.10, +0.05
    assert rows["repa"].endswith("| +0.050 (higher on 1 of 1) |")
    assert rows["none"].endswith("| reference |")


def test_experiment_runs_resumes_and_tabulates(tmp_path, capsys):
    argv = ["--output-dir", str(tmp_path / "exp"), "--arms", "none", "trd-full", "--seeds", "0", "--steps", "2",
            "--batch-size", "2", "--clips", "4", "--heldout-clips", "6", "--videos-per-scene", "1",
            "--sample-steps", "2", "--json", str(tmp_path / "rows.json"), "--markdown", str(tmp_path / "table.md")]
    results, baselines = physics_experiment.main(argv)
    assert [(r["arm"], r["seed"]) for r in results] == [("none", 0), ("trd-full", 0)]
    for r in results:
        assert 0 <= r["physics"] <= 1 and r["diffusion_loss_heldout"] > 0 and np.isfinite(r["probe_r2_after"])
    assert results[0]["align_loss_last10pct"] == 0 and results[1]["align_loss_last10pct"] > 0
    assert np.isfinite(baselines["teacher"]) and set(baselines["before"]) == {0}
    saved = json.loads((tmp_path / "rows.json").read_text())
    assert len(saved["runs"]) == 2 and saved["settings"]["steps"] == 2
    table = (tmp_path / "table.md").read_text()
    assert "| trd-full | 1 |" in table and "| none | 1 |" in table
    # A finished run is read back, not trained again; --finished-only tabulates what has finished.
    args = physics_experiment.parse_args(argv)
    assert physics_experiment.run_one(args, "trd-full", 0, None, None, None, None) == results[1]
    partial = [*argv, "--seeds", "0", "1", "--finished-only"]  # seed 1 never ran
    assert [(r["arm"], r["seed"]) for r in physics_experiment.main(partial)[0]] == [("none", 0), ("trd-full", 0)]
