"""Every setting gin binds (see configs/*.gin): frozen dataclasses, at the bottom of the
package (this module imports nothing of mqt_jax, so parsing a gin file registers every
configurable by importing it alone).

Frozen so that Flax modules can hold them as attributes and jit can hash them. Checks that
need a compressor's own rules run where the model is built (`mqt_jax.compressors.check`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import re

import gin
import numpy as np

DTYPES = ("float32", "bfloat16", "float16")
# The attention kernels of models/attention.py: "xla" (everywhere), "cudnn" (GPU), "splash" (TPU).
ATTENTION_KERNELS = ("xla", "cudnn", "splash")

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


def typed(cls):
    """Class decorator (under @dataclass): before the class's own checks, every int and
    float field holds one (an int not a bool, a float finite): `steps = 2.5`, `rank = True`,
    `eps = "1e-6"` or a NaN / inf rate fail here in one line, not after compiling or as NaN
    parameters saved."""
    own = cls.__dict__.get("__post_init__")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            kind, value = f.type.replace(" | None", ""), getattr(self, f.name)
            if kind not in ("int", "float") or (value is None and f.type.endswith("| None")):
                continue
            whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            if kind == "int" and not whole:
                raise ValueError(f"{cls.__name__}.{f.name}={value!r}: must be an integer")
            real = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if kind == "float" and not (whole or (real and math.isfinite(value))):
                raise ValueError(f"{cls.__name__}.{f.name}={value!r}: must be a finite number")
        if own:
            own(self)

    cls.__post_init__ = __post_init__
    return cls


def flag(default, help: str, positive: bool = False):
    """A field that is also a command-line flag of the commands that take its dataclass
    (`mqt-jax eval --questions`, `serve --slots`, ...): declared once, here, with its help;
    `positive`: the flag takes integers >= 1 only (the parser refuses others)."""
    return dataclasses.field(default=default, metadata={"flag": help, "positive": positive})


def gin_bindings(part) -> list[str]:
    """Gin lines that rebuild a config dataclass (`VisionConfig.width = 1024`, ...); nested
    configs (LLMConfig.lora) are left to their own defaults."""
    name = type(part).__name__
    return [f"{name}.{f.name} = {getattr(part, f.name)!r}" for f in dataclasses.fields(part)
            if not dataclasses.is_dataclass(getattr(part, f.name))]


def check_m(m, num_queries: int) -> np.ndarray:
    """m as an int32 array, or a ValueError naming every value outside [1, M]."""
    values = np.asarray(m)
    if values.dtype == object and all(isinstance(v, int) and not isinstance(v, bool)
                                      for v in values.ravel()):  # Python ints beyond int64
        bad = [v for v in values.ravel().tolist() if not 1 <= v <= num_queries]
    elif not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"m must be integers, got dtype {values.dtype}")
    else:
        bad = values[(values < 1) | (values > num_queries)].tolist()
    if bad:
        raise ValueError(f"m={sorted(set(bad))} outside [1, {num_queries}] (M = num_queries)")
    return values.astype(np.int32)


# Compressor classes by name: each file of mqt_jax/compressors registers its class here, so a
# config names a compressor and asks it what depends on it without importing it.
COMPRESSORS: dict[str, type] = {}


def compressor_named(name: str) -> type:
    if name not in COMPRESSORS:
        raise ValueError(f"QueryTransformerConfig.variant={name!r}: expected one of "
                         f"{tuple(COMPRESSORS) or '(none registered: import mqt_jax.compressors)'}")
    return COMPRESSORS[name]


@gin.configurable
@dataclasses.dataclass(frozen=True)
@typed
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
        if not self.layer_norm_eps > 0:
            raise ValueError(f"VisionConfig.layer_norm_eps={self.layer_norm_eps!r}: must be > 0")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"VisionConfig.image_size={self.image_size} is not a multiple of "
                f"patch_size={self.patch_size}"
            )
        self.num_layers_built  # validates select_layer


@gin.configurable
@dataclasses.dataclass(frozen=True)
@typed
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
    # official only: s > 0 starts the key projection as s x the query projection, so each
    # query first attends near its own grid place (0: the released random initialisation).
    local_init: float = 0.0
    # m3 only: the token counts it serves (squares whose side divides the patch grid); empty:
    # every such square (1, 4, 9, 16, 36, 64, 144, 576 at 24 x 24 patches).
    scales: tuple[int, ...] = ()

    def __post_init__(self):
        positive(self, "num_queries", "width", "num_heads", "num_layers", "mlp_dim")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"QueryTransformerConfig.layer_norm_eps={self.layer_norm_eps!r}: "
                             f"must be > 0")
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
        if self.local_init < 0 or (self.local_init and self.variant != "official"):
            raise ValueError(f"QueryTransformerConfig.local_init={self.local_init}: a factor "
                             f">= 0, for the official resampler only (variant={self.variant!r})")


# target -> the Dense layer it names in the LLaMA decoder layer
TARGETS = {"q": "attn/query", "k": "attn/key", "v": "attn/value", "o": "attn/out",
           "gate": "mlp/fc1", "up": "mlp/up", "down": "mlp/fc2"}


@gin.configurable
@dataclasses.dataclass(frozen=True)
@typed
class LoRAConfig:
    """rank 0: no adapters (the default). LLaVA-1.5's LoRA recipe: rank 128, alpha 256,
    dropout 0.05, every target. Dropout applies in training only (when the step passes a
    "dropout" rng)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(TARGETS)

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"LoRAConfig.rank={self.rank!r}: expected an integer >= 0")
        if not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha={self.alpha!r}: expected > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig.dropout={self.dropout!r}: expected in [0, 1)")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"LoRAConfig.targets={self.targets!r}: expected some of {tuple(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def on(self, target: str) -> LoRAConfig | None:
        """This config for the Dense layer of `target`, or None when it is not adapted."""
        return self if self.rank and target in self.targets else None


@gin.configurable
@dataclasses.dataclass(frozen=True)
@typed
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
        for name in ("rope_theta", "rms_norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LLMConfig.{name}={getattr(self, name)!r}: must be > 0")


@gin.configurable
@dataclasses.dataclass(frozen=True)
@typed
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

    @property
    def compressor(self) -> type:
        """The compressor class `query.variant` names (a mqt_jax.compressors.Compressor):
        what it is and can do."""
        return compressor_named(self.query.variant)

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


@gin.configurable
@dataclasses.dataclass(frozen=True)
@typed
class MeshConfig:
    """Size of each mesh axis; one of them may be -1, meaning "all remaining devices"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # Multislice: the `data` axis spans this many TPU slices (over the data-center network);
    # fsdp and tensor stay within a slice. `data` must be a multiple of it.
    slices: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh {self}: sizes must be positive, with at most one -1")
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"mesh {self} does not divide {num_devices} devices "
                    f"({num_devices} is not a multiple of {known})"
                )
            sizes[sizes.index(-1)] = num_devices // known
        if int(np.prod(sizes)) != num_devices:
            raise ValueError(
                f"mesh {self} has {int(np.prod(sizes))} devices but {num_devices} are available"
            )
        return tuple(sizes)


PAPER_TOKEN_COUNTS = (2, 4, 8, 16, 36, 64, 144, 256)


DISTRIBUTIONS = ("official", "log_uniform", "fixed_set", "constant", "all")


@gin.configurable
@dataclasses.dataclass(frozen=True)
@typed
class MSampler:
    """distribution:
    - "official": uniform over the even values 2, 4, ..., M (MQT-LLaVA stage 2);
    - "log_uniform": log m uniform on [log 1, log (M+1)), floored: small m drawn more often;
    - "fixed_set": uniform over `values` (those <= M);
    - "constant": always `constant` (None = M; MQT-LLaVA stage 1);
    - "all": every one of `values` (those <= M) for every example, M3's training rule: the
      pipeline trains each example once per scale, its copies in the same batch, so the
      token-mean loss is the mean over scales of each scale's loss.
    per: "example" (one draw per image) or "batch" (one draw shared by the whole batch).
    """

    distribution: str = "official"
    values: tuple[int, ...] = PAPER_TOKEN_COUNTS
    constant: int | None = None
    per: str = "example"

    def __post_init__(self):
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"MSampler.distribution={self.distribution!r}: expected one of {DISTRIBUTIONS}"
            )
        if self.per not in ("example", "batch"):
            raise ValueError(f"MSampler.per={self.per!r}: expected 'example' or 'batch'")
        if self.distribution == "all" and self.per == "batch":
            raise ValueError("MSampler.distribution='all' trains every scale per example; "
                             "per='batch' draws one m per batch: choose one")

    def support(self, num_queries: int) -> np.ndarray:
        """The values m can take for a query transformer of M = num_queries."""
        if self.distribution == "official":
            values = np.arange(2, num_queries + 1, 2)
        elif self.distribution == "log_uniform":
            values = np.arange(1, num_queries + 1)
        elif self.distribution == "fixed_set":
            values = np.array([v for v in self.values if 1 <= v <= num_queries])
        elif self.distribution == "all":
            values = np.array(sorted({v for v in self.values if 1 <= v <= num_queries}))
        else:
            values = np.array([num_queries if self.constant is None else self.constant])
        if values.size == 0 or values.min() < 1 or values.max() > num_queries:
            raise ValueError(
                f"MSampler({self.distribution}, values={self.values}, constant={self.constant}) "
                f"has no valid m in [1, {num_queries}]"
            )
        return values

    def copies(self, num_queries: int) -> int:
        """How many times each example is trained per step: one, or one per scale ("all")."""
        return len(self.support(num_queries)) if self.distribution == "all" else 1

    def sample(self, num_queries: int, shape: tuple[int, ...], seed: int, *keys: int) -> np.ndarray:
        """int32 array of `shape`, a deterministic function of (seed, *keys); with "all",
        [copies, *shape]: copy k at the k-th scale."""
        values = self.support(num_queries)
        if self.distribution == "all":
            return np.broadcast_to(values.astype(np.int32).reshape((-1,) + (1,) * len(shape)),
                                   (len(values), *shape)).copy()
        rng = np.random.default_rng([seed, *keys])
        draw_shape = shape if self.per == "example" else ()
        if self.distribution == "log_uniform":
            m = np.floor(np.exp(rng.uniform(0.0, np.log(num_queries + 1), draw_shape)))
            m = np.clip(m, 1, num_queries)
        else:
            m = rng.choice(values, draw_shape)
        return np.broadcast_to(np.asarray(m, np.int32), shape).copy()


@gin.configurable
@dataclasses.dataclass(frozen=True)
@typed
class DataConfig:
    data_path: str = ""  # a LLaVA training file: JSON list or JSON Lines
    image_root: str = ""  # folder the records' "image" paths are relative to
    tfds_dir: str = ""  # or: a prepared shapes_vqa TFDS dataset (data_dir) ...
    tfds_split: str = "qa"  # ... and its split ("captions" or "qa")
    tokenizer_dir: str = ""  # holds tokenizer.model (sentencepiece) or tokenizer.json
    template: str = "vicuna_v1"  # "plain" for stage 1
    image_mode: str = "pad"  # "pad" to square with the mean colour (LLaVA-1.5), or "crop"
    pack: bool = False  # several examples per row, first-fit on their true length
    strict: bool = False  # raise on the first bad record instead of skipping it
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    num_workers: int = 0  # grain worker processes for decode/preprocess/tokenize


@gin.configurable
@dataclasses.dataclass(frozen=True)
@typed
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # global, rows per step
    grad_accum_steps: int = 1  # micro-batches per step (each batch_size / grad_accum_steps rows)
    seq_len: int = 128
    images_per_row: int = 1
    learning_rate: float = 1e-3
    warmup_fraction: float = 0.03
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0
    # Regexes matched (re.match) against "/"-joined parameter paths such as
    # "query_transformer/attn/query/kernel". `frozen` wins over `trainable`.
    trainable: tuple[str, ...] = ("query_transformer",)
    frozen: tuple[str, ...] = (r"query_transformer/pos_embed$",)  # fixed sin-cos table
    # Start from another run's parameters (e.g. stage 2 from stage 1): its workdir or
    # checkpoints folder, taking the parameters that match `init_from_params`; or a dict
    # {run: (regexes, ...)} taking parts of several runs (the vision tower of one, the LLM of
    # another). A relative path names a sibling of this run's workdir when there is one, else
    # a path from the working directory. The parameters not taken keep their initialisation.
    init_from: str | dict = ""
    init_from_params: tuple[str, ...] = (".*",)
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at the end and on SIGTERM
    max_to_keep: int = 3
    # Updates with a non-finite loss or gradient are skipped; this many in a row stop the run.
    max_nonfinite_in_a_row: int = 3

    def __post_init__(self):
        at_least = {"steps": 1, "batch_size": 1, "grad_accum_steps": 1, "seq_len": 2,
                    "images_per_row": 1, "log_every": 1, "checkpoint_every": 0,
                    "max_to_keep": 1, "max_nonfinite_in_a_row": 1, "learning_rate": 0,
                    "weight_decay": 0}
        for name, low in at_least.items():
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low:
                why = " (the final checkpoint must be kept)" if name == "max_to_keep" else ""
                raise ValueError(f"TrainConfig.{name}={value!r}: must be a number >= {low}{why}")
        for name in ("b1", "b2", "warmup_fraction"):
            if not 0 <= getattr(self, name) < 1 + (name == "warmup_fraction"):
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: must be in [0, 1"
                                 + ("]" if name == "warmup_fraction" else ")"))
        if not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip={self.grad_clip!r}: must be > 0")
        sources = self.init_from if isinstance(self.init_from, dict) else {"": self.init_from_params}
        if not isinstance(self.init_from, (str, dict)) or not all(
                isinstance(k, str) and k for k in sources if isinstance(self.init_from, dict)):
            raise ValueError(f"TrainConfig.init_from={self.init_from!r}: a run's path, or a dict "
                             f"{{path: (regexes, ...)}}")
        named = {"trainable": self.trainable, "frozen": self.frozen,
                 **{"init_from_params" if not k else f"init_from[{k!r}]": v for k, v in sources.items()}}
        for name, patterns in named.items():
            if isinstance(patterns, str) or not isinstance(patterns, (tuple, list)) \
                    or not all(isinstance(p, str) for p in patterns):
                raise ValueError(f"TrainConfig.{name}={patterns!r}: a tuple of regexes, "
                                 f"e.g. ('query_transformer',)")
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"TrainConfig.{name}: {pattern!r} is not a regex ({e})") from None


@gin.configurable
@dataclasses.dataclass(frozen=True)
@typed
class CLIPConfig:
    steps: int = 600
    batch_size: int = 128  # pairs per step: each image's negatives are the other captions
    learning_rate: float = 1e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    embed_dim: int = 128  # the joint embedding
    # The text encoder: a small causal LLaMA, pooled at the caption's EOS (as CLIP's at EOT).
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "embed_dim", "text_width", "text_layers", "text_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CLIPConfig.{name}={value!r}: must be an integer >= 1")
        if self.text_width % self.text_heads or (self.text_width // self.text_heads) % 2:
            raise ValueError(f"CLIPConfig.text_width={self.text_width} must split into "
                             f"text_heads={self.text_heads} heads of an even width")
        if not self.learning_rate > 0 or not 0 <= self.warmup_fraction <= 1:
            raise ValueError(f"CLIPConfig: learning_rate={self.learning_rate!r} must be > 0 and "
                             f"warmup_fraction={self.warmup_fraction!r} in [0, 1]")


@gin.configurable
@dataclasses.dataclass(frozen=True)
@typed
class EvalConfig:
    benchmark: str = flag("shapes", "the benchmark (a file of mqt_jax/evaluation/benchmarks)")
    questions: str = flag("", "its question file in LLaVA's format (MMBench: its TSV); empty: "
                          "no evaluation")
    answers: str = flag("", "its references (not needed by MMBench, LLaVA-Bench, MM-Vet)")
    image_root: str = flag("", "the folder the question file's image paths are relative to")
    tokenizer_dir: str = ""
    template: str = "vicuna_v1"
    image_mode: str = "pad"
    m_values: tuple[int, ...] = (1, 2, 4, 8, 16, 36, 64)  # capped at M; M itself is added
    batch_size: int = 64
    max_new_tokens: int = 8
    bucket: int = 16  # prompt lengths round up to a multiple of this (one compile per bucket)
    limit: int = flag(0, "only the first LIMIT questions (a quick look)", positive=True)
    # A validation split (never the held-out questions) that calibrates m chosen per query
    # (`mqt-jax eval --m auto`).
    val_questions: str = flag("", "--m auto: the validation split that calibrates the "
                              "escalation threshold and the router")
    val_answers: str = flag("", "--m auto: the validation split's references")
    # A training split's questions, whose per-m correctness trains the m router (the first
    # `router_questions` of them).
    train_questions: str = flag("", "--m auto: the training split the router learns from")
    train_answers: str = flag("", "--m auto: the training split's references")
    router_questions: int = 2000
    # Questions whose visual tokens are computed once for every m and held on the host at once
    # (M x hidden each: 4 MB at 7B in float32).
    reuse_chunk: int = 1024

    def __post_init__(self):
        if not isinstance(self.limit, int) or isinstance(self.limit, bool) or self.limit < 0:
            raise ValueError(f"EvalConfig.limit={self.limit!r}: must be an integer >= 0")


POLICIES = ("mixed", "per_m", "static")


@gin.configurable
@dataclasses.dataclass(frozen=True)
@typed
class EngineConfig:
    slots: int = flag(8, "rows decoded together (a multiple of the mesh's data x fsdp devices)",
                     positive=True)
    cache_len: int = flag(1024, "KV slots per row: prompt (text + m visual tokens) + answer",
                          positive=True)
    prefill_batch: int = flag(4, "rows per prefill (rounded up to a multiple of the batch "
                              "devices)", positive=True)
    bucket: int = flag(32, "prompt lengths round up to a multiple of this", positive=True)
    max_queue: int = flag(256, "requests waiting beyond this are refused (HTTP 429)",
                          positive=True)
    vision_cache_mb: float = flag(256.0, "visual tokens kept per image, in MB (0: no cache)")
    # "mixed": any m shares a batch; "per_m": a batch holds one m at a time (what a server
    # that cannot mix m must do); "static": a batch is admitted only into an empty engine and
    # runs to its longest answer (classic static batching). The last two are for comparison.
    policy: str = flag("mixed", "mixed: any m shares a batch; per_m and static are for "
                       "comparison")

    def __post_init__(self):
        for name in ("slots", "cache_len", "prefill_batch", "bucket", "max_queue"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name}={getattr(self, name)!r} must be an integer >= 1")
        if self.vision_cache_mb < 0:
            raise ValueError(f"EngineConfig.vision_cache_mb={self.vision_cache_mb} must be >= 0")
        if self.policy not in POLICIES:
            raise ValueError(f"EngineConfig.policy={self.policy!r}: expected one of {POLICIES}")


@dataclasses.dataclass(frozen=True)
@typed
class SamplingConfig:
    """How an answer is drawn (per request; `mqt-jax generate` takes its flags)."""

    temperature: float = flag(0.0, "0: greedy")
    top_p: float = flag(1.0, "nucleus: sample from the smallest set of tokens holding this mass")
    max_new_tokens: int = flag(32, "the longest answer, in tokens", positive=True)
    stop: tuple[str, ...] = flag((), "the answer ends before the first of these strings "
                                 "(repeatable)")
    seed: int = flag(0, "the sampling seed")

    def __post_init__(self):
        if isinstance(self.stop, str):
            raise ValueError(f"SamplingConfig.stop={self.stop!r} must be a tuple of strings")
        object.__setattr__(self, "stop", tuple(self.stop))  # hashable, whatever was passed
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p={self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens={self.max_new_tokens} must be >= 1")


@gin.configurable
@dataclasses.dataclass(frozen=True)
@typed
class Recipe:
    # Gin scopes trained one after another, each in W/<stage>; bindings scoped to a stage
    # (`stage2/TrainConfig.steps = ...`) override the unscoped ones. Empty: one run in W.
    stages: tuple[str, ...] = ()
    # Generate shapes-VQA into this folder first when it does not exist (the default data).
    shapes_dir: str = ""
    # Stage 0, cached in this folder (a second run skips what is there): a mini-CLIP trained
    # on the first stage's image-caption pairs (its DataConfig), its vision side written as a
    # CLIPVisionModel folder (P/clip-vit) and converted into P/clip; and the LLM pretrained as
    # a language model in the gin scope `pretrain_llm` (a training run in P/llm). Empty: none.
    pretrained: str = ""


@gin.configurable
@dataclasses.dataclass(frozen=True)
@typed
class Sweep:
    base: tuple[str, ...] = ("tiny_two_stage.gin",)  # gin files of every run
    common: tuple[str, ...] = ()  # bindings of every run, e.g. "stage2/TrainConfig.steps = 100"
    methods: dict = dataclasses.field(default_factory=dict)  # method -> {binding: value | [values]}

    def __post_init__(self):
        if not self.methods:
            raise ValueError("Sweep.methods is empty: bind the methods to compare")
        for method, spec in self.methods.items():
            if not isinstance(spec, dict):
                raise ValueError(f"Sweep.methods[{method!r}] must map bindings to values, "
                                 f"got {type(spec).__name__}")


@gin.configurable
@dataclasses.dataclass(frozen=True)
@typed
class ShapesConfig:
    """shapes-VQA as the recipe generates it (`Recipe.shapes_dir`) and `mqt-jax data shapes`
    writes it."""

    num_train: int = flag(2000, "training images", positive=True)
    num_eval: int = flag(300, "held-out images (5 questions each)", positive=True)
    num_val: int = flag(200, "validation images, drawn apart for choosing a recipe")
    seed: int = flag(0, "the scenes' seed")
    image_size: int = flag(64, "image side in pixels", positive=True)
    vocab_size: int = flag(512, "the sentencepiece tokenizer's vocabulary", positive=True)
    tfds: bool = flag(True, "also build a TFDS (ArrayRecord) copy")
    question_types: tuple[str, ...] = flag((), "the question types asked of every image, in "
                                           "order (repeatable; default: data/shapes.py's five)")
    questions_per_image: int = flag(0, "distinct questions in a training conversation (0: one "
                                    "of each type, the ones scored)")
    describe: bool = flag(True, "training conversations also ask for a detailed description")


@gin.configurable
@dataclasses.dataclass(frozen=True)
@typed
class ServeConfig:
    """`mqt-jax serve`: what the HTTP side accepts (the engine's settings are EngineConfig)."""

    default_m: int | None = flag(None, "m for requests that do not give one (a request's extra "
                                 "field \"m\" overrides it)", positive=True)
    model_name: str = flag("", "the name clients send (default: the run folder's)")
    image_root: str = flag("", "the folder local image paths may name (default: none; data: "
                           "URLs always work)")
    max_image_mb: float = flag(20.0, "the largest image a request may carry")
    default_max_tokens: int = 256

    def __post_init__(self):
        if self.default_m is not None and (not isinstance(self.default_m, int)
                                           or self.default_m < 1):
            raise ValueError(f"ServeConfig.default_m={self.default_m!r}: must be an integer >= 1")
        if not self.max_image_mb > 0:
            raise ValueError(f"ServeConfig.max_image_mb={self.max_image_mb!r}: must be > 0")

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 2**20)

    @property
    def max_body_bytes(self) -> int:
        """A request body: room for the largest image as base64 (4 bytes per 3) twice over,
        and 1 MiB for the rest."""
        return self.max_image_bytes * 8 // 3 + 2**20


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One training stage's settings, read from gin once (in the stage's scope) and passed to
    what runs it: nothing below reads gin again."""

    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    sampler: MSampler
    mesh: MeshConfig
    evaluation: EvalConfig
    clip: CLIPConfig

    @classmethod
    def read(cls, scope: str = "") -> StageConfig:
        with gin.config_scope(scope) if scope else contextlib.nullcontext():
            return cls(ModelConfig(), TrainConfig(), DataConfig(), MSampler(), MeshConfig(),
                       EvalConfig(), CLIPConfig())
