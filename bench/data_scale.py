"""Corpora larger than memory (issue 24): what `prepare` and `train` cost as the corpus grows.
Each measurement runs in a fresh process; peak RSS is that process's maximum resident set
(getrusage), tokenizer worker processes reported apart.

* prepare: State of the Union addresses (the `make assets` cache) repeated into files of 1 MB,
  20 MB and 200 MB in all, prepared with SmolLM2's tokenizer by 1 process and by 2 worker
  processes; beside them, the call used before prepared folders, `tokenizer(list_of_texts)` on
  all of the text at once (20 MB only: it holds every encoding at once). CPU seconds of all the
  processes beside the wall time say how much of the machine the run actually had.
* startup: `ouroboros train` on prepared folders of 10 MB and of 2 GB of tokens (synthetic
  shards written directly, random token ids), a tiny random Llama with SmolLM2's tokenizer so the
  step itself costs little: seconds from launching the command to its first training step, RSS
  then, peak RSS (which includes the sampler's shuffle, 4 bytes a block, the step's own
  allocations, and file pages of the mapped shards: shared page cache, more of it while a freshly
  written shard is still in the cache), and the anonymous / file-backed split at the end. The first start checks every shard's checksum (reading it all); later starts
  find the check stamped and only map the files.

    python bench/data_scale.py prepare [--mb 20,200]
    python bench/data_scale.py startup [--large-gb 2]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def child(code: str, *args: str, env: dict | None = None) -> dict:
    """Run `code` in a fresh Python (argv[1]: the launch time); it prints one JSON line last."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code, str(t0), *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{HERE}", **(env or {})})
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"child failed ({proc.returncode}): {code[:60]}...")
    return json.loads(out.strip().splitlines()[-1])


PREPARE = """
import json, resource, sys, time
from ouroboros_lm.loading import load_tokenizer
from ouroboros_lm.prepare import PrepareConfig, prepare
tok = load_tokenizer("smollm2-135m")
t, r = time.time(), resource.getrusage(resource.RUSAGE_SELF)
sys.argv.append(str(r.ru_utime + r.ru_stime))
m = prepare([sys.argv[2]], sys.argv[3], tok, PrepareConfig(workers=int(sys.argv[4])), progress=False)
tokens = m["splits"]["train"]["tokens"] + m["splits"]["heldout"]["tokens"]
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall_s": time.time() - t, "tokens": tokens, "tok_s": tokens / (time.time() - t),
                  "peak_mb": me.ru_maxrss / 1024, "worker_peak_mb": kids.ru_maxrss / 1024,
                  "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime - float(sys.argv[5])}))
"""

PLAIN = """
import json, resource, sys, time
from pathlib import Path
from ouroboros_lm.loading import load_tokenizer
tok = load_tokenizer("smollm2-135m")
t = time.time()
texts = [p.read_text() for p in sorted(Path(sys.argv[2]).glob("*.txt"))]
ids = tok(texts, add_special_tokens=False)["input_ids"]
tokens = sum(len(x) + 1 for x in ids)
print(json.dumps({"wall_s": time.time() - t, "tokens": tokens, "tok_s": tokens / (time.time() - t),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

TRAIN = """
import json, resource, sys, time
from ouroboros_lm.train import Trainer
first = []
step = Trainer.train_step
def timed(self, *a, **k):
    if not first:
        rss = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
        first.extend([time.time(), rss])
    return step(self, *a, **k)
Trainer.train_step = timed
from ouroboros_lm.cli import main
assert main(["train", "--adapter", sys.argv[2], "--data", sys.argv[3], "--steps", "2", "--batch-size", "1",
             "--seq-len", "128", "--depths", "1", "--log-every", "1", "--eval-every", "100", "--eval-blocks", "2",
             "--save-every", "100", "--warmup-steps", "0"]) == 0
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"first_step_s": first[0] - float(sys.argv[1]), "rss_at_first_step_mb": first[1],
                  "anon_mb_at_end": int(status["RssAnon"].split()[0]) / 1024,
                  "file_mb_at_end": int(status["RssFile"].split()[0]) / 1024,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def text_corpus(folder: Path, mb: int) -> Path:
    """`mb` MB of addresses in files of about 1 MB (each a different document name)."""
    from ouroboros_lm.loading import cache_dir

    if (folder / ".done").is_file():
        return folder
    addresses = [p.read_text() for p in sorted((cache_dir() / "sotu").glob("*.txt"))]
    if not addresses:
        raise SystemExit("State of the Union corpus missing: run `make assets`")
    folder.mkdir(parents=True, exist_ok=True)
    i = 0
    for f in range(mb):
        chunk = []
        while sum(map(len, chunk)) < 1 << 20:
            chunk.append(addresses[i % len(addresses)])
            i += 1
        (folder / f"part_{f:04d}.txt").write_text("\n".join(chunk))
    (folder / ".done").write_text("")
    return folder


def run_prepare(args) -> None:
    root = Path(args.root)
    rows = []
    for mb in args.mb:
        src = text_corpus(root / f"text{mb}", mb)
        for workers in (1, 2):
            out = root / f"prepared{mb}-w{workers}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            r = child(PREPARE, str(src), str(out), str(workers))
            rows.append({"what": f"prepare {mb} MB, {workers} process{'es' if workers > 1 else ''}", **r})
            print(json.dumps(rows[-1]), flush=True)
        if mb <= 20:
            rows.append({"what": f"tokenizer(list_of_texts) {mb} MB", **child(PLAIN, str(src))})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| run | tokens | wall s | tokens/s | CPU s (all processes) | peak RSS MB | worker peak MB |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['tokens']:,} | {r['wall_s']:.1f} | {r['tok_s']:,.0f} | {r.get('cpu_s', 0):.1f} | "
              f"{r['peak_mb']:.0f} | {r.get('worker_peak_mb', 0):.0f} |")


def synthetic_folder(folder: Path, n_tokens: int, tokenizer, doc_tokens: int = 1024) -> Path:
    """A prepared folder whose train shard holds `n_tokens` random ids (documents of `doc_tokens`),
    written directly (no text), with a small held-out shard; manifest and checksums as `prepare` writes."""
    import numpy as np

    from ouroboros_lm.shards import FORMAT, MANIFEST, VERSION, tokenizer_identity

    if (folder / MANIFEST).is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng, shards = np.random.default_rng(0), {}
    for split, n in (("train", n_tokens), ("heldout", 1 << 16)):
        h_bin, h_idx, left, lo, hi = hashlib.sha256(), hashlib.sha256(), n, len(tokenizer), 0
        with open(folder / f"{split}-00000.bin", "wb") as fb, open(folder / f"{split}-00000.idx", "wb") as fi:
            while left:
                k = min(left, 1 << 26)
                ids = rng.integers(0, len(tokenizer), k, dtype=np.uint16)
                lo, hi, data = min(lo, int(ids.min())), max(hi, int(ids.max())), ids.tobytes()
                ends = np.arange(n - left + doc_tokens, n - left + k + 1, doc_tokens, dtype="<i8").tobytes()
                fb.write(data), fi.write(ends), h_bin.update(data), h_idx.update(ends)
                left -= k
        shards[split] = {"documents": n // doc_tokens, "tokens": n, "shards": [
            {"name": f"{split}-00000", "tokens": n, "documents": n // doc_tokens, "min_token": lo,
             "max_token": hi, "sha256": {"bin": h_bin.hexdigest(), "idx": h_idx.hexdigest()}}]}
    manifest = {"format": FORMAT, "version": VERSION, "tokenizer": tokenizer_identity(tokenizer),
                "vocab_size": len(tokenizer), "eos": tokenizer.eos_token_id, "dtype": "<u2", "splits": shards,
                "sources": [{"source": "synthetic", "role": "data"}], "heldout": {"rule": "synthetic"}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folder


def tiny_adapter(root: Path, tokenizer) -> Path:
    """A 4-layer random Llama with SmolLM2's vocabulary and tokenizer, converted to an adapter."""
    import shutil

    import torch

    from common import random_base
    from ouroboros_lm import OuroborosConfig, OuroborosModel, save_adapter

    base, dims = root / "tiny-base", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2)
    model = random_base("smollm2", "cpu", torch.float32, **dims)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    model = OuroborosModel.from_base(model, OuroborosConfig(n_prelude=1, recurrent_layer=2, n_coda=1, rank=4,
                                                            max_depth=8), base_name=str(base))
    shutil.rmtree(root / "adapter", ignore_errors=True)
    save_adapter(model, root / "adapter")
    return root / "adapter"


def run_startup(args) -> None:
    import shutil

    from ouroboros_lm.loading import load_tokenizer

    root, tok = Path(args.root), load_tokenizer("smollm2-135m")
    sizes = {"10 MB": 5 * 2**20, f"{args.large_gb:g} GB": int(args.large_gb * 2**29)}  # uint16: 2 bytes a token
    rows = []
    for label, n in sizes.items():
        data = synthetic_folder(root / f"synthetic-{label.replace(' ', '')}", n, tok)
        for start in ("first start", "later start"):
            if start == "first start":
                shutil.rmtree(Path(os.environ["OUROBOROS_DATA_CACHE"]) / "verified", ignore_errors=True)
            adapter = tiny_adapter(root, tok)
            rows.append({"what": f"{label} of tokens, {start}", **child(TRAIN, str(adapter), str(data))})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| corpus | command to first step, s | RSS at the first step, MB | peak RSS, MB | at the end: anonymous, "
          "file-backed MB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['first_step_s']:.1f} | {r['rss_at_first_step_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['anon_mb_at_end']:.0f}, {r['file_mb_at_end']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("prepare", "startup"))
    p.add_argument("--mb", type=lambda s: [int(x) for x in s.split(",")], default=[20, 200],
                   help="text sizes to prepare, MB")
    p.add_argument("--large-gb", type=float, default=2.0, help="the large synthetic corpus, GB of tokens")
    p.add_argument("--root", default="/tmp/ouroboros-data-scale", help="scratch folder")
    args = p.parse_args()
    os.environ.setdefault("OUROBOROS_DATA_CACHE", str(Path(args.root) / "cache"))
    sys.path[:0] = [str(SRC), str(HERE)]
    run_prepare(args) if args.what == "prepare" else run_startup(args)


if __name__ == "__main__":
    main()
