"""The released MQT-LLaVA resampler (shared/reference/mqt.md): one cross-attention of M
learned queries over the patch grid, whose keys are positions only."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mqt_jax.compressors.base import Compressor, register
from mqt_jax.core.hf import Rule, linear, norm
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


@register("official")
class OfficialResampler(Compressor):
    """q = ln_q(query + pos_embed), k = ln_k(pos_embed resized to the patch grid), v = ln_v(x),
    tokens = attn(q, k, v) @ proj. Token i does not depend on m."""

    elastic = True
    square_queries = True
    vision_width = True
    cross_attention_path = ("attn", "weights")
    checkpoint_kind = "mqt-llava"

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

    @classmethod
    def nested(cls, query) -> bool:
        return True

    @classmethod
    def initialized(cls, params, query):
        """local_init s > 0: the key projection starts as s x the query projection. The keys
        are the grid positions and the queries start near theirs (query + pos_embed, query
        small), so query i first attends near its own grid place: each token starts as a
        distinct local summary, not the near-uniform average a random init gives."""
        if not query.local_init:
            return params
        attn = params["query_transformer"]["attn"]
        key, q = attn["key"]["kernel"], attn["query"]["kernel"]
        tied = query.local_init * nn.meta.unbox(q)
        key = key.replace_boxed(tied) if isinstance(key, nn.meta.AxisMetadata) else tied
        attn = {**attn, "key": {**attn["key"], "kernel": key}}
        return {**params, "query_transformer": {**params["query_transformer"], "attn": attn}}

    @classmethod
    def flops(cls, model, m, text_tokens):
        return {"query": resampler_flops(model.query, model.vision, model.llm.hidden, m)}

    @classmethod
    def checkpoint(cls, folder, vision, hidden, source, *, resampler_heads: int, **_):
        """resampler_heads: not in the released config.json (16 there)."""
        query_key = "model.query_abstractor.query"
        if query_key not in set(folder.keys()):
            raise ValueError(f"{source}: no MQT resampler (no {query_key})")
        shape = folder.shape(query_key)
        if len(shape) != 2:
            raise ValueError(f"{source}: {query_key} is {list(shape)}; the released resampler's "
                             f"is [queries, width]")
        big_m, width = shape
        if width != vision.width:  # the released resampler attends over the tower's features
            raise ValueError(f"{source}: the resampler is {width} wide ({query_key} {list(shape)}) "
                             f"but the vision tower {vision.width}; they must match")
        if resampler_heads < 1 or width % resampler_heads:
            raise ValueError(f"--resampler_heads {resampler_heads} does not divide the "
                             f"resampler's width {width}")
        fields = dict(variant=cls.variant, num_queries=big_m, width=width, num_heads=resampler_heads)
        return fields, resampler_rules(big_m, width, hidden, "model.query_abstractor.")


def resampler_flops(q, v, llm_hidden: int, queries: int) -> float:
    """The resampler on one image, computing `queries` tokens (M in the single graph, m when
    really truncated): query, key (from the fixed positions) and value projections, attention,
    then the output and LLM projections. (The query and key projections, and the bicubic
    resize of the M positions to the patch grid, do not depend on the image: a batch computes
    them once.)"""
    p, w = v.num_patches, q.width
    projections = 2 * queries * w * w + 2 * p * w * w * 2 + 2 * queries * w * w
    resize = 2 * p * q.num_queries * w
    return resize + projections + 4 * queries * p * w + 2 * queries * w * llm_hidden


def resampler_rules(big_m: int, d: int, hidden: int, p: str) -> list[Rule]:
    """The released resampler's tensors (M queries of width d): torch MultiheadAttention's
    packed in_proj splits into our query / key / value; `proj` is stored [in, out] (x @ proj)."""
    ours = "query_transformer/"
    rules = [Rule(p + "query", (big_m, d), ours + "query"),
             Rule(p + "pos_embed", (big_m, d), ours + "pos_embed"),
             Rule(p + "proj", (d, hidden), ours + "proj/kernel")]
    for j, name in enumerate(("query", "key", "value")):
        rows = (j * d, (j + 1) * d)
        rules += [Rule(p + "attn.in_proj_weight", (3 * d, d), f"{ours}attn/{name}/kernel",
                       layout="linear", rows=rows),
                  Rule(p + "attn.in_proj_bias", (3 * d,), f"{ours}attn/{name}/bias", rows=rows)]
    rules += linear(p + "attn.out_proj", d, d, ours + "attn/out")
    for name in ("ln_q", "ln_k", "ln_v"):
        rules += norm(p + name, d, ours + name)
    return rules
