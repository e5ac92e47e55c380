"""A run's parts as Hugging Face folders: its LLM as a LLaMA folder (`mqt-jax export`), a
whole vision tower as a CLIPVisionModel folder (stage 0's mini-CLIP). The weight rules are
convert's, read backwards; tensors are streamed one at a time, written to a temporary name,
then renamed."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from mqt_jax.config import DataConfig, EvalConfig, LLMConfig, MeshConfig, ModelConfig, VisionConfig
from mqt_jax.core import hf
from mqt_jax.core.checkpoint import restore_params
from mqt_jax.core.gin_files import scoped
from mqt_jax.core.hf import Rule, norm
from mqt_jax.core.sharding import make_mesh
from mqt_jax.interop.convert import TOKENIZER_FILES, abstract_params, clip_rules, llama_rules, remove_partial
from mqt_jax.models import lora
from mqt_jax.run import parse_run_config


DTYPES = ("float32", "float16", "bfloat16")  # what a Hugging Face config's torch_dtype names


def checked_dtype(dtype: str | None) -> str | None:
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    return dtype


def export_run(path, out: str | os.PathLike, dtype: str | None = None, gin_files=(),
               gin_params=()) -> tuple[Path, Path, int]:
    """The LLM of the run in `path` (LoRA adapters folded in) as a Hugging Face LLaMA folder
    with the run's tokenizer; returns (the folder written, the run, its step). Only the LLM's
    parameters are read."""
    checked_dtype(dtype)
    if Path(out).exists():
        raise FileExistsError(f"--out {out} exists; choose a new folder")
    run, scope = parse_run_config(path, list(gin_files), list(gin_params))
    with scoped(scope):
        model_config, mesh = ModelConfig(), make_mesh(MeshConfig())
        tokenizer = EvalConfig().tokenizer_dir or DataConfig().tokenizer_dir
    params, step = restore_params(run, abstract_params(model_config, ("llm",), mesh),
                                  only=("llm/.*",))
    model_config, params = lora.merged(model_config, params)
    return export_llama(model_config.llm, params, out, tokenizer or None, dtype), run, step


def hf_llama_config(c: LLMConfig, dtype: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": c.vocab_size, "hidden_size": c.hidden, "intermediate_size": c.mlp_dim,
            "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
            "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
            "max_position_embeddings": c.max_length,
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype, "dtype": dtype}


def export_llama(llm_config: LLMConfig, params: dict, out: str | os.PathLike,
                 tokenizer_dir: str | None = None, dtype: str | None = None,
                 max_shard_bytes: int = 5 << 30) -> Path:
    """The LLM of `params` (a model's parameter tree, sharded or not) as a Hugging Face LLaMA
    folder, streamed one layer's tensor at a time; written to a temporary name, then renamed."""
    rules = llama_rules(llm_config, "model.", "lm_head.weight")
    return export(rules, params, out, lambda name: hf_llama_config(llm_config, name),
                  tokenizer_dir, dtype, max_shard_bytes)


def hf_clip_vision_config(v: VisionConfig, dtype: str) -> dict:
    return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
            "hidden_size": v.width, "intermediate_size": v.mlp_dim,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
            "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": 3,
            "hidden_act": "quick_gelu", "layer_norm_eps": v.layer_norm_eps,
            "torch_dtype": dtype, "dtype": dtype}


def export_clip_vision(vision: VisionConfig, params: dict, out: str | os.PathLike,
                       post_ln: str = "post_ln", dtype: str | None = None) -> Path:
    """A whole vision tower (`select_layer = -1`: every layer built) and its final LayerNorm
    (parameter `post_ln`) as a Hugging Face CLIPVisionModel folder; `mqt-jax convert --kind
    clip-vision` reads it back like any CLIP tower."""
    if vision.num_layers_built != vision.num_layers:
        raise ValueError(f"VisionConfig.select_layer={vision.select_layer} builds "
                         f"{vision.num_layers_built} of {vision.num_layers} layers; a CLIP "
                         f"export needs them all (select_layer = -1)")
    rules = clip_rules(vision, "vision_model.") + norm("vision_model.post_layernorm", vision.width,
                                                       post_ln)
    return export(rules, params, out, lambda name: hf_clip_vision_config(vision, name), None, dtype)


def export(rules: list[Rule], params: dict, out: str | os.PathLike, hf_config, tokenizer_dir=None,
           dtype: str | None = None, max_shard_bytes: int = 5 << 30) -> Path:
    """The parameters `rules` name as a Hugging Face folder (weights and `hf_config(dtype
    name)` as config.json), one tensor in host memory at a time; written to a temporary name,
    then renamed."""
    if jax.process_count() > 1:
        raise ValueError("export runs in a single process (it reads every shard)")
    out = Path(out).absolute()
    if out.exists():
        raise FileExistsError(f"--out {out} exists; choose a new folder")
    flat = {"/".join(k): v for k, v in flatten_dict(params).items()}
    missing = sorted({r.param for r in rules} - set(flat))
    if missing:
        raise ValueError(f"the parameters lack {missing[:5]}")
    out_dtype = np.dtype(jnp.dtype(checked_dtype(dtype or str(flat[rules[0].param].dtype))))
    by_key = {r.hf_key: r for r in rules}

    def produce(key):
        rule = by_key[key]
        value = flat[rule.param] if rule.layer is None else flat[rule.param][rule.layer]
        return rule.to_hf(np.asarray(jax.device_get(value)).astype(out_dtype))

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_partial(out)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        entries = [(r.hf_key, r.hf_shape, out_dtype) for r in rules]
        hf.write_weights(work, entries, produce, max_shard_bytes)
        name = str(jnp.dtype(out_dtype))
        (work / "config.json").write_text(json.dumps(hf_config(name), indent=2))
        if tokenizer_dir:
            for file in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / file).is_file():
                    shutil.copy2(Path(tokenizer_dir) / file, work / file)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out
