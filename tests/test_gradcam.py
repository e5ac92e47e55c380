"""Grad-CAM per m on the tiny model: the hook leaves the model unchanged, the maps have the
image's shape, are finite, non-negative, the patch grid's map upsampled, and depend on m;
compressors without cross-attention are refused; the picture is drawn."""

import jax
import numpy as np
import pytest
from helpers import init_params, tiny_config
from PIL import Image
from test_generate import prompt_batch, prompts

from mqt_jax.core import splice
from mqt_jax.evaluation.gradcam import _patch_map, answer_example, draw, gradcam_maps
from mqt_jax.models.vlm import MODEL_INPUTS, VisionLanguageModel


@pytest.mark.parametrize("variant", ["official", "qformer"])
def test_maps_have_the_image_shape_and_differ_between_m(variant):
    cfg = tiny_config(variant=variant, num_queries=16)
    model = VisionLanguageModel(cfg)
    (prompt,), images = prompts(cfg, [5])
    params = init_params(model, prompt_batch([prompt], images, 4, 16, 32), method="logits")
    answers = {2: [7, 9], 8: [7, 9], 16: [11]}
    maps = gradcam_maps(cfg, params, prompt, images[0], answers, eos_id=2)
    size, grid = cfg.vision.image_size, cfg.vision.grid_size
    for cam in maps.values():
        assert cam.shape == images[0].shape[:2] == (size, size)
        assert np.isfinite(cam).all() and (cam >= 0).all() and cam.max() > 0
    # The map is the patch grid's map upsampled bilinearly (PIL as the reference resize).
    example = answer_example(prompt, answers[8], eos_id=2)
    batch = splice.layout_rows([[example]], np.array([[8]]), 16, 32)
    batch.update(images=images[:1, None], m=np.array([[8]], np.int32))
    per_patch = np.asarray(_patch_map(model, params, batch)).reshape(grid, grid)
    upsampled = Image.fromarray(per_patch.astype(np.float32), mode="F").resize((size, size),
                                                                               Image.BILINEAR)
    np.testing.assert_allclose(maps[8], np.asarray(upsampled), rtol=1e-5, atol=1e-6 * per_patch.max())
    assert not np.allclose(maps[2], maps[8])  # same answer, different m: different maps
    assert not np.allclose(maps[8], maps[16])


def test_the_attention_hook_changes_no_output():
    cfg = tiny_config(num_queries=16)
    model = VisionLanguageModel(cfg)
    (prompt,), images = prompts(cfg, [5])
    example = answer_example(prompt, [7, 9], eos_id=2)
    batch = splice.layout_rows([[example]], np.array([[4]]), 16, 32)
    batch.update(images=images[:, None], m=np.array([[4]], np.int32))
    params = init_params(model, batch, method="logits")
    inputs = [batch[k] for k in MODEL_INPUTS]
    plain = jax.jit(model.apply)({"params": params}, *inputs)
    hooked, state = jax.jit(lambda p: model.apply({"params": p}, *inputs,
                                                  mutable=["perturbations", "intermediates"]))(params)
    np.testing.assert_allclose(np.asarray(hooked), np.asarray(plain), rtol=2e-5, atol=2e-5)
    weights, = state["intermediates"]["query_transformer"]["attn"]["weights"]
    assert weights.shape == (1, 4, 16, cfg.vision.num_patches)  # [B, heads, M, patches]
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-5)
    assert list(example.labels[-3:]) == [7, 9, 2] and set(example.labels[:-3]) == {splice.IGNORE}


@pytest.mark.parametrize("variant", ["mlp2x_gelu", "avgpool"])
def test_compressors_without_cross_attention_are_refused(variant):
    cfg = tiny_config(variant=variant, num_queries=16)
    with pytest.raises(ValueError, match=f"the {variant} compressor has none"):
        gradcam_maps(cfg, params={}, prompt=None, image=np.zeros((32, 32, 3)), answers={16: [7]},
                     eos_id=2)


def test_draw_writes_one_picture(tmp_path):
    image = np.random.default_rng(0).normal(size=(32, 32, 3)).astype(np.float32)
    maps = {2: np.eye(32), 8: np.ones((32, 32))}
    draw(image, maps, {2: "red", 8: "blue"}, tmp_path / "cam.png", title="What colour?",
         reference="blue")
    # 3 panels of 2.6 x 3 in and 0.6 in of colour bar at 120 dpi; a PDF beside it
    assert Image.open(tmp_path / "cam.png").size == (1008, 360)
    assert (tmp_path / "cam.pdf").read_bytes().startswith(b"%PDF")
    with pytest.raises(ValueError, match=r"the m=2 map is \(4, 4\), the image \(32, 32\)"):
        draw(image, {2: np.eye(4)}, {2: "red"}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_every_map_shares_one_colour_scale(tmp_path):
    """A map of half the other's strength looks half as strong (scaled alone, each map's own
    maximum would be 1 and the two panels identical)."""
    image = np.zeros((32, 32, 3), np.float32)
    draw(image, {1: np.full((32, 32), 0.5), 4: np.ones((32, 32))}, {1: "a", 4: "b"},
         tmp_path / "cam.png")
    pixels = np.asarray(Image.open(tmp_path / "cam.png").convert("RGB")).astype(int)
    width = pixels.shape[1]
    middle = lambda panel: pixels[180, int((panel + 0.5) * 2.6 * 120)]  # noqa: E731
    assert width == 1008 and np.abs(middle(1) - middle(2)).sum() > 60
