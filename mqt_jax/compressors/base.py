"""What every compressor is, and what the rest of the package may ask of one.

A compressor is a Flax module (patch features -> visual tokens at the LLM width) whose class
also describes it: whether m is elastic, its config checks, its FLOPs, its cross-attention
over the patches (Grad-CAM), its Hugging Face weight rules. config, flops, gradcam, convert,
splice and the inference code read these; none of them switches on a compressor's name.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from mqt_jax.config import COMPRESSORS as REGISTRY
from mqt_jax.config import compressor_named as get
from mqt_jax.core import flops

if TYPE_CHECKING:
    from mqt_jax.config import ModelConfig, QueryTransformerConfig


def register(name: str):
    """Class decorator: the compressor that `QueryTransformerConfig.variant = name` builds."""

    def add(cls):
        if name in REGISTRY:
            raise ValueError(f"compressor {name!r} is registered twice")
        cls.variant = name
        REGISTRY[name] = cls
        return cls

    return add


def check(model: "ModelConfig") -> None:
    """A ValueError naming what in `model` its compressor cannot run (run where a model is
    built: the config itself knows no compressor)."""
    compressor, q = get(model.query.variant), model.query
    if compressor.square_queries and math.isqrt(q.num_queries) ** 2 != q.num_queries:
        raise ValueError(f"QueryTransformerConfig.num_queries={q.num_queries}: the {q.variant} "
                         "variant needs a square number of queries (a square grid of tokens)")
    if compressor.vision_width and q.width != model.vision.width:
        raise ValueError(f"the {q.variant} query transformer attends at the vision width: "
                         f"QueryTransformerConfig.width={q.width} != "
                         f"VisionConfig.width={model.vision.width}")
    compressor.check(model)


class Compressor(nn.Module):
    """Patch features [N, patches, vision width] -> all M tokens [N, M, out_width]; which of
    them the LLM sees is decided by `mqt_jax.core.splice` from m."""

    config: "QueryTransformerConfig"
    out_width: int  # the LLM's width
    grid_size: int  # patch grid of the vision tower (24 for ViT-L/14 at 336 px)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "nothing_saveable"  # for the repeated layers (qformer)

    # ---- what the compressor is (class attributes; `register` sets the variant) ----
    variant: ClassVar[str] = ""
    # m <= M per example in one model (Matryoshka); False: the LLM always sees all M tokens.
    elastic: ClassVar[bool] = False
    # The number of queries must be a square (a square grid of tokens).
    square_queries: ClassVar[bool] = False
    # The compressor attends at the vision width (QueryTransformerConfig.width must equal it).
    vision_width: ClassVar[bool] = False
    # Its tokens read the question (the LLM's state at its end): they cannot be cached per image.
    reads_question: ClassVar[bool] = False
    # Where its cross-attention weights over the patch grid sit in the module's tree (Grad-CAM
    # hooks them); None: it has none.
    cross_attention_path: ClassVar[tuple[str, ...] | None] = None
    # `mqt-jax convert --kind K` builds this compressor from a Hugging Face LLaVA-layout folder.
    checkpoint_kind: ClassVar[str | None] = None

    @classmethod
    def check(cls, model: "ModelConfig") -> None:
        """Raise a ValueError naming what in `model` this compressor cannot run."""

    @classmethod
    def initialized(cls, params: dict, query: "QueryTransformerConfig") -> dict:
        """The model's freshly initialised parameters (boxed), adjusted where this
        compressor's initialisation ties one layer to another (default: as they are)."""
        return params

    @classmethod
    def nested(cls, query: "QueryTransformerConfig") -> bool:
        """Token i is the same at every m, so the tokens computed at M serve every m (a fixed
        token count is trivially so)."""
        return not cls.elastic

    @classmethod
    def valid_m(cls, model: "ModelConfig") -> tuple[int, ...] | None:
        """The m it serves when not every m in [1, M] (M3's scales); None: every one (an
        elastic compressor) or M alone (a fixed one)."""
        return None

    @classmethod
    def vision_layers(cls, query: "QueryTransformerConfig") -> tuple[int, ...]:
        """Extra vision hidden states it reads besides the selected layer (passed as `multi`)."""
        return ()

    @classmethod
    def llm_tokens(cls, model: "ModelConfig") -> int:
        """M: the visual tokens per image in the LLM's input."""
        return model.query.num_queries

    @classmethod
    def dropped(cls, model: "ModelConfig") -> tuple[int, int]:
        """(the LLM layer at which visual tokens leave, how many per image); (0, 0): none do."""
        return 0, 0

    @classmethod
    def carried_tokens(cls, model: "ModelConfig", m: int) -> int:
        """The visual tokens per image the LLM carries to its last layer at m."""
        return m

    @classmethod
    def flops(cls, model: "ModelConfig", m: int, text_tokens: int) -> dict:
        """The compressor's forward FLOPs on one image at m, by part (`flops.inference_flops`
        adds the towers)."""
        raise NotImplementedError(f"{cls.variant}: no FLOPs count")

    @classmethod
    def inference_flops(cls, model: "ModelConfig", m: int, text_tokens: int,
                        new_tokens: int = 0) -> dict:
        """One image at m plus `text_tokens` of prompt, then `new_tokens` decoded, by part."""
        return flops.with_towers(model, cls.flops(model, m, text_tokens), m + text_tokens,
                                 new_tokens)

    @classmethod
    def checkpoint(cls, folder, vision, hidden: int, source, **options):
        """(its QueryTransformerConfig fields, its weight rules) from the LLaVA-layout folder
        `folder` (an hf.CheckpointFolder; `source` names it in errors), given the vision
        tower's VisionConfig and the LLM's width."""
        raise ValueError(f"the {cls.variant} compressor is not converted from a checkpoint")
