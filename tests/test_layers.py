"""The package's layers: the core imports nothing above it, and no module needs another to be imported first.

The core is what ``dit_accel.accelerate(pipe)`` runs on; above it sit the entry points and tools (CLI, renderer,
batch split, evaluator, toy model, FreeSwim and ComfyUI integrations), which may import the core but never the
other way round: read from the source, so an import hidden inside a function counts too.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import dit_accel

PACKAGE = Path(dit_accel.__file__).parent
#: Modules above the core; everything else in the package is core.
ABOVE = (
    "dit_accel.cli", "dit_accel.render", "dit_accel.batch", "dit_accel.eval", "dit_accel.toy", "dit_accel.testing",
    "dit_accel.pipelines.freeswim", "dit_accel.pipelines.freeswim_window", "dit_accel.pipelines.comfyui",
)  # fmt: skip
#: Package fronts that re-export a layer above lazily, on attribute access (``dit_accel.pipelines.FreeSwimPipeline``).
FACADES = ("dit_accel.pipelines",)
#: Third-party packages only the layers above may use.
ABOVE_THIRD_PARTY = ("typer", "comfy", "comfy_api", "imageio", "matplotlib", "lpips")


def _is(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports anywhere in its source, relative imports resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            stem = ".".join([*base, node.module] if node.module else base)
            found.add(stem)
            found.update(f"{stem}.{alias.name}" for alias in node.names)  # `from . import cli` names a module
    return found


def test_the_core_imports_nothing_above_it() -> None:
    offences = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        if _is(name, ABOVE) or name in FACADES:
            continue
        bad = sorted(m for m in _imports(path) if _is(m, ABOVE) or _is(m, ABOVE_THIRD_PARTY))
        if bad:
            offences[name] = bad
    assert offences == {}, f"core modules importing from the layers above: {offences}"


def test_importing_the_one_line_api_loads_no_layer_above() -> None:
    code = "import json, sys, dit_accel; dit_accel.accelerate; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert [m for m in loaded if _is(m, ABOVE) or _is(m, ABOVE_THIRD_PARTY)] == []


def test_every_module_imports_on_its_own() -> None:
    """An import cycle shows as a module that imports only when another was imported before it: each module is
    imported with every dit_accel module forgotten first (third-party ones stay loaded, for speed)."""
    modules = sorted(
        m.name for m in pkgutil.walk_packages(dit_accel.__path__, "dit_accel.") if not m.name.endswith("__main__")
    )
    code = f"""
import importlib, json, sys, traceback
failed = {{}}
for module in {modules!r}:
    for name in [n for n in sys.modules if n == "dit_accel" or n.startswith("dit_accel.")]:
        del sys.modules[name]
    try:
        importlib.import_module(module)
    except Exception:
        failed[module] = traceback.format_exc(limit=-3)
print(json.dumps(failed))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(modules) > 40 and failed == {}, failed
