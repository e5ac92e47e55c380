"""What `mqt-jax train` runs: optional data generation, one or more training stages (gin
scopes, e.g. stage1 -> stage2), then evaluation of the final parameters at every m."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax

from mqt_jax.config import (
    EvalConfig,
    Recipe,
    ShapesConfig,
    StageConfig,
)
from mqt_jax.core import sharding
from mqt_jax.data.shapes import write_shapes
from mqt_jax.evaluation.evaluate import evaluate_run, m_values_for
from mqt_jax.run import latest_step, open_run
from mqt_jax.training.clip_pretrain import train_clip
from mqt_jax.training.loop import PATH_BINDINGS, train
from mqt_jax.training.trainer import Trainer


def run(workdir: str) -> dict | None:
    """Train every stage (resuming, and skipping those already complete), then evaluate.
    Returns eval.json's content, or None without EvalConfig.questions. Every stage's settings
    are read from gin once, here, and passed down."""
    recipe, workdir = Recipe(), Path(workdir)
    stages = {name: StageConfig.read(name) for name in recipe.stages or ("",)}
    llm = StageConfig.read(PRETRAIN_LLM) if recipe.pretrained else None
    first, (last_name, last) = next(iter(stages.values())), list(stages.items())[-1]
    check_stages(recipe, stages, llm)  # bad settings fail here, before any work
    m_values_for(last.evaluation, last.model)
    check_data_paths(last.evaluation, recipe.shapes_dir,
                     ("questions", "answers", "image_root", "tokenizer_dir"))
    say = print if jax.process_index() == 0 else (lambda *_: None)
    if recipe.shapes_dir and not Path(recipe.shapes_dir).exists():
        if jax.process_count() > 1:
            raise FileNotFoundError(f"{recipe.shapes_dir} does not exist; in a multi-process run "
                                    f"generate it first (mqt-jax data shapes --out ...)")
        say(f"generating shapes-VQA into {recipe.shapes_dir}")
        write_shapes(recipe.shapes_dir, **dataclasses.asdict(ShapesConfig()))
    if recipe.pretrained:
        pretrain(Path(recipe.pretrained), first, llm, say)
    for name, settings in stages.items():
        if name:
            say(f"== {name}: {workdir / name}")
        train(str(workdir / name), settings)
    final = workdir / last_name
    if not last.evaluation.questions:
        return None
    done = scored(final, workdir / "eval" / last.evaluation.benchmark, last.evaluation)
    if done:
        say(f"complete: {workdir / 'eval' / done['benchmark'] / 'eval.json'} already scores "
            f"step {done['step']} of {final} (remove it to evaluate again, or run `mqt-jax eval`)")
        return done
    run_ = open_run(final, last_name)
    say(f"== eval: {final} step {run_.step} on {run_.eval_config.questions}")
    return evaluate_run(run_, workdir / "eval")


def check_stages(recipe: Recipe, stages: dict[str, StageConfig] | None = None,
                 llm: StageConfig | None = None) -> None:
    """Each stage's settings build its model, sampler and Trainer and name data that exist
    (read from gin when not given)."""
    stages = stages or {name: StageConfig.read(name) for name in recipe.stages or ("",)}
    if recipe.pretrained:
        stages = {PRETRAIN_LLM: llm or StageConfig.read(PRETRAIN_LLM), **stages}
    for settings in stages.values():
        settings.model.check_m(settings.sampler.support(settings.model.num_queries))
        Trainer(settings.model, settings.train, sharding.make_mesh(settings.mesh), settings.sampler)
        check_data_paths(settings.data, recipe.shapes_dir)


def scored(run: Path, out_dir: Path, config: EvalConfig) -> dict | None:
    """out_dir's eval.json when it scores the latest checkpoint of `run` with `config`, else
    None."""
    try:
        done = json.loads((out_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    same = (done.get("run") == str(run.absolute()) and done.get("step") == latest_step(run)
            and absolute(done.get("eval_config")) == absolute(dataclasses.asdict(config)))
    return done if same else None


def absolute(eval_config) -> dict | None:
    """An EvalConfig as JSON, its paths absolute (`mqt-jax eval` reads them so from the run's
    config.gin, `train` as the gin files give them)."""
    if not isinstance(eval_config, dict):
        return None
    paths = {b.split(".")[1] for b in PATH_BINDINGS if b.startswith("EvalConfig.")}
    return json.loads(json.dumps({k: os.path.abspath(v) if k in paths and isinstance(v, str) and v
                                  and "://" not in v else v for k, v in eval_config.items()}))


PRETRAIN_LLM = "pretrain_llm"  # the gin scope of stage 0's language-model pretraining


def pretrain(folder: Path, first: StageConfig, llm: StageConfig, say=print) -> None:
    """Stage 0 into `folder`, each part skipped when already there (see Recipe.pretrained):
    the mini-CLIP on the first stage's data with its vision tower, then the language model
    with the `pretrain_llm` scope's settings."""
    from mqt_jax.interop.convert import convert

    clip, tower, data = folder / "clip", folder / "clip-vit", first.data
    if (clip / "checkpoints").is_dir():
        say(f"== stage 0: mini-CLIP: {clip} is there (cached)")
    else:
        if jax.process_count() > 1:
            raise FileNotFoundError(f"{clip} does not exist; stage 0 runs in a single process")
        if not (tower / "config.json").is_file():
            say(f"== stage 0: mini-CLIP on {data.data_path} -> {tower}")
            result, _ = train_clip(first.model.vision, data.data_path, data.image_root,
                                   data.tokenizer_dir, tower, first.clip)
            say(f"mini-CLIP: loss {result['loss']:.3f}, in-batch retrieval accuracy "
                f"{100 * result['retrieval_accuracy']:.1f}%")
        convert("clip-vision", tower, clip, progress=False)
    # Complete: cached, whatever the compressor of this run (the run holds a whole model, but
    # later stages take its LLM alone).
    if latest_step(folder / "llm") >= llm.train.steps:
        say(f"== stage 0: language model: {folder / 'llm'} is there (cached)")
        return
    say(f"== stage 0: language model: {folder / 'llm'}")
    train(str(folder / "llm"), llm)


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


