"""What the demo's heal models buy where they are deployed: each written as the base family's plain model
(`export --format plain`), then measured beside the full model in stock transformers, in one process, in
interleaved rounds (`ouroboros_lm.speed`): decode and prompt tokens/s, bytes on disk, against the ideal speed-up
(the ratio of weights each token reads). `bench/deploy_speed.py` measures the same at length, and in llama.cpp."""
from __future__ import annotations

from pathlib import Path

from ouroboros_lm.evaluate import gap_recovered
from ouroboros_lm.export import write_plain
from ouroboros_lm.loading import resolve_source
from ouroboros_lm.speed import (LlamaCppRunner, TransformersRunner, disk_bytes, measure, peak_memory, round_ratio,
                                weights_per_token)

PLAIN_FOLDER = "plain-{n}-layers"  # beside the demo's adapters: `PLAIN_FOLDER.format(n=kept layers)`


def prompt_of(corpus, n: int) -> list[int]:
    """The first n tokens of the first held-out block (what a user's prompt looks like)."""
    return [int(t) for t in corpus.heldout[:1][0, :n]]


def measure_folders(paths: dict[str, str], ids: list[int], new_tokens: int, rounds: int, peak: bool = False,
                    runtime: str = "transformers", configs: dict[str, str] | None = None) -> dict[str, dict]:
    """{name: row} for models `paths` (one named "full", the reference) measured together in one runtime, in
    interleaved rounds (`speed.measure`): plain model folders in stock transformers, or (runtime "llama.cpp") GGUF
    files, each with its plain folder in `configs` (where its layers are read). A row: tokens/s, bytes on disk,
    weights per token, and against the full model: decode_x and prompt_x (`speed.round_ratio`), ideal_x (weights
    per token), size_x (bytes on disk) and, with `peak` (a fresh process each), peak_x."""
    from transformers import AutoConfig

    if runtime == "llama.cpp":
        runners = {name: LlamaCppRunner(p) for name, p in paths.items()}
        config_of = {name: AutoConfig.from_pretrained((configs or {})[name]) for name in paths}
    else:
        runners = {name: TransformersRunner(p) for name, p in paths.items()}
        config_of = {name: r.config for name, r in runners.items()}
    speeds = measure(runners, ids, new_tokens, rounds)
    rows = {}
    for name, s in speeds.items():
        config = config_of[name]
        model = getattr(runners[name], "model", None)
        rows[name] = {"runtime": s.runtime, "layers": config.num_hidden_layers, "decode_tps": s.decode,
                      "prompt_tps": s.prompt, "decode_rounds": s.decode_tps, "prompt_rounds": s.prompt_tps,
                      "disk_bytes": disk_bytes(Path(paths[name])), "weight_bytes": s.weight_bytes,
                      "weights_per_token": weights_per_token(config), "folder": str(paths[name]),
                      "class": type(model).__name__ if model is not None else "GGUF"}
    for r in runners.values():
        if hasattr(r, "close"):
            r.close()
    del runners
    for name in rows:
        rows[name]["peak_rss_bytes"] = peak_memory(runtime, paths[name], ids, new_tokens) if peak else None
    f, full = rows["full"], speeds["full"]
    for name, r in rows.items():
        r["decode_x"], r["prompt_x"] = round_ratio(speeds[name], full), round_ratio(speeds[name], full, "prompt")
        r["ideal_x"] = f["weights_per_token"] / r["weights_per_token"]
        r["size_x"] = r["disk_bytes"] / f["disk_bytes"]
        r["peak_x"] = r["peak_rss_bytes"] / f["peak_rss_bytes"] if peak else None
    return rows


def deploy_rows(base: str, heals: list, report, out: Path, ids: list[int], new_tokens: int = 32,
                rounds: int = 5) -> dict:
    """{row name: measurement} for the full model and each heal model (`heals`: (model, row name, summary)),
    each heal model written to out/PLAIN_FOLDER first. Prints one line per heal model."""
    folders = {"full": resolve_source(base)}
    for model, name, _ in heals:
        n = len(model.config.kept_layers(model.base_config.num_hidden_layers))
        folders[name] = str(write_plain(model, out / PLAIN_FOLDER.format(n=n)))
    rows = measure_folders(folders, ids, new_tokens, rounds)
    print(f"      deployed as the base's own model ({rows['full']['class']}, stock transformers, batch 1, "
          f"{len(ids)}-token prompt, {new_tokens} greedy tokens, median of {rounds} interleaved rounds):")
    for name, r in rows.items():
        if name == "full":
            continue
        held = report.row("heldout", name) if report is not None else None
        base, top = (report.row("heldout", m) for m in ("baseline", "full")) if report is not None else (None, None)
        gap = f"{gap_recovered(held.loss, base.loss, top.loss):.1f}% of the held-out gap, " if held and base and top \
            else ""
        print(f"      {name.split(', LoRA')[0]}: {gap}{r['decode_x']:.2f}x the full model's decode speed (ideal "
              f"{r['ideal_x']:.2f}x), {r['prompt_x']:.2f}x its prompt speed, {r['size_x']:.2f}x its size on disk "
              f"({r['folder']})")
    return rows
