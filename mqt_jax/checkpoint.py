"""Orbax checkpoints of a training run: state, data-iterator position and operative config.

Saves are asynchronous (training continues while arrays are written); orbax finalises a
checkpoint by renaming it into place, so one cut off mid-save is never taken as the latest.
Restores go straight into the shardings of the current mesh, whatever mesh wrote them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)
ITEMS = ("state", "data", "config")


class Checkpointer:
    def __init__(self, directory: str | Path, max_to_keep: int = 3):
        self.directory = Path(directory).absolute()
        self._warn_about_partial_saves()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=True, create=True),
            item_names=ITEMS,
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
        """Asynchronous: returns once the arrays are copied off the devices."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
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


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` (arrays or abstract values) placed with `shardings`."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
