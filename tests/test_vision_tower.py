import jax
import numpy as np
import pytest
from helpers import init_params, tiny_config
from numpy_reference import clip_vit

from mqt_jax.config import VisionConfig
from mqt_jax.models.vision_tower import VisionTower


def vit_l_336_params(num_layers_built: int) -> int:
    """Hand count for ViT-L/14-336: patch conv (no bias), class + 577 positions, pre-LN,
    per layer 4 biased 1024x1024 projections, 2 LayerNorms and the 1024-4096-1024 MLP."""
    width, mlp = 1024, 4096
    embeddings = 3 * 14 * 14 * width + width + 577 * width + 2 * width
    per_layer = 4 * (width * width + width) + 2 * 2 * width + (width * mlp + mlp + mlp * width + width)
    return embeddings + num_layers_built * per_layer


@pytest.mark.parametrize("select_layer", [-2, -1, 0, 1])
def test_matches_numpy_reference(select_layer):
    cfg = tiny_config().vision
    cfg = VisionConfig(**{**cfg.__dict__, "select_layer": select_layer})
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    tower = VisionTower(cfg)
    params = init_params(tower, images, seed=1)
    out = jax.jit(tower.apply)({"params": params}, images)
    assert out.shape == (2, cfg.num_patches, cfg.width)
    ref = clip_vit(params, images, cfg)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_extra_layers_are_the_hidden_states_of_those_layers():
    cfg = VisionConfig(**{**tiny_config().vision.__dict__, "select_layer": -1})  # 3 layers
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    tower = VisionTower(cfg)
    params = init_params(tower, images, seed=1)
    out, extra = jax.jit(lambda p, x: tower.apply({"params": p}, x, (1, 0, -2)))(params, images)
    assert extra.shape == (2, 16, 3 * 32)
    for j, layer in enumerate((1, 0, 2)):  # hidden state -2 of 3 layers: layer 2's output
        want = clip_vit(params, images, VisionConfig(**{**cfg.__dict__, "select_layer": layer}))
        np.testing.assert_allclose(extra[..., 32 * j:32 * (j + 1)], want, rtol=1e-5, atol=1e-5,
                                   err_msg=f"layer {layer}")
    np.testing.assert_allclose(out, clip_vit(params, images, cfg), rtol=1e-5, atol=1e-5)


def test_vit_l_14_336_shapes_and_parameter_count():
    cfg = VisionConfig()  # defaults: ViT-L/14 at 336 px, select layer -2
    tower = VisionTower(cfg)
    images = jax.ShapeDtypeStruct((2, 336, 336, 3), np.float32)
    variables = jax.eval_shape(tower.init, jax.random.key(0), images)
    out = jax.eval_shape(tower.apply, variables, images)
    assert out.shape == (2, 576, 1024)
    count = sum(x.size for x in jax.tree.leaves(variables))
    # The 24th layer is never run for select_layer=-2, so it is not built.
    assert cfg.num_layers_built == 23
    assert count == vit_l_336_params(23) == 290_909_184
    # All 24 layers: Hugging Face's CLIPVisionModel count (303,507,456) less the unused
    # post-LayerNorm (2,048).
    assert vit_l_336_params(24) == 303_507_456 - 2048


def test_wrong_resolution_is_a_clear_error():
    cfg = tiny_config().vision
    with pytest.raises(ValueError, match=r"\[N, 32, 32, 3\]"):
        VisionTower(cfg).init(jax.random.key(0), np.zeros((1, 40, 40, 3), np.float32))


def test_select_layer_out_of_range():
    with pytest.raises(ValueError, match="select_layer=-30"):
        VisionConfig(select_layer=-30)
