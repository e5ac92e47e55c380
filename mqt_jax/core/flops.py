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


def llm_parameters(llm) -> int:
    """The LLaMA's parameter count: embedding, layers, final norm, output head."""
    qd, kvd = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    layer = llm.hidden * (2 * qd + 2 * kvd) + 3 * llm.hidden * llm.mlp_dim + 2 * llm.hidden
    return 2 * llm.vocab_size * llm.hidden + llm.num_layers * layer + llm.hidden


def train_flops(llm_parameters: int, tokens: int) -> float:
    """6 N T: the model FLOPs of a training step over `tokens` tokens."""
    return 6.0 * llm_parameters * tokens


def train_step_flops(llm, rows: int, seq_len: int, remat_policy: str) -> float:
    """The LLM's FLOPs in a training step of `rows` x `seq_len` tokens, attention included:
    forward, backward (twice the forward) and what the remat policy recomputes in the
    backward pass (nothing_saveable: the layers' whole forward; dots_with_no_batch_dims:
    the attention score / weighted-sum matmuls, which have batch dimensions; the others
    keep every matmul)."""
    forward = llm_flops(llm, seq_len)
    recompute = {"nothing_saveable": llm_flops(llm, seq_len, head=False),
                 "dots_with_no_batch_dims_saveable":
                     llm.num_layers * 4 * seq_len * seq_len * llm.num_heads * llm.head_dim}
    return rows * (3 * forward + recompute.get(remat_policy, 0.0))



# ---- Inference FLOPs by part (forward only; a matmul [a, b] x [b, c] is 2abc; attention
# scores and weighted sums count every (query, key) pair the program computes). ----

def vision_flops(v) -> float:
    """The vision tower on one image: patch embedding, then the layers that are built."""
    t, w = v.num_patches + 1, v.width  # + the class token
    per_layer = 2 * t * (4 * w * w + 2 * w * v.mlp_dim) + 4 * t * t * w
    return 2 * v.num_patches * (v.patch_size**2 * 3) * w + v.num_layers_built * per_layer


def mlp2x_flops(tokens: int, width: int, llm_hidden: int) -> float:
    """LLaVA-1.5's projector (width -> hidden -> hidden) on `tokens` tokens."""
    return 2 * tokens * (width * llm_hidden + llm_hidden * llm_hidden)


def llm_flops(llm, tokens: int, context: int | None = None, layers: int | None = None,
              head: bool = True) -> float:
    """LLaMA forward over `tokens` new tokens attending to `context` positions (default: the
    tokens themselves, a prefill; 1 token and the cache length: a decode step), through
    `layers` layers (default all) and, with `head`, the output projection."""
    context = tokens if context is None else context
    layers = llm.num_layers if layers is None else layers
    h, qd, kvd = llm.hidden, llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    per_layer = 2 * tokens * (h * qd + 2 * h * kvd + qd * h + 3 * h * llm.mlp_dim)
    per_layer += 4 * tokens * context * qd
    return layers * per_layer + (2 * tokens * h * llm.vocab_size if head else 0)


def inference_flops(model_config, m: int, text_tokens: int, new_tokens: int = 0) -> dict:
    """One image at m visual tokens plus `text_tokens` of prompt, then `new_tokens` decoded
    with a KV cache, by part (vision, the compressor's parts, llm_prefill, llm_decode, total).
    The query transformer computes only m tokens (truncation); the compressors without an m
    compute their M. Each compressor counts its own part (mqt_jax/compressors)."""
    return model_config.compressor.inference_flops(model_config, m, text_tokens, new_tokens)


def escalation_prefill_flops(model_config, tried, before: int, after: int) -> float:
    """Prefill FLOPs of an answer escalated up the m in `tried` (`Generator.escalate`): the
    vision tower and compressor once, computing all M tokens (they serve every rung); the
    LLM's prefill of [`before` text tokens, tried[0] visual tokens, `after` text tokens]; then
    per raise from m to m' only the added visual tokens and the text after them (m' - m +
    after tokens) attending to the before + m' + after positions (the prefix's cache is kept).
    The output head counts every token, as `inference_flops`'s prefill does."""
    llm, big_m = model_config.llm, model_config.num_queries
    towers = inference_flops(model_config, big_m, 0)
    total = towers["total"] - towers["llm_prefill"] - towers["llm_decode"]
    total += llm_flops(llm, before + tried[0] + after)
    for m, raised in zip(tried, tried[1:]):
        total += llm_flops(llm, raised - m + after, before + raised + after)
    return total


def llava_flops(model_config, text_tokens: int, new_tokens: int = 0) -> dict:
    """LLaVA-1.5 on the same towers: all patch tokens (576 at 336 px) through the 2-layer
    GELU MLP projector into the LLM."""
    v, h = model_config.vision, model_config.llm.hidden
    compressor = {"projector": mlp2x_flops(v.num_patches, v.width, h)}
    return with_towers(model_config, compressor, v.num_patches + text_tokens, new_tokens)
def with_towers(model_config, compressor: dict, prompt: int, new_tokens: int) -> dict:
    """The vision tower, the compressor's parts, the LLM's prefill of `prompt` tokens and
    its decode steps; and their total."""
    llm = model_config.llm
    parts = {
        "vision": vision_flops(model_config.vision), **compressor,
        "llm_prefill": llm_flops(llm, prompt),
        "llm_decode": sum(llm_flops(llm, 1, prompt + i + 1) for i in range(new_tokens)),
    }
    return {**parts, "total": sum(parts.values())}
