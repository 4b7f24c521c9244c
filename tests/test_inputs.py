"""Hostile or careless input to the newer commands: exported folders from strangers, sweep specs,
sweep folders whose spec changed, and the mistakes that used to end in a traceback. Each is
refused with one line naming the file or setting (CLI: exit 2), or works."""
from __future__ import annotations

import json
import shutil
import time

import pytest
import yaml

from conftest import TINY_SPLIT, randomize_trainables, save_tiny_base, tiny_tokenizer, write_corpus
from ouroboros_lm import OuroborosConfig, OuroborosModel, load_base_model, save_adapter
from ouroboros_lm.cli import main
from ouroboros_lm.data import build_corpus
from ouroboros_recipes.sweep import SweepSpec, run_sweep
from test_writes import one_line_error, tiny_spec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(root, base, text): a tiny base, text, an adapter with random trained parts and its export."""
    root = tmp_path_factory.mktemp("inputs")
    base = save_tiny_base(root / "base")
    model = OuroborosModel.from_base(load_base_model(base), OuroborosConfig(**TINY_SPLIT), base_name=base)
    randomize_trainables(model, scale=0.3)
    save_adapter(model, root / "ad")
    assert main(["export", "--adapter", str(root / "ad"), "--out", str(root / "hf")]) == 0
    return root, base, write_corpus(root / "text", n_docs=12)


# ---------------------------------------------------------------------- exported folders
def edited_export(made, tmp_path, config=None, tensors=None):
    from safetensors.torch import load_file, save_file

    hf = tmp_path / "hf"
    shutil.copytree(made[0] / "hf", hf)
    if config:
        cfg = json.loads((hf / "config.json").read_text())
        config(cfg)
        (hf / "config.json").write_text(json.dumps(cfg))
    if tensors:
        t = load_file(hf / "model.safetensors")
        tensors(t)
        save_file(t, hf / "model.safetensors", metadata={"format": "pt"})
    return hf


def poison(name, value):
    def edit(t):
        t[name] = t[name].clone()
        t[name].view(-1)[0] = value
    return edit


@pytest.mark.parametrize("config,tensors,message", [
    (None, poison("model.recurrent.gate.bias", float("nan")), r"non-finite values \(NaN or inf\) in model.recurrent.gate.bias"),
    (None, lambda t: t.pop("model.recurrent.controller.head.weight"), r"does not fit its config.json: missing \['model.recurrent"),
    (None, poison("model.embed_tokens.weight", 3.0), "the embed_tokens weights are not those of the base"),
    (lambda c: c.update(baseline="no"), None, "'baseline' must be true or false; got 'no'"),
    (lambda c: c.update(ouroboros={}), None, "'ouroboros' is empty"),
    (lambda c: c["ouroboros"].update(n_prelude=1), None, "does not match the layers its fingerprints were recorded for"),
    (lambda c: c.update(depth=10**6), None, "depth must be an integer in"),
    (lambda c: c["ouroboros"].update(alpha=float("inf")), None, "alpha must be a finite number"),
])
def test_an_edited_export_is_refused_on_load(made, tmp_path, config, tensors, message):
    from transformers import AutoModelForCausalLM

    hf = edited_export(made, tmp_path, config, tensors)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(hf)


def test_the_export_itself_loads_and_can_report_its_loading_info(made):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(made[0] / "hf", output_loading_info=True)
    assert type(model).__name__ == "OuroborosForCausalLM" and not info["missing_keys"]


# ---------------------------------------------------------------------- harness
def foreign_model(tmp_path):
    """A folder whose config names another model type and ships its own modeling code."""
    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}}))
    (d / "modeling_evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('ran')\n")
    return d


def test_harness_refuses_bad_input_before_loading_anything(made, tmp_path, capsys):
    root, base, text = made
    (tmp_path / "empty.txt").write_text("")
    comma = tmp_path / "a,b"
    shutil.copytree(root / "hf", comma)
    hf = str(root / "hf")
    for args, needle in [
        (["--model", hf, "--data", str(tmp_path / "empty.txt")], "no text in data="),
        (["--model", hf, "--tasks", "hellaswag"], "unknown task(s) hellaswag"),
        (["--model", base, "--baseline"], "need a folder from `ouroboros export`; "),
        (["--model", str(comma)], "splits its model arguments at ','"),
        (["--model", hf, "--depth", "100000"], "--depth must be an integer in [1, max_depth=16]"),
        (["--model", str(foreign_model(tmp_path))], "ships its own Python code for model type 'evil'"),
    ]:
        assert main(["harness", *args]) == 2, args
        one_line_error(capsys, needle)
    assert not (tmp_path / "ran").exists()  # the folder's code never ran


# ---------------------------------------------------------------------- eval, generate, data
def test_eval_and_generate_refuse_what_they_cannot_do_before_any_row(made, tmp_path, capsys):
    root, _, text = made
    ad = str(root / "ad")
    ev = ["eval", "--adapter", ad, "--data", str(text), "--seq-len", "32", "--blocks", "2", "--depths", "1,2"]
    for args, needle in [
        ([*ev[:-1], "1,99"], "--depths must be an integer in [1, max_depth=16]; got 99"),  # the adapter's check_depth
        (["export", "--adapter", ad, "--out", str(tmp_path / "x"), "--depth", "99"], "--depth must be an integer in"),
        ([*ev, "--exit-thresholds", "0.5", "--exit-rule", "halter"], "--exit-rule halter needs an adapter with a trained halter"),
        ([*ev, "--exit-thresholds", "0.5", "--exit-max-depth", "4", "--exit-min-steps", "6"], "--exit-min-steps 6 is more than the 4"),
        (["generate", "--adapter", ad, "--prompt", "x", "--depth", "auto", "--exit-max-depth", "4",
          "--exit-min-steps", "6"], "--exit-min-steps 6 is more than the 4"),
        (["generate", "--adapter", ad, "--prompt", "ba " * 100, "--full"], "exceeds the base model's max_position_embeddings 256"),
    ]:
        assert main(args) == 2, args
        assert one_line_error(capsys, needle) and "full model" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([*ev, "--eval-seed", "100000000000000000000000"])
    assert e.value.code == 2 and "--eval-seed: seed must be in [0, 2**63 - 1]" in capsys.readouterr().err


def test_a_data_file_named_with_glob_characters_can_be_named(tmp_path):
    for name in ("notes[draft]*?.txt", "later?.txt"):
        (tmp_path / name).write_text("ba ko ri tu me. " * 200)
    (tmp_path / "notesdraft1.txt").write_text("not this one " * 500)  # what the name matches as a glob
    corpus = build_corpus([str(tmp_path / "notes[draft]*?.txt")], tiny_tokenizer(), 16,
                          heldout=[str(tmp_path / "later?.txt")])
    assert corpus.train.numel() // 16 == len("ba ko ri tu me. " * 200) // 16


@pytest.mark.parametrize("chapter", [b'{"title": "no text"}', b'{"text": "caf\xe9"}'])
def test_the_corpus_converter_writes_nothing_for_a_bad_chapter(tmp_path, capsys, chapter):
    from ouroboros_recipes.corpora import main as corpora

    src = tmp_path / "src"
    src.mkdir()
    (src / "chapter_001.json").write_text(json.dumps({"text": "Call me Ishmael."}))
    (src / "chapter_002.json").write_bytes(chapter)
    with pytest.raises(SystemExit) as e:
        corpora(["moby-dick", str(src), str(tmp_path / "out")])
    assert e.value.code == 2 and "chapter_002.json" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no partial folder, no temporary
    (src / "chapter_002.json").write_text(json.dumps({"text": "Some years ago."}))
    corpora(["moby-dick", str(src), str(tmp_path / "out")])  # re-running is not refused
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["chapter_001.txt", "chapter_002.txt"]


# ---------------------------------------------------------------------- report
@pytest.mark.parametrize("content,needle", [
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"name": "x"', "this run result is not valid JSON"),
    (json.dumps({"name": "x", "losses": {}, "reference": {}, "trainable_parameters": 1, "config": {}, "settings": {},
                 "steps": 1}), "'wall_s' is missing"),
], ids=["list", "torn", "missing-key"])
def test_report_names_the_result_file_it_cannot_read(tmp_path, capsys, content, needle):
    path = tmp_path / "runs" / "x" / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert main(["report", str(tmp_path)]) == 2
    assert needle in one_line_error(capsys, f"{path}: ")


# ---------------------------------------------------------------------- sweep specs
def spec_file(tmp_path, text: str):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


HEAD = "name: x\nbase: b\nsplit: {}\ndata: {train: [a]}\n"


@pytest.mark.parametrize("body,needle", [
    ("eval: {modulation_inputs: x}\nruns: [{}]\n", "modulation_inputs must be an integer"),
    ("eval: {exit_thresholds: [-1]}\nruns: [{}]\n", "exit_thresholds must be > 0; got -1"),
    ("eval: {depths: [0]}\nruns: [{}]\n", "depths must be in [1, 1024]; got 0"),
    ("eval: {colour: 1}\nruns: [{}]\n", "unknown eval setting(s): colour"),
    ("eval: {full: false}\nruns: [{}]\n", "eval.full is not a sweep setting"),
    ("runs: [{}]\nseed: 1.5\n", "seed must be an integer"),
    ("grid: {lr: [0.001, 0.0010000001]}\n", "two runs would share the folder runs/controller-gate-prefix_mean-r32-"
     "d4_8_16-lr0.001: lr 0.001 and 0.0010000001 format alike"),
], ids=["modulation_inputs", "exit_thresholds", "depths", "unknown", "command-line-only", "seed", "run-names"])
def test_every_spec_key_is_validated_before_anything_runs(tmp_path, body, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        SweepSpec.load(spec_file(tmp_path, HEAD + body))


def test_the_same_run_listed_twice_is_one_run(tmp_path):
    spec = SweepSpec.load(spec_file(tmp_path, HEAD + "grid: {lr: [0.001, 0.002]}\nruns: [{lr: 0.001}]\n"))
    assert [r.name.split("-")[-1] for r in spec.expand()] == ["lr0.001", "lr0.002"]


def test_a_fractional_seq_len_is_refused_not_truncated(tmp_path):
    with pytest.raises(ValueError, match=r"seq_len must be an integer .*; got 33.7"):
        SweepSpec.load(spec_file(tmp_path, "name: x\nbase: b\nsplit: {}\ndata: {train: [a], seq_len: 33.7}\nruns: [{}]\n"))


def test_nested_aliases_and_huge_grids_are_refused_at_once(tmp_path):
    bomb = "a: &a [" + ",".join(["x"] * 10) + "]\n"
    for i in range(1, 9):  # 10**9 values once expanded, in 1 KB
        bomb += f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 10) + "]\n"
    t0 = time.time()
    with pytest.raises(ValueError) as e:
        SweepSpec.load(spec_file(tmp_path, HEAD + bomb))
    assert "expands to more than 100,000 values" in str(e.value) and len(str(e.value)) < 300
    grid = "grid: {" + ", ".join(f"{k}: [{', '.join(str(v) for v in range(1, 11))}]" for k in
                                 ("rank", "style_dim", "controller_hidden", "max_depth", "default_depth", "steps",
                                  "batch_size", "log_every")) + "}\n"
    with pytest.raises(ValueError, match=r"make 100,000,000 runs; a sweep may have at most 10,000"):
        SweepSpec.load(spec_file(tmp_path, HEAD + grid))
    assert time.time() - t0 < 5


# ---------------------------------------------------------------------- sweep folders whose spec changed
def test_a_sweep_whose_training_data_changed_is_refused_and_new_eval_blocks_rescored(made, tmp_path):
    spec = tiny_spec(made, tmp_path)
    out = run_sweep(spec, out=tmp_path / "sw", progress=False)
    (name,) = [p.name for p in (out / "runs").iterdir()]
    before = json.loads((out / "runs" / name / "result.json").read_text())
    raw = yaml.safe_load(spec.read_text())
    raw["data"]["seq_len"] = 48
    raw["runs"].append({"variant": "static"})
    spec.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"holds runs trained on other data than the spec now gives \(seq_len 32 -> 48\)"):
        run_sweep(spec, out=out, progress=False)
    assert json.loads((out / "runs" / name / "result.json").read_text()) == before
    assert sorted(p.name for p in (out / "runs").iterdir()) == [name]  # nothing trained
    # more evaluation blocks: the reference is scored again, and the finished run re-evaluated on them
    raw["data"]["seq_len"], raw["runs"], raw["eval"]["blocks"] = 32, raw["runs"][:1], 3
    spec.write_text(yaml.safe_dump(raw))
    run_sweep(spec, out=out, progress=False)
    after = json.loads((out / "runs" / name / "result.json").read_text())
    ref = json.loads((out / "reference.json").read_text())
    assert after["reference"]["heldout"] == ref["heldout"] != before["reference"]["heldout"]
    assert ref["tokens"]["heldout"] == 3 * 31 and after["steps"] == before["steps"]  # not trained again
    fresh = run_sweep(spec, out=tmp_path / "fresh", progress=False)
    want = json.loads((fresh / "runs" / name / "result.json").read_text())
    for split in ("train", "heldout"):
        assert after["losses"][split] == want["losses"][split]  # the same computations: bit-identical


def test_results_written_before_keys_are_rescored_only_where_their_reference_differs():
    from ouroboros_recipes.reference import stale_splits

    reference = {"train": {"full": 2.0, "baseline": 3.0}, "heldout": {"full": 2.5, "baseline": 3.5},
                 "shakespeare": {"full": 4.0, "baseline": 5.0}}
    keys = {"train": "k1", "heldout": "k2", "shakespeare": "k3"}
    legacy = {"losses": {"train": {}, "heldout": {}},
              "reference": {"train": {"full": 2.0, "baseline": 3.0}, "heldout": {"full": 2.7, "baseline": 3.5}}}
    assert stale_splits(legacy, keys, reference) == ["heldout", "shakespeare"]  # other blocks; never scored
    keyed = {**legacy, "reference_keys": {"train": "k1", "heldout": "old"}}
    assert stale_splits(keyed, keys, reference) == ["heldout", "shakespeare"]
    assert stale_splits({**keyed, "reference_keys": keys, "losses": dict.fromkeys(keys, {})}, keys, reference) == []
