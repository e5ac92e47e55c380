"""Tokenizers and LLaVA files that data tests build for themselves."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mqt_jax.data.conversation import VICUNA_SYSTEM

WORDS = ["USER", ":", "ASSISTANT", "What", "colour", "?", "Red", "And", "now", "Blue",
         "shape", "circle", "Describe", ".", "\n"]


def word_level_tokenizer(folder: Path) -> dict[str, int]:
    """A Hugging Face tokenizer.json whose ids are known by hand: <unk>=0, <s>=1, </s>=2, then
    WORDS, then the words of the vicuna system prompt. Returns the vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in WORDS + re.findall(r"\w+|[^\w\s]", VICUNA_SYSTEM):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Words, punctuation and newlines are tokens; other whitespace only separates.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), behavior="isolated"),
    ])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return vocab


def system_ids(vocab) -> list[int]:
    return [vocab[w] for w in re.findall(r"\w+|[^\w\s]", VICUNA_SYSTEM)]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path
