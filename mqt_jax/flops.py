"""Analytical training FLOPs and the devices' peaks: model FLOPs utilisation (MFU).

Model FLOPs per step are 6 N T (forward 2 N T, backward 4 N T; PaLM's convention without the
attention term): N the LLM's parameters, T the tokens computed (batch x sequence length,
padding included, as the hardware computes it). The vision tower and query transformer are
left out: at 7B they are 4% of the parameters and run on 576 patches, not T tokens.
"""

from __future__ import annotations

import math

import jax

# Peak dense bf16 TFLOP/s per chip (public spec sheets), keyed as `chip_key` names them.
PEAK_TFLOPS = {"v4": 275, "v5e": 197, "v5p": 459, "v6e": 918,
               "a100": 312, "h100": 989, "h200": 989}
# device_kind substrings (lower case) -> PEAK_TFLOPS key; first match wins.
_KINDS = (("v5 lite", "v5e"), ("v5e", "v5e"), ("v6 lite", "v6e"), ("v6e", "v6e"),
          ("v5p", "v5p"), ("v5", "v5p"), ("v4", "v4"),
          ("h200", "h200"), ("h100", "h100"), ("a100", "a100"))


def chip_key(device_kind: str) -> str | None:
    kind = device_kind.lower()
    return next((key for pattern, key in _KINDS if pattern in kind), None)


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak FLOP/s of one device, or None where it is unknown (CPUs)."""
    device = device or jax.devices()[0]
    key = chip_key(device.device_kind) if device.platform != "cpu" else None
    return PEAK_TFLOPS[key] * 1e12 if key else None


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def train_flops(llm_parameters: int, tokens: int) -> float:
    """6 N T: the model FLOPs of a training step over `tokens` tokens."""
    return 6.0 * llm_parameters * tokens



# ---- Inference FLOPs by part (forward only; a matmul [a, b] x [b, c] is 2abc; attention
# scores and weighted sums count every (query, key) pair the program computes). ----

def vision_flops(v) -> float:
    """The vision tower on one image: patch embedding, then the layers that are built."""
    t, w = v.num_patches + 1, v.width  # + the class token
    per_layer = 2 * t * (4 * w * w + 2 * w * v.mlp_dim) + 4 * t * t * w
    return 2 * v.num_patches * (v.patch_size**2 * 3) * w + v.num_layers_built * per_layer


def query_flops(q, v, llm_hidden: int, queries: int) -> float:
    """The official resampler on one image, computing `queries` tokens (M in the single
    graph, m when really truncated): query, key (from the fixed positions) and value
    projections, attention, then the output and LLM projections. (The query and key
    projections, and the bicubic resize of the M positions to the patch grid, do not depend on
    the image: a batch computes them once.)"""
    if q.variant != "official":
        raise ValueError(f"query_flops covers the official resampler, not {q.variant!r}")
    p, w = v.num_patches, q.width
    projections = 2 * queries * w * w + 2 * p * w * w * 2 + 2 * queries * w * w
    resize = 2 * p * q.num_queries * w
    return resize + projections + 4 * queries * p * w + 2 * queries * w * llm_hidden


def llm_flops(llm, tokens: int, context: int | None = None) -> float:
    """LLaMA forward over `tokens` new tokens attending to `context` positions (default: the
    tokens themselves, a prefill; 1 token and the cache length: a decode step)."""
    context = tokens if context is None else context
    h, qd, kvd = llm.hidden, llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    per_layer = 2 * tokens * (h * qd + 2 * h * kvd + qd * h + 3 * h * llm.mlp_dim)
    per_layer += 4 * tokens * context * qd
    return llm.num_layers * per_layer + 2 * tokens * h * llm.vocab_size


def inference_flops(model_config, m: int, text_tokens: int, new_tokens: int = 0) -> dict:
    """One image at m visual tokens plus `text_tokens` of prompt, then `new_tokens` decoded
    with a KV cache. The query transformer computes only m tokens (truncation). The
    mlp2x_gelu projector has no m: LLaVA-1.5's count."""
    if model_config.query.variant == "mlp2x_gelu":
        return llava_flops(model_config, text_tokens, new_tokens)
    v, llm = model_config.vision, model_config.llm
    compressor = {"query": query_flops(model_config.query, v, llm.hidden, m)}
    return _with_towers(model_config, compressor, m + text_tokens, new_tokens)


def llava_flops(model_config, text_tokens: int, new_tokens: int = 0) -> dict:
    """LLaVA-1.5 on the same towers: all patch tokens (576 at 336 px) through the 2-layer
    GELU MLP projector into the LLM."""
    v, h = model_config.vision, model_config.llm.hidden
    compressor = {"projector": 2 * v.num_patches * (v.width * h + h * h)}
    return _with_towers(model_config, compressor, v.num_patches + text_tokens, new_tokens)


def _with_towers(model_config, compressor: dict, prompt: int, new_tokens: int) -> dict:
    """The vision tower, the compressor's parts, the LLM's prefill of `prompt` tokens and
    its decode steps; and their total."""
    llm = model_config.llm
    parts = {
        "vision": vision_flops(model_config.vision), **compressor,
        "llm_prefill": llm_flops(llm, prompt),
        "llm_decode": sum(llm_flops(llm, 1, prompt + i + 1) for i in range(new_tokens)),
    }
    return {**parts, "total": sum(parts.values())}
