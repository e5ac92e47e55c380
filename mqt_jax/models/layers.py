"""Building blocks shared by the vision tower, the query transformer and the LLM.

Every parameter carries logical axis names (see `mqt_jax.core.sharding.LOGICAL_AXIS_RULES` for the
table that maps them onto the mesh); activations are constrained with `constrain`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mqt_jax.config import LoRAConfig
from mqt_jax.models.attention import CausalSegments, attend
from mqt_jax.models.lora import adapter_output

Dtype = Any
Array = jax.Array

ACT_BATCH, ACT_LENGTH, ACT_EMBED = "activation_batch", "activation_length", "activation_embed"
ACT_HEADS, ACT_MLP = "activation_heads", "activation_mlp"

REMAT_POLICY = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def constrain(x: Array, names: Sequence[str | None]) -> Array:
    """Sharding constraint by logical names (a no-op outside a mesh / rules context)."""
    return nn.with_logical_constraint(x, tuple(names))


def partitioned(init: Callable, names: Sequence[str | None]) -> Callable:
    return nn.with_logical_partitioning(init, tuple(names))


class Dense(nn.Module):
    """y = x . kernel (+ bias), contracting the last `num_in` axes of x.

    The kernel [*x.shape[-num_in:], *features] is created at its true rank and named `axes`
    (input axes first); flax's DenseGeneral initialises a flattened kernel, which breaks
    multi-axis logical names under a mesh.
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    num_in: int = 1
    use_bias: bool = False
    init_std: float | None = None  # None: LeCun normal over the contracted axes
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: LoRAConfig | None = None  # low-rank adapters beside the kernel (models/lora.py)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_in, n_out = self.num_in, len(self.features)
        if self.init_std:
            init = nn.initializers.normal(self.init_std)
        else:
            init = nn.initializers.variance_scaling(
                1.0, "fan_in", "truncated_normal",
                in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)),
            )
        kernel_shape = tuple(x.shape[-n_in:]) + tuple(self.features)
        kernel = self.param("kernel", partitioned(init, self.axes), kernel_shape, self.param_dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(
            x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ()))
        )
        if self.use_bias:
            bias = self.param(
                "bias", partitioned(nn.initializers.zeros, self.axes[n_in:]), self.features,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        if self.lora is not None:
            y = y + adapter_output(self, x, self.lora, n_in, self.features, self.axes,
                                   self.dtype, self.param_dtype)
        return y


def dense(
    features: int | Sequence[int],
    axes: Sequence[str | None],
    *,
    num_in: int = 1,
    use_bias: bool = False,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
    init_std: float | None = None,
    lora: LoRAConfig | None = None,
) -> Dense:
    features = (features,) if isinstance(features, int) else tuple(features)
    return Dense(features, tuple(axes), num_in, use_bias, init_std, dtype, param_dtype, lora,
                 name=name)


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str | None = None):
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=partitioned(nn.initializers.ones, ("embed",)),
        bias_init=partitioned(nn.initializers.zeros, ("embed",)),
        name=name,
    )


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: normalise in float32, scale in the compute dtype (as Hugging Face does)."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale", partitioned(nn.initializers.ones, ("embed",)), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding, Hugging Face LLaMA layout (rotate the two halves of each head).

    x: [B, T, heads, head_dim]; positions: [B, T] integers.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, head_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def attention_weights(q: Array, k: Array, mask: Array | None) -> Array:
    """The softmax weights [B, heads, T, S] that `attend` applies (computed explicitly)."""
    if isinstance(mask, CausalSegments):
        mask = mask.dense()
    k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


class Attention(nn.Module):
    """Multi-head attention with optional grouped kv heads, biases and RoPE."""

    num_heads: int
    head_dim: int
    out_features: int
    num_kv_heads: int | None = None
    use_bias: bool = False
    rope_theta: float | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: LoRAConfig | None = None  # adapters on the projections it targets (q, k, v, o)
    attention: str = "xla"  # the kernel (models/attention.py)

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_k: Array,
        inputs_v: Array | None = None,
        mask: Array | None = None,
        positions: Array | None = None,
        cache: dict | None = None,
    ):
        """inputs_v defaults to inputs_k. Inputs of batch size 1 (image-independent queries or
        keys) are projected once and broadcast to the batch.

        With a KV cache {"k", "v": [B, S, kv_heads, D], "index": [B]} (decoding), the new keys
        and values are written into each row's cache at its own index, the queries attend to
        the whole cache (`mask` [B, 1, T, S] says which slots), and (out, new_cache) returns.
        A cache with a "layer" holds every layer ([L, B, S, kv_heads, D], index [L, B]); see
        `write_in_place`.
        """
        inputs_v = inputs_k if inputs_v is None else inputs_v
        kv_heads = self.num_kv_heads or self.num_heads
        lora = lambda target: self.lora and self.lora.on(target)  # noqa: E731
        proj = lambda n, heads, names, target: dense(  # noqa: E731
            (heads, self.head_dim), ("embed",) + names, use_bias=self.use_bias,
            dtype=self.dtype, param_dtype=self.param_dtype, name=n, lora=lora(target),
        )
        q = proj("query", self.num_heads, ("heads", "head_dim"), "q")(inputs_q)
        k = proj("key", kv_heads, ("kv_heads", "head_dim"), "k")(inputs_k)
        v = proj("value", kv_heads, ("kv_heads", "head_dim"), "v")(inputs_v)
        if self.rope_theta is not None:
            q = rope(q, positions, self.rope_theta)
            k = rope(k, positions, self.rope_theta)
        batch = max(q.shape[0], k.shape[0], v.shape[0])
        q, k, v = (jnp.broadcast_to(t, (batch,) + t.shape[1:]) for t in (q, k, v))
        q = constrain(q, (ACT_BATCH, ACT_LENGTH, ACT_HEADS, None))
        stacked = cache is not None and "layer" in cache
        if stacked:
            cache = write_in_place(cache, k, v)
        elif cache is not None:
            write = jax.vmap(lambda c, new, i: jax.lax.dynamic_update_slice_in_dim(c, new, i, 0))
            cache = {"k": write(cache["k"], k.astype(cache["k"].dtype), cache["index"]),
                     "v": write(cache["v"], v.astype(cache["v"].dtype), cache["index"]),
                     "index": cache["index"] + q.shape[1]}
            k, v = cache["k"].astype(self.dtype), cache["v"].astype(self.dtype)
        hooked = self.is_mutable_collection("perturbations") and not self.is_initializing()
        if hooked or self.has_variable("perturbations", "weights"):
            # Grad-CAM (mqt_jax/evaluation/gradcam.py): the weights as an intermediate whose gradient
            # can be taken; adds zero, so the output is unchanged.
            weights = self.perturb("weights", attention_weights(q, k, mask))
            self.sow("intermediates", "weights", weights)
            v = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2)
            out = jnp.einsum("bhts,bshd->bthd", weights.astype(v.dtype), v)
        elif stacked:
            out = attend_span(q.astype(cache["k"].dtype), cache).astype(self.dtype)
        else:
            out = attend(q, k, v, mask, self.attention)
        out = dense(
            self.out_features, ("heads", "head_dim", "embed"), num_in=2,
            use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name="out",
            lora=lora("o"),
        )(out)
        out = constrain(out, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
        return out if cache is None else (out, cache)


def write_in_place(cache: dict, k: Array, v: Array) -> dict:
    """One token's keys and values [B, 1, kv_heads, D] written into the whole-stack cache
    {"k", "v": [L, B, kv_heads, S, D], "index": [L, B], "layer", "span"} at (layer, row, the
    row's index): a scatter of B vectors that XLA does in place when the cache is a loop's
    carry, where slicing the layer out and writing it back would copy all of it every token.
    The index is left for the caller to advance once every layer has written."""
    layer, index = cache["layer"], cache["index"][cache["layer"]]
    rows = jnp.arange(k.shape[0])
    ks = cache["k"].at[layer, rows, :, index].set(k[:, 0].astype(cache["k"].dtype), mode="drop")
    vs = cache["v"].at[layer, rows, :, index].set(v[:, 0].astype(cache["v"].dtype), mode="drop")
    return dict(cache, k=ks, v=vs)


def attend_span(q: Array, cache: dict, chunk: int = 128) -> Array:
    """`attend` for one query per row [B, 1, heads, D] over layer `cache["layer"]` of a
    whole-stack cache (see write_in_place), reading only its first `cache["span"]` slots (the
    longest row's; a traced value) chunk by chunk with a running softmax, so a step costs what
    the rows hold, not the cache's length. Row b sees slots <= its index; grouped heads share
    their kv head (head j reads kv head j // (heads / kv_heads), as `attend` does)."""
    k_all, v_all, layer = cache["k"], cache["v"], cache["layer"]
    _, b, kv_heads, slots, d = k_all.shape
    index = cache["index"][layer]
    while slots % chunk:
        chunk //= 2
    groups = q.reshape(b, kv_heads, q.shape[2] // kv_heads, d).astype(jnp.float32) / np.sqrt(d)
    low = jnp.finfo(jnp.float32).min

    def step(i, carry):
        top, total, acc = carry
        start = (layer, 0, 0, i * chunk, 0)
        k = jax.lax.dynamic_slice(k_all, start, (1, b, kv_heads, chunk, d))[0]
        v = jax.lax.dynamic_slice(v_all, start, (1, b, kv_heads, chunk, d))[0]
        logits = jnp.einsum("bkgd,bksd->bkgs", groups, k.astype(jnp.float32))
        seen = (i * chunk + jnp.arange(chunk))[None, :] <= index[:, None]
        logits = jnp.where(seen[:, None, None, :], logits, low)
        new_top = jnp.maximum(top, logits.max(-1))
        p = jnp.exp(logits - new_top[..., None])
        scale = jnp.exp(top - new_top)
        return (new_top, total * scale + p.sum(-1),
                acc * scale[..., None] + jnp.einsum("bkgs,bksd->bkgd", p, v.astype(jnp.float32)))

    init = (jnp.full(groups.shape[:3], low), jnp.zeros(groups.shape[:3]), jnp.zeros(groups.shape))
    chunks = jnp.minimum((cache["span"] + chunk - 1) // chunk, slots // chunk)
    _, total, acc = jax.lax.fori_loop(0, chunks, step, init)
    return (acc / total[..., None]).reshape(q.shape).astype(q.dtype)


def quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


class MLP(nn.Module):
    """Two-layer MLP (CLIP: fc1 -> quick-GELU -> fc2, with biases) or, gated, LLaMA's SwiGLU."""

    hidden: int
    out_features: int
    activation: Callable[[Array], Array] = jax.nn.gelu
    gated: bool = False
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: LoRAConfig | None = None  # adapters on the layers it targets (gate, up, down)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        make = lambda n, f, axes, target: dense(  # noqa: E731
            f, axes, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            name=n, lora=self.lora and self.lora.on(target),
        )
        h = make("fc1", self.hidden, ("embed", "mlp"), "gate")(x)
        h = self.activation(h)
        if self.gated:
            h = h * make("up", self.hidden, ("embed", "mlp"), "up")(x)
        h = constrain(h, (ACT_BATCH, ACT_LENGTH, ACT_MLP))
        return make("fc2", self.out_features, ("mlp", "embed"), "down")(h)


def scan_blocks(block: type[nn.Module], length: int, remat_policy: str, num_broadcast: int,
                num_scanned: int = 0):
    """Repeat `block` `length` times with nn.scan (compile time independent of depth).

    The block maps (carry, *broadcast_args, *scanned_args) -> (carry, per-layer output); the
    scanned args (e.g. a KV cache) and the outputs carry a leading layer axis, as do the
    parameters ("layers"). `remat_policy` "none" keeps every activation; the others name a
    `jax.checkpoint_policies` policy.
    """
    if remat_policy != "none":
        block = nn.remat(block, policy=REMAT_POLICY[remat_policy], prevent_cse=False)
    return nn.scan(
        block,
        variable_axes={"params": 0, "intermediates": 0, "perturbations": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * num_broadcast + (0,) * num_scanned,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
