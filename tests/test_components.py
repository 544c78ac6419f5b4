"""The pieces train.py is built from: teachers, token alignment, attention routing, data and synthetic clips."""

import importlib.util
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from videorepa.alignment import TokenAligner  # noqa: E402
from videorepa.attention import attention_kernel, resolve_attention  # noqa: E402
from videorepa.data import (BatchOrder, VideoCaptionDataset, center_crop_box, frame_indices,  # noqa: E402
                            sample_frames)
from videorepa.synthetic import make_clip, write_dataset  # noqa: E402
from videorepa.teachers import convert_videomaev2_state_dict, fit_position_table, load_teacher  # noqa: E402
from videorepa.video_io import read_video, write_video  # noqa: E402


def official_videomaev2_state(hidden=32, layers=2, tubelet=2, patch=16, mlp=64, seed=0, device="cpu"):
    """A state dict with the official VideoMAEv2 checkpoint's key names (timm-style ViT, q_bias/v_bias); random
    values, or shapes only on the meta device."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.empty(shape, device="meta") if device == "meta" else torch.randn(*shape, generator=gen)

    state = {"patch_embed.proj.weight": r(hidden, 3, tubelet, patch, patch), "patch_embed.proj.bias": r(hidden),
             "fc_norm.weight": r(hidden), "fc_norm.bias": r(hidden), "head.weight": r(710, hidden),
             "head.bias": r(710)}
    for i in range(layers):
        b = f"blocks.{i}."
        state.update({
            b + "norm1.weight": r(hidden), b + "norm1.bias": r(hidden),
            b + "attn.qkv.weight": r(3 * hidden, hidden), b + "attn.q_bias": r(hidden), b + "attn.v_bias": r(hidden),
            b + "attn.proj.weight": r(hidden, hidden), b + "attn.proj.bias": r(hidden),
            b + "norm2.weight": r(hidden), b + "norm2.bias": r(hidden),
            b + "mlp.fc1.weight": r(mlp, hidden), b + "mlp.fc1.bias": r(mlp),
            b + "mlp.fc2.weight": r(hidden, mlp), b + "mlp.fc2.bias": r(hidden),
        })
    return {"module": state}


def reference_vit_block(x, state, i, heads):
    """One pre-norm ViT block written from the official layout: qkv with q/v biases, no k bias, LayerNorm eps 1e-6
    (official: finetune/models/cogvideox_t2v_align/models/ssl/VideoMAEv2.py, norm_layer=partial(nn.LayerNorm,
    eps=1e-6))."""
    b = f"blocks.{i}."
    d = x.shape[-1]
    h = F.layer_norm(x, (d,), state[b + "norm1.weight"], state[b + "norm1.bias"], eps=1e-6)
    bias = torch.cat([state[b + "attn.q_bias"], torch.zeros(d), state[b + "attn.v_bias"]])
    q, k, v = F.linear(h, state[b + "attn.qkv.weight"], bias).chunk(3, dim=-1)
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    a = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)
    x = x + F.linear(a, state[b + "attn.proj.weight"], state[b + "attn.proj.bias"])
    h = F.layer_norm(x, (d,), state[b + "norm2.weight"], state[b + "norm2.bias"], eps=1e-6)
    h = F.linear(F.gelu(F.linear(h, state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"])),
                 state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"])
    return x + h


def test_videomaev2_conversion_reproduces_the_official_vit(tmp_path):
    wrapped = official_videomaev2_state()
    state = wrapped["module"]
    config, converted = convert_videomaev2_state_dict(wrapped)
    assert (config.hidden_size, config.num_hidden_layers, config.patch_size, config.tubelet_size) == (32, 2, 16, 2)
    torch.save(wrapped, tmp_path / "vit.pth")
    teacher = load_teacher("videomaev2", str(tmp_path / "vit.pth"), 32, 48, 9)
    video = torch.rand(1, 9, 3, 64, 96) * 2 - 1
    tokens = teacher(video)
    assert tokens.shape == (1, 4, 2, 3, 32)
    # The same computation from the official weights by hand: patch embedding, fitted positions, two blocks.
    pixels = teacher.preprocess(video).permute(0, 2, 1, 3, 4)
    x = F.conv3d(pixels, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=(2, 16, 16))
    x = x.flatten(2).transpose(1, 2) + teacher.model.embeddings.position_embeddings
    for i in range(2):
        x = reference_vit_block(x, state, i, heads=config.num_attention_heads)
    torch.testing.assert_close(tokens.reshape(1, -1, 32), x, atol=1e-4, rtol=1e-4)
    norms = [m for m in teacher.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 4 and {m.eps for m in norms} == {1e-6}


def test_videomaev2_conversion_fits_each_transformers_attention_layout():
    """transformers 4.x keeps VideoMAE's query and value biases as parameters of their own (attention.q_bias,
    attention.v_bias), 5.x as the projections' biases (query.bias, value.bias): the converted weights take the
    names of the model they load into. The installed version's model is one of the two layouts."""
    from transformers import VideoMAEModel

    from videorepa.teachers import fit_attention_bias_names

    state = official_videomaev2_state()["module"]
    config, converted = convert_videomaev2_state_dict(state)
    v5 = set(converted)
    v4 = {k.replace("attention.query.bias", "attention.q_bias").replace("attention.value.bias", "attention.v_bias")
          for k in converted}
    assert v4 != v5 and set(VideoMAEModel(config).state_dict()) in (v4, v5)
    assert fit_attention_bias_names(converted, v5) == converted
    fitted = fit_attention_bias_names(converted, v4)
    assert set(fitted) == v4
    for i in range(2):
        for name in ("q_bias", "v_bias"):
            assert fitted[f"encoder.layer.{i}.attention.attention.{name}"] is state[f"blocks.{i}.attn.{name}"]


def test_teacher_frames_are_resized_bicubic_without_antialias():
    # official: finetune/models/cogvideox_t2v_align/lora_trainer.py, compute_loss: (x + 1) / 2, ImageNet
    # Normalize, then F.interpolate(..., mode='bicubic') (no antialias) of frames 1..48 to a third of the size.
    teacher = load_teacher("tiny", None, 32, 48, 9)
    video = torch.rand(2, 9, 3, 64, 96) * 2 - 1
    frames = (video[:, 1:].flatten(0, 1) + 1) / 2
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    frames = (frames - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    expected = F.interpolate(frames, size=(32, 48), mode="bicubic").unflatten(0, (2, 8))
    torch.testing.assert_close(teacher.preprocess(video), expected, atol=1e-5, rtol=1e-5)


def tiny_vjepa2():
    """One 16-wide head: transformers 4.x's rotary positions need heads of at least 12 (three even thirds)."""
    from transformers import VJEPA2Config, VJEPA2Model

    return VJEPA2Model(VJEPA2Config(crop_size=64, frames_per_clip=4, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=1, mlp_ratio=2.0, pred_hidden_size=16,
                                    pred_num_hidden_layers=1, pred_num_attention_heads=1))


def test_vjepa2_tokens_are_taken_before_its_final_norm(tmp_path):
    # official: finetune/models/cogvideox_t2v_align/lora_trainer.py replaces V-JEPA 2's final norm by Identity.
    from transformers import VJEPA2Model

    model = tiny_vjepa2()
    with torch.no_grad():  # a trained norm's own scale and shift, so that normalising twice shows
        model.encoder.layernorm.weight.uniform_(0.5, 2.0)
        model.encoder.layernorm.bias.uniform_(-1.0, 1.0)
    model.save_pretrained(tmp_path / "vjepa2")
    teacher = load_teacher("vjepa2", str(tmp_path / "vjepa2"), 48, 48, 9)
    video = torch.rand(1, 9, 3, 64, 96) * 2 - 1
    tokens = teacher(video).reshape(1, -1, 16)
    stock = VJEPA2Model.from_pretrained(tmp_path / "vjepa2", crop_size=48, frames_per_clip=8).eval()
    with torch.no_grad():
        normed = stock(pixel_values_videos=teacher.preprocess(video), skip_predictor=True).last_hidden_state
        torch.testing.assert_close(stock.encoder.layernorm(tokens), normed, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tokens, normed, atol=1e-2)


def test_videomaev2_conversion_rejects_other_checkpoints():
    with pytest.raises(ValueError, match="not a VideoMAEv2 checkpoint"):
        convert_videomaev2_state_dict({"model": {"weight": torch.zeros(1)}})


def test_position_table_fit_keeps_same_grid_and_interpolates_new_ones():
    from transformers import VideoMAEConfig, VideoMAEModel

    model = VideoMAEModel(VideoMAEConfig(image_size=64, patch_size=16, num_frames=4, tubelet_size=2, hidden_size=8,
                                         num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
    table = model.embeddings.position_embeddings.clone()  # grid (2, 4, 4)
    fit_position_table(model, 4, 64, 64)
    assert torch.equal(model.embeddings.position_embeddings, table)
    fit_position_table(model, 8, 32, 48)  # grid (4, 2, 3)
    fitted = model.embeddings.position_embeddings
    assert fitted.shape == (1, 4 * 2 * 3, 8)
    # Linear-in-time resampling of 2 frames to 4: the mean over time is preserved per position.
    src = table.reshape(2, 4, 4, 8).permute(0, 3, 1, 2)
    space = F.interpolate(src, size=(2, 3), mode="bicubic", align_corners=False)  # (2, 8, 2, 3)
    torch.testing.assert_close(fitted.reshape(4, 2, 3, 8).mean(0), space.mean(0).permute(1, 2, 0))
    model(torch.randn(1, 8, 3, 32, 48))  # and the model accepts the new input size


def test_token_alignment_paper_and_full_grid_shapes():
    # CogVideoX-2B at 49×480×720: student grid 13×30×45; teacher 24×10×15 (48 frames at 160×240).
    aligner = TokenAligner(16, 8, 12, (13, 30, 45), (24, 10, 15), "teacher")
    hidden, teacher = torch.randn(1, 13 * 30 * 45, 16), torch.randn(1, 24, 10, 15, 8)
    student, target = aligner(hidden, teacher)
    assert student.shape == target.shape == (1, 3600, 8) and aligner.tokens_per_frame == 150
    assert aligner.spatial.kernel_size == (3, 3)
    full = TokenAligner(16, 8, 12, (13, 30, 45), (24, 10, 15), "student")
    student, target = full(hidden, teacher)
    assert student.shape == target.shape == (1, 32400, 8) and full.tokens_per_frame == 1350
    with pytest.raises(ValueError, match="integer multiple"):
        TokenAligner(16, 8, 12, (13, 30, 44), (24, 10, 15), "teacher")


def test_alignment_drops_the_first_latent_frame():
    aligner = TokenAligner(4, 4, 8, (3, 2, 2), (2, 2, 2), "student")
    hidden = torch.zeros(1, 3 * 4, 4)
    hidden[:, :4] = 1e3  # only the first latent frame is loud
    student, _ = aligner(hidden, torch.randn(1, 2, 2, 2, 4))
    hidden[:, :4] = 0
    quiet, _ = aligner(hidden, torch.randn(1, 2, 2, 2, 4))
    torch.testing.assert_close(student, quiet)


def record_ops(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Recorder():
        fn()
    return seen


def transformer_inputs(config, batch=1, latent_frames=2, timestep=500, seed=0) -> dict:
    """Random inputs for a CogVideoX transformer of this config: latents of its sample size, text embeddings."""
    gen = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, latent_frames, config.in_channels, config.sample_height,
                                          config.sample_width, generator=gen),
                encoder_hidden_states=torch.randn(batch, config.max_text_seq_length, config.text_embed_dim,
                                                  generator=gen),
                timestep=torch.full((batch,), timestep))


def cogvideox_forward():
    """The tiny world's transformer on 2 latent frames: (a call of its forward, its config)."""
    from videorepa.diffusion import rotary_embeddings
    from videorepa.models import build_transformer

    transformer = build_transformer("tiny").eval()
    inputs = transformer_inputs(transformer.config, timestep=10)
    rotary = rotary_embeddings(transformer, inputs["hidden_states"])
    return lambda: transformer(**inputs, image_rotary_emb=rotary), transformer.config


def test_sdpa_flash_runs_the_flash_kernel():
    forward, _ = cogvideox_forward()
    with attention_kernel("sdpa-flash"):
        ops = record_ops(forward)
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in ops
    with attention_kernel("sdpa"), torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        ops = record_ops(forward)
    assert "aten._scaled_dot_product_flash_attention_for_cpu" not in ops


@pytest.mark.parametrize("layer_norm_in_fp32", [False, True], ids=["cpu-autocast", "cuda-autocast"])
def test_flash_attn_route_calls_flash_attn_with_its_layout(layer_norm_in_fp32, monkeypatch):
    """Every block's attention reaches flash-attn, in its (B, L, heads, D) layout, under autocast as on the CPU and
    as on CUDA, whose autocast runs LayerNorm in float32 (torch/testing/_internal/autocast_test_lists.py): there
    CogVideoX's q and k, normalised by LayerNorms, arrive in float32 and the value in bf16."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def fake_flash_attn_func(q, k, v, softmax_scale=None, causal=False):
        calls.append((q.shape, q.dtype, k.dtype, v.dtype))
        out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    from videorepa.diffusion import token_grid

    if layer_norm_in_fp32:
        layer_norm = F.layer_norm
        monkeypatch.setattr(F, "layer_norm", lambda x, *args, **kwargs: layer_norm(
            x.float(), *[a.float() if isinstance(a, torch.Tensor) else a for a in args], **kwargs))
    forward, cfg = cogvideox_forward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = forward()[0]
        with attention_kernel("flash-attn", flash_attn_func=fake_flash_attn_func):
            got = forward()[0]
    frames, h, w = token_grid(cfg, (1, 2, None, cfg.sample_height, cfg.sample_width))  # 2 latent frames
    tokens = cfg.max_text_seq_length + frames * h * w
    # (B, L, heads, head_dim), once per block, all in the autocast dtype
    assert len(calls) == cfg.num_layers
    assert calls[0] == (torch.Size([1, tokens, cfg.num_attention_heads, cfg.attention_head_dim]),
                        *[torch.bfloat16] * 3)
    torch.testing.assert_close(got, expected)
    assert F.scaled_dot_product_attention is sdpa  # restored


def test_attention_choice():
    assert resolve_attention("auto", torch.device("cpu"), torch.float32) == "sdpa"
    # FlashAttention kernels take fp16/bf16 only: float32 on CUDA gets PyTorch's own choice
    assert resolve_attention("auto", torch.device("cuda"), torch.float32) == "sdpa"
    flash = "flash-attn" if importlib.util.find_spec("flash_attn") else "sdpa-flash"
    assert resolve_attention("auto", torch.device("cuda"), torch.bfloat16) == flash
    assert resolve_attention("sdpa-flash", torch.device("cpu"), torch.float32) == "sdpa-flash"
    with pytest.raises(ValueError, match="--attention must be one of"):
        resolve_attention("xformers", torch.device("cpu"), torch.float32)


def test_synthetic_clips_are_deterministic_per_seed():
    a, caption = make_clip(5)
    b, _ = make_clip(5)
    c, _ = make_clip(6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.shape == (17, 96, 128, 3) and a.dtype == np.uint8 and "ball" in caption
    assert np.abs(np.diff(a.astype(int), axis=0)).sum() > 0  # something moves


def test_video_round_trip_and_loader(tmp_path):
    frames, _ = make_clip(1)
    write_video(str(tmp_path / "clip.mp4"), frames)
    back = read_video(str(tmp_path / "clip.mp4"))
    assert back.shape == frames.shape and np.abs(back.astype(int) - frames).mean() < 3  # H.264, near-lossless
    csv_path = write_dataset(str(tmp_path / "set"), num_clips=3, seed=2)
    data = VideoCaptionDataset(csv_path, 9, 64, 96)
    item = data[0]
    assert item["video"].shape == (9, 3, 64, 96) and -1 <= item["video"].min() and item["video"].max() <= 1
    assert os.path.isabs(data.rows[0][0])


def test_frame_indices_are_the_official_stride_from_frame_0():
    # official: finetune/datasets/utils.py, preprocess_video_with_resize_with_frame_idxs: stride ⌊frames/49⌋ from
    # frame 0, the first 49 kept; a shorter clip repeats its last frame.
    assert frame_indices(49, 49) == list(range(49))
    assert frame_indices(97, 49) == list(range(49))  # stride 1: the first 49 frames, not spread over the clip
    assert frame_indices(121, 49) == [2 * i for i in range(49)]  # stride 2: frames 0..96 of 0..120
    assert frame_indices(150, 49) == [3 * i for i in range(49)]
    assert frame_indices(200, 9) == [22 * i for i in range(9)]
    assert frame_indices(30, 49) == list(range(30)) + [29] * 19
    assert frame_indices(1, 5) == [0] * 5


def test_center_crop_box_rounds_as_the_official_transform():
    # official: finetune/datasets/data_transform.py, center_crop_th_tw: sizes truncated, offsets rounded half to even
    assert center_crop_box(720, 1280, 480, 720) == (0, 100, 720, 1080)
    assert center_crop_box(1000, 1000, 480, 720) == (167, 0, 666, 1000)
    assert center_crop_box(483, 720, 480, 720) == (2, 0, 480, 720)
    assert center_crop_box(485, 720, 480, 720) == (2, 0, 480, 720)
    assert center_crop_box(480, 720, 480, 720) == (0, 0, 480, 720)


def official_frames(frames: np.ndarray, num_frames: int, height: int, width: int) -> torch.Tensor:
    """The official loader's pixels, transcribed: stride sampling (finetune/datasets/utils.py), then
    CenterCropResizeVideo and x / 255 * 2 - 1 (finetune/datasets/data_transform.py, t2v_dataset.py)."""
    n = len(frames)
    if n < num_frames:
        index = list(range(n)) + [n - 1] * (num_frames - n)
    else:
        index = list(range(0, n, n // num_frames))[:num_frames]
    clip = torch.from_numpy(frames[index]).float().permute(0, 3, 1, 2)
    h, w = clip.shape[-2:]
    tr = height / width
    new_h, new_w = (int(w * tr), w) if h / w > tr else (h, int(h / tr))
    i, j = int(round((h - new_h) / 2.0)), int(round((w - new_w) / 2.0))
    clip = clip[..., i:i + new_h, j:j + new_w]
    clip = F.interpolate(clip, size=(height, width), mode="bilinear", align_corners=True, antialias=True)
    return clip / 255.0 * 2.0 - 1.0


@pytest.mark.parametrize("shape, num_frames", [((60, 37, 53, 3), 9), ((20, 50, 75, 3), 5), ((3, 70, 40, 3), 5)])
def test_sample_frames_gives_the_official_loaders_pixels(shape, num_frames):
    frames = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    video = sample_frames(frames, num_frames, 32, 48)
    assert video.shape == (num_frames, 3, 32, 48)
    torch.testing.assert_close(video, official_frames(frames, num_frames, 32, 48), rtol=0, atol=0)
    # Frames whose value is their index show which were kept.
    numbered = np.broadcast_to(np.arange(shape[0], dtype=np.uint8)[:, None, None, None], shape).copy()
    kept = ((sample_frames(numbered, num_frames, 32, 48) + 1) / 2 * 255).round().amax(dim=(1, 2, 3))
    assert kept.int().tolist() == frame_indices(shape[0], num_frames)


def test_batch_order_resumes_exactly():
    order = BatchOrder(10, 3, seed=1)
    stream = iter(order)
    first = [next(stream) for _ in range(6)]
    resumed = BatchOrder(10, 3, seed=1)
    resumed.position = (first[2][0][1], first[2][0][2])
    assert [next(iter_) for iter_ in [iter(resumed)] for _ in range(3)] == first[3:]
    ranks = [next(iter(BatchOrder(10, 3, seed=1, rank=r, world=2))) for r in (0, 1)]
    assert not {i for i, *_ in ranks[0]} & {i for i, *_ in ranks[1]}


@pytest.mark.parametrize("size, batch, world", [(9, 1, 2), (10, 3, 4), (1, 2, 3), (7, 2, 3), (12, 2, 3)])
def test_every_rank_gets_the_same_batches_per_epoch(size, batch, world):
    """As DistributedSampler: each epoch's order is padded by repeating its start to a multiple of the world size, so
    every rank gets ceil(size / world) clips in the same number of non-empty batches."""
    per_rank = -(-size // world)
    batches = -(-per_rank // batch)
    epochs = {r: [] for r in range(world)}
    for rank in range(world):
        stream = iter(BatchOrder(size, batch, seed=4, rank=rank, world=world))
        epochs[rank] = [[next(stream) for _ in range(batches)] for _ in range(2)]
    for epoch in range(2):
        seen = []
        for rank in range(world):
            chunks = epochs[rank][epoch]
            assert all(chunks) and sum(map(len, chunks)) == per_rank
            assert {e for chunk in chunks for _, e, _ in chunk} == {epoch}
            seen += [i for chunk in chunks for i, *_ in chunk]
        assert set(seen) == set(range(size)) and len(seen) == per_rank * world
    assert BatchOrder(size, batch, seed=4, rank=0, world=world).batches_per_epoch == batches


def test_transformers_teachers_load_from_local_directories(tmp_path):
    from transformers import VideoMAEConfig, VideoMAEModel

    VideoMAEModel(VideoMAEConfig(image_size=64, patch_size=16, num_frames=4, tubelet_size=2, hidden_size=16,
                                 num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
                  ).save_pretrained(tmp_path / "videomae")
    tiny_vjepa2().save_pretrained(tmp_path / "vjepa2")
    video = torch.rand(2, 9, 3, 64, 96) * 2 - 1
    videomae = load_teacher("videomae", str(tmp_path / "videomae"), 32, 48, 9)
    assert videomae(video).shape == (2, 4, 2, 3, 16)
    vjepa2 = load_teacher("vjepa2", str(tmp_path / "vjepa2"), 48, 48, 9)
    assert vjepa2.model.config.crop_size == 48 and vjepa2(video).shape == (2, 4, 3, 3, 16)
    for teacher in (videomae, vjepa2):
        teacher.train()
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="square"):
        load_teacher("vjepa2", str(tmp_path / "vjepa2"), 32, 48, 9)
    with pytest.raises(ValueError, match="needs --teacher-path"):
        load_teacher("videomae", None, 32, 48, 9)


@pytest.mark.parametrize("patch_size_t", [None, 2], ids=["cogvideox-5b", "cogvideox-1.5"])
def test_rotary_positions_are_the_pipelines_own(patch_size_t):
    """The rotary positions training uses are those CogVideoXPipeline computes when it samples (from pixel sizes),
    for CogVideoX-5B's layout and for 1.5's temporal patches (latent frames padded as the pipeline pads them)."""
    from diffusers import CogVideoXTransformer3DModel

    from videorepa.diffusion import pad_latent_frames, rotary_embeddings
    from videorepa.models import TRANSFORMER_CONFIGS
    from videorepa.world import build_pipeline

    pipe = build_pipeline()
    pipe.transformer = CogVideoXTransformer3DModel(**{**TRANSFORMER_CONFIGS["tiny"], "patch_size_t": patch_size_t})
    latents = pad_latent_frames(torch.randn(1, 5, 8, 16, 24), patch_size_t)
    cos, sin = rotary_embeddings(pipe.transformer, latents)
    scale = pipe.vae_scale_factor_spatial
    expected = pipe._prepare_rotary_positional_embeddings(16 * scale, 24 * scale, latents.shape[1], "cpu")
    assert torch.equal(cos, expected[0]) and torch.equal(sin, expected[1])
    assert cos.shape[0] == (latents.shape[1] // (patch_size_t or 1)) * 8 * 12
    sincos = CogVideoXTransformer3DModel(**{**TRANSFORMER_CONFIGS["tiny"], "use_rotary_positional_embeddings": False})
    assert rotary_embeddings(sincos, latents) is None


def test_latent_frames_are_padded_as_cogvideox_15_samples_them():
    """Temporal patches (CogVideoX 1.5's patch_size_t) need a latent frame count they divide: copies of the first
    frame go in front, as the official finetuning pads (ncopy = F % p_t for p_t = 2) and as many as
    CogVideoXPipeline adds when it samples and drops before decoding."""
    from videorepa.diffusion import pad_latent_frames

    latents = torch.randn(2, 9, 3, 4, 6)
    padded = pad_latent_frames(latents, 2)
    assert padded.shape[1] == 9 + 9 % 2 and torch.equal(padded[:, 0], latents[:, 0])
    assert torch.equal(padded[:, 1:], latents)
    pipeline_extra = 2 - 9 % 2  # pipeline_cogvideox.py: additional_frames = p_t - latent_frames % p_t
    assert padded.shape[1] == 9 + pipeline_extra
    assert pad_latent_frames(latents, None) is latents and pad_latent_frames(latents[:, :8], 2).shape[1] == 8
    three = pad_latent_frames(latents[:, :4], 3)
    assert three.shape[1] == 6 and torch.equal(three[:, :3], latents[:, :1].expand(-1, 3, -1, -1, -1))


@pytest.mark.parametrize("patch_size_t", [None, 2], ids=["tiny-world", "cogvideox-1.5"])
def test_training_step_on_the_token_grid(patch_size_t):
    """A training step as train.py takes it, for the tiny world's transformer (rotary positions, as CogVideoX-5B)
    and with CogVideoX 1.5's temporal patches: latents padded, rotary positions of the padded frames, and the
    aligned block's tokens on the grid train.py gives the aligner."""
    from diffusers import CogVideoXTransformer3DModel

    import train
    from videorepa.diffusion import pad_latent_frames
    from videorepa.models import TRANSFORMER_CONFIGS
    from videorepa.presets import get_preset
    from videorepa.teachers import load_teacher
    from videorepa.training import VideoREPAModel
    from videorepa.world import TEXT_ENCODER_CONFIG, TEXT_TOKENS, build_pipeline

    pipe, cfg = build_pipeline(), get_preset("tiny")
    pipe.transformer = CogVideoXTransformer3DModel(**{**TRANSFORMER_CONFIGS["tiny"], "patch_size_t": patch_size_t})
    pipe.transformer.train()
    teacher = load_teacher("tiny", None, cfg.teacher_height, cfg.teacher_width, cfg.num_frames)
    student_grid, teacher_grid = train.grids(pipe, teacher, cfg)
    assert student_grid == ((5, 8, 12) if patch_size_t is None else (3, 8, 12)) and teacher_grid == (8, 8, 12)
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    aligner = TokenAligner(width, teacher.dim, cfg.projector_hidden, student_grid, teacher_grid)
    model = VideoREPAModel(pipe.transformer, pipe.scheduler, aligner, cfg.align_layer)
    latents = pad_latent_frames(torch.randn(2, 5, 8, 16, 24), patch_size_t)
    out = model(latents, torch.randn(2, TEXT_TOKENS, TEXT_ENCODER_CONFIG["d_model"]),
                torch.randn(2, *teacher_grid, teacher.dim), torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss_align"] > 0
    assert pipe.transformer.transformer_blocks[0].attn1.to_q.weight.grad.abs().sum() > 0


def test_diffusion_loss_is_the_official_objective():
    # official: finetune/models/cogvideox_t2v_align/lora_trainer.py, compute_loss: t uniform in [0, 1000), noise
    # added by the scheduler, v turned into x0 by get_velocity, squared error weighted 1/(1 − ᾱ_t), per-clip mean;
    # the tiny world's transformer (as CogVideoX-5B's) with the pipeline's rotary positions.
    from types import SimpleNamespace

    from diffusers import CogVideoXPipeline

    from videorepa.diffusion import diffusion_loss
    from videorepa.models import build_scheduler, build_transformer

    scheduler, transformer = build_scheduler(), build_transformer("tiny").eval()
    inputs = transformer_inputs(transformer.config, batch=3)
    latents, embeds = inputs["hidden_states"], inputs["encoder_hidden_states"]
    with torch.no_grad():
        ours = diffusion_loss(transformer, scheduler, latents, embeds, generator=torch.Generator().manual_seed(5))
        gen = torch.Generator().manual_seed(5)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (3,), generator=gen).long()
        noise = torch.randn(latents.shape, generator=gen)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        sizes = SimpleNamespace(transformer=transformer, vae_scale_factor_spatial=4)
        rotary = CogVideoXPipeline._prepare_rotary_positional_embeddings(sizes, 4 * latents.shape[3],
                                                                         4 * latents.shape[4], latents.shape[1], "cpu")
        predicted = transformer(hidden_states=noisy, encoder_hidden_states=embeds, timestep=timesteps,
                                image_rotary_emb=rotary, return_dict=False)[0]
        latent_pred = scheduler.get_velocity(predicted, noisy, timesteps)
        weights = (1 / (1 - scheduler.alphas_cumprod[timesteps])).view(3, 1, 1, 1, 1)
        official = torch.mean((weights * (latent_pred - latents) ** 2).reshape(3, -1), dim=1).mean()
        unpositioned = transformer(hidden_states=noisy, encoder_hidden_states=embeds, timestep=timesteps,
                                   return_dict=False)[0]
    torch.testing.assert_close(ours, official)
    assert not torch.allclose(predicted, unpositioned)  # the positions are there, and they matter


def test_latents_take_the_models_scaling_factor_as_the_official_5b_rescale():
    # official: finetune/datasets/t2v_dataset.py: the 5B run reads latents cached with CogVideoX-2b's VAE (scaling
    # factor 1.15258426) as `encoded_video / 1.15258426 * 0.7`; CogVideoX-5b's VAE is the same with factor 0.7.
    from types import SimpleNamespace

    from videorepa.diffusion import latent_seed, sample_latents

    def vae(factor):
        return SimpleNamespace(config=SimpleNamespace(scaling_factor=factor))

    parameters = torch.randn(2, 8, 3, 4, 6)  # (B, 2C, F', H', W'): mean and log-variance
    seeds = [latent_seed(0, 4), latent_seed(0, 7)]
    cached_2b = sample_latents(vae(1.15258426), parameters, seeds)
    torch.testing.assert_close(sample_latents(vae(0.7), parameters, seeds), cached_2b / 1.15258426 * 0.7)
    # A clip's sample depends on its seed only, not on its place in the batch.
    swapped = sample_latents(vae(0.7), parameters.flip(0), seeds[::-1])
    assert torch.equal(swapped.flip(0), sample_latents(vae(0.7), parameters, seeds))


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    from videorepa.files import atomic_path

    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp, open(tmp, "w") as f:
            f.write("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]
    with atomic_path(str(target)) as tmp, open(tmp, "w") as f:
        f.write("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["a.txt"]


def test_atomic_folder_replaces_the_whole_folder_or_nothing(tmp_path):
    from videorepa.files import atomic_folder, same_files

    target = tmp_path / "final"
    target.mkdir()
    (target / "model_index.json").write_text("old pipeline")
    with pytest.raises(RuntimeError):
        with atomic_folder(str(target)) as tmp:
            (tmp_path / ".final.old").mkdir()  # a killed writer's leftover is cleared, not kept
            open(os.path.join(tmp, "weights"), "w").write("half")
            raise RuntimeError("crash mid-write")
    assert os.listdir(target) == ["model_index.json"] and os.listdir(tmp_path) == ["final"]
    with atomic_folder(str(target)) as tmp:
        open(os.path.join(tmp, "weights"), "w").write("new")
        assert not same_files(tmp, str(target))
    assert os.listdir(target) == ["weights"] and os.listdir(tmp_path) == ["final"]
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "weights").write_text("new")
    assert same_files(str(copy), str(target))
    (copy / "weights").write_text("nex")
    assert not same_files(str(copy), str(target)) and not same_files(str(copy), str(tmp_path / "absent"))


def test_feature_cache_entries_of_another_format_are_not_read(tmp_path, monkeypatch):
    import videorepa.feature_cache as feature_cache

    (tmp_path / "clip.mp4").write_bytes(b"x")
    cache = feature_cache.FeatureCache(str(tmp_path / "cache"), {"frames": 9})
    key = cache.key(str(tmp_path / "clip.mp4"), "a ball")
    cache.store(key, {"teacher": torch.ones(2)})
    monkeypatch.setattr(feature_cache, "FORMAT", feature_cache.FORMAT + 1)
    assert cache.load(cache.key(str(tmp_path / "clip.mp4"), "a ball")) is None
