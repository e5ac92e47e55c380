"""Shapes-VQA as a TFDS dataset (ArrayRecord, prepared locally, no TensorFlow).

Built from the LLaVA files that `shapes.write_shapes` wrote; read back with
`tfds.data_source` / `as_data_source` into the same grain pipeline. This module must stay
importable by grain's worker processes (they re-create the builder by name).
"""

from __future__ import annotations

import json
from pathlib import Path

import tensorflow_datasets as tfds

SPLITS = {"captions": "shapes_captions.json", "qa": "shapes_qa.json"}


class ShapesVqa(tfds.core.GeneratorBasedBuilder):
    """Records as in the LLaVA files: id, image (PNG), conversations (a JSON string)."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, source_dir: str | None = None, **kwargs):
        self.source_dir = source_dir
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "conversations": tfds.features.Text(),
        }))

    def _split_generators(self, dl_manager):
        if not self.source_dir:
            raise ValueError("ShapesVqa needs source_dir (a folder written by write_shapes)")
        return {split: self._generate_examples(Path(self.source_dir) / name)
                for split, name in SPLITS.items()}

    def _generate_examples(self, path: Path):
        for record in json.loads(path.read_text()):
            image = (path.parent / "images" / record["image"]).read_bytes()  # PNG bytes: no TF
            yield record["id"], {"id": record["id"], "image": image,
                                 "conversations": json.dumps(record["conversations"])}


def prepare(source_dir: str | Path, data_dir: str | Path) -> ShapesVqa:
    builder = ShapesVqa(source_dir=str(source_dir), data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder


class TfdsRecords:
    """A TFDS split as LLaVA record dicts (the image as decoded pixels)."""

    def __init__(self, data_dir: str, split: str):
        self.data_dir, self.split = data_dir, split
        self._source = ShapesVqa(data_dir=data_dir).as_data_source(split)

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        row = self._source[index]
        text = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
        return {"id": text(row["id"]), "image": row["image"],
                "conversations": json.loads(text(row["conversations"]))}

    def __reduce__(self):  # re-open in worker processes rather than pickling file handles
        return (TfdsRecords, (self.data_dir, self.split))
