"""Benchmarks print their result and save it as JSON under bench/results/, with the machine they ran on."""

from __future__ import annotations

import json
import platform
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


def write_result(name: str, result: dict) -> Path:
    import torch

    result = result | {"machine": {"platform": platform.platform(), "torch": torch.__version__}}
    print(json.dumps(result, indent=2))
    path = RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path
