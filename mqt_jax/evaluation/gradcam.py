"""Grad-CAM per m: where the m visual tokens looked in the image, weighted by how much that
mattered to the answer.

For each m, the model's own answer at m is scored (its log-likelihood given the prompt); the
query transformer's cross-attention weights A [heads, queries, patches] are taken as a
differentiable intermediate (layers.Attention's Grad-CAM hook) and the map is
relu(dlogp/dA * A) averaged over heads, over the m tokens the LLM saw (and over layers for
the qformer), one value per patch, then resized (bilinear) to the image's height x width.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mqt_jax import compressors
from mqt_jax.config import ModelConfig
from mqt_jax.core import splice
from mqt_jax.core.outputs import save_figure
from mqt_jax.data.preprocess import CLIP_MEAN, CLIP_STD
from mqt_jax.models.vlm import MODEL_INPUTS, VisionLanguageModel


def answer_example(prompt: splice.Example, answer_ids: list[int], eos_id: int) -> splice.Example:
    """The prompt followed by the answer and EOS, the loss on the answer."""
    tail = list(answer_ids) + [eos_id]
    return splice.Example(list(prompt.tokens) + tail, [splice.IGNORE] * len(prompt.tokens) + tail)


def check_variant(model_config: ModelConfig) -> None:
    if model_config.compressor.cross_attention_path is None:
        attending = [name for name, c in compressors.REGISTRY.items() if c.cross_attention_path]
        raise ValueError(f"Grad-CAM reads the query transformer's cross-attention over the patch "
                         f"grid ({' or '.join(attending)}); the {model_config.query.variant} "
                         f"compressor has none")


def cross_attention(tree: dict, model_config: ModelConfig):
    """The query transformer's cross-attention entry of a perturbations/intermediates tree."""
    entry = tree["query_transformer"]
    for key in model_config.compressor.cross_attention_path:
        entry = entry[key]
    return entry


@functools.partial(jax.jit, static_argnames=("model",))
def _patch_map(model: VisionLanguageModel, params, batch: dict):
    """[patches] Grad-CAM of the answer in `batch` (one row) at its m."""
    inputs = [batch[k] for k in MODEL_INPUTS]
    # Zero perturbations of every attention's weights (XLA drops this forward: only their
    # shapes are used); kept for the query transformer only, so only its attention is hooked.
    _, state = model.apply({"params": params}, *inputs, mutable=["perturbations"])
    hooked = {"query_transformer": state["perturbations"]["query_transformer"]}

    def log_likelihood(perturbations):
        logits, inter = model.apply({"params": params, "perturbations": perturbations}, *inputs,
                                    mutable=["intermediates"])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        picked = jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        return (picked * batch["loss_mask"]).sum(), inter["intermediates"]

    grads, inter = jax.grad(log_likelihood, has_aux=True)(hooked)
    grad, (weights,) = cross_attention(grads, model.config), cross_attention(inter, model.config)
    cam = jax.nn.relu(grad * weights)  # [(layers,) 1, heads, M, patches]
    cam = cam.reshape((-1,) + cam.shape[-3:]).mean(0)  # over layers (and the batch of 1)
    seen = jnp.arange(cam.shape[1]) < batch["m"][0, 0]  # the tokens the LLM saw
    return (cam * seen[None, :, None]).sum(1).mean(0) / batch["m"][0, 0]


def gradcam_maps(model_config: ModelConfig, params, prompt: splice.Example, image: np.ndarray,
                 answers: dict[int, list[int]], eos_id: int, bucket: int = 16) -> dict[int, np.ndarray]:
    """{m: [H, W] map} for each m's answer token ids; image [H, W, 3] preprocessed."""
    check_variant(model_config)
    model = VisionLanguageModel(model_config)
    grid = model_config.vision.grid_size
    out = {}
    for m, ids in answers.items():
        example = answer_example(prompt, ids, eos_id)
        m_rows = model_config.check_m([[m]])
        seq_len = -(-splice.true_length(example, [m]) // bucket) * bucket
        batch = splice.layout_rows([[example]], m_rows, model_config.num_queries, seq_len)
        batch.update(images=image[None, None].astype(np.float32), m=m_rows)
        cam = _patch_map(model, params, batch).reshape(grid, grid)
        out[m] = np.asarray(jax.image.resize(cam, image.shape[:2], "bilinear"))
    return out


def draw(image: np.ndarray, maps: dict[int, np.ndarray], answers: dict[int, str], path: str | Path,
         title: str = "", reference: str = "") -> None:
    """One row: the image (titled with the reference answer, when given), then per m the image
    under its [H, W] heat map, titled with the model's answer; every map on one colour scale
    (the largest value over all m is 1), with a colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixels = np.clip(image * np.array(CLIP_STD) + np.array(CLIP_MEAN), 0, 1)
    for m, cam in maps.items():
        if cam.shape != pixels.shape[:2]:
            raise ValueError(f"the m={m} map is {cam.shape}, the image {pixels.shape[:2]}")
    top = max(float(cam.max()) for cam in maps.values()) if maps else 0.0
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2.6 * (len(maps) + 1) + 0.6, 3.0), dpi=120,
                             layout="constrained")
    axes[0].imshow(pixels)
    axes[0].set_title(f"reference: {reference[:24]}" if reference else "image", fontsize=9)
    shown = None
    for ax, (m, cam) in zip(axes[1:], maps.items()):
        ax.imshow(pixels)
        shown = ax.imshow(cam / top if top > 0 else cam, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.set_title(f"m={m}: {answers[m][:28]}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    if shown is not None:
        fig.colorbar(shown, ax=list(axes[1:]), shrink=0.8, label="Grad-CAM (shared scale)")
    if title:
        fig.suptitle(title[:100], fontsize=9)
    save_figure(fig, Path(path))
