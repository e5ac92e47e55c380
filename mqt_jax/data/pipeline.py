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
from collections import Counter
from typing import Any

import gin
import grain
import numpy as np
from etils import epath
from PIL import Image

from mqt_jax import splice
from mqt_jax.data.conversation import BadRecord, encode_conversation
from mqt_jax.data.preprocess import clip_preprocess
from mqt_jax.data.tokenizer import load_tokenizer
from mqt_jax.m_sampler import MSampler


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
    data_path: str = ""  # a LLaVA training file: JSON list or JSON Lines
    image_root: str = ""  # folder the records' "image" paths are relative to
    tfds_dir: str = ""  # or: a prepared shapes_vqa TFDS dataset (data_dir) ...
    tfds_split: str = "qa"  # ... and its split ("captions" or "qa")
    tokenizer_dir: str = ""  # holds tokenizer.model (sentencepiece) or tokenizer.json
    template: str = "vicuna_v1"  # "plain" for stage 1
    image_mode: str = "pad"  # "pad" to square with the mean colour (LLaVA-1.5), or "crop"
    pack: bool = False  # several examples per row, first-fit on their true length
    strict: bool = False  # raise on the first bad record instead of skipping it
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    num_workers: int = 0  # grain worker processes for decode/preprocess/tokenize


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A line of the data file that is not a record."""

    reason: str
    where: str


def read_records(path: str) -> list:
    """The records of a LLaVA file: dicts, or Skipped for lines that are not valid JSON / UTF-8."""
    raw = epath.Path(path).read_bytes()
    if raw.lstrip()[:1] == b"[":
        try:
            records = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a valid JSON list ({e})") from e
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
        except json.JSONDecodeError:
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
                raise ValueError(f"record {record_id!r} in {where}: {e}") from e
            return {"skip": e.reason}

    def _build(self, index: int, record) -> dict[str, Any]:
        if isinstance(record, Skipped):
            raise BadRecord(record.reason, record.where)
        image_path = record.get("image")
        example = encode_conversation(record.get("conversations") or [], self.config.template,
                                      self.tokenizer, has_image=image_path is not None)
        image = None
        if isinstance(image_path, np.ndarray):  # decoded pixels (the TFDS route)
            image = clip_preprocess(Image.fromarray(image_path), self.image_size,
                                    self.config.image_mode)
        elif image_path is not None:
            path = epath.Path(self.config.image_root) / image_path
            if not path.exists():
                raise BadRecord("missing_image", str(path))
            try:
                with path.open("rb") as f:
                    pil = Image.open(f)
                    pil.load()
            except Exception as e:  # PIL raises several types for broken files
                raise BadRecord("bad_image", f"{path}: {e}") from e
            image = clip_preprocess(pil, self.image_size, self.config.image_mode)
        m = self.sampler.sample(self.num_queries, (example.num_images,), self.seed, index)
        return {"example": example, "image": image, "m": m}


def keeps_loss(example: splice.Example, m, num_queries: int, seq_len: int) -> bool:
    """Whether any loss-bearing token survives truncation to seq_len."""
    labels = splice.expand_example(example, m, num_queries)[2]
    return bool(np.any(labels[1:seq_len] != splice.IGNORE))


class BatchIterator:
    """Packs built examples into fixed-shape batches; checkpointable via get_state/set_state.

    The state is the upstream position before the first example of the batch being filled,
    plus the skip counts, so a restored iterator yields exactly what the original would have.
    """

    def __init__(self, parent, *, batch_size: int, seq_len: int, images_per_row: int,
                 num_queries: int, image_size: int, pack: bool):
        self.parent, self.batch_size, self.seq_len = parent, batch_size, seq_len
        self.images_per_row, self.num_queries, self.image_size = images_per_row, num_queries, image_size
        self.pack = pack
        self.skipped: Counter = Counter()
        self._pending = None  # (upstream state before it, item): the example that did not fit

    def __iter__(self):
        return self

    def get_state(self) -> dict:
        upstream = self._pending[0] if self._pending else self.parent.get_state()
        return {"upstream": upstream, "skipped": dict(self.skipped)}

    def set_state(self, state: dict) -> None:
        self.parent.set_state(state["upstream"])
        self.skipped.clear()  # in place: the training loop holds this Counter
        self.skipped.update(state["skipped"])
        self._pending = None

    def _next_item(self):
        if self._pending:
            item, self._pending = self._pending, None
            return item
        before = self.parent.get_state()
        return before, next(self.parent)

    def __next__(self) -> dict[str, np.ndarray]:
        rows: list[dict] = []
        while True:
            try:
                before, item = self._next_item()
            except StopIteration:
                if rows:
                    return self._emit(rows)
                raise
            if "skip" in item:
                self.skipped[item["skip"]] += 1
                continue
            example, m = item["example"], item["m"]
            if example.num_images > self.images_per_row:
                self.skipped["too_many_images"] += 1
                continue
            if not keeps_loss(example, m, self.num_queries, self.seq_len):
                self.skipped["truncated_no_loss"] += 1
                continue
            length = min(splice.true_length(example, m), self.seq_len)
            row = next((r for r in rows if self.pack and r["length"] + length <= self.seq_len
                        and len(r["m"]) + example.num_images <= self.images_per_row), None)
            if row is None and len(rows) == self.batch_size:
                self._pending = (before, item)
                return self._emit(rows)
            if row is None:
                row = {"examples": [], "images": [], "m": [], "length": 0}
                rows.append(row)
            row["examples"].append(example)
            row["m"] += list(m)
            row["images"] += [item["image"]] if item["image"] is not None else []
            row["length"] += length

    def _emit(self, rows) -> dict[str, np.ndarray]:
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
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
    return BatchIterator(iter(it), batch_size=batch_size, seq_len=seq_len,
                         images_per_row=images_per_row, num_queries=num_queries,
                         image_size=image_size, pack=config.pack)
