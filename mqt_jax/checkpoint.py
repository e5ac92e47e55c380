"""Orbax checkpoints of a training run: state, data-iterator position and operative config.

Saves are asynchronous (training continues while arrays are written); orbax finalises a
checkpoint by renaming it into place, so one cut off mid-save is never taken as the latest.
Restores go straight into the shardings of the current mesh, whatever mesh wrote them.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)
ITEMS = ("state", "data", "config")


class Checkpointer:
    """`host_gb`: copy at most this many GB off the devices, and have at most this many in
    flight to disk, at a time while saving (saves then return once written; for a model that
    fits the host only once, e.g. converting on CPU). At least the largest array's size.
    None: asynchronous saves, which copy the whole state to the host first."""

    def __init__(self, directory: str | Path, max_to_keep: int = 3, host_gb: int | None = None):
        self.directory = Path(directory).absolute()
        self._warn_about_partial_saves()
        self.bounded = host_gb is not None
        items = {"item_names": ITEMS}
        if self.bounded:
            items = {"item_handlers": {
                "state": ocp.PyTreeCheckpointHandler(save_concurrent_gb=host_gb,
                                                     save_device_host_concurrent_gb=host_gb),
                "data": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}}
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=not self.bounded, create=True),
            **items,
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

    def save(self, step: int, state, data_state: dict, config_text: str) -> None:
        """Asynchronous: returns once the arrays are copied off the devices (bounded: once
        written)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=(ocp.args.PyTreeSave if self.bounded else ocp.args.StandardSave)(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave({"gin": config_text}),
        ), force=True)

    def restore(self, step: int, abstract_state):
        """(state, data_state) at `step`; `abstract_state` leaves are ShapeDtypeStructs that
        carry the target shardings (see `abstract_like`)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
        ))
        return restored.state, restored.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def checkpoint_dir(path: str | Path) -> Path:
    """A run's workdir (holding checkpoints/) or the checkpoints folder itself."""
    path = Path(path).absolute()
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def restore_params(path: str | Path, abstract_params, step: int | None = None,
                   only: tuple[str, ...] = (".*",)):
    """The parameters of a run (trainable and frozen merged; no optimizer state) at `step`
    (default: the latest), placed in `abstract_params`' shardings: ShapeDtypeStructs with a
    `sharding`, a nested dict shaped like the model's parameters. `only`: regexes (re.match
    on "/"-joined paths) of the parameters to read. Returns (params, step)."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    wanted = lambda key: any(re.match(p, "/".join(key)) for p in only)  # noqa: E731
    directory = checkpoint_dir(path)
    manager = ocp.CheckpointManager(directory, item_handlers={
        "state": ocp.PyTreeCheckpointHandler(),  # it restores a subset (partial_restore)
        "data": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler()})
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        saved = manager.item_metadata(step)["state"].tree
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
        missing = sorted("/".join(k) for k in set(want) - have)
        if missing:
            raise ValueError(f"{directory} step {step} lacks parameters {missing[:5]}"
                             + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        item = unflatten_dict(item)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)))
    finally:
        manager.close()
    state = restored.state
    merged = {**flatten_dict(state.get("frozen") or {}), **flatten_dict(state.get("trainable") or {})}
    return unflatten_dict(merged), step


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` (arrays or abstract values) placed with `shardings`."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
