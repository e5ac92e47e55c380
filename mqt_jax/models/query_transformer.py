"""Matryoshka query transformer: patch features -> M visual tokens at the LLM width.

Both variants always return all M tokens; which of them the LLM sees is decided by
`mqt_jax.splice` from m. `num_queries=n` (a Python int) instead builds the really truncated
computation with only the first n queries: the reference that the masked graph must equal.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mqt_jax import splice
from mqt_jax.config import QueryTransformerConfig
from mqt_jax.models import layers
from mqt_jax.models.layers import ACT_BATCH, ACT_EMBED, ACT_LENGTH


def sincos_2d(grid_size: int, dim: int) -> np.ndarray:
    """MAE's fixed 2-D sin-cos table [grid_size**2, dim]: first half encodes the column index,
    second half the row index; each half is [sin(p w_k), cos(p w_k)], w_k = 10000^(-k/(dim/4))."""
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")

    def encode(p):
        angles = p.reshape(-1, 1).astype(np.float64) * omega
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


def torch_bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
    """[out_size, in_size] matrix of PyTorch's `F.interpolate(mode="bicubic",
    align_corners=False)` along one axis: cubic coefficient a = -0.75, source indices clamped
    at the border. (`jax.image.resize` uses a = -0.5 and differs.)"""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    matrix = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for i in range(out_size):
        src = scale * (i + 0.5) - 0.5
        x0 = int(np.floor(src))
        t = src - x0
        weights = (far(t + 1), near(t), near(1 - t), far(2 - t))
        for offset, w in zip((-1, 0, 1, 2), weights):
            matrix[i, min(max(x0 + offset, 0), in_size - 1)] += w
    return matrix.astype(np.float32)


def resize_grid_torch_bicubic(table: jax.Array, out_grid: int) -> jax.Array:
    """A [g*g, D] positional table resized to [out_grid**2, D], in float32."""
    g = int(round(table.shape[0] ** 0.5))
    w = jnp.asarray(torch_bicubic_matrix(g, out_grid))
    grid = table.astype(jnp.float32).reshape(g, g, -1)
    resized = jnp.einsum("oh,hwd,pw->opd", w, grid, w, precision="highest")
    return resized.reshape(out_grid * out_grid, -1)


class OfficialResampler(nn.Module):
    """The released MQT-LLaVA resampler (shared/reference/mqt.md), one cross-attention:
    q = ln_q(query + pos_embed), k = ln_k(pos_embed resized to the patch grid), v = ln_v(x),
    tokens = attn(q, k, v) @ proj. Token i does not depend on m."""

    config: QueryTransformerConfig
    out_width: int
    grid_size: int  # patch grid of the vision tower (24 for ViT-L/14 at 336 px)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "nothing_saveable"  # unused: nothing repeats

    @nn.compact
    def __call__(self, features, m=None, num_queries: int | None = None):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        big_m = cfg.num_queries
        n = num_queries or big_m
        query = self.param(
            "query", layers.partitioned(nn.initializers.truncated_normal(0.02), ("queries", "embed")),
            (big_m, cfg.width), self.param_dtype,
        )
        # Fixed, never trained (the optimizer's `frozen` patterns name it).
        pos_embed = self.param(
            "pos_embed",
            layers.partitioned(
                lambda *_: jnp.asarray(sincos_2d(int(big_m**0.5), cfg.width), self.param_dtype),
                ("queries", "embed"),
            ),
            (big_m, cfg.width),
        )
        ln = lambda name: layers.layer_norm(cfg.layer_norm_eps, name=name, **kw)  # noqa: E731
        q = ln("ln_q")((query[:n] + pos_embed[:n]).astype(self.dtype))[None]
        k = ln("ln_k")(resize_grid_torch_bicubic(pos_embed, self.grid_size).astype(self.dtype))[None]
        v = ln("ln_v")(features.astype(self.dtype))
        out = layers.Attention(
            num_heads=cfg.num_heads, head_dim=cfg.width // cfg.num_heads, out_features=cfg.width,
            use_bias=True, name="attn", **kw,
        )(q, k, v)
        out = layers.dense(self.out_width, ("embed", "llm_embed"), name="proj", **kw)(out)
        return layers.constrain(out, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))


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


class QFormer(nn.Module):
    """L layers of [query self-attention | cross-attention to image features | MLP].

    The self-attention honours each image's m (`config.query_mask`, see splice.query_mask)."""

    config: QueryTransformerConfig
    out_width: int
    grid_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "nothing_saveable"

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


class MLPProjector(nn.Module):
    """LLaVA-1.5's `mlp2x_gelu` projector (Linear, exact GELU, Linear): every patch becomes a
    token, M = the number of patches, and nothing depends on m (the LLM sees all M)."""

    config: QueryTransformerConfig
    out_width: int
    grid_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "nothing_saveable"  # unused: nothing repeats

    @nn.compact
    def __call__(self, features, m=None, num_queries: int | None = None):
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        x = features[:, :num_queries or features.shape[1]].astype(self.dtype)
        x = layers.dense(self.out_width, ("embed", "llm_embed"), name="fc1", **kw)(x)
        x = jax.nn.gelu(x, approximate=False)  # torch nn.GELU()
        x = layers.dense(self.out_width, ("embed", "llm_embed"), name="fc2", **kw)(x)
        return layers.constrain(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))


VARIANTS = {"official": OfficialResampler, "qformer": QFormer, "mlp2x_gelu": MLPProjector}


def QueryTransformer(config: QueryTransformerConfig, **kwargs) -> nn.Module:
    """The variant that `config.variant` names."""
    return VARIANTS[config.variant](config, **kwargs)
