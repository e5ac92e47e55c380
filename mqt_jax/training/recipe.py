"""What `mqt-jax train` runs: optional data generation, one or more training stages (gin
scopes, e.g. stage1 -> stage2), then evaluation of the final parameters at every m."""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

import jax

from mqt_jax.config import (CLIPConfig, DataConfig, EvalConfig, MSampler, MeshConfig, ModelConfig,
                            Recipe, ShapesConfig, TrainConfig)
from mqt_jax.core import sharding
from mqt_jax.core.gin_files import scoped
from mqt_jax.data.shapes import write_shapes
from mqt_jax.evaluation.evaluate import evaluate, m_values_for, sweep_tables, write_collection
from mqt_jax.run import TrainedRun, latest_step, open_run, run_config_file
from mqt_jax.training.clip_pretrain import train_clip
from mqt_jax.training.loop import train
from mqt_jax.training.trainer import Trainer


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
        write_shapes(recipe.shapes_dir, **dataclasses.asdict(ShapesConfig()))
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
            Trainer(model_config, TrainConfig(), sharding.make_mesh(MeshConfig()),
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
    from mqt_jax.interop.convert import convert

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
