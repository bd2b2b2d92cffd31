"""The package's import graph: no circles, and every import goes down the
layers of docs/architecture.md (or stays in its layer), function-level imports
included. Read from the source with ``ast``, so nothing is executed."""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "python" / "llmeasyquant"
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

# module (dotted, without the "llmeasyquant." prefix; a folder name covers
# everything under it) -> layer, bottom (2: ops) to top (9: interfaces), as in
# docs/architecture.md
LAYERS = {
    "_native": 2, "_fake": 2, "_fallback": 2, "_checks": 2, "_reference": 2, "quant_format": 2, "ops": 2, "log": 2,
    "hadamard": 2, "panel": 2, "cpu_pack": 2,
    "nn": 3, "kvcache": 3,
    "models": 4, "data": 4,
    "calibration": 5, "sharding": 5, "pipeline": 5, "peak_memory": 5,
    "methods": 6,
    "api": 7, "eval": 7, "io": 7, "checkpoint_checks": 7, "outdir": 7, "onnx_export": 7, "plots": 7,
    "formats": 7,
    "search": 8, "distributed": 8,
    "cli": 9, "bench": 9, "compare": 9, "demo": 9, "distributed.__main__": 9, "": 9,
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _layer(mod: str) -> int:
    best = None
    for key, layer in LAYERS.items():
        if key == mod or (key and mod.startswith(key + ".")) or (not key and not mod):
            if best is None or len(key) > len(best[0]):
                best = (key, layer)
    if best is None:
        raise AssertionError(f"llmeasyquant.{mod} has no layer in tests/test_import_graph.py LAYERS "
                             f"(add it, and its row in docs/architecture.md)")
    return best[1]


def _imports(mod: str, path: pathlib.Path, modules: dict) -> set[str]:
    """Package modules ``mod`` imports (at any depth of its code)."""
    is_pkg = path.name == "__init__.py"
    here = mod.split(".") if mod else []
    base_parts = here if is_pkg else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "llmeasyquant" or a.name.startswith("llmeasyquant."):
                    found.add(a.name[len("llmeasyquant."):] if "." in a.name else "")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base_parts[: len(base_parts) - (node.level - 1)]
                target = ".".join(anchor + (node.module.split(".") if node.module else []))
            elif node.module and (node.module == "llmeasyquant" or node.module.startswith("llmeasyquant.")):
                target = node.module[len("llmeasyquant."):] if "." in node.module else ""
            else:
                continue
            for a in node.names:
                sub = f"{target}.{a.name}" if target else a.name
                if sub == "_C":  # the compiled extension: below everything
                    continue
                found.add(sub if sub in modules else target)
    found.discard(mod)
    return {m for m in found if m in modules}


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def test_every_module_has_a_layer(graph):
    for mod in graph:
        _layer(mod)


def test_imports_go_down_the_layers(graph):
    upward = [f"llmeasyquant.{m or '__init__'} (layer {_layer(m)}) imports llmeasyquant.{t or '__init__'} "
              f"(layer {_layer(t)})" for m, targets in graph.items() for t in sorted(targets)
              if _layer(t) > _layer(m)]
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_no_import_circle(graph):
    # Tarjan's strongly connected components
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_graph_is_read_for_real(graph):
    # the checks above would pass on an empty graph: prove the parser sees edges
    assert "methods.gptq" in graph["methods.mixed"]
    assert "pipeline" in graph["methods.gptq"]
    assert "methods.simquant" in graph["eval.perplexity"]


def test_architecture_doc_names_every_module():
    text = DOC.read_text()
    files = [p.relative_to(PKG).as_posix() for p in sorted(PKG.rglob("*.py")) if p != PKG / "__init__.py"]
    # a package's __init__.py is named by its folder ("methods/gptq/")
    absent = [f for f in files if (f[: -len("__init__.py")] if f.endswith("/__init__.py") else f) not in text]
    assert not absent, f"docs/architecture.md does not mention {absent}"
