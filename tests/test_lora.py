"""LoRA on the LLM (mqt_jax/models/lora.py): zero adapters are the base model, the adapted
model equals a numpy reference and its merged weights, a step trains the adapters alone,
they shard like their kernels, and export / inference run the merged model."""

import dataclasses

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from helpers import init_params, random_batch, tiny_config, write_run

from mqt_jax.config import TARGETS, LoRAConfig, MeshConfig, TrainConfig
from mqt_jax.core import sharding
from mqt_jax.core.sharding import make_mesh
from mqt_jax.models import lora
from mqt_jax.models.lora import ADAPTERS
from mqt_jax.models.vlm import VisionLanguageModel
from mqt_jax.training.trainer import Trainer, merge_params

RANK = 8


def with_lora(cfg, **kw):
    return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, lora=LoRAConfig(RANK, **kw)))


def base_of(params):
    return unflatten_dict({k: v for k, v in flatten_dict(params).items()
                           if k[-1] not in ("lora_a", "lora_b")})


def randomised_b(params, seed=1, std=0.05):
    """Adapters as after training: B no longer zero."""
    rng = np.random.default_rng(seed)
    return unflatten_dict({k: (rng.normal(0, std, v.shape).astype(v.dtype) if k[-1] == "lora_b"
                               else v) for k, v in flatten_dict(params).items()})


def logits(cfg, params, batch, **kw):
    return np.asarray(VisionLanguageModel(cfg).apply({"params": params}, batch, method="logits",
                                                     **kw))


@pytest.fixture(scope="module")
def adapted():
    cfg = with_lora(tiny_config(), alpha=8.0)
    batch = random_batch(cfg, [16, 4, 1, 9], seq_len=40)
    params = init_params(VisionLanguageModel(cfg), batch, method="logits")
    return cfg, batch, params


def test_adapters_sit_on_every_target_and_start_as_the_base_model(adapted):
    cfg, batch, params = adapted
    adapters = {"/".join(k[:-1]) for k in flatten_dict(params) if k[-1] == "lora_a"}
    assert adapters == {f"llm/layers/{path}" for path in TARGETS.values()}
    assert not any("lora" in "/".join(k) for k in flatten_dict(params) if k[0] != "llm")
    base_cfg = tiny_config()
    np.testing.assert_array_equal(logits(cfg, params, batch), logits(base_cfg, base_of(params), batch))


def test_adapted_model_equals_a_numpy_reference_and_its_merged_weights(adapted):
    cfg, batch, params = adapted
    params = randomised_b(params)
    got = logits(cfg, params, batch)
    assert np.abs(got - logits(tiny_config(), base_of(params), batch)).max() > 1e-3  # B matters
    # one projection by hand: x W + (alpha / rank) x A B, per scanned layer
    flat = flatten_dict(params)
    w, a, b = (np.asarray(flat[("llm", "layers", "attn", "query", n)], np.float64)
               for n in ("kernel", "lora_a", "lora_b"))
    merged = flatten_dict(lora.merge(params, cfg.llm.lora))
    want = w + (8.0 / RANK) * np.einsum("led,ldhk->lehk", a, b)
    np.testing.assert_allclose(merged[("llm", "layers", "attn", "query", "kernel")], want, rtol=1e-5,
                               atol=1e-6)
    assert not any(k[-1].startswith("lora") for k in merged)
    merged_cfg, merged_params = lora.merged(cfg, params)
    assert merged_cfg == tiny_config()
    np.testing.assert_allclose(logits(merged_cfg, merged_params, batch), got, rtol=1e-4, atol=1e-4)


def test_dropout_acts_only_when_the_step_gives_it_a_key(adapted):
    cfg, batch, params = adapted
    cfg, params = with_lora(tiny_config(), alpha=8.0, dropout=0.5), randomised_b(params)
    plain = logits(cfg, params, batch)
    np.testing.assert_array_equal(plain, logits(cfg, params, batch))
    dropped = logits(cfg, params, batch, rngs={"dropout": jax.random.key(0)})
    assert np.abs(dropped - plain).max() > 1e-3


def test_bad_settings_name_the_field():
    for kw, field in ((dict(rank=-1), "rank"), (dict(rank=4, alpha=0), "alpha"),
                      (dict(rank=4, dropout=1.0), "dropout"), (dict(rank=4, targets=("qkv",)), "targets")):
        with pytest.raises(ValueError, match=f"LoRAConfig.{field}="):
            LoRAConfig(**kw)


def lora_trainer(mesh_shape=(1, 4, 2), **lora_kw):
    config = TrainConfig(batch_size=8, seq_len=40, steps=10, learning_rate=1e-2,
                         trainable=("query_transformer", ADAPTERS))
    return Trainer(with_lora(tiny_config(), **lora_kw), config, make_mesh(MeshConfig(*mesh_shape)))


def test_a_step_trains_the_adapters_and_the_query_transformer_only():
    trainer = lora_trainer(dropout=0.1)
    state = trainer.init_state()
    trainable = flatten_dict(state.trainable)
    assert {k[0] for k in trainable} == {"query_transformer", "llm"}
    assert all(k[-1] in ("lora_a", "lora_b") for k in trainable if k[0] == "llm")
    assert all(k[-1] not in ("lora_a", "lora_b") for k in flatten_dict(state.frozen))
    opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert opt == 2 * sum(v.size for v in trainable.values())  # Adam's moments: trainable only
    frozen_before, trainable_before = jax.device_get((state.frozen, state.trainable))
    for step in range(2):  # A's gradient is 0 while B is 0: both move from the second step
        state, metrics = trainer.step(state, random_batch(trainer.model_config, [4] * 8, 40, seed=step))
        assert np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(jax.device_get(state.frozen))):
        np.testing.assert_array_equal(a, b)
    after = flatten_dict(jax.device_get(state.trainable))
    for key, before in flatten_dict(trainable_before).items():
        assert not np.array_equal(before, after[key]), "/".join(key)


def test_adapters_shard_like_their_kernels_and_by_rank_over_fsdp():
    trainer = lora_trainer()
    abstract = flatten_dict(trainer.abstract_params())
    specs = {k: tuple(v.sharding.spec) + (None,) * (v.ndim - len(v.sharding.spec))
             for k, v in abstract.items()}
    checked = 0
    for key in specs:
        if key[-1] != "lora_a":
            continue
        kernel, a, b = (specs[key[:-1] + (n,)] for n in ("kernel", "lora_a", "lora_b"))
        n_out = len(b) - 2  # b: layers, rank, out axes
        assert a[:-1] == kernel[:len(kernel) - n_out], key  # layers and input axes
        assert b[0] == kernel[0] and b[2:] == kernel[len(kernel) - n_out:], key
        assert a[-1] == (None if "fsdp" in a[:-1] else "fsdp"), key  # rank: fsdp if still free
        assert b[1] == (None if "fsdp" in b[2:] else "fsdp"), key
        checked += 1
    assert checked == len(TARGETS)
    with pytest.raises(ValueError, match=r"parameter llm/layers/.*/lora_[ab] .*an axis of 4 does "
                                         r"not divide over the mesh's fsdp \(8 devices\)"):
        Trainer(dataclasses.replace(tiny_config(), llm=dataclasses.replace(
            tiny_config().llm, lora=LoRAConfig(4))), TrainConfig(batch_size=8, seq_len=40),
            make_mesh(MeshConfig(1, 8, 1)))


def test_stage_two_starts_from_a_run_without_adapters_and_inference_merges(tmp_path):
    """init_from a run that has no adapters (stage 1) keeps B = 0; a LoRA run's checkpoint
    opens (open_run, export) as the merged model, equal to the adapted one."""
    from mqt_jax.cli import main
    from mqt_jax.core.checkpoint import restore_params
    from mqt_jax.core.gin_files import parse_gin
    from mqt_jax.interop.convert import save_params
    from mqt_jax.models.vlm import abstract_params
    from mqt_jax.run import open_run

    base_cfg = write_run(tmp_path / "base")
    cfg = with_lora(base_cfg, alpha=8.0)
    mesh = make_mesh(MeshConfig(1, 8, 1))
    trainer = Trainer(cfg, TrainConfig(batch_size=8, seq_len=32, trainable=(ADAPTERS,)), mesh)
    state = trainer.init_state(init_from={tmp_path / "base": (".*",)})
    params = jax.device_get(merge_params(state.trainable, state.frozen))
    base, _ = restore_params(tmp_path / "base", abstract_params(base_cfg, mesh))
    for key, value in flatten_dict(jax.device_get(base)).items():
        np.testing.assert_array_equal(flatten_dict(params)[key], value)
    assert all(not v.any() for k, v in flatten_dict(params).items() if k[-1] == "lora_b")

    trained = randomised_b(params)  # a LoRA run as training leaves it
    config_text = (tmp_path / "base" / "config.gin").read_text() + (
        "LoRAConfig.rank = 8\nLoRAConfig.alpha = 8.0\nLLMConfig.lora = @LoRAConfig()\n")
    save_params(tmp_path / "lora", trained, config_text)
    batch = random_batch(cfg, [16, 1, 4, 9] * 2, seq_len=32)
    want = logits(cfg, trained, batch)
    parse_gin([str(tmp_path / "lora" / "config.gin")], [])
    run = open_run(tmp_path / "lora")
    assert run.model_config.llm.lora.rank == 0
    assert not any(k[-1].startswith("lora") for k in flatten_dict(run.params))
    with sharding.activate(run.mesh):
        np.testing.assert_allclose(logits(run.model_config, run.params, batch), want, rtol=1e-4,
                                   atol=1e-4)
    assert main(["export", "--kind", "llama", "--workdir", str(tmp_path / "lora"),
                 "--out", str(tmp_path / "hf")]) == 0
    from mqt_jax.interop import convert

    back = convert.convert("llama", tmp_path / "hf", tmp_path / "back", mesh=mesh, progress=False)
    merged = flatten_dict(lora.merge(trained, cfg.llm.lora)["llm"])
    for key, value in flatten_dict(back["llm"] if "llm" in back else back).items():
        np.testing.assert_allclose(np.asarray(value), merged[key], rtol=1e-5, atol=1e-6,
                                   err_msg="/".join(key))
