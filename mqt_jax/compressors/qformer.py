"""A Q-Former: L layers of [query self-attention | cross-attention to the patches | MLP]."""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax.numpy as jnp

from mqt_jax.compressors.base import Compressor, register
from mqt_jax.core import splice
from mqt_jax.models import layers
from mqt_jax.models.layers import ACT_BATCH, ACT_EMBED, ACT_LENGTH

if TYPE_CHECKING:
    from mqt_jax.config import QueryTransformerConfig


class QFormerLayer(nn.Module):
    """Post-LN layer: x = LN(x + selfattn(x | query mask)); LN(x + crossattn(x, image)); LN(x + MLP)."""

    config: QueryTransformerConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, features, mask):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = lambda name: layers.Attention(  # noqa: E731
            num_heads=cfg.num_heads, head_dim=cfg.width // cfg.num_heads,
            out_features=cfg.width, use_bias=True, name=name, **kw,
        )
        ln = lambda name: layers.layer_norm(cfg.layer_norm_eps, name=name, **kw)  # noqa: E731
        x = ln("ln_self")(x + attn("self_attn")(x, x, mask=mask))
        x = ln("ln_cross")(x + attn("cross_attn")(x, features))
        x = ln("ln_mlp")(x + layers.MLP(cfg.mlp_dim, cfg.width, name="mlp", **kw)(x))
        return layers.constrain(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED)), None


@register("qformer")
class QFormer(Compressor):
    """The self-attention honours each image's m (`config.query_mask`, see splice.query_mask):
    with "causal" masking token i is the same at every m."""

    elastic = True
    cross_attention_path = ("layers", "cross_attn", "weights")

    @nn.compact
    def __call__(self, features, m, num_queries: int | None = None):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = num_queries or cfg.num_queries
        query = self.param(
            "query", layers.partitioned(nn.initializers.truncated_normal(0.02), ("queries", "embed")),
            (cfg.num_queries, cfg.width), self.param_dtype,
        )
        batch = features.shape[0]
        x = jnp.broadcast_to(query[:n].astype(self.dtype), (batch, n, cfg.width))
        if num_queries is not None:  # really truncated: n queries and nothing else exist
            m = jnp.full((batch,), n, jnp.int32)
        mask = splice.query_mask(m, n, cfg.query_mask)
        blocks = layers.scan_blocks(QFormerLayer, cfg.num_layers, self.remat_policy, 2)
        x, _ = blocks(cfg, name="layers", **kw)(x, features.astype(self.dtype), mask)
        out = layers.dense(self.out_width, ("embed", "llm_embed"), name="proj", **kw)(x)
        return layers.constrain(out, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))

    @classmethod
    def nested(cls, query) -> bool:
        return query.query_mask == "causal"

    @classmethod
    def flops(cls, model, m, text_tokens):
        q, v, queries = model.query, model.vision, m
        p, w, d = v.num_patches, q.width, v.width
        self_attn = 2 * queries * 4 * w * w + 4 * queries * queries * w
        cross = 2 * queries * 2 * w * w + 2 * p * 2 * d * w + 4 * queries * p * w
        mlp = 2 * queries * 2 * w * q.mlp_dim
        return {"query": q.num_layers * (self_attn + cross + mlp) + 2 * queries * w * model.llm.hidden}
