"""The patch grid adaptively average-pooled to M cells, then the mlp2x_gelu projector."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mqt_jax.compressors.base import Compressor, register
from mqt_jax.compressors.mlp2x_gelu import mlp2x_gelu
from mqt_jax.core import flops


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


@register("avgpool")
class AvgPoolProjector(Compressor):
    """Pooled to the smallest square grid of at least M cells, the first M cells (row-major)
    kept; one model per token budget."""

    @nn.compact
    def __call__(self, features, m=None, num_queries: int | None = None):
        big_m = self.config.num_queries
        side = math.isqrt(big_m - 1) + 1  # the smallest side with side**2 >= M
        x = pool_grid(features.astype(self.dtype), self.grid_size, side)[:, :big_m]
        return mlp2x_gelu(x, self.out_width, dict(dtype=self.dtype, param_dtype=self.param_dtype))

    @classmethod
    def check(cls, model):
        q, patches = model.query, model.vision.num_patches
        if q.num_queries > patches:
            raise ValueError(f"avgpool: QueryTransformerConfig.num_queries={q.num_queries} is "
                             f"more than the {patches} patches it pools")

    @classmethod
    def flops(cls, model, m, text_tokens):
        v = model.vision
        return {"projector": 2 * v.num_patches * v.width  # the pooling
                + flops.mlp2x_flops(m, v.width, model.llm.hidden)}
