"""Model configuration: frozen dataclasses that gin binds (see configs/*.gin).

Frozen so that Flax modules can hold them as attributes and jit can hash them.
"""

from __future__ import annotations

import dataclasses

import gin
import numpy as np

from mqt_jax import compressors
from mqt_jax.models.attention import IMPLEMENTATIONS as ATTENTION_KERNELS
from mqt_jax.models.lora import LoRAConfig

DTYPES = ("float32", "bfloat16", "float16")

REMAT_POLICIES = (
    "none",  # no rematerialisation: keep every activation
    "nothing_saveable",  # recompute everything in the backward pass (least memory)
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "everything_saveable",
)


def positive(config, *names: str) -> None:
    """Each named field is an int >= 1 (0 heads or layers would fail deep inside a module)."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name}={value!r}: must be an integer >= 1")


def gin_bindings(part) -> list[str]:
    """Gin lines that rebuild a config dataclass (`VisionConfig.width = 1024`, ...); nested
    configs (LLMConfig.lora) are left to their own defaults."""
    name = type(part).__name__
    return [f"{name}.{f.name} = {getattr(part, f.name)!r}" for f in dataclasses.fields(part)
            if not dataclasses.is_dataclass(getattr(part, f.name))]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT. Defaults are ViT-L/14 at 336 px."""

    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    layer_norm_eps: float = 1e-5
    # Which hidden state feeds the query transformer, counted like Hugging Face's
    # `hidden_states` tuple: 0 = embeddings after the pre-LayerNorm, i = output of layer i,
    # -1 = last layer. The layers after the selected one are not built at all.
    select_layer: int = -2

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_layers_built(self) -> int:
        """Layers actually run: those up to and including the selected one."""
        return self.layer_index(self.select_layer)

    def layer_index(self, layer: int) -> int:
        """A hidden state counted like `select_layer` (negative from the end) -> 0..num_layers."""
        n = layer if layer >= 0 else self.num_layers + 1 + layer
        if not 0 <= n <= self.num_layers:
            raise ValueError(
                f"vision layer {layer} is outside [-{self.num_layers + 1}, {self.num_layers}] "
                f"for a {self.num_layers}-layer tower (VisionConfig.select_layer="
                f"{self.select_layer})"
            )
        return n

    def __post_init__(self):
        positive(self, "image_size", "patch_size", "width", "num_layers", "num_heads", "mlp_dim")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"VisionConfig.image_size={self.image_size} is not a multiple of "
                f"patch_size={self.patch_size}"
            )
        self.num_layers_built  # validates select_layer


@gin.configurable
@dataclasses.dataclass(frozen=True)
class QueryTransformerConfig:
    """The compressor between the vision tower and the LLM (one gin binding picks it):
    patch features -> M visual tokens at the LLM width. `variant` names one of
    mqt_jax/compressors (each file describes its own): the Matryoshka ones ("official", the
    released MQT-LLaVA resampler; "qformer") serve any m <= M, "m3" (M3's nested pooling) its
    scales; the others ("mlp2x_gelu", "avgpool", "victor", "quecc") have no m: one model per
    budget M.
    """

    variant: str = "official"
    num_queries: int = 256  # M
    width: int = 1024  # attention width; official: the vision width
    num_heads: int = 16
    layer_norm_eps: float = 1e-6
    # qformer only:
    num_layers: int = 2
    mlp_dim: int = 4096
    query_mask: str = "prefix"  # "prefix": query i sees j < m; "causal": query i sees j <= i
    # victor only: the first LLM layer that no longer sees the patch tokens (k).
    drop_layer: int = 3
    # quecc only: the vision layers whose hidden states (concatenated) give keys and values,
    # counted like VisionConfig.select_layer.
    vision_layers: tuple[int, ...] = (12, 16, 22, 23)
    # m3 only: the token counts it serves (squares whose side divides the patch grid); empty:
    # every such square (1, 4, 9, 16, 36, 64, 144, 576 at 24 x 24 patches).
    scales: tuple[int, ...] = ()

    def __post_init__(self):
        positive(self, "num_queries", "width", "num_heads", "num_layers", "mlp_dim")
        compressor = compressors.get(self.variant)  # a ValueError naming the known ones
        if self.query_mask not in ("prefix", "causal"):
            raise ValueError(
                f"QueryTransformerConfig.query_mask={self.query_mask!r}: "
                "expected 'prefix' or 'causal'"
            )
        if self.width % self.num_heads:
            raise ValueError(
                f"QueryTransformerConfig.width={self.width} is not divisible by "
                f"num_heads={self.num_heads}"
            )
        if self.num_queries < 1:
            raise ValueError(f"QueryTransformerConfig.num_queries={self.num_queries} must be >= 1")
        if compressor.square_queries and int(self.num_queries**0.5) ** 2 != self.num_queries:
            raise ValueError(
                f"QueryTransformerConfig.num_queries={self.num_queries}: the {self.variant} "
                "variant needs a square number of queries (a square grid of tokens)"
            )


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """LLaMA decoder. Defaults are LLaMA-2-7B / Vicuna-7B v1.5."""

    vocab_size: int = 32000
    hidden: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    mlp_dim: int = 11008
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_length: int = 4096  # the longest sequence (prompt + answer) generation accepts
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)  # rank 0: no adapters

    def __post_init__(self):
        positive(self, "vocab_size", "hidden", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "mlp_dim", "max_length")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LLMConfig.num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"LLMConfig.head_dim={self.head_dim} must be even for RoPE")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    query: QueryTransformerConfig = dataclasses.field(default_factory=QueryTransformerConfig)
    llm: LLMConfig = dataclasses.field(default_factory=LLMConfig)
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"  # master weights
    remat_policy: str = "nothing_saveable"
    # The attention kernel (models/attention.py): "xla" (everywhere), "cudnn" (GPU), "splash" (TPU).
    attention: str = "xla"

    def __post_init__(self):
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"ModelConfig.attention={self.attention!r}: expected one of "
                             f"{ATTENTION_KERNELS}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: expected one of {DTYPES}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"ModelConfig.remat_policy={self.remat_policy!r}: expected one of {REMAT_POLICIES}"
            )
        if self.compressor.vision_width and self.query.width != self.vision.width:
            raise ValueError(
                f"the {self.query.variant} query transformer attends at the vision width: "
                f"QueryTransformerConfig.width={self.query.width} != "
                f"VisionConfig.width={self.vision.width}"
            )
        self.compressor.check(self)

    @property
    def compressor(self) -> type[compressors.Compressor]:
        """The compressor class `query.variant` names: what it is and can do."""
        return compressors.get(self.query.variant)

    @property
    def num_queries(self) -> int:
        """M: the visual tokens per image in the LLM's input (victor: patches + registers)."""
        return self.compressor.llm_tokens(self)

    @property
    def drop_layer(self) -> int:
        """The LLM layer at which visual tokens leave (victor), else 0."""
        return self.compressor.dropped(self)[0]

    @property
    def dropped_per_image(self) -> int:
        """Visual tokens per image that leave the LLM at drop_layer (victor: the patches)."""
        return self.compressor.dropped(self)[1]

    def visual_tokens(self, m: int) -> int:
        """The visual tokens per image that the LLM carries at m: m, except for victor, whose
        patch tokens leave at drop_layer and only the registers stay."""
        return self.compressor.carried_tokens(self, m)

    @property
    def has_m(self) -> bool:
        """False for a fixed-token projector: the LLM always sees all M tokens."""
        return self.compressor.elastic

    def check_m(self, m):
        """m as int32, or a ValueError: outside [1, M], not M for a fixed-token projector, or
        not one of the compressor's scales (M3)."""
        from mqt_jax.splice import check_m

        m = check_m(m, self.num_queries)
        if not self.has_m and (m != self.num_queries).any():
            raise ValueError(f"m={sorted(set(m.reshape(-1).tolist()))}: the {self.query.variant} "
                             f"projector has no m; it always gives all {self.num_queries} tokens")
        valid = self.compressor.valid_m(self)
        if valid is not None and not np.isin(m, valid).all():
            bad = sorted(set(m[~np.isin(m, valid)].tolist()))
            raise ValueError(f"m={bad}: the {self.query.variant} compressor serves m in "
                             f"{list(valid)} only")
        return m
