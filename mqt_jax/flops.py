"""Analytical training FLOPs and the devices' peaks: model FLOPs utilisation (MFU).

Model FLOPs per step are 6 N T (forward 2 N T, backward 4 N T; PaLM's convention without the
attention term): N the LLM's parameters, T the tokens computed (batch x sequence length,
padding included, as the hardware computes it). The vision tower and query transformer are
left out: at 7B they are 4% of the parameters and run on 576 patches, not T tokens.
"""

from __future__ import annotations

import math

import jax

# Peak dense bf16 TFLOP/s per chip (public spec sheets), keyed as `chip_key` names them.
PEAK_TFLOPS = {"v4": 275, "v5e": 197, "v5p": 459, "v6e": 918,
               "a100": 312, "h100": 989, "h200": 989}
# device_kind substrings (lower case) -> PEAK_TFLOPS key; first match wins.
_KINDS = (("v5 lite", "v5e"), ("v5e", "v5e"), ("v6 lite", "v6e"), ("v6e", "v6e"),
          ("v5p", "v5p"), ("v5", "v5p"), ("v4", "v4"),
          ("h200", "h200"), ("h100", "h100"), ("a100", "a100"))


def chip_key(device_kind: str) -> str | None:
    kind = device_kind.lower()
    return next((key for pattern, key in _KINDS if pattern in kind), None)


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak FLOP/s of one device, or None where it is unknown (CPUs)."""
    device = device or jax.devices()[0]
    key = chip_key(device.device_kind) if device.platform != "cpu" else None
    return PEAK_TFLOPS[key] * 1e12 if key else None


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def train_flops(llm_parameters: int, tokens: int) -> float:
    """6 N T: the model FLOPs of a training step over `tokens` tokens."""
    return 6.0 * llm_parameters * tokens

