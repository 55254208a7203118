"""Token shards of a synthetic language with learnable structure: a seeded first-order Markov chain.

`MarkovLanguage(vocab_size, seed)` draws, for every token, a small set of plausible successors (5 to 20
of them) with Dirichlet weights, plus a small chance of ending the document (the EOS id). Its entropy
is real (a few nats per token, far below log(vocab)), so a model can learn it but not memorise it.
`make_language_shards(folder, language, sizes, seed=...)` writes documents of that chain, packed back
to back (concat packing, segments at document starts) into token shards of the project's format, the
way tests/shardmaker.py does: same chain with another seed = a held-out set of the same language.
`make_bestfit_shards` writes documents of the chain cut to between half and three quarters of a window,
packed by the project's own bestfit packer: often one document per window, so about a fifth of the
stored tokens are EOS padding (plus, on request, windows of a single real token: no real label at all).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from tokenization.format import SHARD_SUFFIX, Manifest, ShardEntry, ShardWriter, encode_sample, write_manifest
from tokenization.packing import bestfit, with_eos

FINGERPRINT = "m" * 64


class MarkovLanguage:
    """A first-order Markov chain over ids 1..vocab_size-1; id `eos_id` (0) ends a document."""

    def __init__(self, vocab_size: int = 300, *, seed: int = 0, successors: tuple[int, int] = (5, 20),
                 alpha: float = 1.0, eos_prob: float = 0.02):
        rng = np.random.default_rng(seed)
        self.vocab_size, self.eos_id = vocab_size, 0
        self.transitions = np.zeros((vocab_size, vocab_size))
        for state in range(vocab_size):
            count = int(rng.integers(successors[0], successors[1] + 1))
            nexts = rng.choice(np.arange(1, vocab_size), size=count, replace=False)
            self.transitions[state, nexts] = rng.dirichlet(np.full(count, alpha)) * (1 - eos_prob)
            self.transitions[state, self.eos_id] = eos_prob
        self.transitions[self.eos_id, self.eos_id] = 0.0  # a document never starts with EOS
        self.transitions[self.eos_id] /= self.transitions[self.eos_id].sum()
        self._cumulative = np.cumsum(self.transitions, axis=1)

    def stream(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """`length` ids of documents back to back, each ending with EOS (the first starts after one)."""
        out = np.empty(length, dtype=np.int64)
        state = self.eos_id
        uniforms = rng.random(length)
        for i in range(length):
            state = min(int(np.searchsorted(self._cumulative[state], uniforms[i], side="right")), self.vocab_size - 1)
            out[i] = state
        return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _segments(window: np.ndarray, eos_id: int) -> np.ndarray:
    """[0, start of every document after an EOS inside the window, end]."""
    starts = (np.flatnonzero(window[:-1] == eos_id) + 1).tolist()
    return np.array([0] + starts + [len(window)], dtype=np.int32)


def make_language_shards(folder, language: MarkovLanguage, sizes, *, seq_len: int = 32, seed: int = 0,
                         prefix: str = "shard") -> Manifest:
    """A folder of len(sizes) shards holding sizes[i] windows of seq_len + 1 ids of `language`, and its manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if language.vocab_size < 65536 else np.uint32
    entries = []
    for shard, count in enumerate(sizes):
        name = f"{prefix}-{shard:06d}{SHARD_SUFFIX}"
        windows = language.stream(rng, count * (seq_len + 1)).reshape(count, seq_len + 1)
        with open(folder / name, "wb") as file, ShardWriter(file) as writer:
            for offset, window in enumerate(windows):
                segments = _segments(window, language.eos_id)
                writer.write(encode_sample(f"{prefix}-{shard:06d}-{offset:06d}", window.astype(dtype), segments))
        entries.append(ShardEntry(name, count, count * (seq_len + 1), _sha256(folder / name)))
    manifest = Manifest(FINGERPRINT, language.vocab_size, language.eos_id, seq_len, "concat", tuple(entries),
                        "tests/languagemaker.py")
    write_manifest(folder, manifest)
    return manifest


def bestfit_windows(language: MarkovLanguage, count: int, *, seq_len: int, seed: int) -> list:
    """`count` (tokens, segments) windows of bestfit packing over documents of the chain, each cut to
    seq_len // 2 .. 3 · seq_len // 4 ids before its EOS (a document that ends sooner keeps its own end)."""
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if language.vocab_size < 65536 else np.uint32
    docs, stream = [], language.stream(rng, 4 * count * (seq_len + 1))
    starts = [0] + (np.flatnonzero(stream == language.eos_id) + 1).tolist()
    for lo, hi in zip(starts, starts[1:]):
        body = stream[lo:hi - 1][: int(rng.integers(seq_len // 2, 3 * seq_len // 4 + 1))]
        if len(body):
            docs.append(with_eos(body, language.eos_id, dtype))
    windows = list(bestfit(docs, seq_len, language.eos_id, dtype))
    if len(windows) < count:
        raise ValueError(f"the chain gave {len(windows)} bestfit windows, fewer than the {count} asked for")
    return windows[:count]


def make_bestfit_shards(folder, language: MarkovLanguage, sizes, *, seq_len: int = 32, seed: int = 0,
                        single_token: tuple = (), prefix: str = "shard") -> Manifest:
    """Like `make_language_shards`, with bestfit windows; the windows at the dataset-wide indices
    `single_token` hold one real token (a document start) and padding only."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    windows = bestfit_windows(language, sum(sizes), seq_len=seq_len, seed=seed)
    for at in single_token:
        tokens = np.full(seq_len + 1, language.eos_id, dtype=windows[at][0].dtype)
        tokens[0] = 1 + at % (language.vocab_size - 1)
        windows[at] = (tokens, np.array([0, 1], dtype=np.int32))
    entries, at = [], 0
    for shard, count in enumerate(sizes):
        name = f"{prefix}-{shard:06d}{SHARD_SUFFIX}"
        with open(folder / name, "wb") as file, ShardWriter(file) as writer:
            for offset in range(count):
                tokens, segments = windows[at + offset]
                writer.write(encode_sample(f"{prefix}-{shard:06d}-{offset:06d}", tokens, segments))
        real = sum(int(windows[at + i][1][-1]) for i in range(count))
        entries.append(ShardEntry(name, count, real, _sha256(folder / name)))
        at += count
    manifest = Manifest(FINGERPRINT, language.vocab_size, language.eos_id, seq_len, "bestfit", tuple(entries),
                        "tests/languagemaker.py")
    write_manifest(folder, manifest)
    return manifest


def markov_teacher(language: MarkovLanguage, folder, *, floor: float = 1e-9):
    """A Hugging Face Llama folder whose next-token distribution is the chain's, exactly (up to `floor`).

    The embedding is a scaled one-hot of the current token (hidden_size ≥ vocab), the attention and MLP
    write nothing to the residual stream, so the final RMSNorm sees √H·one-hot and the output layer's
    column of that token holds log T[token, ·] / √H: a teacher at the language's entropy rate, built,
    not trained. Returns the transformers model.
    """
    import torch
    import transformers

    vocab = language.vocab_size
    hidden = -(-vocab // 64) * 64
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                      rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=language.eos_id)
    model = transformers.LlamaForCausalLM(config).eval()
    log_t = torch.from_numpy(np.log(np.maximum(language.transitions, floor))).float()     # [V, V]: from, to
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.zero_() if "layers." in name and "norm" not in name else param.fill_(1.0)
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden) * hidden ** 0.5)
        head = torch.zeros(vocab, hidden)
        head[:, :vocab] = log_t.t() / hidden ** 0.5
        model.lm_head.weight.copy_(head)
    model.save_pretrained(folder)
    return model
