"""Loading a benchmark script as a module: benchmarks/ holds scripts, not a package on
sys.path, and benchmarks and tests reuse each other's helpers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str) -> ModuleType:
    """``benchmarks/NAME.py`` as the module ``NAME_benchmark`` (loaded once)."""
    module_name = f"{name}_benchmark"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve annotations through the module registered under its name.
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def run_from_repository(script: str) -> None:
    """Run as a script, Python puts benchmarks/ first on sys.path, where benchmarks/engine.py
    and benchmarks/gateway.py would shadow the packages of the same names: put the
    repository there instead (call before importing them; a no-op when imported)."""
    here = Path(script).resolve().parent
    repository = str(BENCHMARKS_DIR.parent)
    sys.path[:] = [repository if Path(entry or ".").resolve() == here else entry
                   for entry in sys.path]  # fmt: skip
