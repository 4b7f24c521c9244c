"""The demo's data choices: which addresses train, what is mixed in, and bad folders refused."""
from __future__ import annotations

import pytest

from ouroboros_lm.experiments.demo import DemoConfig, mix_files, sotu_files


def test_years_split_the_addresses_and_the_mix_is_optional(tmp_path):
    sotu = tmp_path / "sotu"
    sotu.mkdir()
    for year in (1900, 1950, 1999, 2001):
        (sotu / f"{year}_x.txt").write_text("text")
    train, held = sotu_files(sotu, last_train_year=2000, first_train_year=1950)
    assert [p.rsplit("/", 1)[1] for p in train] == ["1950_x.txt", "1999_x.txt"]
    assert [p.rsplit("/", 1)[1] for p in held] == ["2001_x.txt"]
    mix, more = tmp_path / "mix", tmp_path / "more"
    mix.mkdir(), more.mkdir()
    (mix / "b.txt").write_text("call me")
    (mix / "a.txt").write_text("Ishmael")
    (more / "c.txt").write_text("import this")
    assert mix_files(DemoConfig(mix=(str(mix),))) == ([str(mix / "a.txt"), str(mix / "b.txt")], [mix])
    assert mix_files(DemoConfig(mix=(str(mix), str(more))))[0] == [str(mix / n) for n in ("a.txt", "b.txt")] + [
        str(more / "c.txt")]
    assert mix_files(DemoConfig(mix=("none",))) == ([], [])
    with pytest.raises(FileNotFoundError, match="missing: no such folder"):
        mix_files(DemoConfig(mix=(str(mix), str(tmp_path / "missing"))))


def test_the_default_mix_is_whatever_make_domains_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("OUROBOROS_CACHE", str(tmp_path))
    assert mix_files(DemoConfig()) == ([], [])  # nothing fetched: addresses only
    (tmp_path / "python-docs").mkdir()
    (tmp_path / "python-docs" / "tutorial.txt").write_text("for x in y")
    assert mix_files(DemoConfig()) == ([str(tmp_path / "python-docs" / "tutorial.txt")], [tmp_path / "python-docs"])


def test_demo_end_to_end_puts_the_heal_rows_beside_the_recursion(tmp_path, one_thread):
    """`make demo`'s recipe on a tiny 30-layer random base: the recursion, and the pruned stack healed
    with plain LoRA at equal weights (the same 15 layers) and at equal compute (7 + 4 + 7 layers), each
    rank-matched to the recursion's trained weights and trained for the same steps, scored on the same
    blocks of every split."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from conftest import TINY, tiny_tokenizer, write_corpus
    from ouroboros_lm.experiments.demo import run_demo

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**TINY, "num_hidden_layers": 30, "max_position_embeddings": 512})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    text = write_corpus(tmp_path / "text", n_docs=8, words=200)
    sotu = tmp_path / "sotu"
    sotu.mkdir()
    for i, doc in enumerate(sorted(text.iterdir())):
        (sotu / f"{1990 + 3 * i}_x.txt").write_text(doc.read_text())
    dc = DemoConfig(out=str(tmp_path / "demo"), base=str(tmp_path / "base"), corpus=str(sotu), first_train_year=1990,
                    last_train_year=2006, mix=("none",), domains=str(tmp_path / "no-domains"), seq_len=32, steps=3,
                    batch_size=2, warmup_steps=1, eval_depths=(1, 2), exit_thresholds=(0.5,), eval_blocks=2)
    result = run_demo(dc)
    rows = {r.model: r for r in result["report"].splits["heldout"]}
    ours = rows["ouroboros@2"].trainable
    weights = next(r for name, r in rows.items() if name.startswith("heal: 15 layers"))
    compute = next(r for name, r in rows.items() if name.startswith("heal: 18 layers"))
    assert weights.layers == 15 and compute.layers == 18 and rows["ouroboros@2"].layers == 16
    for heal in (weights, compute):  # within one rank step of the recursion's weights
        step = heal.trainable / int(heal.model.rsplit("r", 1)[1])
        assert abs(heal.trainable - ours) <= step / 2 + 1
        assert heal.loss < rows["baseline"].loss  # trained: better than the pruned stack it heals
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert {s["steps_done"] for s in summary["heal"].values()} == {summary["steps_done"]}


def test_the_demo_trains_on_its_genres_as_named_sources(tmp_path):
    from conftest import tiny_tokenizer, write_corpus
    from ouroboros_lm.data import build_corpus
    from ouroboros_lm.experiments.demo import genre_items

    sotu, moby, docs = (write_corpus(tmp_path / n, n_docs=k, seed=k) for n, k in (("sotu", 4), ("moby-dick", 3),
                                                                                   ("python docs", 2)))
    addresses = [str(f) for f in sorted(sotu.glob("*.txt"))]
    mixed = [str(f) for folder in (moby, docs) for f in sorted(folder.glob("*.txt"))]
    items = genre_items(addresses[:3], mixed)
    assert items[0] == f"sotu={addresses[0]}" and items[-1].startswith("python_docs=")
    corpus = build_corpus(items, tiny_tokenizer(), 32, heldout=addresses[3:])
    assert [p.name for p in corpus.parts] == ["sotu", "moby-dick", "python_docs"]
    assert [p.weight for p in corpus.parts] == [float(p.blocks) for p in corpus.parts]  # by size, as before
    assert corpus.n_train_docs == 8 and corpus.n_heldout_docs == 1
