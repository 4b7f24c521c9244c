"""lm-evaluation-harness on an exported tiny model and our local tasks: its word and byte
perplexity equal ours computed independently (our forward, our sums), for the recursion and,
through `model_args=...,baseline=True`, for the pruned stack; the multiple-choice task runs."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from conftest import TINY_SPLIT, assert_equivalent, randomize_trainables, save_tiny_base, tiny_tokenizer
from ouroboros_lm import OuroborosConfig, OuroborosModel, load_adapter, load_base_model, save_adapter
from ouroboros_lm.cli import main
from ouroboros_lm.export import export_hf
from ouroboros_lm.harness import TASKS_DIR, load_passages, next_sentence_items

pytestmark = pytest.mark.harness
lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm-eval)")

DEPTH = 3
# Passages shorter than the tiny model's 256 positions (character tokens), so the harness scores
# each in one window after its prefix token (the tokenizer has no BOS: EOS is the prefix).
TEXT = ("The cat sat on the mat. It was warm there. The dog ran past. Birds sang all day. Rain fell at night.\n\n"
        "A second passage, with other words. Then some more. And more yet. Stop here now. Go home, all of you.\n\n"
        "Short one, with   odd spacing.\n")


def our_perplexities(model, passages: list[str], **kw) -> tuple[float, float]:
    """(word perplexity, byte perplexity): exp(-sum of log-likelihoods / words or bytes)."""
    tok = tiny_tokenizer()
    total, words, nbytes = 0.0, 0, 0
    for text in passages:
        ids = torch.tensor([[tok.eos_token_id] + tok(text).input_ids])
        with torch.no_grad():
            logp = model(ids, **kw).logits[0, :-1].double().log_softmax(-1)
        total += float(logp.gather(-1, ids[0, 1:, None]).sum())
        words += len(re.split(r"\s+", text))
        nbytes += len(text.encode())
    return math.exp(-total / words), math.exp(-total / nbytes)


@pytest.mark.equivalence
def test_harness_perplexity_equals_ours(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = save_tiny_base(tmp_path / "base")
        model = OuroborosModel.from_base(load_base_model(base), OuroborosConfig(**TINY_SPLIT), base_name=base)
        randomize_trainables(model, scale=0.3)
        save_adapter(model, tmp_path / "adapter")
        export_hf(tmp_path / "adapter", tmp_path / "hf", depth=DEPTH)
        data = tmp_path / "heldout.txt"
        data.write_text(TEXT)
        passages = load_passages(str(data))["test"]["text"]
        assert len(passages) == 3 and max(len(p) for p in passages) < 250
        results = {"ouroboros": lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={tmp_path / 'hf'},trust_remote_code=True,dtype=float32",
            tasks=["ouroboros_ppl", "ouroboros_next_sentence"], batch_size=1, device="cpu",
            task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data": str(data)}),
        )["results"]}
        # the pruned stack through the shortcut: `ouroboros harness --baseline` (model_args baseline=True)
        assert main(["harness", "--model", str(tmp_path / "hf"), "--data", str(data), "--baseline",
                     "--out", str(tmp_path / "baseline.json")]) == 0
        results["baseline"] = json.loads((tmp_path / "baseline.json").read_text())
        ours = load_adapter(tmp_path / "adapter").eval()
        want = {"ouroboros": our_perplexities(ours, passages, depth=DEPTH),
                "baseline": our_perplexities(ours, passages, baseline=True)}
    finally:
        torch.set_num_threads(n)
    layers = TINY_SPLIT["n_prelude"] + DEPTH + TINY_SPLIT["n_coda"]  # float32 logits, through this many layers
    for name, (word, byte) in want.items():
        ppl = results[name]["ouroboros_ppl"]  # compared as log-perplexities: means of float32 log-probabilities
        assert_equivalent(math.log(ppl["word_perplexity,none"]), math.log(word), dtype=torch.float32, depth=layers, msg=name)
        assert_equivalent(math.log(ppl["byte_perplexity,none"]), math.log(byte), dtype=torch.float32, depth=layers, msg=name)
        mc = results[name]["ouroboros_next_sentence"]
        assert 0.0 <= mc["acc,none"] <= 1.0 and mc["sample_len"] == len(next_sentence_items(str(data)))
    assert want["ouroboros"] != want["baseline"]


def test_tasks_ship_with_the_package_and_read_the_sample_offline():
    assert {"ouroboros_ppl.yaml", "ouroboros_next_sentence.yaml", "sample.txt"} <= {p.name for p in TASKS_DIR.iterdir()}
    items = next_sentence_items()
    assert len(items) > 10 and all(len(i["choices"]) == 4 and i["choices"][i["label"]] for i in items)
    assert items == next_sentence_items()  # seeded: the same questions every time
    assert len(load_passages()["test"]) >= 3
