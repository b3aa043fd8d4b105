"""The package's import graph, read from the source with `ast` (nothing is imported):

- no cycle among the modules' top-level imports, counting the implicit import of a submodule's
  parent packages (importing a.b.c runs a/__init__ and a/b/__init__ first): what runs at import.
- no cycle either when imports inside functions are counted too (as
  a static import-cycle checker counts them): a local import is no way around a cycle.
- An import of a module's own ancestor package is left out of both: that is the registry
  pattern (a detector module imports `xray.detectors` to register itself).
- only xray/runner imports ray (house rule: Ray stays in xray/runner and jobs/), at any level.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "xray"
PACKAGE = ROOT.name


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The package module `name` refers to (a name inside a module resolves to the module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported name, line, at top level) for every import statement in the module; relative
    imports resolved. `from a import b` yields a.b and a (b may be a submodule or a name)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(node) for node in tree.body}
    # Imports under a top-level `if` / `try` still run at import time.
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            top |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        if isinstance(node, ast.ImportFrom) and getattr(node, "module", None) == "__future__":
            continue
        out += [(name, node.lineno, id(node) in top) for name in names]
    return out


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def import_graph(*, local: bool = False) -> dict[str, dict[str, int]]:
    """module -> {imported package module: line}. Default: top-level imports and the parent
    packages they run. local=True: imports at every level, each edge to the module named only
    (a function's import runs once everything is loaded, so its parents' order is moot)."""
    graph: dict[str, dict[str, int]] = {m: {} for m in MODULES}
    for module, path in MODULES.items():
        for name, line, at_top in _imports(module, path):
            if not (at_top or local) or name.split(".")[0] != PACKAGE:
                continue
            target = _resolve(name)
            if target is None:
                continue
            for dep in ([target] if local else _with_parents(target)):
                if dep in MODULES and dep != module and not module.startswith(dep + "."):
                    graph[module].setdefault(dep, line)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as [m0, m1, ..., m0], or None."""
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert {"xray.scanning", "xray.config", "xray.detectors", "xray.io.manifest"} <= set(graph)
    assert "xray.config" in graph["xray.scanning"]  # a plain top-level import
    assert "xray.detectors" in graph["xray.scanning"]  # the parent of xray.detectors.base
    assert "xray.detectors" not in graph["xray.detectors.mntd"]  # registry pattern, left out


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None


def _fail_on_cycle(graph: dict[str, dict[str, int]], what: str) -> None:
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
        pytest.fail(f"import cycle among {what}:\n  " + "\n  ".join(steps))


def test_no_cycle_among_top_level_imports():
    _fail_on_cycle(import_graph(), "top-level imports")


def test_no_cycle_counting_imports_inside_functions():
    _fail_on_cycle(import_graph(local=True), "imports at every level")


def test_only_the_runner_imports_ray():
    offenders = []
    for module, path in MODULES.items():
        if module == f"{PACKAGE}.runner" or module.startswith(f"{PACKAGE}.runner."):
            continue
        for name, line, _ in _imports(module, path):
            if name == "ray" or name.startswith("ray."):
                offenders.append(f"{path.relative_to(ROOT.parent)}:{line} imports {name}")
    assert not offenders, ("Ray stays in xray/runner and jobs/; imported elsewhere:\n  "
                           + "\n  ".join(sorted(set(offenders))))


STARTUP_PROBE = """
import sys
import numpy as np
import xray.runner.scan_run  # what a scan actor imports
from xray import detectors, models
from xray.detectors.inversion.abs import reference_batch_size
from xray.io.examples import preprocess
from xray.models import layers

# mntd refuses to be built without a trained meta-classifier (its module is imported anyway)
built = [detectors.build(name) for name in detectors.available() if name != "mntd"]
cnn = models.create("mntd_mnist_cnn", 10, (1, 28, 28))
layers.split_model(cnn)
reference_batch_size(cnn)
preprocess(np.zeros((8, 8, 3), dtype=np.uint8), {})
print(len(built), "torchvision" in sys.modules, "scipy.stats" in sys.modules)
resnet = models.create("resnet18", 10, (3, 32, 32))  # imports torchvision, as it must
print(layers.split_model(resnet)[2], reference_batch_size(resnet))
"""


def test_a_scan_of_in_project_nets_imports_no_torchvision():
    """torchvision pulls in torch._dynamo (~1.6 s a process) and scipy.stats ~0.5 s: every scan
    actor, zoo worker and CLI run paid both before a detector did any work. Importing the scan
    path, building every detector and splitting an in-project net imports neither; a torchvision
    net still gets its own layer plan and ABS's reference batch size for ResNets."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", STARTUP_PROBE], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split("\n")
    n_detectors, torchvision_imported, scipy_stats_imported = out[0].split()
    assert int(n_detectors) > 10
    assert (torchvision_imported, scipy_stats_imported) == ("False", "False"), out
    assert out[1] == "layer3 15", out
