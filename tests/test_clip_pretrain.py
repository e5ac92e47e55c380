"""Stage 0's mini-CLIP (mqt_jax/training/clip_pretrain.py): it learns, its vision side exports as a
CLIPVisionModel folder that transformers reads to the same outputs, and `convert --kind
clip-vision` imports it like any CLIP tower."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from mqt_jax.config import CLIPConfig, MeshConfig, VisionConfig
from mqt_jax.core import sharding
from mqt_jax.data.shapes import write_shapes
from mqt_jax.data.tokenizer import load_tokenizer
from mqt_jax.interop import convert
from mqt_jax.models.vision_tower import VisionTower
from mqt_jax.training.clip_pretrain import MiniCLIP, train_clip, whole_tower

VISION = VisionConfig(image_size=32, patch_size=8, width=32, num_layers=3, num_heads=4, mlp_dim=64)
CONFIG = CLIPConfig(steps=100, batch_size=16, learning_rate=3e-3, embed_dim=16, text_width=32,
                    text_layers=1, text_heads=2)


def mesh():
    return sharding.make_mesh(MeshConfig(1, -1, 1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    shapes = write_shapes(root / "shapes", num_train=32, num_eval=1, num_val=0, image_size=32,
                          tfds=False)
    result, params = train_clip(VISION, shapes / "shapes_captions.json", shapes / "images",
                                shapes / "tokenizer", root / "clip-vit", CONFIG, mesh())
    return root, shapes, result, jax.device_get(params)


def test_the_contrastive_loss_falls_and_the_run_is_recorded(trained):
    root, _, result, _ = trained
    # 16 pairs: chance is log 16 = 2.77; 100 steps on 32 pairs must do far better
    assert result["first_loss"] == pytest.approx(np.log(16), abs=1.0)
    assert result["loss"] < 0.5 * result["first_loss"]
    record = json.loads((root / "clip-vit/clip_pretrain.json").read_text())
    assert record["config"]["steps"] == 100 and record["loss"] == result["loss"]


def test_export_then_convert_gives_back_the_tower_up_to_the_penultimate_layer(trained, tmp_path):
    root, _, _, params = trained
    hf_config = json.loads((root / "clip-vit/config.json").read_text())
    assert hf_config["model_type"] == "clip_vision_model" and hf_config["num_hidden_layers"] == 3
    converted = jax.device_get(convert.convert("clip-vision", root / "clip-vit", tmp_path / "clip",
                                               mesh=mesh(), progress=False))
    got, want = flatten_dict(converted["vision_tower"]), flatten_dict(params["vision_tower"])
    assert set(got) == set(want)
    for key, value in got.items():  # layers stacked on axis 0: the first two of three come back
        expected = want[key][:2] if key[0] == "layers" else want[key]
        np.testing.assert_array_equal(value, expected, err_msg="/".join(key))
    images = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
    with sharding.activate(mesh()):
        ours = VisionTower(VISION).apply({"params": converted["vision_tower"]}, jnp.asarray(images))
        whole = VisionTower(whole_tower(VISION)).apply({"params": params["vision_tower"]},
                                                       jnp.asarray(images), extra_layers=(2,))[1]
    np.testing.assert_allclose(ours, whole, rtol=1e-5, atol=1e-5)  # = layer 2's output


def test_transformers_reads_the_export_to_the_same_pooled_output(trained):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root, shapes, _, params = trained
    tower = transformers.CLIPVisionModel.from_pretrained(root / "clip-vit").eval()
    images = np.random.default_rng(1).normal(size=(8, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        out = tower(pixel_values=torch.tensor(images).permute(0, 3, 1, 2), output_hidden_states=True)
    model = MiniCLIP(whole_tower(VISION), CONFIG, load_tokenizer(shapes / "tokenizer").vocab_size)
    with sharding.activate(mesh()):
        pooled = model.apply({"params": params}, jnp.asarray(images), method="pooled")
    np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), rtol=1e-4, atol=1e-4)


def test_bad_settings_are_named(trained, tmp_path):
    _, shapes, _, _ = trained
    with pytest.raises(ValueError, match="CLIPConfig.steps=0"):
        CLIPConfig(steps=0)
    with pytest.raises(ValueError, match="text_heads=3"):
        CLIPConfig(text_width=32, text_heads=3)
    with pytest.raises(ValueError, match="batch_size=64 is more than the 32"):
        train_clip(VISION, shapes / "shapes_captions.json", shapes / "images", shapes / "tokenizer",
                   tmp_path / "out", CLIPConfig(batch_size=64), mesh())
    assert not (tmp_path / "out").exists()


def test_a_record_that_is_no_image_caption_pair_is_named(trained, tmp_path):
    _, shapes, _, _ = trained
    records = json.loads((shapes / "shapes_captions.json").read_text())
    for broken, why in (({**records[0], "image": "../../escape.png"}, "lies outside"),
                        ({"id": "x", "conversations": []}, "KeyError")):
        (tmp_path / "c.json").write_text(json.dumps([records[1], broken]))
        with pytest.raises(ValueError, match=rf"c.json record 1: not an image-caption pair .*{why}"):
            train_clip(VISION, tmp_path / "c.json", shapes / "images", shapes / "tokenizer",
                       tmp_path / "out", CONFIG, mesh())
    assert not (tmp_path / "out").exists()
