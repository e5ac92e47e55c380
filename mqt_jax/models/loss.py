"""Next-token cross-entropy on the positions that carry loss (assistant text)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def token_nll(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """[B, T] negative log-likelihood of each target, 0 where there is no loss; float32."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return nll * loss_mask.astype(jnp.float32)


def cross_entropy(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array):
    """Mean over loss-bearing positions. Returns (loss, number of such tokens)."""
    num_tokens = loss_mask.astype(jnp.float32).sum()
    return token_nll(logits, targets, loss_mask).sum() / jnp.maximum(num_tokens, 1.0), num_tokens
