"""Which attention kernel CogVideoX runs.

CogVideoX's attention processor calls torch.nn.functional.scaled_dot_product_attention directly, so diffusers'
set_attention_backend never reaches it. What does:
- "sdpa-flash": PyTorch's FlashAttention kernel, forced with torch.nn.attention.sdpa_kernel (CUDA, and PyTorch's
  CPU flash kernel on CPU);
- "flash-attn": the flash-attn package's kernel, routed in by swapping the SDPA function the processor calls while
  the context holds (masks and dropout, which CogVideoX does not use, fall back to SDPA);
- "sdpa": PyTorch's own choice.
"auto" takes flash-attn when it is installed and the model runs in fp16/bf16 on CUDA, else sdpa-flash for fp16/bf16
on CUDA, else sdpa (FlashAttention kernels take fp16/bf16 only).

The context must hold over the backward pass too: with gradient checkpointing, blocks are recomputed there, and a
recomputation on another kernel saves other tensors (torch.utils.checkpoint then fails) or other values.
"""

import contextlib
import importlib.util

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION = ("auto", "flash-attn", "sdpa-flash", "sdpa")


def resolve_attention(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    if choice not in ATTENTION:
        raise ValueError(f"--attention must be one of {ATTENTION}, got {choice!r}")
    has_flash_attn = importlib.util.find_spec("flash_attn") is not None
    if choice == "flash-attn" and not has_flash_attn:
        raise ValueError("--attention flash-attn needs the flash-attn package (pip install 'videorepa[flash]')")
    if choice != "auto":
        return choice
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return "flash-attn" if has_flash_attn else "sdpa-flash"
    return "sdpa"


def _flash_attn_sdpa(flash_attn_func, fallback):
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        device = query.device.type
        if torch.is_autocast_enabled(device):
            # Autocast casts SDPA's inputs to its dtype, but only once the call reaches the dispatcher, after this
            # function. CogVideoX's q and k come from LayerNorm, which CUDA's autocast runs in float32: without the
            # same cast here, every call would fall back to SDPA.
            dtype = torch.get_autocast_dtype(device)
            query, key, value = (x.to(dtype) for x in (query, key, value))
        if attn_mask is not None or dropout_p or kwargs or query.dtype not in (torch.float16, torch.bfloat16) or \
                key.dtype != query.dtype or value.dtype != query.dtype:
            return fallback(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kwargs)
        # SDPA's layout is (B, heads, L, D); flash-attn's is (B, L, heads, D).
        out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                              softmax_scale=scale, causal=is_causal)
        return out.transpose(1, 2)

    return sdpa


@contextlib.contextmanager
def attention_kernel(kind: str, flash_attn_func=None):
    """Context in which CogVideoX's attention runs on `kind` (a resolved choice, not "auto")."""
    if kind == "sdpa":
        yield
    elif kind == "sdpa-flash":
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            yield
    elif kind == "flash-attn":
        if flash_attn_func is None:
            from flash_attn import flash_attn_func
        original = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _flash_attn_sdpa(flash_attn_func, original)
        try:
            yield
        finally:
            F.scaled_dot_product_attention = original
    else:
        raise ValueError(f"attention kind must be one of {ATTENTION[1:]}, got {kind!r}")
