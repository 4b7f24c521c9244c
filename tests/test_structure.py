"""The shape of the code, checked: what a newcomer relies on when reading it.

* no import cycles between the package's modules (function-level imports included);
* the core never imports the experiment tooling (sweep, report, demo);
* the adapter format depends on the model, never the reverse;
* no access to another object's underscore names (only `self`/`cls` may touch their own);
* no function longer than 60 lines, no block of 6 or more lines repeated.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "ouroboros_lm"
MODULES = {p: ".".join(("ouroboros_lm",) + p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
           for p in sorted(SRC.rglob("*.py"))}
# Private names of other libraries we must use, each with why.
FOREIGN_PRIVATE = {
    "_version": "torch.Tensor._version: the in-place version counter that keeps folded weights fresh",
    "_shared_state": "accelerate's per-process state: forgetting an earlier run's precision",
    "_reset_state": "accelerate's per-process state: forgetting an earlier run's precision",
    "_name_or_path": "transformers' PretrainedConfig field naming where a model was loaded from",
}


def is_own(node: ast.expr) -> bool:
    """self.x, cls.x and super().x: an object's own names."""
    if isinstance(node, ast.Name):
        return node.id in ("self", "cls")
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def imports_of(path: Path) -> set[str]:
    """Modules of this package that `path` imports, anywhere in the file."""
    name = MODULES[path]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            for alias in node.names:
                full = f"{mod}.{alias.name}"
                out.add(full if full in MODULES.values() else mod)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in MODULES.values() and m != name}


GRAPH = {MODULES[p]: imports_of(p) for p in MODULES}


def test_no_import_cycles():
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(GRAPH[m] - {"ouroboros_lm"}):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in GRAPH:
        if m not in state:
            visit(m)


def test_the_core_never_imports_the_experiments_and_the_model_never_imports_storage():
    for m, deps in GRAPH.items():
        if not m.startswith(("ouroboros_lm.experiments", "ouroboros_lm.cli")) and m != "ouroboros_lm":
            assert not any(d.startswith("ouroboros_lm.experiments") for d in deps), m
    reach = set()
    todo = ["ouroboros_lm.model"]
    while todo:
        for d in GRAPH[todo.pop()]:
            if d not in reach:
                reach.add(d)
                todo.append(d)
    assert "ouroboros_lm.adapter" not in reach and "ouroboros_lm.train" not in reach, sorted(reach)


def test_no_underscore_access_across_objects():
    bad = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if not is_own(node.value) and node.attr not in FOREIGN_PRIVATE:
                    bad.append(f"{path.relative_to(SRC)}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("ouroboros_lm")):
                bad += [f"{path.relative_to(SRC)}:{node.lineno} imports {a.name}" for a in node.names
                        if a.name.startswith("_")]
    assert not bad, bad


def test_no_function_over_60_lines():
    long = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of lines that carry code (no blanks, comments, docstring-only
    lines or bare brackets)."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        t = line.strip()
        if t and not t.startswith("#") and t not in (")", "]", "}", "),", "],", "},", '"""', "else:", "try:"):
            out.append((i, t))
    return out


def test_no_block_of_six_lines_repeated():
    seen = defaultdict(list)
    for path in MODULES:
        lines = code_lines(path)
        for k in range(len(lines) - 5):
            window = tuple(t for _, t in lines[k : k + 6])
            if sum(len(t) for t in window) > 120:  # ignore runs of trivial lines
                seen[window].append(f"{path.relative_to(SRC)}:{lines[k][0]}")
    repeated = {w: where for w, where in seen.items() if len(where) > 1}
    assert not repeated, next(iter(repeated.items()))


def test_the_stack_is_walked_in_one_place():
    """Only OuroborosModel.forward walks prelude -> recurrence -> coda: no other module of the
    package calls run_layers or decoder_layer on the prelude or coda."""
    users = [MODULES[p] for p in MODULES if "run_layers(" in p.read_text()]
    assert users == ["ouroboros_lm.model"], users
