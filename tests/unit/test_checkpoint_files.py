"""ShardedWriter against huggingface_hub's own writer: the same files, names, index and tensors, written atomically."""
from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file

from pipeline.model.checkpoint_files import INDEX_NAME, ShardedWriter


def _tensors(sizes: list[int]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"layer.{i}.weight": torch.randn(n, generator=gen) for i, n in enumerate(sizes)}


def _folder(path) -> dict[str, dict[str, torch.Tensor]]:
    return {file.name: load_file(file) for file in sorted(path.glob("*.safetensors"))}


@pytest.mark.parametrize("sizes", [
    [10, 20, 30],                       # fits one file: model.safetensors, no index
    [100, 100, 100, 30, 200, 50],       # several files
    [100, 1000, 30, 60, 1000, 10],      # tensors over the limit get files of their own between the others
])
def test_writer_matches_huggingface_hubs_split(tmp_path, sizes):
    tensors, max_bytes = _tensors(sizes), 1000  # float32: 4 bytes an element
    writer = ShardedWriter(tmp_path / "ours", max_bytes=max_bytes)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
        assert not (tmp_path / "ours").exists()  # nothing at the final path before finish
    writer.finish()
    assert not (tmp_path / "ours.partial").exists()
    (tmp_path / "hub").mkdir()
    save_torch_state_dict(tensors, tmp_path / "hub", max_shard_size=max_bytes)
    ours, hub = _folder(tmp_path / "ours"), _folder(tmp_path / "hub")
    assert sorted(ours) == sorted(hub) and len(ours) >= 1
    for file in hub:
        assert ours[file].keys() == hub[file].keys(), file
        assert all(torch.equal(ours[file][name], hub[file][name]) for name in hub[file])
    assert (tmp_path / "ours" / INDEX_NAME).exists() == (tmp_path / "hub" / INDEX_NAME).exists() == (len(hub) > 1)
    if len(hub) > 1:
        assert json.loads((tmp_path / "ours" / INDEX_NAME).read_text()) == \
            json.loads((tmp_path / "hub" / INDEX_NAME).read_text())
