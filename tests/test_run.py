"""mqt_jax/run.py: finding a run's folder, its config.gin and stage scope, and the one-line
errors for folders that hold no run (end-to-end opening is in test_api.py and test_recipe.py)."""

import os
import time

import gin
import pytest

from mqt_jax.config import EvalConfig
from mqt_jax.core.gin_files import parse_gin
from mqt_jax.run import TrainedRun, latest_step, load_run, run_config_file, run_folder


@pytest.fixture
def recipe_dir(tmp_path):
    """A two-stage recipe's workdir as training leaves it (no checkpoint contents needed)."""
    for stage in ("stage1", "stage2"):
        (tmp_path / stage / "checkpoints").mkdir(parents=True)
        (tmp_path / stage / "config.gin").write_text('Recipe.stages = ("stage1", "stage2")\n')
        os.utime(tmp_path / stage / "config.gin", (time.time() - (stage == "stage1") * 60,) * 2)
    yield tmp_path
    gin.clear_config()


def test_a_recipes_workdir_opens_its_final_stage_in_its_scope(recipe_dir):
    assert run_config_file(recipe_dir) == recipe_dir / "stage2" / "config.gin"  # the newest
    parse_gin([str(run_config_file(recipe_dir))], [])
    assert run_folder(recipe_dir) == (recipe_dir / "stage2", "stage2")
    assert run_folder(recipe_dir / "stage1") == (recipe_dir / "stage1", "stage1")
    checkpoints = recipe_dir / "stage1" / "checkpoints"
    assert run_config_file(checkpoints) == recipe_dir / "stage1" / "config.gin"
    assert run_folder(checkpoints) == (recipe_dir / "stage1", "stage1")


def test_folders_without_a_run_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.gin in .*: is it a training workdir"):
        load_run(tmp_path)
    (tmp_path / "config.gin").write_text("")
    parse_gin([str(tmp_path / "config.gin")], [])
    with pytest.raises(FileNotFoundError, match="holds no run: no checkpoints/ in it"):
        run_folder(tmp_path)
    gin.clear_config()


def test_latest_step_of_a_folder_without_checkpoints_is_zero(tmp_path):
    assert latest_step(tmp_path) == 0


def test_a_run_without_a_tokenizer_has_none():
    run = TrainedRun(path=None, step=0, model_config=None, eval_config=EvalConfig(), mesh=None,
                     params={})
    assert run.tokenizer() is None
