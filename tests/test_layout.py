"""The house: every module on its floor, imports only downward or sideways, no circle.

No project module is imported inside a function (except the CLI's lazy command dispatch).

The floors, from the ground up (docs/architecture.md draws the same):
  0  errors, hub
  1  kernels and records: rendering, logprobs, losses, stats, config/*, io, model_files,
     data/*, judges/preferences, tracking, selection
  2  model building, engines and processes: models, engines/*, launch, sharding
  3  judges, the training loop (trainer, metrics), the run's manifest
  4  stages that do one thing: generate, score, rank, convert, sft, train, evaluate (and its
     lm-eval part, harness), report, compare
  5  the loop: stages/run
  6  the command line: cli, __main__
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "selfplay"

FLOORS = {
    "selfplay.errors": 0, "selfplay.hub": 0,
    "selfplay.rendering": 1, "selfplay.logprobs": 1, "selfplay.losses": 1, "selfplay.config": 1,
    "selfplay.data": 1, "selfplay.judges.preferences": 1, "selfplay.stats": 1,
    "selfplay.tracking": 1, "selfplay.io": 1, "selfplay.model_files": 1, "selfplay.selection": 1,
    "selfplay.models": 2, "selfplay.engines": 2, "selfplay.launch": 2, "selfplay.sharding": 2,
    "selfplay.judges": 3, "selfplay.trainer": 3, "selfplay.manifest": 3, "selfplay.metrics": 3,
    "selfplay.stages": 4,
    "selfplay.stages.run": 5,
    "selfplay.cli": 6, "selfplay.__main__": 6, "selfplay": 6,
}
# Where a function-level project import is the design: the CLI imports a command's stage only
# when that command runs, so `selfplay --help` stays fast.
LAZY_OK = {"selfplay.cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor(module: str) -> int:
    """The floor of the longest FLOORS prefix of `module`."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in FLOORS:
            return FLOORS[key]
    raise AssertionError(f"{module} has no floor in tests/test_layout.py")


def project_imports(tree: ast.Module, module: str, package: bool):
    """(imported project module, line, inside a function?) for every import in a module."""
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_function) for a in child.names
                           if a.name.split(".")[0] == "selfplay")
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:   # relative: resolve against this module's package
                    pkg = module.split(".") if package else module.split(".")[:-1]
                    base = ".".join(pkg[:len(pkg) - child.level + 1] + ([base] if base else []))
                if base.split(".")[0] == "selfplay":
                    for a in child.names:   # `from selfplay.x import y`: y may be a module
                        full = f"{base}.{a.name}"
                        out.append((full if _exists(full) else base, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return out


def _exists(module: str) -> bool:
    p = SRC.joinpath(*module.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    g = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = module_name(path)
        g[mod] = project_imports(ast.parse(path.read_text()), mod, path.name == "__init__.py")
    return g


def test_every_module_has_a_floor_and_imports_only_down_or_sideways():
    g = graph()
    upward = [f"{m}:{line} imports {dep} (floor {floor(m)} -> {floor(dep)})"
              for m, deps in g.items() for dep, line, _ in deps if floor(dep) > floor(m)]
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


def find_circles(g: dict[str, list[str]]) -> list[list[str]]:
    seen, on_path, circles = set(), [], []

    def dfs(m):
        if m in on_path:
            circles.append(on_path[on_path.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        on_path.append(m)
        for d in g.get(m, []):
            dfs(d)
        on_path.pop()

    for m in g:
        dfs(m)
    return circles


def test_no_import_circle():
    mods = graph_modules()
    g = {m: sorted({d for d, _, _ in deps if d in mods}) for m, deps in graph().items()}
    circles = find_circles(g)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def graph_modules() -> set[str]:
    return {module_name(p) for p in PACKAGE.rglob("*.py")}


def test_no_project_import_inside_a_function():
    lazy = [f"{m}:{line} imports {dep} inside a function"
            for m, deps in graph().items() if m not in LAZY_OK
            for dep, line, inside in deps if inside]
    assert not lazy, "\n".join(lazy)


def test_a_module_per_command():
    """A newcomer finds every pipeline stage by its command's name."""
    from selfplay.cli import COMMANDS
    stages = {p.stem for p in (PACKAGE / "stages").glob("*.py") if p.stem != "__init__"}
    pipeline = set(COMMANDS) - {"info", "tasks"}
    assert pipeline <= stages, f"commands without a stage module: {pipeline - stages}"


def test_the_checks_can_fail():
    """Made-up imports that break each rule are seen."""
    up = project_imports(ast.parse("from selfplay.stages.run import run\n"),
                         "selfplay.rendering", False)
    assert up == [("selfplay.stages.run", 1, False)]
    assert floor("selfplay.stages.run") > floor("selfplay.rendering")
    inside = project_imports(ast.parse("def f():\n    import selfplay.models\n"),
                             "selfplay.losses", False)
    assert inside == [("selfplay.models", 2, True)]
    assert find_circles({"a": ["b"], "b": ["c"], "c": ["a"]}) == [["a", "b", "c", "a"]]


def test_the_architecture_page_names_every_module():
    doc = (SRC.parent / "docs" / "architecture.md").read_text()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if path.stem in ("__init__", "__main__"):
            continue
        in_package_row = path.parent != PACKAGE and f"{path.parent.name}/" in doc \
            and path.stem.replace("_", "") in doc.replace("_", "")
        if rel not in doc and not in_package_row:
            missing.append(rel)
    assert not missing, f"docs/architecture.md does not name: {missing}"
