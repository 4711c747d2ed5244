"""The package's dependency graph, read from every module's imports (top-level and inside functions).

The layers, lowest first: a module imports only from its own layer or below, never from a
layer above; no import cycle, counting function-local imports; and a function-local import
of another ddfm module only where it avoids loading a heavy optional dependency, marked on
its line with ``# lazy: <reason>``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ddfm"

# lowest first; a name is a module or a package (all its submodules)
LAYERS: list[tuple[str, ...]] = [
    ("ddfm.io", "ddfm.config", "ddfm.data", "ddfm.vqa"),           # files, configs, the record format
    ("ddfm.runtime",),                                               # device, progress, ranks, provenance
    ("ddfm.model", "ddfm.features"),                                 # checkpoints and prompts; encoders
    ("ddfm.kmeans", "ddfm.mixture", "ddfm.router", "ddfm.routing", "ddfm.sampling"),  # the algorithms
    ("ddfm.ensemble",),                                              # K experts + router as one model
    ("ddfm.prepare", "ddfm.embed", "ddfm.partition", "ddfm.init", "ddfm.train", "ddfm.evaluate"),  # stages
    ("ddfm.report", "ddfm.pipeline", "ddfm.harness", "ddfm.serve", "ddfm.theory"),  # built on the stages
    ("ddfm.demo", "ddfm.ablate"),                                    # the whole pipeline
    ("ddfm.cli", "ddfm.__main__"),                                   # the command line
]
# Stages run alone and talk through files: none imports another stage.
INDEPENDENT = LAYERS[5]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(path: Path, name: str, modules: set[str] | None = None) -> list[tuple[str, int, bool, str]]:
    """(imported ddfm name, line, function-local?, source line) of every ddfm import in a file.

    ``from P import m`` names the module ``P.m`` when it is one (in ``modules``), else ``P``."""
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    local_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = sorted({f"{base}.{a.name}" if f"{base}.{a.name}" in (modules or ()) else base
                              for a in node.names})
        else:
            continue
        for t in targets:
            if t == "ddfm" or t.startswith("ddfm."):
                found.append((t, node.lineno, id(node) in local_nodes, lines[node.lineno - 1]))
    return found


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted import names (``ddfm.model.chat.encode_chat`` -> ``ddfm.model.chat``)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _layer(module: str) -> tuple[int, str]:
    for i, names in enumerate(LAYERS):
        for n in names:
            if module == n or module.startswith(n + "."):
                return i, n
    raise AssertionError(f"{module} is in no layer of tests/test_imports.py: add it to LAYERS")


def _graph() -> dict[str, list[tuple[str, int, bool, str]]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = []
        for target, line, local, source in _imports(path, name, set(modules)):
            dep = _resolve(target, modules)
            if dep is not None and dep != name and dep != "ddfm":
                edges.append((dep, line, local, source))
        graph[name] = sorted(set(edges))
    return graph


def test_every_module_is_in_a_layer():
    for name in _modules():
        if name != "ddfm":
            _layer(name)


def test_no_upward_import_and_no_stage_imports_another():
    bad = []
    for name, edges in _graph().items():
        if name == "ddfm":
            continue
        layer, group = _layer(name)
        for dep, line, _, source in edges:
            dep_layer, dep_group = _layer(dep)
            if dep_layer > layer:
                bad.append(f"{name}:{line} imports {dep} from a higher layer: {source.strip()}")
            elif dep_layer == layer and dep_group != group and group in INDEPENDENT:
                bad.append(f"{name}:{line}: stage {group} imports stage {dep_group}: {source.strip()}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {n: sorted({d for d, *_ in e}) for n, e in _graph().items()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in graph.get(n, []):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n)


def test_function_local_imports_say_why():
    bad = [f"{name}:{line}: {source.strip()}" for name, edges in _graph().items()
           for dep, line, local, source in edges if local and "# lazy:" not in source]
    assert not bad, ("function-local imports of ddfm modules without a '# lazy: <reason>' comment (move them to "
                     "the top of the file):\n" + "\n".join(bad))


def test_the_checker_sees_upward_and_local_imports(tmp_path):
    """The parser itself: a relative, a function-local and an aliased import are all found."""
    pkg = tmp_path / "ddfm" / "sub"
    pkg.mkdir(parents=True)
    f = pkg / "mod.py"
    f.write_text("from ..demo import run\nimport ddfm.cli as c\n\ndef g():\n    from ddfm.model import chat  # lazy: x\n")
    found = {(t, local) for t, _, local, _ in _imports(f, "ddfm.sub.mod", {"ddfm.model.chat"})}
    assert ("ddfm.demo", False) in found and ("ddfm.cli", False) in found and ("ddfm.model.chat", True) in found


def _ddfm_imports_outside_the_package() -> list[tuple[str, int, str, str]]:
    """``(file, line, module, name)`` of every ``from ddfm... import name`` in benchmarks/ and
    tests/, at any depth (the benchmarks import inside functions, where a rename goes unseen
    until the benchmark runs)."""
    found = []
    for folder in ("benchmarks", "tests"):
        for path in sorted((ROOT.parent / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ddfm":
                    found += [(f"{folder}/{path.name}", node.lineno, node.module, a.name) for a in node.names]
    return found


def test_every_ddfm_name_the_benchmarks_and_tests_import_exists():
    import importlib

    missing = []
    for where, line, module, name in _ddfm_imports_outside_the_package():
        mod = importlib.import_module(module)
        if not hasattr(mod, name):
            try:  # a submodule imported by name
                importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError:
                missing.append(f"{where}:{line}: from {module} import {name}")
    assert not missing, "\n".join(missing)
