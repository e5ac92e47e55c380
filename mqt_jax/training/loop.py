"""The training loop (`mqt-jax train` runs it per stage): data, resume from the latest
checkpoint, the steps with their metrics, checkpoints, and clean ends on SIGTERM.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import time
from pathlib import Path

import gin
import jax
import numpy as np
from flax.traverse_util import flatten_dict
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from mqt_jax.config import DataConfig, ModelConfig, MSampler, StageConfig, TrainConfig
from mqt_jax.core import flops, sharding
from mqt_jax.core.checkpoint import Checkpointer, abstract_like, checkpoint_dir, first_line
from mqt_jax.core.outputs import write_atomic
from mqt_jax.data.pipeline import make_batches
from mqt_jax.training.metrics import MetricsLog, loss_by_m
from mqt_jax.training.synthetic import SyntheticBatches
from mqt_jax.training.trainer import CompileCounter, Trainer


def batch_source(model_config: ModelConfig, config: TrainConfig, data: DataConfig,
                 sampler: MSampler, mesh):
    """This process's batches: the data pipeline when DataConfig names data, else synthetic
    batches. Either way an iterator with get_state / set_state and a `skipped` Counter."""
    if not (data.data_path or data.tfds_dir):
        return SyntheticBatches(model_config, config, sampler,
                                sharding.process_rows(mesh, config.batch_size))
    return make_batches(
        data, num_queries=model_config.num_queries, image_size=model_config.vision.image_size,
        batch_size=config.batch_size // jax.process_count(), seq_len=config.seq_len,
        images_per_row=config.images_per_row, sampler=sampler, seed=config.seed)


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


def run_settings(model_config: ModelConfig, config: TrainConfig, data: DataConfig,
                 sampler: MSampler) -> dict:
    """What a checkpoint must agree with to be resumed, saved beside it: "model" decides the
    parameters' shapes and which are trained, "data" the data iterator's position."""
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
    """Parameters of the saved train state that this run lacks, adds, or shapes or types
    otherwise (a parameter moving between trainable and frozen counts as both)."""
    def shapes(tree):
        return {k: (tuple(v.shape), str(getattr(v, "dtype", "")))
                for k, v in flatten_dict(tree, sep="/").items() if hasattr(v, "shape")}
    saved = shapes({k: saved_tree.get(k) or {} for k in ("trainable", "frozen")})
    ours = shapes({"trainable": abstract_state.trainable, "frozen": abstract_state.frozen})
    out = [f"{k}: saved {saved[k][0]} {saved[k][1]}, now {ours[k][0]} {ours[k][1]}"
           for k in sorted(set(saved) & set(ours)) if saved[k] != ours[k]]
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


def train(workdir: str, settings: StageConfig) -> list[dict]:
    """Train with `settings`, resuming from W/checkpoints if a checkpoint is there; write
    W/config.gin (gin's whole config, which rebuilds the run) and W/metrics.jsonl. Returns this
    invocation's log."""
    model_config, config, sampler = settings.model, settings.train, settings.sampler
    mesh = sharding.make_mesh(settings.mesh)
    workdir_path = Path(workdir)
    init_from = init_sources(config, workdir_path)
    workdir_path.mkdir(parents=True, exist_ok=True)
    is_chief = jax.process_index() == 0
    preempted, lock, ckpt, out = Preempted(), None, None, None
    try:
        lock = WorkdirLock(workdir_path) if is_chief else None
        trainer = Trainer(model_config, config, mesh, sampler)
        batches = batch_source(model_config, config, settings.data, sampler, mesh)
        ckpt = Checkpointer(workdir_path / "checkpoints", config.max_to_keep)
        saved = run_settings(model_config, config, settings.data, sampler)
        resumed = resume(ckpt, trainer, batches, config.steps, saved)
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
        log = _loop(trainer, state, batches, ckpt, out, preempted, start, workdir_path, saved)
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
                    ckpt.wait()
                    good = ckpt.latest_step()
                    raise RuntimeError(
                        f"{int(row['nonfinite_in_a_row'])} non-finite updates in a row at step "
                        f"{done} (TrainConfig.max_nonfinite_in_a_row="
                        f"{config.max_nonfinite_in_a_row}); "
                        + (f"the last good checkpoint, step {good} in {ckpt.directory}, is intact"
                           if good else "no checkpoint was saved before"))
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
                 "EvalConfig.image_root", "EvalConfig.tokenizer_dir", "EvalConfig.val_questions",
                 "EvalConfig.val_answers", "EvalConfig.train_questions",
                 "EvalConfig.train_answers", "Recipe.shapes_dir")


def absolute_paths(text: str) -> str:
    """A gin config's text with the relative paths of PATH_BINDINGS made absolute."""
    def fix(match):
        key, quote, value = match.group(1), match.group(2), match.group(3)
        if key.split("/")[-1] not in PATH_BINDINGS or not value or "://" in value \
                or os.path.isabs(value):
            return match.group(0)
        return f"{key} = {quote}{os.path.abspath(value)}{quote}"

    return re.sub(r"^(\S+) = (['\"])(.*)\2$", fix, text, flags=re.M)
