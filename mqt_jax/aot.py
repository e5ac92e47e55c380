"""Ahead-of-time compilation of the train step for a TPU slice, on a CPU host.

libtpu describes the slice (`jax.experimental.topologies`); the real train step (production
mesh, dtype, remat, scanned layers) is lowered with abstract inputs and compiled for it, and
the compiled program reports its per-chip memory and FLOPs. Nothing is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import jax

from mqt_jax.config import MeshConfig, ModelConfig, TrainConfig
from mqt_jax.core import flops, sharding, splice
from mqt_jax.core.checkpoint import abstract_like
from mqt_jax.core.outputs import markdown_table, write_atomic
from mqt_jax.training.trainer import Trainer

GIB = 2**30
# HBM per chip (public spec sheets); peak FLOP/s in flops.PEAK_TFLOPS.
CHIPS = {"v4": {"hbm_gib": 32}, "v5e": {"hbm_gib": 16}, "v5p": {"hbm_gib": 95}, "v6e": {"hbm_gib": 32}}


def chip_of(topology_name: str) -> str:
    kind = topology_name.split(":")[0]
    if kind not in CHIPS:
        raise ValueError(f"topology {topology_name!r}: chip {kind!r} unknown; expected one of "
                         f"{sorted(CHIPS)} (e.g. v5p:4x4x4, v5e:16x16)")
    return kind


def abstract_batch(trainer: Trainer) -> dict[str, jax.ShapeDtypeStruct]:
    cfg = trainer.config
    shapes = splice.batch_shapes(cfg.batch_size, cfg.seq_len, cfg.images_per_row,
                                 trainer.model_config.vision.image_size)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=trainer.batch_shardings[k])
            for k, (shape, dtype) in shapes.items()}


def compile_train_step(topology_name: str, model_config: ModelConfig, config: TrainConfig,
                       mesh_config: MeshConfig) -> dict:
    import importlib.util

    from jax.experimental import topologies

    chip = chip_of(topology_name)
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError("mqt-jax aot needs libtpu for TPU topologies: pip install -e '.[tpu]'")
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology_name).devices
    mesh = sharding.make_mesh(mesh_config, devices=devices)
    trainer = Trainer(model_config, config, mesh)
    state = abstract_like(trainer.abstract_state, trainer.state_shardings)
    with sharding.activate(mesh):
        compiled = trainer._jit_step.lower(state, abstract_batch(trainer)).compile()
    memory = compiled.memory_analysis()
    per_chip = {
        "arguments_gib": memory.argument_size_in_bytes / GIB,
        "outputs_gib": memory.output_size_in_bytes / GIB,
        "aliased_gib": memory.alias_size_in_bytes / GIB,  # donated state: counted once
        "temporaries_gib": memory.temp_size_in_bytes / GIB,
    }
    per_chip["total_gib"] = (per_chip["arguments_gib"] + per_chip["outputs_gib"]
                             - per_chip["aliased_gib"] + per_chip["temporaries_gib"])
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    params = trainer.abstract_params()
    tokens = config.batch_size * config.seq_len
    per_chip_gib = lambda tree: sum(  # noqa: E731  (each chip's shard of every leaf)
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)) / GIB
    analytical = flops.train_flops(flops.count(params["llm"]), tokens)
    chips = len(devices)
    step_at_peak = analytical / (chips * flops.PEAK_TFLOPS[chip] * 1e12)
    return {
        "topology": topology_name, "chips": chips, "chip": chip, "hbm_gib_per_chip": CHIPS[chip]["hbm_gib"],
        "mesh": dict(mesh.shape), "batch_size": config.batch_size, "seq_len": config.seq_len,
        "dtype": model_config.dtype, "remat_policy": model_config.remat_policy,
        "parameters": flops.count(params),
        "trainable_parameters": flops.count(state.trainable), "lora_rank": model_config.llm.lora.rank,
        "parameters_gib_per_chip": per_chip_gib(params),
        "optimizer_state_gib_per_chip": per_chip_gib(state.opt_state),
        "memory_per_chip": per_chip,
        "fits": per_chip["total_gib"] <= CHIPS[chip]["hbm_gib"],
        # XLA counts a scanned layer's body once, not once per layer: a lower bound.
        "xla_flops_per_chip_scan_bodies_once": float(cost.get("flops", 0.0)),
        "analytical_flops_6NT": float(analytical),
        "analytical_flops_per_chip": float(analytical / chips),
        "step_time_at_peak_s": step_at_peak,
        "tokens_per_sec_per_chip_at_peak": tokens / step_at_peak / chips,
    }


def tune(topology_name: str, model_config: ModelConfig, config: TrainConfig,
         mesh_config: MeshConfig, policies: tuple[str, ...],
         rows_per_chip: tuple[int, ...], progress=print) -> dict:
    """Compile the step for every (remat policy, rows per data-parallel chip); the ones that
    fit in HBM, with the LLM's FLOPs per token including recomputation, and the one that
    should be fastest: the fewest FLOPs per token that fits (then the larger batch)."""
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology_name).devices
    divisor = sharding.batch_divisor(sharding.make_mesh(mesh_config, devices=devices))
    rows = []
    for policy in policies:
        for per_chip in rows_per_chip:
            batch = per_chip * divisor
            report = compile_train_step(
                topology_name, dataclasses.replace(model_config, remat_policy=policy),
                dataclasses.replace(config, batch_size=batch), mesh_config)
            step = flops.train_step_flops(model_config.llm, batch, config.seq_len, policy)
            rows.append({"remat_policy": policy, "rows_per_chip": per_chip, "batch_size": batch,
                         "total_gib_per_chip": report["memory_per_chip"]["total_gib"],
                         "fits": report["fits"],
                         "flops_per_token": step / (batch * config.seq_len),
                         "step_at_peak_s": step / (report["chips"] * flops.PEAK_TFLOPS[report["chip"]] * 1e12)})
            progress(f"{policy} x {per_chip} rows per chip: {rows[-1]['total_gib_per_chip']:.2f} GiB"
                     f"{'' if report['fits'] else ' (does not fit)'}")
    fitting = [r for r in rows if r["fits"]]
    best = min(fitting, key=lambda r: (r["flops_per_token"], -r["rows_per_chip"])) if fitting else None
    return {"topology": topology_name, "chip": chip_of(topology_name),
            "hbm_gib_per_chip": CHIPS[chip_of(topology_name)]["hbm_gib"], "seq_len": config.seq_len,
            "attention": model_config.attention, "configurations": rows, "fastest": best}


def tune_table(result: dict) -> str:
    best = result["fastest"]
    return markdown_table(
        ["remat policy", "rows per chip", "global batch", "GiB per chip", "fits",
         "LLM GFLOPs per token", "step at peak (s)", ""],
        [[r["remat_policy"], r["rows_per_chip"], r["batch_size"], f"{r['total_gib_per_chip']:.2f}",
          "yes" if r["fits"] else "no", f"{r['flops_per_token'] / 1e9:.2f}",
          f"{r['step_at_peak_s']:.3f}", "fastest" if r is best else ""]
         for r in result["configurations"]])


def write_report(report: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(report, indent=2))


def report(topology_name: str, out: str | os.PathLike, tune_policies: bool = False,
           remat: tuple[str, ...] | None = None,
           rows_per_chip: tuple[int, ...] = (1, 2, 4, 8)) -> tuple[str, str | None]:
    """`mqt-jax aot` with the settings gin holds: compile the train step for the slice (with
    `tune_policies`, every remat policy x rows per chip), write the JSON report to `out`;
    returns (the text to print, the error when nothing fits, else None)."""
    from mqt_jax.config import REMAT_POLICIES

    model_config, config, mesh = ModelConfig(), TrainConfig(), MeshConfig()
    if tune_policies:
        policies = remat or REMAT_POLICIES
        unknown = sorted(set(policies) - set(REMAT_POLICIES))
        if unknown:
            raise ValueError(f"--remat {','.join(unknown)}: expected some of "
                             f"{','.join(REMAT_POLICIES)}")
        result = tune(topology_name, model_config, config, mesh, policies, rows_per_chip)
        write_report(result, out)
        error = None if result["fastest"] is not None else (
            f"no configuration fits in a {result['chip']} chip's {result['hbm_gib_per_chip']} GiB")
        return tune_table(result) + f"\nreport {out}", error
    found = compile_train_step(topology_name, model_config, config, mesh)
    write_report(found, out)
    mem = found["memory_per_chip"]
    text = (f"{topology_name}: {found['chips']} chips, mesh {found['mesh']}; per chip "
            f"{mem['total_gib']:.2f} GiB of {found['hbm_gib_per_chip']} GiB HBM "
            f"(arguments {mem['arguments_gib']:.2f}, temporaries {mem['temporaries_gib']:.2f}; "
            f"optimizer state {found['optimizer_state_gib_per_chip']:.2f} for "
            f"{found['trainable_parameters'] / 1e6:,.1f}M trainable parameters); step at peak "
            f"{found['step_time_at_peak_s']:.3f} s; report {out}")
    error = None if found["fits"] else (
        f"the train step needs {mem['total_gib']:.2f} GiB per chip but a {found['chip']} chip "
        f"has {found['hbm_gib_per_chip']} GiB")
    return text, error
