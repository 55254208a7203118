"""The reader's failures: sidecar join mismatches and corrupt input, each naming the shard (and key)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import ResumableLoader, Source, TokenShardDataset
from tests.shardmaker import make_sidecar, make_token_shards
from tests.tokenization_corpus import write_members
from tokenization.format import ShardFormatError

SIZES = [5, 8, 3]


def build(folder, sidecars=None, **kw):
    source = Source(str(folder), 1.0, sidecars or {})
    return TokenShardDataset(source, micro_batch=2, dp_rank=0, dp_size=1, seed=0, shuffle_window=4, **kw)


def read_all(dataset):
    return list(dataset) if dataset.max_epochs else [dataset.batch(s) for s in range(dataset.steps_per_epoch)]


@pytest.fixture
def tokens(tmp_path):
    return tmp_path / "tok", make_token_shards(tmp_path / "tok", SIZES)


def test_sidecar_join_carries_members_by_key(tokens, tmp_path):
    folder, manifest = tokens
    make_sidecar(tmp_path / "side", manifest)
    batches = list(build(folder, {"teacher": str(tmp_path / "side")}, max_epochs=1))
    for batch in batches:
        for row, side in enumerate(batch["sidecars"]):
            target = np.load(io.BytesIO(side["teacher.target.npy"]))
            assert target.tolist() == batch["tokens"][row, :2].tolist()
    restored = ResumableLoader(build(folder, {"teacher": str(tmp_path / "side")}, max_epochs=1), num_workers=2)
    restored.load_state_dict(restored.state_dict() | {"next_step": 2})
    assert [b["sidecars"] for b in restored] == [b["sidecars"] for b in batches[2:]]


def test_sidecar_errors_name_shard_and_key(tokens, tmp_path):
    folder, manifest = tokens
    make_sidecar(tmp_path / "missing", manifest, skip_shard=1)
    with pytest.raises(ShardFormatError, match="no shard for token shard shard-000001.tar"):
        build(folder, {"t": str(tmp_path / "missing")})
    foreign = {e.name: e.sha256 for e in manifest.shards} | {"shard-000002.tar.gz": "0" * 64}
    make_sidecar(tmp_path / "foreign", manifest, sources=foreign)
    with pytest.raises(ShardFormatError, match="made from token shard shard-000002.tar.gz with sha256 0000"):
        build(folder, {"t": str(tmp_path / "foreign")})
    make_sidecar(tmp_path / "tokenizer", manifest, fingerprint="e" * 64)
    with pytest.raises(ShardFormatError, match="tokenizer fingerprint eeee"):
        build(folder, {"t": str(tmp_path / "tokenizer")})

    def rename(stem, offset):
        return f"{stem}-{offset:06d}" if (stem, offset) != ("shard-000001", 6) else f"{stem}-other"
    make_sidecar(tmp_path / "keys", manifest, key_fn=rename)
    with pytest.raises(ShardFormatError, match=r"shard-000001.tar.*'shard-000001-other'.*'shard-000001-000006'"):
        read_all(build(folder, {"t": str(tmp_path / "keys")}, max_epochs=1))


def test_truncated_shard_names_the_shard(tokens):
    folder, _ = tokens
    path = folder / "shard-000001.tar.gz"
    data = path.read_bytes()
    # gzip's length and CRC trailer: a cut anywhere, even one that leaves every sample readable, is caught
    for cut in (len(data) // 3, len(data) - 8, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ShardFormatError, match="shard-000001.tar.gz.*truncated or corrupt"):
            read_all(build(folder, max_epochs=1))


def test_bad_members_and_count_mismatch_name_the_shard(tokens, tmp_path):
    folder, manifest = tokens
    path = folder / "shard-000002.tar.gz"
    members = [(f"shard-000002-{offset:06d}.{member}", _member(manifest, member))
               for offset in range(3) for member in ("tokens.npy", "segments.npy")]
    for damaged, message in [
            (members[:2] + [(members[2][0], b"not an npy file")] + members[3:],
             "'shard-000002-000001' has an undecodable"),
            (members[:5], "sample 'shard-000002-000002' has no member 'segments.npy'"),
            (members[:1] + members[:1] + members[1:], "sample 'shard-000002-000000' has member "
                                                      "'shard-000002-000000.tokens.npy' twice"),
            (members[:2] + [("shard-000002-000001", b"")] + members[2:], "member 'shard-000002-000001' has no KEY")]:
        write_members(path, damaged)
        with pytest.raises(ShardFormatError, match=f"shard-000002.tar.gz.*{message}"):
            read_all(build(folder, max_epochs=1))
    raw = json.loads((folder / "manifest.json").read_text())
    raw["shards"][0]["samples"] = 6
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ShardFormatError, match="shard-000000.tar.gz.*ends after 5 samples"):
        build(folder, shuffle=False).batch(2)
    raw["shards"][0]["samples"] = 4
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ShardFormatError, match="shard-000000.tar.gz.*past the manifest's 4 samples"):
        build(folder, shuffle=False).batch(0)


def _member(manifest, member):
    buffer = io.BytesIO()
    array = np.zeros(manifest.seq_len + 1, np.uint16) if member == "tokens.npy" else np.array([0, 9], np.int32)
    np.save(buffer, array)
    return buffer.getvalue()


def test_missing_shard_file_names_the_shard(tokens, tmp_path):
    folder, manifest = tokens
    make_sidecar(tmp_path / "side", manifest)
    (tmp_path / "side" / "shard-000002.tar").unlink()
    with pytest.raises(ShardFormatError, match="sidecar .*shard-000002.tar.*cannot open"):
        read_all(build(folder, {"t": str(tmp_path / "side")}, max_epochs=1))
    (folder / "shard-000001.tar.gz").unlink()
    with pytest.raises(ShardFormatError, match="shard shard-000001.tar.gz .*cannot open"):
        read_all(build(folder, max_epochs=1))


def test_checksum_mismatch_when_verifying(tokens):
    folder, _ = tokens
    path = folder / "shard-000000.tar.gz"
    data = bytearray(path.read_bytes())
    data[9] ^= 1  # gzip's operating-system byte, outside its CRC: the shard still reads, only the sha256 can tell
    path.write_bytes(bytes(data))
    read_all(build(folder, max_epochs=1))
    with pytest.raises(ShardFormatError, match="shard-000000.tar.gz.*sha256 .* does not match"):
        read_all(build(folder, max_epochs=1, verify=True))


def test_unknown_manifest_version(tokens):
    folder, _ = tokens
    raw = json.loads((folder / "manifest.json").read_text())
    raw["format_version"] = 99
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ShardFormatError, match=f"{folder}: its shards are format_version 99, this version reads "
                                               f"format_version 2 only; it was written by a newer version"):
        build(folder)
    raw["format_version"] = 1
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ShardFormatError, match=f"{folder}: its shards are format_version 1, this version reads "
                                               f"format_version 2 only; re-run `distill tokenize shard`"):
        build(folder)
    with pytest.raises(ShardFormatError, match="manifest.json: missing"):
        build(Path(folder) / "nowhere")


def test_blend_of_different_tokenizers_is_refused(tokens, tmp_path):
    folder, _ = tokens
    make_token_shards(tmp_path / "other", [4], fingerprint="e" * 64)
    with pytest.raises(ShardFormatError, match="other: tokenizer eeee.*blended sources must share"):
        TokenShardDataset([str(folder), str(tmp_path / "other")], micro_batch=2, dp_rank=0, dp_size=1, seed=0)
