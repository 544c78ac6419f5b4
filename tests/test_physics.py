"""The physics metric: the renderer's own clips score near perfect, broken physics scores clearly worse, and
evaluate.py writes what it promises."""

import json
import os

import numpy as np
import pytest

import evaluate
from videorepa import world
from videorepa.physics import LAWS, score_video, segment, track_balls
from videorepa.synthetic import COLORS, SCENES, background, make_clip
from videorepa.video_io import read_video, write_video

CLIP = world.CLIP
SEEDS = range(100, 112)  # three clips of each scene type


def through_mp4(frames, tmp_path, name="clip.mp4"):
    path = str(tmp_path / name)
    write_video(path, np.ascontiguousarray(frames), fps=CLIP["fps"])
    return read_video(path)


def teleport(frames, shift=30):
    """From the middle frame on, one ball's pixels (with their anti-aliased rim) move `shift` pixels sideways."""
    out, empty = frames.copy(), background(CLIP["height"], CLIP["width"])
    labels = segment(frames)
    k = len(frames) // 2
    color = np.unique(labels[k][labels[k] >= 0])[0]
    for t in range(k, len(frames)):
        ball = labels[t] == color
        rim = ball.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                rim |= np.roll(ball, (dy, dx), (0, 1))
        ys, xs = np.nonzero(rim)
        pixels = frames[t][ys, xs]
        out[t][ys, xs] = empty[ys, xs]
        out[t][ys, np.clip(xs + (shift if xs.mean() < CLIP["width"] / 2 else -shift), 0, CLIP["width"] - 1)] = pixels
    return out


@pytest.fixture(scope="module")
def clips():
    return [make_clip(seed, **CLIP)[0] for seed in SEEDS]


@pytest.fixture(scope="module")
def scores(clips, tmp_path_factory):
    """Mean and all scores of the clips and of three corruptions of them, each through an mp4 file."""
    tmp = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    corruptions = {
        "clean": lambda f: f,
        "shuffled": lambda f: f[rng.permutation(len(f))],
        "reversed": lambda f: f[::-1],
        "teleported": teleport,
    }
    out = {}
    for name, corrupt in corruptions.items():
        values = [score_video(through_mp4(corrupt(f), tmp), CLIP["fps"]).score for f in clips]
        out[name] = (float(np.mean(values)), values)
    return out


def test_tracker_finds_each_ball_where_the_renderer_put_it():
    frames, caption = make_clip(2, **CLIP)  # colliding: two balls
    tracks = track_balls(frames)
    assert sorted(t.color for t in tracks) == sorted(c for c in COLORS if f" {c} ball" in caption)
    for tr in tracks:
        assert tr.present.all()
        assert np.allclose(tr.radius, tr.radius.mean(), rtol=0.15)
        assert np.all((tr.y > CLIP["height"] * 0.6) & (tr.y < CLIP["height"] * 0.85))  # rolling on the floor


def test_renderer_keeps_every_ball_inside_the_frame():
    # Walls and floor hold the balls; only the sky is open. A ball whose throw leaves the top would vanish from
    # frames of its own training clip, which the persistence law then counts against the renderer.
    sky = background(CLIP["height"], CLIP["width"])[:2]
    for seed in range(200):
        frames, caption = make_clip(seed, **CLIP)
        assert (frames[:, :2] == sky).all(), (seed, caption)


def test_renderer_clips_score_near_perfect(scores):
    mean, values = scores["clean"]
    assert mean >= 0.97 and min(values) >= 0.9, values


@pytest.mark.parametrize("corruption", ["shuffled", "reversed", "teleported"])
def test_broken_physics_scores_clearly_worse(scores, corruption):
    clean, _ = scores["clean"]
    broken, values = scores[corruption]
    assert broken <= clean - 0.15, (corruption, broken, values)


def test_every_law_is_exercised_and_in_range(clips):
    seen = set()
    for frames in clips:
        result = score_video(frames, CLIP["fps"])
        assert 0.0 <= result.score <= 1.0 and all(0.0 <= v <= 1.0 for v in result.laws.values())
        seen |= result.laws.keys()
    assert seen == set(LAWS)


def test_each_scene_shows_the_laws_its_caption_names(clips):
    # The bouncing scene's bounces land on the floor, away from walls, so the bounce law judges each of its clips.
    named = {"falling": {"gravity", "bounce"}, "bouncing": {"gravity", "bounce"}, "colliding": {"collision"},
             "rolling": {"friction"}}
    for seed, frames in zip(SEEDS, clips):
        scene = SCENES[seed % len(SCENES)]
        assert named[scene] <= score_video(frames, CLIP["fps"]).laws.keys(), (seed, scene)


def test_a_video_without_balls_scores_zero_and_bad_input_is_named():
    empty = np.repeat(background(CLIP["height"], CLIP["width"])[None], 9, 0)
    assert score_video(empty, CLIP["fps"]).score == 0.0
    with pytest.raises(ValueError, match="frames must be uint8"):
        score_video(empty.astype(np.float32), CLIP["fps"])
    with pytest.raises(ValueError, match="fps"):
        score_video(empty, 0)


def test_evaluate_videos_writes_json_plots_and_table(clips, tmp_path, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    for seed, frames in zip(SEEDS[:4], clips[:4]):
        caption = make_clip(seed, num_frames=1, height=CLIP["height"], width=CLIP["width"])[1]
        slug = caption.lower().replace(" ", "-")[:48]  # as sample.py names its files
        write_video(str(folder / f"{seed}-{slug}.mp4"), frames, fps=CLIP["fps"])
    (folder / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "eval"
    evaluate.main(["--videos", str(folder), "--output-dir", str(out)])
    report = json.loads((out / "physics.json").read_text())
    assert len(report["videos"]) == 4 and 0.97 <= report["score"] <= 1.0
    assert {r["scene"] for r in report["videos"]} == {"falling", "bouncing", "colliding", "rolling"}
    assert report["score"] == pytest.approx(np.mean([r["score"] for r in report["videos"]]))
    for folder in ("plots", "strips"):
        assert sorted(os.listdir(out / folder)) == sorted(r["video"] + ".png" for r in report["videos"])
    printed = capsys.readouterr()
    assert "mean (physics.json score)" in printed.out and "skipping" in printed.err


def test_evaluate_model_generates_each_scene(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from videorepa.models import text_length

    model = tmp_path / "model"
    pipe = world.build_pipeline(seed=0)
    pipe.save_pretrained(str(model))  # untrained transformer: noise, but every step runs
    # Every caption template, in every colour, reaches the model whole: none is cut at the text encoder's limit.
    prompts = evaluate.evaluation_prompts(25)
    assert max(len(pipe.tokenizer(prompt).input_ids) for prompt in prompts) <= text_length(pipe)
    out = tmp_path / "eval"
    evaluate.main(["--model", str(model), "--output-dir", str(out), "--videos-per-scene", "1", "--steps", "2"])
    report = json.loads((out / "physics.json").read_text())
    assert [r["scene"] for r in report["videos"]] == ["falling", "bouncing", "colliding", "rolling"]
    assert 0.0 <= report["score"] <= 1.0
    assert len(read_video(str(out / "videos" / "000-falling.mp4"))) == CLIP["num_frames"]


@pytest.mark.parametrize("argv, message", [
    ([], "one of the arguments --model --videos is required"),
    (["--videos", "/nonexistent"], "is not a directory"),
    (["--videos", ".", "--videos-per-scene", "0"], "must be >= 1"),
])
def test_evaluate_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(argv)
    assert message in capsys.readouterr().err
