"""Issue #43's probe, tried as a hostile user would: plan files, prepared folders, stored teacher targets, metrics and
the demo. Each case is refused in one line naming the file or flag (exit 2 from the CLI), before anything outside the
user's intent is written or deleted, and in bounded memory."""
from __future__ import annotations

import json
import tracemalloc

import pytest

from conftest import tiny_tokenizer, write_corpus
from ouroboros_lm.checkpoints import iter_metrics, truncate_metrics
from ouroboros_lm.reading import DataError


def peak_bytes(fn, *args) -> int:
    """The most memory (Python's allocations) `fn(*args)` held at once."""
    tracemalloc.start()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------------- High
def test_a_manifest_padded_with_millions_of_empty_objects_is_refused_unparsed(tmp_path):
    from ouroboros_lm.prepare import prepare
    from ouroboros_lm.shards import MANIFEST_VALUES, Prepared

    prepare([str(write_corpus(tmp_path / "text", n_docs=8))], tmp_path / "p", tiny_tokenizer(), progress=False)
    path = tmp_path / "p" / "manifest.json"
    m = path.read_bytes().rstrip()
    assert m.endswith(b"}")  # "pad": [{}, {}, ...]: 3 bytes a value, ~30x that once parsed
    path.write_bytes(m[:-1] + b', "pad": [' + b"{}," * MANIFEST_VALUES + b"{}]}")
    with pytest.raises(DataError, match=r"manifest.json: this manifest holds about [\d,]+ values, more than the "):
        Prepared(tmp_path / "p")
    path.write_bytes(m)  # the folder as prepared still opens
    assert Prepared(tmp_path / "p").documents("train") > 0


def many_big_metrics_lines(run, n: int = 24, size: int = 1 << 20) -> None:
    """`n` records of (just under) a metrics line's 1 MiB limit each, the loss a number, the rest padding."""
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(1, n + 1):
            line = json.dumps({"step": step, "loss": 1.0 / step, "pad": ""})
            f.write(line[:-2] + "x" * (size - len(line) - 8) + '"}\n')


def test_resume_and_report_stream_metrics_in_the_memory_of_one_line(tmp_path):
    from ouroboros_recipes.sweep_plots import MAX_CURVE_POINTS, curve_points

    run = tmp_path / "run"
    many_big_metrics_lines(run)  # 24 MiB of records: held whole, a list of them would be > 24 MiB
    assert sum(1 for _ in iter_metrics(run)) == 24
    assert peak_bytes(lambda: [None for _ in iter_metrics(run)]) < 8 << 20
    assert peak_bytes(curve_points, run) < 8 << 20  # what `ouroboros report` plots
    assert curve_points(run)[:2] == [(1, 1.0), (2, 0.5)]
    assert peak_bytes(truncate_metrics, run, 12) < 8 << 20  # what `train --resume` rewrites
    assert [r["step"] for r in iter_metrics(run)] == list(range(1, 13))
    with open(run / "metrics.jsonl", "w") as f:  # many records: the plot keeps evenly spaced ones, no more
        f.writelines(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(10 * MAX_CURVE_POINTS + 7))
    pts = curve_points(run)
    assert MAX_CURVE_POINTS // 2 <= len(pts) <= MAX_CURVE_POINTS and pts[0] == (0, 1.0)
    steps = [p[0] for p in pts]
    assert len({b - a for a, b in zip(steps, steps[1:])}) == 1
