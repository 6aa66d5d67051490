"""The import layering of src/dmdctl, as data: a module may import its own layer and the layers
below it, never one above (a back-edge), and no modules import each other in a circle.

Every ``import`` / ``from ... import`` anywhere in a module counts, inside functions included
(parsed with ``ast``, nothing is imported). A module belongs to the layer of its longest matching
prefix (``dmdctl.metrics.fid`` is a measure, the rest of ``dmdctl.metrics`` is a scoring flow).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "dmdctl"

# lowest first; (name, module prefixes, why the layer sits here)
LAYERS: list[tuple[str, set[str], str]] = [
    ("errors", {"dmdctl.errors"}, "the exception types every module raises"),
    (
        "leaf utilities",
        {"dmdctl", "dmdctl.ui", "dmdctl.files", "dmdctl.plots", "dmdctl.options"},
        "terminal output, file writes, plots, option declarations: no dmdctl concepts",
    ),
    (
        "runtime and config",
        {"dmdctl.runtime", "dmdctl.config", "dmdctl.settings.common"},
        "processes and devices; config layering; options shared by several commands",
    ),
    ("core", {"dmdctl.core"}, "the denoiser interface, samplers, losses, EMA, GAN head"),
    (
        "measures",
        {
            "dmdctl.metrics.fid",
            "dmdctl.metrics.kid",
            "dmdctl.metrics.prdc",
            "dmdctl.metrics.intervals",
            "dmdctl.metrics.inception",
            "dmdctl.metrics.protocols",
            "dmdctl.metrics.images",
            "dmdctl.metrics.clip",
        },
        "statistics, feature networks and image input: what a teacher kind's own metrics use",
    ),
    (
        "data",
        {"dmdctl.data"},
        "prompts, pairs, real samples, their stores and shards: a teacher kind reads them; they "
        "take teacher objects as arguments (duck-typed), never import the teachers",
    ),
    ("teachers", {"dmdctl.teachers"}, "the registry, the kinds and their networks"),
    (
        "built on teachers",
        {"dmdctl.generators", "dmdctl.inputs"},
        "the generator file format (a file names its teacher kind); checks of teacher paths",
    ),
    (
        "run trackers",
        {"dmdctl.training.trackers"},
        "the --report-to choices: settings/distill.py checks the flag with it",
    ),
    (
        "settings",
        {"dmdctl.settings"},
        "each command's settings: the typed configs that metrics, training and commands take",
    ),
    (
        "scoring flows",
        {"dmdctl.metrics"},
        "eval-fid's flows (built-in references, generators/teachers, image folders) and quality",
    ),
    ("training", {"dmdctl.training"}, "the DMD trainer, its loop, checkpoints, LoRA adapters"),
    ("commands", {"dmdctl.commands"}, "one module per command"),
    ("cli", {"dmdctl.cli", "dmdctl.__main__"}, "the Typer app"),
]

# (importing module, imported module): reason. Keep empty; a new entry needs a reason here.
ALLOWED_BACK_EDGES: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / ROOT).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, imported dmdctl module) for every import statement anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            # `from dmdctl.training import lora` imports the module dmdctl.training.lora
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        out += [(node.lineno, t) for t in targets if t == ROOT or t.startswith(ROOT + ".")]
    return out


def layer_of(module: str) -> int | None:
    best, found = -1, None
    for i, (_, prefixes, _) in enumerate(LAYERS):
        for p in prefixes:
            hit = module == p or (p != ROOT and module.startswith(p + "."))
            if hit and len(p) > best:
                best, found = len(p), i
    return found


def edges() -> list[tuple[str, int, str, str]]:
    """(file, line, importing module, imported module) of src/dmdctl."""
    modules = all_modules()
    found = {
        (str(path.relative_to(SRC.parent)), line, name, target)
        for name, path in modules.items()
        for line, target in imports_of(path, modules)
        if target != name
    }
    return sorted(found)


def back_edges() -> list[str]:
    found = []
    for file, line, src, dst in edges():
        a, b = layer_of(src), layer_of(dst)
        if a is None or b is None or b <= a or (src, dst) in ALLOWED_BACK_EDGES:
            continue
        found.append(
            f"{file}:{line}: {src} ({LAYERS[a][0]}) imports {dst} ({LAYERS[b][0]}), a higher "
            "layer; move the shared piece down or the caller up (tests/test_layers.py: LAYERS)"
        )
    return found


def circles() -> list[list[str]]:
    """Import circles between modules (strongly connected components of more than one)."""
    graph: dict[str, set[str]] = {m: set() for m in all_modules()}
    for _, _, src, dst in edges():
        if dst in graph:
            graph[src].add(dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    missing = sorted(m for m in all_modules() if layer_of(m) is None)
    assert not missing, f"modules in no layer of tests/test_layers.py LAYERS: {missing}"


def test_imports_point_down_the_layers():
    found = back_edges()
    assert not found, "imports that run up the layers:\n" + "\n".join(found)


def test_no_import_circles():
    found = circles()
    assert not found, "modules that import each other in a circle: " + "; ".join(
        " <-> ".join(c) for c in found
    )


def test_the_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """A back-edge inside a function body (the kind that made the old circles) is reported with
    its file and line."""
    pkg = tmp_path / "dmdctl"
    (pkg / "core").mkdir(parents=True)
    (pkg / "commands").mkdir()
    for f in ("__init__.py", "core/__init__.py", "commands/__init__.py", "commands/export.py"):
        (pkg / f).write_text("")
    (pkg / "core" / "x.py").write_text("def f():\n    from dmdctl.commands import export\n")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path)
    found = back_edges()
    assert len(found) == 1 and "dmdctl/core/x.py:2: dmdctl.core.x (core)" in found[0], found
    assert "imports dmdctl.commands.export (commands)" in found[0]
