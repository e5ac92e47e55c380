"""Stage 0's mini-CLIP: the project's vision tower and a small text encoder trained
contrastively on image-caption pairs (CLIP's symmetric InfoNCE with a learned temperature).

MQT-LLaVA starts from a pretrained CLIP kept frozen throughout; none can be downloaded here,
so the default recipe makes its own. The vision side is written as a Hugging Face
CLIPVisionModel folder and imported the way a real CLIP tower is (`mqt-jax convert --kind
clip-vision`: the layers up to the penultimate one, as LLaVA selects).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from mqt_jax.config import CLIPConfig, LLMConfig, LoRAConfig, MeshConfig, VisionConfig
from mqt_jax.core import sharding
from mqt_jax.data.preprocess import clip_preprocess, open_image
from mqt_jax.data.tokenizer import load_tokenizer
from mqt_jax.models import layers
from mqt_jax.models.llama import Llama
from mqt_jax.models.vision_tower import VisionTower


def whole_tower(vision: VisionConfig) -> VisionConfig:
    """The tower CLIP trains: every layer (its loss is on the last one's class token)."""
    return dataclasses.replace(vision, select_layer=-1)


class MiniCLIP(nn.Module):
    vision: VisionConfig  # every layer built
    config: CLIPConfig
    vocab_size: int

    def setup(self):
        c = self.config
        self.vision_tower = VisionTower(self.vision, remat_policy="none")
        self.post_ln = layers.layer_norm(self.vision.layer_norm_eps, jnp.float32, jnp.float32)
        self.visual_projection = layers.dense(c.embed_dim, ("embed", None))
        head_dim = c.text_width // c.text_heads
        self.text_encoder = Llama(LLMConfig(
            vocab_size=self.vocab_size, hidden=c.text_width, num_layers=c.text_layers,
            num_heads=c.text_heads, num_kv_heads=c.text_heads, head_dim=head_dim,
            mlp_dim=4 * c.text_width, lora=LoRAConfig(rank=0)), remat_policy="none")
        self.text_projection = layers.dense(c.embed_dim, ("embed", None))
        # CLIP's learned temperature, initialised at 1 / 0.07 (its log) and capped at 100.
        self.log_scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)),
                                    ())

    def pooled(self, images):
        """CLIPVisionModel's pooler output: the last layer's class token, LayerNormed."""
        return self.post_ln(self.vision_tower(images, class_token=True)[:, 0])

    def encode_images(self, images):
        return normalise(self.visual_projection(self.pooled(images)))

    def encode_texts(self, token_ids, eos_index):
        """token_ids [N, T] (BOS, caption, EOS, padding 0), eos_index [N]."""
        t = token_ids.shape[1]
        positions = jnp.broadcast_to(jnp.arange(t), token_ids.shape)
        segments = (positions <= eos_index[:, None]).astype(jnp.int32)
        hidden = self.text_encoder.hidden_states(self.text_encoder.embed(token_ids), positions,
                                                 segments)
        pooled = jnp.take_along_axis(hidden, eos_index[:, None, None], axis=1)[:, 0]
        return normalise(self.text_projection(pooled))

    def __call__(self, images, token_ids, eos_index):
        """The symmetric InfoNCE loss and the batch's image -> text retrieval accuracy."""
        image, text = self.encode_images(images), self.encode_texts(token_ids, eos_index)
        scale = jnp.exp(jnp.minimum(self.log_scale, math.log(100.0)))
        logits = scale * image @ text.T
        labels = jnp.arange(logits.shape[0])
        loss = (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()) / 2
        return loss, (jnp.argmax(logits, 1) == labels).mean()


def normalise(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def image_caption_pairs(captions_file: Path, image_root: Path, image_size: int, tokenizer):
    """(images [N, S, S, 3] CLIP-normalised, token ids [N, T], EOS index [N]) of a LLaVA
    captions file (the first assistant turn of each record is its caption)."""
    records = json.loads(captions_file.read_text())
    images, texts = [], []
    for number, record in enumerate(tqdm(records, desc="clip data", unit="pair", leave=False)):
        try:
            path = (image_root / record["image"]).resolve()
            if not path.is_relative_to(image_root.resolve()):
                raise ValueError(f"image {record['image']!r} lies outside {image_root}")
            images.append(clip_preprocess(open_image(path), image_size))
            texts.append(next(t["value"] for t in record["conversations"] if t["from"] == "gpt"))
        except (KeyError, TypeError, StopIteration, OSError, ValueError) as e:  # BadImage too
            raise ValueError(f"{captions_file} record {number}: not an image-caption pair "
                             f"({type(e).__name__}: {e})") from None
    ids = [[tokenizer.bos_id, *tokenizer.encode(t)[0].tolist(), tokenizer.eos_id] for t in texts]
    tokens = np.zeros((len(ids), max(map(len, ids))), np.int32)
    for row, seq in zip(tokens, ids):
        row[:len(seq)] = seq
    return np.stack(images), tokens, np.array([len(s) - 1 for s in ids], np.int32)


def train_clip(vision: VisionConfig, captions_file: str | Path, image_root: str | Path,
               tokenizer_dir: str | Path, out: str | Path, config: CLIPConfig | None = None,
               mesh=None) -> tuple[dict, dict]:
    """Train the mini-CLIP and write its vision side to `out` (a CLIPVisionModel folder).
    Returns ({"first_loss", "loss", "retrieval_accuracy"}: the last tenth of the steps'
    means, accuracy within a batch; the parameters)."""
    from mqt_jax.interop.export import export_clip_vision

    config = config or CLIPConfig()
    mesh = mesh or sharding.make_mesh(MeshConfig())
    if config.batch_size % sharding.batch_divisor(mesh):
        raise ValueError(f"CLIPConfig.batch_size={config.batch_size} is not divisible by the "
                         f"mesh's {sharding.batch_divisor(mesh)} batch devices")
    tokenizer = load_tokenizer(tokenizer_dir)
    images, tokens, eos = image_caption_pairs(Path(captions_file), Path(image_root),
                                              vision.image_size, tokenizer)
    if len(images) < config.batch_size:
        raise ValueError(f"CLIPConfig.batch_size={config.batch_size} is more than the "
                         f"{len(images)} image-caption pairs in {captions_file}")
    tower = whole_tower(vision)
    model = MiniCLIP(tower, config, tokenizer.vocab_size)
    warmup = int(config.warmup_fraction * config.steps)
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup,
                                                  max(config.steps, warmup + 1))
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
    batch_sh = sharding.batch_sharding(mesh)

    def init(rng):
        return model.init(rng, images[:2], tokens[:2], eos[:2])["params"]

    def step(params, opt_state, batch):
        (loss, accuracy), grads = jax.value_and_grad(
            lambda p: model.apply({"params": p}, *batch), has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, accuracy

    with sharding.activate(mesh):
        rng = jax.random.key(config.seed)
        param_sh = sharding.logical_to_shardings(jax.eval_shape(init, rng), mesh)
        params = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=param_sh)(rng)
        opt_state = tx.init(params)
        step = jax.jit(step, donate_argnums=(0, 1))
        order, losses, accuracies = np.random.default_rng(config.seed), [], []
        with tqdm(range(config.steps), desc="stage 0: mini-CLIP", unit="step") as bar:
            for i in bar:
                pick = order.choice(len(images), config.batch_size, replace=False)
                batch = tuple(jax.device_put(x[pick], batch_sh) for x in (images, tokens, eos))
                params, opt_state, loss, accuracy = step(params, opt_state, batch)
                losses.append(loss)
                accuracies.append(accuracy)
                if (i + 1) % 20 == 0 or i + 1 == config.steps:
                    bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{float(accuracy):.2f}")
    tail = max(1, config.steps // 10)
    result = {"first_loss": float(losses[0]), "loss": float(np.mean(jax.device_get(losses[-tail:]))),
              "retrieval_accuracy": float(np.mean(jax.device_get(accuracies[-tail:])))}
    out = Path(out)
    export_clip_vision(tower, params, out)
    (out / "clip_pretrain.json").write_text(json.dumps(
        {"config": dataclasses.asdict(config), "captions": str(Path(captions_file).absolute()),
         **result}, indent=2))
    return result, params
