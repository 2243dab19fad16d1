"""Deployment files, checked offline: Kubernetes manifests, Dockerfiles, compose, Prometheus, Grafana.

Real tools run where they are installed: `kubernetes-validate --strict` (dev extra), the JSON schemas
of the Prometheus Operator resources in k8s/schemas/, `hadolint` (dev extra), `promtool` (`make setup`
unpacks it) and `kubectl kustomize` (compared with k8s/render.py). Every PromQL expression is parsed
with promql-parser, and every metric it names must be one the service exports.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import promql_parser
import pytest
import yaml

from tests.conftest import REPO_ROOT, find_reference_root

K8S = REPO_ROOT / "k8s"
DOCKER = REPO_ROOT / "docker"
OVERLAYS = ["gpu", "cpu"]
DOCKERFILES = ["Dockerfile.gpu", "Dockerfile.cpu"]
KUBERNETES_VERSION = "1.37.0"
CUSTOM_KINDS = {"ServiceMonitor": "servicemonitor", "PrometheusRule": "prometheusrule"}
# Labels that scraping adds to every series (ServiceMonitor targets carry namespace and pod).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
# Series that Prometheus itself makes for every target.
PROMETHEUS_SERIES = {"up"}
# Grafana's built-in variables and prometheus-adapter's templates, replaced before parsing.
TEMPLATE_VALUES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "<<.LabelMatchers>>": 'namespace="openset",pod="openset-0"',
    "<<.GroupBy>>": "pod",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# What the dashboard must show (issue: request rate and errors by endpoint, latency percentiles, ...).
DASHBOARD_TOPICS = [
    "request rate",
    "errors",
    "latency",
    "queue wait",
    "batch size",
    "queue depth",
    "hit ratio",
]

Manifest = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# What is checked, loaded


def load_render_module() -> Any:
    spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def rendered(overlay: str) -> tuple[Manifest, ...]:
    return tuple(load_render_module().build(K8S / "overlays" / overlay))


def find(manifests: tuple[Manifest, ...], kind: str, name: str = "openset") -> Manifest:
    matches = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_spec(manifests: tuple[Manifest, ...], name: str = "openset") -> Manifest:
    return find(manifests, "Deployment", name)["spec"]["template"]["spec"]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def tool(name: str) -> str | None:
    """A tool next to this interpreter (the venv), unpacked by `make setup`, or on PATH."""
    for candidate in (Path(sys.executable).parent / name, REPO_ROOT / ".cache" / "tools" / "bin" / name):
        if candidate.is_file():
            return str(candidate)
    return shutil.which(name)


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@cache
def design_metrics() -> dict[str, dict[str, Any]]:
    """DESIGN.md's metric table: name -> {"type", "labels": {label: allowed values or None}}."""
    design = (find_reference_root().parent / "DESIGN.md").read_text()
    table: dict[str, dict[str, Any]] = {}
    for name, kind, labels in re.findall(r"^\| `(openset_\w+)` \| (\w+) \| (.*?) \|$", design, re.M):
        allowed: dict[str, set[str] | None] = {}
        for label, values in re.findall(r"(\w+)(?: \(([^)]*)\))?", labels):
            allowed[label] = {v.strip() for v in values.split(",")} if values else None
        table[name] = {"type": kind, "labels": allowed}
    assert len(table) >= 10, "DESIGN.md's metric table was not found"
    return table


def service_exposition() -> str:
    """The body of the service's real `GET /metrics` (the app in-process; no workers are started)."""
    app_module = pytest.importorskip("service.app", reason="service/app.py is not in this checkout")
    from service.settings import Settings

    async def get_metrics() -> httpx.Response:
        transport = httpx.ASGITransport(app=app_module.create_app(Settings()))
        async with httpx.AsyncClient(transport=transport, base_url="http://openset") as client:
            return await client.get("/metrics")

    response = asyncio.run(get_metrics())
    assert response.status_code == 200
    return response.text


def base_metric(name: str, histograms: set[str]) -> str:
    """openset_x_seconds_bucket -> openset_x_seconds when openset_x_seconds is a histogram."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in histograms:
            return name.removesuffix(suffix)
    return name


# ----------------------------------------------------------------------------------------------
# Every PromQL expression of the deployment, with where it comes from


def dashboard() -> Manifest:
    return json.loads((DOCKER / "grafana" / "dashboards" / "openset.json").read_text())


def dashboard_panels(panels: list[Manifest]) -> Iterator[Manifest]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def alert_rules() -> list[Manifest]:
    return [
        rule for group in load_yaml(DOCKER / "prometheus" / "rules.yml")["groups"] for rule in group["rules"]
    ]


def adapter_rules() -> list[Manifest]:
    return load_yaml(K8S / "prometheus-adapter" / "values.yaml")["rules"]["custom"]


def all_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for the dashboard, the alerts and the prometheus-adapter rules behind the HPA."""
    expressions = []
    for panel in dashboard_panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            expressions.append((f"dashboard panel {panel['title']!r}", target["expr"]))
    for rule in alert_rules():
        expressions.append((f"alert {rule['alert']}", rule["expr"]))
    for rule in adapter_rules():
        expressions.append(("adapter seriesQuery", rule["seriesQuery"]))
        expressions.append(("adapter metricsQuery", rule["metricsQuery"]))
    return expressions


def parse(expression: str) -> promql_parser.Expr:
    for template, value in TEMPLATE_VALUES.items():
        expression = expression.replace(template, value)
    return promql_parser.parse(expression)


def selectors(expression: str) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)
        return True

    promql_parser.walk(parse(expression), visit)
    return found


def grouping_labels(expression: str) -> set[str]:
    labels: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            labels.update(node.modifier.labels)
        return True

    promql_parser.walk(parse(expression), visit)
    return labels


# ----------------------------------------------------------------------------------------------
# Kubernetes: rendering and schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_resource(overlay: str) -> None:
    manifests = rendered(overlay)
    kinds = sorted({m["kind"] for m in manifests})
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PersistentVolumeClaim",
            "PodDisruptionBudget",
            "PrometheusRule",
            "Service",
            "ServiceMonitor",
        ]
    )
    ids = [(m["kind"], m["metadata"]["name"]) for m in manifests]
    assert len(ids) == len(set(ids))
    find(manifests, "Deployment", "openset-redis")
    find(manifests, "Service", "openset-redis")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_python_renderer_matches_kubectl_kustomize(overlay: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the overlays are rendered by k8s/render.py alone")
    result = run([kubectl, "kustomize", str(K8S / "overlays" / overlay)])
    assert result.returncode == 0, result.stderr
    by_kubectl = {(m["kind"], m["metadata"]["name"]): m for m in yaml.safe_load_all(result.stdout)}
    by_python = {(m["kind"], m["metadata"]["name"]): m for m in rendered(overlay)}
    assert by_python == by_kubectl


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(ValueError, match="namePrefix"):
        load_render_module().build(tmp_path)


def test_strategic_merge_follows_kubernetes_list_semantics() -> None:
    merge = load_render_module().strategic_merge
    base = {
        "containers": [{"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}]}, {"name": "b"}],
        "tolerations": [{"key": "t1"}],
        "keep": 1,
        "drop": 2,
    }
    patch = {
        "containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}]}],
        "tolerations": [{"key": "t2"}],
        "drop": None,
    }
    assert merge(base, patch) == {
        "containers": [
            {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]},
            {"name": "b"},
        ],
        "tolerations": [{"key": "t2"}],
        "keep": 1,
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_validate_strict_passes(overlay: str, tmp_path: Path) -> None:
    manifests = rendered(overlay)
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(manifests, sort_keys=False))
    result = run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSION, str(path)]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    built_in = [m for m in manifests if m["kind"] not in CUSTOM_KINDS]
    for manifest in built_in:
        resource = f"{manifest['kind'].lower()}/{manifest['metadata']['name']}"
        assert f"passed for resource {resource}" in result.stdout, result.stdout
    # Custom resources have no schema there; they are checked against k8s/schemas/ instead.
    unvalidated = re.findall(r"Couldn't find schema for kind (\w+)", result.stdout + result.stderr)
    assert set(unvalidated) <= set(CUSTOM_KINDS)


def test_kubernetes_validate_strict_rejects_an_unknown_field(tmp_path: Path) -> None:
    deployment = json.loads(json.dumps(find(rendered("gpu"), "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deployment))
    result = run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSION, str(path)]
    )
    assert result.returncode != 0
    assert "readinessProbes" in result.stdout + result.stderr


def test_standalone_manifests_pass_kubernetes_validate_strict() -> None:
    for path in sorted((K8S / "jobs").glob("*.yaml")):
        result = run(
            [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSION, str(path)]
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "passed for resource job/" in result.stdout


@cache
def custom_schema(kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((K8S / "schemas" / f"{CUSTOM_KINDS[kind]}-monitoring-v1.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("kind", sorted(CUSTOM_KINDS))
def test_custom_resources_match_their_saved_schemas(overlay: str, kind: str) -> None:
    manifest = find(rendered(overlay), kind)
    errors = [e.message for e in custom_schema(kind).iter_errors(manifest)]
    assert not errors


def test_custom_resource_schemas_reject_mistakes() -> None:
    monitor = json.loads(json.dumps(find(rendered("gpu"), "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert not custom_schema("ServiceMonitor").is_valid(monitor)
    rule = json.loads(json.dumps(find(rendered("gpu"), "PrometheusRule")))
    rule["spec"]["groups"][0]["rules"][0]["record"] = "both_alert_and_record"
    assert not custom_schema("PrometheusRule").is_valid(rule)
    rule["spec"]["groups"][0]["rules"][0] = {"alert": "NoExpression"}
    assert not custom_schema("PrometheusRule").is_valid(rule)


# ----------------------------------------------------------------------------------------------
# Kubernetes: what the Deployment promises


def test_gpu_pods_ask_for_a_gpu_on_gpu_nodes() -> None:
    manifests = rendered("gpu")
    spec = pod_spec(manifests)
    container = spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert container["image"].endswith("-gpu")
    config = find(manifests, "ConfigMap", "openset-config")["data"]
    assert config["OPENSET_DEVICE"] == "cuda"
    assert config["OPENSET_WORKERS"] == "1"


def test_cpu_pods_ask_for_no_gpu() -> None:
    manifests = rendered("cpu")
    spec = pod_spec(manifests)
    assert "nvidia.com/gpu" not in json.dumps(spec)
    assert "nodeSelector" not in spec
    assert find(manifests, "ConfigMap", "openset-config")["data"]["OPENSET_DEVICE"] == "cpu"
    assert spec["containers"][0]["image"].endswith("-cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_the_health_endpoints_and_startup_allows_model_load(overlay: str) -> None:
    container = pod_spec(rendered(overlay))["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    budget_s = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget_s >= (600 if overlay == "gpu" else 300)
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == container["ports"][0]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_unprivileged_with_a_read_only_root(overlay: str) -> None:
    manifests = rendered(overlay)
    for name in ("openset", "openset-redis"):
        spec = pod_spec(manifests, name)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] > 0
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert "limits" in container["resources"] and "requests" in container["resources"]
            # Every writable path is a scratch volume; shared artifacts are mounted read-only.
            for mount in container["volumeMounts"]:
                if not mount.get("readOnly"):
                    assert "emptyDir" in volumes[mount["name"]], mount
    mounts = {m["mountPath"]: m for m in pod_spec(manifests)["containers"][0]["volumeMounts"]}
    assert {"/tmp", "/home/openset/.cache", "/dev/shm", "/models", "/engines"} <= set(mounts)
    assert mounts["/models"]["readOnly"] and mounts["/engines"]["readOnly"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_outlasts_the_service_drain(overlay: str) -> None:
    manifests = rendered(overlay)
    spec = pod_spec(manifests)
    config = find(manifests, "ConfigMap", "openset-config")["data"]
    pre_stop = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain_s = float(config["OPENSET_SHUTDOWN_GRACE_S"])
    assert spec["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain_s


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_reach_the_pod_and_name_real_settings(overlay: str) -> None:
    manifests = rendered(overlay)
    container = pod_spec(manifests)["containers"][0]
    config = find(manifests, "ConfigMap", container["envFrom"][0]["configMapRef"]["name"])["data"]
    settings = pytest.importorskip("service.settings", reason="service/settings.py is not in this checkout")
    known = {f"OPENSET_{name.upper()}" for name in settings.Settings.model_fields}
    assert set(config) <= known, set(config) - known
    for key, value in config.items():
        settings.Settings.model_validate({key.removeprefix("OPENSET_").lower(): value})
    assert "OPENSET_API_KEY" not in config  # a Secret, never a ConfigMap
    api_key = next(e for e in container["env"] if e["name"] == "OPENSET_API_KEY")
    assert api_key["valueFrom"]["secretKeyRef"]["name"] == "openset-api-key"
    assert container["ports"][0]["containerPort"] == int(config["OPENSET_PORT"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_point_at_each_other(overlay: str) -> None:
    manifests = rendered(overlay)
    deployment = find(manifests, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    redis_labels = find(manifests, "Deployment", "openset-redis")["spec"]["template"]["metadata"]["labels"]
    service = find(manifests, "Service")

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert selects(service["spec"]["selector"], pod_labels)
    assert not selects(service["spec"]["selector"], redis_labels)
    assert selects(find(manifests, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    monitor = find(manifests, "ServiceMonitor")["spec"]
    assert selects(monitor["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["endpoints"][0]["path"] == "/metrics"
    hpa = find(manifests, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "openset"}
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec(manifests)["volumes"]
        if "persistentVolumeClaim" in v
    ]
    for claim in claims:
        find(manifests, "PersistentVolumeClaim", claim)
    redis_url = find(manifests, "ConfigMap", "openset-config")["data"]["OPENSET_REDIS_URL"]
    host, port = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", redis_url).groups()
    redis_service = find(manifests, "Service", host)
    assert int(port) in {p["port"] for p in redis_service["spec"]["ports"]}


def test_hpa_metric_is_served_by_the_adapter_rule() -> None:
    metric = find(rendered("gpu"), "HorizontalPodAutoscaler")["spec"]["metrics"][0]
    assert metric["type"] == "Pods"
    served = {rule["name"]["as"]: rule for rule in adapter_rules()}
    rule = served[metric["pods"]["metric"]["name"]]
    series = selectors(rule["seriesQuery"])
    assert len(series) == 1 and re.search(rule["name"]["matches"], series[0].name)
    assert {"namespace", "pod"} == set(rule["resources"]["overrides"])
    assert grouping_labels(rule["metricsQuery"]) == {"pod"}  # <<.GroupBy>> is what makes it per pod
    for selector in selectors(rule["metricsQuery"]):
        assert {m.name for m in selector.matchers.matchers} == {"namespace", "pod"}


# ----------------------------------------------------------------------------------------------
# Prometheus: rules, config and metric names


def test_prometheus_operator_rules_equal_the_compose_rules() -> None:
    operator = find(rendered("gpu"), "PrometheusRule")["spec"]
    assert operator == load_yaml(DOCKER / "prometheus" / "rules.yml")


def test_alerts_cover_the_operational_failures() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    uses = {name: {s.name for s in selectors(rule["expr"])} for name, rule in rules.items()}
    assert "openset_requests_total" in uses["OpenSetHighErrorRate"]
    assert "openset_request_duration_seconds_bucket" in uses["OpenSetHighLatencyP99"]
    assert "openset_rejected_total" in uses["OpenSetQueueSaturated"]
    assert "openset_worker_restarts_total" in uses["OpenSetWorkerRestarts"]
    assert "openset_workers_alive" in uses["OpenSetNotReady"]
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_promtool_checks_rules_and_config(tmp_path: Path) -> None:
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (`make setup` unpacks it from Debian's prometheus package)")
    operator_rules = tmp_path / "operator-rules.yml"
    operator_rules.write_text(yaml.safe_dump(find(rendered("gpu"), "PrometheusRule")["spec"]))
    result = run([promtool, "check", "rules", str(DOCKER / "prometheus" / "rules.yml"), str(operator_rules)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(f"SUCCESS: {len(alert_rules())} rules found") == 2
    result = run([promtool, "check", "config", str(DOCKER / "prometheus" / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"alert": "A", "expr": "sum(("}]}]}))
    assert run([promtool, "check", "rules", str(broken)]).returncode != 0


def test_every_expression_parses_as_promql() -> None:
    expressions = all_expressions()
    assert len(expressions) >= 25
    for where, expression in expressions:
        try:
            parse(expression)
        except ValueError as error:
            pytest.fail(f"{where}: {error}\n{expression}")
    with pytest.raises(ValueError):
        parse("sum(rate(openset_requests_total[5m])")


def test_expressions_use_only_design_metrics_and_their_labels() -> None:
    table = design_metrics()
    histograms = {name for name, spec in table.items() if spec["type"] == "histogram"}
    for where, expression in all_expressions():
        for selector in selectors(expression):
            if selector.name in PROMETHEUS_SERIES:
                continue
            metric = base_metric(selector.name, histograms)
            assert metric in table, f"{where} uses {selector.name}, which DESIGN.md does not list"
            labels = table[metric]["labels"]
            for matcher in selector.matchers.matchers:
                if matcher.name == "le" and selector.name.endswith("_bucket"):
                    continue
                assert matcher.name in set(labels) | TARGET_LABELS, f"{where}: {metric} has no {matcher.name}"
                allowed = labels.get(matcher.name)
                if allowed and str(matcher.op) == "MatchOp.Equal":
                    assert matcher.value in allowed, f"{where}: {metric}{{{matcher.name}={matcher.value!r}}}"
        names = {base_metric(s.name, histograms) for s in selectors(expression)}
        known_labels = set(TARGET_LABELS) | {"le"}
        for name in names & set(table):
            known_labels |= set(table[name]["labels"])
        assert grouping_labels(expression) <= known_labels, f"{where}: groups by an unknown label"


def test_every_metric_used_is_in_the_service_metrics_output() -> None:
    exposition = service_exposition()
    exported = dict(re.findall(r"^# TYPE (\w+) (\w+)$", exposition, re.M))
    histograms = {name for name, kind in exported.items() if kind == "histogram"}
    used = {s.name for _, expression in all_expressions() for s in selectors(expression)}
    assert any(name.startswith("openset_") for name in used)
    for name in used - PROMETHEUS_SERIES:
        assert base_metric(name, histograms) in exported, f"{name} is not in the service's /metrics output"
    # The dashboard shows every metric the service exports.
    on_dashboard = {
        base_metric(s.name, histograms)
        for panel in dashboard_panels(dashboard()["panels"])
        for target in panel.get("targets", [])
        for s in selectors(target["expr"])
    }
    assert set(exported) <= on_dashboard, set(exported) - on_dashboard


def test_the_up_alert_names_the_scrape_job() -> None:
    job = next(
        m.value
        for rule in alert_rules()
        for s in selectors(rule["expr"])
        if s.name == "up"
        for m in s.matchers.matchers
        if m.name == "job"
    )
    # ServiceMonitor targets take the Service name as job; compose names its scrape job the same.
    assert job == find(rendered("gpu"), "Service")["metadata"]["name"]
    jobs = [c["job_name"] for c in load_yaml(DOCKER / "prometheus" / "prometheus.yml")["scrape_configs"]]
    assert job in jobs


# ----------------------------------------------------------------------------------------------
# Grafana


def test_dashboard_is_complete_and_provisioned() -> None:
    board = dashboard()
    panels = [p for p in dashboard_panels(board["panels"]) if p["type"] != "row"]
    ids = [p["id"] for p in dashboard_panels(board["panels"])]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"].lower() for p in panels)
    for topic in DASHBOARD_TOPICS:
        assert topic in titles, topic
    assert any(p["type"] == "heatmap" for p in panels)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
    provider = load_yaml(DOCKER / "grafana" / "provisioning" / "dashboards" / "openset.yaml")["providers"][0]
    compose = load_yaml(DOCKER / "compose.yaml")["services"]["grafana"]
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in compose["volumes"] if volume.startswith("./"))
    dashboards_dir = DOCKER / next(src for src, dst in mounts.items() if dst == provider["options"]["path"])
    assert (dashboards_dir / "openset.json").is_file()


# ----------------------------------------------------------------------------------------------
# Docker


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_passes(dockerfile: str) -> None:
    hadolint = tool("hadolint")
    assert hadolint, "hadolint is missing: install the dev extra (`make setup`)"
    result = run([hadolint, "--failure-threshold", "info", str(DOCKER / dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")
    result = run([str(tool("hadolint")), str(bad)])
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # "latest" tag


def dockerfile_instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (DOCKER / dockerfile).read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(line.split()[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_properties(dockerfile: str) -> None:
    instructions = dockerfile_instructions(dockerfile)
    final_stage = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM") :]
    for op, args in instructions:
        if op == "FROM":
            image = args.split()[0]
            assert re.fullmatch(r"[\w./-]+:\d[\w.-]*", image), f"unpinned base image {image}"
        if op == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (REPO_ROOT / source).exists(), source
    users = [args for op, args in final_stage if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert re.fullmatch(r"\d+:\d+", users[-1]), "a numeric USER lets Kubernetes verify runAsNonRoot"
    healthcheck = next(args for op, args in final_stage if op == "HEALTHCHECK")
    assert "/healthz" in healthcheck and "healthcheck.py" in healthcheck
    volumes = json.loads(next(args for op, args in final_stage if op == "VOLUME"))
    assert {"/models", "/engines"} <= set(volumes)
    assert ("EXPOSE", "8000") in final_stage


def test_image_pins_match_the_project_pins() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(
        requirement.split("==")
        for requirement in project["dependencies"] + project["optional-dependencies"]["gpu"]
    )
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    gpu = (DOCKER / "Dockerfile.gpu").read_text()
    assert f"torch=={pins['torch']}" in cpu
    assert f"onnxruntime-gpu=={pins['onnxruntime-gpu']}" in gpu
    assert '"/src[gpu,tensorrt]"' in gpu


def test_dockerignore_keeps_what_the_images_copy() -> None:
    ignored = [
        line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line.strip()
    ]
    ignored = [p for p in ignored if not p.startswith("#")]
    assert {".git", ".venv", ".cache"} <= set(ignored)
    for dockerfile in DOCKERFILES:
        for op, args in dockerfile_instructions(dockerfile):
            if op == "COPY" and not args.startswith("--from"):
                for source in args.split()[:-1]:
                    top = source.split("/")[0]
                    assert top not in ignored and source not in ignored, source


class HealthHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_container_healthcheck_script(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), HealthHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    script = str(DOCKER / "healthcheck.py")
    try:
        env = {"OPENSET_PORT": str(server.server_address[1])}
        ok = subprocess.run([sys.executable, script], env=env, timeout=30)
        not_ready = subprocess.run([sys.executable, script, "/readyz"], env=env, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert ok.returncode == 0
    assert not_ready.returncode == 1
    closed = subprocess.run([sys.executable, script], env=env, timeout=30)
    assert closed.returncode == 1


def test_compose_wires_api_redis_prometheus_and_grafana() -> None:
    compose = load_yaml(DOCKER / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"api", "redis", "prometheus", "grafana"}
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image}"
    api = services["api"]
    assert (DOCKER / api["build"]["context"] / "docker" / "Dockerfile.cpu").is_file()
    environment = dict(item.split("=", 1) for item in api["environment"] if "=" in item)
    assert environment["OPENSET_REDIS_URL"].startswith("redis://redis:6379")
    assert "8000:8000" in api["ports"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DOCKER / source).exists(), source
    scrape = load_yaml(DOCKER / "prometheus" / "prometheus.yml")["scrape_configs"]
    targets = [t for config in scrape for static in config["static_configs"] for t in static["targets"]]
    assert "api:8000" in targets
    datasource = load_yaml(DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
