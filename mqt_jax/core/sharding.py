"""Device mesh and the one table of logical-axis rules.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer
state sharded), `tensor` (heads / MLP / vocab split across devices).
"""

from __future__ import annotations

import contextlib
import os

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mqt_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes. Parameters use the plain names, activations the `activation_*`
# names, so that an array never asks for one mesh axis twice.
LOGICAL_AXIS_RULES = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("llm_embed", "tensor"),  # query transformer output projection, to the LLM width
    ("lora_rank", "fsdp"),  # LoRA adapters: fsdp-sharded by rank where no earlier axis took fsdp
    ("head_dim", None),
    ("layers", None),  # the stacked axis of scanned layers
    ("queries", None),
    ("positions", None),
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = config.shape(len(devices))
    if config.slices > 1:
        grid = multislice_grid(config, shape, devices)
        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def multislice_grid(config: MeshConfig, shape: tuple[int, int, int], devices) -> np.ndarray:
    """Devices arranged so that the data axis crosses slices and the rest stays within one."""
    from jax.experimental import mesh_utils

    if shape[0] % config.slices:
        raise ValueError(f"mesh {config}: data={shape[0]} is not a multiple of slices="
                         f"{config.slices} (the data axis spans the slices)")
    if not hasattr(devices[0], "slice_index"):
        raise ValueError(f"MeshConfig.slices={config.slices}: {devices[0].platform} devices "
                         f"carry no slice_index (multislice needs TPU slices)")
    return mesh_utils.create_hybrid_device_mesh(
        (shape[0] // config.slices,) + shape[1:], (config.slices, 1, 1), devices)


@contextlib.contextmanager
def activate(mesh: Mesh):
    """Mesh and logical rules in effect: trace and run the model's functions inside this."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield


def logical_to_shardings(boxed_tree, mesh: Mesh):
    """NamedShardings for a tree of `nn.Partitioned` leaves (e.g. `jax.eval_shape(init)`);
    a parameter axis that does not divide over its mesh axes is refused, naming it."""
    specs = nn.get_partition_spec(boxed_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)
    # The boxed values read directly: unboxing under an active mesh would add constraints.
    boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    values = jax.tree_util.tree_flatten_with_path(boxed_tree, is_leaf=boxed)[0]
    for (path, value), named in zip(values, jax.tree.leaves(shardings)):
        value = value.value if boxed(value) else value
        for size, axes in zip(value.shape, named.spec):
            names = (axes,) if isinstance(axes, str) else axes or ()
            devices = int(np.prod([mesh.shape[a] for a in names]))
            if size % devices:
                name = "/".join(str(getattr(k, "key", k)) for k in path)
                raise ValueError(f"parameter {name} {tuple(value.shape)}: an axis of {size} does "
                                 f"not divide over the mesh's {axes} ({devices} devices)")
    return shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def group_rows(mesh: Mesh, n: int, most: int) -> int:
    """Rows a group of n runs as: the batch devices times a power of two, at most `most`
    (a multiple of the batch devices): a small group is not padded to a full batch, and few
    shapes compile."""
    divisor = batch_divisor(mesh)
    return min(divisor << max(-(-n // divisor) - 1, 0).bit_length(), most)


def process_rows(mesh: Mesh, batch_size: int) -> slice:
    """The rows of a global batch that this process's devices hold under batch_sharding:
    what this process must load (jax.make_array_from_process_local_data takes them)."""
    index = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    starts = [i[0].start or 0 for i in index.values()]
    stops = [batch_size if i[0].stop is None else i[0].stop for i in index.values()]
    rows = slice(min(starts), max(stops))
    if rows.stop - rows.start != batch_size // jax.process_count():
        raise ValueError(f"this process's devices hold rows {rows.start}..{rows.stop - 1} of "
                         f"{batch_size}, not one contiguous share; the mesh interleaves hosts")
    return rows


def initialize_distributed(distributed: bool = False, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None):
    """Join a multi-process run before anything touches a device.

    Explicit (e.g. N local CPU processes): coordinator_address, num_processes, process_id.
    `distributed=True`: JAX detects the rest from the environment of a Cloud TPU pod slice
    (metadata server), a SLURM job (SLURM_* variables) or JAX_COORDINATOR_ADDRESS. Neither:
    a single process, nothing to do.
    """
    if num_processes is not None and num_processes > 1:
        if coordinator_address is None or process_id is None:
            raise ValueError("--num_processes needs --coordinator_address and --process_id")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif distributed or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
