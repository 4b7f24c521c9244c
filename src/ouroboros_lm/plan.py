"""`ouroboros plan`: which base layers to keep, and which consecutive block to loop, chosen from data.

Forward passes only, on calibration blocks of the user's own text. Each rule proposes `keep` layers:
  ends             the shorthand split: the first and last layers around the middle (P + block + C)
  block_influence  the layers whose output differs most from their input, 1 - cos(x_in, x_out) (ShortGPT)
  angular          drop the contiguous run whose input and output are closest in angle (Gromov et al. 2024)
  greedy           remove, one at a time, the layer whose removal raises the calibration loss least
                   (IteRABRe / ShortGPT-gen; each round tries the `shortlist` layers cheapest in the last one)
and the untrained pruned stack's loss on *other* calibration blocks (not those the rules were measured on)
decides. For the recursion, every run of `block_layers` consecutive base layers among the chosen ones (with a
kept layer before and after) is tried repeated, untrained (depth 2: the block run twice in place); the one with
the lowest loss is the block to loop. `plan.json` records the choice, every candidate with its loss and layer
passes, what gives the winning rule's choice at any other size (a nested rule's ranking; angular's span for each
size; the ends need nothing) and the base it was measured on; `ouroboros convert --plan plan.json` builds the model from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import read_json, write_json
from .config import MAX_LAYERS, OuroborosConfig
from .families import OWN_HEAD_TYPES, final_logits, scale_embeddings
from .layers import build_context, decoder_layer, layer_window
from .loss import causal_lm_loss, head_loss
from .ops import rms_norm
from .settings import REQUIRED, setting

RULES = ("ends", "block_influence", "angular", "greedy")
NESTED = ("block_influence", "greedy")  # rules whose choice for n layers contains their choice for fewer
FORMAT = "ouroboros-plan/1"
MAX_CANDIDATES = 64  # `ouroboros plan` writes one a rule; each is validated, so their number is bounded first


@dataclass
class PlanConfig:
    """What `ouroboros plan` measures (`ouroboros plan --help`)."""

    base: str = setting(REQUIRED, "the base model: local HF folder, hub id, .gguf file, or alias (smollm2-135m)")
    data: tuple[str, ...] = setting(REQUIRED, "calibration text (files, folders, globs, .jsonl, .parquet, "
                                    "hf:<dataset id>): your training text", metavar="SRC")
    keep: int = setting(REQUIRED, "layers to keep (the heal model's; the recursion's, its block included)", low=1,
                        high=MAX_LAYERS)
    out: str = setting("plan.json", "where to write the plan")
    overwrite: bool = setting(False, "replace an existing --out plan (never a file that is not a plan)")
    block_layers: int = setting(1, "consecutive base layers the recursion loops (its block)", low=1, high=MAX_LAYERS)
    rules: tuple[str, ...] = setting(RULES, "rules that propose kept layers (the measured loss decides)", choices=RULES,
                                     metavar="RULE")
    blocks: int = setting(8, "calibration blocks the rules measure on (as many again, other ones, score them)",
                          low=1, high=4096)
    seq_len: int = setting(128, "tokens per calibration block", low=2, high=1 << 16)
    shortlist: int = setting(8, "greedy: layers tried per round after the first (the cheapest in the previous "
                             "round; 0: every layer)", low=0, high=MAX_LAYERS)
    seed: int = setting(0, "seed of the calibration blocks' sample", low=0, high=2**63 - 1)
    text_field: str = setting("text", "field holding the text in .jsonl / .parquet sources")


class Stack:
    """A base model's layers run in any order on fixed calibration blocks (no surgery): per-layer inputs,
    the loss of any subset, and the loss of a subset started from a cached hidden state."""

    def __init__(self, base, ids: torch.Tensor):
        self.base, self.cfg = base, base.config
        self.layers = base.model.layers
        self.windows = [layer_window(layer, self.cfg) for layer in self.layers]
        self.ids = ids.to(base.model.embed_tokens.weight.device)
        h = scale_embeddings(base.model.embed_tokens(self.ids), self.cfg)
        positions = torch.arange(ids.shape[1], device=h.device).unsqueeze(0)
        self.ctx = build_context(base.model.rotary_emb, h, positions, None)
        self.h0 = h

    def run(self, order, h: torch.Tensor | None = None, keep_inputs: bool = False):
        """The hidden state after `order` (base indices), from the embeddings or `h`; with keep_inputs, also
        every layer's input (and, last, the output)."""
        h = self.h0 if h is None else h
        seen = []
        for i in order:
            if keep_inputs:
                seen.append(h)
            h = decoder_layer(self.layers[i], h, self.ctx, window=self.windows[i])
        return (h, seen + [h]) if keep_inputs else h

    def loss(self, h: torch.Tensor) -> float:
        """Next-token loss of final hidden states h (the family's norm and head)."""
        norm, head = self.base.model.norm, self.base.lm_head
        if self.cfg.model_type in OWN_HEAD_TYPES:
            return causal_lm_loss(final_logits(head(norm(h)), self.cfg), self.ids).item()
        return head_loss(rms_norm(h, norm.weight, norm.variance_epsilon), head, self.ids).item()

    def loss_of(self, order) -> float:
        return self.loss(self.run(order))


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


def ends_rule(L: int, keep: int, block_layers: int) -> list[int]:
    """The shorthand split (P + block + C with the block at the middle layer): what `--n-prelude` etc. build."""
    middle = keep - block_layers
    p, c = middle // 2 + middle % 2, middle // 2
    r = min(max(L // 2, p), L - c - block_layers)
    return list(range(p)) + list(range(r, r + block_layers)) + list(range(L - c, L))


def block_influence(states: list[torch.Tensor]) -> list[float]:
    """Per layer, 1 - cos(its input, its output), averaged over tokens (ShortGPT's Block Influence)."""
    return [1 - mean_cosine(states[i], states[i + 1]) for i in range(len(states) - 1)]


def angular_start(states: list[torch.Tensor], n: int) -> int:
    """The first of the contiguous `n` layers whose input and output are closest in angle (0 for n = 0)."""
    L = len(states) - 1
    if n == 0:
        return 0
    dist = [math.acos(max(-1.0, min(1.0, mean_cosine(states[l], states[l + n])))) / math.pi for l in range(L - n + 1)]
    return min(range(len(dist)), key=dist.__getitem__)


def without_span(L: int, start: int, n: int) -> list[int]:
    return [i for i in range(L) if not start <= i < start + n]


def angular_rule(states: list[torch.Tensor], keep: int) -> list[int]:
    """Drop the contiguous n = L - keep layers whose input and output are closest in angle."""
    L = len(states) - 1
    return without_span(L, angular_start(states, L - keep), L - keep)


def greedy_rule(stack: Stack, keep: int, shortlist: int, progress) -> tuple[list[int], list[int]]:
    """Remove one layer at a time, the one whose removal raises the loss least; (kept, removal order).
    The hidden state before the candidate is the current stack's (computed once per round), so each try
    runs only the layers after it."""
    kept, removed = list(range(len(stack.layers))), []
    cost: dict[int, float] = {}
    while len(kept) > keep:
        _, inputs = stack.run(kept, keep_inputs=True)
        tries = sorted(kept, key=lambda i: cost.get(i, -math.inf))
        if shortlist and cost:
            tries = tries[:shortlist]
        for i in tries:
            j = kept.index(i)
            cost[i] = stack.loss(stack.run(kept[j + 1:], inputs[j]))
            progress.update(1)
        best = min(tries, key=cost.__getitem__)
        kept.remove(best)
        removed.append(best)
        cost.pop(best)
    return kept, removed


def block_candidates(kept: list[int], block_layers: int) -> list[int]:
    """First layers of every run of block_layers consecutive base layers in `kept` with a kept layer before and after."""
    pos = {layer: j for j, layer in enumerate(kept)}
    out = []
    for j, first in enumerate(kept):
        run = range(first, first + block_layers)
        if all(i in pos for i in run) and j > 0 and pos[run[-1]] < len(kept) - 1:
            out.append(first)
    return out


def loop_order(kept: list[int], first: int, block_layers: int, depth: int) -> list[int]:
    """`kept` with the block starting at `first` run `depth` times in place."""
    block = list(range(first, first + block_layers))
    return [i for i in kept if i < first] + block * depth + [i for i in kept if i > block[-1]]


def calibration(pc: PlanConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks the rules measure on, other blocks that score them), both from the calibration text."""
    from .data import domain_blocks

    blocks = domain_blocks(list(pc.data), tokenizer, pc.seq_len, 2 * pc.blocks, pc.seed, pc.text_field)
    if len(blocks) < 2:
        raise ValueError(f"--data holds {len(blocks)} block(s) of {pc.seq_len} tokens: a plan needs at least 2 "
                         "(one to measure the rules on, one to score them); give more text or a smaller --seq-len")
    half = len(blocks) // 2
    return blocks[:half], blocks[half:]


def check_out(pc: PlanConfig) -> None:
    """Refuse, before the base is loaded, an --out the plan cannot be written to or must not replace: a folder, a
    path under a file, or an existing file without --overwrite (with it, only a plan of ours)."""
    import os

    out = Path(pc.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the plan file's path (e.g. {out / 'plan.json'})")
    parent = next((p for p in out.parents if os.path.lexists(p)), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is not a folder (nothing was written)")
    if os.path.lexists(out):
        if not pc.overwrite:
            raise ValueError(f"--out {out} already exists; pass --overwrite to replace it (nothing was written)")
        try:
            ours = read_json(out, "plan").get("format") == FORMAT
        except (ValueError, AttributeError):
            ours = False
        if not ours:
            raise ValueError(f"--out {out} is not a plan `ouroboros plan` wrote; refusing to replace it even with "
                             "--overwrite (nothing was written)")


def check_request(pc: PlanConfig, num_layers: int, max_positions: int | None = None) -> None:
    """Refuse, before any calibration text is read, what the base cannot do: --keep past its layers, no room for a
    block, --seq-len past its positions (max_position_embeddings)."""
    if max_positions is not None and pc.seq_len > max_positions:
        raise ValueError(f"--seq-len {pc.seq_len} is longer than the base's {max_positions} positions "
                         "(max_position_embeddings)")
    if pc.keep > num_layers:
        raise ValueError(f"--keep must be in [1, {num_layers}] (the base's layers); got {pc.keep}")
    if pc.block_layers + 2 > pc.keep:
        raise ValueError(f"--keep {pc.keep} leaves no layer before and after a block of {pc.block_layers}: "
                         f"keep at least {pc.block_layers + 2}")


def check_plan_memory(pc: PlanConfig, config, num_layers: int) -> None:
    """Refuse, before any text is read, calibration the machine cannot hold: every layer's input on the blocks the
    rules measure (float32), the embeddings of both halves and a layer's working space, against half the free RAM."""
    from .memory import free_bytes

    per_block = pc.seq_len * config.hidden_size * 4
    need = (num_layers + 4) * pc.blocks * per_block + 2 * pc.blocks * pc.seq_len * 8
    free = free_bytes(torch.device("cpu"))
    if free is not None and need > free // 2:
        raise ValueError(f"--blocks {pc.blocks} of --seq-len {pc.seq_len} tokens: the plan would hold about "
                         f"{need / (1 << 30):.1f} GiB of hidden states ({num_layers} layers' inputs), more than half the "
                         f"{free / (1 << 30):.1f} GiB available; lower --blocks or --seq-len")


@torch.no_grad()
def propose(pc: PlanConfig, states: list[torch.Tensor], influence: list[float], search: Stack, bar) -> tuple:
    """Each rule's kept layers, the nested rules' rankings, and angular's span at every size (None without it)."""
    L = len(states) - 1
    proposals, ranking, starts = {}, {}, None
    for rule in pc.rules:
        if rule == "ends":
            proposals[rule] = ends_rule(L, pc.keep, pc.block_layers)
        elif rule == "block_influence":
            ranking[rule] = sorted(range(L), key=lambda i: -influence[i])
            proposals[rule] = sorted(ranking[rule][:pc.keep])
        elif rule == "angular":
            proposals[rule] = angular_rule(states, pc.keep)
            starts = [angular_start(states, n) for n in range(L)]  # every size's span: any other count, by rule
        else:
            kept, removed = greedy_rule(search, pc.keep, pc.shortlist, bar)
            ranking[rule] = kept + removed[::-1]
            proposals[rule] = kept
    return proposals, ranking, starts


def make_plan(pc: PlanConfig, base, tokenizer, base_name: str, progress: bool = True) -> dict:
    """Measure every rule on `base` and return the plan (what `plan.json` holds)."""
    from tqdm.auto import tqdm

    from .adapter import architecture_hash

    L = len(base.model.layers)
    check_request(pc, L, getattr(base.config, "max_position_embeddings", None))
    check_plan_memory(pc, base.config, L)
    base.eval()
    search_ids, score_ids = calibration(pc, tokenizer)
    search, score = Stack(base, search_ids), Stack(base, score_ids)
    rounds = L - pc.keep
    greedy_tries = 0 if "greedy" not in pc.rules or not rounds else (
        L + sum(min(pc.shortlist or L, L - r) for r in range(1, rounds)))
    bar = tqdm(total=2 + greedy_tries, desc="plan", unit="pass", disable=not progress)
    _, states = search.run(range(L), keep_inputs=True)
    full = score.loss_of(range(L))
    bar.update(1)
    influence = block_influence(states)
    proposals, ranking, starts = propose(pc, states, influence, search, bar)
    candidates = [{"rule": rule, "keep_layers": layers, "loss": score.loss_of(layers), "layer_passes": len(layers)}
                  for rule, layers in proposals.items()]
    bar.update(1)
    winner = min(candidates, key=lambda c: c["loss"])
    kept = winner["keep_layers"]
    firsts = block_candidates(kept, pc.block_layers)
    bar.total += len(firsts)
    blocks = []
    for first in firsts:  # the loop's block: each candidate repeated in place, untrained
        blocks.append({"recurrent_layer": first, "block_layers": pc.block_layers,
                       "loss_depth2": score.loss_of(loop_order(kept, first, pc.block_layers, 2))})
        bar.update(1)
    bar.close()
    from .surgery import part_fingerprints

    plan = {"format": FORMAT, "base": base_name, "num_layers": L, "base_architecture_hash": architecture_hash(base.config),
            "base_fingerprints": part_fingerprints(base, range(L)),
            "keep": pc.keep, "block_layers": pc.block_layers, "rule": winner["rule"], "keep_layers": kept, "loss": winner["loss"], "full_loss": full,
            "ranking": ranking.get(winner["rule"]), "block_influence": influence, "candidates": candidates,
            "blocks": blocks, "recursion": None,
            "calibration": {"data": list(pc.data), "blocks": [len(search_ids), len(score_ids)], "seq_len": pc.seq_len,
                            "seed": pc.seed}}
    if winner["rule"] == "angular":
        plan["angular_starts"] = starts  # [n]: the first layer of the n-layer span angular drops
    if blocks:
        best = min(blocks, key=lambda b: b["loss_depth2"])
        plan["recursion"] = {"keep_layers": kept, "recurrent_layer": best["recurrent_layer"],
                             "block_layers": pc.block_layers}
    return plan


def table(plan: dict) -> str:
    """The candidates and the loop's blocks, as Markdown."""
    lines = [f"calibration loss of the untrained pruned stack (full model, {plan['num_layers']} layers: "
             f"{plan['full_loss']:.4f})", "", "| rule | layers kept | layer passes | loss |", "|---|---|---|---|"]
    for c in sorted(plan["candidates"], key=lambda c: c["loss"]):
        mark = " **(chosen)**" if c["rule"] == plan["rule"] else ""
        lines.append(f"| {c['rule']}{mark} | {compact(c['keep_layers'])} | {c['layer_passes']} | {c['loss']:.4f} |")
    if plan["blocks"]:
        lines += ["", f"the loop's block among them, repeated (depth 2, untrained; at depth 1: {plan['loss']:.4f})", "",
                  "| block | layer passes | loss at depth 2 |", "|---|---|---|"]
        rec = plan["recursion"]
        for b in sorted(plan["blocks"], key=lambda b: b["loss_depth2"]):
            mark = " **(chosen)**" if b["recurrent_layer"] == rec["recurrent_layer"] else ""
            last = b["recurrent_layer"] + b["block_layers"] - 1
            name = str(b["recurrent_layer"]) if last == b["recurrent_layer"] else f"{b['recurrent_layer']}-{last}"
            lines.append(f"| {name}{mark} | {len(plan['keep_layers']) + b['block_layers']} | {b['loss_depth2']:.4f} |")
    return "\n".join(lines)


def compact(layers) -> str:
    """0,1,8-11,19-24: runs of consecutive layers as ranges."""
    out, start = [], None
    layers = list(layers)
    for j, i in enumerate(layers):
        if start is None:
            start = i
        if j + 1 == len(layers) or layers[j + 1] != i + 1:
            out.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(out)


# ---------------------------------------------------------------------- reading a plan
def read_plan(path: str | Path) -> dict:
    """A plan file, checked (format, kept layers sorted and distinct, the loop's block among them) before any
    model is loaded; ValueError naming the file otherwise."""
    import os

    path = Path(path)
    if not os.path.lexists(path):
        raise ValueError(f"--plan {path}: no such file (write one with `ouroboros plan`)")
    try:
        plan = read_json(path, "plan")  # a link, FIFO or folder is refused here, named as what it is
    except ValueError as e:
        raise ValueError(f"--plan {e}") from None
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise ValueError(f"--plan {path}: not a plan `ouroboros plan` wrote (format {FORMAT!r})")
    n = plan.get("num_layers")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_LAYERS:
        raise ValueError(f"--plan {path}: num_layers must be an integer in [1, {MAX_LAYERS}]; got {n!r}")
    candidates = plan.get("candidates") or []
    if not isinstance(candidates, list) or len(candidates) > MAX_CANDIDATES \
            or not all(isinstance(c, dict) for c in candidates):
        raise ValueError(f"--plan {path}: candidates must be a list of at most {MAX_CANDIDATES} objects (one a rule); "
                         f"got {type(candidates).__name__} of {len(candidates) if isinstance(candidates, list) else 1}")
    try:
        for layers in [plan.get("keep_layers")] + [c.get("keep_layers") for c in candidates]:
            OuroborosConfig(keep_layers=layers, heal_layers=1, lora_rank=1).validate(n)
        rec = plan.get("recursion")
        if rec is not None:
            OuroborosConfig(keep_layers=rec.get("keep_layers"), recurrent_layer=rec.get("recurrent_layer"),
                            block_layers=rec.get("block_layers"), variant="none").validate(n)
            if list(rec["keep_layers"]) != list(plan["keep_layers"]):
                raise ValueError("recursion.keep_layers must be the plan's keep_layers (the recursion and its heal "
                                 "control keep the same layers)")
        ranking = plan.get("ranking")
        if ranking is not None and (not isinstance(ranking, list) or any(isinstance(i, bool) for i in ranking)
                                    or sorted(ranking) != list(range(n))):
            raise ValueError(f"ranking must order the {n} layers once each (integers)")
        starts = plan.get("angular_starts")
        if starts is not None and (not isinstance(starts, list) or len(starts) != n or any(
                type(s) is not int or not 0 <= s <= n - k for k, s in enumerate(starts))):
            raise ValueError(f"angular_starts must hold, for each of 0..{n - 1} layers dropped, the first dropped "
                             "layer (an integer that leaves the span inside the base)")
    except (AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"--plan {path}: {e}") from None
    return plan


def check_plan_base(plan: dict, base, where: str) -> None:
    """Refuse a plan measured on another base (its layer count or architecture differs). `base`: the model, or
    only its config (checked before any weight is loaded)."""
    from .adapter import architecture_hash

    config = getattr(base, "config", base)
    L = len(base.model.layers) if hasattr(base, "model") else config.num_hidden_layers
    if plan["num_layers"] != L or plan.get("base_architecture_hash") != architecture_hash(config):
        raise ValueError(f"--plan {where} was made for another base ({plan.get('base')!r}, {plan['num_layers']} layers); "
                         f"this one has {L} layers{'' if plan['num_layers'] != L else ' and another architecture'}: "
                         "run `ouroboros plan` on it")
    recorded = plan.get("base_fingerprints")
    if hasattr(base, "model") and isinstance(recorded, dict) and recorded:  # the weights (plans since #43 record them)
        from .surgery import part_fingerprints

        ours = part_fingerprints(base, range(L))
        differ = [k for k in ours if recorded.get(k) != ours[k]]
        if differ:
            raise ValueError(f"--plan {where} was measured on other weights of this architecture ({plan.get('base')!r}: "
                             f"{differ[0]}{f' and {len(differ) - 1} more' if len(differ) > 1 else ''} differ, a "
                             "fine-tuned sibling?); its choice of layers need not hold here: run `ouroboros plan` on it")


PLANNED = ("keep_layers", "n_prelude", "recurrent_layer", "block_layers", "n_coda")  # what a plan decides


def check_plan_flags(config: OuroborosConfig) -> None:
    """Refuse, beside --plan, a split flag the plan would silently override (a value other than its default):
    --keep-layers, --n-prelude, --recurrent-layer, --block-layers, --n-coda, or --heal-layers above 1 (a heal
    model on a plan keeps its layers: --heal-layers 1)."""
    default = OuroborosConfig()
    # --keep-layers sets the split's counts itself: it alone is named then
    given = ["keep_layers"] if config.keep_layers is not None else \
        [f for f in PLANNED if getattr(config, f) != getattr(default, f)]
    if config.heal_layers > 1:
        given.append("heal_layers")
    if given:
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise ValueError(f"give --plan or {flags}, not both: the plan decides the layers kept and looped "
                         "(--heal-layers 1 builds the heal model on them)")


def planned_config(plan: dict, config: OuroborosConfig, keep: int | None = None) -> OuroborosConfig:
    """`config` on the plan's layers: a heal model keeps the plan's layers (or, with `keep`, that many from the
    winning rule's ranking); the recursion keeps them and loops the plan's block (its recurrent_layer and
    block_layers replace the config's)."""
    if config.heal_layers:
        layers = plan["keep_layers"] if keep is None or keep == len(plan["keep_layers"]) else ranked(plan, keep)
        return config.replace(keep_layers=tuple(layers), heal_layers=1)
    rec = plan.get("recursion")
    if rec is None:
        size = plan.get("block_layers")
        raise ValueError(f"the plan's {len(plan['keep_layers'])} layers hold no block of "
                         f"{size if isinstance(size, int) else '--block-layers'} consecutive layers to loop with a kept "
                         "layer before and after (it builds a heal model only: --heal-layers 1): plan again with another "
                         "--keep or --block-layers")
    # the plan's block replaces the config's recurrent_layer and block_layers; LoRA on the whole prelude stays on
    # the whole (planned) prelude, and a tail of it stays at most the prelude
    prelude = sum(i < rec["recurrent_layer"] for i in rec["keep_layers"])
    tail = prelude if config.lora_rank and config.prelude_lora_layers == config.n_prelude else \
        min(config.prelude_lora_layers, prelude)
    return config.replace(keep_layers=tuple(rec["keep_layers"]), recurrent_layer=rec["recurrent_layer"],
                          block_layers=rec["block_layers"], prelude_lora_layers=tail)


def ranked(plan: dict, keep: int) -> list[int]:
    """The `keep` layers the plan's rule keeps at that size: a nested rule's ranking, the fixed ends at that size,
    or the span angular measured for that size (recorded by plans since `angular_starts`)."""
    L = plan["num_layers"]
    if not 1 <= keep <= L:
        raise ValueError(f"keep must be in [1, {L}]; got {keep}")
    if plan["rule"] == "ends":
        size = plan.get("block_layers") or 1
        if keep < size + 2:
            raise ValueError(f"the ends rule keeps a block of {size} and a layer each side: keep must be at least "
                             f"{size + 2}; got {keep}")
        return ends_rule(L, keep, size)
    if plan["rule"] == "angular" and plan.get("angular_starts") is not None:
        return without_span(L, plan["angular_starts"][L - keep], L - keep)
    # greedy's ranking orders only the layers it removed (the last removed first), after the kept ones
    fewer = plan["rule"] == "greedy" and keep < len(plan["keep_layers"])
    if plan.get("ranking") is None or fewer:
        raise ValueError(f"the plan's rule ({plan['rule']}) gives no {'fewer' if fewer else 'other sizes'} than "
                         f"{len(plan['keep_layers'])} layers: run `ouroboros plan --keep {keep}`")
    return sorted(plan["ranking"][:keep])


def write_plan(plan: dict, out: str | Path) -> Path:
    return write_json(Path(out), plan)
