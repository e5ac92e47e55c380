"""Orbax checkpoints of a training run: state, data-iterator position and operative config.

Saves are asynchronous (training continues while arrays are written); orbax finalises a
checkpoint by renaming it into place, so one cut off mid-save is never taken as the latest.
Restores go straight into the shardings of the current mesh, whatever mesh wrote them.

Damage: each save also stores a fingerprint of the state (per array, the wrap-around sum of
its 32-bit words: exact, so the same on any mesh, and computed on the devices). A checkpoint
that does not restore (a truncated, missing or emptied array file, a deleted manifest or
metadata file, unreadable JSON) or whose restored arrays do not match their fingerprint (any
single flipped bit) is reported, moved aside as `<step>.damaged`, and the next older one is
used; when none restores, nothing is moved (a change in this run is likelier than damage to
all of them) and the run stops. Not detected: changes that keep every array's word sum (e.g. two values swapped).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)
ITEMS = ("state", "data", "config")


class DamagedCheckpoint(Exception):
    """A checkpoint whose files do not restore, or whose arrays differ from what was saved."""


def _word_sum(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, bits) if x.dtype != jnp.bool_ else x
    return jnp.sum(words.astype(jnp.uint32), dtype=jnp.uint32)  # wraps: exact in any order


_fingerprint = jax.jit(lambda tree: [_word_sum(x) for x in jax.tree.leaves(tree)])


def fingerprint(tree) -> list[int]:
    """Per array of `tree`, the sum of its 32-bit words modulo 2^32."""
    return [int(v) for v in jax.device_get(_fingerprint(tree))]


class Checkpointer:
    """`host_gb`: copy at most this many GB off the devices, and have at most this many in
    flight to disk, at a time while saving (saves then return once written; for a model that
    fits the host only once, e.g. converting on CPU). At least the largest array's size.
    None: asynchronous saves, which copy the whole state to the host first."""

    def __init__(self, directory: str | Path, max_to_keep: int = 3, host_gb: int | None = None):
        self.directory = Path(directory).absolute()
        self._warn_about_partial_saves()
        self.bounded = host_gb is not None
        state = (ocp.PyTreeCheckpointHandler(save_concurrent_gb=host_gb,
                                             save_device_host_concurrent_gb=host_gb)
                 if self.bounded else ocp.StandardCheckpointHandler())
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=not self.bounded, create=True),
            item_handlers={"state": state, "data": ocp.JsonCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()},
        )

    def _warn_about_partial_saves(self) -> None:
        if not self.directory.exists():
            return
        partial = sorted(p.name for p in self.directory.iterdir() if ".orbax-checkpoint-tmp" in p.name)
        if partial:
            log.warning("ignoring half-written checkpoint(s) in %s: %s", self.directory, partial)
            print(f"checkpoint: ignoring half-written {partial} in {self.directory}")

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, config_text: str,
             settings: dict | None = None) -> None:
        """Asynchronous: returns once the arrays are copied off the devices (bounded: once
        written). `settings`: what a resume must agree with (JSON), kept beside the config."""
        self.manager.save(step, args=ocp.args.Composite(
            state=(ocp.args.PyTreeSave if self.bounded else ocp.args.StandardSave)(state),
            data=ocp.args.JsonSave({"iterator": data_state, "fingerprint": fingerprint(state)}),
            config=ocp.args.JsonSave({"gin": config_text, "settings": settings or {}}),
        ), force=True)

    def restore(self, step: int, abstract_state):
        """(state, data_state) at `step`; `abstract_state` leaves are ShapeDtypeStructs that
        carry the target shardings (see `abstract_like`). DamagedCheckpoint when the files do
        not restore or the arrays differ from their saved fingerprint."""
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
            ))
        except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many kinds)
            if not_damage(e):
                raise
            raise DamagedCheckpoint(first_line(e)) from e
        data = restored.data
        if not isinstance(data, dict):
            raise DamagedCheckpoint("its data-iterator item is not a JSON object")
        if "fingerprint" in data:
            if fingerprint(restored.state) != data["fingerprint"]:
                raise DamagedCheckpoint("its arrays differ from the fingerprint saved with them "
                                        "(changed bytes in an array file)")
            data = data["iterator"]
        elif "iterator" in data:  # saved with a fingerprint that is gone: unchecked, so unsafe
            raise DamagedCheckpoint("its data item lost the fingerprint saved with the arrays")
        return restored.state, data

    def saved_settings(self, step: int) -> dict:
        """The settings saved with `step` ({} when unreadable or absent)."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(
                config=ocp.args.JsonRestore())).config.get("settings") or {}
        except Exception:  # noqa: BLE001
            return {}

    def restore_latest(self, abstract_state, check=None):
        """(step, state, data_state) of the newest checkpoint that restores intact, or None
        when there is none. Damaged newer ones are reported and moved aside (`<step>.damaged`).
        `check(step, saved_tree)` may raise ValueError for a checkpoint that does not fit this
        run (a changed model): that is the user's to fix, never a reason to fall back."""
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                saved_tree = self.manager.item_metadata(step)["state"].tree
            except Exception as e:  # noqa: BLE001
                damaged.append((step, f"its metadata does not read ({first_line(e)})"))
                continue
            if check:
                check(step, saved_tree)
            try:
                state, data = self.restore(step, abstract_state)
            except DamagedCheckpoint as e:
                damaged.append((step, str(e)))
                continue
            self._set_aside(damaged)
            return step, state, data
        if damaged:  # all of them at once is more likely this run's change than damage: keep them
            raise ValueError(f"no checkpoint in {self.directory} restores (nothing moved; if they "
                             f"are damaged, move them aside to start again): "
                             + "; ".join(f"step {s}: {why}" for s, why in damaged))
        return None

    def _set_aside(self, damaged: list) -> None:
        for step, why in damaged:
            print(f"checkpoint: step {step} in {self.directory} is damaged ({why}); "
                  f"using an earlier one")
            if jax.process_index() == 0 and (self.directory / str(step)).exists():
                aside = self.directory / f"{step}.damaged"
                n = 1
                while aside.exists():
                    aside, n = self.directory / f"{step}.damaged{n}", n + 1
                os.replace(self.directory / str(step), aside)
        if damaged:
            self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


# Failures of the machine, not of the files: never a reason to set a checkpoint aside.
TRANSIENT = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "UNAVAILABLE",
             "DEADLINE_EXCEEDED")


def not_damage(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or any(t in str(e) for t in TRANSIENT)


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line (tensorstore's messages run to pages)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:limit] if text else ''}"


def checkpoint_dir(path: str | Path) -> Path:
    """A run's workdir (holding checkpoints/) or the checkpoints folder itself."""
    path = Path(path).absolute()
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def restore_params(path: str | Path, abstract_params, step: int | None = None,
                   only: tuple[str, ...] = (".*",), optional: tuple[str, ...] = ()):
    """The parameters of a run (trainable and frozen merged; no optimizer state) at `step`
    (default: the latest), placed in `abstract_params`' shardings: ShapeDtypeStructs with a
    `sharding`, a nested dict shaped like the model's parameters. `only`: regexes (re.match
    on "/"-joined paths) of the parameters to read; `optional`: those of them the run may
    lack (then left out of the result). Returns (params, step)."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    wanted = lambda key: any(re.match(p, "/".join(key)) for p in only)  # noqa: E731
    directory = checkpoint_dir(path)
    manager = ocp.CheckpointManager(directory, item_handlers={
        "state": ocp.PyTreeCheckpointHandler(),  # it restores a subset (partial_restore)
        "data": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler()})
    try:
        steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        for step in steps:  # the newest that restores; a damaged one is reported and skipped
            try:
                saved = manager.item_metadata(step)["state"].tree
            except Exception as e:  # noqa: BLE001
                damaged = f"its metadata does not read ({first_line(e)})"
            else:
                item = _partial_item(directory, step, saved, abstract_params, wanted, optional)
                try:
                    restored = manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.PyTreeRestore(
                            item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                            partial_restore=True)))
                    break
                except Exception as e:  # noqa: BLE001
                    if not_damage(e):
                        raise
                    damaged = first_line(e)
            if step == steps[-1]:
                raise ValueError(f"{directory} step {step} does not restore: {damaged}")
            print(f"checkpoint: step {step} in {directory} is damaged ({damaged}); using an "
                  f"earlier one")
    finally:
        manager.close()
    state = restored.state
    merged = {**flatten_dict(state.get("frozen") or {}), **flatten_dict(state.get("trainable") or {})}
    return unflatten_dict(merged), step


def _partial_item(directory, step, saved, abstract_params, wanted, optional=()) -> dict:
    """The ShapeDtypeStructs to restore: the wanted parameters, checked against the saved
    tree (every one present, no unknown one, same shapes) before anything is read."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    want = {k: v for k, v in flatten_dict(abstract_params).items() if wanted(k)}
    item, have = {}, set()
    for part in ("trainable", "frozen"):
        keys = {k: v for k, v in flatten_dict(saved.get(part) or {}).items() if wanted(k)}
        have |= set(keys)
        for key, meta in keys.items():
            if key not in want:
                raise ValueError(f"{directory} step {step}: parameter {'/'.join(key)} is not "
                                 f"in this model")
            if tuple(meta.shape) != tuple(want[key].shape):
                raise ValueError(f"{directory} step {step}: parameter {'/'.join(key)} has "
                                 f"shape {tuple(meta.shape)}; this model's is {want[key].shape}")
            item[(part,) + key] = want[key]
    missing = sorted("/".join(k) for k in set(want) - have
                     if not any(re.match(p, "/".join(k)) for p in optional))
    if missing:
        raise ValueError(f"{directory} step {step} lacks parameters {missing[:5]}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return unflatten_dict(item)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` (arrays or abstract values) placed with `shardings`."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
