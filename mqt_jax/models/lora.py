"""LoRA (Hu et al., 2021) on the LLM's projections, as LLaVA-1.5's finetune_lora.sh uses it.

A projection W (q, k, v, o of attention; gate, up, down of the MLP) becomes
    y = x W + (alpha / rank) * dropout(x) A B,
A [in, rank] (PEFT's Kaiming-uniform init) and B [rank, out] (zeros, so training starts from
the base model). The adapters are parameters of the Dense layer they adapt (`lora_a`,
`lora_b` next to `kernel`), so they are scanned over layers and sharded by the kernel's own
logical axes, the rank axis ("lora_rank") over fsdp where the kernel's axis did not take it
(B of q / k / v / gate / up: replicated 64 times on a v5p-64 otherwise), and checkpoints, `init_from` and the trainable /
frozen regexes treat them like any parameter: `TrainConfig.trainable = ("query_transformer",
ADAPTERS)` trains the adapters alone (configs/lora.gin). `merge` folds them into the kernels:
inference and `mqt-jax export` run the merged model, which has no adapter left.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from mqt_jax.config import LoRAConfig

ADAPTERS = "llm/.*/lora_[ab]$"  # regex of every adapter parameter (TrainConfig.trainable)


def adapter_output(module: nn.Module, x: jax.Array, lora: LoRAConfig, num_in: int,
                   features: tuple[int, ...], axes: tuple, dtype, param_dtype) -> jax.Array:
    """(alpha / rank) * dropout(x) A B for the Dense `module` (called from its __call__)."""
    init_a = nn.initializers.variance_scaling(  # PEFT: kaiming_uniform(a=sqrt(5))
        1.0 / 3, "fan_in", "uniform", in_axis=tuple(range(num_in)), out_axis=num_in)
    a = module.param("lora_a", nn.with_logical_partitioning(init_a, (*axes[:num_in], "lora_rank")),
                     tuple(x.shape[-num_in:]) + (lora.rank,), param_dtype)
    b = module.param("lora_b", nn.with_logical_partitioning(
        nn.initializers.zeros, ("lora_rank", *axes[num_in:])), (lora.rank, *features), param_dtype)
    if lora.dropout and module.has_rng("dropout"):
        x = nn.Dropout(lora.dropout, deterministic=False)(x)
    contract = (tuple(range(x.ndim - num_in, x.ndim)), tuple(range(num_in)))
    h = jax.lax.dot_general(x.astype(dtype), a.astype(dtype), (contract, ((), ())))
    y = jax.lax.dot_general(h, b.astype(dtype), (((h.ndim - 1,), (0,)), ((), ())))
    return y * jnp.asarray(lora.scale, dtype)


def merge(params: dict, lora: LoRAConfig) -> dict:
    """`params` with every adapter folded into its kernel (W + scale * A B, in float32, cast
    back to the kernel's dtype) and removed. A tree without adapters comes back unchanged."""
    flat = flatten_dict(params)
    merged = {}
    for key, value in flat.items():
        if key[-1] in ("lora_a", "lora_b"):
            continue
        a, b = flat.get(key[:-1] + ("lora_a",)), flat.get(key[:-1] + ("lora_b",))
        if key[-1] == "kernel" and a is not None:
            lead = a.ndim + b.ndim - 2 - value.ndim  # the scanned "layers" axis, if any
            xp = jnp if isinstance(value, jax.Array) else np
            a2 = xp.reshape(a, a.shape[:lead] + (-1, a.shape[-1])).astype(np.float32)
            b2 = xp.reshape(b, b.shape[:lead + 1] + (-1,)).astype(np.float32)
            delta = xp.reshape(xp.matmul(a2, b2), value.shape) * lora.scale
            value = (value.astype(np.float32) + delta).astype(value.dtype)
        merged[key] = value
    return unflatten_dict(merged)


def merged(model_config, params: dict):
    """(model config, parameters) of the model with its adapters folded in (no adapters left);
    a model without adapters comes back as it is. Inference and export run this."""
    lora = model_config.llm.lora
    if not lora.rank:
        return model_config, params
    llm = dataclasses.replace(model_config.llm, lora=LoRAConfig(rank=0))  # (gin binds rank)
    return dataclasses.replace(model_config, llm=llm), merge(params, lora)
