"""Hugging Face checkpoints in and out (mqt_jax/interop/convert.py, mqt_jax/core/hf.py).

The equivalence tests build tiny random-weight models with torch + transformers (test-only
extras; skipped without them), save them with `save_pretrained`, convert, and compare values.
Every weight is re-drawn at random first, so a LayerNorm or bias mapped wrongly shows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from mqt_jax.cli import main
from mqt_jax.compressors.official import sincos_2d
from mqt_jax.config import LLMConfig, MeshConfig
from mqt_jax.core import hf, sharding, splice
from mqt_jax.interop import convert, export
from mqt_jax.models.llama import Llama
from mqt_jax.models.vision_tower import VisionTower
from mqt_jax.models.vlm import VisionLanguageModel

MESH_SHAPE = MeshConfig(1, 8, 1)  # 3 query heads: tensor parallelism would not divide


def mesh():
    return sharding.make_mesh(MESH_SHAPE)


def randomize(model, seed=0, std=0.2):
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def tiny_clip_config(image_size=28, width=32, heads=4):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
                            num_attention_heads=heads, image_size=image_size, patch_size=7,
                            projection_dim=16)


def tiny_llama_config():
    from transformers import LlamaConfig

    # grouped-query attention with an odd head count: 3 query heads share 1 kv head
    return LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                       num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=128,
                       rms_norm_eps=1e-6, rope_theta=500.0)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Tiny CLIP, LLaMA and LLaVA-1.5 folders written by save_pretrained."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    clip = randomize(transformers.CLIPVisionModel(tiny_clip_config()), 1).eval()
    clip.save_pretrained(root / "clip")
    llama = randomize(transformers.LlamaForCausalLM(tiny_llama_config()), 2).eval()
    llama.save_pretrained(root / "llama")
    llava_config = transformers.LlavaConfig(
        vision_config=tiny_clip_config(), text_config=tiny_llama_config(), image_token_index=99,
        projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=16)
    llava = randomize(transformers.LlavaForConditionalGeneration(llava_config), 3).eval()
    llava.save_pretrained(root / "llava")
    return {"root": root, "clip": clip, "llama": llama, "llava": llava}


def test_clip_vision_tower_equals_transformers(hf_models, tmp_path):
    import torch

    params = convert.convert("clip-vision", hf_models["root"] / "clip", tmp_path / "out",
                             mesh=mesh(), progress=False)
    images = np.random.default_rng(0).normal(size=(8, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        out = hf_models["clip"](torch.tensor(images).permute(0, 3, 1, 2), output_hidden_states=True)
    want = out.hidden_states[-2][:, 1:].numpy()  # LLaVA's select layer -2, class token dropped
    cfg = convert.plan("clip-vision", hf_models["root"] / "clip").model_config.vision
    with sharding.activate(mesh()):
        got = VisionTower(cfg).apply({"params": params["vision_tower"]}, jnp.asarray(images))
    assert got.shape == want.shape == (8, 16, 32)
    assert relative_error(got, want) < 1e-5
    # The folder's own config.gin rebuilds a model (the resampler attends at the tower's width).
    from mqt_jax.cli import parse_gin
    from mqt_jax.config import ModelConfig

    parse_gin([str(tmp_path / "out" / "config.gin")], [])
    assert ModelConfig().vision == cfg and ModelConfig().query.width == cfg.width


def test_llava_tower_under_transformers_5_key_names_converts_the_same(hf_models, tmp_path):
    """model.vision_tower.vision_tower.embeddings.* (no vision_model.) reads like the rest."""
    from safetensors.numpy import load_file, save_file

    src = hf_models["root"] / "llava"
    tensors = load_file(src / "model.safetensors")
    prefix = convert.find_prefix(set(tensors), "embeddings.patch_embedding.weight",
                                 convert.CLIP_PREFIXES)
    assert prefix and prefix != "model.vision_tower.vision_tower."
    shutil.copytree(src, tmp_path / "renamed")
    save_file({("model.vision_tower.vision_tower." + k[len(prefix):]) if k.startswith(prefix) else k: v
               for k, v in tensors.items()}, str(tmp_path / "renamed" / "model.safetensors"))
    a = convert.convert("llava-1.5", src, tmp_path / "a", mesh=mesh(), progress=False)
    b = convert.convert("llava-1.5", tmp_path / "renamed", tmp_path / "b", mesh=mesh(), progress=False)
    a, b = flatten_dict(a), flatten_dict(b)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg="/".join(key))


def test_a_full_clip_model_converts_its_vision_side(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        vision_config=tiny_clip_config().to_dict(),
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": 50}, projection_dim=8)
    model = randomize(transformers.CLIPModel(config), 4).eval()
    model.save_pretrained(tmp_path / "clip")
    params = convert.convert("clip-vision", tmp_path / "clip", tmp_path / "out", mesh=mesh(),
                             progress=False)
    images = np.random.default_rng(1).normal(size=(8, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        want = model.vision_model(torch.tensor(images).permute(0, 3, 1, 2),
                                  output_hidden_states=True).hidden_states[-2][:, 1:].numpy()
    cfg = convert.plan("clip-vision", tmp_path / "clip").model_config.vision
    with sharding.activate(mesh()):
        got = VisionTower(cfg).apply({"params": params["vision_tower"]}, jnp.asarray(images))
    assert relative_error(got, want) < 1e-5


def llama_logits(cfg: LLMConfig, params: dict, ids: np.ndarray):
    model, (b, t) = Llama(cfg), ids.shape
    with sharding.activate(mesh()):
        x = model.apply({"params": params}, jnp.asarray(ids), method=Llama.embed)
        return model.apply({"params": params}, x, jnp.broadcast_to(jnp.arange(t), (b, t)),
                           jnp.ones((b, t), jnp.int32))


def greedy(cfg: LLMConfig, params: dict, ids: np.ndarray, steps: int) -> np.ndarray:
    """Our cached decoding: prefill, then one token at a time from the KV cache."""
    model, (b, t) = Llama(cfg), ids.shape
    with sharding.activate(mesh()):
        x = model.apply({"params": params}, jnp.asarray(ids), method=Llama.embed)
        logits, cache = model.apply({"params": params}, x, jnp.broadcast_to(jnp.arange(t), (b, t)),
                                    jnp.ones((b, t), jnp.int32), t + steps, method=Llama.prefill)
        out = [jnp.argmax(logits[:, -1], -1)]
        for _ in range(steps - 1):
            logits, cache = model.apply({"params": params}, out[-1][:, None], cache,
                                        method=Llama.decode)
            out.append(jnp.argmax(logits[:, -1], -1))
    return np.stack([np.asarray(o) for o in out], 1)


def test_llama_logits_and_greedy_tokens_equal_transformers(hf_models, tmp_path):
    import torch

    params = convert.convert("llama", hf_models["root"] / "llama", tmp_path / "out", mesh=mesh(),
                             progress=False)
    cfg = convert.plan("llama", hf_models["root"] / "llama").model_config.llm
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.rope_theta) == (3, 1, 500.0)
    ids = np.random.default_rng(0).integers(0, 100, (8, 12))
    with torch.no_grad():
        want = hf_models["llama"](torch.tensor(ids)).logits.numpy()
        want_tokens = hf_models["llama"].generate(
            torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
            max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)[:, 12:].numpy()
    assert relative_error(llama_logits(cfg, params["llm"], ids), want) < 1e-5
    np.testing.assert_array_equal(greedy(cfg, params["llm"], ids, 6), want_tokens)


def test_llava_1_5_logits_equal_transformers(hf_models, tmp_path):
    import torch
    from PIL import Image

    from mqt_jax.data.preprocess import clip_preprocess

    out = tmp_path / "out"
    params = convert.convert("llava-1.5", hf_models["root"] / "llava", out, mesh=mesh(),
                             progress=False)
    cfg = convert.plan("llava-1.5", hf_models["root"] / "llava").model_config
    assert (cfg.query.variant, cfg.num_queries) == ("mlp2x_gelu", 16)
    # The same preprocessing for both: a picture through mqt_jax's CLIP preprocessing.
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), np.uint8))
    image = clip_preprocess(picture, 28, "pad")
    text = [1, 5, 17, splice.IMAGE_TOKEN, 23, 42, 8]
    batch = splice.layout_rows([[splice.Example(text, [splice.IGNORE] * len(text))]] * 8,
                               np.full((8, 1), 16), 16, seq_len=22)
    images = np.broadcast_to(image, (8, 1) + image.shape)
    with sharding.activate(mesh()):
        got = VisionLanguageModel(cfg).apply({"params": params}, jnp.asarray(images),
                                             jnp.full((8, 1), 16),
                                             *(jnp.asarray(batch[k]) for k in
                                               ("token_ids", "visual_index", "positions", "segment_ids")))
    ids = torch.tensor([[1, 5, 17] + [99] * 16 + [23, 42, 8]])
    with torch.no_grad():
        want = hf_models["llava"](input_ids=ids, pixel_values=torch.tensor(image[None]).permute(0, 3, 1, 2)).logits
    assert relative_error(got[0], want[0].numpy()) < 1e-5
    # The converted folder opens like a trained run: config.gin rebuilds the same model.
    assert "QueryTransformerConfig.variant = 'mlp2x_gelu'" in (out / "config.gin").read_text()


@pytest.mark.parametrize("saved,served", [("1,16", (1, 16)), ([16, 1], (1, 16)), (4, (4,)),
                                         ("1,x", "is not a list of token counts"),
                                         ("1,5", r"scales \[5\] are not squares")])
def test_m3_serves_the_scales_its_checkpoint_was_trained_on(hf_models, tmp_path, saved, served):
    src = tmp_path / "m3"
    shutil.copytree(hf_models["root"] / "llava", src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | {"matryoshka_vis_token_scale": saved}))
    if isinstance(served, str):
        with pytest.raises(ValueError, match=served):
            convert.plan("m3", src)
        return
    cfg = convert.plan("m3", src).model_config
    assert cfg.compressor.valid_m(cfg) == served


def test_m3_from_a_llava_folder_equals_torch_avg_pool_after_the_projector(hf_models, tmp_path):
    """`--kind m3` reads a LLaVA-1.5-layout folder (the released llava-v1.5-7b-m3's) into the
    m3 compressor; at every scale its tokens equal transformers' projected image features
    through torch's F.avg_pool2d (kernel = stride = grid / sqrt(m)), as M3 pools them."""
    import torch
    import torch.nn.functional as F

    params = convert.convert("m3", hf_models["root"] / "llava", tmp_path / "m3", mesh=mesh(),
                             progress=False)
    cfg = convert.plan("m3", hf_models["root"] / "llava").model_config
    assert cfg.query.variant == "m3" and cfg.compressor.valid_m(cfg) == (1, 4, 16)
    assert set(convert.KINDS) == {"clip-vision", "llama", "mqt-llava", "llava-1.5", "m3"}
    image = np.random.default_rng(0).normal(size=(1, 28, 28, 3)).astype(np.float32)
    llava = hf_models["llava"]
    with torch.no_grad():
        pixels = torch.tensor(image).permute(0, 3, 1, 2)
        projected = llava.get_image_features(pixel_values=pixels)  # [1, 16, D], projected
        projected = getattr(projected, "pooler_output", projected)
        projected = projected[0] if isinstance(projected, (list, tuple)) else projected
        projected = projected.reshape(1, 16, -1)
        grid = projected.reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    model = VisionLanguageModel(cfg)
    for m in (1, 4, 16):
        kernel = 4 // int(m ** 0.5)
        want = F.avg_pool2d(grid, kernel, kernel).flatten(2).transpose(1, 2)[0].numpy()
        with sharding.activate(mesh()):
            got = model.apply({"params": params}, jnp.asarray(np.repeat(image, 8, 0)),
                              jnp.full((8,), m), method=VisionLanguageModel.visual_tokens)
        assert relative_error(np.asarray(got)[0, :m], want) < 1e-5, m


class TorchResampler:
    """The released resampler written from shared/reference/mqt.md with torch's own
    nn.MultiheadAttention, LayerNorm and F.interpolate(bicubic, align_corners=False)."""

    def __init__(self, num_queries, width, heads, hidden, seed=0):
        import torch

        gen = torch.Generator().manual_seed(seed)
        grid = int(num_queries ** 0.5)
        self.torch = torch
        self.query = torch.randn(num_queries, width, generator=gen) * 0.02
        self.pos_embed = torch.tensor(sincos_2d(grid, width)).half()  # stored in fp16
        self.attn = torch.nn.MultiheadAttention(width, heads)
        self.ln = {n: torch.nn.LayerNorm(width, eps=1e-6) for n in ("ln_q", "ln_k", "ln_v")}
        with torch.no_grad():
            for module in [self.attn, *self.ln.values()]:
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
        self.proj = torch.randn(width, hidden, generator=gen) * width ** -0.5

    def state_dict(self, prefix="model.query_abstractor."):
        sd = {"query": self.query, "pos_embed": self.pos_embed, "proj": self.proj,
              **{f"attn.{k}": v for k, v in self.attn.state_dict().items()},
              **{f"{n}.{k}": v for n, m in self.ln.items() for k, v in m.state_dict().items()}}
        return {prefix + k: v.detach().contiguous() for k, v in sd.items()}

    def __call__(self, x, m):
        torch, F = self.torch, self.torch.nn.functional
        g, width = int(self.query.shape[0] ** 0.5), self.query.shape[1]
        grid = int(x.shape[1] ** 0.5)
        with torch.no_grad():
            table = self.pos_embed.float().reshape(1, g, g, width).permute(0, 3, 1, 2)
            keys = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False)
            keys = keys.permute(0, 2, 3, 1).reshape(grid * grid, width)
            q = self.ln["ln_q"](self.query[:m] + self.pos_embed[:m].float())
            k, v = self.ln["ln_k"](keys), self.ln["ln_v"](x)
            b = x.shape[0]
            out = self.attn(q[:, None].expand(-1, b, -1), k[:, None].expand(-1, b, -1),
                            v.permute(1, 0, 2), need_weights=False)[0]
            return out.permute(1, 0, 2) @ self.proj


def write_original_layout(folder: Path, tensors: dict, config: dict):
    """A checkpoint folder as LLaVA's own code saves it (no transformers model class)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("heads", [None, 2])
def test_mqt_llava_resampler_equals_a_torch_module_following_the_paper(hf_models, tmp_path, heads):
    """M = 16 queries (a 4 x 4 sin-cos table) over a 6 x 6 patch grid: the keys need the
    PyTorch bicubic resize 4 -> 6, where jax.image.resize would differ. Width 128, where the
    release's 16 heads (the default) and a 64-wide-heads guess (2) differ; --resampler_heads
    sets any other count."""
    import torch
    import transformers

    clip = randomize(transformers.CLIPVisionModel(tiny_clip_config(42, 128, 2)), 5).eval()
    clip.save_pretrained(tmp_path / "clip")
    llama = hf_models["llama"]
    chosen = {} if heads is None else {"resampler_heads": heads}
    resampler = TorchResampler(16, 128, heads=heads or 16, hidden=48)
    tensors = {**{k: v.detach().contiguous() for k, v in llama.state_dict().items()},
               **resampler.state_dict()}
    config = {**llama.config.to_dict(), "model_type": "llava_llama",
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_vision_select_layer": -2,
              "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad"}
    write_original_layout(tmp_path / "mqt", tensors, config)
    params = convert.convert("mqt-llava", tmp_path / "mqt", tmp_path / "out",
                             vision=str(tmp_path / "clip"), mesh=mesh(), progress=False, **chosen)
    cfg = convert.plan("mqt-llava", tmp_path / "mqt", tmp_path / "clip", **chosen).model_config
    assert (cfg.num_queries, cfg.query.width, cfg.query.num_heads, cfg.vision.grid_size) == \
        (16, 128, heads or 16, 6)
    features = np.random.default_rng(0).normal(size=(8, 36, 128)).astype(np.float32)
    model = VisionLanguageModel(cfg)
    with sharding.activate(mesh()):
        for m in (1, 2, 16):
            got = model.apply({"params": params}, jnp.asarray(features), jnp.full((8,), m),
                              method=lambda mdl, x, m_: mdl.query_transformer(x, m_))[:, :m]
            want = resampler(torch.tensor(features), m).numpy()
            assert relative_error(got, want) < 1e-5, m
    # the vision tower came from --vision, the LLM from the MQT checkpoint
    ids = np.random.default_rng(1).integers(0, 100, (8, 5))
    with torch.no_grad():
        want = llama(torch.tensor(ids)).logits.numpy()
    assert relative_error(llama_logits(cfg.llm, params["llm"], ids), want) < 1e-5


def test_import_export_import_is_identical_and_transformers_reads_the_export(hf_models, tmp_path):
    import torch
    import transformers

    first = convert.convert("llama", hf_models["root"] / "llama", tmp_path / "a", mesh=mesh(),
                            progress=False)
    assert main(["export", "--kind", "llama", "--workdir", str(tmp_path / "a"),
                 "--gin_param", "MeshConfig.fsdp = 8", "--out", str(tmp_path / "exported")]) == 0
    second = convert.convert("llama", tmp_path / "exported", tmp_path / "b", mesh=mesh(),
                             progress=False)
    a, b = flatten_dict(first), flatten_dict(second)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg="/".join(key))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "exported").eval()
    ids = torch.tensor(np.random.default_rng(2).integers(0, 100, (2, 9)))
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(ids).logits.numpy(), hf_models["llama"](ids).logits.numpy())


# ---- bad input: no torch needed, the folders are written with mqt_jax.core.hf ----

SMALL = LLMConfig(vocab_size=16, hidden=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4,
                  mlp_dim=16)


def llama_folder(folder: Path, drop=(), add=(), reshape=None, dtype=None, shards=1, extra=None) -> Path:
    """A random LLaMA checkpoint folder written by mqt_jax.core.hf (optionally broken)."""
    folder.mkdir(parents=True)
    rules = [r for r in convert.llama_rules(SMALL, "model.", "lm_head.weight") if r.hf_key not in drop]
    entries = [(r.hf_key, reshape if r.hf_key == "model.norm.weight" and reshape else r.hf_shape,
                dtype if r.hf_key == "model.norm.weight" and dtype else np.dtype(ml_dtypes.bfloat16))
               for r in rules] + [(k, (3,), np.dtype(np.float32)) for k in add] + [
                  (k, shape, np.dtype(np.float32)) for k, shape in (extra or {}).items()]
    rng = np.random.default_rng(0)
    make = {k: rng.normal(size=s).astype(d) for k, s, d in entries}
    total = sum(a.nbytes for a in make.values())
    hf.write_weights(folder, entries, make.__getitem__, max_shard_bytes=total // shards + 1)
    config = export.hf_llama_config(SMALL, "bfloat16")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def convert_error(src, tmp_path, kind="llama") -> str:
    out = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        convert.convert(kind, src, out, mesh=mesh(), progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    return str(e.value)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_file_linked_out_of_src_is_not_read(tmp_path, name):
    src = llama_folder(tmp_path / "src")
    (src / "tokenizer.json").write_text("{}")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(src / name, outside / name)
    (src / name).symlink_to(outside / name)
    assert f"{src / name} leads out of {src}" in convert_error(src, tmp_path)


@pytest.mark.parametrize("query,culprit", [
    ((16,), "model.query_abstractor.query is [16]; the released resampler's is [queries, width]"),
    ((2, 4, 16), "is [2, 4, 16]; the released"),
    ((4, 32), "the resampler is 32 wide (model.query_abstractor.query [4, 32]) but the vision "
              "tower 16; they must match"),
])
def test_a_resampler_query_of_the_wrong_shape_is_named(tmp_path, query, culprit):
    src = llama_folder(tmp_path / "src", extra={"model.query_abstractor.query": query})
    config = json.loads((src / "config.json").read_text()) | {"model_type": "llava_llama", "vision_config": {
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "image_size": 8, "patch_size": 4}}
    (src / "config.json").write_text(json.dumps(config))
    assert culprit in convert_error(src, tmp_path, "mqt-llava")


@pytest.mark.parametrize("field,value", [("rms_norm_eps", "1e-6"), ("rope_theta", "big"),
                                         ("rms_norm_eps", -1.0)])
def test_a_config_json_number_that_is_not_one_names_the_file(tmp_path, field, value):
    src = llama_folder(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | {field: value}))
    assert f"{src / 'config.json'}: LLMConfig.{field}={value!r}: must be" in convert_error(src, tmp_path)


@pytest.mark.parametrize("tower", ["absolute", "../clip"])
def test_mm_vision_tower_outside_src_is_not_followed(tmp_path, tower):
    src = llama_folder(tmp_path / "src")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    config = json.loads((src / "config.json").read_text())
    name = str(tmp_path / "clip") if tower == "absolute" else tower
    (src / "config.json").write_text(json.dumps(config | {"model_type": "llava_llama",
                                                          "mm_vision_tower": name}))
    assert "describes no vision tower: give --vision" in convert_error(src, tmp_path, "mqt-llava")


def test_export_refuses_a_dtype_hugging_face_cannot_name_and_clears_a_killed_export(tmp_path):
    params = convert.convert("llama", llama_folder(tmp_path / "src"), tmp_path / "run", mesh=mesh(),
                             progress=False)
    for bad in ("int8", "float64", "float17"):
        with pytest.raises(ValueError, match=f"--dtype '{bad}': one of float32, float16, bfloat16"):
            export.export_llama(SMALL, params, tmp_path / "out", dtype=bad)
    assert not (tmp_path / "out").exists()
    stale = tmp_path / ".out.partial-killed"  # as a SIGKILLed export leaves it
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    export.export_llama(SMALL, params, tmp_path / "out", dtype="float16")
    assert not stale.exists() and not list(tmp_path.glob(".out.partial-*"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "float16"
    assert hf.CheckpointFolder(tmp_path / "out").read("model.norm.weight").dtype == np.float16


def test_a_sharded_bfloat16_checkpoint_converts_and_matches(tmp_path):
    src = llama_folder(tmp_path / "src", shards=3)
    assert len(list(src.glob("model-*-of-*.safetensors"))) >= 3
    params = convert.convert("llama", src, tmp_path / "out", mesh=mesh(), progress=False)
    folder = hf.CheckpointFolder(src)
    want = folder.read("model.layers.1.mlp.down_proj.weight").astype(np.float32).T
    np.testing.assert_array_equal(np.asarray(params["llm"]["layers"]["mlp"]["fc2"]["kernel"][1]), want)
    want = folder.read("model.layers.0.self_attn.o_proj.weight").astype(np.float32).T.reshape(2, 4, 8)
    np.testing.assert_array_equal(np.asarray(params["llm"]["layers"]["attn"]["out"]["kernel"][0]), want)
    # it opens like a trained run, its tokenizer-free config.gin included
    assert (tmp_path / "out" / "config.gin").read_text().count("LLMConfig.") == len(
        [f for f in LLMConfig.__dataclass_fields__ if f != "lora"])  # a converted LLM has no adapters


def test_missing_and_unknown_keys_are_named(tmp_path):
    assert "lacks 1 tensor(s): ['model.layers.1.mlp.up_proj.weight']" in convert_error(
        llama_folder(tmp_path / "a", drop=("model.layers.1.mlp.up_proj.weight",)), tmp_path)
    assert "does not know: ['model.extra.weight']" in convert_error(
        llama_folder(tmp_path / "b", add=("model.extra.weight",)), tmp_path)


def test_wrong_shape_and_dtype_are_named(tmp_path):
    message = convert_error(llama_folder(tmp_path / "a", reshape=(9,)), tmp_path)
    assert "model.norm.weight has shape (9,)" in message and "(8,)" in message
    message = convert_error(llama_folder(tmp_path / "b", dtype=np.dtype(np.int32)), tmp_path)
    assert "model.norm.weight is I32, not a floating-point weight" in message


def test_truncated_file_and_missing_shard_are_named(tmp_path):
    src = llama_folder(tmp_path / "a")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:-100])
    message = convert_error(src, tmp_path)
    assert "model.safetensors is truncated: its tensors end at byte" in message
    src = llama_folder(tmp_path / "b", shards=2)
    last = sorted(src.glob("model-*-of-*.safetensors"))[-1]
    last.unlink()
    assert f"names shard(s) ['{last.name}']" in convert_error(src, tmp_path)


def test_unsupported_architectures_are_refused(tmp_path):
    src = llama_folder(tmp_path / "a")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    assert "model_type 'mistral' is not llama" in convert_error(src, tmp_path)
    (src / "config.json").write_text(json.dumps({**config, "rope_scaling": {"type": "linear", "factor": 2.0}}))
    assert "RoPE scaling" in convert_error(src, tmp_path)
    assert "model_type 'llama' is not a LLaVA model" in convert_error(src, tmp_path, "llava-1.5")
    with pytest.raises(ValueError, match="--kind 'gpt2'"):
        convert.plan("gpt2", src)


def test_a_failed_write_leaves_nothing_and_an_existing_output_is_kept(tmp_path, monkeypatch):
    src = llama_folder(tmp_path / "src")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        convert.convert("llama", src, tmp_path / "taken", mesh=mesh(), progress=False)

    def broken(*_, **__):
        raise OSError("disk full")

    monkeypatch.setattr(convert, "save_params", broken)
    with pytest.raises(OSError, match="disk full"):
        convert.convert("llama", src, tmp_path / "out", mesh=mesh(), progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_cli_convert_reports_bad_input(tmp_path, capsys):
    assert main(["convert", "--kind", "llama", "--src", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["convert", "--kind", "llava-2", "--src", str(tmp_path), "--out",
                 str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "--kind 'llava-2': expected one of" in error and "'m3'" in error
    assert not (tmp_path / "out").exists()


def test_a_bin_file_is_refused_without_permission(tmp_path):
    pytest.importorskip("torch")
    import torch

    src = tmp_path / "bin"
    src.mkdir()
    torch.save({"model.norm.weight": torch.ones(8)}, src / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        hf.CheckpointFolder(src, allow_bin=False)
    folder = hf.CheckpointFolder(src)  # weights_only=True: tensors only, nothing else unpickled
    np.testing.assert_array_equal(folder.read("model.norm.weight"), np.ones(8, np.float32))


def word_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json (ids below vocab_size) beside the weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "USER", "ASSISTANT", ":", "what", "colour", "?", "red"]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(vocab_size - len(words) - 1)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def test_a_converted_llava_opens_for_generation_and_training(hf_models, tmp_path, capsys):
    """OUT works as a run folder: `mqt-jax generate --workdir OUT` answers at m = M (the
    projector has no other m), and TrainConfig.init_from = OUT starts training from it."""

    from PIL import Image

    from mqt_jax.config import TrainConfig
    from mqt_jax.core.checkpoint import restore_params
    from mqt_jax.training.trainer import Trainer, merge_params

    src = tmp_path / "llava"
    shutil.copytree(hf_models["root"] / "llava", src)
    word_tokenizer(src, 99)
    out = tmp_path / "converted"
    assert main(["convert", "--kind", "llava-1.5", "--src", str(src), "--out", str(out)]) == 0
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / "x.png")
    args = ["generate", "--workdir", str(out), "--image", str(tmp_path / "x.png"),
            "--prompt", "what colour ?", "--max_new_tokens", "3"]
    capsys.readouterr()
    assert main(args + ["--m", "16"]) == 0
    assert len(capsys.readouterr().out.split()) == 3  # three words from the word-level vocabulary
    assert main(args + ["--m", "4"]) == 2
    assert "projector has no m" in capsys.readouterr().err

    cfg = convert.plan("llava-1.5", src).model_config
    trainer = Trainer(cfg, TrainConfig(batch_size=8, init_from=str(out)), mesh())
    state = trainer.init_state(init_from=out / "checkpoints")
    converted, _ = restore_params(out, trainer.abstract_params())
    started = flatten_dict(merge_params(state.trainable, state.frozen))
    for key, value in flatten_dict(converted).items():
        np.testing.assert_array_equal(np.asarray(started[key]), np.asarray(value))
