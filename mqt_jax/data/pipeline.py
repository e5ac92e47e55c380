"""LLaVA-format records -> fixed-shape training batches, through grain.

records (JSON list or JSON Lines) -> shuffle (seeded) -> per-host shard -> [workers: decode +
CLIP preprocess + tokenize + draw m] -> [main process: drop / count bad records, truncate,
pack first-fit, splice.layout_rows] -> batches with every key of splice.BATCH_KEYS.

Bad records are skipped and counted by reason (`BatchIterator.skipped`); with
`DataConfig.strict` the first one raises, naming the record and the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections import Counter
from typing import Any

import grain
import numpy as np
from etils import epath
from PIL import Image

from mqt_jax.config import DataConfig, MSampler
from mqt_jax.core import splice
from mqt_jax.data.conversation import BadRecord, encode_conversation
from mqt_jax.data.preprocess import BadImage, clip_preprocess, confined, open_image
from mqt_jax.data.tokenizer import load_tokenizer


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A line of the data file that is not a record."""

    reason: str
    where: str


def read_records(path: str) -> list:
    """The records of a LLaVA file: dicts, or Skipped for lines that are not valid JSON / UTF-8."""
    raw = epath.Path(path).read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Windows editors write one)
        raw = raw[3:]
    if raw.lstrip()[:1] == b"[":
        try:
            records = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{path}: not a valid JSON list ({e})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: a JSON {type(records).__name__}, not a list of records")
        return [r if isinstance(r, dict) else Skipped("malformed_record", f"{path}[{i}]")
                for i, r in enumerate(records)]
    records = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            records.append(Skipped("non_utf8", f"{path}:{number}"))
            continue
        except (json.JSONDecodeError, RecursionError):  # nested beyond Python's stack: malformed
            records.append(Skipped("malformed_json", f"{path}:{number}"))
            continue
        records.append(record if isinstance(record, dict)
                       else Skipped("malformed_record", f"{path}:{number}"))
    return records


class ExampleBuilder:
    """Runs in the grain workers: one record -> {example, image, m} or {skip: reason}."""

    def __init__(self, config: DataConfig, num_queries: int, image_size: int,
                 sampler: MSampler, seed: int):
        self.config, self.num_queries, self.image_size = config, num_queries, image_size
        self.sampler, self.seed = sampler, seed
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:  # loaded lazily, once per worker process
            self._tokenizer = load_tokenizer(self.config.tokenizer_dir)
        return self._tokenizer

    def __call__(self, index: int, record) -> dict[str, Any]:
        try:
            return self._build(index, record)
        except BadRecord as e:
            where = record.where if isinstance(record, Skipped) else self.config.data_path
            record_id = record.get("id") if isinstance(record, dict) else None
            if self.config.strict:
                raise ValueError(f"record {str(record_id)[:80]!r} in {where}: {e}") from e
            return {"skip": e.reason, "detail": f"record {str(record_id)[:80]!r}: {e}"[:300]}

    def _build(self, index: int, record) -> dict[str, Any]:
        if isinstance(record, Skipped):
            raise BadRecord(record.reason, record.where)
        image_path = record.get("image")
        if image_path is not None and not isinstance(image_path, (str, np.ndarray)):
            raise BadRecord("malformed_record", f"'image' is a {type(image_path).__name__}; "
                            "expected one image path (a string)")
        example = encode_conversation(record.get("conversations", []), self.config.template,
                                      self.tokenizer, has_image=image_path is not None)
        if isinstance(image_path, np.ndarray):  # decoded pixels (the TFDS route)
            pil = Image.fromarray(image_path)
        elif image_path is not None:
            if "\x00" in image_path:
                raise BadRecord("malformed_record", "'image' holds a NUL byte")
            path = confined(self.config.image_root, image_path)
            if not path.exists():
                raise BadRecord("missing_image", str(path))
            try:  # a local path: a regular file only (a named pipe would stall training)
                pil = open_image(path.read_bytes() if "://" in str(path) else str(path), name=str(path))
            except BadImage as e:
                raise BadRecord("bad_image", str(e)) from e
        image = (None if image_path is None
                 else clip_preprocess(pil, self.image_size, self.config.image_mode))
        m = self.sampler.sample(self.num_queries, (example.num_images,), self.seed, index)
        return {"example": example, "image": image, "m": m}


def die_with_parent(_index: int = 0, _count: int = 0) -> None:
    """A grain worker's start: exit once the process that started it is gone. A SIGKILLed
    trainer cannot stop its workers, which otherwise run on (hundreds of MB each)."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()


def keeps_loss(example: splice.Example, m, num_queries: int, seq_len: int) -> bool:
    """Whether any loss-bearing token survives truncation to seq_len."""
    labels = splice.expand_example(example, m, num_queries)[2]
    return bool(np.any(labels[1:seq_len] != splice.IGNORE))


class NoExamples(ValueError):
    """A whole pass over the records gave no example: training would wait forever."""


class BatchIterator:
    """Packs built examples into fixed-shape batches; checkpointable via get_state/set_state.

    The state is the upstream position before the first example of the batch being filled,
    the skip counts and the number of batches made, so a restored iterator yields exactly what
    the original would have. `records` (this host's records per pass) bounds the skips in a
    row: two passes' worth without one example raise NoExamples with the counts by reason.
    With a per-batch MSampler, one m (a function of the seed and the batch number) replaces
    the workers' per-example draws for every image of a batch.
    """

    def __init__(self, parent, *, batch_size: int, seq_len: int, images_per_row: int,
                 num_queries: int, image_size: int, pack: bool, records: int = 0,
                 sampler: MSampler | None = None, seed: int = 0, source: str = "the data"):
        self.parent, self.batch_size, self.seq_len = parent, batch_size, seq_len
        self.images_per_row, self.num_queries, self.image_size = images_per_row, num_queries, image_size
        self.pack, self.records, self.source = pack, records, source
        self.batch_m = sampler.per == "batch" if sampler else False
        copies = sampler.copies(num_queries) if sampler else 1
        if copies > batch_size and not pack:
            raise ValueError(f"MSampler 'all' trains each example at {copies} scales, one row "
                             f"each (unpacked), in one batch: this host's batch_size={batch_size} "
                             "is smaller")
        self.sampler, self.seed = sampler, seed
        self.skipped: Counter = Counter()
        self.batches = 0
        self._pending = None  # (upstream state before it, item): the example that did not fit
        self._in_a_row, self._last_detail = 0, ""

    def __iter__(self):
        return self

    def get_state(self) -> dict:
        upstream = self._pending[0] if self._pending else self.parent.get_state()
        return {"upstream": upstream, "skipped": dict(self.skipped), "batches": self.batches,
                "source": self._where(), "records": self.records}

    def _where(self) -> str:
        return str(self.source) if "://" in str(self.source) else os.path.abspath(self.source or "")

    def set_state(self, state: dict) -> None:
        saved = (state.get("source"), state.get("records"))
        if saved[0] is not None and saved != (self._where(), self.records):
            raise ValueError(f"it was saved reading {saved[0]} ({saved[1]} records on this host); "
                             f"this run reads {self._where()} ({self.records})")
        self.parent.set_state(state["upstream"])
        self.skipped.clear()  # in place: the training loop holds this Counter
        self.skipped.update(state["skipped"])
        self.batches = state.get("batches", 0)
        self._pending = None

    def _next_item(self):
        if self._pending:
            item, self._pending = self._pending, None
            return item
        before = self.parent.get_state()
        return before, next(self.parent)

    def _skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        self._in_a_row += 1
        self._last_detail = detail or self._last_detail
        if self.records and self._in_a_row >= 2 * self.records:
            counts = ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items()))
            raise NoExamples(f"no record of {self.source} gives a training example ({self.records} "
                             f"records on this host, {self._in_a_row} skipped in a row: {counts}); "
                             f"last: {self._last_detail}")

    def __next__(self) -> dict[str, np.ndarray]:
        rows: list[dict] = []
        batch_m = (self.sampler.sample(self.num_queries, (), self.seed, 1 << 30, self.batches)
                   if self.batch_m else None)
        while True:
            try:
                before, item = self._next_item()
            except StopIteration:
                if rows:
                    return self._emit(rows)
                raise
            if "skip" in item:
                self._skip(item["skip"], item.get("detail", ""))
                continue
            example, m = item["example"], item["m"]
            if batch_m is not None:
                m = np.full_like(m, batch_m)
            copies = m if m.ndim == 2 else m[None]  # MSampler "all": one copy per scale
            if example.num_images > self.images_per_row:
                self._skip("too_many_images", f"{example.num_images} images for images_per_row="
                           f"{self.images_per_row}")
                continue
            if not all(keeps_loss(example, mc, self.num_queries, self.seq_len) for mc in copies):
                self._skip("truncated_no_loss", f"no answer token within seq_len={self.seq_len}")
                continue
            self._in_a_row = 0
            if not self._place(rows, example, item["image"], copies):
                if not rows:
                    raise ValueError(f"an example at {len(copies)} scales does not fit one batch "
                                     f"of {self.batch_size} rows x seq_len={self.seq_len}")
                self._pending = (before, item)
                return self._emit(rows)

    def _place(self, rows: list, example, image, copies) -> bool:
        """Adds the example to the batch once per row of `copies` (its m per image), first fit
        when packing: all copies or none, so every scale of an example shares one step."""
        lengths, images = [r["length"] for r in rows], [len(r["m"]) for r in rows]
        targets = []
        for m in copies:
            length = min(splice.true_length(example, m), self.seq_len)
            k = next((k for k in range(len(lengths)) if self.pack
                      and lengths[k] + length <= self.seq_len
                      and images[k] + example.num_images <= self.images_per_row), None)
            if k is None:
                if len(lengths) == self.batch_size:
                    return False
                k = len(lengths)
                lengths.append(0)
                images.append(0)
            lengths[k] += length
            images[k] += example.num_images
            targets.append((k, m, length))
        for k, m, length in targets:
            if k == len(rows):
                rows.append({"examples": [], "images": [], "m": [], "length": 0})
            rows[k]["examples"].append(example)
            rows[k]["m"] += list(m)
            rows[k]["images"] += [image] if image is not None else []
            rows[k]["length"] += length
        return True

    def _emit(self, rows) -> dict[str, np.ndarray]:
        self.batches += 1
        b, i, s = self.batch_size, self.images_per_row, self.image_size
        images = np.zeros((b, i, s, s, 3), np.float32)
        m = np.ones((b, i), np.int32)  # unused image slots: any valid m, never gathered
        examples = [r["examples"] for r in rows] + [[] for _ in range(b - len(rows))]
        for r, row in enumerate(rows):
            for k, (pixels, mk) in enumerate(zip(row["images"], row["m"])):
                images[r, k], m[r, k] = pixels, mk
        return {"images": images, "m": m,
                **splice.layout_rows(examples, m, self.num_queries, self.seq_len)}


def make_batches(config: DataConfig, *, num_queries: int, image_size: int, batch_size: int,
                 seq_len: int, images_per_row: int = 1, sampler: MSampler | None = None,
                 seed: int = 0) -> BatchIterator:
    """The training batch iterator for this process (its share of the global batch)."""
    if not config.tokenizer_dir:
        raise ValueError("DataConfig.tokenizer_dir is not set")
    load_tokenizer(config.tokenizer_dir)  # fail here, not in a worker
    if config.tfds_dir:
        from mqt_jax.data.shapes_tfds import TfdsRecords

        records = TfdsRecords(config.tfds_dir, config.tfds_split)
    elif config.data_path:
        records = read_records(config.data_path)
    else:
        raise ValueError("set DataConfig.data_path (a LLaVA file) or DataConfig.tfds_dir")
    if not len(records):
        raise ValueError(f"{config.data_path or config.tfds_dir} holds no records")
    ds = grain.MapDataset.source(records)
    if config.shuffle:
        ds = ds.seed(seed).shuffle()
    ds = ds.repeat(config.num_epochs)
    shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    ds = ds[shard.shard_index::shard.shard_count]
    builder = ExampleBuilder(config, num_queries, image_size, sampler or MSampler(), seed)
    it = ds.map_with_index(builder).to_iter_dataset()
    if config.num_workers:
        from absl import flags

        flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers),
                            worker_init_fn=die_with_parent)
    return BatchIterator(iter(it), batch_size=batch_size, seq_len=seq_len,
                         images_per_row=images_per_row, num_queries=num_queries,
                         image_size=image_size, pack=config.pack,
                         records=-(-len(records) // shard.shard_count),
                         sampler=sampler, seed=seed, source=config.data_path or config.tfds_dir)
