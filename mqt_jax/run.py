"""One way to open a run: its folder (a training workdir, a recipe's final stage, a
checkpoints/ folder or a `mqt-jax convert` output), its config.gin, its latest step, its
parameters on this host's mesh and its tokenizer. Training, evaluation, the Python API and the
server all open runs through here; nothing of training is imported.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gin
import jax

from mqt_jax.config import EvalConfig, MeshConfig, ModelConfig, Recipe
from mqt_jax.core import sharding
from mqt_jax.core.checkpoint import Checkpointer, restore_params
from mqt_jax.core.gin_files import in_scope, parse_gin, scoped
from mqt_jax.data.tokenizer import Tokenizer, load_tokenizer
from mqt_jax.models import lora
from mqt_jax.models.vlm import abstract_params


def latest_step(run: Path) -> int:
    """The latest checkpoint step of the training run in `run` (0: none)."""
    if not (run / "checkpoints").is_dir():
        return 0
    ckpt = Checkpointer(run / "checkpoints")
    try:
        return ckpt.latest_step() or 0
    finally:
        ckpt.close()


@dataclasses.dataclass
class TrainedRun:
    """A run's final parameters, placed on this host's mesh, with its settings."""

    path: Path
    step: int
    model_config: ModelConfig
    eval_config: EvalConfig
    mesh: jax.sharding.Mesh
    params: dict

    def tokenizer(self) -> Tokenizer | None:
        """The run's tokenizer (EvalConfig.tokenizer_dir), or None when it names none (a
        converted checkpoint without one serves visual tokens only)."""
        folder = self.eval_config.tokenizer_dir
        return load_tokenizer(folder) if folder else None


def open_run(path: str | Path, scope: str | None = None, step: int | None = None) -> TrainedRun:
    """The run in `path`: a training workdir (holding checkpoints/ and config.gin) or a
    two-stage recipe's workdir (its final stage). Its settings come from the gin config in
    effect (the run's config.gin, see `run_config_file`), in the gin scope of its stage."""
    path = Path(path)
    if scope is None:
        path, scope = run_folder(path)
    with scoped(scope):
        model_config, mesh = ModelConfig(), sharding.make_mesh(MeshConfig())
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


def parse_run_config(path, gin_files: list[str] = (), gin_params: list[str] = ()) -> tuple[Path, str]:
    """The run in `path` (a workdir, a recipe's workdir or a checkpoints/ folder): its
    config.gin parsed with `gin_files` / `gin_params` on top; returns (the run's folder, its
    stage's gin scope). A recipe's config.gin binds everything in its stages' scopes, which
    outrank unscoped bindings, so each binding is also bound in the run's scope."""
    path = Path(path)
    parse_gin([str(run_config_file(path))] + list(gin_files), list(gin_params))
    path, scope = run_folder(path)
    if scope:
        with gin.unlock_config():  # parse_gin finalized it
            gin.parse_config([in_scope(b, scope) for b in gin_params])
    return path, scope


def load_run(path, step: int | None = None, gin_files=(), gin_params=(), check=None) -> TrainedRun:
    """The run in `path` with its own config.gin (`gin_files` / `gin_params` on top):
    `check(model_config)` runs before any parameter is read. step: default the latest."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    folder, scope = parse_run_config(path, list(gin_files), list(gin_params))
    if check:
        with scoped(scope):
            check(ModelConfig())
    return open_run(folder, scope, step)
