"""verify-shards: a clean folder passes; each kind of damage is reported naming the file; the CLI's exit codes."""
from __future__ import annotations

import json
import shutil

import pytest

from pipeline.cli import main
from tests.tokenization_corpus import make_documents, write_blocks, write_members
from tokenization import format as fmt
from tokenization.shards import shard_corpus
from tokenization.tokenizer import train_tokenizer
from tokenization.verify import verify_shards


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    for i in range(2):
        write_blocks(root / f"in{i}.txt", make_documents(80, seed=i))
    train_tokenizer([root / "in0.txt"], 500, out_path=root / "tok.json", txt_mode="blocks")
    shard_corpus([str(root / "in*.txt")], root / "tok.json", root / "out", seq_len=32, txt_mode="blocks",
                 shard_max_samples=10, progress=False)
    return root


@pytest.fixture
def shards(clean, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(clean / "out", out)
    return out


def test_clean_folder_passes_and_the_cli_says_so(shards, capsys):
    assert verify_shards(shards) == []
    assert main(["verify-shards", str(shards)]) == 0
    assert capsys.readouterr().out.startswith(f"{shards}: ok (")


def test_deleted_shard_and_unlisted_shard(shards, capsys):
    (shards / "00000-00001.tar.gz").rename(shards / "stray.tar.gz")
    assert verify_shards(shards) == [f"{shards / 'stray.tar.gz'}: shard not listed in the manifest",
                                     f"{shards / '00000-00001.tar.gz'}: missing (listed in the manifest)"]
    assert main(["verify-shards", str(shards)]) == 1
    assert "00000-00001.tar.gz: missing" in capsys.readouterr().out


def test_truncated_shard(shards):
    path = shards / "00001-00000.tar.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    problems = verify_shards(shards)
    assert any(p.startswith(f"{path}: sha256 differs") for p in problems)
    assert any(p.startswith(f"{path}: truncated or corrupt") for p in problems)


@pytest.mark.parametrize("cut", [4, 8])
def test_shard_cut_inside_the_gzip_trailer(shards, cut):
    """Every sample is still readable: only gzip's length and CRC trailer tells the file is cut."""
    path = shards / "00001-00000.tar.gz"
    path.write_bytes(path.read_bytes()[:-cut])
    problems = verify_shards(shards)
    assert [p.split(" (")[0] for p in problems if not p.startswith(f"{path}: sha256")] == \
        [f"{path}: truncated or corrupt"]


def test_flipped_header_byte_is_only_a_sha256_mismatch(shards):
    path = shards / "00000-00002.tar.gz"
    data = bytearray(path.read_bytes())
    data[9] ^= 1  # gzip's operating-system byte: outside the CRC, the shard still reads
    path.write_bytes(bytes(data))
    expected = fmt.read_manifest(shards).shards[2].sha256[:16]
    assert verify_shards(shards) == [f"{path}: sha256 differs from the manifest's {expected}…"]


def test_count_mismatch_duplicate_key_and_undecodable_sample(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][0]["samples"] += 1
    manifest["shards"][1]["tokens"] -= 1
    (shards / "manifest.json").write_text(json.dumps(manifest))
    import webdataset as wds

    copy = shards / "00001-00000.tar.gz"
    sample = next(iter(wds.WebDataset(str(shards / "00000-00000.tar.gz"), shardshuffle=False)))
    with open(copy, "wb") as file, fmt.ShardWriter(file) as writer:
        writer.write({"__key__": sample["__key__"], "tokens.npy": sample["tokens.npy"], "segments.npy": b"junk"})
    problems = verify_shards(shards)
    assert any("00000-00000.tar.gz: 10 readable samples, the manifest lists 11" in p for p in problems)
    assert any("00000-00001.tar.gz: " in p and "tokens, the manifest lists" in p for p in problems)
    assert any(f"00001-00000.tar.gz: duplicate key {sample['__key__']!r}" in p for p in problems)
    assert any("00001-00000.tar.gz: sample" in p and "undecodable member" in p for p in problems)


def test_member_twice_in_a_sample_names_shard_and_key(shards):
    path = shards / "00001-00000.tar.gz"
    key = "00001-000000000"
    write_members(path, [(f"{key}.tokens.npy", b"a"), (f"{key}.tokens.npy", b"b"), (f"{key}.segments.npy", b"c")])
    problems = [p for p in verify_shards(shards) if p.startswith(f"{path}: ") and "sha256" not in p]
    assert problems == [f"{path}: sample {key!r} has member '{key}.tokens.npy' twice"]


def test_old_format_folder_is_refused_with_what_to_do(shards, capsys):
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["format_version"] = 1
    (shards / "manifest.json").write_text(json.dumps(manifest))
    assert verify_shards(shards) == [f"{shards}: its shards are format_version 1, this version reads format_version "
                                     f"2 only; re-run `distill tokenize shard` (same inputs and options) into a fresh "
                                     f"folder to rewrite it"]
    assert main(["verify-shards", str(shards)]) != 0


def test_unreadable_manifest_is_one_problem_and_missing_folder_exits_2(shards, tmp_path, capsys):
    (shards / "manifest.json").write_text("{")
    with pytest.raises(json.JSONDecodeError) as parsed:
        json.loads("{")
    assert verify_shards(shards) == [f"{shards / 'manifest.json'}: not valid JSON ({parsed.value})"]
    assert main(["verify-shards", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("distill: error: ")
