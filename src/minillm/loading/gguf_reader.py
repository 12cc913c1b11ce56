"""A lean reader of GGUF headers: metadata as plain Python values, tensors as views of a memory map.

`gguf.GGUFReader` builds numpy views for every element of every metadata array (the bundled model's
vocabulary and merges are 98k strings): 4.6 s of its 5.2 s load on the 2-core CI machine. This reads
the same layout (GGUF v2/v3, little-endian) in one pass of `struct`; type ids, block sizes and
dequantization still come from the `gguf` package.
"""

from __future__ import annotations

import mmap
import struct
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


@dataclass(frozen=True)
class _Strings:
    """An array of strings not decoded yet: where each one's 8-byte length starts, and where the array ends."""
    starts: np.ndarray
    end: int


def _scan_strings(buffer: memoryview, pos: int, count: int) -> _Strings:
    """An array of `count` strings from `pos` passed over, their lengths read for where each one starts."""
    length_at, starts = _U64.unpack_from, array("q")
    for _ in range(count):
        (length,) = length_at(buffer, pos)  # struct.error past the end of the file
        starts.append(pos)
        pos += 8 + length
    if pos > len(buffer):
        raise ValueError(f"an array of {count} strings runs past the end of the file")
    return _Strings(np.frombuffer(starts, dtype=np.int64), pos)


def _decode_strings(buffer: memoryview, strings: _Strings) -> list[str]:
    """An array's strings (a vocabulary: 150k of them) decoded at once: the bytes between their lengths, each
    length's top byte (zero: no string is 2^56 bytes long) left in front of its string as a NUL, decoded as one
    text (U+FFFD for bytes that are not UTF-8) and split at the NULs; where a string holds a NUL, one at a time."""
    starts, end = strings.starts, strings.end
    if not len(starts):
        return []
    region = np.frombuffer(buffer, dtype=np.uint8, count=end - int(starts[0]), offset=int(starts[0]))
    keep = np.ones(len(region), dtype=bool)
    relative = starts - starts[0]
    for byte in range(7):
        keep[relative + byte] = False
    text = region[keep].tobytes().decode("utf-8", "replace")  # a NUL ends any bad sequence: as each alone
    if text.count("\0") == len(starts):
        return text.split("\0")[1:]
    ends = [*starts[1:].tolist(), end]
    return [str(buffer[at + 8:stop], "utf-8", "replace") for at, stop in zip(starts.tolist(), ends)]


@dataclass
class TensorInfo:
    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: list[int]  # innermost first, as GGUF lists dimensions
    data: np.ndarray  # floats in numpy's order, or quantized blocks as uint8 [rows, bytes per row]
    offset: int  # of its data in the file


class GGUFFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.buffer = memoryview(self.map)
        self.pos = 0
        magic, version = self._unpack("<4sI")
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"not a GGUF v2/v3 file (magic {magic!r}, version {version})")
        n_tensors, n_fields = self._unpack("<QQ")
        # a value by key; an array of strings (a vocabulary: 150k of them) as a `_Strings` until asked for
        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._unpack("<I")[0], top=True)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (dims,) = self._unpack("<I")
            shape = list(self._unpack(f"<{dims}Q"))
            kind, offset = self._unpack("<IQ")
            infos.append((name, shape, gguf.GGMLQuantizationType(kind), offset))
        alignment = int(self.fields.get("general.alignment", 32))
        start = (self.pos + alignment - 1) // alignment * alignment
        self.tensors = {name: self._tensor(name, shape, kind, start + offset) for name, shape, kind, offset in infos}

    def field(self, key: str, default: Any = None) -> Any:
        """A metadata value; an array of strings is decoded on each call and not kept, so that a vocabulary's
        Python strings (~40 MB for 128k tokens and 280k merges) live while its tokenizer is built, not through
        the weights' load after it, and a load without a tokenizer never decodes them."""
        value = self.fields.get(key, default)
        return _decode_strings(self.buffer, value) if isinstance(value, _Strings) else value

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        text = bytes(self.buffer[self.pos:self.pos + length]).decode("utf-8", errors="replace")
        self.pos += length
        return text

    def _strings(self, count: int) -> _Strings:
        strings = _scan_strings(self.buffer, self.pos, count)
        self.pos = strings.end
        return strings

    def _value(self, kind: int, top: bool = False) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._unpack("<IQ")
            if item == _STRING:
                strings = self._strings(count)
                return strings if top else _decode_strings(self.buffer, strings)
            if item == _ARRAY:
                return [self._value(_ARRAY) for _ in range(count)]
            return list(self._unpack(f"<{count}{_SCALARS[item]}"))
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        return self._unpack("<" + _SCALARS[kind])[0]

    def _tensor(self, name: str, shape: list[int], kind: gguf.GGMLQuantizationType, at: int) -> TensorInfo:
        count = int(np.prod(shape))
        if kind.name in _FLOAT_DTYPES:
            dtype = np.dtype(_FLOAT_DTYPES[kind.name])
            nbytes, rows = count * dtype.itemsize, list(reversed(shape))
        else:
            per, size = gguf.GGML_QUANT_SIZES[kind]  # BF16 too: (1, 2), dequantized by gguf
            if shape[0] % per:
                raise ValueError(f"tensor {name}: {shape[0]} values per row is not a multiple of {per}")
            dtype, nbytes, rows = np.dtype(np.uint8), count // per * size, [-1, shape[0] // per * size]
        if at + nbytes > len(self.map):
            raise ValueError(f"tensor {name} ({kind.name}, {nbytes} bytes) runs past the end of the file")
        return TensorInfo(name, kind, shape, self.map[at:at + nbytes].view(dtype).reshape(rows), at)

    @contextmanager
    def reading(self, info: TensorInfo, rows: tuple[int, int] | None = None) -> Iterator[None]:
        """While a tensor is read whole (or its `rows` [start, stop), a tensor-parallel rank's): its pages mapped
        in one call (MADV_POPULATE_READ, Linux 5.14+, rather than a page fault every few pages; elsewhere the
        reads fault them in); afterwards dropped from this process's memory (they stay in the page cache), so a
        load that copies tensor by tensor holds one tensor of the file at a time, not all."""
        row_bytes = info.data.nbytes // max(len(info.data), 1)
        first, stop = (0, len(info.data)) if rows is None else rows
        start = (info.offset + first * row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
        length = info.offset + stop * row_bytes - start
        try:
            self.map._mmap.madvise(getattr(mmap, "MADV_POPULATE_READ", 22), start, length)
        except OSError:
            pass
        try:
            yield
        finally:
            self.map._mmap.madvise(mmap.MADV_DONTNEED, start, length)
