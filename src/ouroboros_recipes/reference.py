"""A sweep's reference losses (full model and pruned baseline), keyed by what they depend on.

`reference.json` holds, per split, the two losses and a key: the sha256 of the base's name, the
layer split and the very token blocks scored. A split whose key no longer matches (another
seq_len, block count, data source or tokenizer) is scored again, never reused; a finished run
whose result was scored on other blocks is re-evaluated on those splits from its saved adapter.
It also records what the runs were TRAINED on (seq_len and a hash of the training blocks): a spec
that changed those while runs exist in the folder is refused, since its runs could not be
compared with the new ones.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ouroboros_lm.atomic import read_json, write_json

REFERENCE = "reference.json"
RESULT = "result.json"
TOLERANCE = 1e-4  # results written before keys existed: the same blocks give the same reference losses


def blocks_digest(blocks) -> str:
    if hasattr(blocks, "digest"):  # shards.Blocks: the same digest, read a chunk at a time
        return blocks.digest()
    t = blocks.detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha256(f"{tuple(t.shape)}".encode() + t.numpy().tobytes()).hexdigest()


def split_keys(base: str, split: dict, splits: dict[str, torch.Tensor]) -> dict[str, str]:
    head = json.dumps({"base": base, "split": split}, sort_keys=True)
    return {name: hashlib.sha256((head + blocks_digest(b)).encode()).hexdigest() for name, b in splits.items()}


def corpus_key(corpus) -> dict:
    return {"seq_len": corpus.seq_len, "train_sha256": blocks_digest(corpus.train)}


def read_reference(out: Path) -> dict:
    path = out / REFERENCE
    if not path.is_file() or path.is_symlink():
        return {"tokens": {}}
    ref = read_json(path, "sweep reference")
    if not isinstance(ref, dict) or not isinstance(ref.get("tokens", {}), dict) or \
            not isinstance(ref.get("keys", {}), dict):
        raise ValueError(f"{path}: expected an object with 'tokens' and 'keys' mappings")
    return {"tokens": {}, **ref}


def finished_results(out: Path) -> dict[Path, dict]:
    res = {}
    for path in sorted((out / "runs").glob(f"*/{RESULT}")):
        r = read_json(path, "run result")
        if not isinstance(r, dict) or not isinstance(r.get("losses"), dict):
            raise ValueError(f"{path}: expected a run result (an object with 'losses')")
        res[path] = r
    return res


def check_trained_on(out: Path, ref: dict, corpus) -> None:
    """Refuse a sweep folder whose runs were trained on other blocks than the spec now gives."""
    now = corpus_key(corpus)
    was = ref.get("corpus")
    trained = [p for p in (out / "runs").glob("*") if p.is_dir()] if (out / "runs").is_dir() else []
    seq_lens = {r.get("seq_len") for r in finished_results(out).values()} - {None}
    if was is None:  # written before the key existed: what the results say
        differs = bool(seq_lens - {now["seq_len"]})
        was = {"seq_len": next(iter(seq_lens - {now["seq_len"]}), now["seq_len"])}
    else:
        differs = trained and was != now
    if differs:
        change = f"seq_len {was.get('seq_len')} -> {now['seq_len']}" if was.get("seq_len") != now["seq_len"] \
            else "the training blocks differ (data, tokenizer or heldout split)"
        raise ValueError(f"{out} holds runs trained on other data than the spec now gives ({change}): their scores "
                         "cannot be mixed with new ones; use another --out (nothing was changed)")


def stale_splits(result: dict, keys: dict[str, str], reference: dict) -> list[str]:
    """The splits a finished run must be (re-)evaluated on: missing, or scored on other blocks."""
    out = []
    for split in keys:
        if split not in result["losses"]:
            out.append(split)
        elif "reference_keys" in result:
            if result["reference_keys"].get(split) != keys[split]:
                out.append(split)
        else:  # legacy: the reference losses it was scored against tell whether the blocks were the same
            old = (result.get("reference") or {}).get(split) or {}
            if any(not isinstance(old.get(m), (int, float)) or abs(old[m] - reference[split][m]) > TOLERANCE
                   for m in ("full", "baseline")):
                out.append(split)
    return out


def save_reference(out: Path, ref: dict) -> None:
    write_json(out / REFERENCE, ref)
