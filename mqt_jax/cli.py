"""`mqt-jax` command line: sub-commands over gin-configured functions."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from mqt_jax.config import EngineConfig, EvalConfig, SamplingConfig, ServeConfig, ShapesConfig
from mqt_jax.core.gin_files import CONFIG_DIR, find_gin_file, in_scope, parse_gin  # noqa: F401


def cmd_train(args) -> int:
    parse_gin(args.gin_file or ["tiny_two_stage.gin"], args.gin_param)
    import jax

    from mqt_jax.training.loop import Preemption
    from mqt_jax.training.recipe import run

    join_processes(args)
    try:
        run(args.workdir)
    except Preemption as e:  # saved; the same command resumes
        if jax.process_index() == 0:
            print(e)
    return 0


def cmd_aot(args) -> int:
    parse_gin(args.gin_file or ["mqt_llava_7b_stage2.gin"], args.gin_param)
    from mqt_jax.aot import report

    out = args.out or f"aot_{args.topology.replace(':', '_')}{'_tune' if args.tune else ''}.json"
    remat = tuple(args.remat.split(",")) if args.remat else None
    text, error = report(args.topology, out, args.tune, remat, tuple(args.rows_per_chip))
    print(text)
    if error:
        print(f"mqt-jax aot: error: {error}", file=sys.stderr)
    return 3 if error else 0


def parse_m(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"--m {text!r}: expected integers separated by commas, e.g. 2,16,64")
    return values


def parse_run_config(args) -> tuple[Path, str]:
    """The run named by --workdir / --ckpt, its config parsed (gin_files.parse_run_config)."""
    from mqt_jax.run import parse_run_config

    return parse_run_config(args.ckpt or args.workdir, args.gin_file or [],
                                      args.gin_param)


def open_model(args, m_values: list[int] = (), check=None):
    """`mqt_jax.load` of the run named by --workdir / --ckpt with --gin_file / --gin_param on
    top. `m_values` are checked against its M, and `check(model_config)` is called, before
    any parameter is read."""
    from mqt_jax.inference.api import load

    def checks(config):
        if m_values:
            config.check_m(m_values)
        if check:
            check(config)

    return load(args.ckpt or args.workdir, gin_files=args.gin_file or [],
                gin_params=args.gin_param, check=checks)


def read_image(path: str):
    """--image, decoded (a one-line error for a missing, empty, undecodable or huge file),
    before any parameter is read."""
    from mqt_jax.data.preprocess import open_image

    if not Path(path).is_file():
        raise FileNotFoundError(f"--image {path} not found")
    return open_image(path)


GENERATE_SAMPLING = SamplingConfig(max_new_tokens=64)


def cmd_generate(args) -> int:
    import jax

    pil = read_image(args.image)
    m_values = parse_m(args.m)
    sampling = with_flags(args, GENERATE_SAMPLING)  # bad values fail here
    model = open_model(args, m_values)
    # One batch: the rows differ in m only (m is data, so they share one compiled prefill).
    answers = model.generate([pil] * len(m_values), [args.prompt] * len(m_values), m=m_values,
                             **dataclasses.asdict(sampling))
    if jax.process_index() == 0:
        for m, answer in zip(m_values, answers):
            print(f"m={m}: {answer}" if len(m_values) > 1 else answer)
    return 0


def cmd_eval(args) -> int:
    import dataclasses

    import jax

    from mqt_jax.evaluation.benchmarks import get
    from mqt_jax.evaluation.evaluate import evaluate_run

    if args.benchmark:
        get(args.benchmark)  # a known name, before anything is read
    with_flags(args, EvalConfig())  # bad values, before anything is read
    for flag, path in (("--questions", args.questions), ("--answers", args.answers),
                       ("--image_root", args.image_root), ("--val_questions", args.val_questions),
                       ("--val_answers", args.val_answers),
                       ("--train_questions", args.train_questions),
                       ("--train_answers", args.train_answers)):
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path} not found")
    given = Path(args.ckpt or args.workdir)
    workdir = given.parent if given.name == "checkpoints" else given
    out = Path(args.out) if args.out else workdir / "eval"  # where `mqt-jax train` puts it
    out.mkdir(parents=True, exist_ok=True)  # fails now, not after generating
    join_processes(args)
    auto = args.m == "auto"
    run_ = open_model(args, parse_m(args.m) if args.m and not auto else []).run
    config = with_flags(args, run_.eval_config)
    if args.benchmark and args.benchmark != run_.eval_config.benchmark and not args.questions:
        raise ValueError(f"--benchmark {args.benchmark}: give its --questions file")
    if args.m and not auto:
        config = dataclasses.replace(config, m_values=tuple(parse_m(args.m)))
    if not config.questions:
        raise ValueError("no question file: give --questions (the run's config names none)")
    (out / config.benchmark).mkdir(parents=True, exist_ok=True)
    if auto:
        return eval_auto(run_, config, out / config.benchmark, args)
    evaluate_run(run_, out, config)
    if jax.process_index() == 0:
        print(f"sweep over every benchmark in {out}: sweep.csv, sweep.md, sweep.png")
    return 0


def eval_auto(run_, config, out: Path, args) -> int:
    """`eval --m auto`: the policies that choose m per query, against every fixed m."""
    import jax

    from mqt_jax.evaluation.policies import evaluate_run_policies, policy_table

    results = evaluate_run_policies(run_, config, out)
    if jax.process_index() == 0:
        print(f"choosing m per query on {results['benchmark']} ({results['questions']} "
              f"questions); written to {out}/policies.md, .png; the policies: "
              f"{run_.path / 'policy.json'}, {run_.path / 'router.json'}\n" + policy_table(results))
    return 0


def cmd_gradcam(args) -> int:
    from mqt_jax.core.sharding import activate
    from mqt_jax.evaluation.gradcam import check_variant, draw, gradcam_maps

    pil = read_image(args.image)
    if not args.out.endswith(".png"):
        raise ValueError(f"--out {args.out}: a .png file")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # fails now if it cannot be made
    m_values = parse_m(args.m)
    model = open_model(args, m_values, check_variant)
    image, prompt = model.image(pil), model.prompt(args.prompt)
    answers = model.generate([pil] * len(m_values), [args.prompt] * len(m_values), m=m_values,
                             max_new_tokens=args.max_new_tokens, details=True)
    with activate(model.mesh):
        maps = gradcam_maps(model.config, model.params, prompt, image,
                            {a.m: a.tokens for a in answers}, model.tokenizer.eos_id)
    texts = {a.m: model.tokenizer.decode(a.tokens).strip() for a in answers}
    draw(image, maps, texts, args.out, title=args.prompt.splitlines()[0], reference=args.answer)
    for m in m_values:
        print(f"m={m}: {texts[m]}")
    print(f"wrote {args.out}")
    return 0


def cmd_serve(args) -> int:
    from mqt_jax.inference.engine import Engine
    from mqt_jax.serving.server import listen, serve

    if args.image_root and not Path(args.image_root).is_dir():
        raise FileNotFoundError(f"--image_root {args.image_root} is not a folder")
    with_flags(args, EngineConfig())  # bad values, before the model is read
    join_processes(args)
    import jax

    leader = jax.process_index() == 0  # takes the HTTP traffic; the others follow its steps
    sock = listen(args.host, args.port) if leader else None
    model = open_model(args, [args.default_m])
    engine_config = with_flags(args, EngineConfig())  # the run's gin bindings, then the flags
    if model.tokenizer is None:
        raise ValueError(f"{model.run.path}: the run's config names no tokenizer "
                         f"(EvalConfig.tokenizer_dir): nothing to read requests with")
    engine = Engine(model, engine_config)
    if not leader:
        return follow(engine)
    config = with_flags(args, ServeConfig())
    if not config.model_name:
        name = Path(args.ckpt or args.workdir).absolute().name
        config = dataclasses.replace(config, model_name=name)
    return serve(model, engine, config, sock)


def follow(engine) -> int:
    """A process other than 0 of a multi-process server: it takes the steps process 0
    broadcasts and exits when process 0 has drained (a SIGTERM here is left to process 0)."""
    import signal

    import jax

    signal.signal(signal.SIGTERM, lambda *_: print(
        f"process {jax.process_index()}: SIGTERM: process 0 decides "
        f"when the server stops", flush=True))
    engine.follow()
    return 0


def cmd_data_shapes(args) -> int:
    from mqt_jax.data.shapes import write_shapes

    out = write_shapes(args.out, **dataclasses.asdict(with_flags(args, ShapesConfig())))
    print(f"wrote shapes-VQA to {out}")
    return 0


def cmd_convert(args) -> int:
    from mqt_jax.config import MeshConfig
    from mqt_jax.core.sharding import make_mesh
    from mqt_jax.interop.convert import convert

    parse_gin([], args.gin_param)  # only MeshConfig bindings matter here
    params = convert(args.kind, args.src, args.out, vision=args.vision,
                     param_dtype=args.param_dtype, dtype=args.dtype, mesh=make_mesh(MeshConfig()),
                     allow_bin=not args.safetensors_only, resampler_heads=args.resampler_heads)
    init = f"--gin_param 'TrainConfig.init_from = \"{args.out}\"'"
    if len(params) == 3:  # the whole model
        print(f"wrote {args.out}: `mqt-jax generate/eval --workdir {args.out}` opens it; "
              f"training starts from it with {init}")
    else:
        part = next(iter(params))
        print(f"wrote {args.out} ({part} only): training starts from it with {init} "
              f"--gin_param 'TrainConfig.init_from_params = (\"{part}/.*\",)'")
    return 0


def cmd_export(args) -> int:
    from mqt_jax.interop.export import export_run

    if args.kind != "llama":
        raise ValueError(f"--kind {args.kind!r}: only 'llama' exports")
    out, run, step = export_run(args.ckpt or args.workdir, args.out, args.dtype,
                                args.gin_file or [], args.gin_param)
    print(f"wrote {out}: the LLM of {run} at step {step} as a Hugging Face LLaMA folder")
    return 0


def cmd_sweep(args) -> int:
    from mqt_jax.research import sweep

    if args.print_commands:
        spec, runs = sweep.load_sweep(args.sweep)
        todo = [r for r in runs if not sweep.is_complete(Path(args.workdir) / r.name)]
        for r in todo:
            print(sweep.launch_command(r, spec, Path(args.workdir), args.launcher))
        print(f"# {len(todo)} of {len(runs)} runs to launch; then collect with: mqt-jax sweep "
              f"--sweep {args.sweep} --workdir {args.workdir} --collect", file=sys.stderr)
        return 0
    if args.collect:
        sweep.collect(args.sweep, args.workdir)
        return 0
    sweep.run_all(args.sweep, args.workdir, args.only)
    return 0


def cmd_scaling_fit(args) -> int:
    from mqt_jax.research import scaling

    scaling.main(args.results, args.out, [b * 1e12 for b in args.budget_tflops], args.text_tokens)
    return 0


def positive_ints(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4] (argparse type)."""
    return [positive_int(part) for part in text.split(",")]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def add_flags(parser, config, note: str = "", aliases: dict = {}, required=()) -> None:  # noqa: B006
    """One flag per field of `config`'s dataclass declared with config.flag (its help is written
    there). `config` is an instance, whose values the help shows as defaults, or a class, whose
    defaults come from elsewhere (`note` says where); `with_flags` puts the flags given on top."""
    cls = config if isinstance(config, type) else type(config)
    group = parser.add_argument_group(cls.__name__, note or None)
    for field in dataclasses.fields(cls):
        if "flag" not in field.metadata:
            continue
        kind = field.type.split(" |")[0]
        extra = ({"action": argparse.BooleanOptionalAction} if kind == "bool"
                 else {"action": "append"} if kind == "tuple[str, ...]"
                 else {"type": positive_int} if field.metadata["positive"]
                 else {"type": {"int": int, "float": float, "str": str}[kind]})
        value = None if isinstance(config, type) else getattr(config, field.name)
        shown = "" if value in ("", None, ()) else f" (default {value})"
        group.add_argument(f"--{field.name}", *aliases.get(field.name, ()), dest=field.name,
                           default=None, required=field.name in required,
                           help=field.metadata["flag"] + shown, **extra)


def with_flags(args, config):
    """`config` with the flags of its dataclass that were given (see add_flags)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config)
             if "flag" in f.metadata and getattr(args, f.name, None) is not None}
    return dataclasses.replace(config, **given)


def add_multiprocess_args(p) -> None:
    multi = p.add_argument_group(
        "multi-process", "one process per host (TPU VM worker, SLURM task or local CPU process)")
    multi.add_argument("--distributed", action="store_true", help="join a multi-process run "
                       "described by the environment (TPU pod slice, SLURM, JAX_COORDINATOR_ADDRESS)")
    multi.add_argument("--coordinator_address", help="host:port of process 0 (explicit setup)")
    multi.add_argument("--num_processes", type=int)
    multi.add_argument("--process_id", type=int)


def join_processes(args) -> None:
    from mqt_jax.core.sharding import initialize_distributed

    initialize_distributed(args.distributed, args.coordinator_address, args.num_processes,
                           args.process_id)


def add_run_args(p, image_prompt: bool = False) -> None:
    """--workdir / --ckpt and gin overrides; with image_prompt, --image --prompt --m too."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workdir", default="workdir/tiny",
                       help="a training workdir, or a recipe's (its final stage); default workdir/tiny")
    where.add_argument("--ckpt", help="a run folder or its checkpoints/ folder")
    p.add_argument("--gin_file", action="append", help="extra gin files over the run's config.gin "
                   "(a recipe's run binds in its stage's scope: write e.g. stage2/MeshConfig.fsdp)")
    p.add_argument("--gin_param", action="append", default=[],
                   help="gin binding over the run's config, e.g. 'MeshConfig.fsdp = 1' (applies "
                   "in the run's stage scope too)")
    if image_prompt:
        p.add_argument("--image", required=True)
        p.add_argument("--prompt", required=True)
        p.add_argument("--m", required=True, help="visual tokens; a list such as 2,16,64 gives "
                       "one result per m")


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and flag (also read by tests/test_readme.py against the docs)."""
    parser = argparse.ArgumentParser(prog="mqt-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train_p = sub.add_parser("train", help="train (stage by stage) and evaluate at every m")
    train_p.add_argument("--gin_file", action="append", help="gin config (repeatable); "
                         "default configs/tiny_two_stage.gin")
    train_p.add_argument("--gin_param", action="append", default=[],
                         help="gin binding, e.g. 'TrainConfig.steps = 10' (repeatable)")
    train_p.add_argument("--workdir", default="workdir/tiny",
                         help="where checkpoints, config.gin, metrics.jsonl and eval/ go")
    add_multiprocess_args(train_p)
    train_p.set_defaults(func=cmd_train)
    aot_p = sub.add_parser("aot", help="compile the train step ahead of time for a TPU slice")
    aot_p.add_argument("--gin_file", action="append", help="default mqt_llava_7b_stage2.gin")
    aot_p.add_argument("--gin_param", action="append", default=[])
    aot_p.add_argument("--topology", required=True, help="e.g. v5p:4x4x4, v5e:16x16")
    aot_p.add_argument("--out", help="JSON report path (default aot_<topology>[_tune].json)")
    aot_p.add_argument("--tune", action="store_true", help="compile every --remat policy x "
                       "--rows_per_chip and name the fastest that fits (one compile each)")
    aot_p.add_argument("--remat", help="with --tune: comma-separated remat policies (default all)")
    aot_p.add_argument("--rows_per_chip", type=positive_ints, default=[1, 2, 4, 8],
                       help="with --tune: rows per data-parallel chip, comma-separated")
    aot_p.set_defaults(func=cmd_aot)
    gen_p = sub.add_parser("generate", help="answer a prompt about an image at one or more m")
    add_run_args(gen_p, image_prompt=True)
    add_flags(gen_p, GENERATE_SAMPLING)
    gen_p.set_defaults(func=cmd_generate)
    eval_p = sub.add_parser("eval", help="score a benchmark at several m: tables and a plot")
    add_run_args(eval_p)
    add_flags(eval_p, EvalConfig, "defaults: the run's EvalConfig", {"image_root": ("--images",)})
    eval_p.add_argument("--m", help="e.g. 2,4,8,16,36,64,144,256 (default: the run's EvalConfig); "
                        "auto: m chosen per query (escalate, router, oracle) against every fixed m")
    eval_p.add_argument("--out", help="default: <workdir>/eval; results go to OUT/<benchmark>/")
    add_multiprocess_args(eval_p)
    eval_p.set_defaults(func=cmd_eval)
    cam_p = sub.add_parser("gradcam", help="Grad-CAM of the visual tokens per m, as one picture")
    add_run_args(cam_p, image_prompt=True)
    cam_p.add_argument("--out", required=True, help="the picture (.png)")
    cam_p.add_argument("--max_new_tokens", type=positive_int, default=16)
    cam_p.add_argument("--answer", default="", help="the reference answer, shown beside the model's")
    cam_p.set_defaults(func=cmd_gradcam)
    serve_p = sub.add_parser("serve", help="an OpenAI-compatible server where each request "
                             "picks its m (continuous batching mixes m in one batch)")
    add_run_args(serve_p)
    serve_p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    serve_p.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    add_flags(serve_p, ServeConfig(), required=("default_m",))
    add_flags(serve_p, EngineConfig(), "defaults: EngineConfig's gin bindings, else these")
    add_multiprocess_args(serve_p)
    serve_p.set_defaults(func=cmd_serve)
    conv_p = sub.add_parser("convert", help="a Hugging Face checkpoint -> an orbax run folder")
    conv_p.add_argument("--kind", required=True, help="clip-vision, llama, or a whole model: the "
                        "checkpoint kind of a compressor (mqt-llava, llava-1.5, m3, ...); an "
                        "unknown kind is refused with the list")
    conv_p.add_argument("--src", required=True, help="Hugging Face folder (config.json, safetensors)")
    conv_p.add_argument("--out", required=True, help="output folder (must not exist)")
    conv_p.add_argument("--vision", help="llava-1.5 / mqt-llava / m3: the CLIP folder (mm_vision_tower) "
                        "when the checkpoint holds no vision tower")
    conv_p.add_argument("--param_dtype", default="float32", help="stored parameters' dtype")
    conv_p.add_argument("--dtype", help="compute dtype written to config.gin (default: param_dtype)")
    conv_p.add_argument("--resampler_heads", type=int, default=16, help="mqt-llava: the "
                        "resampler's attention heads (the released builder always uses 16)")
    conv_p.add_argument("--safetensors_only", action="store_true",
                        help="refuse PyTorch .bin files even when torch is installed")
    conv_p.add_argument("--gin_param", action="append", default=[],
                        help="e.g. 'MeshConfig.tensor = 1' (the mesh the weights are placed on)")
    conv_p.set_defaults(func=cmd_convert)
    exp_p = sub.add_parser("export", help="a run's LLM -> a Hugging Face LLaMA folder")
    add_run_args(exp_p)
    exp_p.add_argument("--kind", default="llama", help="what to export (llama)")
    exp_p.add_argument("--out", required=True, help="output folder (must not exist)")
    exp_p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                       help="default: the parameters' dtype")
    exp_p.set_defaults(func=cmd_export)
    sweep_p = sub.add_parser("sweep", help="train and evaluate a grid of gin bindings; one "
                             "table and plot of score against tokens and TFLOPs")
    sweep_p.add_argument("--sweep", required=True, help="a sweep gin file, e.g. "
                         "configs/sweeps/compressors_shapes.gin")
    sweep_p.add_argument("--workdir", required=True, help="runs go to WORKDIR/<run>/, results "
                         "to WORKDIR/results.{csv,md,png}")
    sweep_p.add_argument("--print_commands", action="store_true", help="print one launch command "
                         "per incomplete run instead of running them here")
    sweep_p.add_argument("--launcher", default="", help="with --print_commands: a launch script "
                         "prefix, e.g. 'launch/tpu_vm.sh --name N --zone Z --type v5p-8 --'")
    sweep_p.add_argument("--collect", action="store_true",
                         help="only collect the results of the runs complete so far")
    sweep_p.add_argument("--only", action="append", default=[], help="run only this run (repeatable)")
    sweep_p.set_defaults(func=cmd_sweep)
    fit_p = sub.add_parser("scaling-fit", help="fit err(N, V) = A N^-alpha V^-beta + D to a "
                           "sweep's results; the inference-optimal number of visual tokens")
    fit_p.add_argument("results", help="a results.csv with columns llm_params (or a run's "
                       "bindings giving them), tokens, score")
    fit_p.add_argument("--out", help="the PNG (default: next to RESULTS, scaling_fit.png)")
    fit_p.add_argument("--budget_tflops", type=float, action="append", default=[],
                       help="inference budget(s) for the optimal V (default: a range)")
    fit_p.add_argument("--text_tokens", type=int, default=50, help="Q, the text tokens per request")
    fit_p.set_defaults(func=cmd_scaling_fit)
    data_p = sub.add_parser("data", help="datasets").add_subparsers(dest="dataset", required=True)
    shapes_p = data_p.add_parser("shapes", help="generate the shapes-VQA dataset (LLaVA format)")
    shapes_p.add_argument("--out", required=True, help="output folder (must not exist)")
    add_flags(shapes_p, ShapesConfig())
    shapes_p.set_defaults(func=cmd_data_shapes)
    return parser


OUT_FOLDERS = ("eval", "convert", "export", "data")  # the commands whose --out is a folder


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for flag in ("workdir", "out"):
            value = getattr(args, flag, None)
            if value and Path(value).is_file() and (flag == "workdir" or args.command in OUT_FOLDERS):
                raise ValueError(f"--{flag} {value} is a file; it names a folder")
        return args.func(args)
    except (ValueError, OSError, SyntaxError) as e:  # a user's mistake: one line, no traceback
        print(f"mqt-jax {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2


def one_line(e: BaseException) -> str:
    """The message of a user error, less what gin appends ("In call to configurable ...") and
    with a gin syntax error's file and line."""
    if isinstance(e, SyntaxError):
        return f"syntax error in {e.filename or 'a binding'}, line {e.lineno}: {e.msg}"
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    text = str(e).split("\n  In call to configurable")[0].split("\n  In file ")[0]
    return " ".join(text.split("\n")).strip() or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
