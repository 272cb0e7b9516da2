"""cluster/: KubeRay manifests against the KubeRay CRD schemas, `ray up` YAMLs against Ray's cluster-config schema,
the Dockerfiles' pins, and the cross-file facts a deployment depends on (same image, same Ray version, shared
volume everywhere, entrypoints that parse as real `gptfl` commands, documented placeholders).

The CRD schemas are the OpenAPI v3 schemas of the CRDs in ``$GPTFL_KUBERAY_SCHEMAS`` or ../shared/schemas/kuberay
(see its SOURCE.md). They are converted to JSON Schema the way the API server reads them: int-or-string, nullable,
list-type=set -> uniqueItems, and unknown fields rejected (``kubectl apply`` validates strictly by default).
CEL rules (x-kubernetes-validations) are evaluated only by an API server and are not checked here.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
SCHEMA_DIR = Path(os.environ.get("GPTFL_KUBERAY_SCHEMAS", REPO.parent / "shared" / "schemas" / "kuberay"))
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
KUBERAY_MANIFESTS = ["raycluster.yaml", "rayjob-run.yaml", "rayjob-sweep.yaml"]
LAUNCHER_CONFIGS = ["ray-up-aws.yaml", "ray-up-gcp.yaml"]
SHARED_MOUNT = "/mnt/gptfl"
# Values a user must replace before deploying; cluster/README.md says how for each.
PLACEHOLDERS = ["registry.example.com", "STORAGE_CLASS", "AMI_ID", "EFS_ID", "GCP_PROJECT_ID", "FILESTORE_IP"]

needs_schemas = pytest.mark.skipif(
    not all((SCHEMA_DIR / f).is_file() for f in CRD_FILES.values()),
    reason=f"KubeRay CRD schemas not found in {SCHEMA_DIR} (set GPTFL_KUBERAY_SCHEMAS)",
)


# --------------------------------------------------------------------------- OpenAPI -> JSON Schema
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def openapi_to_jsonschema(node: Any) -> Any:
    """Convert a CRD's structural OpenAPI v3 schema to a JSON Schema (draft 4) with the API server's rules."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    out.pop("nullable", None)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("format") in INT_RANGES and out.get("type") == "integer":
        out["minimum"], out["maximum"] = INT_RANGES[node["format"]]
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        for key in ("apiVersion", "kind"):
            props.setdefault(key, {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False  # unknown field = error, as with kubectl's strict validation
    return out


@cache
def crd_validator(kind: str) -> Any:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are megabytes of YAML
    crd = yaml.load((SCHEMA_DIR / CRD_FILES[kind]).read_text(), Loader=loader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    schema["properties"]["apiVersion"] = {"enum": [f"{crd['spec']['group']}/v1"]}
    schema["properties"]["kind"] = {"enum": [kind]}
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def crd_errors(doc: dict[str, Any]) -> list[str]:
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


# --------------------------------------------------------------------------------------- helpers
def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def load_all(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def pyproject_field(pattern: str) -> str:
    """One value from pyproject.toml (a regex with one group; tomllib is not in Python 3.10)."""
    (value,) = re.findall(pattern, (REPO / "pyproject.toml").read_text(), flags=re.MULTILINE)
    return value


def pinned_ray_version() -> str:
    return pyproject_field(r'^\s*"ray\[[^\]]*\]==([^"]+)"')


def image(name: str = "gptfl-ray") -> str:
    version = pyproject_field(r'^version = "([^"]+)"')
    return f"registry.example.com/{name}:{version}"


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def pod_specs(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    groups = {"head": spec["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in spec["workerGroupSpecs"]})
    return {name: g["template"]["spec"] for name, g in groups.items()}


def gptfl_argv(entrypoint: str) -> list[str]:
    argv = shlex.split(entrypoint)
    assert argv[0] == "gptfl", entrypoint
    return argv


# ----------------------------------------------------------------------- KubeRay manifests (schema)
@needs_schemas
@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_kuberay_manifest_validates_against_crd(name):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert crd_errors(doc) == []
    # KubeRay derives service and pod names from metadata.name: a DNS-1035 label, short enough for suffixes.
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,45}[a-z0-9])?", doc["metadata"]["name"])


@needs_schemas
def test_crd_validation_rejects_broken_manifests():
    """The converted schema is not vacuous: typos, wrong types and bad enums all fail."""
    good = load("raycluster.yaml")
    worker = ["spec", "workerGroupSpecs", 0]

    def broken(path: list[Any], key: str, value: Any = None, drop: str | None = None) -> dict[str, Any]:
        doc = copy.deepcopy(good)
        node = doc
        for p in path:
            node = node[p]
        if drop:
            node[key] = value
            del node[drop]
        else:
            node[key] = value
        return doc

    assert crd_errors(broken(worker, "minReplica", 0, drop="minReplicas"))  # typo'd field (and required gone)
    assert crd_errors(broken(worker, "maxReplicas", "four"))  # wrong type
    assert crd_errors(broken(worker, "maxReplicas", 2**31))  # int32 overflow
    assert crd_errors(broken(["spec", "authOptions"], "mode", "password"))  # not in the enum
    assert crd_errors(broken(["spec"], "workerGroupSpecs", [{"groupName": "x"}]))  # required fields missing
    limits = [*worker, "template", "spec", "containers", 0, "resources", "limits"]
    assert crd_errors(broken(limits, "cpu", 8)) == []  # int-or-string: an int is fine
    assert crd_errors(broken(limits, "cpu", ["8"]))  # ... a list is not
    job = load("rayjob-sweep.yaml")
    job["spec"]["entrypointNumCpus"] = "one"
    assert crd_errors(job)


# -------------------------------------------------------------------- KubeRay manifests (content)
def test_kuberay_clusters_pin_ray_and_use_one_image():
    assert pinned_ray_version() == "2.60.0"
    for name in ["raycluster.yaml", "rayjob-run.yaml"]:
        spec = cluster_spec(load(name))
        assert spec["rayVersion"] == pinned_ray_version(), name
        for group, pod in pod_specs(spec).items():
            assert [c["image"] for c in pod["containers"]] == [image()], (name, group)


def test_rayjob_cluster_is_the_raycluster_spec():
    """rayjob-run.yaml repeats raycluster.yaml's spec (YAML has no includes): they must not drift apart."""
    assert load("rayjob-run.yaml")["spec"]["rayClusterSpec"] == load("raycluster.yaml")["spec"]


def test_worker_groups_gpu_generation_and_cpu_clients_autoscale():
    spec = load("raycluster.yaml")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no work on the head
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gen-gpu"]
    gpu_limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) >= 1
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]  # scales from zero: no idle GPUs
    cpu = groups["fl-cpu"]
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert 1 <= cpu["minReplicas"] <= cpu["replicas"] <= cpu["maxReplicas"]
    assert gpu["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_every_ray_pod_mounts_the_shared_volume():
    (pvc,) = load_all("storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ["raycluster.yaml", "rayjob-run.yaml"]:
        for group, pod in pod_specs(cluster_spec(load(name))).items():
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            claim = volumes[mounts[SHARED_MOUNT]]["persistentVolumeClaim"]["claimName"]
            assert claim == pvc["metadata"]["name"], (name, group)
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", (name, group)


def test_token_auth_uses_the_documented_secret():
    readme = (CLUSTER / "README.md").read_text()
    for name in ["raycluster.yaml", "rayjob-run.yaml"]:
        auth = cluster_spec(load(name))["authOptions"]
        assert auth["mode"] == "token"
        assert f"kubectl create secret generic {auth['secretName']}" in readme
        assert f"kubectl get secret {auth['secretName']}" in readme


@pytest.mark.parametrize(("name", "command"), [("rayjob-run.yaml", "run"), ("rayjob-sweep.yaml", "sweep")])
def test_rayjob_entrypoint_is_a_real_gptfl_command(name, command):
    from gptfl_ray.cli import build_parser

    spec = load(name)["spec"]
    argv = gptfl_argv(spec["entrypoint"])
    args = build_parser().parse_args(argv[1:])
    assert args.command == command
    # The config is the image's copy of a file in this repository (cluster/Dockerfile copies it there).
    assert args.config.startswith("/home/ray/gptfl/")
    assert (REPO / args.config.removeprefix("/home/ray/gptfl/")).is_file()
    output = dict(o.split("=", 1) for o in args.overrides)["output_dir"]
    assert output.startswith(SHARED_MOUNT + "/")  # results survive the cluster
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) == {"env_vars"}
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())
    assert runtime_env["env_vars"]["GPTFL_DATA_DIR"].startswith(SHARED_MOUNT + "/")


def test_rayjob_entrypoint_configs_validate():
    from gptfl_ray.config import load_config
    from gptfl_ray.sweep import load_sweep

    run = build_args("rayjob-run.yaml")
    load_config(REPO / run.config.removeprefix("/home/ray/gptfl/"), run.overrides)
    sweep = build_args("rayjob-sweep.yaml")
    load_sweep(REPO / sweep.config.removeprefix("/home/ray/gptfl/"), sweep.overrides)


def build_args(name: str) -> Any:
    from gptfl_ray.cli import build_parser

    return build_parser().parse_args(gptfl_argv(load(name)["spec"]["entrypoint"])[1:])


def test_sweep_job_targets_the_long_lived_cluster():
    spec = load("rayjob-sweep.yaml")["spec"]
    assert "rayClusterSpec" not in spec
    assert spec["clusterSelector"] == {"ray.io/cluster": load("raycluster.yaml")["metadata"]["name"]}


def test_vllm_endpoint_manifest():
    deployment, service = load_all("vllm-serve.yaml")
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == image("gptfl-ray-vllm")
    assert container["command"] == ["vllm", "serve"]
    assert "--port=8000" in container["args"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8000 and port["targetPort"] == container["ports"][0]["name"]
    # The endpoint the docs tell a run config to use is this Service.
    base_url = f"http://{service['metadata']['name']}:{port['port']}/v1"
    assert base_url in (CLUSTER / "README.md").read_text()
    from gptfl_ray.config import ExpanderConfig

    ExpanderConfig(backend="openai", base_url=base_url, model=container["args"][0])


# ----------------------------------------------------------------------------- `ray up` configs
@cache
def ray_cluster_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_validates_against_ray_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(name)
    jsonschema.validate(raw, ray_cluster_schema())
    validate_config(prepare_config(raw))  # what `ray up` runs: provider defaults filled in, then checked


def test_launcher_schema_rejects_a_typo():
    raw = load("ray-up-aws.yaml")
    raw["available_node_types"]["gen_gpu"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(raw, ray_cluster_schema())


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_image_groups_auth_and_storage(name):
    raw = load(name)
    assert raw["docker"]["image"] == image()
    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"]["CPU"] == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for n, t in types.items() if n != raw["head_node_type"] and not t["resources"].get("GPU")]
    assert gpu and gpu[0]["min_workers"] == 0 < gpu[0]["max_workers"]
    assert cpu and cpu[0]["min_workers"] >= 1
    assert sum(t.get("max_workers", 0) for t in types.values()) <= raw["max_workers"]
    # Token auth: every node starts Ray in token mode with the token file the file_mounts bring along.
    (token_dir,) = raw["file_mounts"]
    for cmd in (raw["head_start_ray_commands"][-1], raw["worker_start_ray_commands"][-1]):
        assert "RAY_AUTH_MODE=token" in cmd
        assert f"RAY_AUTH_TOKEN_PATH=$HOME/{token_dir.removeprefix('~/')}/auth_token" in cmd
    # The shared volume reaches the container.
    assert f"-v {SHARED_MOUNT}:{SHARED_MOUNT}" in raw["docker"]["run_options"]
    assert any(f"{SHARED_MOUNT}" in c and "mount" in c for c in raw["initialization_commands"])


# ------------------------------------------------------------------------------------ Dockerfiles
def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (CLUSTER / name).read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def arg_defaults(steps: list[tuple[str, str]]) -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)


def test_dockerfile_pins_ray_and_installs_tts():
    steps = dockerfile("Dockerfile")
    args = arg_defaults(steps)
    assert args["RAY_VERSION"] == pinned_ray_version() == "2.60.0"
    (base,) = [expand(a, args) for i, a in steps if i == "FROM"]
    assert base.startswith("rayproject/ray:2.60.0-py3")
    runs = " ".join(a for i, a in steps if i == "RUN")
    apt = re.search(r"apt-get install ([^&]*)", runs).group(1).split()
    assert {"espeak-ng", "flite"} <= set(apt)
    assert 'ray[default,data,train,tune]==${RAY_VERSION}"' in runs  # the resolver cannot move Ray
    assert "ray.__version__ == '${RAY_VERSION}'" in runs  # the build fails on any other Ray
    assert "espeak-ng --version" in runs and "flite --version" in runs


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.vllm"])
def test_dockerfile_copies_only_what_the_context_holds(name):
    """Every COPY source exists in the repo and is let through by the Dockerfile's own .dockerignore."""
    ignore = (CLUSTER / f"{name}.dockerignore").read_text().split()
    allowed = {p[1:].rstrip("/") for p in ignore if p.startswith("!")}
    assert "*" in ignore
    for instruction, arguments in dockerfile(name):
        if instruction != "COPY":
            continue
        sources = [a for a in arguments.split() if not a.startswith("--")][:-1]
        for src in sources:
            assert (REPO / src).exists(), (name, src)
            assert src.rstrip("/") in allowed, (name, src)


def test_vllm_dockerfile_is_its_own_environment():
    steps = dockerfile("Dockerfile.vllm")
    args = arg_defaults(steps)
    assert args["VLLM_VERSION"] == "0.33.0"
    assert args["RAY_VERSION"] == pinned_ray_version()
    (base,) = [expand(a, args) for i, a in steps if i == "FROM"]
    assert base == "vllm/vllm-openai:v0.33.0"
    runs = " ".join(a for i, a in steps if i == "RUN")
    assert '"ray[default,data]==${RAY_VERSION}"' in runs
    assert "llm]" not in runs  # ray's llm extra would replace the base image's vLLM
    assert "--no-deps ." in runs  # gptfl_ray without torch 2.11 / transformers 5


@pytest.mark.parametrize(
    "name", sorted(p.name for p in CLUSTER.glob("Dockerfile*") if not p.name.endswith(".dockerignore"))
)
def test_every_dockerfile_runs_as_a_numeric_non_root_user(name):
    """The last USER is not root, and numeric (uid:gid) so that Kubernetes' runAsNonRoot can verify it."""
    users = [a.split()[0] for i, a in dockerfile(name) if i == "USER"]
    assert users, f"{name}: no USER instruction: the image runs as its base image's user (root for vLLM)"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or gid.isdigit()), (name, users[-1])


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.vllm"])
def test_dockerfile_base_image_takes_a_documented_digest(name):
    """Tag pinned; the digest is a build arg (empty default: none could be resolved offline) whose
    documentation says how to fill it."""
    steps = dockerfile(name)
    (base,) = [a for i, a in steps if i == "FROM"]
    digest_arg = re.search(r"\$\{(\w+_DIGEST)\}$", base).group(1)
    assert arg_defaults(steps)[digest_arg] == ""
    text = (CLUSTER / name).read_text()
    assert f"--build-arg {digest_arg}=@sha256:<digest>" in text and "docker buildx imagetools inspect" in text


def test_vllm_endpoint_refuses_to_run_as_root():
    deployment, _ = load_all("vllm-serve.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["securityContext"]["runAsNonRoot"] is True


def test_main_dockerfile_python_matches_vllm_image_python():
    """One Python minor version per Ray cluster: the main image is built for the vLLM image's Python."""
    main = arg_defaults(dockerfile("Dockerfile"))["PYTHON_TAG"]
    vllm_steps = dockerfile("Dockerfile.vllm")
    vllm_python = arg_defaults(vllm_steps)["PYTHON_VERSION"]
    assert main == "py" + vllm_python.replace(".", "") == "py312"
    # ... and the vLLM build checks that its base image really has that Python.
    assert "platform.python_version().startswith('${PYTHON_VERSION}.')" in " ".join(a for _, a in vllm_steps)


# -------------------------------------------------------------------------------------- README
def test_readme_documents_commands_and_placeholders():
    readme = (CLUSTER / "README.md").read_text()
    for needed in [
        "kubectl apply -f cluster/raycluster.yaml",
        "kubectl apply -f cluster/rayjob-run.yaml",
        "kubectl port-forward svc/gptfl-head-svc 8265:8265",
        "ray job submit",
        "gptfl submit",
        "ray up cluster/ray-up-aws.yaml",
        "ray up cluster/ray-up-gcp.yaml",
        "docker build -f cluster/Dockerfile ",
        "docker build -f cluster/Dockerfile.vllm ",
        "~/.ray/auth_token",
        "RAY_AUTH_TOKEN",
        "fl-client-",
        "/mnt/gptfl/runs",
    ]:
        assert needed in readme, needed
    used = "".join(p.read_text() for p in CLUSTER.iterdir() if p.suffix in {".yaml", ""} and p.is_file())
    for placeholder in PLACEHOLDERS:
        assert placeholder in used and placeholder in readme, placeholder
