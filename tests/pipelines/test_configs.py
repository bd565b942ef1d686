"""Every shipped config parses and is accepted by what reads it.

Job configs load into the typed config tree; DeepSpeed JSONs (as shipped and as each job fills them in) pass
DeepSpeed's config class; the cluster launcher YAML passes Ray's own `ray up` preparation and schema; Serve configs
(cluster/serve/*.yaml and the serveConfigV2 of any RayService) pass Ray's Serve schema and import real code;
KubeRay manifests name entrypoints, configs and images that exist and agree with each other; and every file in
cluster/ says how to use it and is covered by one of these checks. No credentials anywhere.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml

from pipelines.config import load_job_config
from pipelines.train import deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
JOB_CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))
DS_CONFIGS = sorted((CLUSTER / "deepspeed").glob("*.json"))
KUBE_MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
SERVE_FILES = sorted((CLUSTER / "serve").glob("*.yaml"))
LAUNCHERS = sorted(p for p in CLUSTER.glob("*.yaml") if "provider" in (yaml.safe_load(p.read_text()) or {}))
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
LOCK = CLUSTER / "constraints.txt"

RAY_KINDS = {"RayCluster", "RayJob", "RayService", "RayCronJob"}
# Spec fields KubeRay knows (ray.io/v1, KubeRay 1.5-1.6); the API server silently drops unknown ones.
KNOWN_FIELDS = {
    "RayClusterSpec": {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
                       "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs", "authOptions",
                       "upgradeStrategy"},
    "RayJobSpec": {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                   "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "deletionStrategy",
                   "entrypoint",
                   "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
                   "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"},
    "RayServiceSpec": {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold", "serveService",
                       "upgradeStrategy", "serveConfigV2", "rayClusterConfig", "excludeHeadPodFromServeSvc",
                       "rayClusterDeletionDelaySeconds"},
    "RayCronJobSpec": {"jobTemplate", "schedule", "suspend", "concurrencyPolicy", "startingDeadlineSeconds",
                       "successfulJobsHistoryLimit", "failedJobsHistoryLimit"},
    "HeadGroupSpec": {"template", "headService", "enableIngress", "rayStartParams", "serviceType"},
    "WorkerGroupSpec": {"groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams",
                        "template", "scaleStrategy", "suspend", "numOfHosts"},
}
SECRET_NAME = re.compile(r"(?:^|_)(?:SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|API_KEY|CREDENTIALS?)(?:_|$)",
                         re.I)


# --------------------------------------------------------------------------- #
# What the project pins, and the image every pod runs
# --------------------------------------------------------------------------- #


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pinned_ray():
    from packaging.requirements import Requirement

    return next(r for r in map(Requirement, _pyproject()["dependencies"]) if r.name == "ray").specifier


def _dockerfile() -> tuple[str, str]:
    """(the Ray version of the base image, the WORKDIR holding the checkout)."""
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-\S+$", text, re.M)
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.M)
    assert base and workdir, "cluster/Dockerfile: FROM rayproject/ray:<version>-... and WORKDIR expected"
    return base.group(1), workdir.group(1)


def test_pinned_versions_agree():
    ray_version, _ = _dockerfile()
    assert ray_version in _pinned_ray(), f"Dockerfile's Ray {ray_version} is outside the pinned {_pinned_ray()}"


# --------------------------------------------------------------------------- #
# Job configs and DeepSpeed
# --------------------------------------------------------------------------- #


def _header(path: Path) -> str:
    """The comment block a file opens with."""
    lines = path.read_text().splitlines()
    return "\n".join(lines[: next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))])


def _export_path(cfg) -> str:
    t = cfg.train
    return t.export_path or f"{t.storage_path.rstrip('/')}/{t.run_name}/export"


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_config_loads_and_names_existing_files(path, monkeypatch):
    from deepspeed.runtime.config import DeepSpeedConfig

    header = _header(path)
    launch = re.search(r"python -m jobs\.|serve (run|deploy) |cache-aug [a-z]", header)
    assert launch, "each config opens with the command that launches it"
    cfg = load_job_config(path)
    if "python -m jobs.train" not in header:
        return
    assert (ROOT / cfg.train.deepspeed_config).exists()
    monkeypatch.chdir(ROOT)
    ds = deepspeed_config(cfg)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.train.num_workers
    # What DeepSpeed gets, as filled in by the job (one process here, so DeepSpeed recomputes the global batch).
    ds.pop("train_batch_size")
    DeepSpeedConfig(ds)
    bf16 = ds.get("bf16", {}).get("enabled", False)
    assert bf16 == (cfg.model.dtype == "bfloat16") == cfg.train.use_gpu, (
        "bf16 JSON <=> bfloat16 weights <=> GPU workers")
    o = cfg.optim  # AdamW's settings and clipping come from the one optim section; the schedule is the library's
    assert ds["optimizer"]["params"] | {"lr": o.lr} == ds["optimizer"]["params"] | {
        "lr": o.lr, "betas": o.betas, "eps": o.eps, "weight_decay": o.weight_decay}
    assert ds["gradient_clipping"] == o.grad_clip and "scheduler" not in ds


@pytest.mark.parametrize("key", ["scheduler", "gradient_clipping", "optimizer.params.lr", "optimizer.params.betas"])
def test_deepspeed_json_may_not_set_what_the_job_config_owns(key, tmp_path, monkeypatch):
    """Two sources for one setting would let the JSON silently win or lose: the job refuses the JSON, naming it."""
    raw = json.loads((ROOT / "cluster/deepspeed/cpu.json").read_text())
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = {"type": "WarmupLR"} if leaf == "scheduler" else 0.5
    (tmp_path / "ds.json").write_text(json.dumps(raw))
    cfg = load_job_config(None, overrides=[f"train.deepspeed_config={tmp_path / 'ds.json'}"])
    with pytest.raises(ValueError, match=rf"{re.escape(key)}'?, which comes from .*remove it from the JSON"):
        deepspeed_config(cfg)


@pytest.mark.parametrize("path", [p for p in JOB_CONFIGS if "python -m jobs.augment" in _header(p)],
                         ids=lambda p: p.name)
def test_corpus_config_uses_a_coprocessor_trained_for_its_decoder(path):
    cfg = load_job_config(path)
    trainers = {_export_path(t): t
                for t in (load_job_config(p) for p in JOB_CONFIGS if "python -m jobs.train" in _header(p))}
    assert cfg.corpus.coprocessor in trainers, (
        f"corpus.coprocessor is no shipped training config's export: {sorted(trainers)}")
    trained = trainers[cfg.corpus.coprocessor]
    assert (cfg.model.path, cfg.model.dtype) == (trained.model.path, trained.model.dtype)
    assert cfg.augmentation.n_latents == trained.augmentation.n_latents


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_json_accepted_by_deepspeed(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads(path.read_text())
    raw.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, train_batch_size=2)
    ds = DeepSpeedConfig(raw)  # world size 1 without a process group; raises on anything DeepSpeed rejects
    assert ds.zero_optimization_stage == raw["zero_optimization"]["stage"]
    assert ds.bfloat16_config.enabled == raw.get("bf16", {}).get("enabled", False)
    users = [p.name for p in JOB_CONFIGS if load_job_config(p).train.deepspeed_config == str(path.relative_to(ROOT))]
    assert users and "Used by" in raw.get("_comment", ""), "every DeepSpeed JSON is used by a job config and says which"


# --------------------------------------------------------------------------- #
# Cluster launcher and runtime env
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_cluster_launcher_yaml_passes_ray_up_validation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    # what `ray up` runs before it contacts the cloud: ray-schema.json + node types
    validate_config(prepare_config(raw))
    starts = [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) >= 2 and all("RAY_AUTH_MODE=token" in c for c in starts), (
        "every `ray start` runs with token auth")
    assert "~/.ray/auth_token" in raw["file_mounts"], "the token reaches every node"
    assert not any("0.0.0.0" in c for c in starts), "the dashboard/job API stays off public interfaces"
    docker = raw.get("docker", {})
    for image in (docker.get("image"), docker.get("head_image"), docker.get("worker_image")):
        if image:
            version = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)(-\S+)?", image)
            assert version and version.group(1) in _pinned_ray(), image
    setup = " ".join(sum((raw.get(k, []) for k in ("setup_commands", "head_setup_commands", "worker_setup_commands")),
                         []))
    assert re.search(r"torch==\S+ --index-url", setup), "torch from the index matching the node, never plain PyPI's"
    assert re.search(r"cache-aug @ git\+\S+@\S+", setup), "the project installs at a pinned ref"


def test_runtime_env_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    raw = yaml.safe_load(RUNTIME_ENV.read_text())
    assert set(raw) <= set(RuntimeEnv.known_fields), set(raw) - set(RuntimeEnv.known_fields)
    RuntimeEnv(**raw)  # Ray's own field validation (types of env_vars, working_dir, ...)
    assert (ROOT / raw["working_dir"]).resolve() == ROOT, "submitted from the repo root, working_dir ships the repo"
    assert not [k for k in raw.get("env_vars", {}) if SECRET_NAME.search(k)], "no credentials in a runtime env"


# --------------------------------------------------------------------------- #
# Serve configs: cluster/serve/*.yaml and every RayService's serveConfigV2
# --------------------------------------------------------------------------- #


def _kube_docs(path: Path) -> list[dict]:
    """A manifest's documents, plus any Ray object kept as YAML text in a ConfigMap (a CronJob's RayJob template)."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for d in list(docs):
        if d.get("kind") == "ConfigMap":
            docs += [e for v in d.get("data", {}).values() for e in yaml.safe_load_all(v)
                     if isinstance(e, dict) and "kind" in e]
    return docs


def _serve_configs() -> list:
    """(Serve config, the WORKDIR of the image it runs in if it runs in a RayService), one param per config."""
    found = [pytest.param(yaml.safe_load(p.read_text()), None, id=p.name) for p in SERVE_FILES]
    for path in KUBE_MANIFESTS:
        for d in _kube_docs(path):
            if d["kind"] == "RayService":
                config = yaml.safe_load(d["spec"]["serveConfigV2"])
                found.append(pytest.param(config, _dockerfile()[1], id=f"{path.name}:serveConfigV2"))
    return found


def _defines(module_file: Path, name: str) -> bool:
    tree = ast.parse(module_file.read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name) == name for a in node.names):
            return True
    return False


@pytest.mark.parametrize("config,workdir", _serve_configs())
def test_serve_config_passes_serve_schema_and_imports_repo_code(config, workdir):
    from ray.serve.schema import (
        DeploymentSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    ServeDeploySchema.model_validate(config)
    # The schema ignores unknown keys; a misspelt option would silently do nothing.
    assert set(config) <= set(ServeDeploySchema.model_fields), set(config) - set(ServeDeploySchema.model_fields)
    for app in config["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields), set(app) - set(ServeApplicationSchema.model_fields)
        for dep in app.get("deployments", []):
            assert set(dep) <= set(DeploymentSchema.model_fields), set(dep) - set(DeploymentSchema.model_fields)
        module, _, attr = app["import_path"].replace(":", ".").rpartition(".")
        module_file = ROOT / (module.replace(".", "/") + ".py")
        assert module_file.exists() and _defines(module_file, attr), f"{app['import_path']} is not in the repo"
        args = app.get("args") or {}
        if isinstance(args.get("config"), str):
            load_job_config(ROOT / args["config"], overrides=args.get("overrides", []))
        working_dir = (app.get("runtime_env") or {}).get("working_dir")
        if workdir and working_dir:
            assert working_dir == f"local://{workdir}", "a RayService runs the code baked into the image"


# --------------------------------------------------------------------------- #
# KubeRay manifests
# --------------------------------------------------------------------------- #


def _cluster_specs(doc: dict) -> list[dict]:
    """The RayClusterSpecs inside a Ray object."""
    spec, kind = doc["spec"], doc["kind"]
    if kind == "RayCluster":
        return [spec]
    key = {"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}.get(kind)
    return [spec.get(key)] if key else [spec["jobTemplate"].get("rayClusterSpec")]


def _job_specs(doc: dict) -> list[dict]:
    """The RayJobSpecs inside a Ray object."""
    if doc["kind"] == "RayJob":
        return [doc["spec"]]
    return [doc["spec"]["jobTemplate"]] if doc["kind"] == "RayCronJob" else []


def _unknown(obj: dict, kind: str) -> set:
    return set(obj) - KNOWN_FIELDS[kind]


def _check_entrypoint(entry: str) -> None:
    argv = shlex.split(entry)
    assert argv[:2] == ["python", "-m"] and (ROOT / (argv[2].replace(".", "/") + ".py")).exists(), entry
    config = argv[argv.index("--config") + 1]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    load_job_config(ROOT / config, overrides=overrides)  # the job config and its overrides are valid


def _check_cluster_spec(cs: dict, image: str, workdir: str) -> None:
    from packaging.version import Version

    assert not _unknown(cs, "RayClusterSpec"), _unknown(cs, "RayClusterSpec")
    assert Version(cs["rayVersion"]) in _pinned_ray(), (
        f"rayVersion {cs['rayVersion']} is outside the pinned {_pinned_ray()}")
    assert cs["rayVersion"] == _dockerfile()[0], "rayVersion is the Ray of the image"
    assert cs.get("authOptions", {}).get("mode") == "token", "token auth on every Ray cluster"
    assert not _unknown(cs["headGroupSpec"], "HeadGroupSpec"), _unknown(cs["headGroupSpec"], "HeadGroupSpec")
    pods = [cs["headGroupSpec"]["template"]]
    for group in cs.get("workerGroupSpecs", []):
        assert not _unknown(group, "WorkerGroupSpec"), _unknown(group, "WorkerGroupSpec")
        assert group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get("maxReplicas", 2**31), (
            group["groupName"])
        pods.append(group["template"])
    for pod in pods:
        for c in pod["spec"]["containers"]:
            assert c["image"] == image, f"{c['name']}: {c['image']} is not the project image {image}"
            assert c.get("workingDir") == workdir, f"{c['name']}: workingDir is not the image's checkout {workdir}"
            res = c.get("resources", {})
            assert res.get("limits", {}).get("nvidia.com/gpu") == res.get("requests", {}).get("nvidia.com/gpu"), (
                c["name"])


@pytest.mark.parametrize("path", KUBE_MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_is_complete_and_consistent(path):
    from ray.runtime_env import RuntimeEnv

    docs = _kube_docs(path)
    assert all(d.get("apiVersion") and d.get("kind") and d.get("metadata") for d in docs)
    ray_docs = [d for d in docs if d["kind"] in RAY_KINDS]
    assert ray_docs, "no Ray object in this manifest"
    _, workdir = _dockerfile()
    image = f"ghcr.io/your-org/cache-aug:{_pyproject()['version']}"
    runtime_env_vars = yaml.safe_load(RUNTIME_ENV.read_text())["env_vars"]
    for d in ray_docs:
        assert d["apiVersion"] == "ray.io/v1", d["kind"]
        assert not _unknown(d["spec"], d["kind"] + "Spec"), _unknown(d["spec"], d["kind"] + "Spec")
        if d["kind"] == "RayCronJob":
            assert d["spec"]["schedule"]
        for cs in _cluster_specs(d):
            assert cs, f"{d['kind']} without a cluster spec"
            _check_cluster_spec(cs, image, workdir)
        for job in _job_specs(d):
            assert not _unknown(job, "RayJobSpec"), _unknown(job, "RayJobSpec")
            _check_entrypoint(job["entrypoint"])
            env = yaml.safe_load(job.get("runtimeEnvYAML", "")) or {}
            RuntimeEnv(**env)
            assert env.get("working_dir") == f"local://{workdir}", "jobs run the checkout baked into the image"
            assert env.get("env_vars") == runtime_env_vars, "same env_vars as cluster/runtime_env.yaml"


# --------------------------------------------------------------------------- #
# The lock: every install goes through it
# --------------------------------------------------------------------------- #


def _lock() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and not set(version) & set("<>=!~ ;"), f"{LOCK.name}: {line!r} is not an exact pin"
            assert canonicalize_name(name) not in pins, f"{LOCK.name}: {name} pinned twice"
            pins[canonicalize_name(name)] = version
    return pins


def test_lock_pins_every_requirement_within_its_range():
    """Each dependency (and dev extra) of pyproject.toml is pinned exactly, and the pin is one its range admits."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _lock()
    for extra in [None, *project["optional-dependencies"]]:
        for line in project["dependencies"] if extra is None else project["optional-dependencies"][extra]:
            req = Requirement(line)
            if req.name == project["name"] or (req.marker and not req.marker.evaluate({"extra": extra or ""})):
                continue
            name = canonicalize_name(req.name)
            assert name in pins, f"{req.name} ({extra or 'dependencies'}) is not in {LOCK.name}: run bash .ci/lock"
            assert req.specifier.contains(pins[name], prereleases=True), (
                f"{LOCK.name} pins {req.name}=={pins[name]}, outside {req}")
    for name in ("torch", "transformers", "ray", "deepspeed"):  # what the code reaches inside of: below the next minor
        req = next(Requirement(r) for r in project["dependencies"] if canonicalize_name(Requirement(r).name) == name)
        major, minor = (int(x) for x in pins[name].split(".")[:2])
        assert not req.specifier.contains(f"{major}.{minor + 1}.0", prereleases=True), (
            f"{req}: admits the untested {major}.{minor + 1}")


def test_installs_go_through_the_lock():
    for path in (ROOT / ".ci" / "run", ROOT / "README.md", DOCKERFILE):
        installs = [line for line in path.read_text().splitlines()
                    if re.search(r"pip install .*(-e |\.\[|\s\.$)", line)]
        assert installs, f"{path.name}: no install of the project found"
        for line in installs:
            assert "-c cluster/constraints.txt" in line, f"{path.name}: installs without the lock: {line.strip()}"


# --------------------------------------------------------------------------- #
# Every file in cluster/: covered, documented, free of credentials
# --------------------------------------------------------------------------- #


def _covered_by(path: Path) -> str | None:
    """Which check above reads this file."""
    if path in DS_CONFIGS:
        return "deepspeed"
    if path in KUBE_MANIFESTS:
        return "kuberay"
    if path in SERVE_FILES:
        return "serve"
    if path in LAUNCHERS:
        return "launcher"
    return {RUNTIME_ENV: "runtime_env", DOCKERFILE: "dockerfile", CLUSTER / "Dockerfile.dockerignore": "dockerfile",
            LOCK: "lock"}.get(path)


def _values(obj):
    """Every (key, value) pair in nested mappings and lists, YAML text inside strings included."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k, v
            yield from _values(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _values(v)
    elif isinstance(obj, str) and "\n" in obj:
        try:
            yield from _values(yaml.safe_load(obj))
        except yaml.YAMLError:
            pass


@pytest.mark.parametrize("path", sorted(p for p in CLUSTER.rglob("*") if p.is_file()),
                         ids=lambda p: str(p.relative_to(CLUSTER)))
def test_cluster_file_is_checked_documented_and_free_of_credentials(path):
    assert _covered_by(path), "no test checks this file: add one"
    text = path.read_text()
    if path.suffix == ".json":
        assert json.loads(text).get("_comment"), "JSON has no comments: a _comment says how it is used"
        return
    header = _header(path)
    assert re.search(r"^#\s+(kubectl|ray|serve|docker|.*\bpip install) ", header, re.M), (
        "the header comment shows the command that uses it")
    assert not re.search(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY", text), "a credential is committed"
    if path == DOCKERFILE:
        names = re.findall(r"^(?:ENV|ARG)\s+([A-Za-z_][A-Za-z0-9_]*)", text, re.M)
        assert not [n for n in names if SECRET_NAME.search(n)], "no credentials in the image"
        return
    for doc in yaml.safe_load_all(text) if path.suffix == ".yaml" else []:
        for key, value in _values(doc):
            # Kubernetes env entries: a secret-like name takes valueFrom (secretKeyRef), never a value.
            if key == "env" and isinstance(value, list):
                leaked = [e["name"] for e in value if SECRET_NAME.search(e.get("name", "")) and "value" in e]
                assert not leaked, f"credentials by value: {leaked}; use valueFrom.secretKeyRef"
            # Environment-variable-like keys (AWS_SECRET_ACCESS_KEY: ...) never carry a literal.
            if isinstance(key, str) and re.fullmatch(r"[A-Z][A-Z0-9_]*", key) and SECRET_NAME.search(key):
                assert not (isinstance(value, str) and value), f"{key} has a literal value"
