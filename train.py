"""VideoREPA finetuning of CogVideoX with the fused Token Relation Distillation loss.

    python train.py                                   # embedded default: the tiny world's clips and models, CPU
    python train.py --preset cogvideox-2b --model /models/CogVideoX-2b --teacher videomaev2 \\
        --teacher-path /models/vit_b_k710_dl_from_giant.pth --data /data/openvid.csv --cache-dir /cache
    torchrun --nproc_per_node 8 train.py ...          # DDP from torchrun's environment

Loss = v-prediction MSE weighted 1/(1 − ᾱ_t) + trd_weight × TRD(projected DiT tokens at --align-layer, teacher
tokens). Writes OUT/metrics.jsonl (one row per optimizer step), OUT/checkpoint-STEP/ (atomic, last K kept,
--resume latest) and OUT/final/ (a stock diffusers pipeline, or LoRA weights + base path, and sampling.json: the
preset's guidance scale, which sample.py takes), with the alignment heads beside it in OUT/alignment-heads.pt.
"""

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time

import torch

from videorepa.alignment import GRIDS, TokenAligner
from videorepa.attention import ATTENTION, attention_kernel, resolve_attention
from videorepa.checkpoint import latest_checkpoint, restore_rng_states, rng_states, save_checkpoint
from videorepa.data import BatchOrder, PositionedDataset, VideoCaptionDataset, collate
from videorepa.files import atomic_folder, same_files
from videorepa.kernels import BACKENDS, MODES
from videorepa.models import record_sampling
from videorepa.parallel import gather_state, init_process_groups, no_gradient_sync, wait_for_everyone, wrap
from videorepa.presets import PRESETS, get_preset, video_size_error
from videorepa.synthetic import falling_caption
from videorepa.teachers import TEACHERS
from videorepa.training import ALIGN_LOSSES

log = logging.getLogger("train")
LR_SCHEDULES = ("constant", "linear", "cosine", "warmup-decay")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="video size, align layer, head widths and the optimisation recipe: cogvideox-2b and "
                   "cogvideox-5b are the paper's runs (default: tiny)")
    g.add_argument("--model", help="local CogVideoX pipeline directory (default for --preset tiny: the tiny world's "
                   "pretrained VAE and a fresh transformer)")
    g.add_argument("--teacher", choices=TEACHERS, help="video encoder to distil from (default: tiny for --preset "
                   "tiny, else videomaev2)")
    g.add_argument("--teacher-path", help="VideoMAEv2 .pth file, or a transformers directory for videomae/vjepa2")
    g.add_argument("--data", help="CSV with columns video,caption (default: synthetic physics clips written to "
                   "OUTPUT/synthetic-data)")
    g.add_argument("--cache-dir", help="precompute latents, text embeddings and teacher tokens here once and train "
                   "from the cache")
    g.add_argument("--num-frames", type=int, help="override the preset's frame count (4k + 1)")
    g.add_argument("--height", type=int, help="override the preset's height (multiple of 16)")
    g.add_argument("--width", type=int, help="override the preset's width (multiple of 16)")
    g = p.add_argument_group("alignment")
    g.add_argument("--align-loss", choices=ALIGN_LOSSES, default="trd", help="trd (VideoREPA), repa (cosine "
                   "baseline) or none (plain finetuning)")
    g.add_argument("--align-layer", type=int, help="align the output of the K-th transformer block, counted from 1 "
                   "as the paper's flag: 18 aligns after 18 blocks (default: the preset's, 18 for the paper's "
                   "runs, 2 of 4 for tiny)")
    g.add_argument("--relation-grid", choices=GRIDS, default="teacher", help="teacher: the paper's token matching; "
                   "student: teacher resampled to the student's full grid")
    g.add_argument("--trd-weight", type=float, default=0.5)
    g.add_argument("--margin", type=float, default=0.1)
    g.add_argument("--trd-mode", choices=MODES, default="full")
    g.add_argument("--trd-backend", choices=BACKENDS, default="auto")
    g = p.add_argument_group("optimisation (defaults: the preset's; the paper's for cogvideox-2b/5b)")
    g.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank, 0: full finetune (cogvideox-5b: "
                   "128, else 0)")
    g.add_argument("--lora-alpha", type=float, help="LoRA scale numerator, scale α/r (cogvideox-5b: 64 at its rank "
                   "128, else the rank)")
    g.add_argument("--learning-rate", type=float, help="peak learning rate (full: 2e-6, LoRA: 1e-4; tiny: 1e-3)")
    g.add_argument("--lr-scheduler", choices=LR_SCHEDULES, help="after a linear warm-up: hold (constant) or decay "
                   "to 0 at the last step (linear, cosine); warmup-decay: the paper's, DeepSpeed's WarmupDecayLR "
                   "(0 at the first step, log-shaped warm-up over max(2, W) steps, linear decay) (tiny: constant)")
    g.add_argument("--warmup-steps", type=int, help="warm-up length W in optimizer steps (paper: 2, tiny: 0)")
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--batch-size", type=int, help="clips per process per micro-batch (paper: 4, tiny: 8)")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1)
    length = g.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, help="run length in optimizer steps (tiny: 1000)")
    length.add_argument("--num-epochs", type=int, help="run length in passes over the data, each rank taking "
                        "ceil(clips / processes) clips per pass (cogvideox-2b: 4, cogvideox-5b: 1)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mixed-precision", choices=["auto", "bf16", "no"], default="auto",
                   help="auto: bf16 autocast on CUDA, float32 on CPU")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--attention", choices=ATTENTION, default="auto")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and optimizer "
                   "state across ranks (FSDP2) instead of replicating them (DDP); full finetunes only")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--dist-timeout", type=int, default=1800, help="under torchrun: seconds a training collective "
                   "may wait for the other ranks, as the paper's run (default: 1800); ranks waiting for another's "
                   "validation videos, checkpoint or cache work wait without this limit")
    g.add_argument("--vae-tiling", action="store_true", help="encode clips in tiles: less memory at 49×480×720")
    g = p.add_argument_group("outputs")
    g.add_argument("--output-dir", default="runs/tiny", help="default: runs/tiny")
    g.add_argument("--checkpoint-every", type=int, default=100)
    g.add_argument("--checkpoints-total-limit", type=int, default=2, help="keep this many newest checkpoints")
    g.add_argument("--resume", help="'latest' or a checkpoint folder")
    g.add_argument("--validation-every", type=int, default=0, help="write validation videos every K steps (0: off)")
    g.add_argument("--validation-prompt", action="append", help="prompt for validation videos (repeatable)")
    g.add_argument("--validation-steps", type=int, default=50, help="denoising steps for validation videos")
    g.add_argument("--tensorboard", action="store_true", help="also log scalars to OUTPUT/tensorboard")
    args = p.parse_args(argv)
    fail = p.error
    if args.preset != "tiny" and not args.model:
        fail(f"--preset {args.preset} needs --model PATH (a local CogVideoX pipeline directory)")
    args.teacher = args.teacher or ("tiny" if args.preset == "tiny" else "videomaev2")
    if args.teacher != "tiny" and not args.teacher_path:
        fail(f"--teacher {args.teacher} needs --teacher-path")
    args.preset_config = get_preset(args.preset, num_frames=args.num_frames, height=args.height, width=args.width,
                                    align_layer=args.align_layer)
    cfg = args.preset_config
    apply_recipe_defaults(args, cfg)
    for name in ("max_steps", "num_epochs", "batch_size", "gradient_accumulation_steps", "checkpoint_every",
                 "dist_timeout"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.fsdp and args.lora_rank:
        fail("--fsdp shards a full finetune; LoRA adapters are small enough for DDP (drop --fsdp, or pass "
             "--lora-rank 0 for a full finetune)")
    if args.lora_rank < 0 or args.margin < 0 or args.trd_weight < 0 or args.warmup_steps < 0:
        fail("--lora-rank, --margin, --trd-weight and --warmup-steps must be >= 0")
    size_error = video_size_error(cfg.num_frames, cfg.height, cfg.width)
    if size_error:
        fail(size_error)
    if args.data and not os.path.isfile(args.data):
        fail(f"--data {args.data!r}: no such file")
    if args.resume and args.resume != "latest" and not os.path.isdir(args.resume):
        fail(f"--resume must be 'latest' or a checkpoint folder, got {args.resume!r}")
    return args


def apply_recipe_defaults(args, cfg) -> None:
    """Unset optimisation flags take the preset's values."""
    for name in ("lora_rank", "batch_size", "lr_scheduler", "warmup_steps"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(cfg, name))
    if args.max_steps is None and args.num_epochs is None:
        args.max_steps, args.num_epochs = cfg.max_steps, cfg.num_epochs
    if args.lora_alpha is None and args.lora_rank:
        args.lora_alpha = cfg.lora_alpha if args.lora_rank == cfg.lora_rank and cfg.lora_alpha else args.lora_rank
    if args.learning_rate is None:
        args.learning_rate = cfg.lora_learning_rate if args.lora_rank else cfg.learning_rate


def lr_schedule(optimizer, name: str, warmup_steps: int, total_steps: int):
    """One step() per optimizer step. constant, linear, cosine: diffusers' schedules, a linear warm-up from 0 over
    `warmup_steps`, then hold, or decay to 0 after `total_steps`. warmup-decay: DeepSpeed's WarmupDecayLR."""
    from diffusers.optimization import get_scheduler

    if name not in LR_SCHEDULES:
        raise ValueError(f"--lr-scheduler must be one of {LR_SCHEDULES}, got {name!r}")
    if name == "warmup-decay":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_decay(warmup_steps, total_steps))
    return get_scheduler("constant_with_warmup" if name == "constant" else name, optimizer,
                         num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def warmup_decay(warmup_steps: int, total_steps: int):
    """The learning-rate factor of optimizer step s + 1 under DeepSpeed's WarmupDecayLR (warmup_min_lr 0, log warm-up
    as the paper's run): 0 before its first step() (s = 0), log(s)/log(W) for 1 <= s <= W with W = max(2,
    warmup_steps), then (T − s + 1)/(T − W), so the last step (s = T − 1) runs at 2/(T − W) of the peak.
    official: deepspeed==0.16.3 deepspeed/runtime/lr_schedules.py, WarmupLR.__init__/get_lr and
    WarmupDecayLR._get_gamma, called once per optimizer step by the engine (runtime/engine.py, _take_model_step).
    """
    warmup = max(2, warmup_steps)

    def factor(s: int) -> float:
        if s == 0:  # WarmupLR starts at warmup_min_lr before its first step()
            return 0.0
        if s <= warmup:  # DeepSpeed's iteration s − 1 < W
            return math.log(s) / math.log(warmup)
        return max(0.0, (total_steps - s + 1) / max(1.0, total_steps - warmup))

    return factor


# ---------------------------------------------------------------------------------------------------- setup


def setup_distributed(args):
    """(rank, world size, device, group to wait in for rank-local work) from torchrun's environment; a single
    process (and no group) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    waiting = None
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        waiting = init_process_groups("nccl" if device.type == "cuda" else "gloo", args.dist_timeout)
    return int(os.environ.get("RANK", "0")), world, device, waiting


def load_models(args, device, frozen_dtype):
    """The pipeline (frozen VAE and text encoder in `frozen_dtype`, the trained transformer in float32 master
    weights) and the frozen teacher."""
    from videorepa.models import load_pipeline
    from videorepa.teachers import load_teacher
    from videorepa.world import build_pipeline

    cfg = args.preset_config
    if args.model is None:
        pipe = build_pipeline(args.seed)  # the pretrained tiny world, a fresh transformer; float32 throughout
    else:
        pipe = load_pipeline(args.model, {"transformer": torch.float32, "default": frozen_dtype})
    teacher = load_teacher(args.teacher, args.teacher_path, cfg.teacher_height, cfg.teacher_width, cfg.num_frames)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    pipe.to(device)
    return pipe, teacher.to(device)


def prepare_transformer(args, transformer):
    """LoRA adapters (base frozen) or the whole transformer trainable."""
    if args.lora_rank:
        from peft import LoraConfig

        transformer.requires_grad_(False)
        transformer.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, init_lora_weights=True,
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    else:
        transformer.requires_grad_(True)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()


def grids(pipe, teacher, cfg):
    from videorepa.diffusion import token_grid

    vae_t, vae_s = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    latents = (1, (cfg.num_frames - 1) // vae_t + 1, None, cfg.height // vae_s, cfg.width // vae_s)
    return token_grid(pipe.transformer.config, latents), teacher.grid(cfg.num_frames)


def build_dataset(args, rank, world, waiting, pipe, teacher, device):
    """The training dataset: decoded videos, or the feature cache (filled first, shared out across ranks)."""
    cfg = args.preset_config
    if not args.data:
        args.data = os.path.join(args.output_dir, "synthetic-data", "captions.csv")
        if rank == 0:
            from videorepa.world import TRAIN_CLIPS, ensure_dataset

            ensure_dataset(os.path.dirname(args.data), num_clips=TRAIN_CLIPS, seed=args.seed)
        wait_for_everyone(waiting)
        args.cache_dir = args.cache_dir or os.path.join(args.output_dir, "feature-cache")  # encode each clip once
    videos = VideoCaptionDataset(args.data, cfg.num_frames, cfg.height, cfg.width)
    if not args.cache_dir:
        return videos
    from videorepa.feature_cache import CachedDataset, FeatureCache
    from videorepa.world import fingerprint as world_fingerprint

    cache = FeatureCache(args.cache_dir, {
        "model": os.path.abspath(args.model) if args.model else f"tiny-world-{world_fingerprint()}",
        "teacher": args.teacher,
        "teacher_path": os.path.abspath(args.teacher_path) if args.teacher_path else None,
        "frames": cfg.num_frames, "height": cfg.height, "width": cfg.width,
        "teacher_size": [cfg.teacher_height, cfg.teacher_width],
        # tiling and the frozen encoders' dtype change the latents and embeddings
        "vae_tiling": bool(args.vae_tiling), "vae_dtype": str(pipe.vae.dtype),
        "text_encoder_dtype": str(pipe.text_encoder.dtype), "teacher_dtype": str(next(teacher.parameters()).dtype),
    })
    todo = [i for i in range(rank, len(videos), world) if cache.load(cache.key(*videos.rows[i])) is None]
    from tqdm import tqdm

    for i in tqdm(todo, desc="caching features", disable=rank != 0 or not todo):
        item = videos[i]
        key = cache.key(*videos.rows[i])
        if "error" in item:
            cache.store_error(key, item["error"])
            continue
        latent_dist, embeds, teacher_tokens = encode_inputs(pipe, teacher, item["video"][None].to(device),
                                                            [item["caption"]], device)
        cache.store(key, {"latent_dist": latent_dist[0], "prompt_embeds": embeds[0], "teacher": teacher_tokens[0]})
    wait_for_everyone(waiting)  # the ranks' shares of uncached clips may differ a lot
    return CachedDataset(cache, videos.rows)


@torch.no_grad()
def encode_inputs(pipe, teacher, video, captions, device):
    from videorepa.diffusion import encode_prompts, encode_video_distribution

    return encode_video_distribution(pipe.vae, video), encode_prompts(pipe, captions, device), teacher(video)


# ---------------------------------------------------------------------------------------------------- state


def gather_objects(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def write_checkpoint(folder, weights, optim, schedule, step, position, rank_states, skipped):
    from safetensors.torch import save_file

    save_file(weights, os.path.join(folder, "trainable.safetensors"))
    torch.save({"optimizer": optim, "lr_schedule": schedule.state_dict(), "step": step, "position": position,
                "ranks": rank_states, "skipped": skipped}, os.path.join(folder, "training_state.pt"))


def read_checkpoint(folder, model, optimizer, schedule, generator, rank, world):
    from safetensors.torch import load_file

    from videorepa.parallel import restore_state, trainable_names

    weights = load_file(os.path.join(folder, "trainable.safetensors"))
    if weights.keys() != trainable_names(model):
        raise ValueError(f"checkpoint {folder} does not match this model's trainable parameters "
                         f"(LoRA rank, preset or align loss changed?)")
    state = torch.load(os.path.join(folder, "training_state.pt"), map_location="cpu", weights_only=False)
    restore_state(model, optimizer, weights, state["optimizer"])
    schedule.load_state_dict(state["lr_schedule"])
    ranks = state["ranks"]  # each rank's own noise generator and RNG states
    if len(ranks) != world:
        log.warning("checkpoint written by %d processes, resumed by %d: the random streams restart per rank",
                    len(ranks), world)
    generator.set_state(ranks[rank % len(ranks)]["generator"])
    restore_rng_states(ranks[rank % len(ranks)]["rng"])
    return state["step"], tuple(state["position"]), state["skipped"]


def base_model_dir(args) -> str:
    """Where a LoRA run on the tiny world's base keeps that base, so the adapters have something to load onto."""
    return os.path.join(args.output_dir, "base-model")


def save_base_model(args, pipe):
    """OUT/base-model for a LoRA run on the tiny world. A base left by a run of another seed or world is replaced,
    and that run's LoRA final/ (its adapters belong to the old base) goes first, so nothing loads adapters onto
    weights they were not trained on."""
    folder, final = base_model_dir(args), os.path.join(args.output_dir, "final")
    with atomic_folder(folder) as tmp:
        pipe.save_pretrained(tmp)  # before the adapters wrap its layers
        record_sampling(tmp, args.preset_config.guidance_scale)  # a pipeline of the preset, sampled as its outputs
        if os.path.isdir(folder) and not same_files(tmp, folder):
            log.warning("%s holds another base model (another seed or world): replacing it", folder)
            if lora_base(final) == os.path.abspath(folder):
                log.warning("removing %s: its LoRA weights were trained on the replaced base", final)
                shutil.rmtree(final)


def lora_base(final: str) -> str | None:
    """The base model a LoRA final/ names (None if `final` holds no LoRA weights)."""
    try:
        with open(os.path.join(final, "videorepa.json")) as f:
            return json.load(f)["base_model"]
    except (OSError, ValueError, KeyError):
        return None


def save_final(args, pipe, model, weights):
    """OUT/final: a stock-loadable pipeline (full) or LoRA weights + the base path; heads beside it. `weights` are
    the gathered trainable weights (the only full copy of a sharded model)."""
    from diffusers import CogVideoXPipeline

    transformer = model.transformer
    if args.fsdp:  # a plain copy of the sharded transformer for save_pretrained
        sharded = transformer
        transformer = type(sharded).from_config(sharded.config)
        prefix = "transformer."
        transformer.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
        pipe.transformer = transformer
    final = os.path.join(args.output_dir, "final")
    with atomic_folder(final) as folder:  # an earlier run's final (a full pipeline, other adapters) goes entirely
        if args.lora_rank:
            from peft.utils import get_peft_model_state_dict

            base = args.model or base_model_dir(args)
            # The adapter's config (α and r among it) travels in the safetensors metadata, which a stock
            # load_lora_weights reads back: without it, diffusers assumes α = r.
            config = transformer.peft_config["default"]
            CogVideoXPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                                transformer_lora_adapter_metadata=config.to_dict())
            with open(os.path.join(folder, "videorepa.json"), "w") as f:
                json.dump({"base_model": os.path.abspath(base), "lora_rank": config.r,
                           "lora_alpha": config.lora_alpha}, f, indent=1)
        else:
            pipe.save_pretrained(folder)
        record_sampling(folder, args.preset_config.guidance_scale)
    heads = {k[len("aligner."):]: v for k, v in weights.items() if k.startswith("aligner.")}
    torch.save(heads, os.path.join(args.output_dir, "alignment-heads.pt"))
    return final


def all_finite(value: torch.Tensor, world: int) -> bool:
    """Whether `value` is finite on every rank: all ranks get the same answer and stop together, instead of the
    others waiting in the next collective."""
    finite = torch.isfinite(value).all().float()
    if world > 1:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite)


def mean_over_ranks(totals: dict, world: int) -> dict:
    """The step's losses (0-dim tensors) as floats, averaged over the ranks' batches (one collective)."""
    values = torch.stack([totals[k].float() for k in totals])
    if world > 1:
        torch.distributed.all_reduce(values)
        values /= world
    return dict(zip(totals, values.tolist()))


def autocast(device, dtype):
    """The mixed-precision context of training, for validation too: the float32 transformer then meets the VAE's
    and the text encoder's bf16 tensors in bf16."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def write_validation_videos(args, pipe, step, device, autocast_dtype, write=True):
    from videorepa.models import generate_video
    from videorepa.video_io import write_video

    cfg = args.preset_config
    folder = os.path.join(args.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    pipe.transformer.eval()
    for i, prompt in enumerate(args.validation_prompt or [falling_caption("red")]):
        with autocast(device, autocast_dtype):
            frames = generate_video(pipe, prompt, args.seed, cfg.num_frames, cfg.height, cfg.width,
                                    args.validation_steps, cfg.guidance_scale)
        if write:
            write_video(os.path.join(folder, f"step-{step:06d}-{i}.mp4"), frames)
    pipe.transformer.train()


# ---------------------------------------------------------------------------------------------------- training


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    rank, world, device, waiting = setup_distributed(args)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (FSDP shards them as they are)
    cfg = args.preset_config
    os.makedirs(args.output_dir, exist_ok=True)
    autocast_dtype = torch.bfloat16 if args.mixed_precision == "bf16" or (
        args.mixed_precision == "auto" and device.type == "cuda") else None
    attention = resolve_attention(args.attention, device, autocast_dtype or torch.float32)

    pipe, teacher = load_models(args, device, autocast_dtype or torch.float32)
    dataset = build_dataset(args, rank, world, waiting, pipe, teacher, device)
    if args.lora_rank and args.model is None and rank == 0:
        save_base_model(args, pipe)
    prepare_transformer(args, pipe.transformer)
    student_grid, teacher_grid = grids(pipe, teacher, cfg)
    transformer_dim = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    aligner = TokenAligner(transformer_dim, teacher.dim, cfg.projector_hidden, student_grid, teacher_grid,
                           args.relation_grid).to(device)
    from videorepa.training import VideoREPAModel

    model = VideoREPAModel(pipe.transformer, pipe.scheduler, aligner, cfg.align_layer, args.align_loss,
                           args.trd_weight, args.margin, args.trd_mode, args.trd_backend)
    parallel = "fsdp" if args.fsdp and world > 1 else "ddp" if world > 1 else "single"
    wait_for_everyone(waiting)  # ranks load at their own pace; wrapping starts the collectives
    trained = wrap(model, parallel, device, world, find_unused=args.align_loss == "none")
    params = [p for p in model.parameters() if p.requires_grad]
    # official: DeepSpeed's AdamW (finetune/configs/zero2.yaml sets lr and weight decay 1e-4; betas and eps are
    # DeepSpeed's defaults), gradient clipping 1.0.
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    order = BatchOrder(len(dataset), args.batch_size, args.seed, rank, world)
    if args.num_epochs:
        args.max_steps = math.ceil(args.num_epochs * order.batches_per_epoch / args.gradient_accumulation_steps)
        log.info("%d epochs of %d batches per process: %d optimizer steps", args.num_epochs,
                 order.batches_per_epoch, args.max_steps)
    schedule = lr_schedule(optimizer, args.lr_scheduler, args.warmup_steps, args.max_steps)
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)  # diffusion noise and timesteps

    step, position, skipped = 0, (0, 0), {}
    resume = latest_checkpoint(args.output_dir) if args.resume == "latest" else args.resume
    if resume:
        step, position, skipped = read_checkpoint(resume, model, optimizer, schedule, generator, rank, world)
        log.info("resumed from %s at step %d", resume, step)
    elif args.resume:
        log.info("--resume latest: no checkpoint in %s, starting fresh", args.output_dir)

    order.position = position
    loader = torch.utils.data.DataLoader(PositionedDataset(dataset), batch_sampler=order, collate_fn=collate,
                                         num_workers=args.num_workers)
    batches = iter(loader)
    metrics = open_metrics(os.path.join(args.output_dir, "metrics.jsonl"), step) if rank == 0 else None
    writer = None
    if args.tensorboard and rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))
    from tqdm import tqdm

    from videorepa.diffusion import latent_seed, pad_latent_frames, sample_latents

    progress = tqdm(total=args.max_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    cached = args.cache_dir is not None
    start = time.time()
    while step < args.max_steps:
        totals = dict.fromkeys(("loss", "loss_diffusion", "loss_align"), 0.0)
        for micro in range(args.gradient_accumulation_steps):
            batch = next_usable_batch(batches, skipped, len(dataset))
            position = batch["position"]
            if cached:
                latent_dist = batch["latent_dist"].to(device)
                embeds, teacher_tokens = batch["prompt_embeds"].to(device), batch["teacher"].to(device)
            else:
                latent_dist, embeds, teacher_tokens = encode_inputs(pipe, teacher, batch["video"].to(device),
                                                                    batch["caption"], device)
            latents = sample_latents(pipe.vae, latent_dist, [latent_seed(args.seed, i) for i in batch["index"]])
            latents = pad_latent_frames(latents, pipe.transformer.config.patch_size_t)
            sync = contextlib.nullcontext() if micro == args.gradient_accumulation_steps - 1 \
                else no_gradient_sync(trained, parallel)
            # The attention kernel holds over backward too: gradient checkpointing recomputes blocks there.
            with sync, attention_kernel(attention):
                with autocast(device, autocast_dtype):
                    out = trained(latents, embeds, teacher_tokens, generator)
                if not all_finite(out["loss"].detach(), world):
                    raise FloatingPointError(
                        f"non-finite loss at step {step + 1} (diffusion {out['loss_diffusion'].item():.4g}, "
                        f"align {out['loss_align'].item():.4g}); the last checkpoint in {args.output_dir} is intact")
                (out["loss"] / args.gradient_accumulation_steps).backward()
            for k in totals:
                totals[k] += out[k].detach() / args.gradient_accumulation_steps
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP's sharded parameters give the norm as a DTensor
            grad_norm = grad_norm.full_tensor()
        if not all_finite(grad_norm, world):  # a finite loss can still have an inf/NaN gradient: never step on it
            raise FloatingPointError(f"non-finite gradient norm at step {step + 1} (loss {totals['loss'].item():.4g}); "
                                     f"the weights were not updated and the last checkpoint in {args.output_dir} "
                                     "is intact")
        totals = mean_over_ranks(totals, world)
        lr = optimizer.param_groups[0]["lr"]  # this step's
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        row = {"step": step, **totals, "loss_trd": totals["loss_align"] if args.align_loss == "trd" else None,
               "lr": lr, "grad_norm": grad_norm.item(), "seconds": time.time() - start, "skipped": len(skipped)}
        if rank == 0:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            if writer:
                for k in ("loss", "loss_diffusion", "loss_align", "lr"):
                    writer.add_scalar(k, row[k], step)
            progress.set_postfix(loss=f"{row['loss']:.4f}", align=f"{row['loss_align']:.4f}")
            progress.update(1)
        if step % args.checkpoint_every == 0 or step == args.max_steps:
            # Collectives: every rank takes part, rank 0 writes.
            weights, optim = gather_state(model, optimizer)
            rank_states = gather_objects({"generator": generator.get_state(), "rng": rng_states()}, world)
            all_skipped = {k: v for part in gather_objects(skipped, world) for k, v in part.items()}
            if rank == 0:
                save_checkpoint(args.output_dir, step, lambda folder: write_checkpoint(
                    folder, weights, optim, schedule, step, position, rank_states, all_skipped),
                    args.checkpoints_total_limit)
            wait_for_everyone(waiting)
        if args.validation_every and step % args.validation_every == 0:
            if rank == 0 or parallel == "fsdp":  # sharded weights: every rank samples, rank 0 writes
                write_validation_videos(args, pipe, step, device, autocast_dtype, write=rank == 0)
            wait_for_everyone(waiting)
    progress.close()
    weights, _ = gather_state(model)
    if rank == 0:
        final = save_final(args, pipe, model, weights)
        log.info("done: %d steps, %d clips skipped; final weights in %s", step, len(skipped), final)
        metrics.close()
    wait_for_everyone(waiting)
    if world > 1:
        torch.distributed.destroy_process_group()
    return args.output_dir


def open_metrics(path: str, step: int):
    """metrics.jsonl for appending, keeping only rows up to `step`: a fresh run starts it empty, and a resumed
    one drops the rows logged after its checkpoint by the run it continues."""
    kept = []
    if step and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(kept)
    return open(path, "a")


def next_usable_batch(batches, skipped: dict, dataset_size: int) -> dict:
    """The next batch with at least one usable clip; unusable clips are logged once and counted."""
    while True:
        batch = next(batches)
        for index, reason in batch["errors"]:
            if index not in skipped:
                skipped[index] = reason
                log.warning("skipping clip %d: %s (%d skipped so far)", index, reason, len(skipped))
        if len(skipped) >= dataset_size:
            raise RuntimeError(f"no usable clip left: all {dataset_size} were skipped; first reasons: "
                               f"{list(skipped.values())[:3]}")
        if batch["index"]:
            return batch


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
