"""`cache_aug` is plain torch + transformers: importing every module of it must not import Ray."""

import pkgutil
import subprocess
import sys

import cache_aug


def test_cache_aug_never_imports_ray():
    modules = [f"cache_aug.{m.name}" for m in pkgutil.iter_modules(cache_aug.__path__)]
    assert "cache_aug.records" in modules and "cache_aug.augment" in modules
    code = f"import sys, importlib\nfor m in {modules!r}: importlib.import_module(m)\nprint('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
