"""Attention kernels, chosen by `ModelConfig.attention`.

- "xla": `jax.nn.dot_product_attention` with a dense boolean mask: XLA's unfused attention,
  which materialises every T x S score matrix. Runs everywhere; the reference.
- "cudnn" (GPU): the same call with `implementation="cudnn"`, cuDNN's fused attention; causal
  by cuDNN's own causal mask, packed segments by a boolean same-segment mask it applies inside
  the kernel (no score matrix in HBM).
- "splash" (TPU): the Pallas splash-attention kernel with the causal mask and segment ids
  inside the kernel, partitioned with shard_map over the batch and heads; elsewhere it runs in
  Pallas interpret mode (slow; for tests).

The LLM's training and prefill attention is causal within segments (packed examples, each
with its own m); it reaches this module as `CausalSegments`, so a fused kernel never needs
the dense mask. Other masks (the vision tower's none, the query transformer's prefix masks,
decoding's cache masks) take "xla", or cuDNN for the unmasked vision tower.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("xla", "cudnn", "splash")


@flax.struct.dataclass
class CausalSegments:
    """Query i (of T) may attend key j (of S >= T) iff j <= i and both carry the same segment
    id; segment ids q [B, T], kv [B, S] (0 = padding)."""

    q: jax.Array
    kv: jax.Array

    def dense(self) -> jax.Array:
        """[B, 1, T, S] bool."""
        t, s = self.q.shape[1], self.kv.shape[1]
        causal = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]
        return (causal[None] & (self.q[:, :, None] == self.kv[:, None, :]))[:, None]


def attend(q, k, v, mask, implementation: str = "xla"):
    """q [B, T, heads, D]; k, v [B, S, kv_heads, D]; mask: CausalSegments, a bool array
    broadcastable to [B, heads, T, S] (True = may attend) or None."""
    # The fused kernels take the LLM's causal segments (and cuDNN the unmasked vision tower);
    # other masks (query transformer, decoding's cache index) stay on XLA.
    if implementation == "splash" and isinstance(mask, CausalSegments):
        return splash(q, k, v, mask)
    if implementation == "cudnn" and (mask is None or isinstance(mask, CausalSegments)):
        return cudnn(q, k, v, mask)
    if isinstance(mask, CausalSegments):
        mask = mask.dense()
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


def cudnn(q, k, v, mask):
    if jax.default_backend() != "gpu":
        raise ValueError(f"ModelConfig.attention='cudnn' needs an NVIDIA GPU (this backend: "
                         f"{jax.default_backend()}); 'xla' runs everywhere")
    if isinstance(mask, CausalSegments):
        if q.shape[1] == k.shape[1]:  # cuDNN's causal mask is for square attention
            same = (mask.q[:, :, None] == mask.kv[:, None, :])[:, None]
            return jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True,
                                                implementation="cudnn")
        mask = mask.dense()
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


BLOCK = 128  # the kernel's blocks are multiples of 128 lanes


def block_size(length: int) -> int:
    """The largest kernel block (512, 256 or 128) that tiles `length` (a multiple of 128)."""
    return next(size for size in (512, 256, BLOCK) if length % size == 0)


def splash(q, k, v, mask: CausalSegments):
    """Splash attention, shard_map'd over the mesh in context (batch over data x fsdp, heads
    over tensor) so each device runs the kernel on its own rows and heads."""
    from mqt_jax.core import sharding

    heads, t = q.shape[2], q.shape[1]
    k, v = (jnp.repeat(x, heads // x.shape[2], axis=2) for x in (k, v))  # grouped kv heads
    q = q / np.sqrt(q.shape[-1]).astype(q.dtype)  # the kernel does not scale
    # Lengths padded to whole blocks; the padding's own segment (-1) keeps it apart.
    pad = lambda x, axis: jnp.pad(x, [(0, -x.shape[axis] % BLOCK if i == axis else 0)  # noqa: E731
                                      for i in range(x.ndim)], constant_values=0)
    seg = lambda ids: jnp.pad(ids.astype(jnp.int32), ((0, 0), (0, -ids.shape[1] % BLOCK)),  # noqa: E731
                              constant_values=-1)
    to_heads = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, heads, T, D]
    args = (to_heads(pad(q, 1)), to_heads(pad(k, 1)), to_heads(pad(v, 1)), seg(mask.q), seg(mask.kv))
    mesh = jax.sharding.get_abstract_mesh()
    # The kernel compiles for TPUs (also ahead of time, from a CPU host); elsewhere it interprets.
    platform = jax.default_backend() if mesh.empty else mesh.abstract_device.platform
    local = functools.partial(_splash_local, interpret=platform != "tpu")
    if mesh.empty:
        out = local(*args)
    else:
        rows = jax.sharding.PartitionSpec(sharding.BATCH_AXES, "tensor", None, None)
        ids = jax.sharding.PartitionSpec(sharding.BATCH_AXES, None)
        out = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, ids, ids),
                            out_specs=rows, check_vma=False)(*args)
    return to_heads(out)[:, :t]


def _splash_local(q, k, v, seg_q, seg_kv, interpret: bool):
    """One device's rows and heads: q [b, h, T, D], k / v [b, h, S, D] (whole blocks)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    heads, t, s = q.shape[1], q.shape[2], k.shape[2]
    bq, bkv = block_size(t), block_size(s)
    blocks = kernel.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                               block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                               block_q_dq=bq, block_kv_dq=bkv)
    # Built in the trace (its mask tables become the program's constants).
    mask = masks.MultiHeadMask([masks.CausalMask((t, s)) for _ in range(heads)])
    run = kernel.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                 interpret=interpret)
    return jax.vmap(run)(q, k, v, kernel.SegmentIds(q=seg_q, kv=seg_kv))
