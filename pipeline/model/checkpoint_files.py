"""Reading and writing folders of safetensors files: lazily, slice by slice, and atomically.

`SafetensorsFolder` opens a Hugging Face-style folder (one `model.safetensors`, a sharded set with
`model.safetensors.index.json`, or loose `*.safetensors`) and reads the header of every file, so
names, shapes and dtypes are known without touching a weight; `read(name, dim, start, end)` then
reads only that slice through safetensors' memory map. `ShardedWriter` writes tensors one at a time
into files of bounded size plus the index, into a temporary folder renamed into place at the end.

Design choice: slices through `safe_open(...).get_slice`, so a TP rank of a large teacher touches
only its own rows or columns; the cost is one small read per slice (fused QKV reads head by head).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from pipeline.model.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsFolder:
    """The tensors of a folder of safetensors files, read lazily; see the module docstring."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._file_of: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, str] = {}
        self._handles: dict[Path, object] = {}
        for path in self._files():
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    self._file_of[name] = path
                    self._shape[name] = tuple(piece.get_shape())
                    self._dtype[name] = piece.get_dtype()

    def _files(self) -> list[Path]:
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a folder (expected a Hugging Face checkpoint folder)")
        index = self.folder / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({err})") from None
            files = sorted({self.folder / name for name in weight_map.values()})
            missing = [p.name for p in files if not p.exists()]
            if missing:
                raise CheckpointError(f"{index}: names files that do not exist: {', '.join(missing)}")
            return files
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder}: no *.safetensors files (only safetensors checkpoints are read; "
                                  f"convert .bin files with transformers first)")
        return files

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def dtype(self, name: str) -> str:
        return self._dtype[name]

    def where(self, name: str) -> str:
        return str(self._file_of[name])

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, end: int = 0) -> Tensor:
        """Tensor `name`, or only its `[start, end)` slice along `dim`."""
        if name not in self._file_of:
            raise CheckpointError(f"{self.folder}: missing tensor {name!r}")
        path = self._file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        piece = self._handles[path].get_slice(name)
        if dim is None:
            return piece[:]
        index = (slice(None),) * dim + (slice(start, end),)
        return piece[index]

    def close(self) -> None:
        self._handles.clear()


class ShardedWriter:
    """Writes named tensors into `model-0000i-of-0000n.safetensors` files of at most `max_bytes` each.

    Files go to `<folder>.partial` until `finish`, which writes the index (when more than one file),
    and renames the folder into place; a crash leaves only the `.partial` folder, never a half checkpoint.
    """

    def __init__(self, folder: str | os.PathLike, *, max_bytes: int = 4 << 30, metadata: Optional[dict] = None):
        self.folder = Path(folder)
        self.partial = self.folder.with_name(self.folder.name + ".partial")
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        self.max_bytes = max_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str], int]] = []

    def add(self, name: str, tensor: Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size

    def _flush(self) -> None:
        path = self.partial / f"part-{len(self._written):05d}.safetensors"
        save_file(self._pending, str(path), metadata=self.metadata)
        self._written.append((path, list(self._pending), self._pending_bytes))
        self._pending, self._pending_bytes = {}, 0

    def extra_file(self, name: str) -> Path:
        """Where to put another file (config, tokenizer) so that it lands with the checkpoint."""
        return self.partial / name

    def finish(self) -> Path:
        if self._pending or not self._written:
            self._flush()
        self._name_files()
        if self.folder.exists():
            shutil.rmtree(self.folder)
        os.replace(self.partial, self.folder)
        return self.folder

    def _name_files(self) -> None:
        count = len(self._written)
        if count == 1:
            self._written[0][0].rename(self.partial / SINGLE_NAME)
            return
        weight_map, total = {}, 0
        for i, (path, names, size) in enumerate(self._written):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            path.rename(self.partial / final)
            total += size
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.partial / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
