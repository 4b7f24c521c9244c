"""Every path a command writes, under planted links, careless --out folders, full disks and Ctrl-C:
nothing outside the named folders is written or deleted, and each refusal is one line (exit 2)."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import save_tiny_base, write_corpus
from ouroboros_lm.atomic import MARKER, check_removable, clean_temporaries, write_text
from ouroboros_lm.checkpoints import list_checkpoints
from ouroboros_lm.cli import main
from ouroboros_recipes.sweep import SweepSpec
from test_hardening import SPLIT

TRAIN = ["--seq-len", "32", "--steps", "2", "--batch-size", "2", "--save-every", "1", "--eval-every", "2",
         "--eval-blocks", "2", "--warmup-steps", "1", "--log-every", "1", "--depths", "1,2"]
SRC = Path(__file__).resolve().parent.parent / "src"
DEAD_PID = 4194305  # above Linux's largest pid: never a running process

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny base, text, a converted adapter and an export of it (made by the CLI, in this process)."""
    root = tmp_path_factory.mktemp("writes")
    base = save_tiny_base(root / "base")
    data = write_corpus(root / "text", n_docs=12)
    assert main(["convert", "--base", base, "--out", str(root / "ad"), *SPLIT]) == 0
    assert main(["export", "--adapter", str(root / "ad"), "--out", str(root / "hf")]) == 0
    return root, base, data


def victim(tmp_path, kind="file"):
    """Something of the user's that a planted link points at: its content must survive."""
    v = tmp_path / f"victim-{kind}"
    if kind == "file":
        v.write_text("precious\n")
    else:
        v.mkdir()
        (v / "keep.txt").write_text("precious\n")
        (v / "trainer_state.json").write_text('{"step": 99}')
    return v


def untouched(v: Path) -> bool:
    if v.is_file():
        return v.read_text() == "precious\n"
    return sorted(p.name for p in v.iterdir()) == ["keep.txt", "trainer_state.json"] and \
        (v / "keep.txt").read_text() == "precious\n"


def one_line_error(capsys, needle: str) -> str:
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("ouroboros")]
    assert len(err) == 1 and needle in err[0], err
    return err[0]


def fresh_adapter(made, tmp_path, name="ad"):
    root, base, _ = made
    assert main(["convert", "--base", base, "--out", str(tmp_path / name), *SPLIT]) == 0
    return tmp_path / name


# ---------------------------------------------------------------------- the module's rule
def test_a_file_link_is_replaced_and_a_folder_link_refused(tmp_path):
    v = victim(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.txt").symlink_to(v)
    write_text(tmp_path / "out" / "a.txt", "ours\n")
    assert untouched(v) and not (tmp_path / "out" / "a.txt").is_symlink()
    vd = victim(tmp_path, "dir")
    (tmp_path / "out" / "sub").symlink_to(vd)
    with pytest.raises(OSError, match="sub is a symbolic link; refusing to write through it"):
        write_text(tmp_path / "out" / "sub" / "b.txt", "x", under=tmp_path / "out")
    assert untouched(vd)


def test_only_folders_of_ours_are_removable_and_only_dead_temporaries_cleaned(tmp_path, monkeypatch):
    d = tmp_path / "d"
    d.mkdir()
    (d / "x").write_text("x")
    with pytest.raises(ValueError, match="was not written by `ouroboros export`"):
        check_removable(d, "export")
    (d / MARKER).write_text(json.dumps({"kind": "export", "files": ["x"]}))
    check_removable(d, "export")
    (d / "y").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files we did not write \(y\)"):
        check_removable(d, "export")
    monkeypatch.chdir(d)
    with pytest.raises(ValueError, match="working folder or one of its parents"):
        check_removable(tmp_path, "export")
    dead, alive = tmp_path / f".hf.tmp{DEAD_PID}", tmp_path / f".hf.tmp{os.getppid()}"
    dead.mkdir(), alive.mkdir()
    assert clean_temporaries(tmp_path, "hf") == [dead] and alive.is_dir()


# ---------------------------------------------------------------------- train
@pytest.mark.parametrize("where", ["checkpoints", "tracking"])
def test_train_refuses_a_planted_folder_link_before_any_step(made, tmp_path, capsys, where):
    ad = fresh_adapter(made, tmp_path)
    vd = victim(tmp_path, "dir")
    (ad / where).symlink_to(vd)
    assert main(["train", "--adapter", str(ad), "--data", str(made[2]), *TRAIN]) == 2
    one_line_error(capsys, f"{where} is a symbolic link; refusing to write through it")
    assert untouched(vd) and not (ad / "metrics.jsonl").exists()


def test_a_link_planted_among_the_checkpoints_is_neither_resumed_nor_pruned(made, tmp_path):
    ad = fresh_adapter(made, tmp_path)
    vd = victim(tmp_path, "dir")
    (ad / "checkpoints").mkdir()
    (ad / "checkpoints" / "step_000000").symlink_to(vd)  # oldest: the first to be pruned
    assert main(["train", "--adapter", str(ad), "--data", str(made[2]), *TRAIN, "--keep-checkpoints", "1"]) == 0
    assert untouched(vd) and (ad / "checkpoints" / "step_000000").is_symlink()
    assert [p.name for p in list_checkpoints(ad)] == ["step_000002"]


@pytest.mark.parametrize("state,needle", [
    ({"step": "abc"}, "'step' must be the integer its folder is named for (step_000002); got 'abc'"),
    ({"step": -50}, "got -50"),
    ({"step": 2, "elapsed_s": float("nan")}, "'elapsed_s' must be a finite number"),
])
def test_resume_refuses_an_edited_trainer_state(made, tmp_path, capsys, state, needle):
    ad = fresh_adapter(made, tmp_path)
    assert main(["train", "--adapter", str(ad), "--data", str(made[2]), *TRAIN]) == 0
    path = ad / "checkpoints" / "step_000002" / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **state}))
    lines = (ad / "metrics.jsonl").read_text()
    assert main(["train", "--adapter", str(ad), "--data", str(made[2]), *TRAIN, "--steps", "3", "--resume"]) == 2
    one_line_error(capsys, needle)
    assert (ad / "metrics.jsonl").read_text() == lines


# ---------------------------------------------------------------------- full disk (a real write failure)
def limited(limit: int):
    """preexec_fn: files this process writes may not grow past `limit` bytes (write() fails with
    EFBIG, as on a full disk: the kernel refuses the write, nothing is injected)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def cli_limited(limit: int, *args):
    return subprocess.run([sys.executable, "-m", "ouroboros_lm.cli", *args], capture_output=True, text=True,
                          timeout=300, preexec_fn=limited(limit),
                          env={**os.environ, "PYTHONPATH": str(SRC), "PYTHONDONTWRITEBYTECODE": "1"})


def test_a_full_disk_in_the_optimizer_state_is_one_line_and_leaves_no_temporary(made, tmp_path):
    ad = fresh_adapter(made, tmp_path)
    # the adapter files fit, optimizer.pt (92 KB) does not: torch's own writer then failed with a RuntimeError
    # traceback ("unexpected pos") and left the partial .tmp-step folder behind
    assert (ad / "adapter_model.safetensors").stat().st_size < 70_000
    r = cli_limited(70_000, "train", "--adapter", str(ad), "--data", str(made[2]), *TRAIN)
    lines = [l for l in r.stderr.splitlines() if l.startswith("ouroboros")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "saving checkpoint step 1" in lines[0] and "optimizer.pt" in lines[0] and "File too large" in lines[0]
    assert [p.name for p in (ad / "checkpoints").iterdir()] == []  # the partial folder removed


def test_a_full_disk_during_export_is_one_line_and_changes_nothing(made, tmp_path):
    root = made[0]
    r = cli_limited(50_000, "export", "--adapter", str(root / "ad"), "--out", str(tmp_path / "hf"))
    lines = [l for l in r.stderr.splitlines() if l.startswith("ouroboros")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"writing the export to {tmp_path / 'hf'} failed" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the folder nor its temporary


# ---------------------------------------------------------------------- export --out
def test_export_refuses_outs_it_must_not_replace_before_loading(made, tmp_path, capsys, monkeypatch):
    root = made[0]
    ad = fresh_adapter(made, tmp_path)
    assert main(["train", "--adapter", str(ad), "--data", str(made[2]), *TRAIN]) == 0
    before = sorted(p.name for p in ad.iterdir())
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    vd = victim(tmp_path, "dir")
    (tmp_path / "link").symlink_to(vd)
    for out, needle in [(".", "working folder or one of its parents"), (str(tmp_path), "working folder"),
                        (str(ad), "is (or holds) the adapter folder"), (str(tmp_path / "link"), "is a symbolic link"),
                        (str(vd), "was not written by `ouroboros export`")]:
        assert main(["export", "--adapter", str(ad), "--out", out, "--overwrite"]) == 2, out
        one_line_error(capsys, needle)
    assert sorted(p.name for p in ad.iterdir()) == before and (work / "notes.txt").read_text() == "mine"
    assert untouched(vd) and list_checkpoints(ad)
    # an export of ours is replaced; one a file was added to is not
    hf = tmp_path / "hf"
    (tmp_path / f".hf.tmp{DEAD_PID}").mkdir()  # what an export killed mid-way leaves
    assert main(["export", "--adapter", str(root / "ad"), "--out", str(hf)]) == 0
    assert not (tmp_path / f".hf.tmp{DEAD_PID}").exists()
    assert main(["export", "--adapter", str(root / "ad"), "--out", str(hf), "--overwrite"]) == 0
    (hf / "my-notes.md").write_text("mine")
    assert main(["export", "--adapter", str(root / "ad"), "--out", str(hf), "--overwrite"]) == 2
    one_line_error(capsys, "holds files we did not write (my-notes.md)")
    assert (hf / "my-notes.md").read_text() == "mine"


def test_an_interrupted_export_removes_its_temporary_and_does_not_advise_resume(made, tmp_path, capsys, monkeypatch):
    from ouroboros_lm.hf import OuroborosForCausalLM

    def interrupt(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(OuroborosForCausalLM, "save_pretrained", interrupt)
    assert main(["export", "--adapter", str(made[0] / "ad"), "--out", str(tmp_path / "hf")]) == 130
    err = capsys.readouterr().err
    assert "nothing was changed" in err and "--resume" not in err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- eval, harness
def test_eval_replaces_planted_file_links_and_refuses_a_linked_out(made, tmp_path, capsys):
    root = made[0]
    out = tmp_path / "ev"
    out.mkdir()
    files = []
    for name in ("eval.json", "eval.md", "depth_curve.png"):
        (tmp_path / name).mkdir()
        files.append(victim(tmp_path / name))
        (out / name).symlink_to(files[-1])
    args = ["eval", "--adapter", str(root / "ad"), "--data", str(made[2]), "--seq-len", "32", "--depths", "1,2",
            "--blocks", "2", "--no-full"]
    assert main([*args, "--out", str(out)]) == 0
    assert all(untouched(v) for v in files) and not any(p.is_symlink() for p in out.iterdir())
    vd = victim(tmp_path, "dir")
    (tmp_path / "evlink").symlink_to(vd)
    assert main([*args, "--out", str(tmp_path / "evlink")]) == 2
    one_line_error(capsys, "evlink is a symbolic link")
    assert untouched(vd)


# ---------------------------------------------------------------------- sweep and report
def tiny_spec(made, tmp_path, **data):
    root, base, text = made
    spec = {"name": "t", "base": base, "split": {"n_prelude": 2, "recurrent_layer": 4, "n_coda": 2},
            "data": {"train": [str(text)], "seq_len": 32, "heldout_fraction": 0.2, **data},
            "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "save_every": 2, "eval_every": 2,
                      "eval_blocks": 2, "log_every": 1, "progress": False},
            "eval": {"depths": [1, 2], "blocks": 2, "modulation_inputs": 2},
            "defaults": {"rank": 4, "depths": [1, 2]}, "runs": [{"variant": "controller"}]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


SWEEP_FILES = ["spec.yaml", "reference.json", "results.csv", "results.json", "results.md", "summary.md",
               "summary.json", "training_curves.png", "gap_by_rank.png", "controller_heatmaps.png"]


def test_sweep_and_report_replace_planted_file_links_and_refuse_folder_links(made, tmp_path, capsys):
    spec = tiny_spec(made, tmp_path)
    out = tmp_path / "sw"
    out.mkdir()
    victims = {}
    for name in SWEEP_FILES:
        (tmp_path / "v" / name).mkdir(parents=True)
        victims[name] = victim(tmp_path / "v" / name)
        (out / name).symlink_to(victims[name])
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    assert all(untouched(v) for v in victims.values())
    assert not any((out / n).is_symlink() for n in SWEEP_FILES)
    for name in ("results.md", "summary.json"):
        (out / name).unlink()
        (out / name).symlink_to(victims[name])
    assert main(["report", str(out)]) == 0
    assert all(untouched(v) for v in victims.values())
    vd = victim(tmp_path, "dir")
    run = SweepSpec.load(spec).expand()[0].name
    for i, link in enumerate(["runs", f"runs/{run}"]):
        other = tmp_path / f"sw{i}"
        (other / link).parent.mkdir(parents=True)
        (other / link).symlink_to(vd)
        assert main(["sweep", str(spec), "--out", str(other)]) == 2
        one_line_error(capsys, f"{link.split('/')[-1]} is a symbolic link")
        assert untouched(vd)


def test_a_demo_folder_is_replaced_only_if_it_holds_nothing_but_demo_output(tmp_path, monkeypatch):
    from ouroboros_lm.atomic import write_marker
    from ouroboros_recipes.demo import DEMO_OUTPUTS

    out = tmp_path / "demo"
    (out / "checkpoints" / "step_000010").mkdir(parents=True)
    for name in ("adapter_config.json", "metrics.jsonl", "depth_curve.png", "checkpoints/step_000010/optimizer.pt"):
        (out / name).write_text("x")
    with pytest.raises(ValueError, match="was not written by `ouroboros demo`"):  # no marker: not ours
        check_removable(out, "demo", patterns=DEMO_OUTPUTS)
    write_marker(out, "demo")
    (out / "eval.md").write_text("written after the marker, by an interrupted demo")
    check_removable(out, "demo", patterns=DEMO_OUTPUTS)
    (out / "thesis.tex").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files we did not write \(thesis.tex\)"):
        check_removable(out, "demo", patterns=DEMO_OUTPUTS)
    (out / "thesis.tex").unlink()
    for mine in ("figures/plot.png", "checkpoints/notes.txt", "heal-weights/numbers.csv", ".draft.tmp",
                 "checkpoints/step_000010/notes.md"):  # a user's files in a demo's folders are never its outputs
        (out / mine).parent.mkdir(parents=True, exist_ok=True)
        (out / mine).write_text("mine")
        with pytest.raises(ValueError, match="holds files we did not write"):
            check_removable(out, "demo", patterns=DEMO_OUTPUTS)
        (out / mine).unlink()
    monkeypatch.chdir(out)
    with pytest.raises(ValueError, match="working folder"):
        check_removable(Path("."), "demo", patterns=DEMO_OUTPUTS)


@pytest.mark.parametrize("change, match", [
    ({"demo": {"mix": ("no-such-folder",)}}, "no such folder"),
    ({"demo": {"corpus": "no-such-corpus"}}, "State of the Union corpus not found"),
    ({"eval": {"depths": (1, 64)}}, "--depths must be an integer in"),
])
def test_a_demo_with_a_bad_argument_touches_nothing(tmp_path, monkeypatch, change, match):
    """Every argument is checked before an earlier demo's folder is replaced: nothing is deleted."""
    from ouroboros_lm.atomic import write_marker
    from ouroboros_recipes.demo import DemoRun, run_demo

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    out.mkdir()
    (out / "eval.md").write_text("an earlier demo's table")
    write_marker(out, "demo")
    corpus = tmp_path / "sotu"
    corpus.mkdir()
    for year in (1999, 2005):
        (corpus / f"{year}_x.txt").write_text("text")
    demo = {"out": str(out), "corpus": str(corpus), "mix": ("none",), **change.get("demo", {})}
    run = DemoRun.load(changes={"demo": demo, **{k: v for k, v in change.items() if k != "demo"}})
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        run_demo(run)
    assert (out / "eval.md").read_text() == "an earlier demo's table"
