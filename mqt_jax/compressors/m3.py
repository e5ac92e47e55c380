"""M3, Matryoshka Multimodal Models (shared/reference/baselines.md): LLaVA-1.5's projector on
every patch, then the projected grid average-pooled to a nested scale (kernel = stride =
grid / sqrt(m)): m in {1, 9, 36, 144, 576} for a 24 x 24 grid. One model serves every scale,
as MQT does, but token i of scale m is not token i of another scale (pooling windows differ)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from mqt_jax.compressors.avgpool import pool_grid
from mqt_jax.compressors.base import Compressor, register
from mqt_jax.compressors.mlp2x_gelu import mlp2x_gelu, read_projector
from mqt_jax.core import flops


def scales(grid_size: int, configured: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The token counts M3 serves on a grid x grid patch grid: `configured`, or every square
    s * s whose side s divides the grid, ascending."""
    if configured:
        return tuple(sorted(configured))
    return tuple(s * s for s in range(1, grid_size + 1) if grid_size % s == 0)


def bad_scales(scales, grid: int) -> list[int]:
    """Those of `scales` that are not squares whose side divides the grid."""
    return [s for s in scales if s < 1 or math.isqrt(s) ** 2 != s or grid % math.isqrt(s)]


@register("m3")
class M3(Compressor):
    """Tokens [N, M, D] (M = the largest scale, the whole grid): row n's first m_n tokens are
    its grid pooled to sqrt(m_n) x sqrt(m_n) cells, row-major; `splice` shows the LLM those
    and nothing after them. Every scale is pooled in the graph and each row keeps its own:
    m is data (one compiled graph for every mix of scales)."""

    elastic = True
    checkpoint_kind = "m3"

    @nn.compact
    def __call__(self, features, m, num_queries: int | None = None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = mlp2x_gelu(features.astype(self.dtype), self.out_width, kw)  # [N, grid**2, D]
        g = self.grid_size
        if num_queries is not None:  # really truncated: only this scale exists
            return pool_grid(x, g, math.isqrt(num_queries))
        out = jnp.zeros_like(x)
        for s in scales(g, self.config.scales):
            pooled = pool_grid(x, g, math.isqrt(s))
            padded = jnp.pad(pooled, ((0, 0), (0, x.shape[1] - s), (0, 0)))
            out = jnp.where((m == s)[:, None, None], padded, out)
        return out

    @classmethod
    def valid_m(cls, model):
        return scales(model.vision.grid_size, model.query.scales)

    @classmethod
    def check(cls, model):
        q, g = model.query, model.vision.grid_size
        if q.num_queries != g * g:
            raise ValueError(f"m3 pools the projected patch grid: QueryTransformerConfig."
                             f"num_queries={q.num_queries} != {g * g} patches")
        bad = bad_scales(q.scales, g)
        if bad:
            raise ValueError(f"m3: QueryTransformerConfig.scales {bad} are not squares whose "
                             f"side divides the {g} x {g} patch grid")

    @classmethod
    def flops(cls, model, m, text_tokens):
        """The projector on every patch, then the pooling to m tokens (an add per patch)."""
        v = model.vision
        return {"projector": flops.mlp2x_flops(v.num_patches, v.width, model.llm.hidden)
                + v.num_patches * model.llm.hidden}

    @classmethod
    def checkpoint(cls, folder, vision, hidden, source, *, config: dict, **_):
        """The released llava-v1.5-7b-m3 folder has LLaVA-1.5's layout: its projector, and the
        scales it was trained on (`matryoshka_vis_token_scale`: "1,9,36,144,576", a list or
        one number), which it then serves; without them every square the grid allows."""
        fields, rules = read_projector(cls.variant, folder, vision, hidden, source, config)
        trained = config.get("matryoshka_vis_token_scale")
        if trained is not None:
            parts = trained.split(",") if isinstance(trained, str) else (
                trained if isinstance(trained, list) else [trained])
            try:
                fields["scales"] = tuple(sorted({int(str(p).strip()) for p in parts}))
            except ValueError:
                raise ValueError(f"{source}: matryoshka_vis_token_scale {trained!r} is not a "
                                 f"list of token counts") from None
            bad = bad_scales(fields["scales"], vision.grid_size)
            if bad:
                raise ValueError(f"{source}: matryoshka_vis_token_scale scales {bad} are not "
                                 f"squares whose side divides the {vision.grid_size} x "
                                 f"{vision.grid_size} patch grid")
        return fields, rules
