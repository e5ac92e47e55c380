"""Hugging Face checkpoint folders on disk: read and write safetensors one tensor at a time.

The `safetensors` package reads through numpy without bfloat16 and writes only whole
dictionaries; a 7B conversion needs neither copy of the model in host memory. The format is
an 8-byte header length, a JSON header (dtype, shape, byte range per tensor) and the raw
little-endian data, so reading is a seek and a `readinto`, writing a header and a stream.
PyTorch `.bin` files are opened only when torch is installed, with `weights_only=True`
(nothing else is ever unpickled). Each file's header is first validated by the `safetensors`
package itself (offsets in order, no overlap, no gap, inside the file).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np
from safetensors import safe_open

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
NAME_OF = {v: k for k, v in DTYPES.items()}


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


class SafetensorsFile:
    """One `.safetensors` file; its header is checked against the file's size on opening, so
    a truncated file fails before anything is read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        try:  # the format's own validation: header layout, offsets in order, no overlap or gap
            with safe_open(self.path, framework="numpy"):
                pass
        except Exception as e:  # noqa: BLE001  (SafetensorError, OSError)
            end = self._declared_end()
            if end > size:
                raise ValueError(f"{self.path} is truncated: its tensors end at byte {end}, the "
                                 f"file has {size}") from None
            raise ValueError(f"{self.path}: not a valid safetensors file ({first_line(e)})") from None
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.data_start, self.tensors = 8 + n, {}
        for key, info in header.items():
            if info.get("dtype") not in DTYPES:
                raise ValueError(f"{self.path}: tensor {key} has dtype {info.get('dtype')!r}, "
                                 f"which mqt_jax does not read ({', '.join(DTYPES)})")
            begin, end = info["data_offsets"]
            nbytes = math.prod(info["shape"]) * DTYPES[info["dtype"]].itemsize
            if end - begin != nbytes or self.data_start + end > size:  # safe_open checked both
                raise ValueError(f"{self.path}: tensor {key} does not fit its byte range")
            self.tensors[key] = (info["dtype"], tuple(info["shape"]), begin)

    def _declared_end(self) -> int:
        """Where the header says the data ends (0 when the header itself is unreadable)."""
        try:
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(min(n, 100 << 20)))
            return 8 + n + max(int(v["data_offsets"][1]) for k, v in header.items()
                               if k != "__metadata__")
        except Exception:  # noqa: BLE001
            return 0

    def read(self, key: str) -> np.ndarray:
        dtype, shape, begin = self.tensors[key]
        out = np.empty(shape, DTYPES[dtype])
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + begin)
            f.readinto(out.reshape(-1).view(np.uint8))
        return out


class TorchBinFile:
    """A PyTorch `.bin` state dict, loaded with `weights_only=True` (memory-mapped)."""

    def __init__(self, path: str | os.PathLike):
        try:
            import torch
        except ImportError:
            raise ValueError(f"{path} is a PyTorch .bin file: install torch to read it, or "
                             "convert it to safetensors") from None
        self.path, self._torch = Path(path), torch
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001  (torch raises many kinds for a bad file)
            raise ValueError(f"{self.path}: cannot be read as a PyTorch state dict ({e})") from None
        names = {getattr(torch, n): k for k, n in (("F64", "float64"), ("F32", "float32"),
                 ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"), ("I32", "int32"),
                 ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"))}
        self._state, self.tensors = state, {}
        for key, t in state.items():
            if t.dtype not in names:
                raise ValueError(f"{self.path}: tensor {key} has dtype {t.dtype}, which mqt_jax "
                                 "does not read")
            self.tensors[key] = (names[t.dtype], tuple(t.shape), None)

    def read(self, key: str) -> np.ndarray:
        t = self._state[key].contiguous()
        if t.dtype == self._torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            return t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return t.numpy().copy()


def own_file(folder: Path, name: str) -> Path:
    """folder / name, refused when it leads out of the folder (a symbolic link elsewhere):
    what a conversion reads comes from the folder it was given."""
    if not inside(folder, name):
        raise ValueError(f"{Path(folder) / name} leads out of {folder} (a symbolic link?); "
                         f"copy the file into the folder")
    return Path(folder) / name


def inside(folder: Path, name: str) -> bool:
    """Whether folder / name stays in folder: no absolute path or `..` step, and a symbolic
    link must resolve inside it too (or, in a Hugging Face hub cache snapshot, to its blobs)."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        return False
    target, allowed = (folder / name).resolve(), [folder.resolve()]
    if folder.resolve().parent.name == "snapshots":  # hub cache: snapshots/<rev>/f -> ../../blobs/<sha>
        allowed.append(folder.resolve().parent.parent / "blobs")
    return any(target.is_relative_to(root) for root in allowed)


class CheckpointFolder:
    """The weights of a Hugging Face folder: `model.safetensors`, or shards listed by
    `model.safetensors.index.json`; PyTorch `pytorch_model.bin` (or its index) only when no
    safetensors exist and `allow_bin`."""

    def __init__(self, folder: str | os.PathLike, allow_bin: bool = True):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder} is not a folder")
        files = self._weight_files(allow_bin)
        self.files = [(SafetensorsFile if f.suffix == ".safetensors" else TorchBinFile)(f)
                      for f in files]
        self.where: dict[str, object] = {}
        for file in self.files:
            for key in file.tensors:
                if key in self.where:
                    raise ValueError(f"tensor {key} is in both {self.where[key].path} and {file.path}")
                self.where[key] = file

    def _weight_files(self, allow_bin: bool) -> list[Path]:
        for stem, suffix in (("model", ".safetensors"), ("pytorch_model", ".bin")):
            if suffix == ".bin" and not allow_bin:
                break
            index = self.folder / f"{stem}{suffix}.index.json"
            if index.is_file():
                own_file(self.folder, index.name)
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{index}: not an index (no weight_map)") from None
                if not isinstance(weight_map, dict) or not all(
                        isinstance(v, str) and v for v in weight_map.values()):
                    raise ValueError(f"{index}: weight_map is not a mapping of tensor names to "
                                     f"shard file names")
                shards = sorted(set(weight_map.values()))
                outside = [s for s in shards if not inside(self.folder, s)]
                if outside:
                    raise ValueError(f"{index} names shard(s) outside {self.folder}: {outside[:3]}")
                missing = [s for s in shards if not (self.folder / s).is_file()]
                if missing:
                    raise FileNotFoundError(f"{index} names shard(s) {missing} that are not in "
                                            f"{self.folder}")
                return [self.folder / s for s in shards]
            if (self.folder / f"{stem}{suffix}").is_file():
                return [own_file(self.folder, f"{stem}{suffix}")]
        bins = " or pytorch_model.bin" if allow_bin else ""
        raise FileNotFoundError(f"{self.folder} holds no model.safetensors (nor its index){bins}")

    def keys(self) -> list[str]:
        return list(self.where)

    def dtype(self, key: str) -> str:
        return self.where[key].tensors[key][0]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.where[key].tensors[key][1]

    def read(self, key: str) -> np.ndarray:
        return self.where[key].read(key)


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no config.json")
    own_file(Path(folder), "config.json")
    try:
        cfg = json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"{path} is not valid JSON") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is a JSON {type(cfg).__name__}, not an object")
    return cfg


def write_safetensors(path: Path, entries: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray]) -> None:
    """Stream tensors into one file: the header from (key, shape, dtype), then `produce(key)`
    for each key in order (one tensor in memory at a time)."""
    entries, header, offset = list(entries), {}, 0
    for key, shape, dtype in entries:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[key] = {"dtype": NAME_OF[np.dtype(dtype)], "shape": list(shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for key, shape, dtype in entries:
            array = np.ascontiguousarray(produce(key), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"{key}: produced shape {array.shape}, declared {tuple(shape)}")
            f.write(array.reshape(-1).view(np.uint8).data)


def write_weights(folder: Path, entries: list[tuple[str, tuple[int, ...], np.dtype]],
                  produce: Callable[[str], np.ndarray], max_shard_bytes: int = 5 << 30) -> None:
    """`model.safetensors`, or shards of at most `max_shard_bytes` with their index (the
    layout `from_pretrained` reads)."""
    shards, size = [[]], 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * np.dtype(entry[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", shards[0], produce)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / name, shard, produce)
        for key, shape, dtype in shard:
            weight_map[key] = name
            total += math.prod(shape) * np.dtype(dtype).itemsize
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ---- weight rules: a Hugging Face tensor <-> one of our parameters ----

@dataclasses.dataclass(frozen=True)
class Rule:
    """Hugging Face tensor `hf_key` [hf_shape] -> parameter `param` ("/"-joined path), at
    `layer` of a scanned stack. layout "same": a reshape; "linear": torch's [out, in] weight
    transposed to [in, out]; "conv": OIHW -> HWIO. `rows`: a block of a packed tensor."""

    hf_key: str
    hf_shape: tuple[int, ...]
    param: str
    layer: int | None = None
    layout: str = "same"
    rows: tuple[int, int] | None = None

    def to_ours(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.rows:
            w = w[self.rows[0]:self.rows[1]]
        if self.layout == "linear":
            w = w.T
        elif self.layout == "conv":
            w = w.transpose(2, 3, 1, 0)
        return w.reshape(shape)

    def to_hf(self, p: np.ndarray) -> np.ndarray:
        assert self.rows is None, "packed tensors are not exported"
        if self.layout == "linear":
            return p.reshape(self.hf_shape[1], self.hf_shape[0]).T
        if self.layout == "conv":
            return p.transpose(3, 2, 0, 1)
        return p.reshape(self.hf_shape)


def linear(key: str, n_in: int, n_out: int, param: str, layer=None, bias=True) -> list[Rule]:
    rules = [Rule(f"{key}.weight", (n_out, n_in), f"{param}/kernel", layer, "linear")]
    return rules + ([Rule(f"{key}.bias", (n_out,), f"{param}/bias", layer)] if bias else [])


def norm(key: str, width: int, param: str, layer=None, bias=True) -> list[Rule]:
    rules = [Rule(f"{key}.weight", (width,), f"{param}/scale", layer)]
    return rules + ([Rule(f"{key}.bias", (width,), f"{param}/bias", layer)] if bias else [])
