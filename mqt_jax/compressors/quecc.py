"""QueCC (shared/reference/baselines.md): text-guided queries pooled from the patch grid, each
attending to its own window of multi-layer features, then the mlp2x_gelu projector."""

from __future__ import annotations

import math

import flax.linen as nn
import jax

from mqt_jax.compressors.base import Compressor, register
from mqt_jax.compressors.mlp2x_gelu import mlp2x_gelu
from mqt_jax.core import flops
from mqt_jax.models import layers


def windows(grid: jax.Array, side: int) -> jax.Array:
    """[N, G, G, D] -> [N, side**2, (G / side)**2, D]: window (i, j) of the side x side
    grid of windows holds its s x s cells (s = G / side), row-major both times."""
    n, g, _, d = grid.shape
    s = g // side
    x = grid.reshape(n, side, s, side, s, d).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, side * side, s * s, d)


@register("quecc")
class QueCC(Compressor):
    """In the vision width d: text = LN(Linear(guidance)) is added to every patch feature x;
    queries = depthwise s x s convolution with stride s over LN(MLP(x + text)) on the grid:
    (G / s)**2 = M; keys / values = LN(MLP(multi-layer features)); each query attends only to
    the s x s patches under its window (no residual, no FFN); then the mlp2x_gelu projector."""

    square_queries = True
    vision_width = True
    reads_question = True

    @nn.compact
    def __call__(self, features, m=None, num_queries: int | None = None, *, multi, guidance):
        """features [N, G*G, d]; multi [N, G*G, layers * d]; guidance [N, llm hidden]."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n, d, g = features.shape[0], features.shape[-1], self.grid_size
        side = math.isqrt(cfg.num_queries)  # a square: checked by the config
        ln = lambda name: layers.layer_norm(cfg.layer_norm_eps, name=name, **kw)  # noqa: E731

        def mlp(x, name):  # Linear, GELU, Linear, LayerNorm
            x = layers.dense(d, ("embed", "mlp"), use_bias=True, name=f"{name}_fc1", **kw)(x)
            x = layers.dense(d, ("mlp", "embed"), use_bias=True, name=f"{name}_fc2",
                             **kw)(jax.nn.gelu(x, approximate=False))
            return ln(f"{name}_norm")(x)

        text = layers.dense(d, ("llm_embed", "embed"), use_bias=True, name="text_proj", **kw)(
            guidance.astype(self.dtype))
        x = features.astype(self.dtype) + ln("text_norm")(text)[:, None]
        queries = mlp(x, "query").reshape(n, g, g, d)
        s = g // side
        queries = nn.Conv(
            d, (s, s), strides=(s, s), padding="VALID", feature_group_count=d, name="query_conv",
            kernel_init=layers.partitioned(nn.initializers.lecun_normal(), (None, None, None, "embed")),
            bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)), **kw,
        )(queries).reshape(n * side * side, 1, d)
        keys, values = (windows(mlp(multi.astype(self.dtype), name).reshape(n, g, g, d), side)
                        .reshape(n * side * side, s * s, d) for name in ("key", "value"))
        out = layers.Attention(
            num_heads=cfg.num_heads, head_dim=d // cfg.num_heads, out_features=d, use_bias=True,
            name="attn", **kw,
        )(queries, keys, values)
        return mlp2x_gelu(out.reshape(n, side * side, d), self.out_width, kw)

    @classmethod
    def vision_layers(cls, query):
        return query.vision_layers

    @classmethod
    def check(cls, model):
        q, v = model.query, model.vision
        side = math.isqrt(q.num_queries)
        if v.grid_size % side:
            raise ValueError(f"quecc: sqrt(QueryTransformerConfig.num_queries)={side} does not "
                             f"divide the {v.grid_size}x{v.grid_size} patch grid")
        for layer in q.vision_layers:
            if v.layer_index(layer) > v.num_layers_built:
                raise ValueError(f"quecc: vision layer {layer} is after VisionConfig.select_layer="
                                 f"{v.select_layer}, which is the last layer built")

    @classmethod
    def flops(cls, model, m, text_tokens):
        """QueCC reads the question with the LLM first (hidden states only, no output head):
        the text projection, the query MLP over every patch, the depthwise convolution, the
        key and value MLPs over the multi-layer features, the windowed attention, the
        projector."""
        q, v, llm = model.query, model.vision, model.llm
        p, d, big_m, n_layers = v.num_patches, v.width, q.num_queries, len(q.vision_layers)
        mlp = lambda n, d_in: 2 * n * (d_in * d + d * d)  # noqa: E731
        attention = 2 * big_m * d * d + 2 * 2 * p * d * d + 4 * p * d + 2 * big_m * d * d
        query = (2 * llm.hidden * d + mlp(p, d) + 2 * p * d + 2 * mlp(p, n_layers * d) + attention
                 + flops.mlp2x_flops(big_m, d, llm.hidden))
        return {"query": query, "llm_guidance": flops.llm_flops(llm, text_tokens, head=False)}
