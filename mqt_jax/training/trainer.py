"""The sharded train step: TrainConfig, the trainable / frozen split of the parameters, the
optimizer, and the Trainer (state created in its shardings, the jitted step, init_from).

Parameters are split into a trainable and a frozen tree by regex patterns (a per-stage gin
setting); only the trainable tree is differentiated and carries optimizer state.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mqt_jax.config import ModelConfig, MSampler, TrainConfig
from mqt_jax.core import sharding, splice
from mqt_jax.core.checkpoint import abstract_like, restore_params
from mqt_jax.models.lora import ADAPTERS
from mqt_jax.models.loss import cross_entropy, token_nll
from mqt_jax.models.vlm import VisionLanguageModel


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: dict
    frozen: dict
    opt_state: Any
    skipped_updates: jax.Array  # non-finite updates skipped so far
    nonfinite_in_a_row: jax.Array


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

    def __init__(self, model_config: ModelConfig, config: TrainConfig, mesh: jax.sharding.Mesh,
                 sampler: MSampler | None = None):
        """With `sampler` (training), seq_len is checked to leave room for text after the
        visual tokens at the sampler's largest m."""
        if config.batch_size % (config.grad_accum_steps * sharding.batch_divisor(mesh)):
            raise ValueError(
                f"TrainConfig.batch_size={config.batch_size} is not divisible by "
                f"grad_accum_steps={config.grad_accum_steps} x the mesh's data x fsdp = "
                f"{sharding.batch_divisor(mesh)} devices"
            )
        dropped = config.images_per_row * model_config.dropped_per_image
        if dropped and config.seq_len <= dropped:
            raise ValueError(
                f"TrainConfig.seq_len={config.seq_len} leaves no room after the visual tokens "
                f"leave the LLM: {config.images_per_row} image(s) x "
                f"{model_config.dropped_per_image} patches = {dropped}")
        if sampler is not None:
            largest = int(max(sampler.support(model_config.num_queries)))
            visual = config.images_per_row * (model_config.num_queries if model_config.dropped_per_image
                                              else largest)
            if config.seq_len <= 1 + visual:
                raise ValueError(
                    f"TrainConfig.seq_len={config.seq_len} leaves no room for text: BOS and "
                    f"{config.images_per_row} image(s) x {visual // config.images_per_row} visual "
                    f"tokens (m up to {largest}) take {1 + visual}; no token would carry loss")
        self.model_config, self.config, self.mesh = model_config, config, mesh
        devices = list(mesh.devices.flat)
        self._simulated_devices = len(devices) > 1 and all(d.platform == "cpu" for d in devices)
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

    def init_params(self, rng) -> dict:
        """Boxed (nn.Partitioned) parameters; trace with jax.eval_shape for shapes only."""
        cfg = self.config  # __init__ checked the room after a Victor drop
        batch = splice.placeholder_batch(sharding.batch_divisor(self.mesh), cfg.seq_len,
                                         cfg.images_per_row, self.model_config.vision.image_size)
        params = self.model.init(rng, batch, method="logits")["params"]
        return self.model_config.compressor.initialized(params, self.model_config.query)

    def _init_state(self, rng) -> TrainState:
        trainable, frozen = split_params(nn.meta.unbox(self.init_params(rng)), self.config)
        zero = jnp.zeros((), jnp.int32)
        return TrainState(zero, trainable, frozen, self.tx.init(trainable), zero, zero)

    def _state_shardings(self) -> TrainState:
        rng = jax.random.key(0)  # made outside the mesh: it may be an abstract (AOT) mesh
        with sharding.activate(self.mesh):
            boxed = jax.eval_shape(self.init_params, rng)
            self.abstract_state = jax.eval_shape(self._init_state, rng)
        param_sh = sharding.logical_to_shardings(boxed, self.mesh)
        paths = ["/".join(k) for k in flatten_dict(nn.meta.unbox(boxed))]
        for pattern in self.config.trainable:
            if not any(re.match(pattern, path) for path in paths):
                raise ValueError(f"TrainConfig.trainable: {pattern!r} matches no parameter of "
                                 f"this model (its parameters start with "
                                 f"{sorted({p.split('/')[0] for p in paths})})")
        if not any(is_trainable(path, self.config) for path in paths):
            raise ValueError(f"TrainConfig.trainable={self.config.trainable} less frozen="
                             f"{self.config.frozen} leaves no parameter to train")
        trainable_sh, frozen_sh = split_params(param_sh, self.config)
        scalar = sharding.replicated(self.mesh)
        opt_sh = optax.tree_map_params(
            self.tx, lambda _, s: s, self.abstract_state.opt_state, trainable_sh,
            transform_non_params=lambda _: scalar,
        )
        return TrainState(scalar, trainable_sh, frozen_sh, opt_sh, scalar, scalar)

    def abstract_params(self) -> dict:
        """ShapeDtypeStructs of all parameters, carrying their shardings on this mesh."""
        return abstract_like(
            merge_params(self.abstract_state.trainable, self.abstract_state.frozen),
            merge_params(self.state_shardings.trainable, self.state_shardings.frozen))

    def init_state(self, seed: int | None = None, init_from: Path | dict | None = None) -> TrainState:
        """Parameters created directly in their shardings, never whole on one device; then,
        with `init_from` (a run, or {run: regexes}), the matching parameters read from each
        run in turn (a run without its own regexes: those of `init_from_params`)."""
        seed = self.config.seed if seed is None else seed
        with sharding.activate(self.mesh):
            init = jax.jit(self._init_state, out_shardings=self.state_shardings)
            state = init(jax.random.key(seed))
        if init_from is None:
            return state
        sources = init_from if isinstance(init_from, dict) else {init_from: self.config.init_from_params}
        params = merge_params(state.trainable, state.frozen)
        for run, patterns in sources.items():
            # LoRA adapters a run lacks (stage 1 had none) keep their init: B = 0, the base model.
            loaded, _ = restore_params(run, self.abstract_params(), only=tuple(patterns),
                                       optional=(ADAPTERS,))
            params = merge_params(loaded, params)
        trainable, frozen = split_params(params, self.config)
        return state.replace(trainable=trainable, frozen=frozen)

    def loss(self, params: dict, batch: dict):
        logits = self.model.apply({"params": params}, batch, method="logits")
        return cross_entropy(logits, batch["targets"], batch["loss_mask"])

    def _loss_and_grads(self, state: TrainState, batch: dict):
        """Mean token loss, token count, per-row NLL sums and gradients of the whole batch,
        accumulated over `grad_accum_steps` micro-batches (sums first, one division at the end,
        so the result equals a single pass)."""

        lora = self.model_config.llm.lora
        step_rng = jax.random.fold_in(jax.random.key(self.config.seed), state.step)

        def summed(trainable, micro, index=0):
            # LoRA's dropout (models/lora.py) is the only randomness in the step.
            rngs = {"dropout": jax.random.fold_in(step_rng, index)} if lora.rank and lora.dropout else {}
            logits = self.model.apply(
                {"params": merge_params(trainable, state.frozen)}, micro, method="logits", rngs=rngs)
            nll = token_nll(logits, micro["targets"], micro["loss_mask"])
            return nll.sum(), (micro["loss_mask"].sum(), nll.sum(-1))

        grad_fn = jax.value_and_grad(summed, has_aux=True)
        steps = self.config.grad_accum_steps
        if steps == 1:
            (nll, (count, row_nll)), grads = grad_fn(state.trainable, batch)
        else:
            def split(x):  # micro-batch j takes rows j, j + steps, ...: every shard has some
                x = x.reshape((x.shape[0] // steps, steps) + x.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(
                    x, NamedSharding(self.mesh, P(None, sharding.BATCH_AXES)))

            def body(carry, xs):
                micro, index = xs
                (nll, (count, row_nll)), grads = grad_fn(state.trainable, micro, index)
                acc_nll, acc_count, acc_grads = carry
                return (acc_nll + nll, acc_count + count,
                        jax.tree.map(jnp.add, acc_grads, grads)), row_nll

            zeros = jax.tree.map(jnp.zeros_like, state.trainable)
            (nll, count, grads), row_nll = jax.lax.scan(
                body, (0.0, 0.0, zeros), (jax.tree.map(split, batch), jnp.arange(steps)))
            row_nll = row_nll.swapaxes(0, 1).reshape(-1)  # back to the batch's row order
        divisor = jnp.maximum(count, 1.0)  # a batch without loss tokens reports 0 of them
        grads = jax.tree.map(lambda g: g / divisor, grads)
        return nll / divisor, count, row_nll, grads

    def _train_step(self, state: TrainState, batch: dict):
        loss, num_tokens, row_nll, grads = self._loss_and_grads(state, batch)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        # A non-finite loss or gradient keeps the old parameters and optimizer state.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        in_a_row = jnp.where(finite, 0, state.nonfinite_in_a_row + 1)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": self.schedule(state.step),
            "loss_tokens": num_tokens,
            "row_nll": row_nll,  # per-row sums: the host splits the loss by m range
            "skipped_updates": state.skipped_updates + (~finite),
            "nonfinite_in_a_row": in_a_row,
        }
        return state.replace(
            step=state.step + 1, trainable=keep(trainable, state.trainable),
            opt_state=keep(opt_state, state.opt_state),
            skipped_updates=state.skipped_updates + (~finite), nonfinite_in_a_row=in_a_row,
        ), metrics

    def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Validate on the host (clear errors before any compilation), then place the batch."""
        v = self.model_config.vision
        splice.validate_batch(batch, self.model_config.num_queries, v.image_size,
                              self.model_config.dropped_per_image)
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
            state, metrics = self._jit_step(state, device_batch)
        if self._simulated_devices:
            # XLA:CPU starts the next step on a device whose inputs are ready while the last
            # step still runs on others; their collectives then interleave in different orders
            # and can deadlock (seen: 9 device threads stuck in an all-gather and an
            # all-reduce at once on 8 devices). Real accelerators keep the overlap.
            jax.block_until_ready((state, metrics))
        return state, metrics
