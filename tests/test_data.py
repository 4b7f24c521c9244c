"""Data: sources, errors that name the file, packing with EOS, a split by document."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_tokenizer, write_corpus
from ouroboros_lm.data import BlockSampler, DataError, build_corpus, load_documents, pack, split_documents, tokenize_documents


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


def test_eos_between_documents_and_packing():
    tok = tiny_tokenizer()
    docs = load_documents_from_texts(["ab", "cde"])
    stream = tokenize_documents(docs, tok)
    eos = tok.eos_token_id
    assert stream.tolist() == tok("ab")["input_ids"] + [eos] + tok("cde")["input_ids"] + [eos]
    blocks = pack(torch.arange(10), 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(DataError, match="less than one block of seq_len=16"):
        pack(torch.arange(10), 16, "the held-out split")


def load_documents_from_texts(texts):
    from ouroboros_lm.data import Document

    return [Document(f"d{i}", t) for i, t in enumerate(texts)]


def test_split_is_by_document_and_deterministic(tmp_path):
    docs = load_documents([str(write_corpus(tmp_path / "c", n_docs=20))])
    train, held = split_documents(docs, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert not {d.name for d in train} & {d.name for d in held}
    again = split_documents(docs, 0.25, seed=3)
    assert [d.name for d in again[1]] == [d.name for d in held]
    assert [d.name for d in split_documents(docs, 0.25, seed=4)[1]] != [d.name for d in held]
    with pytest.raises(DataError, match="one side would be empty"):
        split_documents(docs[:1], 0.5, seed=0)


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
