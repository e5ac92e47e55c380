"""Tokenizers from a local folder: LLaMA sentencepiece `tokenizer.model` or a Hugging Face
`tokenizer.json`, behind one interface that also gives each token's character span (used to
put the loss on assistant text exactly)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np


class Tokenizer:
    """encode(text) -> (ids, begins, ends): int32 ids without BOS/EOS, and each token's span
    [begin, end) in characters of `text`."""

    def __init__(self, encode, decode, bos_id: int, eos_id: int, vocab_size: int, source: str):
        self._encode, self._decode = encode, decode
        self.bos_id, self.eos_id, self.vocab_size, self.source = bos_id, eos_id, vocab_size, source

    def encode(self, text: str):
        ids, begins, ends = self._encode(text)
        return (np.asarray(ids, np.int32), np.asarray(begins, np.int64), np.asarray(ends, np.int64))

    def decode(self, ids) -> str:
        """The text of `ids`; ids outside the tokenizer's vocabulary (an LLM's table padded
        past it can produce them) decode to nothing."""
        return self._decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def __repr__(self):
        return f"Tokenizer({self.source}, vocab_size={self.vocab_size})"


def _sentencepiece(path: Path) -> Tokenizer:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))

    def encode(text):
        # sentencepiece reports byte offsets into the UTF-8 text; map them to characters.
        char_at_byte = np.repeat(np.arange(len(text) + 1),
                                 [len(c.encode()) for c in text] + [1])
        pieces = sp.encode(text, out_type="proto").pieces
        return ([p.id for p in pieces], [char_at_byte[p.begin] for p in pieces],
                [char_at_byte[p.end] for p in pieces])

    return Tokenizer(encode, sp.decode, sp.bos_id(), sp.eos_id(), sp.vocab_size(), str(path))


def _hf_tokenizers(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(path))
    config_file = path.with_name("tokenizer_config.json")
    config = json.loads(config_file.read_text()) if config_file.exists() else {}

    def special(name, default):
        token = config.get(name, default)
        token = token.get("content", default) if isinstance(token, dict) else token
        token_id = tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{path}: special token {token!r} ({name}) is not in the vocabulary")
        return token_id

    def encode(text):
        enc = tok.encode(text, add_special_tokens=False)
        return enc.ids, [b for b, _ in enc.offsets], [e for _, e in enc.offsets]

    return Tokenizer(encode, lambda ids: tok.decode(ids), special("bos_token", "<s>"),
                     special("eos_token", "</s>"), tok.get_vocab_size(), str(path))


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """`tokenizer.model` (sentencepiece) if the folder has one, else `tokenizer.json`."""
    folder = Path(folder)
    if (folder / "tokenizer.model").is_file():
        return _sentencepiece(folder / "tokenizer.model")
    if (folder / "tokenizer.json").is_file():
        return _hf_tokenizers(folder / "tokenizer.json")
    raise FileNotFoundError(f"{folder} holds neither tokenizer.model nor tokenizer.json")


def train_sentencepiece(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int) -> Path:
    """Train a small LLaMA-style (BPE, byte fallback, digits split, <unk>=0 <s>=1 </s>=2)
    sentencepiece model offline; writes out_dir/tokenizer.model atomically.

    As LLaMA's, every digit is its own piece: "column 3?" and "column 3:" share the token `3`
    (unsplit, BPE learns `▁3?` and `▁3:` and the two never match), and every number is spelt
    from the same ten pieces (unsplit, a number whose `▁9` piece was not learned starts with
    a bare `▁`)."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        character_coverage=1.0, split_digits=True, minloglevel=2, num_threads=1,
    )
    tmp = out / "tokenizer.model.tmp"
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out / "tokenizer.model")
    return out / "tokenizer.model"
