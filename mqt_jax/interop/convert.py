"""Hugging Face checkpoints <-> mqt_jax parameters.

Import (`mqt-jax convert`): CLIP vision towers, LLaMA / Vicuna, LLaVA-1.5 (its `mlp2x_gelu`
projector) and the released MQT-LLaVA (its resampler, `model.query_abstractor.*`). A table of
`Rule`s says which Hugging Face tensor becomes which (slice of which) parameter; every key,
shape and dtype is checked against it before any data is read. Tensors are then read one at a
time and placed straight into their shardings on the mesh (a scanned layer stack is filled
layer by layer), so host memory holds about one tensor, never the model. The result is an
orbax checkpoint with a config.gin beside it, written under a temporary name and renamed into
place when complete: `mqt-jax generate/eval --workdir OUT` opens it, and training starts from
it with `TrainConfig.init_from = "OUT"`.

Export (`mqt-jax export --kind llama`): a run's LLM as a Hugging Face LLaMA folder; stage 0's
mini-CLIP writes its vision side as a CLIPVisionModel folder (`export_clip_vision`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from tqdm.auto import tqdm

from mqt_jax import compressors
from mqt_jax.config import (
    DTYPES,
    LLMConfig,
    LoRAConfig,
    MeshConfig,
    ModelConfig,
    QueryTransformerConfig,
    VisionConfig,
    gin_bindings,
)
from mqt_jax.core import hf, sharding
from mqt_jax.core.checkpoint import abstract_like
from mqt_jax.core.hf import Rule, linear, norm
from mqt_jax.models import vlm
from mqt_jax.models.llama import Llama
from mqt_jax.models.vision_tower import VisionTower

# A LLaVA-layout folder's compressor, by --kind: each compressor that can be converted names
# its kind and reads its own weights (mqt_jax/compressors).
CHECKPOINT_KINDS = {c.checkpoint_kind: c for c in compressors.REGISTRY.values() if c.checkpoint_kind}
KINDS = ("clip-vision", "llama", *CHECKPOINT_KINDS)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


def clip_rules(v: VisionConfig, p: str) -> list[Rule]:
    """CLIPVisionModel under key prefix p; only the layers up to the selected one."""
    d, ours = v.width, "vision_tower/"
    rules = [Rule(p + "embeddings.patch_embedding.weight", (d, 3, v.patch_size, v.patch_size),
                  ours + "patch_embed/kernel", layout="conv"),
             Rule(p + "embeddings.class_embedding", (d,), ours + "class_embed"),
             Rule(p + "embeddings.position_embedding.weight", (v.num_patches + 1, d),
                  ours + "pos_embed"),
             *norm(p + "pre_layrnorm", d, ours + "pre_ln")]
    for i in range(v.num_layers_built):
        k, layer = f"{p}encoder.layers.{i}.", ours + "layers/"
        rules += norm(k + "layer_norm1", d, layer + "ln1", i) + norm(k + "layer_norm2", d, layer + "ln2", i)
        for theirs, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"),
                             ("out_proj", "out")):
            rules += linear(f"{k}self_attn.{theirs}", d, d, f"{layer}attn/{name}", i)
        rules += linear(k + "mlp.fc1", d, v.mlp_dim, layer + "mlp/fc1", i)
        rules += linear(k + "mlp.fc2", v.mlp_dim, d, layer + "mlp/fc2", i)
    return rules


def clip_unused(v: VisionConfig, p: str) -> list[str]:
    """Regexes of CLIP keys deliberately not read: layers after the selected one, the final
    LayerNorm (features are a hidden state), and a full CLIPModel's text side."""
    later = "|".join(str(i) for i in range(v.num_layers_built, v.num_layers)) or "-"
    return [re.escape(p) + rf"encoder\.layers\.({later})\.", re.escape(p) + r"post_layernorm\.",
            re.escape(p) + r"embeddings\.position_ids", r"text_model\.", r"visual_projection\.",
            r"text_projection\.", r"logit_scale"]


def llama_rules(c: LLMConfig, p: str, head: str) -> list[Rule]:
    """LlamaForCausalLM: decoder under prefix p, output head at key `head` (the embedding's key
    when the checkpoint ties them)."""
    h, ours = c.hidden, "llm/"
    rules = [Rule(p + "embed_tokens.weight", (c.vocab_size, h), ours + "embedding"),
             Rule(p + "norm.weight", (h,), ours + "final_norm/scale"),
             Rule(head, (c.vocab_size, h), ours + "lm_head/kernel", layout="linear")]
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    for i in range(c.num_layers):
        k, layer = f"{p}layers.{i}.", ours + "layers/"
        rules += norm(k + "input_layernorm", h, layer + "attn_norm", i, bias=False)
        rules += norm(k + "post_attention_layernorm", h, layer + "mlp_norm", i, bias=False)
        for theirs, name, n_in, n_out in (("q_proj", "query", h, q), ("k_proj", "key", h, kv),
                                          ("v_proj", "value", h, kv), ("o_proj", "out", q, h)):
            rules += linear(f"{k}self_attn.{theirs}", n_in, n_out, f"{layer}attn/{name}", i, bias=False)
        for theirs, name, n_in, n_out in (("gate_proj", "fc1", h, c.mlp_dim),
                                          ("up_proj", "up", h, c.mlp_dim),
                                          ("down_proj", "fc2", c.mlp_dim, h)):
            rules += linear(f"{k}mlp.{theirs}", n_in, n_out, f"{layer}mlp/{name}", i, bias=False)
    return rules


# ---- configs: config.json -> our dataclasses, refusing what the models here cannot run ----

def unsupported(source, what: str) -> ValueError:
    return ValueError(f"{source}: {what}; mqt_jax converts CLIP ViT vision towers and LLaMA "
                      "decoders (LLaVA-1.5, MQT-LLaVA) only")


def named(source, config_class, **fields):
    """config_class(**fields), its refusal naming the file the fields came from."""
    try:
        return config_class(**fields)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def vision_config(cfg: dict, select_layer: int, source) -> VisionConfig:
    if cfg.get("model_type") == "clip":
        cfg = cfg.get("vision_config") or {}
    if cfg.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise unsupported(source, f"model_type {cfg.get('model_type')!r} is not a CLIP vision model")
    if cfg.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise unsupported(source, f"hidden_act {cfg['hidden_act']!r} (CLIP uses quick_gelu)")
    # CLIPVisionConfig's defaults for what an older config.json leaves out.
    return named(
        source, VisionConfig, image_size=cfg.get("image_size", 224), patch_size=cfg.get("patch_size", 32),
        width=cfg.get("hidden_size", 768), num_layers=cfg.get("num_hidden_layers", 12),
        num_heads=cfg.get("num_attention_heads", 12), mlp_dim=cfg.get("intermediate_size", 3072),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5), select_layer=select_layer)


def llm_config(cfg: dict, source) -> LLMConfig:
    if cfg.get("hidden_act", "silu") != "silu":
        raise unsupported(source, f"hidden_act {cfg['hidden_act']!r} (LLaMA uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise unsupported(source, f"{flag} is set (LLaMA has no biases)")
    rope = cfg.get("rope_parameters") or {}
    if cfg.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise unsupported(source, f"RoPE scaling {cfg.get('rope_scaling') or rope}")
    need = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")
            if not isinstance(cfg.get(k), int) or isinstance(cfg.get(k), bool) or cfg[k] < 1]
    heads = cfg.get("num_attention_heads", 32)
    if not isinstance(heads, int) or heads < 1:
        need.append("num_attention_heads")
    if need:
        raise ValueError(f"{source}: {', '.join(need)} missing or not a positive integer")
    return named(
        source, LLMConfig, vocab_size=cfg["vocab_size"], hidden=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        mlp_dim=cfg["intermediate_size"], rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_length=cfg.get("max_position_embeddings") or 4096,
        rope_theta=cfg.get("rope_theta") or rope.get("rope_theta", 10000.0),
        lora=LoRAConfig(rank=0))  # a Hugging Face LLaMA has no adapters (training adds them)


def find_prefix(keys, anchor: str, prefixes: tuple[str, ...]) -> str | None:
    return next((p for p in prefixes if p + anchor in keys), None)


CLIP_PREFIXES = ("", "vision_model.", "vision_tower.", "vision_tower.vision_model.",
                 "model.vision_tower.", "model.vision_tower.vision_model.",
                 "model.vision_tower.vision_tower.vision_model.",
                 "model.vision_tower.vision_tower.")  # transformers 5 drops "vision_model."
LLAMA_PREFIXES = ("model.", "language_model.model.", "model.language_model.")
HEADS = ("lm_head.weight", "language_model.lm_head.weight")


@dataclasses.dataclass
class Plan:
    """What a conversion reads from where, and what it builds."""

    model_config: ModelConfig
    parts: tuple[str, ...]  # top-level parameter groups built: vision_tower, query_transformer, llm
    sources: list[tuple[hf.CheckpointFolder, list[Rule], list[str]]]  # (folder, rules, unused)
    tokenizer_dir: Path | None
    template: str = "vicuna_v1"


# The released MQT-LLaVA builds its resampler with 16 heads whatever the width.
RELEASED_RESAMPLER_HEADS = 16


def plan(kind: str, src: Path, vision: Path | None = None, param_dtype: str = "float32",
         dtype: str | None = None, allow_bin: bool = True,
         resampler_heads: int = RELEASED_RESAMPLER_HEADS) -> Plan:
    """Everything a conversion needs, checked: configs parsed, weights' keys, shapes and
    dtypes matched against the rules. Reads no tensor data."""
    if kind not in KINDS:
        raise ValueError(f"--kind {kind!r}: expected one of {KINDS}")
    for flag, value in (("--param_dtype", param_dtype), ("--dtype", dtype or param_dtype)):
        if value not in DTYPES:
            raise ValueError(f"{flag} {value!r}: expected one of {DTYPES}")
    folder = hf.CheckpointFolder(src, allow_bin)
    cfg = hf.read_config(src)
    keys, source = set(folder.keys()), src / "config.json"
    dtypes = dict(param_dtype=param_dtype, dtype=dtype or param_dtype)
    tokenizer = src if any((src / f).is_file() for f in TOKENIZER_FILES[:2]) else None
    for name in TOKENIZER_FILES:  # copied into the run: from inside src only
        if (src / name).is_file():
            hf.own_file(src, name)

    if kind == "clip-vision":
        v = vision_config(cfg, -2, source)
        p = find_prefix(keys, "embeddings.patch_embedding.weight", CLIP_PREFIXES[:2]) or ""
        # The parts not built keep their defaults; the official resampler must match the width.
        model = ModelConfig(vision=v, query=QueryTransformerConfig(width=v.width, num_heads=1),
                            **dtypes)
        return Plan(model, ("vision_tower",), [(folder, clip_rules(v, p), clip_unused(v, p))], None)

    if kind == "llama":
        if cfg.get("model_type") != "llama":
            raise unsupported(source, f"model_type {cfg.get('model_type')!r} is not llama")
        c = llm_config(cfg, source)
        head = "lm_head.weight" if not cfg.get("tie_word_embeddings") else "model.embed_tokens.weight"
        model = ModelConfig(llm=c, **dtypes)  # the parts not built keep their defaults
        unused = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]
        return Plan(model, ("llm",), [(folder, llama_rules(c, "model.", head), unused)], tokenizer)

    # LLaVA-1.5 / MQT-LLaVA: the Hugging Face layout (config.json with text_config and
    # vision_config) or the original one (LLaMA fields at the top, mm_* fields, the CLIP tower
    # named by mm_vision_tower: give its folder as `vision`).
    nested = "text_config" in cfg
    text = cfg["text_config"] if nested else cfg
    if cfg.get("model_type") not in ("llava", "llava_llama", "mqt_llava", "llava_mqt"):
        raise unsupported(source, f"model_type {cfg.get('model_type')!r} is not a LLaVA model")
    if nested and text.get("model_type", "llama") != "llama":
        raise unsupported(source, f"text_config.model_type {text.get('model_type')!r}")
    c = llm_config(text, source)
    select = cfg.get("vision_feature_layer", cfg.get("mm_vision_select_layer", -2))
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if cfg.get("mm_vision_select_feature", "patch") != "patch" or strategy != "default":
        raise unsupported(source, "image features with the class token (mqt_jax drops it)")
    vision_source = vision or _local_tower(cfg, src)
    clip_prefix = find_prefix(keys, "embeddings.patch_embedding.weight", CLIP_PREFIXES)
    if "vision_config" in cfg:
        v = vision_config({**cfg["vision_config"], "model_type": "clip_vision_model"}, select, source)
    elif vision_source:
        v = vision_config(hf.read_config(vision_source), select, vision_source / "config.json")
    else:
        raise ValueError(f"{source} describes no vision tower: give --vision, the CLIP folder "
                         f"it names as mm_vision_tower ({cfg.get('mm_vision_tower')})")
    llm_prefix = find_prefix(keys, "embed_tokens.weight", LLAMA_PREFIXES)
    if llm_prefix is None:
        raise ValueError(f"{src}: no LLaMA weights (looked for embed_tokens.weight under "
                         f"{LLAMA_PREFIXES})")
    head = find_prefix(keys, "", HEADS) if not text.get("tie_word_embeddings") else None
    rules = llama_rules(c, llm_prefix, head or llm_prefix + "embed_tokens.weight")
    unused = [re.escape(llm_prefix) + r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]
    fields, compressor_rules = CHECKPOINT_KINDS[kind].checkpoint(
        folder, v, c.hidden, source, config=cfg, resampler_heads=resampler_heads)
    q = QueryTransformerConfig(**fields)
    rules += compressor_rules
    model = ModelConfig(vision=v, query=q, llm=c, **dtypes)
    sources = [(folder, rules, unused)]
    if clip_prefix is not None:
        sources[0] = (folder, rules + clip_rules(v, clip_prefix), unused + clip_unused(v, clip_prefix))
    elif vision_source:
        tower = hf.CheckpointFolder(vision_source, allow_bin)
        p = find_prefix(set(tower.keys()), "embeddings.patch_embedding.weight", CLIP_PREFIXES[:2]) or ""
        sources.append((tower, clip_rules(v, p), clip_unused(v, p)))
    else:
        raise ValueError(f"{src} holds no vision tower weights: give --vision, the CLIP folder "
                         f"({cfg.get('mm_vision_tower')})")
    parts = ("vision_tower", "query_transformer", "llm")
    return Plan(model, parts, sources, tokenizer, template="vicuna_v1")


def _local_tower(cfg: dict, src: Path) -> Path | None:
    """The CLIP folder mm_vision_tower names, when it is a folder inside src (a hub name,
    an absolute path or a `..` step is never followed: give --vision)."""
    name = cfg.get("mm_vision_tower")
    if not isinstance(name, str) or not name or not hf.inside(src, name):
        return None
    return src / name if (src / name / "config.json").is_file() else None


def check_source(folder: hf.CheckpointFolder, rules: list[Rule], unused: list[str]) -> None:
    """Missing keys, unexpected keys, shapes and dtypes: all checked before any read."""
    wanted = {r.hf_key: r for r in rules}
    have = set(folder.keys())
    missing = sorted(set(wanted) - have)
    if missing:
        raise ValueError(f"{folder.folder} lacks {len(missing)} tensor(s): {missing[:5]}"
                         + (" ..." if len(missing) > 5 else ""))
    extra = sorted(k for k in have - set(wanted) if not any(re.match(u, k) for u in unused))
    if extra:
        raise ValueError(f"{folder.folder} has {len(extra)} tensor(s) this conversion does not "
                         f"know: {extra[:5]}" + (" ..." if len(extra) > 5 else ""))
    for key, rule in wanted.items():
        if folder.shape(key) != rule.hf_shape:
            raise ValueError(f"{folder.folder}: tensor {key} has shape {folder.shape(key)}; "
                             f"config.json implies {rule.hf_shape}")
        if folder.dtype(key) not in hf.FLOAT_DTYPES:
            raise ValueError(f"{folder.folder}: tensor {key} is {folder.dtype(key)}, not a "
                             f"floating-point weight")


# ---- placing parameters on the mesh ----

def abstract_params(model_config: ModelConfig, parts: tuple[str, ...], mesh) -> dict:
    """ShapeDtypeStructs, with shardings on `mesh`, of the parts built: the whole model, or
    one tower (nested under its name)."""
    if len(parts) > 1:
        return vlm.abstract_params(model_config, mesh)
    (part,), cfg = parts, model_config
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    if part == "vision_tower":
        size = cfg.vision.image_size
        module, args = VisionTower(cfg.vision, **kw), (jnp.zeros((1, size, size, 3)),)
    else:
        z = jnp.zeros((1, 1), jnp.int32)
        module, args = Llama(cfg.llm, **kw), (jnp.zeros((1, 1, cfg.llm.hidden)), z, z)
    with sharding.activate(mesh):
        boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *args)["params"])
    return {part: abstract_like(nn.meta.unbox(boxed), sharding.logical_to_shardings(boxed, mesh))}


def place(array: np.ndarray, target: jax.ShapeDtypeStruct) -> jax.Array:
    """A host array into its sharding: each process supplies only its own devices' shards."""
    array = array.astype(target.dtype, copy=False)
    return jax.make_array_from_callback(array.shape, target.sharding, lambda index: array[index])


@functools.lru_cache(maxsize=None)
def _set_layer(stack_sharding):
    return jax.jit(lambda stack, x, i: jax.lax.dynamic_update_index_in_dim(stack, x, i, 0),
                   donate_argnums=0, out_shardings=stack_sharding)


def layer_target(target: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    spec = target.sharding.spec
    if spec and spec[0] is not None:
        raise ValueError(f"a stacked parameter sharded over its layer axis ({spec}) is not supported")
    one = jax.sharding.NamedSharding(target.sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
    return jax.ShapeDtypeStruct(target.shape[1:], target.dtype, sharding=one)


def load(plan_: Plan, mesh, progress: bool = True) -> dict:
    """The plan's parameters as a nested dict of sharded arrays, read tensor by tensor."""
    for folder, rules, unused in plan_.sources:
        check_source(folder, rules, unused)
    abstract = {"/".join(k): v for k, v in flatten_dict(
        abstract_params(plan_.model_config, plan_.parts, mesh)).items()}
    for path, target in abstract.items():
        try:
            target.sharding.shard_shape(target.shape)
        except ValueError:
            raise ValueError(f"parameter {path} {target.shape} does not divide over the mesh "
                             f"{dict(mesh.shape)} as {target.sharding.spec}; choose another "
                             "MeshConfig (e.g. --gin_param 'MeshConfig.tensor = 1')") from None
    by_param: dict[str, list[tuple[hf.CheckpointFolder, Rule]]] = {}
    for folder, rules, _ in plan_.sources:
        for rule in rules:
            by_param.setdefault(rule.param, []).append((folder, rule))
    assert set(by_param) == set(abstract), sorted(set(by_param) ^ set(abstract))
    total = sum(len(v) for v in by_param.values())
    params = {}
    with tqdm(total=total, desc="convert", unit="tensor", disable=not progress) as bar:
        for path, entries in by_param.items():
            target = abstract[path]
            if entries[0][1].layer is None:
                folder, rule = entries[0]
                params[path] = place(rule.to_ours(folder.read(rule.hf_key), target.shape), target)
                bar.update()
                continue
            one = layer_target(target)
            stack = jax.jit(lambda: jnp.zeros(target.shape, target.dtype),
                            out_shardings=target.sharding)()
            for folder, rule in entries:
                layer = place(rule.to_ours(folder.read(rule.hf_key), one.shape), one)
                stack = _set_layer(target.sharding)(stack, layer, rule.layer)
                # Dispatch is asynchronous: without waiting, reading races ahead and queued
                # layers pile up in host memory.
                stack.block_until_ready()
                bar.update()
            params[path] = stack
    return unflatten_dict({tuple(k.split("/")): v for k, v in params.items()})


# ---- writing the converted run ----

def gin_text(plan_: Plan, tokenizer_dir: str | None) -> str:
    """The bindings that rebuild this model (and find its tokenizer)."""
    cfg, lines = plan_.model_config, ["# Written by `mqt-jax convert`."]
    parts = {"vision_tower": ("vision", "VisionConfig"), "query_transformer": ("query", "QueryTransformerConfig"),
             "llm": ("llm", "LLMConfig")}
    for part in plan_.parts:
        field, name = parts[part]
        value = getattr(cfg, field)
        lines += gin_bindings(value) + [f"ModelConfig.{field} = @{name}()"]
    if "query_transformer" not in plan_.parts:  # the official resampler attends at the vision width
        lines += [f"QueryTransformerConfig.width = {cfg.query.width}",
                  f"QueryTransformerConfig.num_heads = {cfg.query.num_heads}"]
    lines += [f"ModelConfig.param_dtype = {cfg.param_dtype!r}", f"ModelConfig.dtype = {cfg.dtype!r}"]
    if tokenizer_dir:
        lines += [f"DataConfig.tokenizer_dir = {tokenizer_dir!r}",
                  f"EvalConfig.tokenizer_dir = {tokenizer_dir!r}",
                  f"DataConfig.template = {plan_.template!r}", f"EvalConfig.template = {plan_.template!r}"]
    if not plan_.model_config.has_m and len(plan_.parts) == 3:
        lines.append('MSampler.distribution = "constant"  # the projector has no m')
    return "\n".join(lines) + "\n"


def save_params(directory: Path, params: dict, config_text: str, step: int = 0) -> None:
    """An orbax checkpoint of `params` in the layout a training run writes (restore_params
    reads it), with config.gin beside checkpoints/."""
    from mqt_jax.core.checkpoint import Checkpointer

    # Bound the bytes in flight to the largest array (orbax cannot write one above its limit).
    largest = max(x.nbytes for x in jax.tree.leaves(params))
    ckpt = Checkpointer(directory / "checkpoints", max_to_keep=1, host_gb=math.ceil(largest / 1e9))
    ckpt.save(step, {"frozen": params}, {}, config_text)
    ckpt.wait()
    ckpt.close()
    (directory / "config.gin").write_text(config_text)


def remove_partial(out: Path) -> None:
    """The hidden work folders of an earlier conversion (or export) to OUT that was killed."""
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        print(f"removing {stale}, left by an interrupted run")
        shutil.rmtree(stale, ignore_errors=True)


def convert(kind: str, src: str | os.PathLike, out: str | os.PathLike, vision: str | None = None,
            param_dtype: str = "float32", dtype: str | None = None, mesh=None,
            allow_bin: bool = True, progress: bool = True,
            resampler_heads: int = RELEASED_RESAMPLER_HEADS) -> dict:
    """Convert and write OUT (a run folder); returns the parameters. OUT must not exist; it
    appears only once everything is written."""
    out = Path(out).absolute()
    if out.exists():
        raise FileExistsError(f"--out {out} exists; choose a new folder")
    plan_ = plan(kind, Path(src), Path(vision) if vision else None, param_dtype, dtype, allow_bin,
                 resampler_heads)
    mesh = mesh or sharding.make_mesh(MeshConfig())
    params = load(plan_, mesh, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_partial(out)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        tokenizer_dir = None
        if plan_.tokenizer_dir:
            (work / "tokenizer").mkdir()
            for name in TOKENIZER_FILES:
                if (plan_.tokenizer_dir / name).is_file():
                    shutil.copy2(plan_.tokenizer_dir / name, work / "tokenizer" / name)
            tokenizer_dir = str(out / "tokenizer")
        shutil.copy2(Path(src) / "config.json", work / "hf_config.json")
        with sharding.activate(mesh):
            save_params(work, params, gin_text(plan_, tokenizer_dir))
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return params





