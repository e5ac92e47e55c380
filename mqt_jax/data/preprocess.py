"""CLIP image preprocessing (numpy/PIL, runs in the grain workers).

As Hugging Face's CLIPImageProcessor: resize the shortest side to `size` (bicubic), center
crop `size` x `size`, scale to [0, 1], normalise with CLIP's mean and std. Mode "pad"
(LLaVA-1.5, the MQT recipe) first pads the image to a square with the mean colour.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODES = ("pad", "crop")


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
    image = image.convert("RGB")
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
