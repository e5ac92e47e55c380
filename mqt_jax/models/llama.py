"""LLaMA decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, untied output head.

Takes input embeddings (so visual tokens can be spliced in), explicit position ids and
segment ids: a position attends to earlier positions of its own segment only, which also
keeps packed examples apart.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mqt_jax.config import LLMConfig
from mqt_jax.models import layers
from mqt_jax.models.layers import ACT_BATCH, ACT_EMBED, ACT_LENGTH


def causal_segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, T, T] bool: key j is visible from query i iff j <= i and same segment."""
    t = segment_ids.shape[-1]
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


class DecoderLayer(nn.Module):
    config: LLMConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, mask, positions, cache=None):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.RMSNorm(cfg.rms_norm_eps, name="attn_norm", **kw)(x)
        attended = layers.Attention(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            out_features=cfg.hidden, rope_theta=cfg.rope_theta, name="attn", **kw,
        )(h, h, mask=mask, positions=positions, cache=cache)
        if cache is not None:
            attended, cache = attended
        x = x + attended
        h = layers.RMSNorm(cfg.rms_norm_eps, name="mlp_norm", **kw)(x)
        x = x + layers.MLP(
            cfg.mlp_dim, cfg.hidden, activation=jax.nn.silu, gated=True, use_bias=False,
            name="mlp", **kw,
        )(h)
        return layers.constrain(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED)), cache


class Llama(nn.Module):
    config: LLMConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "nothing_saveable"

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embedding = self.param(
            "embedding", layers.partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden), self.param_dtype,
        )
        blocks = layers.scan_blocks(DecoderLayer, cfg.num_layers, self.remat_policy, 2, 1)
        self.layers = blocks(cfg, **kw)
        self.final_norm = layers.RMSNorm(cfg.rms_norm_eps, **kw)
        self.lm_head = layers.dense(cfg.vocab_size, ("embed", "vocab"), init_std=0.02, **kw)

    def embed(self, token_ids: jax.Array) -> jax.Array:
        # Gather the table's fsdp-sharded hidden axis first (as FSDP does for every weight):
        # looked up from a hidden-sharded table, activations would clash with the batch layout.
        table = layers.constrain(self.embedding.astype(self.dtype), ("vocab", None))
        x = jnp.take(table, token_ids, axis=0)
        return layers.constrain(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))

    def __call__(self, embeddings, positions, segment_ids):
        """embeddings [B, T, hidden], positions / segment_ids [B, T] -> logits [B, T, vocab]."""
        if self.is_initializing():  # `init` through here must create the embedding table too
            self.embed(jnp.zeros((1, 1), jnp.int32))
        return self._run(embeddings, causal_segment_mask(segment_ids), positions, None)[0]

    def _run(self, embeddings, mask, positions, cache):
        x = layers.constrain(embeddings.astype(self.dtype), (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
        x, cache = self.layers(x, mask, positions, cache)
        logits = self.lm_head(self.final_norm(x))
        return layers.constrain(logits, (ACT_BATCH, ACT_LENGTH, "activation_vocab")), cache

    def prefill(self, embeddings, positions, segment_ids, cache_len: int):
        """Run right-padded prompts (one per row; segment_ids 1 on the prompt, 0 after) and
        return (logits [B, T, vocab], a KV cache of `cache_len` slots whose per-row index is
        the prompt's length: decoding continues right after each row's last real token)."""
        b, t = segment_ids.shape
        cfg, n = self.config, self.config.num_layers
        shape = (n, b, cache_len, cfg.num_kv_heads, cfg.head_dim)
        cache = {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype),
                 "index": jnp.zeros((n, b), jnp.int32)}
        padded = jnp.pad(segment_ids, ((0, 0), (0, cache_len - t)))
        mask = causal_segment_mask(padded)[:, :, :t]  # [B, 1, T, S]
        logits, cache = self._run(embeddings, mask, positions, cache)
        lengths = (segment_ids > 0).sum(1).astype(jnp.int32)
        return logits, {**cache, "index": jnp.broadcast_to(lengths, (n, b))}

    def decode(self, token_ids, cache):
        """One token per row [B, 1] at its row's cache index -> (logits [B, 1, vocab], cache)."""
        index = cache["index"][0]  # [B]: the slot this token goes to (= its position)
        slots = cache["k"].shape[2]
        mask = (jnp.arange(slots)[None, :] <= index[:, None])[:, None, None, :]
        return self._run(self.embed(token_ids), mask, index[:, None], cache)
