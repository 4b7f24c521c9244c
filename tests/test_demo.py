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
