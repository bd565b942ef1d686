"""Tests for cache_aug.config: typed config tree, loading, validation, docs."""

import dataclasses
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from cache_aug.config import (
    AugmentationConfig,
    CacheAugConfig,
    ConfigError,
    CoprocessorConfig,
    ModelConfig,
    StorageConfig,
    dump_config,
    field_docs,
    from_dict,
    load_config,
    resolve_serve_sources,
    to_dict,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _error(data, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(data, **kwargs)
    return str(info.value)


def _sections(cls):
    """cls and every dataclass reachable from it through fields."""
    found = [cls]
    for tp in typing.get_type_hints(cls).values():
        if dataclasses.is_dataclass(tp):
            found += _sections(tp)
    return found


# --------------------------------------------------------------------------- #
# Defaults and round trips
# --------------------------------------------------------------------------- #


def test_defaults():
    cfg = load_config()
    assert cfg == CacheAugConfig()
    assert cfg.model == ModelConfig(
        path="tiny-kjv", dtype="float32", attn_implementation=None, revision_cache_dir=None, trust_remote_code=False
    )
    assert (cfg.augmentation.n_latents, cfg.augmentation.n_ahead) == (8, 8)
    assert (cfg.augmentation.points_per_sequence, cfg.augmentation.min_prefix) == (16, 8)
    cop = cfg.coprocessor
    assert (cop.mode, cop.lora_rank, cop.lora_alpha, cop.lora_dropout) == ("full", 16, 32.0, 0.0)
    assert (cop.lora_targets, cop.soft_token_init, cop.seed) == ("all-linear", "vocab", 0)
    assert cfg.storage == StorageConfig(mode="latent_kv", dtype="bfloat16")


def test_all_classes_are_kw_only():
    for cls in _sections(CacheAugConfig):
        with pytest.raises(TypeError):
            cls(*[None])  # positional arguments are refused


def test_dict_round_trip():
    cfg = CacheAugConfig(
        model=ModelConfig(path="s3://bucket/ckpt", dtype="bfloat16", attn_implementation="sdpa"),
        augmentation=AugmentationConfig(n_latents=4, n_ahead=2),
        coprocessor=CoprocessorConfig(mode="lora", lora_targets=["q_proj", "v_proj"], lora_dropout=0.1),
        storage=StorageConfig(mode="full", dtype="float32"),
    )
    plain = to_dict(cfg)
    assert isinstance(plain["coprocessor"], dict)
    assert plain["coprocessor"]["lora_targets"] == ["q_proj", "v_proj"]
    assert from_dict(CacheAugConfig, plain) == cfg
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain  # YAML-safe


def test_yaml_file_round_trip(tmp_path):
    cfg = CacheAugConfig(
        augmentation=AugmentationConfig(n_latents=32, points_per_sequence=2),
        coprocessor=CoprocessorConfig(mode="pause", soft_token_init="normal", seed=7),
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert load_config(str(path)) == cfg


def test_partial_yaml_keeps_defaults(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("augmentation:\n  n_latents: 3\ncoprocessor:\n  lora_alpha: 8\n")
    cfg = load_config(path)
    assert cfg.augmentation == AugmentationConfig(n_latents=3)
    assert cfg.coprocessor.lora_alpha == 8.0 and isinstance(cfg.coprocessor.lora_alpha, float)
    assert cfg.model == ModelConfig()


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == CacheAugConfig()


def test_exponent_floats_without_dot_load_as_float(tmp_path):
    # Plain PyYAML would read 1e-1 as the string "1e-1".
    path = tmp_path / "cfg.yaml"
    path.write_text("coprocessor:\n  lora_dropout: 1e-1\n")
    assert load_config(path).coprocessor.lora_dropout == pytest.approx(0.1)
    assert load_config(overrides=["coprocessor.lora_alpha=2e1"]).coprocessor.lora_alpha == 20.0


def test_mapping_source_is_not_mutated():
    data = {"augmentation": {"n_latents": 2}}
    cfg = load_config(data, overrides=["augmentation.n_latents=5"])
    assert cfg.augmentation.n_latents == 5
    assert data == {"augmentation": {"n_latents": 2}}


# --------------------------------------------------------------------------- #
# Errors name the dotted field path
# --------------------------------------------------------------------------- #


def test_unknown_key_top_level():
    msg = _error({"modle": {}})
    assert msg.startswith("modle: unknown key")
    assert "model" in msg and "augmentation" in msg  # lists the known keys


def test_unknown_key_nested():
    msg = _error({"model": {"pathx": "x"}})
    assert msg.startswith("model.pathx: unknown key (known: path, dtype, ")


def test_wrong_type():
    assert _error({"augmentation": {"n_latents": "abc"}}) == "augmentation.n_latents: expected int, got str 'abc'"
    assert _error({"augmentation": {"n_ahead": 2.0}}).startswith("augmentation.n_ahead: expected int, got float")
    assert _error({"model": {"path": 3}}).startswith("model.path: expected str, got int")
    assert _error({"coprocessor": {"lora_alpha": "big"}}).startswith("coprocessor.lora_alpha: expected float")


def test_float_accepts_int_and_int_rejects_bool():
    assert load_config({"coprocessor": {"lora_alpha": 16}}).coprocessor.lora_alpha == 16.0
    assert _error({"coprocessor": {"seed": True}}).startswith("coprocessor.seed: expected int, got bool")
    assert _error({"coprocessor": {"lora_alpha": True}}).startswith("coprocessor.lora_alpha: expected float")


def test_bad_literal():
    assert _error({"coprocessor": {"mode": "big"}}) == (
        "coprocessor.mode: expected one of 'full', 'lora', 'pause', got 'big'"
    )
    assert _error({"storage": {"dtype": "float16"}}).startswith("storage.dtype: expected one of")


def test_bool_rejects_int_and_string():
    assert _error({"model": {"trust_remote_code": 1}}) == "model.trust_remote_code: expected bool, got int 1"
    assert _error({"model": {"trust_remote_code": "yes"}}).startswith("model.trust_remote_code: expected bool")
    assert load_config({"model": {"trust_remote_code": True}}).model.trust_remote_code is True


def test_optional_fields():
    assert load_config({"model": {"attn_implementation": None}}).model.attn_implementation is None
    assert load_config({"model": {"revision_cache_dir": "/tmp/x"}}).model.revision_cache_dir == "/tmp/x"
    assert _error({"model": {"revision_cache_dir": 5}}).startswith("model.revision_cache_dir: expected str")


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"augmentation": {"n_latents": 0}}, "augmentation.n_latents"),
        ({"augmentation": {"n_ahead": 0}}, "augmentation.n_ahead"),
        ({"augmentation": {"points_per_sequence": -1}}, "augmentation.points_per_sequence"),
        ({"augmentation": {"min_prefix": 0}}, "augmentation.min_prefix"),
        ({"coprocessor": {"lora_rank": 0}}, "coprocessor.lora_rank"),
        ({"coprocessor": {"lora_alpha": 0}}, "coprocessor.lora_alpha"),
        ({"coprocessor": {"lora_dropout": 1.0}}, "coprocessor.lora_dropout"),
        ({"coprocessor": {"lora_dropout": -0.1}}, "coprocessor.lora_dropout"),
        ({"coprocessor": {"lora_targets": []}}, "coprocessor.lora_targets"),
        ({"model": {"attn_implementation": "fast"}}, "model.attn_implementation"),
        ({"model": {"path": ""}}, "model.path"),
    ],
)
def test_out_of_range_values(data, path):
    assert _error(data).startswith(f"{path}: ")


def test_post_init_validates_direct_construction():
    with pytest.raises(ConfigError, match=r"^n_latents: must be >= 1, got 0$"):
        AugmentationConfig(n_latents=0)
    assert _error({"augmentation": {"n_latents": 0}}) == "augmentation.n_latents: must be >= 1, got 0"


def test_section_not_a_mapping():
    assert _error({"augmentation": 5}).startswith("augmentation: expected a mapping")
    assert _error({"coprocessor": ["lora"]}).startswith("coprocessor: expected a mapping")


def test_list_or_str_union():
    assert load_config({"coprocessor": {"lora_targets": "all-linear"}}).coprocessor.lora_targets == "all-linear"
    targets = load_config({"coprocessor": {"lora_targets": ["q_proj", "v_proj"]}}).coprocessor.lora_targets
    assert targets == ["q_proj", "v_proj"]
    msg = _error({"coprocessor": {"lora_targets": [1, 2]}})
    assert msg.startswith("coprocessor.lora_targets: expected list[str] | str, got list [1, 2]")


# Ad-hoc tree: exercises the generic machinery beyond the classes shipped in the module.


@dataclass(kw_only=True)
class _Inner:
    name: str
    """A required field."""

    weights: dict[str, float] = field(default_factory=dict)
    """Dict of floats."""

    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.name == "bad":
            raise ConfigError("name: must not be 'bad'")


@dataclass(kw_only=True)
class _Outer:
    inner: _Inner = field(default_factory=lambda: _Inner(name="x"))
    """A nested section."""

    maybe: _Inner | None = None
    """An optional nested section."""

    level: Literal[1, 2] = 1


def test_missing_required_field_in_nested_dataclass():
    with pytest.raises(ConfigError, match=r"^inner\.name: missing required field$"):
        from_dict(_Outer, {"inner": {}})
    with pytest.raises(ConfigError, match=r"^maybe\.name: missing required field$"):
        from_dict(_Outer, {"maybe": {"tags": []}})


def test_generic_tree_types_and_paths():
    out = from_dict(_Outer, {"inner": {"name": "a", "weights": {"w": 1}}, "maybe": {"name": "b"}, "level": 2})
    assert out == _Outer(inner=_Inner(name="a", weights={"w": 1.0}), maybe=_Inner(name="b"), level=2)
    assert from_dict(_Outer, to_dict(out)) == out
    with pytest.raises(ConfigError, match=r"^inner\.weights\.w: expected float, got str 'x'$"):
        from_dict(_Outer, {"inner": {"name": "a", "weights": {"w": "x"}}})
    with pytest.raises(ConfigError, match=r"^inner\.tags\[1\]: expected str, got int 3$"):
        from_dict(_Outer, {"inner": {"name": "a", "tags": ["ok", 3]}})
    with pytest.raises(ConfigError, match=r"^maybe\.name: must not be 'bad'$"):
        from_dict(_Outer, {"maybe": {"name": "bad"}})
    with pytest.raises(ConfigError, match=r"^level: expected one of 1, 2, got True$"):
        from_dict(_Outer, {"level": True})
    with pytest.raises(ConfigError, match=r"^config: expected a mapping"):
        from_dict(_Outer, ["not", "a", "mapping"])
    # load_config works for any root class.
    assert load_config(None, cls=_Outer, overrides=["inner.name=z", "inner.weights.a=2"]).inner == _Inner(
        name="z", weights={"a": 2.0}
    )


# --------------------------------------------------------------------------- #
# Overrides
# --------------------------------------------------------------------------- #


def test_overrides_apply(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("augmentation:\n  n_latents: 2\n  n_ahead: 3\n")
    cfg = load_config(
        path,
        overrides=[
            "augmentation.n_latents=16",
            "coprocessor.lora_targets=[q_proj,v_proj]",
            "coprocessor.mode=lora",
            "model.attn_implementation=null",
            "model.trust_remote_code=true",
        ],
    )
    assert cfg.augmentation == AugmentationConfig(n_latents=16, n_ahead=3)  # merged with the file
    assert cfg.coprocessor.lora_targets == ["q_proj", "v_proj"]
    assert cfg.coprocessor.mode == "lora"
    assert cfg.model.attn_implementation is None
    assert cfg.model.trust_remote_code is True


def test_override_whole_section():
    cfg = load_config(overrides=["storage={mode: latents, dtype: float32}"])
    assert cfg.storage == StorageConfig(mode="latents", dtype="float32")


def test_overrides_are_validated():
    assert _error(None, overrides=["augmentation.n_latents=0"]) == "augmentation.n_latents: must be >= 1, got 0"
    assert _error(None, overrides=["coprocessor.mode=big"]).startswith("coprocessor.mode: expected one of")


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ("augmentation.n_latentz=3", "augmentation.n_latentz"),
        ("augmentaton.n_latents=3", "augmentaton"),
        ("bogus=1", "bogus"),
    ],
)
def test_bad_override_key(override, path):
    msg = _error(None, overrides=[override])
    assert msg.startswith(f"{path}: unknown key")
    assert override in msg


def test_malformed_override():
    assert "expected dotted.key=value" in _error(None, overrides=["augmentation.n_latents"])
    assert _error(None, overrides=["coprocessor.lora_targets=[a, b"]).startswith("coprocessor.lora_targets: ")


# --------------------------------------------------------------------------- #
# Files
# --------------------------------------------------------------------------- #


def test_yaml_parse_error_names_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("augmentation:\n  n_latents: [1, 2\n")
    msg = _error(path)
    assert msg.startswith(str(path)) and "invalid YAML" in msg


def test_top_level_yaml_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    msg = _error(path)
    assert msg.startswith(str(path)) and "top level must be a mapping" in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert _error(path).startswith(f"{path}: cannot read config file")


# --------------------------------------------------------------------------- #
# Attribute docstrings
# --------------------------------------------------------------------------- #


def test_field_docs_model_config():
    docs = field_docs(ModelConfig)
    assert list(docs) == [f.name for f in dataclasses.fields(ModelConfig)]
    assert "s3://" in docs["path"]
    assert docs["trust_remote_code"]


def test_every_field_in_tree_is_documented():
    classes = _sections(CacheAugConfig)
    assert {ModelConfig, AugmentationConfig, CoprocessorConfig, StorageConfig} < set(classes)
    for cls in classes:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name, "").strip(), f"{cls.__name__}.{f.name} has no docstring"


def test_field_docs_other_module_and_inheritance():
    docs = field_docs(_Outer)
    assert docs == {"inner": "A nested section.", "maybe": "An optional nested section.", "level": ""}
    assert field_docs(_Inner)["tags"] == ""  # undocumented field

    @dataclass(kw_only=True)
    class Child(_Inner):
        extra: int = 0
        """Added in a subclass
        over two lines."""

    docs = field_docs(Child)
    assert docs["name"] == "A required field."
    assert docs["extra"] == "Added in a subclass\nover two lines."


# --------------------------------------------------------------------------- #
# The serve section's sources: documented defaults, applied in one place
# --------------------------------------------------------------------------- #


def test_serve_sources_default_to_the_corpus_job():
    corpus = ["corpus.coprocessor=cop", "corpus.output=out", "corpus.input_paths=[docs]"]
    got = resolve_serve_sources(load_config(overrides=corpus))
    assert (got.coprocessor, got.cache_prefix, got.documents) == ("cop", "out", ["docs"])
    written = resolve_serve_sources(load_config(overrides=[*corpus, "serve.coprocessor=c2", "serve.cache_prefix=p2",
                                                           "serve.documents=[d2]"]))
    assert (written.coprocessor, written.cache_prefix, written.documents) == ("c2", "p2", ["d2"])
    none = resolve_serve_sources(load_config(overrides=["serve.documents=[]"]))
    assert none.documents == [] and none.coprocessor is None  # [] disables the lookup; no coprocessor anywhere
    for name in ("coprocessor", "cache_prefix", "documents"):
        assert "resolve_serve_sources" in field_docs(type(load_config().serve))[name]


# --------------------------------------------------------------------------- #
# Import weight
# --------------------------------------------------------------------------- #


def test_import_does_not_pull_heavy_deps():
    code = (
        "import sys, cache_aug.config\n"
        "heavy = [m for m in ('ray', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
