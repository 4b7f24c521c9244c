"""Two local lm-evaluation-harness tasks, built offline from plain text.

  ouroboros_ppl            rolling log-likelihood over passages (word / byte perplexity, bits per
                           byte), like wikitext, but over the text you point it at
  ouroboros_next_sentence  multiple choice: after three sentences of a passage, which of four
                           sentences comes next (the true one, or three drawn from elsewhere in
                           the text; seeded, so the same text gives the same questions)

Both read `data` from the harness's metadata (a file, a folder of .txt files, a glob, or a list of
them; default: `sample.txt`, the opening of the 2021 State of the Union address, public domain):

    lm_eval --model hf --model_args pretrained=HFDIR,trust_remote_code=True \\
        --include_path $(python -c "import ouroboros_lm.harness as h; print(h.TASKS_DIR)") \\
        --tasks ouroboros_ppl,ouroboros_next_sentence --metadata '{"data": "heldout/*.txt"}'

(a separate process: trust_remote_code runs the folder's modeling_ouroboros.py, which only imports
the installed ouroboros_lm) or `ouroboros harness --model HFDIR --data 'heldout/*.txt'`, which
needs no remote code for a folder of ours and runs a folder's own Python files only with
--trust-remote-code. Passages are runs of whole sentences up to `passage_words` words (default
200; a blank line also ends one).
"""
from __future__ import annotations

import glob
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..settings import REQUIRED, setting, validate_fields

TASKS_DIR = Path(__file__).resolve().parent
SAMPLE = TASKS_DIR / "sample.txt"
TASKS = ("ouroboros_ppl", "ouroboros_next_sentence")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class HarnessConfig:
    """What `ouroboros harness` runs: which model folder, on what text, which tasks."""

    model: str = setting(REQUIRED, "folder from `ouroboros export` (or any HF model folder: the full model)")
    data: tuple[str, ...] | None = setting(None, "text files, folders or globs (default: the sample shipped with the "
                                           "tasks)", metavar="SRC")
    tasks: str = setting(",".join(TASKS), "comma-separated task names")
    depth: int | None = setting(None, "override the exported model's depth (at most its max_depth)", low=1)
    baseline: bool = setting(False, "evaluate the pruned stack instead of the recursion")
    batch_size: int = setting(1, "harness batch size", low=1, high=65536)
    limit: int | None = setting(None, "documents per task (for a quick look)", low=1)
    out: str | None = setting(None, "write the harness's results as JSON here")
    trust_remote_code: bool = setting(False, "let transformers run Python files the model folder ships (never needed "
                                      "for folders from `ouroboros export`: only for a folder of another model type "
                                      "whose code you trust)")

    def __post_init__(self) -> None:
        validate_fields(self)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t for t in self.tasks.split(",") if t)


def text_files(data) -> list[Path]:
    """The .txt files `data` names (a file, folder, glob, or a list of them); the sample without it."""
    if not data:
        return [SAMPLE]
    out: list[Path] = []
    for item in [data] if isinstance(data, (str, os.PathLike)) else data:
        path = Path(os.path.expanduser(str(item)))
        if path.is_dir():
            out += sorted(path.glob("*.txt"))
        elif path.is_file():
            out.append(path)
        else:
            out += [Path(p) for p in sorted(glob.glob(os.path.expanduser(str(item))))]
    if not out:
        raise FileNotFoundError(f"no text files in data={data!r}")
    return out


def passages(data=None, passage_words: int = 200) -> list[list[str]]:
    """Passages (lists of sentences) of every document: whole sentences up to `passage_words`
    words, a blank line ending a passage too."""
    out = []
    for path in text_files(data):
        for para in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
            current: list[str] = []
            for sentence in (s.strip() for s in SENTENCE_END.split(para.strip())):
                if not sentence:
                    continue
                if current and sum(len(s.split()) for s in current) + len(sentence.split()) > passage_words:
                    out.append(current)
                    current = []
                current.append(sentence)
            if current:
                out.append(current)
    return out


def load_passages(data=None, passage_words: int = 200, **_):
    """The ouroboros_ppl dataset: {"test": [{"text": passage}]}."""
    import datasets

    rows = [{"text": " ".join(p)} for p in passages(data, int(passage_words))]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def next_sentence_items(data=None, passage_words: int = 200, max_items: int = 200, seed: int = 1234) -> list[dict]:
    """Multiple-choice items: three sentences of context, the true next sentence and three others."""
    rng = random.Random(seed)
    ps = passages(data, passage_words)
    pool = [s for p in ps for s in p]
    items = []
    for p in ps:
        for i in range(3, len(p)):
            others = rng.sample([s for s in pool if s != p[i]], 3)
            choices = others + [p[i]]
            rng.shuffle(choices)
            items.append({"context": " ".join(p[i - 3:i]), "choices": choices, "label": choices.index(p[i])})
    rng.shuffle(items)
    return items[: int(max_items)]


def load_next_sentence(data=None, passage_words: int = 200, max_items: int = 200, seed: int = 1234, **_):
    """The ouroboros_next_sentence dataset: {"test": [{"context", "choices", "label"}]}."""
    import datasets

    rows = next_sentence_items(data, passage_words, max_items, seed)
    if not rows:
        raise ValueError(f"ouroboros_next_sentence: no passage of data={data!r} has 4 sentences or more")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def check_harness(model: str | os.PathLike, data=None, tasks=TASKS, depth: int | None = None,
                  baseline: bool = False, trust_remote_code: bool = False) -> None:
    """Everything `run_harness` can refuse before loading anything, as one ValueError: the model folder
    (a path lm-evaluation-harness can take, a Hugging Face folder; --depth / --baseline only on an
    exported Ouroboros model, the depth within its max_depth), the task names, and text to build them from."""
    from ..atomic import read_json

    path = Path(model)
    if any(ch in str(model) for ch in ",="):
        raise ValueError(f"--model {model}: lm-evaluation-harness splits its model arguments at ',' and '=', so this "
                         "path would name another folder; move or link the model to a path without them")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model} is not a Hugging Face model folder (run `ouroboros export` first)")
    config = read_json(path / "config.json", "model config")
    if not isinstance(config, dict):
        raise ValueError(f"{path / 'config.json'}: expected a JSON object")
    kind = config.get("model_type")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if isinstance(config.get("auto_map"), dict) and kind not in CONFIG_MAPPING and not trust_remote_code:
        raise ValueError(f"{model} ships its own Python code for model type {kind!r} (auto_map in config.json); "
                         "loading it runs that code: pass --trust-remote-code only if you trust the folder")
    if kind != "ouroboros" and (depth is not None or baseline):
        raise ValueError(f"--depth and --baseline need a folder from `ouroboros export`; {model} holds a "
                         f"{kind!r} model (the full model's row takes neither)")
    if kind == "ouroboros":
        from ..hf_config import OuroborosHFConfig

        cfg = OuroborosHFConfig.from_pretrained(path).check()
        if depth is not None:
            cfg.check_depth(depth, "--depth")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise ValueError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; the tasks are {', '.join(TASKS)}")
    if not passages(data):
        raise ValueError(f"no text in data={data!r}: the tasks need passages of sentences")
    if "ouroboros_next_sentence" in tasks and not next_sentence_items(data, max_items=1):
        raise ValueError(f"ouroboros_next_sentence: no passage of data={data!r} has 4 sentences or more")


def run_harness(model: str | os.PathLike, data=None, tasks=TASKS, depth: int | None = None, baseline: bool = False,
                batch_size: int = 1, limit: int | None = None, device: str | None = None,
                trust_remote_code: bool = False) -> dict:
    """lm-evaluation-harness's `simple_evaluate` with the "hf" model on `model` (a folder from
    `ouroboros export`, or any Hugging Face model folder for the full model's row) and our local
    tasks over `data`; depth / baseline override the exported model's. Returns its results dict.
    A folder of ours needs no remote code (this process has the model class); trust_remote_code
    lets transformers run the Python files a folder of another model type ships, so only for code you trust."""
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    check_harness(model, data, tasks, depth, baseline, trust_remote_code)
    args = f"pretrained={model},trust_remote_code={bool(trust_remote_code)},dtype=float32"
    args += f",depth={depth}" if depth is not None else ""
    args += ",baseline=True" if baseline else ""
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                          metadata={"data": [str(d) for d in data] if isinstance(data, (list, tuple)) else data})
    return lm_eval.simple_evaluate(model="hf", model_args=args, tasks=list(tasks), batch_size=batch_size, limit=limit,
                                   device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
                                   task_manager=manager)
