import numpy as np
import pytest
from PIL import Image

from mqt_jax.data.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess

MEAN, STD = np.array(CLIP_MEAN), np.array(CLIP_STD)


def normalised(rgb):
    return (np.asarray(rgb) / 255.0 - MEAN) / STD


def test_pad_mode_centres_the_image_on_the_mean_colour():
    image = Image.new("RGB", (4, 2), (255, 0, 0))  # wide: padded above and below
    out = clip_preprocess(image, 4, "pad")
    assert out.shape == (4, 4, 3) and out.dtype == np.float32
    fill = normalised((122, 116, 104))  # LLaVA: int(mean * 255)
    np.testing.assert_allclose(out[0], np.tile(fill, (4, 1)), atol=1e-6)
    np.testing.assert_allclose(out[3], np.tile(fill, (4, 1)), atol=1e-6)
    np.testing.assert_allclose(out[1:3], np.tile(normalised((255, 0, 0)), (2, 4, 1)), atol=1e-6)


def test_crop_mode_takes_the_centre():
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[:, :, 0] = np.arange(6) * 40  # column k has red 40 k
    out = clip_preprocess(Image.fromarray(pixels), 4, "crop")  # shortest side already 4
    np.testing.assert_allclose(out[0, :, 0], normalised(np.stack(
        [np.arange(1, 5) * 40, np.zeros(4), np.zeros(4)], 1))[:, 0], atol=1e-6)  # columns 1..4


def test_shortest_side_is_resized_with_bicubic():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (20, 30, 3), np.uint8))
    out = clip_preprocess(image, 10, "crop")
    expected = np.asarray(image.resize((15, 10), Image.BICUBIC), np.float32)[:, 2:12] / 255.0
    np.testing.assert_allclose(out, (expected - MEAN) / STD, rtol=1e-5, atol=1e-5)


def test_grey_and_rgba_images_become_rgb_and_bad_mode_is_named():
    assert clip_preprocess(Image.new("L", (8, 8), 128), 8).shape == (8, 8, 3)
    assert clip_preprocess(Image.new("RGBA", (8, 8)), 8).shape == (8, 8, 3)
    with pytest.raises(ValueError, match="image mode 'stretch'"):
        clip_preprocess(Image.new("RGB", (8, 8)), 8, "stretch")


def test_16_bit_images_keep_their_levels(tmp_path):
    """A 16-bit PNG opens as "I;16" / "I"; PIL's own convert("RGB") would clip it to white."""
    from mqt_jax.data.preprocess import open_image

    levels = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0 .. 65535
    Image.fromarray(levels).save(tmp_path / "deep.png")
    image = open_image(tmp_path / "deep.png")
    assert image.mode.startswith("I")
    out = clip_preprocess(image, 4, "crop")
    want = np.round(levels / 257.0)  # the same levels in 8 bits
    np.testing.assert_allclose(out[..., 0], (want / 255.0 - MEAN[0]) / STD[0], atol=1e-5)


@pytest.mark.parametrize("content,message", [
    (b"", r"x.png: empty \(0 bytes\)"),
    (b"GIF89a nonsense", "x.png: not a decodable image"),
])
def test_bad_image_bytes_are_one_line_errors(tmp_path, content, message):
    from mqt_jax.data.preprocess import BadImage, open_image

    (tmp_path / "x.png").write_bytes(content)
    with pytest.raises(BadImage, match=message):
        open_image(tmp_path / "x.png")


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    from mqt_jax.data.preprocess import BadImage, open_image

    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")  # 400 M pixels, a small file
    assert (tmp_path / "bomb.png").stat().st_size < 1 << 20
    with pytest.raises(BadImage, match="bomb.png: over the limit of 67108864 pixels"):
        open_image(tmp_path / "bomb.png")
    Image.new("1", (9000, 8000)).save(tmp_path / "large.png")  # under PIL's own limits
    with pytest.raises(BadImage, match="9000 x 8000 pixels is over the limit"):
        open_image(tmp_path / "large.png")
