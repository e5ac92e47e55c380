"""Sharded training: state, optimizer, the jitted train step and the loop.

Parameters are split into a trainable and a frozen tree by regex patterns (a per-stage gin
setting); only the trainable tree is differentiated and carries optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict
from tqdm.auto import tqdm

from mqt_jax import sharding, splice
from mqt_jax.config import ModelConfig
from mqt_jax.data.pipeline import DataConfig, make_batches
from mqt_jax.loss import cross_entropy
from mqt_jax.m_sampler import MSampler
from mqt_jax.models.vlm import VisionLanguageModel
from mqt_jax.synthetic import synthetic_batch


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # global, rows per step
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
    seed: int = 0
    log_every: int = 1


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: dict
    frozen: dict
    opt_state: Any


def is_trainable(path: str, config: TrainConfig) -> bool:
    return any(re.match(p, path) for p in config.trainable) and not any(
        re.match(p, path) for p in config.frozen
    )


def split_params(params: dict, config: TrainConfig) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts; works on any tree shaped like the parameters."""
    flat = flatten_dict(params)
    keep = {k: is_trainable("/".join(k), config) for k in flat}
    trainable = unflatten_dict({k: v for k, v in flat.items() if keep[k]})
    frozen = unflatten_dict({k: v for k, v in flat.items() if not keep[k]})
    return trainable, frozen


def merge_params(trainable: dict, frozen: dict) -> dict:
    return unflatten_dict({**flatten_dict(frozen), **flatten_dict(trainable)})


def make_optimizer(config: TrainConfig):
    """AdamW with linear warmup + cosine decay to 0 and global-norm clipping."""
    warmup = int(config.warmup_fraction * config.steps)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup, max(config.steps, warmup + 1)
    )
    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, config.b1, config.b2, weight_decay=config.weight_decay),
    )
    return tx, schedule


class CompileCounter:
    """Counts XLA compilations per function name while active (a context manager)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.counts: dict[str, int] = {}

    def _listen(self, event, _duration, fun_name="?", **_):
        if event == self.EVENT:
            self.counts[fun_name] = self.counts.get(fun_name, 0) + 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


class Trainer:
    """Model, mesh and shardings; builds the sharded state and runs jitted train steps."""

    def __init__(self, model_config: ModelConfig, config: TrainConfig, mesh: jax.sharding.Mesh):
        if config.batch_size % sharding.batch_divisor(mesh):
            raise ValueError(
                f"TrainConfig.batch_size={config.batch_size} is not divisible by the mesh's "
                f"data x fsdp = {sharding.batch_divisor(mesh)} devices"
            )
        self.model_config, self.config, self.mesh = model_config, config, mesh
        self.model = VisionLanguageModel(model_config)
        self.tx, self.schedule = make_optimizer(config)
        self.batch_shardings = {k: sharding.batch_sharding(mesh) for k in splice.BATCH_KEYS}
        self.state_shardings = self._state_shardings()
        self._jit_step = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, self.batch_shardings),
            out_shardings=(self.state_shardings, sharding.replicated(mesh)),
            donate_argnums=0,
        )

    def dummy_batch(self) -> dict[str, jax.Array]:
        """Zeros shaped like a batch (for init: parameter shapes do not depend on values)."""
        cfg, v = self.config, self.model_config.vision
        b, t = sharding.batch_divisor(self.mesh), self.config.seq_len
        ints = jnp.zeros((b, t), jnp.int32)
        return {
            "images": jnp.zeros((b, cfg.images_per_row, v.image_size, v.image_size, 3)),
            "m": jnp.ones((b, cfg.images_per_row), jnp.int32),
            "token_ids": ints, "visual_index": ints - 1, "positions": ints, "segment_ids": ints,
        }

    def init_params(self, rng) -> dict:
        """Boxed (nn.Partitioned) parameters; trace with jax.eval_shape for shapes only."""
        return self.model.init(rng, self.dummy_batch(), method="logits")["params"]

    def _init_state(self, rng) -> TrainState:
        trainable, frozen = split_params(nn.meta.unbox(self.init_params(rng)), self.config)
        return TrainState(jnp.zeros((), jnp.int32), trainable, frozen, self.tx.init(trainable))

    def _state_shardings(self) -> TrainState:
        with sharding.activate(self.mesh):
            boxed = jax.eval_shape(self.init_params, jax.random.key(0))
            abstract = jax.eval_shape(self._init_state, jax.random.key(0))
        param_sh = sharding.logical_to_shardings(boxed, self.mesh)
        trainable_sh, frozen_sh = split_params(param_sh, self.config)
        opt_sh = optax.tree_map_params(
            self.tx, lambda _, s: s, abstract.opt_state, trainable_sh,
            transform_non_params=lambda _: sharding.replicated(self.mesh),
        )
        return TrainState(sharding.replicated(self.mesh), trainable_sh, frozen_sh, opt_sh)

    def init_state(self, seed: int | None = None) -> TrainState:
        """Parameters created directly in their shardings, never whole on one device."""
        seed = self.config.seed if seed is None else seed
        with sharding.activate(self.mesh):
            init = jax.jit(self._init_state, out_shardings=self.state_shardings)
            return init(jax.random.key(seed))

    def loss(self, params: dict, batch: dict):
        logits = self.model.apply({"params": params}, batch, method="logits")
        return cross_entropy(logits, batch["targets"], batch["loss_mask"])

    def _train_step(self, state: TrainState, batch: dict):
        def loss_fn(trainable):
            return self.loss(merge_params(trainable, state.frozen), batch)

        (loss, num_tokens), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": self.schedule(state.step),
            "loss_tokens": num_tokens,
        }
        return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

    def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Validate on the host (clear errors before any compilation), then place the batch."""
        v = self.model_config.vision
        splice.validate_batch(batch, self.model_config.num_queries, v.image_size)
        local = self.config.batch_size // jax.process_count()  # this host's rows
        if batch["token_ids"].shape != (local, self.config.seq_len):
            raise ValueError(
                f"token_ids of shape {batch['token_ids'].shape}; the train step is built for "
                f"[batch_size={self.config.batch_size}, seq_len={self.config.seq_len}]"
                + (f" ({local} rows per host)" if jax.process_count() > 1 else "")
            )
        return {
            k: jax.make_array_from_process_local_data(self.batch_shardings[k], np.asarray(batch[k]))
            for k in splice.BATCH_KEYS
        }

    def step(self, state: TrainState, batch: dict[str, np.ndarray]):
        device_batch = self.shard_batch(batch)
        with sharding.activate(self.mesh):
            return self._jit_step(state, device_batch)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def batch_source(model_config: ModelConfig, config: TrainConfig, sampler: MSampler):
    """(next_batch(step), skip counts): the data pipeline when DataConfig names data, else
    synthetic batches."""
    data = DataConfig()
    if not (data.data_path or data.tfds_dir):
        return (lambda step: synthetic_batch(
            model_config, sampler, batch_size=config.batch_size, seq_len=config.seq_len,
            step=step, seed=config.seed)), {}
    batches = make_batches(
        data, num_queries=model_config.num_queries, image_size=model_config.vision.image_size,
        batch_size=config.batch_size // jax.process_count(), seq_len=config.seq_len,
        images_per_row=config.images_per_row, sampler=sampler, seed=config.seed)
    return (lambda step: next(batches)), batches.skipped


@gin.configurable
def train(workdir: str) -> list[dict]:
    """Train; write W/config.gin and W/metrics.jsonl. Returns the log. Every setting comes
    from gin (ModelConfig, TrainConfig, MeshConfig, MSampler, DataConfig)."""
    model_config, config, sampler = ModelConfig(), TrainConfig(), MSampler()
    mesh = sharding.make_mesh(sharding.MeshConfig())
    workdir_path = Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    is_chief = jax.process_index() == 0
    trainer = Trainer(model_config, config, mesh)
    state = trainer.init_state()
    batch_for, skipped = batch_source(model_config, config, sampler)
    log, tokens, tick = [], 0, time.perf_counter()
    metrics_file = (workdir_path / "metrics.jsonl").open("w") if is_chief else None
    with CompileCounter() as compiles, tqdm(
        total=config.steps, desc="train", disable=not is_chief, unit="step"
    ) as bar:
        for step in range(config.steps):
            batch = batch_for(step)
            state, metrics = trainer.step(state, batch)
            tokens += int((batch["segment_ids"] > 0).sum())
            if step == 0 and is_chief:  # the operative config is complete once traced
                write_atomic(workdir_path / "config.gin", gin.operative_config_str())
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                row = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                row = {"step": step + 1, **row, "tokens_per_sec": tokens / (now - tick),
                       "m_mean": float(np.mean(batch["m"])),
                       **{f"skipped/{reason}": n for reason, n in sorted(skipped.items())}}
                tokens, tick = 0, now
                log.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_sec']:.0f}")
                if metrics_file:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
            bar.update(1)
    if metrics_file:
        metrics_file.close()
    train_step_compiles = sum(n for f, n in compiles.counts.items() if "_train_step" in f)
    if is_chief:
        print(f"done: {config.steps} steps, final loss {log[-1]['loss']:.4f}, "
              f"train step compiled {train_step_compiles}x; logs in {workdir_path}")
    return log
