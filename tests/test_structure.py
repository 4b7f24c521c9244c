"""The shape of the code, checked: what a newcomer relies on when reading it.

Over both packages, the library (src/ouroboros_lm) and the recipes (src/ouroboros_recipes):
* no import cycles between their modules (function-level imports included);
* the library never imports a recipe (no exemption: the CLI finds them by entry point);
* the adapter format depends on the model, never the reverse;
* no access to another object's underscore names (only `self`/`cls` may touch their own);
* no function longer than 60 lines, no block of 6 or more lines repeated;
* no hand-written `add_argument` for a flag that a settings dataclass declares (`setting(...)`).
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src"
LIBRARY, RECIPES = "ouroboros_lm", "ouroboros_recipes"
SRC = ROOT / LIBRARY
MODULES = {p: ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
           for package in (LIBRARY, RECIPES) for p in sorted((ROOT / package).rglob("*.py"))}
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
    """Modules of the two packages that `path` imports, anywhere in the file."""
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
        for n in sorted(GRAPH[m] - {LIBRARY, RECIPES}):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in GRAPH:
        if m not in state:
            visit(m)
    assert any(is_in(d, LIBRARY) for d in GRAPH["ouroboros_recipes.sweep"])  # the walk sees across packages


def is_in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_both_packages_are_scanned():
    assert {"ouroboros_lm.cli", "ouroboros_recipes.sweep", "ouroboros_recipes.demo"} <= set(MODULES.values())


def test_the_library_never_imports_a_recipe_and_the_model_never_imports_storage():
    for m, deps in GRAPH.items():
        if is_in(m, LIBRARY):
            assert not any(is_in(d, RECIPES) for d in deps), (m, sorted(d for d in deps if is_in(d, RECIPES)))
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
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("ouroboros_lm")):
                bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {a.name}" for a in node.names
                        if a.name.startswith("_")]
    assert not bad, bad


def test_no_function_over_60_lines():
    long = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
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
                seen[window].append(f"{path.relative_to(ROOT)}:{lines[k][0]}")
    repeated = {w: where for w, where in seen.items() if len(where) > 1}
    assert not repeated, next(iter(repeated.items()))


def test_the_stack_is_walked_in_one_place():
    """Only OuroborosModel.forward walks prelude -> recurrence -> coda: no other module of the
    package calls run_layers or decoder_layer on the prelude or coda."""
    users = [MODULES[p] for p in MODULES if "run_layers(" in p.read_text()]
    assert users == ["ouroboros_lm.model"], users


def setting_flags() -> dict[str, str]:
    """Every command-line name a settings dataclass declares (a field set with `setting(...)`:
    `flag=` or --field-name; a positional field's own name), with the class declaring it."""
    out = {}
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            for item in node.body:
                call = item.value if isinstance(item, ast.AnnAssign) else None
                if isinstance(call, ast.Call) and getattr(call.func, "id", None) in ("setting", "same_as"):
                    kw = {k.arg: k.value for k in call.keywords}
                    name = item.target.id
                    if isinstance(kw.get("positional"), ast.Constant) and kw["positional"].value:
                        out[name] = node.name
                    flag = kw["flag"].value if isinstance(kw.get("flag"), ast.Constant) else None
                    out[flag or "--" + name.replace("_", "-")] = node.name
    return out


def test_the_scan_finds_the_settings_of_every_command():
    flags = setting_flags()
    for flag, cls in [("--rank", "OuroborosConfig"), ("--steps", "TrainConfig"), ("--blocks", "EvalConfig"),
                      ("--eval-seed", "EvalConfig"), ("--top-p", "GenerateConfig"), ("--overwrite", "ExportConfig"),
                      ("--trust-remote-code", "HarnessConfig"), ("--data", "DataConfig"), ("spec", "SweepConfig"),
                      ("--against", "ReportConfig"), ("--heal-rows", "DemoConfig")]:
        assert flag in flags, flag
    assert "--" + "max-depth" in flags


def test_no_add_argument_for_a_flag_a_settings_dataclass_declares():
    """Flags come from the dataclasses (`settings.add_flags`); a hand-written flag of the same name
    would be a second declaration of that setting, with its own default and range."""
    declared, bad = setting_flags(), []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("-") \
                            and arg.value in declared:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {arg.value} ({declared[arg.value]})")
    assert not bad, bad


def test_no_merge_conflict_markers_anywhere():
    """A merge left half done (markers committed) is caught here, not by a user's import error."""
    root = SRC.parent.parent
    bad = [f"{p.relative_to(root)}:{i}" for folder in ("src", "tests", "bench", "docs", "configs")
           for p in sorted((root / folder).rglob("*")) if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".toml")
           for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
           if line.startswith(("<<<<<<< ", ">>>>>>> ")) or line == "======="]
    assert not bad, bad
