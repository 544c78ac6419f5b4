"""CogVideoX-2B and -5B at the paper's size (49×480×720) without a GPU: the real transformer configurations on the
meta device (shapes only, no memory, no arithmetic), so a shape bug that only real sizes reach shows on CPU."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")

from videorepa.alignment import TokenAligner  # noqa: E402
from videorepa.models import TRANSFORMER_CONFIGS, build_scheduler, build_transformer  # noqa: E402
from videorepa.presets import get_preset  # noqa: E402
from videorepa.training import VideoREPAModel  # noqa: E402

REAL = ("cogvideox-2b", "cogvideox-5b")


def meta_transformer(name):
    with torch.device("meta"):
        return build_transformer(name).train()


def stand_in_pipeline(transformer):
    """What train.py reads from a CogVideoX pipeline besides its weights: the VAE's ×4 time and ×8 space."""
    return SimpleNamespace(transformer=transformer, vae_scale_factor_temporal=4, vae_scale_factor_spatial=8)


@pytest.mark.parametrize("name", ["tiny", *REAL])
def test_presets_align_the_output_of_the_kth_block_as_the_paper_counts(name):
    # official: finetune/models/cogvideox_t2v_align/models/cogvideox_align.py aligns `if (i + 1) == align_layer`
    # with --align_layer 18: the output of the 18th block of 30 (2B) or 42 (5B), 0-based index 17. The tiny world
    # aligns the output of the 2nd of its transformer's 4 blocks (index 1), where its experiment measured.
    preset = get_preset(name)
    align_layer, blocks = {"tiny": (2, 4), "cogvideox-2b": (18, 30), "cogvideox-5b": (18, 42)}[name]
    assert preset.align_layer == align_layer
    transformer = build_transformer(name).train() if name == "tiny" else meta_transformer(name)
    assert len(transformer.transformer_blocks) == TRANSFORMER_CONFIGS[name]["num_layers"] == blocks
    model = VideoREPAModel(transformer, build_scheduler(), None, preset.align_layer)
    outputs = {}

    def keep(index):
        def hook(module, args, output):
            outputs[index] = output[0]
        return hook

    for i, block in enumerate(transformer.transformer_blocks):
        block.register_forward_hook(keep(i))
    cfg = transformer.config
    device = next(transformer.parameters()).device
    latents = torch.randn(1, 2, cfg.in_channels, cfg.sample_height, cfg.sample_width, device=device)
    from videorepa.diffusion import rotary_embeddings

    rotary = rotary_embeddings(transformer, latents)
    transformer(hidden_states=latents, encoder_hidden_states=torch.randn(1, cfg.max_text_seq_length,
                cfg.text_embed_dim, device=device), timestep=torch.tensor([10], device=device), image_rotary_emb=rotary)
    assert model.block_output.pop() is outputs[preset.align_layer - 1]


@pytest.mark.parametrize("name", ["tiny", "cogvideox-2b"])
def test_align_layer_counts_blocks_from_one(name):
    transformer = meta_transformer(name)
    blocks = len(transformer.transformer_blocks)
    for bad in (0, blocks + 1):
        with pytest.raises(ValueError, match=f"--align-layer must be in \\[1, {blocks}\\]"):
            VideoREPAModel(transformer, build_scheduler(), None, bad)


def meta_videomaev2_teacher(tmp_path, preset):
    """VideoMAEv2 ViT-B/16 loaded by load_teacher from a checkpoint in the official layout, all on the meta device."""
    from test_components import official_videomaev2_state

    from videorepa.teachers import load_teacher

    path = tmp_path / "vit_b_k710_dl_from_giant.pth"
    torch.save(official_videomaev2_state(hidden=768, layers=12, mlp=3072, device="meta"), path)
    with torch.device("meta"):
        return load_teacher("videomaev2", str(path), preset.teacher_height, preset.teacher_width, preset.num_frames)


@pytest.mark.parametrize("relation_grid, tokens, per_frame", [("teacher", 3600, 150), ("student", 32400, 1350)])
@pytest.mark.parametrize("name", REAL)
def test_a_training_step_at_the_papers_size(tmp_path, name, relation_grid, tokens, per_frame):
    from train import grids

    preset = get_preset(name)
    transformer = meta_transformer(name)
    cfg = transformer.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    pipe = stand_in_pipeline(transformer)
    teacher = meta_videomaev2_teacher(tmp_path, preset)
    student_grid, teacher_grid = grids(pipe, teacher, preset)
    assert (student_grid, teacher_grid) == ((13, 30, 45), (24, 10, 15))

    video = torch.empty(1, preset.num_frames, 3, preset.height, preset.width, device="meta")
    teacher_tokens = teacher(video)
    assert teacher_tokens.shape == (1, 24, 10, 15, 768)
    with torch.device("meta"):
        aligner = TokenAligner(width, teacher.dim, preset.projector_hidden, student_grid, teacher_grid, relation_grid)
    # The fused backends and the spatial/temporal masks need real values; the naive full formula is shapes only.
    model = VideoREPAModel(transformer, build_scheduler(), aligner, preset.align_layer, trd_backend="naive")
    latents = torch.empty(1, 13, cfg.in_channels, 60, 90, device="meta")
    from videorepa.diffusion import rotary_embeddings

    rotary = rotary_embeddings(pipe.transformer, latents)
    assert (rotary is not None) == (name == "cogvideox-5b")
    text = torch.empty(1, 226, 4096, device="meta")
    out = model(latents, text, teacher_tokens, torch.Generator().manual_seed(0))
    assert out["loss"].shape == out["loss_align"].shape == ()
    out["loss"].backward()
    assert aligner.projector.net[0].weight.grad.shape == (preset.projector_hidden, width)
    assert transformer.transformer_blocks[0].attn1.to_q.weight.grad is not None

    hidden = torch.empty(1, 13 * 30 * 45, width, device="meta")
    student, target = aligner(hidden, teacher_tokens)
    assert student.shape == target.shape == (1, tokens, 768) and aligner.tokens_per_frame == per_frame
