"""CLIP image preprocessing (numpy/PIL, runs in the grain workers).

As Hugging Face's CLIPImageProcessor: resize the shortest side to `size` (bicubic), center
crop `size` x `size`, scale to [0, 1], normalise with CLIP's mean and std. Mode "pad"
(LLaVA-1.5, the MQT recipe) first pads the image to a square with the mean colour.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from pathlib import PurePosixPath, PureWindowsPath

import numpy as np
from etils import epath
from PIL import Image

from mqt_jax.data.conversation import BadRecord

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODES = ("pad", "crop")
# Larger images are refused before their pixels are decoded (decompression bombs): 8192 x 8192.
MAX_PIXELS = 1 << 26


class BadImage(ValueError):
    """An image that cannot be used: unreadable, empty, undecodable or too large."""


def read_regular_file(path: str | os.PathLike) -> bytes:
    """A regular file's bytes; anything else is an OSError. Opened without blocking and
    checked before reading: a named pipe would wait for a writer forever, a device never ends."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def open_image(source: str | os.PathLike | bytes, max_pixels: int = MAX_PIXELS,
               name: str | None = None) -> Image.Image:
    """A decoded PIL image from a path or encoded bytes. The size is checked from the header
    before the pixels are decoded; every failure is a one-line BadImage naming the source
    (`name`, else the path, else "image bytes")."""
    name = name or ("image bytes" if isinstance(source, bytes) else str(source))
    try:
        data = source if isinstance(source, bytes) else read_regular_file(source)
    except OSError as e:
        raise BadImage(f"{name}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # a NUL byte in the path
        raise BadImage(f"{name}: not a usable path ({e})") from None
    if not data:
        raise BadImage(f"{name}: empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise BadImage(f"{name}: {image.width} x {image.height} pixels is over the "
                               f"limit of {max_pixels} pixels")
            image.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"{name}: over the limit of {max_pixels} pixels ({e})") from None
    except Image.UnidentifiedImageError:
        raise BadImage(f"{name}: not a decodable image (no image format recognised)") from None
    except Exception as e:  # noqa: BLE001  (PIL raises many types for a broken file)
        raise BadImage(f"{name}: not a decodable image ({type(e).__name__}: {e})") from None
    return image


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer images (16-bit PNGs open as "I;16" or "I") scaled to 8 bits;
    PIL's own convert("RGB") clips them, so nearly every pixel would be white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.asarray(image).astype(np.float64)
        return Image.fromarray(np.round(np.clip(pixels, 0, 65535) / 257.0).astype(np.uint8))
    if image.mode == "F":
        return Image.fromarray(np.round(np.clip(np.asarray(image), 0, 255)).astype(np.uint8))
    return image


def expand_to_square(image: Image.Image, fill=tuple(int(c * 255) for c in CLIP_MEAN)):
    """LLaVA's expand2square: center the image on a square canvas of the fill colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def clip_preprocess(image: Image.Image, size: int, mode: str = "pad") -> np.ndarray:
    """A PIL image -> float32 [size, size, 3], CLIP-normalised."""
    if mode not in MODES:
        raise ValueError(f"image mode {mode!r}: expected one of {MODES}")
    image = to_8bit(image).convert("RGB")
    if mode == "pad":
        image = expand_to_square(image)
    width, height = image.size
    new_w, new_h = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = np.asarray(image, np.float32) / 255.0
    return (pixels - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)


def confined(root: str, relative: str) -> epath.Path:
    """root / relative, refused (BadRecord "image_outside_root") when it would leave root: an
    absolute path, a `..` step, or (on local disks) a symbolic link pointing out of root."""
    if not relative or PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).drive \
            or ".." in PurePosixPath(relative.replace("\\", "/")).parts:
        raise BadRecord("image_outside_root", f"{relative!r} is not a path inside the image root "
                        f"{root or '.'}")
    path = epath.Path(root) / relative
    if "://" not in str(root):  # local: resolve symbolic links on both sides
        real_root = os.path.realpath(root or ".")
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            raise BadRecord("image_outside_root", f"{relative!r} leads out of the image root "
                            f"{root or '.'} (a symbolic link)")
    return path
