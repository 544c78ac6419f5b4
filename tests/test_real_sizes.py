"""CogVideoX-2B and -5B at the paper's size (49×480×720) without a GPU: the real transformer configurations on the
meta device (shapes only, no memory, no arithmetic), so a shape bug that only real sizes reach shows on CPU."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")

from videorepa.alignment import TokenAligner  # noqa: E402
from videorepa.models import TRANSFORMER_CONFIGS, build_scheduler, build_transformer  # noqa: E402
from videorepa.presets import get_preset  # noqa: E402
from videorepa.teachers import VideoTeacher, convert_videomaev2_state_dict  # noqa: E402
from videorepa.training import VideoREPAModel  # noqa: E402

REAL = ("cogvideox-2b", "cogvideox-5b")


def meta_transformer(name):
    with torch.device("meta"):
        return build_transformer(name).train()


def stand_in_pipeline(transformer):
    """What train.py reads from a CogVideoX pipeline besides its weights: the VAE's ×4 time and ×8 space."""
    from diffusers import CogVideoXPipeline

    pipe = SimpleNamespace(transformer=transformer, vae_scale_factor_temporal=4, vae_scale_factor_spatial=8)
    pipe._prepare_rotary_positional_embeddings = lambda *a: CogVideoXPipeline._prepare_rotary_positional_embeddings(
        pipe, *a)
    return pipe


def meta_videomaev2_teacher(preset):
    """VideoMAEv2 ViT-B/16 (tubelet 2) as train.py builds it from the official checkpoint, on the meta device."""
    from transformers import VideoMAEModel

    shapes = {"patch_embed.proj.weight": (768, 3, 2, 16, 16), "blocks.0.mlp.fc1.weight": (3072, 768),
              "blocks.0.attn.q_bias": (768,)}
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    state.update({f"blocks.{i}.norm1.weight": torch.empty(768, device="meta") for i in range(12)})
    config, _ = convert_videomaev2_state_dict(state)
    with torch.device("meta"):
        model = VideoMAEModel(config)
    return VideoTeacher(model, "videomaev2", preset.teacher_height, preset.teacher_width, 16, 2)


@pytest.mark.parametrize("name", ["tiny", *REAL])
def test_presets_align_the_output_of_the_kth_block_as_the_paper_counts(name):
    # official: finetune/models/cogvideox_t2v_align/models/cogvideox_align.py aligns `if (i + 1) == align_layer`
    # with --align_layer 18: the output of the 18th block, 0-based index 17, for 2B and 5B alike.
    preset = get_preset(name)
    assert preset.align_layer == {"tiny": 1, "cogvideox-2b": 18, "cogvideox-5b": 18}[name]
    transformer = build_transformer(name).train() if name == "tiny" else meta_transformer(name)
    assert len(transformer.transformer_blocks) == TRANSFORMER_CONFIGS[name]["num_layers"]
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
    rotary = None
    if cfg.use_rotary_positional_embeddings:
        from videorepa.diffusion import rotary_embeddings

        rotary = rotary_embeddings(stand_in_pipeline(transformer), latents)
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
