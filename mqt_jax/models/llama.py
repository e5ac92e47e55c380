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
from mqt_jax.models.attention import CausalSegments
from mqt_jax.models.layers import ACT_BATCH, ACT_EMBED, ACT_LENGTH


def decoder_block(cfg: LLMConfig, kw: dict, x, mask, positions, cache, attention: str = "xla"):
    """One pre-norm LLaMA layer (its parameters created in the calling module). mask None:
    decoding, where each layer's own cache index says which slots its token sees."""
    if mask is None and "layer" not in cache:  # (a whole-stack cache masks by its index)
        slots = cache["k"].shape[1]
        mask = (jnp.arange(slots)[None, :] <= cache["index"][:, None])[:, None, None, :]
    h = layers.RMSNorm(cfg.rms_norm_eps, name="attn_norm", **kw)(x)
    attended = layers.Attention(
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        out_features=cfg.hidden, rope_theta=cfg.rope_theta, lora=cfg.lora, attention=attention,
        name="attn", **kw,
    )(h, h, mask=mask, positions=positions, cache=cache)
    if cache is not None:
        attended, cache = attended
    x = x + attended
    h = layers.RMSNorm(cfg.rms_norm_eps, name="mlp_norm", **kw)(x)
    x = x + layers.MLP(
        cfg.mlp_dim, cfg.hidden, activation=jax.nn.silu, gated=True, use_bias=False,
        lora=cfg.lora, name="mlp", **kw,
    )(h)
    return layers.constrain(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED)), cache


class DecoderLayer(nn.Module):
    config: LLMConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention: str = "xla"

    @nn.compact
    def __call__(self, x, mask, positions, cache=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return decoder_block(self.config, kw, x, mask, positions, cache, self.attention)


class DroppingDecoderLayer(nn.Module):
    """Victor's layer (the same parameters as DecoderLayer): layers before `drop_layer` run on
    the whole sequence `full`; the last of them also gathers the surviving positions into the
    compacted sequence `kept`, which the later layers run on alone (a conditional, so only
    one branch computes: the dropped tokens cost nothing after the drop)."""

    config: LLMConfig
    drop_layer: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention: str = "xla"

    @nn.compact
    def __call__(self, carry, ctx, layer, cache=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def early(_, carry, cache):
            full, kept = carry
            full, cache = decoder_block(self.config, kw, full, ctx["mask"], ctx["positions"], cache,
                                        self.attention)
            gathered = jnp.take_along_axis(full, ctx["kept_index"][..., None], axis=1)
            kept = jnp.where(layer == self.drop_layer - 1, gathered, kept)
            return (full, kept), cache

        def late(_, carry, cache):
            full, kept = carry
            kept, cache = decoder_block(self.config, kw, kept, ctx["kept_mask"],
                                        ctx["kept_positions"], cache, self.attention)
            return (full, kept), cache

        return nn.cond(layer < self.drop_layer, early, late, self, carry, cache)


def compaction(dropped: jax.Array, segment_ids: jax.Array, kept_len: int):
    """The positions that survive a drop, in order, as a static-length index: (index [B, K],
    valid [B, K]: False on the slots after a row's last survivor). Padding never survives."""
    survives = (segment_ids > 0) & ~dropped
    index = jnp.argsort(~survives, axis=1, stable=True)[:, :kept_len].astype(jnp.int32)
    valid = jnp.arange(kept_len)[None, :] < survives.sum(1, keepdims=True)
    return index, valid


def unpack(y: jax.Array, placement, length: int) -> jax.Array:
    """Per-survivor values [B, K, ...] back at their positions [B, length, ...], zeros at the
    dropped ones (identity without a drop, placement None)."""
    if placement is None:
        return y
    index, valid = placement
    rows = jnp.arange(y.shape[0])[:, None]
    zeros = jnp.zeros((y.shape[0], length) + y.shape[2:], y.dtype)
    return zeros.at[rows, index].set(jnp.where(valid.reshape(valid.shape + (1,) * (y.ndim - 2)), y, 0))


class Llama(nn.Module):
    """`drop_layer` > 0 (Victor): positions marked `dropped` leave the sequence at that layer;
    the rest run on, compacted to `kept_len` slots (a static shape: one graph)."""

    config: LLMConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "nothing_saveable"
    drop_layer: int = 0
    attention: str = "xla"  # the kernel of training and prefill attention (models/attention.py)

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embedding = self.param(
            "embedding", layers.partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden), self.param_dtype,
        )
        if self.drop_layer:
            blocks = layers.scan_blocks(DroppingDecoderLayer, cfg.num_layers, self.remat_policy, 1, 2)
            self.layers = blocks(cfg, self.drop_layer, attention=self.attention, **kw)
        else:
            blocks = layers.scan_blocks(DecoderLayer, cfg.num_layers, self.remat_policy, 2, 1)
            self.layers = blocks(cfg, attention=self.attention, **kw)
        self.final_norm = layers.RMSNorm(cfg.rms_norm_eps, **kw)
        self.lm_head = layers.dense(cfg.vocab_size, ("embed", "vocab"), init_std=0.02, **kw)

    def embed(self, token_ids: jax.Array) -> jax.Array:
        # Gather the table's fsdp-sharded hidden axis first (as FSDP does for every weight):
        # looked up from a hidden-sharded table, activations would clash with the batch layout.
        table = layers.constrain(self.embedding.astype(self.dtype), ("vocab", None))
        x = jnp.take(table, token_ids, axis=0)
        return layers.constrain(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))

    def __call__(self, embeddings, positions, segment_ids, dropped=None, kept_len=None):
        """embeddings [B, T, hidden], positions / segment_ids [B, T] -> logits [B, T, vocab].
        Victor: `dropped` [B, T] bool and the static `kept_len`; the dropped positions' logits
        are 0."""
        if self.is_initializing():  # `init` through here must create the embedding table too
            self.embed(jnp.zeros((1, 1), jnp.int32))
        x, _, placement = self._layers(embeddings, positions, segment_ids, None, dropped, kept_len)
        return unpack(self._logits(x), placement, segment_ids.shape[1])

    def hidden_states(self, embeddings, positions, segment_ids):
        """The last layer's normalised hidden states [B, T, hidden] (QueCC's text guidance)."""
        x, _, _ = self._layers(embeddings, positions, segment_ids, None)
        return self.final_norm(x)

    def _logits(self, x):
        logits = self.lm_head(self.final_norm(x))
        return layers.constrain(logits, (ACT_BATCH, ACT_LENGTH, "activation_vocab"))

    def _layers(self, embeddings, positions, segment_ids, cache, dropped=None, kept_len=None,
                start=None):
        """Every layer over right-padded rows; with a cache of S slots, their keys and values
        go to slots 0.. (or, given `start` [B], to slots start.., after what the cache holds)
        and each layer's index to its row's length (prefill). Returns (the last layer's
        states, cache, placement): states [B, T, hidden] and placement None, or, with a drop,
        the survivors' states [B, K, hidden] and their (index, valid) for `unpack`."""
        x = layers.constrain(embeddings.astype(self.dtype), (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
        slots = segment_ids.shape[1] if cache is None else cache["k"].shape[2]
        n, lengths = self.config.num_layers, (segment_ids > 0).sum(1).astype(jnp.int32)
        if start is None:
            mask = self._mask(segment_ids, slots)
        else:  # chunk token t of a row sees the slots up to its own, start + t
            seen = start[:, None] + jnp.arange(segment_ids.shape[1])[None, :]
            mask = (jnp.arange(slots)[None, None, :] <= seen[:, :, None])[:, None]
            cache = dict(cache, index=jnp.broadcast_to(start, (n, x.shape[0])))
            lengths = lengths + start
        if not self.drop_layer:
            x, cache = self.layers(x, mask, positions, cache)
            if cache is not None:
                cache["index"] = jnp.broadcast_to(lengths, (n, x.shape[0]))
            return x, cache, None
        if start is not None:
            raise ValueError("a cache of an LLM that drops visual tokens cannot be extended")
        if dropped is None or kept_len is None:
            raise ValueError("this LLM drops visual tokens at a layer: give `dropped` and `kept_len`")
        index, valid = compaction(dropped, segment_ids, kept_len)
        take = lambda a: jnp.take_along_axis(a, index, axis=1)  # noqa: E731
        kept_segments = jnp.where(valid, take(segment_ids), 0)
        ctx = {"mask": mask, "positions": positions, "kept_index": index,
               "kept_mask": self._mask(kept_segments, kept_len if cache is None else slots),
               "kept_positions": take(positions)}
        kept = jnp.zeros((x.shape[0], kept_len, x.shape[2]), x.dtype)
        (_, kept), cache = self.layers((x, kept), ctx, jnp.arange(n), cache)
        if cache is not None:  # the later layers' caches hold the survivors only
            late = jnp.arange(n)[:, None] >= self.drop_layer
            cache["index"] = jnp.where(late, valid.sum(1).astype(jnp.int32), lengths)
        return kept, cache, (index, valid)

    @staticmethod
    def _mask(segment_ids, slots: int) -> CausalSegments:
        """Causal within each segment, over `slots` (>= T) keys (cache slots past T: none)."""
        return CausalSegments(segment_ids, jnp.pad(segment_ids, ((0, 0), (0, slots - segment_ids.shape[1]))))

    def prefill(self, embeddings, positions, segment_ids, cache_len: int, dropped=None,
                kept_len=None, last_only: bool = False):
        """Run right-padded prompts (one per row; segment_ids 1 on the prompt, 0 after) and
        return (logits [B, T, vocab], a KV cache of `cache_len` slots whose per-row index is
        the prompt's length: decoding continues right after each row's last real token).
        last_only: the logits of each row's last prompt token alone, [B, 1, vocab] (all that
        decoding needs; the head over every position costs T times more)."""
        b, _ = segment_ids.shape
        cfg, n = self.config, self.config.num_layers
        shape = (n, b, cache_len, cfg.num_kv_heads, cfg.head_dim)
        cache = {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype),
                 "index": jnp.zeros((n, b), jnp.int32)}
        x, cache, placement = self._layers(embeddings, positions, segment_ids, cache, dropped,
                                           kept_len)
        if last_only:  # the last layer's index is the row's length in x (survivors with a drop)
            last = cache["index"][-1] - 1
            return self._logits(jnp.take_along_axis(x, last[:, None, None], axis=1)), cache
        return unpack(self._logits(x), placement, segment_ids.shape[1]), cache

    def extend(self, embeddings, positions, segment_ids, cache, start):
        """Prefill more of each row's prompt into a prefill's cache: the chunk (right-padded,
        segment_ids 1 on its tokens, positions where they sit in the whole prompt) goes to the
        slots from `start` [B] on, over whatever the cache held there, and attends to slots
        0 .. start - 1 as they are. Returns (the logits of each row's last chunk token
        [B, 1, vocab], the cache, its index the row's new length). The cache must hold
        start + the chunk's length slots."""
        x, cache, _ = self._layers(embeddings, positions, segment_ids, cache, start=start)
        last = cache["index"][-1] - start - 1
        return self._logits(jnp.take_along_axis(x, last[:, None, None], axis=1)), cache

    def decode(self, token_ids, cache):
        """One token per row [B, 1] at its row's cache index -> (logits [B, 1, vocab], cache).
        Each layer attends to its own cache up to its own index (Victor's later layers hold
        fewer slots); the position is the first layer's index, the row's true length."""
        x = layers.constrain(self.embed(token_ids), (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
        positions = cache["index"][0][:, None]
        if self.drop_layer:  # one token: the compaction is the identity
            zeros = jnp.zeros_like(token_ids)
            ctx = {"mask": None, "positions": positions, "kept_index": zeros, "kept_mask": None,
                   "kept_positions": positions}
            (_, x), cache = self.layers((x, x), ctx, jnp.arange(self.config.num_layers), cache)
        else:
            x, cache = self.layers(x, None, positions, cache)
        return self._logits(x), cache

    @staticmethod
    def stacked(cache: dict) -> dict:
        """A prefill's cache ([L, B, S, kv_heads, D]) in decode_in_place's layout (heads first)."""
        return dict(cache, k=jnp.swapaxes(cache["k"], 2, 3), v=jnp.swapaxes(cache["v"], 2, 3))

    def decode_in_place(self, token_ids, cache):
        """`decode` for a long-lived cache holding every layer ({"k", "v": [L, B, kv_heads, S,
        D], "index": [L, B]}, see `stacked`; optionally "span", the slots to read): the layers
        run as a loop whose carry is the cache, so each writes its token's keys and values
        where they lie (layers.write_in_place) and reads only the slots in use
        (layers.attend_span), instead of the cache being sliced per layer into the scan and
        stacked again on the way out (a copy of all of it per token). Same parameters, same
        values as `decode`."""
        x = layers.constrain(self.embed(token_ids), (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
        positions = cache["index"][0][:, None]
        # Slots any row reads: up to the longest row's new token (a server passes only its
        # live rows' lengths; idle rows then read garbage, which nobody uses).
        span = cache.get("span", cache["index"].max() + 1)
        layer = DecoderLayer(self.config, self.dtype, self.param_dtype, parent=None)  # applied per layer

        def body(carry, xs):
            x, k, v = carry
            params, i = xs
            x, new = layer.apply({"params": params}, x, None, positions,
                                 {"k": k, "v": v, "index": cache["index"], "layer": i,
                                  "span": span})
            return (x, new["k"], new["v"]), None

        stack = self.variables["params"]["layers"]
        (x, k, v), _ = jax.lax.scan(body, (x, cache["k"], cache["v"]),
                                    (stack, jnp.arange(self.config.num_layers)))
        return self._logits(x), {"k": k, "v": v, "index": cache["index"] + 1}
