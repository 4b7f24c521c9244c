"""Distillation from stored teacher predictions (targets.py, ops.chunked_topk_distill): the fused loss equals
its reference and the exact KL; the stored predictions are the teacher's own; training on them equals online
distillation where they hold the whole distribution, and never loads the teacher once they are there."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, TINY_SPLIT, assert_equivalent, save_tiny_base, tiny_base, tiny_tokenizer, write_corpus
from ouroboros_lm import OuroborosConfig, OuroborosModel, ops, targets
from ouroboros_lm.cli import main
from ouroboros_lm.data import build_corpus
from ouroboros_lm.reading import DataError
from ouroboros_lm.shards import Prepared
from ouroboros_lm.train import TrainConfig, train

V = TINY["vocab_size"]


def stored(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-K ids and log-probabilities (+ the log of the rest) of logits [N, V], in float64."""
    lp = teacher_logits.double().log_softmax(-1)
    top = lp.topk(k)
    rest = torch.logsumexp(lp.scatter(-1, top.indices, float("-inf")), -1)
    return top.indices, torch.cat([top.values, rest.unsqueeze(-1)], -1)


def problem(n=37, h=8, v=50, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, dtype=torch.float64, generator=g, requires_grad=True)
    weight, bias = torch.randn(v, h, dtype=torch.float64, generator=g), torch.randn(v, dtype=torch.float64, generator=g)
    targets_ = torch.randint(0, v, (n,), generator=g)
    targets_[[3, 20]] = ops.IGNORE
    t_logits = 2 * torch.randn(n, v, dtype=torch.float64, generator=g)
    return hidden, weight, bias, targets_, t_logits


@pytest.mark.equivalence
@pytest.mark.parametrize("ce_weight,kl_weight", [(1.0, 0.5), (0.0, 1.0), (1.0, 0.0)])
@pytest.mark.parametrize("chunk", [5, 64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_fused_top_k_loss_equals_its_reference_and_its_gradient(ce_weight, kl_weight, chunk, with_bias):
    hidden, weight, bias, tg, t_logits = problem()
    bias = bias if with_bias else None
    ids, logp = stored(t_logits, 6)
    ours = ops._ChunkedTopKDistill.apply(hidden, weight, bias, tg, ids, logp, ce_weight, kl_weight, chunk, True)
    ref = ops.chunked_topk_distill_reference(hidden, weight, bias, tg, ids, logp, ce_weight, kl_weight)
    g_ours, = torch.autograd.grad(ours[0], hidden)
    g_ref, = torch.autograd.grad(ref[0], hidden)
    for a, b in zip(ours, ref):  # both compute in float32
        assert_equivalent(a, b, dtype=torch.float32)
    assert_equivalent(g_ours, g_ref, dtype=torch.float32)
    # the CE term is the plain next-token loss
    plain = F.cross_entropy(F.linear(hidden, weight, bias), tg, ignore_index=ops.IGNORE)
    assert_equivalent(ours[1], plain, dtype=torch.float32)


@pytest.mark.equivalence
def test_with_all_but_one_token_stored_the_kl_is_the_exact_kl_and_its_gradient():
    hidden, weight, bias, tg, t_logits = problem(v=30)
    ids, logp = stored(t_logits, 29)
    ours = ops._ChunkedTopKDistill.apply(hidden, weight, bias, tg, ids, logp, 0.0, 1.0, 7, True)[0]
    valid = tg != ops.IGNORE
    exact = (t_logits.softmax(-1) * (t_logits.log_softmax(-1) - F.linear(hidden, weight, bias).log_softmax(-1))
             ).sum(-1)[valid].mean()  # float64, by hand
    assert_equivalent(ours, exact, dtype=torch.float32)
    g_ours, = torch.autograd.grad(ours, hidden)
    g_exact, = torch.autograd.grad(exact, hidden)
    assert_equivalent(g_ours, g_exact, dtype=torch.float32)


def test_fewer_stored_tokens_only_merge_the_rest_into_one_bucket():
    """The K + 1 bucket KL is the KL of the two distributions with their tails lumped: <= the exact KL."""
    hidden, weight, bias, tg, t_logits = problem(v=30)
    tg[:] = 0
    kls = [ops.chunked_topk_distill_reference(hidden, weight, bias, tg, *stored(t_logits, k), 0.0, 1.0)[2].item()
           for k in (1, 4, 16, 29)]
    assert kls == sorted(kls) and kls[0] > 0  # more buckets, more of the divergence seen


# ---------------------------------------------------------------------- the teacher pass
@pytest.fixture
def corpus_folder(tmp_path):
    from ouroboros_lm.prepare import PrepareConfig, prepare

    prepare([str(write_corpus(tmp_path / "text", n_docs=12))], tmp_path / "p", tiny_tokenizer(),
            PrepareConfig(heldout_fraction=0.2), progress=False)
    return tmp_path / "p"


def test_the_stored_predictions_are_the_teachers_own_top_k(corpus_folder):
    teacher, prep = tiny_base(), Prepared(corpus_folder)
    tset = targets.teacher_pass(prep, teacher, "tiny", 16, 8, blocks=np.array([5, 0, 7, 5]), progress=False)
    assert sorted(tset.missing(np.arange(tset.n_blocks)).tolist()) == sorted(set(range(tset.n_blocks)) - {0, 5, 7})
    blocks = torch.from_numpy(np.frombuffer(prep.arrays["train"][0][: tset.n_blocks * 16].tobytes(), dtype="<u2")
                              .astype(np.int64)).view(-1, 16)[[7, 0]]
    with torch.no_grad():
        logits = teacher(blocks).logits  # Hugging Face's own forward, independent of ours
    ids, lp = stored(logits.flatten(0, 1), 8)
    got_ids, got_lp = tset.read(np.array([7, 0]))
    assert np.array_equal(got_ids.reshape(-1, 8), ids.numpy())
    np.testing.assert_allclose(got_lp.reshape(-1, 9), lp.numpy(), atol=2e-3, rtol=1e-3)  # stored in float16


def test_a_stopped_teacher_pass_keeps_its_chunks_and_the_next_one_computes_the_rest(corpus_folder, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setattr(targets, "CHUNK_TOKENS", 64)  # 4 blocks of 16 a chunk
    prep, calls = Prepared(corpus_folder), []
    real = targets.teacher_predictions

    def dies_on_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(targets, "teacher_predictions", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        targets.teacher_pass(prep, tiny_base(), "tiny", 16, 4, blocks=np.arange(12), batch_blocks=2, progress=False)
    folder = next(corpus_folder.glob("teacher-*"))
    assert len(json.loads((folder / "targets.json").read_text())["chunks"]) == 1  # the finished chunk only
    monkeypatch.setattr(targets, "teacher_predictions", real)
    resumed = targets.teacher_pass(prep, tiny_base(), "tiny", 16, 4, blocks=np.arange(12), progress=False)
    assert not any(f.name.endswith(".partial") or ".tmp" in f.name for f in folder.iterdir())
    clean = targets.teacher_pass(Prepared(tmp_path / "p"), tiny_base(), "tiny", 16, 4, progress=False,
                                 blocks=np.arange(12))
    a, b = resumed.read(np.arange(12)), clean.read(np.arange(12))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_a_damaged_chunk_or_targets_of_other_tokens_are_refused_or_recomputed(corpus_folder):
    prep = Prepared(corpus_folder)
    tset = targets.teacher_pass(prep, tiny_base(), "tiny", 16, 4, blocks=np.arange(3), progress=False)
    with open(tset.folder / "chunk-00000.lp", "r+b") as f:
        f.write(b"\x00\x7c")
    with pytest.raises(DataError, match="chunk-00000.lp does not match its checksum"):
        targets.find_sets(Prepared(corpus_folder), 16, 4, {}, V)
    m = json.loads((tset.folder / "targets.json").read_text())
    m["token_shards"][0][1] = "0" * 64
    (tset.folder / "targets.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="computed on other token shards"):
        targets.find_sets(Prepared(corpus_folder), 16, 4, {}, V)
    again = targets.teacher_pass(Prepared(corpus_folder), tiny_base(), "tiny", 16, 4, blocks=np.arange(3),
                                 progress=False)  # the pass itself starts that set over
    assert len(again.manifest["chunks"]) == 1 and again.missing(np.arange(3)).size == 0


# ---------------------------------------------------------------------- training on them
def student():
    return OuroborosModel.from_base(tiny_base(), OuroborosConfig(**TINY_SPLIT), base_name="tiny")


def losses(run):
    return [(r["loss"], r["kl"]) for r in map(json.loads, open(run / "metrics.jsonl")) if "kl" in r]


def test_training_on_stored_targets_equals_online_distillation_and_reuses_them(tmp_path, one_thread):
    text = write_corpus(tmp_path / "text", n_docs=12)
    tc = dict(steps=4, batch_size=2, lr=1e-2, warmup_steps=1, log_every=1, eval_every=100, eval_blocks=2,
              save_every=100, depths=(2,), progress=False, distill_weight=1.0, ce_weight=0.5, seed=3)
    loads = []

    def load_teacher():
        loads.append(1)
        return tiny_base()

    online = TrainConfig(**tc, distill_source="online")
    train(student(), build_corpus([str(text)], tiny_tokenizer(), 16), tmp_path / "online", online, teacher=tiny_base())
    full = TrainConfig(**tc, distill_top_k=V - 1)  # every token but one stored: the exact KL, to float16
    train(student(), build_corpus([str(text)], tiny_tokenizer(), 16), tmp_path / "stored", full, teacher=load_teacher)
    assert loads == [1]
    for (lo, ko), (ls, ks) in zip(losses(tmp_path / "online"), losses(tmp_path / "stored")):
        assert abs(lo - ls) < 1e-3 and abs(ko - ks) < 1e-3 * (1 + ko)
    # a second run with the same seed draws the same blocks: the teacher is not loaded again
    train(student(), build_corpus([str(text)], tiny_tokenizer(), 16), tmp_path / "again", full, teacher=load_teacher)
    assert loads == [1] and losses(tmp_path / "again") == losses(tmp_path / "stored")
    # with no teacher given at all, the stored targets suffice
    train(student(), build_corpus([str(text)], tiny_tokenizer(), 16), tmp_path / "none", full)
    assert losses(tmp_path / "none") == losses(tmp_path / "stored")
    # another seed draws other blocks: only those are computed, with the teacher loaded once more
    other = TrainConfig(**{**tc, "seed": 4}, distill_top_k=V - 1)
    train(student(), build_corpus([str(text)], tiny_tokenizer(), 16), tmp_path / "seed4", other, teacher=load_teacher)
    assert loads == [1, 1]


def test_a_teacher_other_than_the_students_base_is_refused(tmp_path):
    text = write_corpus(tmp_path / "text", n_docs=12)
    tc = TrainConfig(steps=2, batch_size=2, depths=(1,), progress=False, distill_weight=1.0, distill_top_k=8)
    with pytest.raises(DataError, match="not the model the student was cut from"):
        train(student(), build_corpus([str(text)], tiny_tokenizer(), 16), tmp_path / "r", tc,
              teacher=lambda: tiny_base(seed=1))


def test_prepare_with_a_teacher_on_the_command_line_and_its_refusals(tmp_path, capsys):
    base, other = save_tiny_base(tmp_path / "base"), tmp_path / "other"
    text = write_corpus(tmp_path / "text", n_docs=12)
    args = ["prepare", str(text), "--out", str(tmp_path / "p"), "--base", base, "--seq-len", "16"]
    assert main(args + ["--teacher", base, "--teacher-top-k", str(V)]) == 2
    assert "--teacher-top-k must be below the vocabulary (97)" in capsys.readouterr().err
    save_tiny_base(other)
    capsys.readouterr()
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(other / "tokenizer.json"))
    tk.add_tokens(["<extra>"])
    tk.save(str(other / "tokenizer.json"))
    assert main(args + ["--teacher", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "its tokenizer is not --base" in err and "\n" not in err and not (tmp_path / "p").exists()
    assert main(args + ["--teacher", base, "--teacher-top-k", "8"]) == 0
    folder = next((tmp_path / "p").glob("teacher-*"))
    m = json.loads((folder / "targets.json").read_text())
    n_blocks = sum(c["blocks"] for c in m["chunks"])
    assert m["top_k"] == 8 and m["seq_len"] == 16 and n_blocks == Prepared(tmp_path / "p").manifest["splits"]["train"][
        "tokens"] // 16
    assert "34 bytes a token" in capsys.readouterr().out  # 8 uint16 ids + 9 float16 log-probabilities
