"""Read and write safetensors files one tensor at a time.

Reading parses the header and reads each tensor with plain file reads (no memory map), so a converter holds only the
tensor it is working on. Writing plans every shard from the tensor specs first, writes each shard's header, then puts
each tensor at its planned offset as it arrives, in any order: the output is never held in memory as a whole.
The format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, the raw bytes.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import CorruptCheckpointError

DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_HEADER_LIMIT = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor, and the file it comes from (for error messages)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsReader:
    """The tensors of one .safetensors file, checked against the file size before anything is read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._entries, self._data_start = _read_header(self.path)

    def specs(self) -> dict[str, TensorSpec]:
        return {
            name: TensorSpec(tuple(e["shape"]), CODE_DTYPES[e["dtype"]], self.path) for name, e in self._entries.items()
        }

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in file order, each read on its own."""
        order = sorted(self._entries.items(), key=lambda item: item[1]["data_offsets"][0])
        with open(self.path, "rb") as f:
            for name, entry in order:
                begin, end = entry["data_offsets"]
                f.seek(self._data_start + begin)
                data = bytearray(end - begin)
                if f.readinto(data) != end - begin:
                    raise CorruptCheckpointError(f"{self.path} is truncated: re-download or re-save it")
                dtype = CODE_DTYPES[entry["dtype"]]
                if end == begin:
                    tensor = torch.empty(entry["shape"], dtype=dtype)
                else:
                    tensor = torch.frombuffer(data, dtype=dtype).reshape(entry["shape"])
                yield name, tensor


def _read_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    broken = f"{path} is not a complete safetensors file"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(f"{broken} ({size} bytes): re-download or re-save it")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _HEADER_LIMIT):
            raise CorruptCheckpointError(f"{broken} (its header is cut off or damaged): re-download or re-save it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CorruptCheckpointError(f"{broken} (its header is not valid JSON): re-download or re-save it") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{broken} (unexpected header): re-download or re-save it")
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        try:
            begin, stop = entry["data_offsets"]
            dtype = CODE_DTYPES[entry["dtype"]]
            count = math.prod(entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(f"{broken} (bad header entry for {name!r}): re-download or re-save it") from None
        if stop - begin != count * torch.empty((), dtype=dtype).element_size() or begin < 0:
            raise CorruptCheckpointError(f"{broken} (tensor {name!r} has inconsistent offsets): re-save it")
        end = max(end, stop)
    data_start = 8 + n
    if data_start + end != size:
        raise CorruptCheckpointError(
            f"{path} is truncated or damaged: its header describes {data_start + end} bytes but the file has {size}; "
            "re-download or re-save it"
        )
    return header, data_start


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------
def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def parse_size(text: str | int) -> int:
    """'2GB' / '500MB' / '100KB' / bytes -> bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if m is None:
        raise ValueError(f"--max-shard-size must look like 2GB, 500MB or a byte count, got {text!r}")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


class ShardedSafetensorsWriter:
    """Writes a planned set of tensors into model.safetensors or model-0000i-of-0000N.safetensors + index.

    `plan` maps every output name to its TensorSpec; tensors are laid out in natural name order and cut into shards
    of at most `max_shard_bytes` (a single larger tensor gets a shard of its own). `write` accepts them in any order;
    `finish` checks that every planned tensor arrived. Use it as a context manager (closes the files).
    """

    def __init__(self, folder: str | Path, plan: dict[str, TensorSpec], max_shard_bytes: int):
        self.folder = Path(folder)
        names = sorted(plan, key=_natural_key)
        shards: list[list[str]] = [[]]
        size = 0
        for name in names:
            nbytes = plan[name].nbytes
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        total = len(shards)
        self.files = [
            self.folder / ("model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors")
            for i in range(total)
        ]
        self._where: dict[str, tuple[int, int, TensorSpec]] = {}  # name -> (shard, absolute offset, spec)
        self._handles = []
        for index, (path, members) in enumerate(zip(self.files, shards)):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name in members:
                spec = plan[name]
                header[name] = {"dtype": DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                                "data_offsets": [offset, offset + spec.nbytes]}
                offset += spec.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
            handle = open(path, "wb")
            handle.write(struct.pack("<Q", len(raw)) + raw)
            handle.truncate(8 + len(raw) + offset)
            self._handles.append(handle)
            for name in members:
                self._where[name] = (index, 8 + len(raw) + header[name]["data_offsets"][0], plan[name])
        self._written: set[str] = set()
        self.weight_map = {name: self.files[shard].name for name, (shard, _, _) in self._where.items()}
        self.total_size = sum(spec.nbytes for spec in plan.values())

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._where:
            raise ValueError(f"tensor {name!r} is not part of the planned output")
        if name in self._written:
            raise ValueError(f"tensor {name!r} was given twice")
        shard, offset, spec = self._where[name]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, planned {spec.shape} {spec.dtype}")
        handle = self._handles[shard]
        handle.seek(offset)
        if spec.nbytes:
            handle.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._written.add(name)

    def __enter__(self) -> "ShardedSafetensorsWriter":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.close()

    def finish(self) -> None:
        """Check that every planned tensor was written; write the index when there are several shards."""
        for handle in self._handles:
            handle.flush()
        missing = sorted(set(self._where) - self._written, key=_natural_key)
        if missing:
            raise ValueError(f"{len(missing)} planned tensors were never produced, e.g. {missing[0]}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
