"""Victor (shared/reference/baselines.md): the mlp2x_gelu projector's patch tokens, then R
learnable registers; the LLM drops the patch tokens at layer k (`drop_layer`)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mqt_jax.compressors.base import Compressor, register
from mqt_jax.compressors.mlp2x_gelu import mlp2x_gelu
from mqt_jax.core import flops
from mqt_jax.models import layers


@register("victor")
class VictorProjector(Compressor):
    """The registers (M = R of them, QueryTransformerConfig.num_queries) live in the LLM's
    input-embedding space, the same for every image, initialised like token embeddings
    (normal(0.02)); the LLM's input holds patches + registers."""

    @nn.compact
    def __call__(self, features, m=None, num_queries: int | None = None):
        registers = self.param(
            "registers", layers.partitioned(nn.initializers.normal(0.02), ("queries", "embed")),
            (self.config.num_queries, self.out_width), self.param_dtype,
        )
        x = mlp2x_gelu(features.astype(self.dtype), self.out_width,
                       dict(dtype=self.dtype, param_dtype=self.param_dtype))
        registers = jnp.broadcast_to(registers.astype(self.dtype), (x.shape[0],) + registers.shape)
        return jnp.concatenate([x, registers], axis=1)

    @classmethod
    def check(cls, model):
        k, layers_ = model.query.drop_layer, model.llm.num_layers
        if not 1 <= k < layers_:
            raise ValueError(f"victor: QueryTransformerConfig.drop_layer={k} must be in "
                             f"[1, {layers_ - 1}] for a {layers_}-layer LLM")

    @classmethod
    def llm_tokens(cls, model):
        return model.vision.num_patches + model.query.num_queries

    @classmethod
    def dropped(cls, model):
        return model.query.drop_layer, model.vision.num_patches

    @classmethod
    def carried_tokens(cls, model, m):
        return model.query.num_queries

    @classmethod
    def inference_flops(cls, model, m, text_tokens, new_tokens=0):
        """The first k layers run on patches + registers + text, the rest on registers + text."""
        v, llm, k = model.vision, model.llm, model.query.drop_layer
        r, p = model.query.num_queries, v.num_patches
        full, kept = p + r + text_tokens, r + text_tokens
        decode = sum(flops.llm_flops(llm, 1, full + i + 1, k, head=False)
                     + flops.llm_flops(llm, 1, kept + i + 1, llm.num_layers - k)
                     for i in range(new_tokens))
        parts = {
            "vision": flops.vision_flops(v), "projector": flops.mlp2x_flops(p, v.width, llm.hidden),
            "llm_prefill": flops.llm_flops(llm, full, layers=k, head=False)
            + flops.llm_flops(llm, kept, layers=llm.num_layers - k),
            "llm_decode": decode,
        }
        return {**parts, "total": sum(parts.values())}
