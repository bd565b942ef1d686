"""`cache_aug` is plain torch + transformers: it never imports Ray, nor the Ray glue (pipelines) or the entrypoints
(jobs).

Two checks: importing every module must not import Ray (what runs), and no file may name `ray`, `pipelines` or
`jobs` in any import, not even a lazy one inside a function or a string given to importlib (what could run).
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import cache_aug

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("ray", "pipelines", "jobs")


def test_cache_aug_never_imports_ray():
    modules = [f"cache_aug.{m.name}" for m in pkgutil.iter_modules(cache_aug.__path__)]
    assert "cache_aug.records" in modules and "cache_aug.augment" in modules
    code = f"import sys, importlib\nfor m in {modules!r}: importlib.import_module(m)\nprint('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _resolve(module: str | None, level: int, package: list[str]) -> str | None:
    """The absolute name `from <level dots><module> import ...` means inside `package` (None: above the top level)."""
    if level == 0:
        return module
    if level - 1 >= len(package):
        return None
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _string_import(node: ast.Call, package: list[str]) -> str | None:
    """The module named by importlib.import_module("...") / import_module("...") / __import__("...")."""
    func = node.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    if name not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
        return None
    target = arg.value
    if name == "import_module" and target.startswith("."):
        anchor = (node.args[1] if len(node.args) > 1
                  else next((k.value for k in node.keywords if k.arg == "package"), None))
        anchor_parts = (anchor.value.split(".") if isinstance(anchor, ast.Constant) and isinstance(anchor.value, str)
                        else package)
        level = len(target) - len(target.lstrip("."))
        return _resolve(target.lstrip(".") or None, level, anchor_parts) or target
    return target


def forbidden_imports(path: Path, root: Path) -> list[str]:
    """`file:line import X` for every import in the file, at any depth, of ray, pipelines or jobs (or below)."""
    rel = path.relative_to(root)
    package = list(rel.with_suffix("").parts[:-1])  # what `from . import x` means in this file
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            resolved = _resolve(node.module, node.level, package)
            if resolved is None:
                found.append((node.lineno,
                              f"import {'.' * node.level}{node.module or ''} (above the top-level package)"))
                continue
            names = [resolved]
        elif isinstance(node, ast.Call):
            target = _string_import(node, package)
            names = [target] if target else []
        else:
            continue
        found += [(node.lineno, f"import {n}") for n in names if n.split(".")[0] in FORBIDDEN]
    return [f"{rel}:{line} {what}" for line, what in sorted(found)]


def test_cache_aug_never_names_ray_pipelines_or_jobs_in_an_import():
    files = sorted((ROOT / "cache_aug").rglob("*.py"))
    assert ROOT / "cache_aug" / "__init__.py" in files and len(files) > 10
    found = [hit for p in files for hit in forbidden_imports(p, ROOT)]
    assert not found, ("cache_aug imports what it must not know (Ray glue goes in pipelines/, entrypoints in "
                       "jobs/):\n" + "\n".join(found))


def test_the_import_scanner_sees_every_form(tmp_path):
    probe = tmp_path / "cache_aug" / "probe.py"
    probe.parent.mkdir()
    lines = [
        "import os",                                              # 1
        "import ray",                                             # 2  found
        "import ray.data as rd",                                  # 3  found
        "from pipelines.train import train_job",                  # 4  found
        "from jobs import cli",                                   # 5  found
        "from . import config",                                   # 6  cache_aug.config
        "from .config import load_config",                        # 7
        "from ..jobs import cli",                                 # 8  found: above cache_aug
        "def lazy(name):",                                        # 9
        "    import pipelines.train",                             # 10 found
        "    from ray import serve",                              # 11 found
        "    import importlib",                                   # 12
        "    importlib.import_module('jobs.train')",              # 13 found
        "    __import__('ray.train')",                            # 14 found
        "    importlib.import_module('.corpus', package='pipelines')",  # 15 found
        "    importlib.import_module('cache_aug.config')",        # 16
        "    importlib.import_module(name)",                      # 17 not a constant
        "import rayleigh",                                        # 18 another package
        "from jobsearch import x",                                # 19 another package
    ]
    probe.write_text("\n".join(lines) + "\n")
    assert forbidden_imports(probe, tmp_path) == [f"cache_aug/probe.py:{hit}" for hit in (
        "2 import ray", "3 import ray.data", "4 import pipelines.train", "5 import jobs",
        "8 import ..jobs (above the top-level package)", "10 import pipelines.train", "11 import ray",
        "13 import jobs.train", "14 import ray.train", "15 import pipelines.corpus")]
