"""The Kubernetes manifests in k8s/, checked offline: no cluster runs here.

Every overlay is rendered by kustomize itself (`kubectl kustomize`; skipped where kubectl is not
installed) and every object validated against the Kubernetes OpenAPI schemas, strictly (unknown
fields are errors), with kubernetes-validate, which ships the schemas (oldest and newest version it
knows). The base files are also validated one by one, so the schema check runs without kubectl. On
top, the mistakes a schema cannot see: probes on routes the server has, a grace period shorter than
the drain, a thread plan that oversubscribes the CPU the pod gets, a selector that matches no pod, a
pipeline command the CLI rejects, a metric the server does not export. Not checked: scheduling,
storage provisioning, the Prometheus adapter and anything else a live cluster does.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("overlays/cpu", "overlays/gpu")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="pip install -e '.[dev]' (kubernetes-validate ships the schemas)")
SCHEMA_VERSIONS = sorted({kubernetes_validate.utils.all_versions()[0], kubernetes_validate.latest_version()})


def render(kustomization: str | Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: kustomize rendering not checked (the schema check of the "
                    "base files still runs)")
    result = subprocess.run([kubectl, "kustomize", str(kustomization)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in docs if doc["kind"] == kind]
    return found


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return found


def env_values(c: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in c.get("env", [])}


def cores(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(K8S / request.param)


# ---------------------------------------------------------------- schemas
@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_base_files_validate_against_the_kubernetes_schemas(version: str) -> None:
    files = sorted(p for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml")
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text(encoding="utf-8"))
    assert sorted(kustomization["resources"]) == [p.name for p in files]
    for path in files:
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_rendered_overlays_validate_against_the_kubernetes_schemas(
        rendered: tuple[str, list[dict[str, Any]]], version: str) -> None:
    _, docs = rendered
    assert {d["kind"] for d in docs} == {"ConfigMap", "PersistentVolumeClaim", "Job", "Deployment", "Service",
                                         "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_misspelt_field_fails_the_schema_check() -> None:
    deployment = yaml.safe_load((K8S / "base" / "server-deployment.yaml").read_text(encoding="utf-8"))
    container(deployment["spec"]["template"]["spec"], "server")["readinessProbe"]["httpget"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="httpget"):
        kubernetes_validate.validate(deployment, SCHEMA_VERSIONS[-1], strict=True)


# ---------------------------------------------------------------- what a schema cannot see
def test_probes_name_the_servers_routes_and_port(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    from wdserve.server.app import create_app
    from wdserve.server.settings import ServeSettings

    routes = {route.path for route in create_app(ServeSettings()).routes}
    server = container(one(rendered[1], "Deployment")["spec"]["template"]["spec"], "server")
    assert server["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/health"
    assert server["startupProbe"]["httpGet"]["path"] == "/health"
    assert {"/ready", "/health"} <= routes
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert server[probe]["httpGet"]["port"] in ports
    assert str(ports["http"]) == env_values(server)["WDSERVE_PORT"]


def test_server_environment_is_valid_serve_settings(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    from wdserve.server.settings import ServeSettings

    server = container(one(rendered[1], "Deployment")["spec"]["template"]["spec"], "server")
    env = {k: v for k, v in env_values(server).items() if k.startswith("WDSERVE_")}
    literal = {k.removeprefix("WDSERVE_").lower(): v for k, v in env.items() if isinstance(v, str)}
    assert set(map(str.lower, (k.removeprefix("WDSERVE_") for k in env))) <= set(ServeSettings.model_fields)
    settings = ServeSettings(**{k: v for k, v in literal.items() if "$(" not in v})
    assert settings.host == "0.0.0.0"


def test_termination_grace_covers_pre_stop_and_the_servers_drain(
        rendered: tuple[str, list[dict[str, Any]]]) -> None:
    pod = one(rendered[1], "Deployment")["spec"]["template"]["spec"]
    server = container(pod, "server")
    pre_stop = server["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(env_values(server)["WDSERVE_GRACEFUL_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain + 5


def test_thread_plan_uses_exactly_the_cpu_the_pod_gets(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """The server counts the node's cores unless told; a 2-core pod on a 64-core node must not run 64
    threads. inter x intra = the CPU limit, and requests = limits so the pod gets it (Guaranteed)."""
    server = container(one(rendered[1], "Deployment")["spec"]["template"]["spec"], "server")
    requests, limits = server["resources"]["requests"], server["resources"]["limits"]
    assert requests["cpu"] == limits["cpu"] and requests["memory"] == limits["memory"]
    env = env_values(server)
    inter = env["WDSERVE_INTER_THREADS"]["resourceFieldRef"]
    assert inter == {"containerName": "server", "resource": "limits.cpu", "divisor": "1"}
    assert cores(limits["cpu"]) == int(cores(limits["cpu"])) * int(env["WDSERVE_INTRA_THREADS"])


def test_run_directory_is_written_by_the_job_and_served_read_only(
        rendered: tuple[str, list[dict[str, Any]]]) -> None:
    from wdserve.cli import build_parser

    docs = rendered[1]
    run = one(docs, "ConfigMap")
    job_pod = one(docs, "Job")["spec"]["template"]["spec"]
    server_pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    claim = one(docs, "PersistentVolumeClaim")["metadata"]["name"]

    def mount(pod: dict[str, Any], c: dict[str, Any]) -> tuple[str, bool]:
        (volume_mount,) = [m for m in c["volumeMounts"] if m["name"] == "runs"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "runs"]
        assert volume["persistentVolumeClaim"]["claimName"] == claim
        assert run["data"]["RUN_DIR"].startswith(volume_mount["mountPath"].rstrip("/") + "/")
        return volume_mount["mountPath"], volume_mount.get("readOnly", False)

    pipeline = container(job_pod, "pipeline")
    assert mount(job_pod, pipeline)[1] is False
    assert mount(server_pod, container(server_pod, "server"))[1] is True
    (wait,) = server_pod["initContainers"]
    assert mount(server_pod, wait)[1] is True
    for c in (pipeline, wait):
        assert c["envFrom"] == [{"configMapRef": {"name": run["metadata"]["name"]}}]
    assert env_values(container(server_pod, "server"))["RUN_DIR"]["configMapKeyRef"]["name"] == \
        run["metadata"]["name"]
    # the Job's command is a real `wdserve pipeline`, and it writes the file the servers wait for
    script = re.sub(r"\$(\w+)", lambda variable: run["data"][variable.group(1)], pipeline["args"][0])
    command, marker = [shlex.split(part) for part in script.split("&&")]
    assert command[0] == "wdserve"
    args = build_parser().parse_args(command[1:])
    assert (REPO / args.config).is_file() and str(args.workdir) == run["data"]["RUN_DIR"]
    assert marker == ["touch", f"{run['data']['RUN_DIR']}/pipeline.done"]
    assert '[ -f "$RUN_DIR/pipeline.done" ]' in wait["args"][0]


def test_service_pdb_and_autoscaler_reach_the_server_pods(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    docs = rendered[1]
    deployment = one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in deployment["spec"], "the autoscaler owns replicas; apply would reset them"
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"] for p in container(deployment["spec"]["template"]["spec"], "server")["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = one(docs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] > pdb["spec"].get("maxUnavailable", 0)  # a drain keeps one serving


def test_queue_depth_metric_is_one_the_server_exports_and_the_adapter_serves() -> None:
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text(encoding="utf-8"))
    (rule,) = adapter["rules"]["custom"]
    hpa = one(render(K8S / "overlays" / "gpu"), "HorizontalPodAutoscaler")
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert set(metrics) == {"Pods"}, "a GPU server is scaled on its queue, not on CPU"
    name = metrics["Pods"]["pods"]["metric"]["name"]
    assert rule["name"]["as"] == name
    series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
    assert re.search(rf'Gauge\(\s*"{series}"', (REPO / "server" / "metrics.py").read_text(encoding="utf-8"))
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    cpu_hpa = one(render(K8S / "overlays" / "cpu"), "HorizontalPodAutoscaler")
    assert [m["resource"]["name"] for m in cpu_hpa["spec"]["metrics"]] == ["cpu"]


def test_images_and_user_match_the_dockerfile_and_compose() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))["services"]
    gpu_compose = yaml.safe_load((REPO / "compose.gpu.yaml").read_text(encoding="utf-8"))["services"]
    dockerfile = (REPO / "docker" / "Dockerfile").read_text(encoding="utf-8")
    uid = int(re.search(r"useradd .*--uid (\d+)", dockerfile).group(1))
    for overlay, serve_image in (("overlays/cpu", compose["server"]["image"]),
                                 ("overlays/gpu", gpu_compose["server"]["image"])):
        docs = render(K8S / overlay)
        job_pod = one(docs, "Job")["spec"]["template"]["spec"]
        server_pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        assert container(job_pod, "pipeline")["image"] == compose["pipeline"]["image"]
        assert container(server_pod, "server")["image"] == serve_image
        for pod in (job_pod, server_pod):
            assert pod["securityContext"]["runAsUser"] == uid and pod["securityContext"]["runAsNonRoot"]
        gpu = overlay.endswith("gpu")
        for pod, name in ((job_pod, "pipeline"), (server_pod, "server")):
            c = container(pod, name)
            assert ("nvidia.com/gpu" in c["resources"].get("limits", {})) == gpu, (overlay, name)
            assert (env_values(c).get("WDSERVE_DEVICE") == "cuda") == gpu, (overlay, name)
