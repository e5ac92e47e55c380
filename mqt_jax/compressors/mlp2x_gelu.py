"""LLaVA-1.5's `mlp2x_gelu` projector: every patch becomes a token (M = the patches)."""

from __future__ import annotations

import flax.linen as nn
import jax

from mqt_jax.compressors.base import Compressor, register
from mqt_jax.core import flops
from mqt_jax.core.hf import Rule, linear
from mqt_jax.models import layers
from mqt_jax.models.layers import ACT_BATCH, ACT_EMBED, ACT_LENGTH

# Where LLaVA-1.5 folders keep the projector's two Linear layers: the original layout, then
# Hugging Face's LlavaForConditionalGeneration (two spellings).
PROJECTOR_KEYS = (("model.mm_projector.0", "model.mm_projector.2"),
                  ("multi_modal_projector.linear_1", "multi_modal_projector.linear_2"),
                  ("model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"))


def mlp2x_gelu(x, out_width: int, kw: dict):
    """Linear, exact GELU (as torch nn.GELU), Linear; its parameters fc1 / fc2 created in the
    calling module."""
    kw = dict(use_bias=True, **kw)
    x = layers.dense(out_width, ("embed", "llm_embed"), name="fc1", **kw)(x)
    x = jax.nn.gelu(x, approximate=False)
    x = layers.dense(out_width, ("embed", "llm_embed"), name="fc2", **kw)(x)
    return layers.constrain(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))


def projector_rules(vision_width: int, hidden: int, first: str, second: str) -> list[Rule]:
    return (linear(first, vision_width, hidden, "query_transformer/fc1")
            + linear(second, hidden, hidden, "query_transformer/fc2"))


def read_projector(variant: str, folder, vision, hidden: int, source, config: dict):
    """(QueryTransformerConfig fields, weight rules) of a LLaVA-1.5-layout folder's projector
    (config: its config.json), for a compressor `variant` built on it."""
    if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu" or \
            config.get("projector_hidden_act", "gelu") != "gelu":
        raise ValueError(f"{source}: a projector other than mlp2x_gelu")
    keys = set(folder.keys())
    pair = next((pair for pair in PROJECTOR_KEYS if pair[0] + ".weight" in keys), PROJECTOR_KEYS[0])
    fields = dict(variant=variant, num_queries=vision.num_patches, width=vision.width, num_heads=1)
    return fields, projector_rules(vision.width, hidden, *pair)


@register("mlp2x_gelu")
class MLPProjector(Compressor):
    """Nothing depends on m: the LLM sees all M tokens."""

    checkpoint_kind = "llava-1.5"

    @nn.compact
    def __call__(self, features, m=None, num_queries: int | None = None):
        x = features[:, :num_queries or features.shape[1]].astype(self.dtype)
        return mlp2x_gelu(x, self.out_width, dict(dtype=self.dtype, param_dtype=self.param_dtype))

    @classmethod
    def check(cls, model):
        q, patches = model.query, model.vision.num_patches
        if q.num_queries != patches:
            raise ValueError(f"the mlp2x_gelu projector makes one token per patch: "
                             f"QueryTransformerConfig.num_queries={q.num_queries} != {patches} patches")

    @classmethod
    def flops(cls, model, m, text_tokens):
        v = model.vision
        return {"projector": flops.mlp2x_flops(v.num_patches, v.width, model.llm.hidden)}

    @classmethod
    def checkpoint(cls, folder, vision, hidden, source, *, config: dict, **_):
        return read_projector(cls.variant, folder, vision, hidden, source, config)
