"""What `mqt-jax train` runs: optional data generation, one or more training stages (gin
scopes, e.g. stage1 -> stage2), then evaluation of the final parameters at every m."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import gin
import jax

from mqt_jax import sharding
from mqt_jax.checkpoint import restore_params
from mqt_jax.config import ModelConfig
from mqt_jax.data.shapes import write_shapes
from mqt_jax.evaluate import EvalConfig, evaluate, m_values_for, markdown_table
from mqt_jax.m_sampler import MSampler
from mqt_jax.train import TrainConfig, Trainer, train


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Recipe:
    # Gin scopes trained one after another, each in W/<stage>; bindings scoped to a stage
    # (`stage2/TrainConfig.steps = ...`) override the unscoped ones. Empty: one run in W.
    stages: tuple[str, ...] = ()
    # Generate shapes-VQA into this folder first when it does not exist (the default data).
    shapes_dir: str = ""


def scoped(stage: str):
    """The gin scope of a stage ("" : unscoped)."""
    return gin.config_scope(stage) if stage else contextlib.nullcontext()


def run(workdir: str) -> dict | None:
    """Train every stage (resuming, and skipping those already complete), then evaluate.
    Returns eval.json's content, or None without EvalConfig.questions."""
    recipe, workdir = Recipe(), Path(workdir)
    for stage in recipe.stages or ("",):  # bad settings fail here, before any work
        with scoped(stage):
            MSampler()
            Trainer(ModelConfig(), TrainConfig(), sharding.make_mesh(sharding.MeshConfig()))
    with scoped(recipe.stages[-1] if recipe.stages else ""):
        m_values_for(EvalConfig(), ModelConfig().num_queries)
    say = print if jax.process_index() == 0 else (lambda *_: None)
    if recipe.shapes_dir and not Path(recipe.shapes_dir).exists():
        if jax.process_count() > 1:
            raise FileNotFoundError(f"{recipe.shapes_dir} does not exist; in a multi-process run "
                                    f"generate it first (mqt-jax data shapes --out ...)")
        say(f"generating shapes-VQA into {recipe.shapes_dir}")
        write_shapes(recipe.shapes_dir)
    final, scope = workdir, ""
    for stage in recipe.stages:
        with scoped(stage):
            say(f"== {stage}: {workdir / stage}")
            train(str(workdir / stage))
        final, scope = workdir / stage, stage
    if not recipe.stages:
        train(str(workdir))
    with scoped(scope):
        config = EvalConfig()
        if not config.questions:
            return None
        if jax.process_count() > 1:
            say("eval: skipped in a multi-process run (it runs on one host)")
            return None
        model_config = ModelConfig()
        mesh = sharding.make_mesh(sharding.MeshConfig())
        params, step = restore_params(final, Trainer(model_config, TrainConfig(), mesh).abstract_params())
    print(f"== eval: {final} step {step} on {config.questions}")
    with sharding.activate(mesh):
        results = evaluate(model_config, params, config, workdir / "eval")
    print(f"accuracy (%) by m, exact match; written to {workdir / 'eval'}\n" + markdown_table(results))
    return results
