"""CLIP ViT vision tower: images -> patch features of the selected layer (class token dropped)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mqt_jax.config import VisionConfig
from mqt_jax.models import layers
from mqt_jax.models.layers import ACT_BATCH, ACT_EMBED, ACT_LENGTH


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer: x + attn(ln1(x)); x + mlp(ln2(x))."""

    config: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    emit: bool = False  # also return the output as the scan's per-layer result
    attention: str = "xla"  # unmasked: cuDNN fuses it; splash is for the LLM's causal masks

    @nn.compact
    def __call__(self, x, _=None):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.layer_norm(cfg.layer_norm_eps, name="ln1", **kw)(x)
        x = x + layers.Attention(
            num_heads=cfg.num_heads, head_dim=cfg.width // cfg.num_heads, out_features=cfg.width,
            use_bias=True, attention=self.attention, name="attn", **kw,
        )(h, h)
        h = layers.layer_norm(cfg.layer_norm_eps, name="ln2", **kw)(x)
        x = x + layers.MLP(
            cfg.mlp_dim, cfg.width, activation=layers.quick_gelu, name="mlp", **kw
        )(h)
        x = layers.constrain(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
        return x, (x if self.emit else None)


class VisionTower(nn.Module):
    """images [N, H, W, 3] (CLIP-normalised) -> features [N, num_patches, width] of the
    selected layer; with `extra_layers`, also those layers' hidden states concatenated along
    the width, [N, num_patches, len(extra_layers) * width] (QueCC's multi-layer features)."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "nothing_saveable"
    attention: str = "xla"

    @nn.compact
    def __call__(self, images: jax.Array, extra_layers: tuple[int, ...] = (),
                 class_token: bool = False):
        """class_token: the selected layer's states with the class token first,
        [N, 1 + num_patches, width] (CLIP's own pooling, for contrastive pretraining)."""
        cfg = self.config
        if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(
                f"images of shape {tuple(images.shape)}: the vision tower expects "
                f"[N, {cfg.image_size}, {cfg.image_size}, 3]"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        patches = nn.Conv(
            cfg.width, (cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2, padding="VALID",
            use_bias=False, name="patch_embed",
            kernel_init=layers.partitioned(
                nn.initializers.lecun_normal(), (None, None, None, "embed")
            ),
            **kw,
        )(images.astype(self.dtype))
        n = patches.shape[0]
        patches = patches.reshape(n, cfg.num_patches, cfg.width)
        cls = self.param(
            "class_embed", layers.partitioned(nn.initializers.normal(0.02), ("embed",)),
            (cfg.width,), self.param_dtype,
        )
        pos = self.param(
            "pos_embed", layers.partitioned(nn.initializers.normal(0.02), ("positions", "embed")),
            (cfg.num_patches + 1, cfg.width), self.param_dtype,
        )
        cls = jnp.broadcast_to(cls.astype(self.dtype), (n, 1, cfg.width))
        x = jnp.concatenate([cls, patches], axis=1) + pos.astype(self.dtype)
        x = layers.layer_norm(cfg.layer_norm_eps, name="pre_ln", **kw)(x)
        x = layers.constrain(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
        first, hidden = x, None
        if cfg.num_layers_built:
            blocks = layers.scan_blocks(EncoderLayer, cfg.num_layers_built, self.remat_policy, 1)
            x, hidden = blocks(cfg, emit=bool(extra_layers), attention=self.attention,
                               name="layers", **kw)(x, None)
        if class_token:
            return x
        if not extra_layers:
            return x[:, 1:]  # drop the class token
        state = lambda i: first if i == 0 else hidden[i - 1]  # noqa: E731  (i: after layer i)
        extra = [state(cfg.layer_index(i))[:, 1:] for i in extra_layers]
        return x[:, 1:], jnp.concatenate(extra, axis=-1)
