"""Greedy generation with a preallocated KV cache: prefill the prompts at their m, then decode
one token per step until every row has produced EOS (or max_new_tokens).

Prompts are laid out by `splice.layout_rows` (one per row, right-padded, positions from 0), so
a prompt at m holds exactly m visual tokens: a smaller m is a shorter prefill.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mqt_jax import splice
from mqt_jax.models.vlm import MODEL_INPUTS, VisionLanguageModel

@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def greedy(model: VisionLanguageModel, params, prompts: dict, eos_id, max_new_tokens: int):
    """prompts: the MODEL_INPUTS arrays [B, T] -> generated ids [B, max_new_tokens] (EOS
    repeated after a row's first EOS)."""
    seq_len = prompts["token_ids"].shape[1]
    logits, cache = model.apply({"params": params}, *(prompts[k] for k in MODEL_INPUTS),
                                seq_len + max_new_tokens, method="prefill")
    last = (prompts["segment_ids"] > 0).sum(1) - 1
    first = jnp.argmax(logits[jnp.arange(logits.shape[0]), last], -1).astype(jnp.int32)
    out = jnp.full((first.shape[0], max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first)

    def more(carry):
        step, _, _, done = carry
        return (step < max_new_tokens) & ~done.all()

    def decode(carry):
        step, out, cache, done = carry
        previous = jax.lax.dynamic_slice_in_dim(out, step - 1, 1, axis=1)  # [B, 1]
        logits, cache = model.apply({"params": params}, previous, cache, method="decode")
        token = jnp.where(done, eos_id, jnp.argmax(logits[:, 0], -1).astype(jnp.int32))
        return step + 1, out.at[:, step].set(token), cache, done | (token == eos_id)

    _, out, _, _ = jax.lax.while_loop(more, decode, (1, out, cache, first == eos_id))
    return out


def prompt_batch(examples: list[splice.Example], images: np.ndarray, m: int, num_queries: int,
                 seq_len: int) -> dict[str, np.ndarray]:
    """One prompt per row at the same m; images [B, H, W, 3]."""
    m_rows = np.full((len(examples), 1), m, np.int32)
    laid = splice.layout_rows([[e] for e in examples], m_rows, num_queries, seq_len)
    lengths = [splice.true_length(e, m_rows[i]) for i, e in enumerate(examples)]
    if max(lengths) > seq_len:
        raise ValueError(f"a prompt of {max(lengths)} tokens at m={m} does not fit seq_len={seq_len}")
    return {"images": images[:, None].astype(np.float32), "m": m_rows,
            **{k: laid[k] for k in MODEL_INPUTS[2:]}}  # token_ids ... segment_ids


def cut_at_eos(ids: np.ndarray, eos_id: int) -> list[list[int]]:
    out = []
    for row in np.asarray(ids).tolist():
        out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out
