"""The speed users buy: the full base and heal models exported `--format plain`, side by side in one run, in stock
transformers and (where llama-cpp-python is installed, `make llama-cpp`) in llama.cpp on their GGUF files.

    .venv/bin/python bench/deploy_speed.py --adapters runs/demo/heal-compute runs/demo/heal-weights --out runs/deploy

Per model: batch-1 prompt and greedy decode tokens/s (median of interleaved rounds), peak resident memory of a fresh
process running the same, bytes on disk; the decode speed-up over the full model against its ideal, the ratio of
weights read per token (layers plus head). Writes OUT/deploy_speed.json and OUT/deploy_speed.md.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
from ouroboros_lm.atomic import ensure_dir, write_json, write_text
from ouroboros_lm.export import convert_to_gguf, export_gguf, export_plain, find_converter
from ouroboros_lm.loading import cache_dir, load_tokenizer, resolve_source
from ouroboros_recipes.deploy import measure_folders


def prompt_ids(tok, n: int) -> list[int]:
    """n tokens of a held-out address (2001 on), or of a fixed sentence repeated when the addresses are absent."""
    files = sorted((cache_dir() / "sotu").glob("20[0-2]*.txt"))
    text = files[0].read_text() if files else "The state of our Union is strong, and our people are resilient. " * 64
    ids = tok(text).input_ids[:n]
    if len(ids) < n:
        raise SystemExit(f"the prompt text has {len(ids)} tokens, fewer than --prompt-tokens {n}")
    return ids


def gguf_of_base(folder: str, out: Path, outtype: str) -> Path:
    """The full base (already a plain folder) through llama.cpp's converter."""
    path = out / f"full-{outtype}.gguf"
    return path if path.is_file() else convert_to_gguf(folder, path, outtype, find_converter())


def table(results: dict) -> str:
    lines = ["| model | runtime | layers | on disk | peak memory | prompt tok/s | decode tok/s | prompt vs full | "
             "decode vs full | ideal | of ideal |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        peak = f"{r['peak_rss_bytes'] / 2**20:.0f} MiB" if r.get("peak_rss_bytes") else ""
        lines.append(f"| {name} | {r['runtime']} | {r['layers']} | {r['disk_bytes'] / 2**20:.0f} MiB | {peak} | "
                     f"{r['prompt_tps']:.0f} | {r['decode_tps']:.1f} | {r['prompt_x']:.2f}x | {r['decode_x']:.2f}x | "
                     f"{r['ideal_x']:.2f}x | {100 * r['decode_x'] / r['ideal_x']:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", nargs="+", required=True, help="heal-model adapters (or plain-exportable loops)")
    ap.add_argument("--base", default="smollm2-135m", help="the full model they were cut from")
    ap.add_argument("--out", default="runs/deploy", help="folder for the exports and the results")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--outtype", default="f32", help="llama.cpp tensor type of the GGUF files (f32, f16, q8_0)")
    ap.add_argument("--no-peak", action="store_true", help="skip the peak-memory processes")
    args = ap.parse_args()
    out = ensure_dir(Path(args.out))
    tok = load_tokenizer(args.base)
    ids = prompt_ids(tok, args.prompt_tokens)
    folders = {"full": resolve_source(args.base)}
    for adapter in args.adapters:
        name = Path(adapter).name
        folders[name] = str(out / f"{name}-plain")
        if not (Path(folders[name]) / "config.json").is_file():
            export_plain(adapter, folders[name])
    llama = importlib.util.find_spec("llama_cpp") is not None
    ggufs = {}
    if llama:
        try:
            find_converter()
            ggufs = {"full": gguf_of_base(folders["full"], out, args.outtype)}
            for adapter in args.adapters:
                path = out / f"{Path(adapter).name}-{args.outtype}.gguf"
                if not path.is_file():
                    export_gguf(adapter, path, outtype=args.outtype)
                ggufs[Path(adapter).name] = str(path)
        except ValueError as e:
            print(f"llama.cpp skipped: {e}")
    print(f"measuring {len(folders) + len(ggufs)} models, {args.rounds} interleaved rounds of a {len(ids)}-token "
          f"prompt and {args.new_tokens} decoded tokens, {torch.get_num_threads()} threads; each runtime on its own")
    # each runtime on its own: llama.cpp's thread pool and torch's slow each other down when interleaved
    results = measure_folders(folders, ids, args.new_tokens, args.rounds, peak=not args.no_peak)
    if ggufs:
        gguf_rows = measure_folders(ggufs, ids, args.new_tokens, args.rounds, peak=not args.no_peak,
                                    runtime="llama.cpp", configs=folders)
        results.update({f"{name} (gguf)": row for name, row in gguf_rows.items()})
    md = table(results)
    print(md)
    write_json(out / "deploy_speed.json", {"settings": vars(args), "threads": torch.get_num_threads(),
                                           "results": results})
    write_text(out / "deploy_speed.md", md + "\n")


if __name__ == "__main__":
    main()
