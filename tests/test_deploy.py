"""deploy/: the Kubernetes manifests of node replicas, checked offline (no cluster, no network).

- Every manifest file is validated against the real Kubernetes OpenAPI schemas of every release
  from ``MIN_KUBERNETES`` on, in strict mode (unknown fields fail), with ``kubernetes-validate``.
  The ServiceMonitor (a Prometheus Operator CRD, not in those schemas) is checked structurally.
- What the files must say is read from them: the commands parse with the real ``driffusion``
  parser, the probes hit the documented health paths on the HTTP port, GPU requests match the
  ``--gpus`` list, the admin key comes only from a Secret, selectors and ports line up, the
  autoscaler's metric is one that the prometheus-adapter rule serves.
- Where ``kubectl`` is installed, each overlay is rendered with its built-in kustomize and the
  output is validated and checked the same way (names rewritten by generators, patches applied).
- The server image: every package folder is copied, and a wheel built from exactly those files
  carries the ``driffusion`` console script the containers run.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from driffusion.cli import build_parser

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="pip install kubernetes-validate (the dev extra)"
)
from kubernetes_validate.utils import all_versions  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "base"
OVERLAYS = sorted(p.parent for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
DENOISER_POOL = DEPLOY / "components" / "denoiser-pool"
ADAPTER_VALUES = DEPLOY / "prometheus-adapter" / "values.yaml"
KUSTOMIZATION = "kustomization.yaml"

MIN_KUBERNETES = "1.27"  # deploy/README.md: the oldest release the manifests are written for
VERSIONS = sorted({v for v in all_versions() if Version(v) >= Version(MIN_KUBERNETES)}, key=Version)
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}  # not in the Kubernetes schemas

# The documented interface (docs/DEPLOY.md, "Kubernetes"; README, Serving).
HEALTH_READY, HEALTH_LIVE = "/v2/health/ready", "/v2/health/live"
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
ADMIN_KEY_ENV = "DRIFFUSION_ADMIN_KEY"
SERVER, ENGINES = "server", "engines"
GPU = "nvidia.com/gpu"
KUBECTL = shutil.which("kubectl")
KUBECTL_HINT = (
    "kubectl not found: the kustomize renders are not checked (install kubectl; its built-in "
    "kustomize renders offline)"
)


# --- reading the folder -------------------------------------------------------------------------


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization_files() -> list[Path]:
    return sorted(DEPLOY.rglob(KUSTOMIZATION))


def listed(kustomization: Path, field: str) -> list[Path]:
    """Files or folders a kustomization lists under ``field`` (resources, components, patches)."""
    data = yaml.safe_load(kustomization.read_text())
    entries = []
    for entry in data.get(field, []) or []:
        path = entry.get("path") if isinstance(entry, dict) else entry
        if path:
            entries.append((kustomization.parent / path).resolve())
    return entries


def resource_files() -> list[Path]:
    files = {p for k in kustomization_files() for p in listed(k, "resources") if p.is_file()}
    return sorted(files)


def manifests() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in resource_files() for doc in load_docs(path)]


def find(docs, kind: str, name: str | None = None) -> dict:
    matches = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def generator_literals(kustomization: Path, name: str = "driffusion-config") -> dict[str, str]:
    data = yaml.safe_load(kustomization.read_text())
    for generator in data.get("configMapGenerator", []):
        if generator["name"] == name:
            return dict(literal.split("=", 1) for literal in generator.get("literals", []))
    return {}


BASE_CONFIG = generator_literals(BASE / KUSTOMIZATION)
BASE_DOCS = [doc for path, doc in manifests() if path.parent == BASE]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container(workload: dict, name: str) -> dict:
    spec = pod_spec(workload)
    (match,) = [
        c for c in spec.get("containers", []) + spec.get("initContainers", []) if c["name"] == name
    ]
    return match


def environment(c: dict, config: dict[str, str]) -> dict[str, str | None]:
    """A container's variables as the kubelet sets them: ConfigMap keys resolved from
    ``config``, Secret values unknown (None)."""
    assert "envFrom" not in c, "every variable is named (a missing key fails the pod)"
    env = {}
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var["valueFrom"]:
            env[var["name"]] = config[var["valueFrom"]["configMapKeyRef"]["key"]]
        else:
            env[var["name"]] = None
    return env


def expand(args: list[str], env: dict[str, str | None]) -> list[str]:
    """``$(VAR)`` replaced as the kubelet does; a reference to an undefined variable would stay
    as literal text, so it fails here."""
    out = []
    for arg in args:
        for var in re.findall(r"\$\((\w+)\)", arg):
            assert env.get(var) is not None, f"{arg}: $({var}) is not a variable of the container"
        out.append(re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg))
    return out


def gpu_limit(c: dict) -> int:
    return int(c["resources"]["limits"][GPU])


def container_ports(c: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def serve_flags() -> set[str]:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    return set(serve._option_string_actions)


def pending(*flags: str):
    """xfail while ``driffusion serve`` lacks one of ``flags`` (being added by the lead)."""
    missing = [f for f in flags if f not in serve_flags()]
    return pytest.mark.xfail(bool(missing), reason="serve flag pending", strict=True)


def serve_args(workload: dict) -> list[str]:
    """The server container's argv after the image's ENTRYPOINT: ``driffusion serve ...``."""
    c = container(workload, SERVER)
    assert "command" not in c, "args only: NGC's entrypoint runs first, then execs them"
    assert c["args"][:2] == ["driffusion", "serve"]
    return c["args"][1:]


def export_args(workload: dict, config: dict[str, str]) -> list[str]:
    c = container(workload, ENGINES)
    assert "command" not in c, "args only: the engines image's ENTRYPOINT is `driffusion export`"
    return ["export", *expand(c["args"], environment(c, config))]


def schema_errors(doc: dict) -> list[str]:
    """Strict validation against every Kubernetes release from MIN_KUBERNETES on: what each
    release's schema refuses (custom resources are checked structurally below)."""
    if (doc["apiVersion"], doc["kind"]) in CRDS:
        return []
    errors = []
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"Kubernetes {version}: {str(e).splitlines()[0]}")
    return errors


# --- the folder ----------------------------------------------------------------------------------


def test_every_file_in_deploy_is_a_listed_resource_patch_or_kustomization():
    kustomizations = kustomization_files()
    referenced = set(kustomizations)
    for k in kustomizations:
        for field in ("resources", "components", "patches"):
            for path in listed(k, field):
                assert path.exists(), f"{k.relative_to(ROOT)} lists {path} which does not exist"
                referenced.add(path)
    stray = [
        p.relative_to(ROOT)
        for p in DEPLOY.rglob("*.yaml")
        if p not in referenced and p != ADAPTER_VALUES
    ]
    assert not stray, f"files no kustomization lists (never applied, never validated): {stray}"
    assert {p.name for p in OVERLAYS} >= {"default", "sdxl-2gpu"}


def test_there_are_manifests_of_every_kind_the_deployment_needs():
    kinds = {doc["kind"] for _, doc in manifests()}
    assert kinds >= {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
    }


@pytest.mark.parametrize(
    "path, doc",
    manifests(),
    ids=[f"{p.relative_to(DEPLOY)}:{d['kind']}/{d['metadata']['name']}" for p, d in manifests()],
)
def test_every_manifest_validates_against_the_kubernetes_schemas(path, doc):
    assert schema_errors(doc) == []


def test_the_validator_is_strict():
    """A misspelt field and a wrong type are refused: the validation above means something."""
    deployment = find(BASE_DOCS, "Deployment")
    bad = copy.deepcopy(deployment)
    probe = container(bad, SERVER)["readinessProbe"]
    probe["httpGett"] = probe.pop("httpGet")
    with pytest.raises(kubernetes_validate.ValidationError, match="httpGett"):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)
    assert len(schema_errors(bad)) == len(VERSIONS)  # every release refuses it, as reported
    bad = copy.deepcopy(deployment)
    container(bad, SERVER)["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[0], strict=True)


# --- the server and the engine build -------------------------------------------------------------


def test_the_server_runs_driffusion_serve_with_the_documented_command():
    deployment = find(BASE_DOCS, "Deployment", "driffusion")
    args = build_parser().parse_args(serve_args(deployment))
    assert args.command == "serve"
    assert args.repository == Path("/models")
    assert args.tritonserver == Path("/opt/tritonserver/bin/tritonserver")
    assert args.address == "0.0.0.0"
    assert (args.http_port, args.grpc_port, args.metrics_port) == (
        HTTP_PORT,
        GRPC_PORT,
        METRICS_PORT,
    )
    ports = container_ports(container(deployment, SERVER))
    assert ports == {"http": HTTP_PORT, "grpc": GRPC_PORT, "metrics": METRICS_PORT}


def test_compose_and_kubernetes_run_the_same_server_command():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    deployment = find(BASE_DOCS, "Deployment", "driffusion")
    assert compose["services"]["triton"]["command"] == ["driffusion", *serve_args(deployment)]


@pending("--max-request-mb")
def test_serve_takes_the_request_size_limit():
    args = build_parser().parse_args(["serve", "--repository=/models", "--max-request-mb=8"])
    assert args.max_request_mb == 8


def test_the_probes_use_the_documented_health_endpoints_on_the_http_port():
    deployment = find(BASE_DOCS, "Deployment", "driffusion")
    server = container(deployment, SERVER)
    ports = container_ports(server)
    expected = {"startupProbe": HEALTH_LIVE, "livenessProbe": HEALTH_LIVE}
    expected["readinessProbe"] = HEALTH_READY
    for probe_name, path in expected.items():
        probe = server[probe_name]["httpGet"]
        assert probe["path"] == path, probe_name
        port = ports.get(probe["port"], probe["port"])
        assert port == HTTP_PORT == build_parser().parse_args(serve_args(deployment)).http_port
    # Liveness must outlast the supervisor's own recovery (it restarts workers and Triton), and
    # startup must cover loading the engines; readiness reacts within seconds.
    window = lambda p: p["periodSeconds"] * p["failureThreshold"]  # noqa: E731
    assert window(server["livenessProbe"]) >= 120
    assert window(server["startupProbe"]) >= 600
    assert window(server["readinessProbe"]) <= 15


def test_the_engine_build_parses_with_the_export_parser_and_writes_what_the_server_reads():
    deployment = find(BASE_DOCS, "Deployment", "driffusion")
    args = build_parser().parse_args(export_args(deployment, BASE_CONFIG))
    assert args.command == "export"
    assert args.engine == BASE_CONFIG["DRIFFUSION_ENGINE"] == "tensorrt"
    assert args.gpus == (0, 1, 2, 3) and args.max_k == 4 and args.precision == "fp16"
    assert args.pipeline == BASE_CONFIG["DRIFFUSION_PIPELINE"]
    assert args.family == BASE_CONFIG["DRIFFUSION_FAMILY"]
    env = environment(container(deployment, ENGINES), BASE_CONFIG)
    assert env["DRIFFUSION_CACHE"] == "/cache"
    assert args.timing_cache.is_relative_to("/cache")
    serve = build_parser().parse_args(serve_args(deployment))
    assert args.out == serve.repository
    mounts = lambda c: {m["mountPath"]: m for m in c["volumeMounts"]}  # noqa: E731
    engines, server = mounts(container(deployment, ENGINES)), mounts(container(deployment, SERVER))
    assert not engines[str(args.out)].get("readOnly", False)
    assert server[str(serve.repository)]["readOnly"] is True
    assert engines[str(args.out)]["name"] == server[str(serve.repository)]["name"]
    assert "/cache" in engines


def test_every_config_key_the_pod_reads_is_generated():
    deployment = find(BASE_DOCS, "Deployment", "driffusion")
    keys = {
        var["valueFrom"]["configMapKeyRef"]["key"]
        for c in pod_spec(deployment)["initContainers"] + pod_spec(deployment)["containers"]
        for var in c.get("env", [])
        if "configMapKeyRef" in var.get("valueFrom", {})
    }
    assert keys == set(BASE_CONFIG)


def test_the_gpus_requested_match_the_gpu_list():
    deployment = find(BASE_DOCS, "Deployment", "driffusion")
    gpus = build_parser().parse_args(export_args(deployment, BASE_CONFIG)).gpus
    assert gpu_limit(container(deployment, ENGINES)) == len(gpus)
    assert gpu_limit(container(deployment, SERVER)) == len(gpus)
    # GPU indices inside a pod are 0..n-1 whatever devices the node gave it.
    assert gpus == tuple(range(len(gpus)))


def test_the_example_overlay_changes_the_gpu_list_and_the_gpu_requests_together():
    overlay = DEPLOY / "overlays" / "sdxl-2gpu" / KUSTOMIZATION
    gpus = generator_literals(overlay)["DRIFFUSION_GPUS"].split(",")
    data = yaml.safe_load(overlay.read_text())
    limits = []
    for entry in data["patches"]:
        patch = yaml.safe_load(entry.get("patch", "")) if "patch" in entry else None
        if isinstance(patch, dict) and patch.get("kind") == "Deployment":
            spec = patch["spec"]["template"]["spec"]
            for c in spec.get("initContainers", []) + spec.get("containers", []):
                limits.append((c["name"], gpu_limit(c)))
    assert sorted(limits) == [(ENGINES, len(gpus)), (SERVER, len(gpus))]


def test_the_admin_key_comes_only_from_an_optional_secret():
    deployment = find(BASE_DOCS, "Deployment", "driffusion")
    (var,) = [v for v in container(deployment, SERVER)["env"] if v["name"] == ADMIN_KEY_ENV]
    assert "value" not in var, "never a default secret"
    ref = var["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True  # no Secret: the admin APIs stay closed, the pod still starts
    assert ADMIN_KEY_ENV not in {v["name"] for v in container(deployment, ENGINES)["env"]}
    assert not [d for _, d in manifests() if d["kind"] == "Secret"], "no Secret is shipped"
    for k in kustomization_files():
        data = yaml.safe_load(k.read_text())
        assert "secretGenerator" not in data
        for generator in data.get("configMapGenerator", []):
            assert not any(ADMIN_KEY_ENV in lit for lit in generator.get("literals", []))


def test_the_pods_run_unprivileged():
    deployment = find(BASE_DOCS, "Deployment", "driffusion")
    spec = pod_spec(deployment)
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key)
    assert not [v for v in spec["volumes"] if "hostPath" in v]
    for c in spec["initContainers"] + spec["containers"]:
        context = c["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert not context.get("privileged")
        assert context["readOnlyRootFilesystem"] is True
        writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
        assert "/tmp" in writable  # Triton's log and HOME with a read-only root


def test_shared_memory_is_a_sized_memory_volume():
    deployment = find(BASE_DOCS, "Deployment", "driffusion")
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    (shm,) = [
        m for m in container(deployment, SERVER)["volumeMounts"] if m["mountPath"] == "/dev/shm"
    ]
    empty_dir = volumes[shm["name"]]["emptyDir"]
    assert empty_dir["medium"] == "Memory" and empty_dir["sizeLimit"]


# --- services, disruption budget, monitoring, autoscaling ---------------------------------------


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_wiring(docs: list[dict]) -> None:
    """Services, PDB, HPA and ServiceMonitor point at what exists in ``docs``."""
    deployment = find(docs, "Deployment", "driffusion")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    server_ports = container_ports(container(deployment, SERVER))
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for name in ("driffusion", "driffusion-headless", "driffusion-metrics"):
        service = services[name]
        assert selects(service["spec"]["selector"], labels), name
        for port in service["spec"]["ports"]:
            assert server_ports[port["targetPort"]] == port["port"], (name, port)
    assert {p["name"] for p in services["driffusion"]["spec"]["ports"]} == {"http", "grpc"}
    metrics = services["driffusion-metrics"]
    assert metrics["spec"]["publishNotReadyAddresses"] is True  # scraped while recovering
    assert [p["port"] for p in metrics["spec"]["ports"]] == [METRICS_PORT]

    pdb = find(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert "minAvailable" not in pdb["spec"] and pdb["spec"]["maxUnavailable"] == 1

    hpa = find(docs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "driffusion")
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    monitor = find(docs, "ServiceMonitor")
    selected = [
        s
        for s in services.values()
        if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in selected] == ["driffusion-metrics"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in metrics["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_services_pdb_autoscaler_and_monitor_point_at_the_pods():
    check_wiring([doc for path, doc in manifests() if not path.is_relative_to(DENOISER_POOL)])


def test_the_service_monitor_has_the_operator_schema_shape():
    """ServiceMonitor is a CRD the Kubernetes schemas lack: its fields are checked by name
    against monitoring.coreos.com/v1 (spec.selector, spec.endpoints[] port/path/interval)."""
    monitor = find([d for _, d in manifests()], "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    assert set(monitor["spec"]["selector"]) == {"matchLabels"}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
        for duration in ("interval", "scrapeTimeout"):
            assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint[duration])
        assert endpoint["scheme"] == "http"


def adapter_rules() -> list[dict]:
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    return values["rules"]["custom"]


def test_the_autoscaler_metric_is_served_by_the_adapter_rule():
    hpa = find([d for _, d in manifests()], "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    rules = {rule["name"]["as"]: rule for rule in adapter_rules()}
    rule = rules[name]
    # Per-pod series: the adapter maps the namespace and pod labels the ServiceMonitor adds.
    assert 'namespace!=""' in rule["seriesQuery"] and 'pod!=""' in rule["seriesQuery"]
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    series = re.match(r"\w+", rule["seriesQuery"]).group(0)
    assert re.fullmatch(rule["name"]["matches"], series)
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]
    # The target leaves headroom below the requests one pod runs at once.
    target = float(metric["pods"]["target"]["averageValue"])
    assert 0 < target < int(BASE_CONFIG["DRIFFUSION_ORCHESTRATOR_INSTANCES"])
    replicas = find(BASE_DOCS, "Deployment")["spec"]["replicas"]
    assert hpa["spec"]["minReplicas"] <= replicas <= hpa["spec"]["maxReplicas"]


IDENTITY_MODEL = """\
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())]
            )
            for r in requests
        ]
"""
IDENTITY_CONFIG = """\
name: "driffusion"
backend: "python"
max_batch_size: 0
input [{ name: "x" data_type: TYPE_FP32 dims: [-1] }]
output [{ name: "y" data_type: TYPE_FP32 dims: [-1] }]
instance_group [{ count: 1 kind: KIND_CPU }]
"""


def test_the_adapter_rules_read_series_that_triton_exports(tmp_path, start_triton_server):
    """The nv_* series the rules query exist in Triton (2.51, the server extra) for a python
    model named `driffusion`: present and 0 before any request (the HPA metric is defined on an
    idle pod), and the request-duration counter grows with a request. A stand-in model: the
    series are Triton's per-model statistics, the same for every python model."""
    import numpy as np
    import tritonclient.http as httpclient

    from driffusion.model_repository.server import metric_sum

    (tmp_path / "repo" / "driffusion" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "driffusion" / "1" / "model.py").write_text(IDENTITY_MODEL)
    (tmp_path / "repo" / "driffusion" / "config.pbtxt").write_text(IDENTITY_CONFIG)
    server = start_triton_server(tmp_path / "repo")
    names = {
        name
        for rule in adapter_rules()
        for name in re.findall(r"\bnv_\w+", rule["seriesQuery"] + rule["metricsQuery"])
    }
    assert "nv_inference_request_duration_us" in names
    idle = server.metrics()
    for name in names:
        assert any(n == name and ("model", "driffusion") in labels for n, labels in idle), name
        assert metric_sum(idle, name, model="driffusion") == 0, name
    with httpclient.InferenceServerClient(server.http_url) as client:
        x = httpclient.InferInput("x", [4], "FP32")
        x.set_data_from_numpy(np.zeros(4, dtype=np.float32))
        client.infer("driffusion", [x])
    # Triton refreshes its metrics every 2 s (--metrics-interval-ms): wait for the next refresh.
    deadline = time.monotonic() + 30
    while metric_sum(server.metrics(), "nv_inference_request_duration_us", model="driffusion") == 0:
        assert time.monotonic() < deadline, "the request's duration never reached the counter"
        time.sleep(0.5)


# --- the denoiser pool -------------------------------------------------------------------------


def denoiser_pool():
    statefulset = find(load_docs(DENOISER_POOL / "statefulset.yaml"), "StatefulSet")
    service = find(load_docs(DENOISER_POOL / "service.yaml"), "Service")
    (add,) = [
        op for op in load_docs(DENOISER_POOL / "remote-denoisers.yaml")[0] if op["op"] == "add"
    ]
    return statefulset, service, add["value"]


def test_the_denoiser_pool_lists_every_pod_by_its_stable_name():
    statefulset, service, flag = denoiser_pool()
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    name = statefulset["metadata"]["name"]
    hosts = [
        f"{name}-{i}.{service['metadata']['name']}:{GRPC_PORT}"
        for i in range(statefulset["spec"]["replicas"])
    ]
    assert flag == "--remote-denoisers=" + ",".join(hosts)
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert selects(service["spec"]["selector"], labels)
    assert not selects(
        find(BASE_DOCS, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels
    ), "the node replicas' PDB and Services must not select the pool"
    server = container(statefulset, SERVER)
    assert gpu_limit(server) == len(BASE_CONFIG["DRIFFUSION_GPUS"].split(","))


def test_the_denoiser_pool_commands_parse():
    statefulset, _, flag = denoiser_pool()
    args = build_parser().parse_args(serve_args(statefulset))
    assert args.role == "denoiser"
    deployment = find(BASE_DOCS, "Deployment", "driffusion")
    args = build_parser().parse_args([*serve_args(deployment), flag])
    assert args.remote_denoisers


# --- rendered by kustomize (kubectl) --------------------------------------------------------------


def render(folder: Path) -> list[dict]:
    if KUBECTL is None:
        print(KUBECTL_HINT)
        pytest.skip(KUBECTL_HINT)
    done = subprocess.run(
        [KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.mark.parametrize("folder", [BASE, *OVERLAYS], ids=lambda p: str(p.relative_to(DEPLOY)))
def test_each_overlay_renders_to_valid_consistent_manifests(folder):
    docs = render(folder)
    assert [e for doc in docs for e in schema_errors(doc)] == []
    configs = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    deployment = find(docs, "Deployment", "driffusion")
    refs = {
        var["valueFrom"]["configMapKeyRef"]["name"]
        for c in pod_spec(deployment)["initContainers"] + pod_spec(deployment)["containers"]
        for var in c.get("env", [])
        if "configMapKeyRef" in var.get("valueFrom", {})
    }
    (config_name,) = refs  # the generator's hashed name, rewritten into the Deployment
    assert config_name.startswith("driffusion-config-")
    config = configs[config_name]
    export = build_parser().parse_args(export_args(deployment, config))
    serve = build_parser().parse_args(serve_args(deployment))
    assert export.out == serve.repository
    for name in (ENGINES, SERVER):
        assert gpu_limit(container(deployment, name)) == len(export.gpus), name
        image = container(deployment, name)["image"]
        assert ":" in image and not image.endswith(":latest"), image
    if folder != BASE:
        check_wiring(docs)


def test_the_denoiser_pool_renders_onto_the_default_overlay(tmp_path):
    overlay = tmp_path / "with-pool"
    overlay.mkdir()
    relative = lambda p: os.path.relpath(p, overlay)  # noqa: E731
    (overlay / KUSTOMIZATION).write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [relative(DEPLOY / "overlays" / "default")],
                "components": [relative(DENOISER_POOL)],
            }
        )
    )
    docs = render(overlay)
    assert [e for doc in docs for e in schema_errors(doc)] == []
    deployment = find(docs, "Deployment", "driffusion")
    statefulset = find(docs, "StatefulSet", "driffusion-denoiser")
    _, _, flag = denoiser_pool()
    assert container(deployment, SERVER)["args"][-1] == flag
    assert "--role=denoiser" in container(statefulset, SERVER)["args"]


# --- the images -----------------------------------------------------------------------------------

DOCKERFILE = ROOT / "docker" / "Dockerfile"


def dockerfile_copies() -> set[str]:
    return set(re.findall(r"^COPY (\w+) /opt/driffusion/\1$", DOCKERFILE.read_text(), re.M))


def test_the_image_copies_every_package_folder():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert folders <= dockerfile_copies()


def test_the_entrypoints_take_the_manifests_args():
    """The engines image's ENTRYPOINT is `driffusion export` (so the init container passes only
    flags); the server image keeps NGC's (so the server container passes `driffusion serve`)."""
    text = DOCKERFILE.read_text()
    engines_stage = text.split("AS engines", 1)[1]
    assert re.search(r'^ENTRYPOINT \["driffusion", "export"\]$', engines_stage, re.M)
    server_stage = text.split("AS server", 1)[1].split("AS engines", 1)[0]
    assert not re.search(r"^ENTRYPOINT", server_stage, re.M)


def test_a_wheel_of_the_image_sources_has_the_driffusion_console_script(tmp_path):
    """What `pip install .` in the image installs: the files the Dockerfile copies, built into a
    wheel here (setuptools of this environment, no network); its console script is what both
    containers run."""
    pytest.importorskip("setuptools")
    source = tmp_path / "driffusion"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in dockerfile_copies():
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         str(source), "-w", str(tmp_path / "wheel")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("driffusion-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    assert re.search(r"^driffusion = driffusion\.cli:main$", scripts, re.M)
    assert "driffusion/cli/main.py" in names
    assert "driffusion/model_repository/serve.py" in names
