"""Reading and writing folders of safetensors files: lazily, slice by slice, and atomically.

`SafetensorsFolder` opens a Hugging Face-style folder (one `model.safetensors`, a sharded set with
`model.safetensors.index.json`, or loose `*.safetensors`) and reads the header of every file, so
names, shapes and dtypes are known without touching a weight; `read(name, dim, start, end)` then
reads only that slice through safetensors' memory map. `ShardedWriter` writes tensors one at a time
into files of bounded size plus the index, into a temporary folder renamed into place at the end.

Design choice: slices through `safe_open(...).get_slice`, so a TP rank of a large teacher touches
only its own rows or columns; the cost is one small read per slice (fused QKV reads head by head).
The writer streams: huggingface_hub's `save_torch_state_dict` wants the whole state dict in memory
(a 70B model's is 140 GB in bf16 on one process), so we keep our own file writing, but the split,
the file names and the index are huggingface_hub's (`split_torch_state_dict_into_shards`, planned
over meta tensors at the end): the writer groups tensors by the same greedy rule as they arrive, and
`finish` renames each file to the name the plan gives its tensors. The cost: the grouping rule is
restated here, and `finish` refuses (a bug, not bad input) if the plan ever groups differently.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from huggingface_hub import constants, split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from pipeline.model.errors import CheckpointError

INDEX_NAME = constants.SAFETENSORS_INDEX_FILE  # model.safetensors.index.json
SINGLE_NAME = constants.SAFETENSORS_SINGLE_FILE  # model.safetensors


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
    """Writes named tensors into files of at most `max_bytes` each (a larger tensor gets a file of its own),
    named and indexed as huggingface_hub names them (`model.safetensors`, or `model-0000i-of-0000n.safetensors`
    with `model.safetensors.index.json`).

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
        self._written: list[tuple[Path, list[str]]] = []
        self._meta: dict[str, Tensor] = {}  # every tensor's shape and dtype, in arrival order, for the plan

    def add(self, name: str, tensor: Tensor) -> None:
        """huggingface_hub's greedy rule, streamed: a tensor over `max_bytes` is written alone at once (the
        open file stays open), else the open file is written first when this tensor would overflow it."""
        tensor = tensor.detach().to("cpu").contiguous()
        self._meta[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        size = tensor.numel() * tensor.element_size()
        if size > self.max_bytes:
            self._write({name: tensor})
            return
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._write(self._pending)
            self._pending, self._pending_bytes = {}, 0
        self._pending[name] = tensor
        self._pending_bytes += size

    def _write(self, tensors: dict[str, Tensor]) -> None:
        path = self.partial / f"part-{len(self._written):05d}.safetensors"
        save_file(tensors, str(path), metadata=self.metadata)
        self._written.append((path, list(tensors)))

    def extra_file(self, name: str) -> Path:
        """Where to put another file (config, tokenizer) so that it lands with the checkpoint."""
        return self.partial / name

    def finish(self) -> Path:
        if self._pending or not self._written:
            self._write(self._pending)
        self._name_files()
        if self.folder.exists():
            shutil.rmtree(self.folder)
        os.replace(self.partial, self.folder)
        return self.folder

    def _name_files(self) -> None:
        if not self._meta:  # no tensors: one empty file
            self._written[0][0].rename(self.partial / SINGLE_NAME)
            return
        plan = split_torch_state_dict_into_shards(self._meta, max_shard_size=self.max_bytes)
        for path, names in self._written:
            final = plan.tensor_to_filename[names[0]]
            if sorted(plan.filename_to_tensors[final]) != sorted(names):
                raise RuntimeError(f"{self.partial}: huggingface_hub groups {final} differently from the writer "
                                   f"({sorted(plan.filename_to_tensors[final])[:3]}... against {sorted(names)[:3]}...)")
            path.rename(self.partial / final)
        if plan.is_sharded:
            index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
            (self.partial / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
