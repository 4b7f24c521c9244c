"""Prepared folders: token shards equal to tokenizing the text whole, the same whatever the number
of processes, resumable, refused when they do not match; training on one gives the losses that
training on the text itself gives; mixtures by weight."""
from __future__ import annotations

import filecmp
import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import save_tiny_base, tiny_base, tiny_tokenizer, write_corpus, TINY_SPLIT
from ouroboros_lm import OuroborosConfig, OuroborosModel, TrainConfig, train
from ouroboros_lm.cli import main
from ouroboros_lm.data import Corpus, DataError, build_corpus, parse_item
from ouroboros_lm.prepare import PrepareConfig, SplitWriter, prepare
from ouroboros_lm.reading import PIECE_CHARS, iter_documents
from ouroboros_lm.shards import MANIFEST, Prepared


def tokens_of(tok, texts):
    """The reference: each text tokenized whole by the tokenizer's own call, EOS after each."""
    out = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        out += ids + [tok.eos_token_id]
    return out


def held_names(names, fraction, seed):
    """Today's rule, written out: rank by sha256(f"{seed}:{name}"), hold out the first ceil(f * n)."""
    ranked = sorted(names, key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest())
    return set(ranked[: math.ceil(fraction * len(names))])


def shard_tokens(folder, split):
    m = json.loads((folder / MANIFEST).read_text())
    return np.concatenate([np.fromfile(folder / f"{s['name']}.bin", dtype=m["dtype"])
                           for s in m["splits"][split]["shards"]]).tolist()


def test_shards_hold_the_documents_tokenized_whole_with_the_split_by_document(tmp_path):
    tok = tiny_tokenizer()
    src = write_corpus(tmp_path / "c", n_docs=20)
    m = prepare([str(src)], tmp_path / "p", tok, PrepareConfig(heldout_fraction=0.25, seed=3, shard_tokens=700),
                progress=False)
    files = sorted(src.glob("*.txt"))
    held = held_names([f.name for f in files], 0.25, 3)  # documents are named relative to their source folder
    assert (tmp_path / "p" / "heldout-documents.txt").read_text().split() == [f.name for f in files if f.name in held]
    for split, keep in (("train", lambda f: f.name not in held), ("heldout", lambda f: f.name in held)):
        expected = tokens_of(tok, [f.read_text() for f in files if keep(f)])
        assert shard_tokens(tmp_path / "p", split) == expected
        assert m["splits"][split]["tokens"] == len(expected)
    assert len(m["splits"]["train"]["shards"]) > 2 and m["dtype"] == "<u2" and m["eos"] == tok.eos_token_id
    assert m["sources"][0]["tokens"] == {"train": m["splits"]["train"]["tokens"], "heldout": m["splits"]["heldout"]["tokens"]}
    idx = np.fromfile(tmp_path / "p" / "train-00000.idx", dtype="<i8")
    first = shard_tokens(tmp_path / "p", "train")[: idx[-1]]
    assert [first[i - 1] for i in idx] == [tok.eos_token_id] * len(idx)  # each document ends with EOS


def test_long_single_line_text_is_cut_where_tokenization_is_unchanged(tmp_path):
    tok = tiny_tokenizer()
    words = ["ba", "kori", "tu,", "me.", "(sa)", "lo"]
    text = " ".join(words[i % 6] for i in range(3 * PIECE_CHARS // 3)) + "  x\n"
    (tmp_path / "long.txt").write_text(text)
    pieces = list(next(iter_documents([str(tmp_path / "long.txt")]))[2])
    assert len(pieces) > 1 and "".join(pieces) == text
    prepare([str(tmp_path / "long.txt")], tmp_path / "p", tok, PrepareConfig(), rule="none", progress=False)
    assert shard_tokens(tmp_path / "p", "train") == tokens_of(tok, [text])


def test_the_shards_are_the_same_whatever_the_number_of_workers(tmp_path):
    tok = tiny_tokenizer()
    src = write_corpus(tmp_path / "c", n_docs=30, words=400)
    for w in (1, 3):
        prepare([str(src)], tmp_path / f"w{w}", tok, PrepareConfig(workers=w, shard_tokens=3000), progress=False)
    names = sorted(f for f in os.listdir(tmp_path / "w1") if not f.startswith("."))
    assert names == sorted(f for f in os.listdir(tmp_path / "w3") if not f.startswith("."))
    assert len([n for n in names if n.endswith(".bin")]) > 3
    assert all(filecmp.cmp(tmp_path / "w1" / n, tmp_path / "w3" / n, shallow=False) for n in names)


def test_an_interrupted_prepare_resumes_after_its_complete_shards_or_starts_clean(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    src = write_corpus(tmp_path / "c", n_docs=16)
    pc = PrepareConfig(shard_tokens=600)
    prepare([str(src)], tmp_path / "clean", tok, pc, progress=False)
    closes, real_close = [], SplitWriter.close

    def close_then_die(self):
        done = real_close(self)
        closes.append(self.name)
        if len(closes) == 3:
            raise KeyboardInterrupt
        return done

    monkeypatch.setattr(SplitWriter, "close", close_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(src)], tmp_path / "p", tok, pc, progress=False)
    assert not (tmp_path / "p" / MANIFEST).exists()  # never a manifest pointing at a partial shard
    kept = (tmp_path / "p" / "train-00000.bin").stat().st_ino
    monkeypatch.setattr(SplitWriter, "close", real_close)
    prepare([str(src)], tmp_path / "p", tok, pc, progress=False)
    assert (tmp_path / "p" / "train-00000.bin").stat().st_ino == kept  # resumed, not rewritten
    names = sorted(f for f in os.listdir(tmp_path / "clean") if not f.startswith("."))
    assert names == sorted(f for f in os.listdir(tmp_path / "p") if not f.startswith("."))
    assert all(filecmp.cmp(tmp_path / "clean" / n, tmp_path / "p" / n, shallow=False) for n in names)
    # other settings over an interrupted folder: it starts clean
    (tmp_path / "p" / MANIFEST).unlink()
    (tmp_path / "p" / ".prepare-state.json").write_text(json.dumps({"key": "other", "splits": {}}))
    m = prepare([str(src)], tmp_path / "p", tok, PrepareConfig(shard_tokens=10**6), progress=False)
    assert len(m["splits"]["train"]["shards"]) == 1 and not (tmp_path / "p" / "train-00001.bin").exists()
    with pytest.raises(DataError, match="prepared from other sources or settings"):
        prepare([str(src)], tmp_path / "p", tok, pc, progress=False)


def tiny_model(seed=0):
    return OuroborosModel.from_base(tiny_base("llama"), OuroborosConfig(**TINY_SPLIT, init_seed=seed))


def reference_corpus(tok, src, seq_len, fraction, seed):
    """The corpus built the way it was before prepared folders: every document in memory."""
    files = sorted(src.glob("*.txt"))
    held = held_names([f.name for f in files], fraction, seed)  # named relative to their source folder

    def blocks(keep):
        ids = torch.tensor(tokens_of(tok, [f.read_text() for f in files if keep(f.name)]))
        return ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)

    return Corpus(blocks(lambda f: f not in held), blocks(lambda f: f in held), len(files) - len(held), len(held), seq_len)


def losses(run):
    return [(r["step"], r.get("loss"), r.get("heldout_loss")) for r in map(json.loads, open(run / "metrics.jsonl"))]


def test_training_on_a_prepared_folder_gives_the_losses_of_training_on_the_text(tmp_path, one_thread):
    tok = tiny_tokenizer()
    src = write_corpus(tmp_path / "c", n_docs=12)
    prepare([str(src)], tmp_path / "p", tok, PrepareConfig(heldout_fraction=0.2, workers=2), progress=False)
    tc = TrainConfig(steps=6, batch_size=2, lr=1e-2, warmup_steps=1, log_every=1, eval_every=3, eval_blocks=2,
                     save_every=100, depths=(1, 2), progress=False)
    prepared = build_corpus([str(tmp_path / "p")], tok, 32)
    reference = reference_corpus(tok, src, 32, 0.2, 0)
    assert torch.equal(prepared.train[:], reference.train) and torch.equal(prepared.heldout[:], reference.heldout)
    train(tiny_model(), prepared, tmp_path / "a", tc)
    train(tiny_model(), reference, tmp_path / "b", tc)
    train(tiny_model(), build_corpus([str(src)], tok, 32, heldout_fraction=0.2), tmp_path / "c_run", tc)
    assert losses(tmp_path / "a") == losses(tmp_path / "b") == losses(tmp_path / "c_run")
    assert len(losses(tmp_path / "a")) == 8


def mixture(tmp_path, tok, weights):
    items = []
    for i, (n_docs, w) in enumerate(zip((2, 6, 20), weights)):
        items.append(f"s{i}={write_corpus(tmp_path / f's{i}', n_docs=n_docs, seed=i)}" + (f":{w}" if w else ""))
    return build_corpus(items, tok, 16, heldout=[str(write_corpus(tmp_path / "held", n_docs=2, seed=9))])


def test_a_mixture_draws_each_source_in_its_weight_over_1000_steps(tmp_path):
    corpus = mixture(tmp_path, tiny_tokenizer(), (0.5, 0.3, 0.2))
    sizes = [p.blocks for p in corpus.parts]
    assert sizes[2] > 8 * sizes[0]  # the weights, not the sizes, decide
    sampler, starts = corpus.sampler(seed=1), np.cumsum([0] + sizes)
    drawn = np.concatenate([sampler.batch(i, 4).numpy() for i in range(1000)])
    share = np.bincount(np.searchsorted(starts, drawn, side="right") - 1, minlength=3) / drawn.size
    assert np.abs(share - [0.5, 0.3, 0.2]).max() < 0.02
    assert corpus.tokens_seen(4000, seed=1) == {f"tokens_seen/s{i}": int(share[i] * 4000) * 16 for i in range(3)}
    # stateless: a fresh sampler (a resumed run) gives the same batch; ranks take disjoint slices
    assert corpus.sampler(seed=1).batch(617, 4).tolist() == drawn[617 * 4: 618 * 4].tolist()
    r0, r1 = sampler.batch(5, 4, rank=0, world_size=2), sampler.batch(5, 4, rank=1, world_size=2)
    assert r0.tolist() + r1.tolist() == drawn[40:48].tolist()
    by_size = mixture(tmp_path / "x", tiny_tokenizer(), (None, None, None))
    assert [p.weight for p in by_size.parts] == [float(n) for n in sizes]


def test_mixture_items_and_their_refusals(tmp_path):
    assert parse_item("web=hf:owner/name:train") == ("web", "hf:owner/name:train", None)
    assert parse_item("a=/x/y:0.25") == ("a", "/x/y", 0.25)
    assert parse_item("/x/y:0.25") == (None, "/x/y:0.25", None)
    tok = tiny_tokenizer()
    a, b = write_corpus(tmp_path / "a", n_docs=4), write_corpus(tmp_path / "b", n_docs=4, seed=1)
    with pytest.raises(DataError, match="give every source a weight"):
        build_corpus([f"a={a}:1", f"b={b}"], tok, 16)
    with pytest.raises(DataError, match="weight must be a finite number > 0"):
        build_corpus([f"a={a}:0"], tok, 16)
    with pytest.raises(DataError, match="below 1/1024"):
        build_corpus([f"a={a}:1", f"b={b}:1e-6"], tok, 16)
    prepare([str(a)], tmp_path / "pa", tok, progress=False)  # a prepared folder is a source like any other
    corpus = build_corpus([f"a={tmp_path / 'pa'}:1", f"b={b}:3"], tok, 16)
    assert [(p.name, p.weight) for p in corpus.parts] == [("a", 1.0), ("b", 3.0)]
    with pytest.raises(DataError, match="is a prepared folder: give it as a source of its own"):
        build_corpus([f"a={tmp_path / 'pa'}", f"a={b}"], tok, 16)


def test_training_on_a_mixture_records_the_tokens_seen_per_source(tmp_path, one_thread):
    tok = tiny_tokenizer()
    corpus = mixture(tmp_path, tok, (1, 1, 2))
    seen = []
    train(tiny_model(), corpus, tmp_path / "run", TrainConfig(steps=4, batch_size=2, grad_accum=2, log_every=4,
          eval_every=100, save_every=100, depths=(1,), progress=False), on_batch=lambda s, m, idx: seen.extend(idx.tolist()))
    rec = [r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if "loss" in r][-1]
    starts = np.cumsum([0] + [p.blocks for p in corpus.parts])
    counts = np.bincount(np.searchsorted(starts, seen, side="right") - 1, minlength=3)
    assert [rec[f"tokens_seen/s{i}"] for i in range(3)] == [int(c) * 16 for c in counts]
    assert sum(counts) == 16


@pytest.fixture
def prepared_run(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    text = write_corpus(tmp_path / "text", n_docs=12)
    assert main(["prepare", str(text), "--out", str(tmp_path / "p"), "--base", base]) == 0
    assert main(["convert", "--base", base, "--out", str(tmp_path / "ad"), "--n-prelude", "2", "--recurrent-layer", "4",
                 "--n-coda", "2", "--rank", "4", "--max-depth", "8"]) == 0
    return tmp_path


def train_cli(tmp_path, data):
    return main(["train", "--adapter", str(tmp_path / "ad"), "--data", str(data), "--steps", "2", "--batch-size", "2",
                 "--seq-len", "16", "--depths", "1", "--log-every", "1"])


def edit_manifest(folder, fn):
    m = json.loads((folder / MANIFEST).read_text())
    fn(m)
    (folder / MANIFEST).write_text(json.dumps(m))


def shrink_first_shard(m):
    """The manifest says the first shard holds 5 tokens (its split's total agreeing): the file says otherwise."""
    shard, split = m["splits"]["train"]["shards"][0], m["splits"]["train"]
    split["tokens"] += 5 - shard["tokens"]
    shard["tokens"] = 5


@pytest.mark.parametrize("spoil,names", [
    (lambda p: edit_manifest(p, lambda m: m["tokenizer"].update(sha256="0" * 64)), "manifest.json: prepared with tokenizer"),
    (lambda p: os.truncate(p / "train-00000.bin", 100), "train-00000.bin holds 100 bytes"),
    (lambda p: (p / "train-00000.bin").open("r+b").write(b"\x07\x00"), "train-00000.bin does not match its checksum"),
    (lambda p: edit_manifest(p, shrink_first_shard), "train-00000.bin holds"),
    (lambda p: edit_manifest(p, lambda m: m["splits"]["train"]["shards"][0].update(max_token=9)),
     "train-00000.bin does not match its checksum and token range"),
    (lambda p: edit_manifest(p, lambda m: m["splits"]["train"]["shards"][0].pop("sha256")), "is not a manifest of"),
    (lambda p: (p / MANIFEST).write_text('{"format": '), "manifest.json: this manifest is not valid JSON"),
])
def test_a_prepared_folder_that_does_not_match_is_refused_in_one_line(prepared_run, capsys, spoil, names):
    tmp_path = prepared_run
    before = sorted(os.listdir(tmp_path / "ad"))
    capsys.readouterr()
    spoil(tmp_path / "p")
    assert train_cli(tmp_path, tmp_path / "p") == 2
    err = capsys.readouterr().err.strip()
    assert names in err and "\n" not in err
    assert sorted(os.listdir(tmp_path / "ad")) == before  # nothing written to the run folder


def test_prepare_then_train_from_the_folder_on_the_command_line(prepared_run, capsys):
    tmp_path = prepared_run
    assert train_cli(tmp_path, tmp_path / "p") == 0
    assert Prepared(tmp_path / "p").manifest["tokenizer"]["sha256"]
    assert len([line for line in open(tmp_path / "ad" / "metrics.jsonl") if '"loss"' in line]) == 2
    assert main(["eval", "--adapter", str(tmp_path / "ad"), "--data", str(tmp_path / "p"), "--blocks", "2",
                 "--depths", "1", "--no-full", "--seq-len", "16", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["tokens"]["heldout"] == 2 * 15
    # the adapter names its base: `prepare --base ADAPTER` uses that base's tokenizer, the same folder
    assert main(["prepare", str(tmp_path / "text"), "--out", str(tmp_path / "p"), "--base", str(tmp_path / "ad")]) == 0
    # checked in full once (then stamped): an edit made after that is still found
    with open(tmp_path / "p" / "train-00000.bin", "r+b") as f:
        f.write(b"\x07\x00")
    capsys.readouterr()
    assert train_cli(tmp_path, tmp_path / "p") == 2
    assert "train-00000.bin does not match its checksum" in capsys.readouterr().err


def test_a_resumed_mixture_draws_the_batches_of_an_uninterrupted_run_and_refuses_other_weights(tmp_path, one_thread):
    tok = tiny_tokenizer()
    tc = dict(steps=4, batch_size=2, lr=1e-2, warmup_steps=1, log_every=1, eval_every=100, save_every=1,
              depths=(1, 2), progress=False)
    seen = {"whole": [], "cut": []}
    corpus = mixture(tmp_path / "d", tok, (1, 1, 2))
    train(tiny_model(), corpus, tmp_path / "whole", TrainConfig(**tc), on_batch=lambda s, m, i: seen["whole"].append(i.tolist()))
    train(tiny_model(), corpus, tmp_path / "cut", TrainConfig(**tc, stop_after=2), on_batch=lambda s, m, i: seen["cut"].append(i.tolist()))
    from ouroboros_lm import load_adapter

    train(load_adapter(tmp_path / "cut", base=tiny_base("llama")), mixture(tmp_path / "d", tok, (1, 1, 2)),
          tmp_path / "cut", TrainConfig(**tc), resume=True, on_batch=lambda s, m, i: seen["cut"].append(i.tolist()))
    assert seen["cut"] == seen["whole"]
    def train_losses(run):
        return [(step, loss) for step, loss, _ in losses(run) if loss is not None]

    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "whole") and len(train_losses(tmp_path / "cut")) == 4
    with pytest.raises(ValueError, match="differ from the run's: data: saved"):
        train(load_adapter(tmp_path / "cut", base=tiny_base("llama")), mixture(tmp_path / "d", tok, (1, 1, 3)),
              tmp_path / "cut", TrainConfig(**{**tc, "steps": 4}), resume=True)


def test_hf_datasets_are_streamed_row_by_row(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        return iter([{"text": "ba ko"}, {"text": "  "}, {"text": "ri tu me"}, {"text": "sa lo"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    tok = tiny_tokenizer()
    m = prepare(["hf:owner/name:validation"], tmp_path / "p", tok, PrepareConfig(heldout_fraction=0.3), progress=False)
    assert set(calls) == {("owner/name", "validation", True)}  # streamed, each pass
    names = ["owner/name:0", "owner/name:2", "owner/name:3"]  # the blank row is no document
    held = held_names(names, 0.3, 0)
    assert (tmp_path / "p" / "heldout-documents.txt").read_text().split() == [n for n in names if n in held]
    texts = dict(zip(names, ["ba ko", "ri tu me", "sa lo"]))
    assert shard_tokens(tmp_path / "p", "train") == tokens_of(tok, [texts[n] for n in names if n not in held])
    assert m["sources"][0]["documents"] == 3
