"""Every xray name that bench/ and jobs/ import exists. The benchmarks import lazily inside
functions and run only by hand, so a function moved in a refactor surfaced only when someone
re-ran the bench (bench/trojai.py imported score_testset from xray.reduce.harness for weeks
after it moved to xray.pipeline)."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _xray_imports():
    """(file, line, module, name or None) of every absolute import of an xray module."""
    for path in sorted([*ROOT.glob("bench/*.py"), *ROOT.glob("jobs/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = (path.relative_to(ROOT), node.lineno) if hasattr(node, "lineno") else None
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] == "xray":
                for alias in node.names:
                    yield (*where, node.module, alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "xray":
                        yield (*where, alias.name, None)


def _resolves(module: str, name: str | None) -> bool:
    try:
        imported = importlib.import_module(module)
    except ImportError:
        return False
    if name is None or name == "*" or hasattr(imported, name):
        return True
    try:  # a submodule: `from xray.reduce import metrics`
        importlib.import_module(f"{module}.{name}")
    except ImportError:
        return False
    return True


def test_bench_and_jobs_import_only_what_exists():
    imports = list(_xray_imports())
    assert len(imports) > 20  # the walk found the benches' imports
    missing = [f"{path}:{line}: {module}{'' if name is None else ' import ' + name}"
               for path, line, module, name in imports if not _resolves(module, name)]
    assert not missing, "\n".join(missing)
