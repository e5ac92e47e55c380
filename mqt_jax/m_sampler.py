"""How many visual tokens each training example keeps: the m sampler of the input pipeline.

Draws are stateless functions of (seed, *keys) (e.g. the step, or an example's index), so a
resumed run draws exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses

import gin
import numpy as np

PAPER_TOKEN_COUNTS = (2, 4, 8, 16, 36, 64, 144, 256)
DISTRIBUTIONS = ("official", "log_uniform", "fixed_set", "constant", "all")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MSampler:
    """distribution:
    - "official": uniform over the even values 2, 4, ..., M (MQT-LLaVA stage 2);
    - "log_uniform": log m uniform on [log 1, log (M+1)), floored: small m drawn more often;
    - "fixed_set": uniform over `values` (those <= M);
    - "constant": always `constant` (None = M; MQT-LLaVA stage 1);
    - "all": every one of `values` (those <= M) for every example, M3's training rule: the
      pipeline trains each example once per scale, its copies in the same batch, so the
      token-mean loss is the mean over scales of each scale's loss.
    per: "example" (one draw per image) or "batch" (one draw shared by the whole batch).
    """

    distribution: str = "official"
    values: tuple[int, ...] = PAPER_TOKEN_COUNTS
    constant: int | None = None
    per: str = "example"

    def __post_init__(self):
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"MSampler.distribution={self.distribution!r}: expected one of {DISTRIBUTIONS}"
            )
        if self.per not in ("example", "batch"):
            raise ValueError(f"MSampler.per={self.per!r}: expected 'example' or 'batch'")
        if self.distribution == "all" and self.per == "batch":
            raise ValueError("MSampler.distribution='all' trains every scale per example; "
                             "per='batch' draws one m per batch: choose one")

    def support(self, num_queries: int) -> np.ndarray:
        """The values m can take for a query transformer of M = num_queries."""
        if self.distribution == "official":
            values = np.arange(2, num_queries + 1, 2)
        elif self.distribution == "log_uniform":
            values = np.arange(1, num_queries + 1)
        elif self.distribution == "fixed_set":
            values = np.array([v for v in self.values if 1 <= v <= num_queries])
        elif self.distribution == "all":
            values = np.array(sorted({v for v in self.values if 1 <= v <= num_queries}))
        else:
            values = np.array([num_queries if self.constant is None else self.constant])
        if values.size == 0 or values.min() < 1 or values.max() > num_queries:
            raise ValueError(
                f"MSampler({self.distribution}, values={self.values}, constant={self.constant}) "
                f"has no valid m in [1, {num_queries}]"
            )
        return values

    def copies(self, num_queries: int) -> int:
        """How many times each example is trained per step: one, or one per scale ("all")."""
        return len(self.support(num_queries)) if self.distribution == "all" else 1

    def sample(self, num_queries: int, shape: tuple[int, ...], seed: int, *keys: int) -> np.ndarray:
        """int32 array of `shape`, a deterministic function of (seed, *keys); with "all",
        [copies, *shape]: copy k at the k-th scale."""
        values = self.support(num_queries)
        if self.distribution == "all":
            return np.broadcast_to(values.astype(np.int32).reshape((-1,) + (1,) * len(shape)),
                                   (len(values), *shape)).copy()
        rng = np.random.default_rng([seed, *keys])
        draw_shape = shape if self.per == "example" else ()
        if self.distribution == "log_uniform":
            m = np.floor(np.exp(rng.uniform(0.0, np.log(num_queries + 1), draw_shape)))
            m = np.clip(m, 1, num_queries)
        else:
            m = rng.choice(values, draw_shape)
        return np.broadcast_to(np.asarray(m, np.int32), shape).copy()
