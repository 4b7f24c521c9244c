"""Every file found in a folder is read through one bounded reader (issue #35): an oversized, FIFO or linked
adapter config, manifest, trainer state, sweep result or plan is refused in one line naming the file, before it
is parsed; metrics.jsonl lines that are not objects or are nested absurdly are refused the same way."""
from __future__ import annotations

import os

import pytest

from conftest import TINY_SPLIT, save_tiny_base
from ouroboros_lm import OuroborosConfig, OuroborosModel, load_base_model
from ouroboros_lm.adapter import AdapterError, read_adapter, save_adapter
from ouroboros_lm.atomic import MAX_JSON_BYTES, read_json
from ouroboros_lm.checkpoints import read_metrics


def test_an_oversized_file_is_refused_before_it_is_parsed(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as f:  # sparse: the size says it all, nothing is allocated
        f.truncate(MAX_JSON_BYTES + 1)
    with pytest.raises(ValueError, match=r"big.json: this plan is 8,388,609 bytes, more than the 8,388,608"):
        read_json(big, "plan")


def test_a_fifo_or_a_link_is_never_opened_for_reading(tmp_path):
    fifo = tmp_path / "state.json"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="state.json: this trainer state is not a regular file"):
        read_json(fifo, "trainer state")  # would hang forever on a blocking open
    (tmp_path / "real.json").write_text("{}")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    with pytest.raises(ValueError, match="link.json: cannot read this plan"):
        read_json(tmp_path / "link.json", "plan")


def test_an_adapter_config_of_millions_of_objects_is_refused_in_one_line(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    save_adapter(OuroborosModel.from_base(load_base_model(base), OuroborosConfig(**TINY_SPLIT)), tmp_path / "ad")
    config = tmp_path / "ad" / "adapter_config.json"
    config.write_text("[" + "{}," * (MAX_JSON_BYTES // 3) + "{}]")
    with pytest.raises(AdapterError, match="adapter_config.json: this adapter config is .* bytes, more than"):
        read_adapter(tmp_path / "ad")
    config.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterError, match="adapter_config.json: this adapter config is not valid JSON"):
        read_adapter(tmp_path / "ad")


@pytest.mark.parametrize("line, match", [
    ("[1, 2]", "line 2 is not a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "line 2 is nested too deeply"),
    ("{not json", "line 2 is not valid JSON"),
])
def test_metrics_lines_that_are_not_records_are_refused_naming_the_line(tmp_path, line, match):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n' + line + "\n" + '{"step": 2}\n')
    with pytest.raises(ValueError, match=match):
        read_metrics(tmp_path)


def test_a_torn_last_metrics_line_ends_the_records(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2}]
