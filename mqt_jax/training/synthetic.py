"""Random synthetic batches: a learnable stand-in for real data (the data pipeline's issue).

Each image is one of `num_classes` colour patterns plus noise; the conversation asks about it
and the answer names its class, so the loss can only fall if visual tokens carry the image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mqt_jax.config import ModelConfig, MSampler
from mqt_jax.core import splice

if TYPE_CHECKING:
    from mqt_jax.config import TrainConfig

PROMPT_LEN, ANSWER_LEN = 6, 4


def synthetic_batch(
    model_config: ModelConfig,
    sampler: MSampler,
    *,
    batch_size: int,
    seq_len: int,
    step: int,
    seed: int = 0,
    num_classes: int = 8,
) -> dict[str, np.ndarray]:
    """A batch (the keys of splice.BATCH_KEYS) that is a deterministic function of (seed, step)."""
    vocab, size = model_config.llm.vocab_size, model_config.vision.image_size
    if vocab < 2 + num_classes * ANSWER_LEN:
        raise ValueError(f"vocab_size={vocab} is too small for the synthetic task")
    copies = sampler.copies(model_config.num_queries)  # MSampler "all": one row per scale
    if copies > batch_size:
        raise ValueError(f"MSampler 'all' needs {copies} rows per example: batch_size={batch_size}")
    n = batch_size // copies
    rng = np.random.default_rng([seed, step, 1])
    classes = rng.integers(num_classes, size=n)
    palette = np.random.default_rng([seed, 2]).normal(size=(num_classes, 3)).astype(np.float32)
    images = np.zeros((batch_size, 1, size, size, 3), np.float32)
    images[:n * copies] = np.repeat(palette[classes][:, None, None, None, :] + 0.5 * rng.normal(
        size=(n, 1, size, size, 3)).astype(np.float32), copies, axis=0)
    rows = []
    for c in classes:
        prompt = rng.integers(2, vocab, size=PROMPT_LEN).tolist()
        answer = (2 + c * ANSWER_LEN + np.arange(ANSWER_LEN)).tolist()
        tokens = [1] + prompt[:3] + [splice.IMAGE_TOKEN] + prompt[3:] + answer
        labels = [splice.IGNORE] * (len(tokens) - len(answer)) + answer
        rows += [[splice.Example(tokens, labels)]] * copies
    rows += [[] for _ in range(batch_size - len(rows))]
    m = np.ones((batch_size, 1), np.int32)  # rows left empty: any valid m, never gathered
    draws = sampler.sample(model_config.num_queries, (n, 1), seed, step)
    m[:n * copies] = draws.transpose(1, 0, 2).reshape(-1, 1) if draws.ndim == 3 else draws
    return {"images": images, "m": m, **splice.layout_rows(rows, m, model_config.num_queries, seq_len)}


class SyntheticBatches:
    """synthetic_batch as a checkpointable iterator (its state is the step). Every process
    makes the same global batch and keeps its own rows, so the global batch does not depend
    on the number of processes."""

    def __init__(self, model_config: ModelConfig, config: TrainConfig, sampler: MSampler,
                 rows: slice = slice(None)):
        self.model_config, self.config, self.sampler, self.rows = model_config, config, sampler, rows
        self.step, self.skipped = 0, {}

    def __next__(self):
        batch = synthetic_batch(self.model_config, self.sampler, batch_size=self.config.batch_size,
                                seq_len=self.config.seq_len, step=self.step, seed=self.config.seed)
        self.step += 1
        return {k: v[self.rows] for k, v in batch.items()}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = state["step"]
