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
    mix = tmp_path / "mix"
    mix.mkdir()
    (mix / "a.txt").write_text("call me")
    assert mix_files(DemoConfig(mix=str(mix))) == ([str(mix / "a.txt")], mix)
    assert mix_files(DemoConfig(mix="none")) == ([], None)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        mix_files(DemoConfig(mix=str(tmp_path / "missing")))
