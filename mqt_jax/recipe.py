"""What `mqt-jax train` runs: optional data generation, one or more training stages (gin
scopes, e.g. stage1 -> stage2), then evaluation of the final parameters at every m."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
from pathlib import Path

import gin
import jax

from mqt_jax import sharding
from mqt_jax.checkpoint import restore_params
from mqt_jax.clip_pretrain import CLIPConfig, train_clip
from mqt_jax.config import ModelConfig
from mqt_jax.data.pipeline import DataConfig
from mqt_jax.data.shapes import write_shapes
from mqt_jax.evaluate import EvalConfig, evaluate, m_values_for, sweep_tables, write_collection
from mqt_jax.m_sampler import MSampler
from mqt_jax.models import lora
from mqt_jax.models.vlm import abstract_params
from mqt_jax.train import train
from mqt_jax.trainer import TrainConfig, Trainer


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Recipe:
    # Gin scopes trained one after another, each in W/<stage>; bindings scoped to a stage
    # (`stage2/TrainConfig.steps = ...`) override the unscoped ones. Empty: one run in W.
    stages: tuple[str, ...] = ()
    # Generate shapes-VQA into this folder first when it does not exist (the default data).
    shapes_dir: str = ""
    # Stage 0, cached in this folder (a second run skips what is there): a mini-CLIP trained
    # on the first stage's image-caption pairs (its DataConfig), its vision side written as a
    # CLIPVisionModel folder (P/clip-vit) and converted into P/clip; and the LLM pretrained as
    # a language model in the gin scope `pretrain_llm` (a training run in P/llm). Empty: none.
    pretrained: str = ""


def scoped(stage: str):
    """The gin scope of a stage ("" : unscoped)."""
    return gin.config_scope(stage) if stage else contextlib.nullcontext()


def run(workdir: str) -> dict | None:
    """Train every stage (resuming, and skipping those already complete), then evaluate.
    Returns eval.json's content, or None without EvalConfig.questions."""
    recipe, workdir = Recipe(), Path(workdir)
    first = recipe.stages[0] if recipe.stages else ""
    with scoped(first):
        clip_config, clip_data = CLIPConfig(), DataConfig()
    check_stages(recipe)  # bad settings fail here, before any work
    with scoped(recipe.stages[-1] if recipe.stages else ""):
        eval_config = EvalConfig()
        m_values_for(eval_config, ModelConfig())
        check_data_paths(eval_config, recipe.shapes_dir,
                         ("questions", "answers", "image_root", "tokenizer_dir"))
    say = print if jax.process_index() == 0 else (lambda *_: None)
    if recipe.shapes_dir and not Path(recipe.shapes_dir).exists():
        if jax.process_count() > 1:
            raise FileNotFoundError(f"{recipe.shapes_dir} does not exist; in a multi-process run "
                                    f"generate it first (mqt-jax data shapes --out ...)")
        say(f"generating shapes-VQA into {recipe.shapes_dir}")
        write_shapes(recipe.shapes_dir)
    if recipe.pretrained:
        with scoped(first):
            vision = ModelConfig().vision
        pretrain(Path(recipe.pretrained), vision, clip_data, clip_config, say)
    final, scope = workdir, ""
    for stage in recipe.stages:
        with scoped(stage):
            say(f"== {stage}: {workdir / stage}")
            train(str(workdir / stage))
        final, scope = workdir / stage, stage
    if not recipe.stages:
        train(str(workdir))
    with scoped(scope):
        if not EvalConfig().questions:
            return None
        done = scored(final, workdir / "eval" / EvalConfig().benchmark)
    if done:
        say(f"complete: {workdir / 'eval' / done['benchmark'] / 'eval.json'} already scores "
            f"step {done['step']} of {final} (remove it to evaluate again, or run `mqt-jax eval`)")
        return done
    run_ = open_run(final, scope)
    say(f"== eval: {final} step {run_.step} on {run_.eval_config.questions}")
    return evaluate_run(run_, workdir / "eval")


def check_stages(recipe: Recipe) -> None:
    """Each stage's settings build its model, sampler and Trainer and name data that exist."""
    for stage in ((PRETRAIN_LLM,) if recipe.pretrained else ()) + (recipe.stages or ("",)):
        with scoped(stage):
            model_config = ModelConfig()
            model_config.check_m(MSampler().support(model_config.num_queries))
            Trainer(model_config, TrainConfig(), sharding.make_mesh(sharding.MeshConfig()),
                    MSampler())
            check_data_paths(DataConfig(), recipe.shapes_dir)


def scored(run: Path, out_dir: Path) -> dict | None:
    """out_dir's eval.json when it scores the latest checkpoint of `run` with the settings in
    effect now, else None."""

    try:
        done = json.loads((out_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    same = (done.get("run") == str(run.absolute()) and done.get("step") == latest_step(run)
            and done.get("eval_config") == json.loads(json.dumps(dataclasses.asdict(EvalConfig()))))
    return done if same else None


PRETRAIN_LLM = "pretrain_llm"  # the gin scope of stage 0's language-model pretraining


def pretrain(folder: Path, vision, data: DataConfig, clip_config: CLIPConfig, say=print) -> None:
    """Stage 0 into `folder`, each part skipped when already there (see Recipe.pretrained)."""
    from mqt_jax.convert import convert

    clip, tower = folder / "clip", folder / "clip-vit"
    if (clip / "checkpoints").is_dir():
        say(f"== stage 0: mini-CLIP: {clip} is there (cached)")
    else:
        if jax.process_count() > 1:
            raise FileNotFoundError(f"{clip} does not exist; stage 0 runs in a single process")
        if not (tower / "config.json").is_file():
            say(f"== stage 0: mini-CLIP on {data.data_path} -> {tower}")
            result, _ = train_clip(vision, data.data_path, data.image_root, data.tokenizer_dir,
                                   tower, clip_config)
            say(f"mini-CLIP: loss {result['loss']:.3f}, in-batch retrieval accuracy "
                f"{100 * result['retrieval_accuracy']:.1f}%")
        convert("clip-vision", tower, clip, progress=False)
    with scoped(PRETRAIN_LLM):
        # Complete: cached, whatever the compressor of this run (the run holds a whole model,
        # but later stages take its LLM alone).
        if latest_step(folder / "llm") >= TrainConfig().steps:
            say(f"== stage 0: language model: {folder / 'llm'} is there (cached)")
            return
        say(f"== stage 0: language model: {folder / 'llm'}")
        train(str(folder / "llm"))


def latest_step(run: Path) -> int:
    """The latest checkpoint step of the training run in `run` (0: none)."""
    from mqt_jax.checkpoint import Checkpointer

    if not (run / "checkpoints").is_dir():
        return 0
    ckpt = Checkpointer(run / "checkpoints")
    try:
        return ckpt.latest_step() or 0
    finally:
        ckpt.close()


def check_data_paths(config, generated: str = "",
                     names=("data_path", "image_root", "tokenizer_dir", "tfds_dir")) -> None:
    """Every path `config` names exists (or lies in the shapes-VQA folder the recipe is
    about to generate): found before training, not after it."""
    for name in names:
        value = getattr(config, name)
        if not value or "://" in value or Path(value).exists():
            continue
        inside = generated and Path(value).absolute().is_relative_to(Path(generated).absolute())
        if inside and not Path(generated).exists():
            continue
        raise FileNotFoundError(f"{type(config).__name__}.{name}={value!r} does not exist"
                                + (f" ({generated} was written by an older version: remove it "
                                   f"and it is generated again)" if inside else ""))


@dataclasses.dataclass
class TrainedRun:
    """A run's final parameters, placed on this host's mesh, with its settings."""

    path: Path
    step: int
    model_config: ModelConfig
    eval_config: EvalConfig
    mesh: jax.sharding.Mesh
    params: dict


def open_run(path: str | Path, scope: str | None = None, step: int | None = None) -> TrainedRun:
    """The run in `path`: a training workdir (holding checkpoints/ and config.gin) or a
    two-stage recipe's workdir (its final stage). Its settings come from the gin config in
    effect (the run's config.gin, see `run_config_file`), in the gin scope of its stage."""
    path = Path(path)
    if scope is None:
        path, scope = run_folder(path)
    with scoped(scope):
        model_config, mesh = ModelConfig(), sharding.make_mesh(sharding.MeshConfig())
        params, step = restore_params(path, abstract_params(model_config, mesh), step)
        model_config, params = lora.merged(model_config, params)  # LoRA folded into the LLM
        return TrainedRun(path, step, model_config, EvalConfig(), mesh, params)


def run_folder(path: Path) -> tuple[Path, str]:
    """(the folder of the run to open, its gin scope): path itself, or a recipe's final
    stage W/<stage> (Recipe.stages in the stages' config.gin)."""
    if (path / "checkpoints").is_dir() or path.name == "checkpoints":
        run = path.parent if path.name == "checkpoints" else path
        return run, run.name if run.name in Recipe().stages else ""
    stages = Recipe().stages
    if stages and (path / stages[-1] / "checkpoints").is_dir():
        return path / stages[-1], stages[-1]
    raise FileNotFoundError(f"{path} holds no run: no checkpoints/ in it"
                            + (f" nor in {path / stages[-1]}" if stages else ""))


def run_config_file(path: str | Path) -> Path:
    """The config.gin that a training run wrote: in path, its final stage, or next to the
    checkpoints folder."""
    path = Path(path)
    stages = sorted(path.glob("*/config.gin"), key=lambda p: p.stat().st_mtime)[::-1]  # newest first
    beside = [path.parent / "config.gin"] if path.name == "checkpoints" else []
    for candidate in [path / "config.gin", *beside, *stages]:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no config.gin in {path} or its stages: is it a training workdir?")


def evaluate_run(run_: TrainedRun, out_root: Path, config: EvalConfig | None = None) -> dict:
    """Evaluate into out_root/<benchmark>/ and refresh out_root's sweep table and plot
    (process 0 writes and prints)."""
    config = config or run_.eval_config
    about = {"run": str(run_.path.absolute()), "step": run_.step,
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "config": str(run_config_file(run_.path).absolute()), "eval_config": dataclasses.asdict(config)}
    with sharding.activate(run_.mesh):
        results = evaluate(run_.model_config, run_.params, config, run_.mesh,
                           out_root / config.benchmark, about)
    if jax.process_index() > 0:
        return results
    write_collection(out_root)
    print(f"{results['benchmark']} score (%) by m; written to {out_root / config.benchmark}\n"
          + sweep_tables(results)[1])
    return results
