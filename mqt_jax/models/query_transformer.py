"""Matryoshka query transformer: patch features -> M visual tokens at the LLM width.

Both variants always return all M tokens; which of them the LLM sees is decided by
`mqt_jax.splice` from m. `num_queries=n` (a Python int) instead builds the really truncated
computation with only the first n queries: the reference that the masked graph must equal.
"""

from __future__ import annotations

import math

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


class Compressor(nn.Module):
    """What every compressor is built with: patch features -> tokens at `out_width`."""

    config: QueryTransformerConfig
    out_width: int  # the LLM's width
    grid_size: int  # patch grid of the vision tower (24 for ViT-L/14 at 336 px)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "nothing_saveable"  # for the repeated layers (qformer)


class OfficialResampler(Compressor):
    """The released MQT-LLaVA resampler (shared/reference/mqt.md), one cross-attention:
    q = ln_q(query + pos_embed), k = ln_k(pos_embed resized to the patch grid), v = ln_v(x),
    tokens = attn(q, k, v) @ proj. Token i does not depend on m."""

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


class QFormer(Compressor):
    """L layers of [query self-attention | cross-attention to image features | MLP].

    The self-attention honours each image's m (`config.query_mask`, see splice.query_mask)."""

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


def mlp2x_gelu(x, out_width: int, kw: dict):
    """LLaVA-1.5's projector (Linear, exact GELU as torch nn.GELU, Linear), its parameters
    fc1 / fc2 created in the calling module."""
    kw = dict(use_bias=True, **kw)
    x = layers.dense(out_width, ("embed", "llm_embed"), name="fc1", **kw)(x)
    x = jax.nn.gelu(x, approximate=False)
    x = layers.dense(out_width, ("embed", "llm_embed"), name="fc2", **kw)(x)
    return layers.constrain(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))


class MLPProjector(Compressor):
    """LLaVA-1.5's `mlp2x_gelu` projector: every patch becomes a token, M = the number of
    patches, and nothing depends on m (the LLM sees all M)."""

    @nn.compact
    def __call__(self, features, m=None, num_queries: int | None = None):
        x = features[:, :num_queries or features.shape[1]].astype(self.dtype)
        return mlp2x_gelu(x, self.out_width, dict(dtype=self.dtype, param_dtype=self.param_dtype))


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] averaging matrix of torch's adaptive_avg_pool along one axis: cell
    i averages inputs floor(i * in / out) .. ceil((i + 1) * in / out) - 1."""
    matrix = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        lo, hi = (i * in_size) // out_size, -(-(i + 1) * in_size // out_size)
        matrix[i, lo:hi] = 1.0 / (hi - lo)
    return matrix


def pool_grid(features: jax.Array, grid_size: int, out_grid: int) -> jax.Array:
    """[N, grid**2, D] patch features -> [N, out_grid**2, D], adaptively average-pooled
    (separable: a 2-D adaptive average is the row average of the column averages)."""
    w = jnp.asarray(adaptive_pool_matrix(grid_size, out_grid), features.dtype)
    grid = features.reshape(features.shape[0], grid_size, grid_size, -1)
    pooled = jnp.einsum("ih,nhwd,jw->nijd", w, grid, w, precision="highest")
    return pooled.reshape(features.shape[0], out_grid * out_grid, -1)


class AvgPoolProjector(Compressor):
    """The patch grid pooled to the smallest square grid of at least M cells, the first M
    cells (row-major) kept, then the mlp2x_gelu projector."""

    @nn.compact
    def __call__(self, features, m=None, num_queries: int | None = None):
        big_m = self.config.num_queries
        side = math.isqrt(big_m - 1) + 1  # the smallest side with side**2 >= M
        x = pool_grid(features.astype(self.dtype), self.grid_size, side)[:, :big_m]
        return mlp2x_gelu(x, self.out_width, dict(dtype=self.dtype, param_dtype=self.param_dtype))


class VictorProjector(Compressor):
    """Victor's visual input: the mlp2x_gelu projector's patch tokens, then M = R learnable
    registers in the LLM's input-embedding space (the same for every image; initialised like
    token embeddings, normal(0.02)). The LLM drops the patch tokens at `drop_layer`."""

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


def windows(grid: jax.Array, side: int) -> jax.Array:
    """[N, G, G, D] -> [N, side**2, (G / side)**2, D]: window (i, j) of the side x side
    grid of windows holds its s x s cells (s = G / side), row-major both times."""
    n, g, _, d = grid.shape
    s = g // side
    x = grid.reshape(n, side, s, side, s, d).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, side * side, s * s, d)


class QueCC(Compressor):
    """QueCC (shared/reference/baselines.md), in the vision width d:
    text = LN(Linear(guidance)) is added to every patch feature x; queries = depthwise
    s x s convolution with stride s over LN(MLP(x + text)) on the grid: (G / s)**2 = M;
    keys / values = LN(MLP(multi-layer features)); each query attends only to the s x s patches
    under its window (no residual, no FFN); then the mlp2x_gelu projector."""

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


VARIANTS = {"official": OfficialResampler, "qformer": QFormer, "mlp2x_gelu": MLPProjector,
            "avgpool": AvgPoolProjector, "victor": VictorProjector, "quecc": QueCC}


def QueryTransformer(config: QueryTransformerConfig, **kwargs) -> nn.Module:
    """The variant that `config.variant` names."""
    return VARIANTS[config.variant](config, **kwargs)
