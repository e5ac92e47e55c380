"""LLaVA conversation templates -> token ids and labels (loss on assistant text only).

A conversation renders into pieces: text (with or without loss), the image placeholder, and
EOS. Consecutive text is tokenised as one string (as LLaVA tokenises the whole prompt), and a
token carries loss when its character span overlaps assistant text. `<image>` never reaches
the tokenizer: it becomes splice.IMAGE_TOKEN.
"""

from __future__ import annotations

import numpy as np

from mqt_jax.core.splice import IGNORE, IMAGE_TOKEN, Example
from mqt_jax.data.tokenizer import Tokenizer

IMAGE_PLACEHOLDER = "<image>"
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)
# "lm": the vicuna_v1 conversation with loss on every token (stage 0's language-model pretraining).
TEMPLATES = ("plain", "vicuna_v1", "lm")
ROLES = {"human": "USER", "gpt": "ASSISTANT"}


class BadRecord(ValueError):
    """A record that cannot become a training example; `reason` is a short category."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


IMAGE, EOS = object(), object()  # special pieces


def valid_text(value, what: str) -> str:
    """A turn's text: a non-empty string that UTF-8 can encode (JSON allows lone surrogates)."""
    if not isinstance(value, str) or not value.strip():
        raise BadRecord("empty_text", f"{what} has no text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRecord("bad_text", f"{what} holds a lone surrogate, not valid Unicode") from None
    return value


def render(conversations: list[dict], template: str, has_image: bool) -> list:
    """Pieces: (text, has_loss) tuples, IMAGE, or (EOS, has_loss). As LLaVA does, the image
    goes to the front of the human turn that holds `<image>` (the first one if none does)."""
    if template not in TEMPLATES:
        raise ValueError(f"template {template!r}: expected one of {TEMPLATES}")
    if not isinstance(conversations, list):
        raise BadRecord("malformed_record", f"'conversations' is {type(conversations).__name__}, "
                        "not a list of turns")
    turns = []
    for turn in conversations:
        if not isinstance(turn, dict) or turn.get("from") not in ROLES:
            role = turn.get("from") if isinstance(turn, dict) else turn
            raise BadRecord("unknown_role", f"turn role {str(role)[:40]!r}; expected 'human' or 'gpt'")
        turns.append((turn["from"], valid_text(turn.get("value"), f"a {turn['from']} turn")))
    if not any(role == "gpt" for role, _ in turns):
        raise BadRecord("no_assistant_turn", "the conversation has no 'gpt' turn")
    placeholders = sum(v.count(IMAGE_PLACEHOLDER) for _, v in turns)
    if placeholders > int(has_image):
        raise BadRecord("too_many_placeholders",
                        f"{placeholders} <image> placeholders for {int(has_image)} image(s)")
    if any(role == "gpt" and IMAGE_PLACEHOLDER in v for role, v in turns):
        raise BadRecord("placeholder_in_answer", "an assistant turn holds <image>")
    if template == "plain":  # stage 1: the image, then the caption and "\n"; loss on the caption
        caption = next(v for role, v in turns if role == "gpt")
        return ([IMAGE] if has_image else []) + [(caption + "\n", True)]
    humans = [i for i, (role, _) in enumerate(turns) if role == "human"]
    if has_image and not humans:
        raise BadRecord("no_human_turn", "the image has no human turn to go in")
    image_turn = next((i for i in humans if IMAGE_PLACEHOLDER in turns[i][1]),
                      humans[0] if humans else None) if has_image else None
    pieces = [(VICUNA_SYSTEM + " ", False)]
    for i, (role, value) in enumerate(turns):
        if role == "human":
            pieces.append(("USER: ", False))
            if i == image_turn:
                pieces += [IMAGE, ("\n" + value.replace(IMAGE_PLACEHOLDER, "").strip(), False)]
            else:
                pieces.append((value, False))
            pieces.append((" ", False))
        else:
            # The space before the answer is the answer's: sentencepiece attaches it to the
            # first piece ("▁red"), or makes it a piece of its own ("▁", "9"), which must be
            # a target too, or the model never learns to start an answer with it.
            pieces += [("ASSISTANT:", False), (" " + value, True), (EOS, True)]
    if template == "lm":
        return [piece if piece is IMAGE else (piece[0], True) for piece in pieces]
    return pieces


def tokenize(pieces: list, tokenizer: Tokenizer) -> Example:
    """[BOS] + pieces -> Example(tokens, labels)."""
    tokens, labels = [tokenizer.bos_id], [IGNORE]
    text, loss_spans = "", []

    def flush():
        nonlocal text, loss_spans
        if text:
            ids, begins, ends = tokenizer.encode(text)
            ends = np.maximum(ends, begins + 1)  # byte-fallback pieces may have empty spans
            loss = np.zeros(len(ids), bool)
            for s, e in loss_spans:
                loss |= (begins < e) & (ends > s)
            tokens.extend(ids.tolist())
            labels.extend(np.where(loss, ids, IGNORE).tolist())
        text, loss_spans = "", []

    for piece in pieces:
        if piece is IMAGE:
            flush()
            tokens.append(IMAGE_TOKEN)
            labels.append(IGNORE)
        elif piece[0] is EOS:
            flush()
            tokens.append(tokenizer.eos_id)
            labels.append(tokenizer.eos_id if piece[1] else IGNORE)
        else:
            if piece[1]:
                loss_spans.append((len(text), len(text) + len(piece[0])))
            text += piece[0]
    flush()
    return Example(tokens, labels)


def encode_conversation(conversations, template: str, tokenizer: Tokenizer, has_image: bool):
    return tokenize(render(conversations, template, has_image), tokenizer)


def encode_prompt(question: str, template: str, tokenizer: Tokenizer, has_image: bool = True):
    """A one-question prompt that ends where the assistant's answer begins ("... ASSISTANT:",
    without the space, which training tokenises into the answer's first target)."""
    return encode_chat([{"from": "human", "value": question}], template, tokenizer, has_image)


def encode_chat(turns: list[dict], template: str, tokenizer: Tokenizer, has_image: bool = True):
    """A conversation ({"from": "human" | "gpt", "value"} turns, the last a human one) as a
    prompt that ends where the next answer begins; the image goes as `render` puts it."""
    if not turns or not isinstance(turns[-1], dict) or turns[-1].get("from") != "human":
        raise BadRecord("no_question", "the conversation must end with a human (user) turn")
    pieces = render(list(turns) + [{"from": "gpt", "value": "-"}], template, has_image)
    if template == "plain":
        pieces = pieces[:-1]  # the image alone; the caption follows
    else:
        last = len(pieces) - 1 - pieces[::-1].index(("ASSISTANT:", False))
        pieces = pieces[:last] + [("ASSISTANT:", False)]
    example = tokenize(pieces, tokenizer)
    return Example(example.tokens, [IGNORE] * len(example.tokens))
