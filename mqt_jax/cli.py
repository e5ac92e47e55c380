"""`mqt-jax` command line: sub-commands over gin-configured functions."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import gin

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def find_gin_file(name: str) -> str:
    """A path as given, else a file of the repository's configs/ folder."""
    for candidate in (Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.gin"):
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"gin file {name!r} not found (looked in . and {CONFIG_DIR})")


def parse_gin(files: list[str], params: list[str]) -> None:
    """Parse before importing anything heavy so that errors come first; gin's include
    statements resolve against configs/."""
    import mqt_jax.recipe  # noqa: F401  (registers every configurable)

    gin.clear_config()  # each command starts from its own files and bindings
    gin.add_config_file_search_path(str(CONFIG_DIR))
    # gin logs an ERROR for every search-path prefix an include is not under; it is not one.
    quiet = lambda record: not record.getMessage().startswith("Path not found")  # noqa: E731
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings([find_gin_file(f) for f in files], params)
    finally:
        logging.getLogger().removeFilter(quiet)


def cmd_train(args) -> int:
    parse_gin(args.gin_file or ["tiny_two_stage.gin"], args.gin_param)
    import jax

    from mqt_jax.recipe import run
    from mqt_jax.sharding import initialize_distributed
    from mqt_jax.train import Preemption

    initialize_distributed(args.distributed, args.coordinator_address, args.num_processes,
                           args.process_id)
    try:
        run(args.workdir)
    except Preemption as e:  # saved; the same command resumes
        if jax.process_index() == 0:
            print(e)
    return 0


def cmd_aot(args) -> int:
    parse_gin(args.gin_file or ["mqt_llava_7b_stage2.gin"], args.gin_param)
    from mqt_jax.aot import compile_train_step, write_report
    from mqt_jax.config import ModelConfig
    from mqt_jax.sharding import MeshConfig
    from mqt_jax.train import TrainConfig

    report = compile_train_step(args.topology, ModelConfig(), TrainConfig(), MeshConfig())
    out = args.out or f"aot_{args.topology.replace(':', '_')}.json"
    write_report(report, out)
    mem = report["memory_per_chip"]
    print(f"{args.topology}: {report['chips']} chips, mesh {report['mesh']}; per chip "
          f"{mem['total_gib']:.2f} GiB of {report['hbm_gib_per_chip']} GiB HBM "
          f"(arguments {mem['arguments_gib']:.2f}, temporaries {mem['temporaries_gib']:.2f}); "
          f"step at peak {report['step_time_at_peak_s']:.3f} s; report {out}")
    if not report["fits"]:
        print(f"mqt-jax aot: error: the train step needs {mem['total_gib']:.2f} GiB per chip but "
              f"a {report['chip']} chip has {report['hbm_gib_per_chip']} GiB", file=sys.stderr)
        return 3
    return 0


def cmd_data_shapes(args) -> int:
    from mqt_jax.data.shapes import write_shapes

    out = write_shapes(args.out, num_train=args.num_train, num_eval=args.num_eval,
                       seed=args.seed, image_size=args.image_size)
    print(f"wrote shapes-VQA to {out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mqt-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train_p = sub.add_parser("train", help="train (stage by stage) and evaluate at every m")
    train_p.add_argument("--gin_file", action="append", help="gin config (repeatable); "
                         "default configs/tiny_two_stage.gin")
    train_p.add_argument("--gin_param", action="append", default=[],
                         help="gin binding, e.g. 'TrainConfig.steps = 10' (repeatable)")
    train_p.add_argument("--workdir", default="workdir/tiny",
                         help="where checkpoints, config.gin, metrics.jsonl and eval/ go")
    multi = train_p.add_argument_group(
        "multi-process", "one process per host (TPU VM worker, SLURM task or local CPU process)")
    multi.add_argument("--distributed", action="store_true", help="join a multi-process run "
                       "described by the environment (TPU pod slice, SLURM, JAX_COORDINATOR_ADDRESS)")
    multi.add_argument("--coordinator_address", help="host:port of process 0 (explicit setup)")
    multi.add_argument("--num_processes", type=int)
    multi.add_argument("--process_id", type=int)
    train_p.set_defaults(func=cmd_train)
    aot_p = sub.add_parser("aot", help="compile the train step ahead of time for a TPU slice")
    aot_p.add_argument("--gin_file", action="append", help="default mqt_llava_7b_stage2.gin")
    aot_p.add_argument("--gin_param", action="append", default=[])
    aot_p.add_argument("--topology", required=True, help="e.g. v5p:4x4x4, v5e:16x16")
    aot_p.add_argument("--out", help="JSON report path (default aot_<topology>.json)")
    aot_p.set_defaults(func=cmd_aot)
    data_p = sub.add_parser("data", help="datasets").add_subparsers(dest="dataset", required=True)
    shapes_p = data_p.add_parser("shapes", help="generate the shapes-VQA dataset (LLaVA format)")
    shapes_p.add_argument("--out", required=True, help="output folder (must not exist)")
    shapes_p.add_argument("--num_train", type=int, default=2000)
    shapes_p.add_argument("--num_eval", type=int, default=300)
    shapes_p.add_argument("--seed", type=int, default=0)
    shapes_p.add_argument("--image_size", type=int, default=64)
    shapes_p.set_defaults(func=cmd_data_shapes)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"mqt-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
