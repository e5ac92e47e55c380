"""Sharded training: state, optimizer, the jitted train step and the loop.

Parameters are split into a trainable and a frozen tree by regex patterns (a per-stage gin
setting); only the trainable tree is differentiated and carries optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
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
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from mqt_jax import flops, sharding, splice
from mqt_jax.checkpoint import (Checkpointer, abstract_like, checkpoint_dir, first_line,
                                restore_params)
from mqt_jax.config import ModelConfig
from mqt_jax.data.pipeline import DataConfig, make_batches
from mqt_jax.loss import cross_entropy, token_nll
from mqt_jax.m_sampler import MSampler
from mqt_jax.models.vlm import VisionLanguageModel
from mqt_jax.outputs import write_atomic
from mqt_jax.synthetic import synthetic_batch


@gin.configurable
@dataclasses.dataclass(frozen=True)
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
        return self.model.init(rng, batch, method="logits")["params"]

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
            loaded, _ = restore_params(run, self.abstract_params(), only=tuple(patterns))
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

        def summed(trainable, micro):
            logits = self.model.apply(
                {"params": merge_params(trainable, state.frozen)}, micro, method="logits")
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

            def body(carry, micro):
                (nll, (count, row_nll)), grads = grad_fn(state.trainable, micro)
                acc_nll, acc_count, acc_grads = carry
                return (acc_nll + nll, acc_count + count,
                        jax.tree.map(jnp.add, acc_grads, grads)), row_nll

            zeros = jax.tree.map(jnp.zeros_like, state.trainable)
            (nll, count, grads), row_nll = jax.lax.scan(
                body, (0.0, 0.0, zeros), jax.tree.map(split, batch))
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
            return self._jit_step(state, device_batch)


def m_ranges(num_queries: int) -> list[tuple[int, int]]:
    """(lo, hi] buckets at powers of 4 up to M: (0, 4], (4, 16], (16, 64], ..."""
    edges = [0]
    while edges[-1] < num_queries:
        edges.append(min(max(4 * edges[-1], 4), num_queries))
    return list(zip(edges[:-1], edges[1:]))


def loss_by_m(row_nll: np.ndarray, batch: dict, num_queries: int) -> dict[str, float]:
    """The Matryoshka curve during training: mean token loss per m range. A row counts under
    the m of its first image (exact without packing); rows without images are left out."""
    tokens = batch["loss_mask"].sum(1)
    has_image = (batch["visual_index"] >= 0).any(1)
    m = batch["m"][:, 0]
    out = {}
    for lo, hi in m_ranges(num_queries):
        sel = has_image & (m > lo) & (m <= hi) & (tokens > 0)
        if sel.any():
            out[f"loss_m/{lo + 1}-{hi}"] = float(row_nll[sel].sum() / tokens[sel].sum())
    return out


class SyntheticBatches:
    """synthetic_batch as a checkpointable iterator (its state is the step). Every process
    makes the same global batch and keeps its own rows, so the global batch does not depend
    on the number of processes."""

    def __init__(self, model_config: ModelConfig, config: TrainConfig, sampler: MSampler,
                 rows: slice = slice(None)):
        self.model_config, self.config, self.sampler, self.rows = model_config, config, sampler, rows
        self.step, self.skipped = 0, {}

    def __next__(self):
        batch = synthetic_batch(self.model_config, self.sampler, batch_size=self.config.batch_size,
                                seq_len=self.config.seq_len, step=self.step, seed=self.config.seed)
        self.step += 1
        return {k: v[self.rows] for k, v in batch.items()}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = state["step"]


def batch_source(model_config: ModelConfig, config: TrainConfig, sampler: MSampler, mesh):
    """This process's batches: the data pipeline when DataConfig names data, else synthetic
    batches. Either way an iterator with get_state / set_state and a `skipped` Counter."""
    data = DataConfig()
    if not (data.data_path or data.tfds_dir):
        return SyntheticBatches(model_config, config, sampler,
                                sharding.process_rows(mesh, config.batch_size))
    return make_batches(
        data, num_queries=model_config.num_queries, image_size=model_config.vision.image_size,
        batch_size=config.batch_size // jax.process_count(), seq_len=config.seq_len,
        images_per_row=config.images_per_row, sampler=sampler, seed=config.seed)


class MetricsLog:
    """Process 0's record of a run: W/metrics.jsonl (one JSON object per logged step) and
    TensorBoard events in W/tensorboard (every scalar, and the histogram of m)."""

    def __init__(self, workdir: Path, resume_step: int):
        """A resumed run keeps the rows up to its checkpoint's step (the later ones are
        trained again and logged anew)."""
        path = workdir / "metrics.jsonl"
        kept = []
        if resume_step and path.exists():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut off by a kill
        write_atomic(path, "".join(kept))
        self.file = path.open("a")
        # events after the checkpoint's step are dropped too (they are logged anew)
        self.board = SummaryWriter(str(workdir / "tensorboard"),
                                   purge_step=resume_step + 1 if resume_step else None)

    def write(self, row: dict, batch: dict) -> None:
        step = row["step"]
        for key, value in row.items():
            if key != "step":
                self.board.add_scalar(key, value, step)
        used = batch["m"][(batch["visual_index"] >= 0).any(1)][:, 0]  # rows with an image
        if used.size:
            self.board.add_histogram("m", used, step)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        self.board.close()


class Preemption(Exception):
    """Raised once a SIGTERM'd run has saved: the command ends (exit 0), later stages wait."""


class Preempted:
    """SIGTERM (how schedulers and TPU maintenance preempt) sets a flag the loop checks after
    each step: it then saves and raises Preemption. Installed before start-up, so a SIGTERM
    while compiling or restoring ends the run cleanly too."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


class WorkdirLock:
    """One trainer per workdir: an exclusive lock on W/.lock (released by the OS if the
    process dies), taken by process 0."""

    def __init__(self, workdir: Path):
        import fcntl

        self.file = (workdir / ".lock").open("a")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise ValueError(f"{workdir} is in use by another trainer (it holds {workdir / '.lock'}); "
                             f"wait for it or choose another --workdir") from None

    def release(self):
        self.file.close()


def run_settings(model_config: ModelConfig, config: TrainConfig, sampler: MSampler) -> dict:
    """What a checkpoint must agree with to be resumed, saved beside it: "model" decides the
    parameters' shapes and which are trained, "data" the data iterator's position."""
    data = DataConfig()
    return {
        "model": {"ModelConfig": dataclasses.asdict(model_config),
                  "TrainConfig.trainable": list(config.trainable),
                  "TrainConfig.frozen": list(config.frozen)},
        "data": {"DataConfig": dataclasses.asdict(data), "MSampler": dataclasses.asdict(sampler),
                 **{f"TrainConfig.{k}": getattr(config, k)
                    for k in ("batch_size", "seq_len", "images_per_row", "seed")}},
    }


def settings_changes(saved: dict, current: dict) -> str:
    """The settings that differ between two run_settings() parts, as one line."""
    flat = lambda d: flatten_dict(json.loads(json.dumps(d)), sep=".")  # noqa: E731  (tuples as lists)
    a, b = flat(saved or {}), flat(current)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "; ".join(f"{k.replace('ModelConfig.', '')}: saved {a.get(k)!r}, now {b.get(k)!r}"
                     for k in keys[:8])


def shape_mismatches(saved_tree, abstract_state) -> list[str]:
    """Parameters of the saved train state that this run lacks, adds, or shapes otherwise
    (a parameter moving between trainable and frozen counts as both)."""
    def shapes(tree):
        return {k: tuple(v.shape) for k, v in flatten_dict(tree, sep="/").items()
                if hasattr(v, "shape")}
    saved = shapes({k: saved_tree.get(k) or {} for k in ("trainable", "frozen")})
    ours = shapes({"trainable": abstract_state.trainable, "frozen": abstract_state.frozen})
    out = [f"{k}: saved {saved[k]}, now {ours[k]}" for k in sorted(set(saved) & set(ours))
           if saved[k] != ours[k]]
    out += [f"{k}: saved, not in this run" for k in sorted(set(saved) - set(ours))]
    out += [f"{k}: not saved" for k in sorted(set(ours) - set(saved))]
    return out


def resume(ckpt: Checkpointer, trainer: Trainer, batches, steps: int, settings: dict):
    """(start step, state) from the newest intact checkpoint, with the data iterator moved to
    its position; None without one. A checkpoint that does not fit this run (a changed model,
    trainable set, data or worker count) is a one-line error naming what changed."""

    def fits(step: int, saved_tree) -> None:
        if step > steps:
            raise ValueError(f"TrainConfig.steps={steps}, but {ckpt.directory} is at step {step}: "
                             f"nothing to train (raise steps, or use another --workdir)")
        wrong = shape_mismatches(saved_tree, trainer.abstract_state)
        if wrong:
            changed = settings_changes(ckpt.saved_settings(step).get("model"), settings["model"])
            raise ValueError(f"{ckpt.directory} step {step} was saved by another model or "
                             f"trainable set: {'; '.join(wrong[:3])}"
                             + (f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else "")
                             + (f". Changed settings: {changed}" if changed else ""))

    abstract = abstract_like(trainer.abstract_state, trainer.state_shardings)
    found = ckpt.restore_latest(abstract, check=fits)
    if found is None:
        return None
    step, state, data_state = found
    position = data_state.get("batches", data_state.get("step")) if isinstance(data_state, dict) else None
    if position is not None and position != step:
        raise ValueError(f"{ckpt.directory} step {step}: its data-iterator state is at batch "
                         f"{position}, not {step}; resuming would train on other data")
    try:
        batches.set_state(data_state)
    except Exception as e:  # noqa: BLE001  (grain raises many kinds for a foreign state)
        changed = settings_changes(ckpt.saved_settings(step).get("data"), settings["data"])
        raise ValueError(
            f"{ckpt.directory} step {step}: the data iterator's saved position does not fit this "
            f"run's data ({first_line(e, 160)})"
            + (f"; changed settings: {changed}" if changed else "")) from None
    return step, state


def no_more_data(step: int, steps: int, batches) -> ValueError:
    skipped = ", ".join(f"{r} {n}" for r, n in sorted(batches.skipped.items())) or "none"
    return ValueError(f"the data ran out at step {step} of TrainConfig.steps={steps} "
                      f"(DataConfig.num_epochs; skipped records: {skipped})")


def init_sources(config: TrainConfig, workdir: Path) -> dict[Path, tuple[str, ...]] | None:
    """TrainConfig.init_from as {checkpoints folder: regexes}, each folder checked to exist."""
    if not config.init_from:
        return None
    given = config.init_from if isinstance(config.init_from, dict) else {
        config.init_from: config.init_from_params}
    sources = {}
    for name, patterns in given.items():
        sibling = workdir.absolute().parent / name  # an absolute name stays itself
        run = checkpoint_dir(sibling if sibling.exists() else Path(name))
        if not run.is_dir():
            raise FileNotFoundError(f"TrainConfig.init_from: {name!r} does not exist (neither "
                                    f"{sibling}, a sibling of the workdir, nor {Path(name).absolute()})")
        sources[run] = tuple(patterns)
    return sources


@gin.configurable
def train(workdir: str) -> list[dict]:
    """Train, resuming from W/checkpoints if a checkpoint is there; write W/config.gin and
    W/metrics.jsonl. Returns this invocation's log. Every setting comes from gin
    (ModelConfig, TrainConfig, MeshConfig, MSampler, DataConfig)."""
    model_config, config, sampler = ModelConfig(), TrainConfig(), MSampler()
    mesh = sharding.make_mesh(sharding.MeshConfig())
    workdir_path = Path(workdir)
    init_from = init_sources(config, workdir_path)
    workdir_path.mkdir(parents=True, exist_ok=True)
    is_chief = jax.process_index() == 0
    preempted, lock, ckpt, out = Preempted(), None, None, None
    try:
        lock = WorkdirLock(workdir_path) if is_chief else None
        trainer = Trainer(model_config, config, mesh, sampler)
        batches = batch_source(model_config, config, sampler, mesh)
        ckpt = Checkpointer(workdir_path / "checkpoints", config.max_to_keep)
        settings = run_settings(model_config, config, sampler)
        resumed = resume(ckpt, trainer, batches, config.steps, settings)
        if resumed:
            start, state = resumed
            if is_chief:
                print(f"resumed from step {start} of {ckpt.directory}")
        else:
            start, state = 0, trainer.init_state(init_from=init_from)
            for run, patterns in (init_from or {}).items():
                if is_chief:
                    print(f"initialised {list(patterns)} from {run}")
        if preempted.requested:
            raise Preemption(f"SIGTERM during start-up: nothing trained since step {start}; exiting")
        out = MetricsLog(workdir_path, start) if is_chief else None
        log = _loop(trainer, state, batches, ckpt, out, preempted, start, workdir_path, settings)
    finally:
        preempted.restore()
        if ckpt:
            ckpt.close()
        if out:
            out.close()
        if lock:
            lock.release()
    return log


def _loop(trainer: Trainer, state, batches, ckpt: Checkpointer, out, preempted, start: int,
          workdir_path: Path, settings: dict) -> list[dict]:
    config, model_config, mesh = trainer.config, trainer.model_config, trainer.mesh
    is_chief = jax.process_index() == 0
    config_text = absolute_paths(gin.config_str())
    step_flops = flops.train_flops(flops.count(trainer.abstract_params()["llm"]),
                                   config.batch_size * config.seq_len)
    peak = flops.peak_flops()
    local_rows = sharding.process_rows(mesh, config.batch_size)
    log, tokens, tick, last = [], 0, time.perf_counter(), start
    with CompileCounter() as compiles, tqdm(
        total=config.steps, initial=start, desc="train", disable=not is_chief, unit="step",
        smoothing=0,  # steps are dispatched asynchronously: average over the whole run
    ) as bar:
        for step in range(start, config.steps):
            try:
                batch = next(batches)
            except StopIteration:
                raise no_more_data(step, config.steps, batches) from None
            state, metrics = trainer.step(state, batch)
            tokens += int((batch["segment_ids"] > 0).sum())  # this host's, padding excluded
            if step == start:  # the operative config is complete once traced
                config_text = absolute_paths(gin.operative_config_str())
                if is_chief:
                    write_atomic(workdir_path / "config.gin", config_text)
            done = step + 1
            if done % config.log_every == 0 or done == config.steps or preempted.requested:
                fetched = jax.device_get(metrics)
                if jax.process_count() > 1:  # every host counted its own rows
                    tokens = int(multihost_utils.process_allgather(np.int64(tokens)).sum())
                row_nll = np.asarray(fetched.pop("row_nll"))[local_rows]  # this host's batch
                now = time.perf_counter()
                achieved = step_flops * (done - last) / (now - tick) / mesh.size
                row = {"step": done, **{k: float(v) for k, v in fetched.items()},
                       "tokens_per_sec": tokens / (now - tick),
                       "tflops_per_device": achieved / 1e12,
                       **({"mfu": achieved / peak} if peak else {}),
                       "m_mean": float(np.mean(batch["m"])),
                       **loss_by_m(row_nll, batch, model_config.num_queries),
                       **{f"skipped/{r}": n for r, n in sorted(batches.skipped.items())}}
                tokens, tick, last = 0, now, done
                log.append(row)
                if out:
                    out.write(row, batch)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_sec']:.0f}")
                if row["nonfinite_in_a_row"] >= config.max_nonfinite_in_a_row:
                    raise RuntimeError(
                        f"{int(row['nonfinite_in_a_row'])} non-finite updates in a row at step "
                        f"{done} (TrainConfig.max_nonfinite_in_a_row="
                        f"{config.max_nonfinite_in_a_row}); the last good checkpoint in "
                        f"{ckpt.directory} is intact")
            bar.update(1)
            if (config.checkpoint_every and done % config.checkpoint_every == 0) \
                    or done == config.steps or preempted.requested:
                ckpt.save(done, state, batches.get_state(), config_text, settings)
            if preempted.requested:
                ckpt.wait()
                raise Preemption(f"SIGTERM: saved step {done} to {ckpt.directory}; exiting")
    ckpt.wait()
    train_step_compiles = sum(n for f, n in compiles.counts.items() if "_train_step" in f)
    if is_chief and log:
        print(f"done: {config.steps} steps, final loss {log[-1]['loss']:.4f}, "
              f"train step compiled {train_step_compiles}x; logs in {workdir_path}")
    elif is_chief:
        print(f"done: {workdir_path} is already at step {start} of {config.steps}")
    return log


# Bindings that hold file or folder paths: written absolute into a run's config.gin, so the
# run opens from any working directory.
PATH_BINDINGS = ("DataConfig.data_path", "DataConfig.image_root", "DataConfig.tfds_dir",
                 "DataConfig.tokenizer_dir", "EvalConfig.questions", "EvalConfig.answers",
                 "EvalConfig.image_root", "EvalConfig.tokenizer_dir", "Recipe.shapes_dir")


def absolute_paths(text: str) -> str:
    """A gin config's text with the relative paths of PATH_BINDINGS made absolute."""
    def fix(match):
        key, quote, value = match.group(1), match.group(2), match.group(3)
        if key.split("/")[-1] not in PATH_BINDINGS or not value or "://" in value \
                or os.path.isabs(value):
            return match.group(0)
        return f"{key} = {quote}{os.path.abspath(value)}{quote}"

    return re.sub(r"^(\S+) = (['\"])(.*)\2$", fix, text, flags=re.M)
