"""Next-token cross-entropy on the positions that carry loss (assistant text)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array):
    """Mean over loss-bearing positions, in float32. Returns (loss, number of such tokens)."""
    per_token = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets
    )
    weight = loss_mask.astype(jnp.float32)
    num_tokens = weight.sum()
    return (per_token * weight).sum() / jnp.maximum(num_tokens, 1.0), num_tokens
