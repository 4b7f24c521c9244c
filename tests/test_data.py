"""Data: sources, errors that name the file, packing with EOS, a split by document."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from conftest import tiny_tokenizer, write_corpus
import numpy as np

from ouroboros_lm.data import BlockSampler, DataError, build_corpus, load_documents
from ouroboros_lm.prepare import document_key, held_out, prepare
from ouroboros_lm.shards import Blocks


def test_sources_files_folders_globs_jsonl_parquet(tmp_path):
    write_corpus(tmp_path / "a", n_docs=3)
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    assert len(load_documents([str(tmp_path / "a")])) == 3
    assert len(load_documents([str(tmp_path / "a" / "doc_00*.txt")])) == 3
    docs = load_documents([str(tmp_path / "b.jsonl")], text_field="body")
    assert [d.text for d in docs] == ["one", "two"]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["alpha", "", "beta"]}), tmp_path / "c.parquet")
    assert [d.text for d in load_documents([str(tmp_path / "c.parquet")])] == ["alpha", "beta"]


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda p: (p / "empty").mkdir(), "holds no text files"),
        (lambda p: (p / "e.txt").write_text("   \n"), "is empty"),
        (lambda p: (p / "b.txt").write_bytes(b"abc\x00\x01\x02"), "looks binary"),
        (lambda p: (p / "l.txt").write_bytes(b"caf\xe9 au lait"), "not valid UTF-8"),
        (lambda p: (p / "j.jsonl").write_text('{"other": 1}\n'), "has no string field 'text'"),
        (lambda p: (p / "k.jsonl").write_text("{not json\n"), "is not valid JSON"),
    ],
)
def test_bad_data_names_the_file(tmp_path, setup, message):
    setup(tmp_path)
    target = next(tmp_path.iterdir())
    with pytest.raises(DataError, match=message) as err:
        load_documents([str(target)])
    assert target.name in str(err.value)


def test_missing_source_and_empty_glob(tmp_path):
    with pytest.raises(DataError, match="data source not found"):
        load_documents([str(tmp_path / "nope.txt")])
    with pytest.raises(DataError, match="no files match"):
        load_documents([str(tmp_path / "*.txt")])


def test_eos_between_documents_and_packing(tmp_path):
    tok = tiny_tokenizer()
    (tmp_path / "a.txt").write_text("ab")
    (tmp_path / "b.txt").write_text("cde")
    prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], tmp_path / "p", tok, rule="none", progress=False)
    eos = tok.eos_token_id
    stream = np.fromfile(tmp_path / "p" / "train-00000.bin", dtype="<u2").tolist()
    assert stream == tok("ab")["input_ids"] + [eos] + tok("cde")["input_ids"] + [eos]
    blocks = Blocks([np.arange(10)], 4, (0, 9))
    assert blocks[:].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and blocks[:].dtype == torch.int64
    assert Blocks([np.arange(10), np.arange(10, 15)], 4, (0, 14))[[2, 0]].tolist() == [[10, 11, 12, 13], [0, 1, 2, 3]]
    with pytest.raises(DataError, match="less than one block of seq_len=16"):
        Blocks([np.arange(10)], 16, (0, 9), "the held-out split")


def test_split_is_by_document_and_deterministic(tmp_path):
    names = [f"doc_{i:03d}.txt" for i in range(20)]
    held = held_out(np.array([document_key(3, n) for n in names], dtype=np.uint64), 0.25)
    assert held.sum() == 5
    ranked = sorted(names, key=lambda n: hashlib.sha256(f"3:{n}".encode()).hexdigest())  # the rule, written out
    assert {n for n, h in zip(names, held) if h} == set(ranked[:5])
    other = held_out(np.array([document_key(4, n) for n in names], dtype=np.uint64), 0.25)
    assert other.tolist() != held.tolist()
    with pytest.raises(DataError, match="one side would be empty"):
        held_out(np.array([document_key(0, "x")], dtype=np.uint64), 0.5)


def test_corpus_held_out_never_shares_text_with_training(tmp_path):
    tok = tiny_tokenizer()
    corpus = build_corpus([str(write_corpus(tmp_path / "c", n_docs=10))], tok, seq_len=32, heldout_fraction=0.2)
    assert corpus.n_train_docs == 8 and corpus.n_heldout_docs == 2
    assert corpus.train.shape[1] == 32 and corpus.heldout.shape[0] > 0
    with pytest.raises(DataError, match="both --data and --heldout"):
        build_corpus([str(tmp_path / "c")], tok, 32, heldout=[str(tmp_path / "c" / "doc_000.txt")])
    with pytest.raises(DataError, match="held-out split has .* less than one block"):
        (tmp_path / "tiny.txt").write_text("short")
        build_corpus([str(tmp_path / "c")], tok, 32, heldout=[str(tmp_path / "tiny.txt")])


def test_block_sampler_is_stateless_and_splits_ranks():
    s = BlockSampler(10, seed=1)
    first = [s.batch(i, 2).tolist() for i in range(5)]
    assert sorted(sum(first, [])) == list(range(10))  # one epoch covers every block once
    assert BlockSampler(10, seed=1).batch(3, 2).tolist() == first[3]
    r0, r1 = s.batch(0, 2, rank=0, world_size=2), s.batch(0, 2, rank=1, world_size=2)
    assert not set(r0.tolist()) & set(r1.tolist())


MEASURE = """
import json, resource, sys
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from ouroboros_lm.data import build_corpus
vocab = {w: i for i, w in enumerate(["ba", "ko", "ri", "tu", "<unk>", "<eos>"])}
tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
corpus = build_corpus([sys.argv[1]], tok, 64, heldout=[sys.argv[2]])
print(json.dumps({"grew_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
                  "tokens": corpus.train.shape[0] * 64}))
"""


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_reading_a_20_mb_single_line_file_takes_memory_bounded_by_what_is_read(tmp_path, kind):
    """A 20 MB text file on one line (and a .jsonl whose one line holds 20 MB of text) is read,
    tokenized and packed growing memory by less than the file's size (it took ~100x before)."""
    import os
    import subprocess
    import sys

    text = " ".join(["ba ko ri tu"] * 1_700_000)[:20_000_000]
    (tmp_path / f"big.{kind}").write_text(json.dumps({"text": text}) if kind == "jsonl" else text)
    (tmp_path / "held.txt").write_text("ba ko " * 200)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OUROBOROS_DATA_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / f"big.{kind}"), str(tmp_path / "held.txt")],
                         env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["tokens"] == (text.count(" ") + 2) // 64 * 64  # every word of it once, and EOS
    assert got["grew_mb"] < 20, got


def test_the_held_out_split_does_not_depend_on_where_the_corpus_lives(tmp_path, monkeypatch):
    """Documents are named relative to their source: the same corpus in another folder, or named by a relative
    path, holds out the same documents (issue #35)."""
    import shutil

    from ouroboros_lm.reading import iter_documents

    a = write_corpus(tmp_path / "one" / "corpus", n_docs=10)
    b = tmp_path / "elsewhere" / "deeper" / "corpus"
    shutil.copytree(a, b)
    names = lambda src: [name for _, name, _ in iter_documents([src])]  # noqa: E731
    assert names(str(a)) == names(str(b)) == [f"doc_{i:03d}.txt" for i in range(10)]
    assert names(str(a / "doc_00*.txt")) == names(str(b / "doc_00*.txt"))
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert names("deeper/corpus") == names(str(a))
    assert names(str(a / "doc_003.txt")) == ["doc_003.txt"]
