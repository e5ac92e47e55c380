"""Nested-prefix logic, all of it: how m decides which visual tokens the LLM sees.

The query transformer always produces all M tokens per image; m never becomes a shape.
- On the host, `layout_rows` turns token sequences (with `<image>` placeholders) and m into
  per-position index arrays: each position of a row is either a text token or the visual
  token (image i of the row, query q < m_i). Positions restart per example and the text after
  an image continues right after its m visual tokens, exactly as if only m existed.
- On the device, `splice` gathers the LLM input from those arrays, and `query_mask` gives
  the qformer's query self-attention its per-image m.
A different m changes array values only, so one compiled graph serves every m.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mqt_jax.config import check_m

IMAGE_TOKEN = -200  # LLaVA's placeholder id for `<image>`; never a real vocabulary entry
IGNORE = -100  # label of positions without loss (LLaVA's IGNORE_INDEX)

BATCH_KEYS = (
    "images", "m", "token_ids", "visual_index", "positions", "segment_ids", "question_end",
    "targets", "loss_mask",
)


def batch_shapes(rows: int, seq_len: int, images_per_row: int, image_size: int) -> dict:
    """{key: (shape, dtype)} of each of BATCH_KEYS in a batch of `rows` rows."""
    per_image, per_token = ((rows, images_per_row), np.int32), ((rows, seq_len), np.int32)
    return {"images": ((rows, images_per_row, image_size, image_size, 3), np.float32),
            "m": per_image, "question_end": per_image, "token_ids": per_token,
            "visual_index": per_token, "positions": per_token, "segment_ids": per_token,
            "targets": per_token, "loss_mask": ((rows, seq_len), np.float32)}


def placeholder_batch(rows: int, seq_len: int, images_per_row: int, image_size: int) -> dict:
    """A batch of the right shapes holding no image token (m = 1, nothing spliced): what
    an init or an abstract trace needs, since parameter shapes do not depend on values."""
    fill = {"m": 1, "visual_index": -1}
    return {k: np.full(shape, fill.get(k, 0), dtype)
            for k, (shape, dtype) in batch_shapes(rows, seq_len, images_per_row, image_size).items()}


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenised conversation. `tokens` holds IMAGE_TOKEN where an image goes; `labels`
    (same length) holds the token id where the model is trained to produce it, else IGNORE."""

    tokens: Sequence[int]
    labels: Sequence[int]

    def __post_init__(self):
        if len(self.tokens) != len(self.labels):
            raise ValueError(
                f"Example has {len(self.tokens)} tokens but {len(self.labels)} labels"
            )

    @property
    def num_images(self) -> int:
        return int(np.sum(np.asarray(self.tokens) == IMAGE_TOKEN))


def expand_example(example: Example, m: Sequence[int], num_queries: int):
    """One example at its m: (token_ids, visual_index, labels), each of true length.

    Image k of the example (its k-th placeholder) uses slot k of `m` and visual indices
    k * M + q for q < m[k].
    """
    tokens = np.asarray(example.tokens, np.int64)
    labels = np.asarray(example.labels, np.int64)
    image_at = np.flatnonzero(tokens == IMAGE_TOKEN)
    if len(image_at) > len(m):
        raise ValueError(
            f"a token sequence holds {len(image_at)} <image> placeholders but only "
            f"{len(m)} image(s) are given for it"
        )
    pieces_tok, pieces_vis, pieces_lab = [], [], []
    start = 0
    for k, at in enumerate(image_at):
        mk = int(m[k])
        pieces_tok += [tokens[start:at], np.zeros(mk, np.int64)]
        pieces_vis += [np.full(at - start, -1), k * num_queries + np.arange(mk)]
        pieces_lab += [labels[start:at], np.full(mk, IGNORE)]
        start = at + 1
    pieces_tok.append(tokens[start:])
    pieces_vis.append(np.full(len(tokens) - start, -1))
    pieces_lab.append(labels[start:])
    return tuple(np.concatenate(p).astype(np.int32) for p in (pieces_tok, pieces_vis, pieces_lab))


def tokens_reusable(model_config) -> bool:
    """Whether an image's visual tokens, computed once at M, serve every m and every prompt:
    token i is the same at every m (the official resampler, the causal qformer, and the
    compressors without an m) and does not read the question (QueCC does)."""
    compressor = model_config.compressor
    return not compressor.reads_question and compressor.nested(model_config.query)


def raised_rows(examples: Sequence[Example], m_from, m_to, num_queries: int, seq_len: int):
    """What raising m adds to prompts of one image each whose prefill at m_from is cached:
    (chunk, start). The prefix [text before the image, first m_from visual tokens] is the same
    at every m, so it stays; the chunk is the rest of the layout at m_to (visual tokens m_from
    .. m_to - 1, then the text after the image), right-padded to seq_len, at its positions in
    the whole prompt. start [B]: the prefix's length, where the chunk goes in the cache.
    chunk: token_ids, visual_index, positions, segment_ids [B, seq_len]."""
    m_from = check_m(np.broadcast_to(m_from, (len(examples),)), num_queries)
    m_to = check_m(np.broadcast_to(m_to, (len(examples),)), num_queries)
    if np.any(m_to <= m_from):
        raise ValueError(f"raising m needs m_to > m_from, got {m_from.tolist()} -> {m_to.tolist()}")
    if any(e.num_images != 1 for e in examples):
        raise ValueError("raising m keeps a prompt's prefix up to its image: one image per prompt")
    start = np.array([list(e.tokens).index(IMAGE_TOKEN) + int(k) for e, k in zip(examples, m_from)],
                     np.int32)
    lengths = np.array([true_length(e, [k]) for e, k in zip(examples, m_to)])
    if (lengths - start).max() > seq_len:
        raise ValueError(f"a raised chunk of {(lengths - start).max()} tokens does not fit "
                         f"seq_len={seq_len}")
    full = layout_rows([[e] for e in examples], m_to[:, None], num_queries, max(lengths))
    keys = ("token_ids", "visual_index", "positions", "segment_ids")
    chunk = {k: np.zeros((len(examples), seq_len), np.int32) for k in keys}
    chunk["visual_index"][:] = -1
    for b, (begin, end) in enumerate(zip(start, lengths)):
        for k in keys:
            chunk[k][b, : end - begin] = full[k][b, begin:end]
    return chunk, start


def true_length(example: Example, m: Sequence[int]) -> int:
    """Length of the example in the LLM sequence at its m (what packing must fit)."""
    return len(example.tokens) - example.num_images + int(np.sum(m[: example.num_images]))


def layout_rows(
    rows: Sequence[Sequence[Example]], m: np.ndarray, num_queries: int, seq_len: int
) -> dict[str, np.ndarray]:
    """Per-position arrays for a batch of rows, each row one or more packed examples.

    m: [B, I] per-image token counts; a row's examples consume its I image slots in order.
    Returns token_ids, visual_index (-1 = text, else image_slot * M + q), positions,
    segment_ids (0 = padding, k = k-th example of the row), targets (the next token) and
    loss_mask, each [B, seq_len]; and question_end [B, I]: per image slot, the position of
    the last token before the first answer token after the image (the end of its question;
    a prompt's last token when nothing after it is labelled), 0 for unused slots (QueCC's
    text guidance). Examples longer than the room left are truncated.
    """
    m = check_m(m, num_queries)
    if m.ndim != 2 or m.shape[0] != len(rows):
        raise ValueError(f"m has shape {m.shape}; expected [{len(rows)} rows, images per row]")
    out = {
        "token_ids": np.zeros((len(rows), seq_len), np.int32),
        "visual_index": np.full((len(rows), seq_len), -1, np.int32),
        "positions": np.zeros((len(rows), seq_len), np.int32),
        "segment_ids": np.zeros((len(rows), seq_len), np.int32),
        "targets": np.zeros((len(rows), seq_len), np.int32),
        "loss_mask": np.zeros((len(rows), seq_len), np.float32),
        "question_end": np.zeros(m.shape, np.int32),
    }
    for b, row in enumerate(rows):
        cursor, slot = 0, 0
        for seg, example in enumerate(row, start=1):
            n_img = example.num_images
            if slot + n_img > m.shape[1]:
                raise ValueError(
                    f"row {b}: its examples hold {slot + n_img} <image> placeholders but the "
                    f"batch has {m.shape[1]} image slot(s) per row"
                )
            tok, vis, lab = expand_example(example, m[b, slot : slot + n_img], num_queries)
            vis = np.where(vis >= 0, vis + slot * num_queries, -1)
            n = min(len(tok), seq_len - cursor)
            span = slice(cursor, cursor + n)
            out["token_ids"][b, span] = tok[:n]
            out["visual_index"][b, span] = vis[:n]
            out["positions"][b, span] = np.arange(n)
            out["segment_ids"][b, span] = seg
            # Position t predicts the token at t + 1 of the same example.
            nxt = np.append(lab[1:n], IGNORE)
            out["targets"][b, span] = np.maximum(nxt, 0)
            out["loss_mask"][b, span] = nxt != IGNORE
            for k in range(n_img):
                after = np.flatnonzero(vis // num_queries == slot + k).max() + 1
                answer = np.flatnonzero(lab[after:] != IGNORE)
                end = after + answer[0] - 1 if answer.size else len(tok) - 1
                out["question_end"][b, slot + k] = cursor + min(end, n - 1)
            cursor, slot = cursor + n, slot + n_img
            if cursor == seq_len:
                break
    return out


def validate_batch(batch: dict, num_queries: int, image_size: int, dropped_per_image: int = 0) -> None:
    """Host-side checks of a batch, before anything is compiled or sent to devices.
    dropped_per_image: see `check_survivors`."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}; a batch holds {list(BATCH_KEYS)}")
    images, m = batch["images"], np.asarray(batch["m"])
    if images.ndim != 5 or images.shape[2:] != (image_size, image_size, 3):
        raise ValueError(
            f"images of shape {tuple(images.shape)}: expected "
            f"[batch, images_per_row, {image_size}, {image_size}, 3]"
        )
    if m.shape != images.shape[:2]:
        raise ValueError(f"m has shape {m.shape}; expected one value per image {images.shape[:2]}")
    check_m(m, num_queries)
    vis = np.asarray(batch["visual_index"])
    rows, cols = np.nonzero(vis >= 0)
    slot, q = np.divmod(vis[rows, cols], num_queries)
    if np.any(slot >= m.shape[1]) or np.any(q >= m[rows, np.minimum(slot, m.shape[1] - 1)]):
        raise ValueError("visual_index points past an image's m: the batch was not laid out "
                         "with its own m (use splice.layout_rows)")
    if dropped_per_image:
        check_survivors(batch, num_queries, dropped_per_image)


def dropped_positions(visual_index, num_queries: int, dropped_per_image: int):
    """[B, T] bool: the visual tokens that leave the LLM mid-way (Victor: each image's first
    `dropped_per_image` tokens, its patches; the registers after them stay). numpy or jax."""
    return (visual_index >= 0) & (visual_index % num_queries < dropped_per_image)


def kept_length(seq_len: int, images_per_row: int, dropped_per_image: int) -> int:
    """The static length of the sequence after the drop: room for every row that holds
    `images_per_row` images."""
    return seq_len - images_per_row * dropped_per_image


def check_survivors(batch: dict, num_queries: int, dropped_per_image: int) -> None:
    """Every row's survivors of the drop fit the compacted length (a row with fewer images
    than the batch's image slots may not: it holds more text)."""
    vis, seg = np.asarray(batch["visual_index"]), np.asarray(batch["segment_ids"])
    survivors = ((seg > 0) & ~dropped_positions(vis, num_queries, dropped_per_image)).sum(1)
    room = kept_length(seg.shape[1], np.asarray(batch["m"]).shape[1], dropped_per_image)
    over = np.flatnonzero(survivors > room)
    if over.size:
        raise ValueError(
            f"rows {over.tolist()} keep {survivors[over].tolist()} tokens after the visual "
            f"tokens leave, more than the {room} the compacted sequence holds (seq_len - image "
            f"slots x {dropped_per_image} patches): give every row its images, or shorter text")


def splice(text_embeds: jax.Array, visual_tokens: jax.Array, visual_index: jax.Array):
    """LLM input: the visual token where visual_index >= 0, else the text embedding.

    text_embeds [B, T, D]; visual_tokens [B, I * M, D] (all M tokens of the row's images);
    visual_index [B, T]. The gather stays within each row, so it is local to a batch shard.
    """
    gathered = jnp.take_along_axis(
        visual_tokens, jnp.maximum(visual_index, 0)[..., None], axis=1
    )
    return jnp.where((visual_index >= 0)[..., None], gathered.astype(text_embeds.dtype), text_embeds)


def query_mask(m: jax.Array, num_queries: int, mode: str) -> jax.Array:
    """Which queries each query may attend to, per image: [N, 1, M, M] bool.

    "prefix": query i sees queries j < m (tokens i < m equal a run with only m queries);
    "causal": query i sees j <= i (token i is the same for every m).
    """
    j = jnp.arange(num_queries)
    if mode == "prefix":
        mask = j[None, None, :] < m[:, None, None]
        return jnp.broadcast_to(mask, (m.shape[0], num_queries, num_queries))[:, None]
    if mode == "causal":
        mask = j[None, :] <= j[:, None]
        return jnp.broadcast_to(mask, (m.shape[0], num_queries, num_queries))[:, None]
    raise ValueError(f"query mask mode {mode!r}: expected 'prefix' or 'causal'")
