"""The vision-language model: vision tower -> compressor (query transformer) -> splice -> LLM."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mqt_jax import compressors
from mqt_jax.config import ModelConfig
from mqt_jax.core import sharding, splice
from mqt_jax.core.checkpoint import abstract_like
from mqt_jax.models.llama import Llama
from mqt_jax.models.vision_tower import VisionTower


class VisionLanguageModel(nn.Module):
    config: ModelConfig

    def __post_init__(self):
        compressors.check(self.config)  # the compressor's own rules, before anything is built
        super().__post_init__()

    def setup(self):
        cfg = self.config
        kw = dict(
            dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
            remat_policy=cfg.remat_policy,
        )
        self.vision_tower = VisionTower(cfg.vision, attention=cfg.attention, **kw)
        self.query_transformer = compressors.build(
            cfg.query, out_width=cfg.llm.hidden, grid_size=cfg.vision.grid_size, **kw
        )
        self.llm = Llama(cfg.llm, drop_layer=cfg.drop_layer, attention=cfg.attention, **kw)

    def visual_tokens(self, images, m, num_queries: int | None = None, guidance=None):
        """images [N, H, W, 3], m [N] -> all M visual tokens [N, M, hidden] (or, with a static
        `num_queries=n`, the really truncated computation's n tokens). A compressor that reads
        the question (QueCC) also takes its text guidance [N, hidden], and its extra vision
        layers."""
        extra = self.config.compressor.vision_layers(self.config.query)
        if not extra:
            return self.query_transformer(self.vision_tower(images), m, num_queries)
        features, multi = self.vision_tower(images, extra)
        return self.query_transformer(features, m, num_queries, multi=multi, guidance=guidance)

    def question_states(self, text, visual_index, positions, segment_ids, question_end):
        """QueCC's guidance [B, I, hidden]: the LLM's own last-layer state at the end of each
        image's question, over the text alone (visual slots hidden), without gradient."""
        hidden = self.llm.hidden_states(text, positions, jnp.where(visual_index >= 0, 0, segment_ids))
        picked = jnp.take_along_axis(hidden, question_end[..., None], axis=1)
        return jax.lax.stop_gradient(picked)

    def embed(self, images, m, token_ids, visual_index, positions, segment_ids, question_end,
              visual=None):
        """The LLM's input embeddings [B, T, hidden]: text embeddings with visual tokens
        spliced in where visual_index >= 0. visual: the rows' visual tokens [B, I * M, hidden]
        already computed (a server's vision cache); then `images` is not read."""
        b, i = m.shape
        text = self.llm.embed(token_ids)
        if visual is not None:
            return splice.splice(text, visual, visual_index)
        guidance = None
        if self.config.compressor.reads_question:
            guidance = self.question_states(text, visual_index, positions, segment_ids, question_end)
            guidance = guidance.reshape(b * i, -1)
        tokens = self.visual_tokens(images.reshape((b * i,) + images.shape[2:]), m.reshape(-1),
                                    guidance=guidance)
        tokens = tokens.reshape(b, i * tokens.shape[1], tokens.shape[2])
        return splice.splice(text, tokens, visual_index)

    def _drop(self, visual_index, images_per_row: int) -> dict:
        """Victor: which positions leave the LLM at its drop layer, and the static length left."""
        n = self.config.dropped_per_image
        if not n:
            return {}
        return {"dropped": splice.dropped_positions(visual_index, self.config.num_queries, n),
                "kept_len": splice.kept_length(visual_index.shape[1], images_per_row, n)}

    def __call__(self, images, m, token_ids, visual_index, positions, segment_ids,
                 question_end=None):
        """images [B, I, H, W, 3], m and question_end [B, I]; the rest [B, T] from
        splice.layout_rows. Returns logits [B, T, vocab]."""
        question_end = jnp.zeros(m.shape, jnp.int32) if question_end is None else question_end
        x = self.embed(images, m, token_ids, visual_index, positions, segment_ids, question_end)
        return self.llm(x, positions, segment_ids, **self._drop(visual_index, m.shape[1]))

    def prefill(self, images, m, token_ids, visual_index, positions, segment_ids, question_end,
                cache_len, visual=None, last_only: bool = False):
        """Prompts (one per row, right-padded) -> (logits, KV cache); see Llama.prefill and,
        for `visual`, embed."""
        x = self.embed(images, m, token_ids, visual_index, positions, segment_ids, question_end,
                       visual)
        return self.llm.prefill(x, positions, segment_ids, cache_len, last_only=last_only,
                                **self._drop(visual_index, m.shape[1]))

    def extend(self, visual, token_ids, visual_index, positions, segment_ids, cache, start):
        """More of each row's prompt into its prefill cache (see Llama.extend): raising m keeps
        the cache of [system text, first m visual tokens] and runs only the added visual tokens
        and the text after them. visual: the rows' M tokens [B, M, hidden]."""
        x = splice.splice(self.llm.embed(token_ids), visual, visual_index)
        return self.llm.extend(x, positions, segment_ids, cache, start)

    def decode(self, token_ids, cache):
        return self.llm.decode(token_ids, cache)

    def decode_in_place(self, token_ids, cache):
        return self.llm.decode_in_place(token_ids, cache)

    def logits(self, batch: dict) -> jax.Array:
        """__call__ on a batch dict (the pipeline's and splice.layout_rows' keys)."""
        return self(*(batch[k] for k in MODEL_INPUTS))


MODEL_INPUTS = ("images", "m", "token_ids", "visual_index", "positions", "segment_ids",
                "question_end")


def abstract_params(model_config: ModelConfig, mesh: jax.sharding.Mesh) -> dict:
    """ShapeDtypeStructs of the model's parameters carrying their shardings on `mesh`: an
    abstract init (nothing computed or allocated). Shapes do not depend on the batch; the
    placeholder's rows are the fewest this mesh divides, its length the fewest a Victor drop
    leaves room in."""
    rows, seq_len = sharding.batch_divisor(mesh), model_config.dropped_per_image + 1
    batch = splice.placeholder_batch(rows, seq_len, 1, model_config.vision.image_size)
    model = VisionLanguageModel(model_config)
    with sharding.activate(mesh):
        boxed = jax.eval_shape(lambda rng: model.init(rng, batch, method="logits")["params"],
                               jax.random.key(0))
    shardings = sharding.logical_to_shardings(boxed, mesh)
    return abstract_like(nn.meta.unbox(boxed), shardings)
