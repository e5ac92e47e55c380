"""The vision-language model: vision tower -> query transformer -> splice -> LLM."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mqt_jax import splice
from mqt_jax.config import ModelConfig
from mqt_jax.models.llama import Llama
from mqt_jax.models.query_transformer import QueryTransformer
from mqt_jax.models.vision_tower import VisionTower


class VisionLanguageModel(nn.Module):
    config: ModelConfig

    def setup(self):
        cfg = self.config
        kw = dict(
            dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
            remat_policy=cfg.remat_policy,
        )
        self.vision_tower = VisionTower(cfg.vision, **kw)
        self.query_transformer = QueryTransformer(
            cfg.query, out_width=cfg.llm.hidden, grid_size=cfg.vision.grid_size, **kw
        )
        self.llm = Llama(cfg.llm, **kw)

    def visual_tokens(self, images, m, num_queries: int | None = None):
        """images [N, H, W, 3], m [N] -> all M visual tokens [N, M, hidden] (or, with a static
        `num_queries=n`, the really truncated computation's n tokens)."""
        return self.query_transformer(self.vision_tower(images), m, num_queries)

    def embed(self, images, m, token_ids, visual_index):
        """The LLM's input embeddings [B, T, hidden]: text embeddings with visual tokens
        spliced in where visual_index >= 0."""
        b, i = m.shape
        tokens = self.visual_tokens(images.reshape((b * i,) + images.shape[2:]), m.reshape(-1))
        tokens = tokens.reshape(b, i * tokens.shape[1], tokens.shape[2])
        return splice.splice(self.llm.embed(token_ids), tokens, visual_index)

    def __call__(self, images, m, token_ids, visual_index, positions, segment_ids):
        """images [B, I, H, W, 3], m [B, I]; the rest [B, T] from splice.layout_rows.
        Returns logits [B, T, vocab]."""
        return self.llm(self.embed(images, m, token_ids, visual_index), positions, segment_ids)

    def prefill(self, images, m, token_ids, visual_index, positions, segment_ids, cache_len):
        """Prompts (one per row, right-padded) -> (logits, KV cache); see Llama.prefill."""
        x = self.embed(images, m, token_ids, visual_index)
        return self.llm.prefill(x, positions, segment_ids, cache_len)

    def decode(self, token_ids, cache):
        return self.llm.decode(token_ids, cache)

    def logits(self, batch: dict) -> jax.Array:
        """__call__ on a batch dict (the pipeline's and splice.layout_rows' keys)."""
        return self(*(batch[k] for k in MODEL_INPUTS))


MODEL_INPUTS = ("images", "m", "token_ids", "visual_index", "positions", "segment_ids")
