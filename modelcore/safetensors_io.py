"""Zero-copy safetensors reading: the file is memory-mapped and tensors are views into it.

Pages are read from disk when first touched and are never duplicated, so loading a checkpoint needs
no more memory than the model itself.  A file shorter than its header declares is reported as truncated.
"""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

from modelcore.errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict without __metadata__, byte offset where the data section starts)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from exc
    header.pop("__metadata__", None)
    data_start = 8 + n
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if data_start + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: header needs {data_start + end} bytes, file has {size}")
    return header, data_start


def load_mmap(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file as views into a private (copy-on-write) memory map."""
    path = Path(path)
    header, data_start = read_header(path)
    if not header:
        return {}
    with path.open("rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = DTYPES[info["dtype"]]
        start, end = (int(x) for x in info["data_offsets"])
        shape = list(info["shape"])
        count = (end - start) // torch.empty((), dtype=dtype).element_size()
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(mm, dtype=dtype, count=count, offset=data_start + start)
        out[name] = t.view(shape)
    return out
