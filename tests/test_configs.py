"""The shipped gin configs, built abstractly (jax.eval_shape): real sizes, no memory."""

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from mqt_jax import cli
from mqt_jax.config import MeshConfig, ModelConfig, MSampler, TrainConfig
from mqt_jax.core.sharding import make_mesh
from mqt_jax.training.trainer import Trainer

VISION = 290_909_184  # ViT-L/14-336, the 23 layers up to the selected one (test_vision_tower)
RESAMPLER = 8_923_136
POS_EMBED = 256 * 1024  # fixed sin-cos table of the resampler, never trained
LLAMA_2_7B = 6_738_415_616


def build(config_name):
    cli.parse_gin([config_name], [])
    model, train = ModelConfig(), TrainConfig()
    trainer = Trainer(model, train, make_mesh(MeshConfig()))
    abstract = jax.eval_shape(trainer._init_state, jax.random.key(0))
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    by_tower = {k[0]: 0 for k in flatten_dict({**abstract.trainable, **abstract.frozen})}
    for part in (abstract.trainable, abstract.frozen):
        for k, v in flatten_dict(part).items():
            by_tower[k[0]] += v.size
    return model, train, abstract, size, by_tower


@pytest.mark.parametrize("stage", [1, 2])
def test_7b_recipe_parameter_counts_and_trainable_parts(stage):
    model, train, abstract, size, by_tower = build(f"mqt_llava_7b_stage{stage}.gin")
    assert by_tower == {"vision_tower": VISION, "query_transformer": RESAMPLER, "llm": LLAMA_2_7B}
    assert model.dtype == "bfloat16" and model.remat_policy == "nothing_saveable"
    assert {x.dtype for x in jax.tree.leaves(abstract.trainable)} == {np.dtype("float32")}
    if stage == 1:
        assert size(abstract.trainable) == RESAMPLER - POS_EMBED
        assert (train.learning_rate, train.batch_size) == (1e-3, 256)
        assert MSampler().support(256).tolist() == [256]
    else:
        assert size(abstract.trainable) == RESAMPLER - POS_EMBED + LLAMA_2_7B
        assert (train.learning_rate, train.batch_size) == (2e-5, 128)
        assert MSampler().support(256).tolist() == list(range(2, 257, 2))
    # Frozen parameters carry no optimizer state: Adam's two moments cover trainable ones only.
    moments = sum(x.size for x in jax.tree.leaves(abstract.opt_state) if x.ndim)
    assert moments == 2 * size(abstract.trainable)


def test_tiny_config_is_a_few_million_parameters():
    _, _, abstract, size, by_tower = build("tiny.gin")
    total = size(abstract.trainable) + size(abstract.frozen)
    assert 1e6 < total < 1e7, by_tower


def test_unknown_gin_file_is_named():
    with pytest.raises(FileNotFoundError, match="gin file 'nope.gin' not found"):
        cli.parse_gin(["nope.gin"], [])


def test_7b_lora_trains_the_adapters_and_the_query_transformer_only():
    model, train, abstract, size, by_tower = build("mqt_llava_7b_lora.gin")
    lora = model.llm.lora
    assert (lora.rank, lora.alpha, lora.dropout) == (128, 256.0, 0.05)  # finetune_lora.sh
    hidden, mlp = 4096, 11008
    per_layer = lora.rank * (4 * (hidden + hidden) + 3 * (hidden + mlp))  # q k v o; gate up down
    adapters = 32 * per_layer
    assert by_tower == {"vision_tower": VISION, "query_transformer": RESAMPLER,
                        "llm": LLAMA_2_7B + adapters}
    assert size(abstract.trainable) == RESAMPLER - POS_EMBED + adapters  # 328.5M of 7.4B
    assert sum(x.size for x in jax.tree.leaves(abstract.opt_state) if x.ndim) == \
        2 * size(abstract.trainable)
    assert (train.learning_rate, train.batch_size) == (2e-4, 128)
