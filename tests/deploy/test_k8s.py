"""deploy/k8s: the kustomize overlays (cpu, gpu), built offline and validated against the
Kubernetes schemas of a pinned version, then checked for what a cluster would only show
at run time: probes on the ports the code listens on, resources, disruption budgets, the
workers' autoscaler metric, the gateway's config rendered by ``gateway/`` from the
deployment ConfigMap, and the NetworkPolicies evaluated pod by pod.

The overlays are built by the small kustomize below (resources, namespace, labels,
configMapGenerator, JSON patches: what deploy/k8s uses; anything else fails loudly). Where
`kubectl` is installed, its own kustomize builds them too and the two must agree (up to the
generated ConfigMaps' hash suffixes, which each computes its own way).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import ipaddress
import json
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway import ratelimits
from gateway.envoy import build_bootstrap, clusters, render
from gateway.metrics import ADMIN_CLUSTER
from genmesh.commands import gateway as gateway_command
from genmesh.commands import secrets as secrets_command
from genmesh.core import deployment as deploy
from genmesh.core.deployment import Deployment
from genmesh.launcher.plan import MeshConfig
from genmesh.security import pki
from tests.deploy.test_compose import (
    LAUNCHER_WORKER_PORTS,
    check_health_port,
    check_service_env,
    deployment_ports,
    deployment_variables,
    load_deployment,
    route_clusters,
    validated_routes,
)
from tests.deploy.test_dockerfiles import (
    DOCKERFILE,
    GPU_DOCKERFILE,
    HTTP_HEALTH_PATHS,
    SERVICE_PORTS,
    config_class,
    entry_module,
    health_probe,
    parse_dockerfile,
)
from tests.procs import REPO_ROOT

K8S = REPO_ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.32.0"  # validated against this version's schemas, strictly
NAMESPACE = "genmesh"
DEPLOYMENT_FILE = BASE / "mesh-deployment.yaml"
SECRET = "genmesh-api-keys"  # created by the user (README), never in a file here
DEP = load_deployment(DEPLOYMENT_FILE)
DEFAULTS = MeshConfig()
VERSION = "0.1.0"
# Each mesh workload's identity (its certificate, its Secret genmesh-secrets-<identity>).
IN_CLUSTER = {"envoy": "envoy", "frontend": "frontend", "httpapi": "httpapi",
              "tokenizer": "tokenizer", "safety": "safety", "cache": "cache",
              "ratelimit": "ratelimit", "worker-v1": "worker", "worker-v2": "worker"}


# ---- a small kustomize ---------------------------------------------------------------------

CLUSTER_SCOPED = frozenset({"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                            "StorageClass", "CustomResourceDefinition", "PriorityClass"})
KUSTOMIZATION_FIELDS = frozenset({"apiVersion", "kind", "namespace", "labels", "resources",
                                  "configMapGenerator", "patches"})
GENERATED_SUFFIX = re.compile(r"-[a-z0-9]{10}$")


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize DIRECTORY`` would print, for the features used here."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(k) - KUSTOMIZATION_FIELDS
    assert not unsupported, f"{directory}: teach this test's kustomize {sorted(unsupported)}"
    objects: list[dict[str, Any]] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        objects += kustomize(path) if path.is_dir() else [
            d for d in yaml.safe_load_all(path.read_text()) if d]
    renames = {}
    for generator in k.get("configMapGenerator", []):
        data = {}
        for item in generator.get("files", []):
            key, _, relative = item.rpartition("=")
            data[key or Path(relative).name] = (directory / relative).read_text()
        for literal in generator.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]
        renames[generator["name"]] = f"{generator['name']}-{digest}"
        objects.append({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": renames[generator["name"]]}, "data": data})
    for obj in objects:
        for pod in pod_specs(obj):
            _rename_config_maps(pod, renames)
    for patch in k.get("patches", []):
        ops = yaml.safe_load((directory / patch["path"]).read_text() if "path" in patch
                             else patch["patch"])
        assert isinstance(ops, list), "only JSON 6902 patches are supported here"
        targets = [o for o in objects if _targeted(o, patch["target"])]
        assert targets, f"patch {patch} matches nothing"
        for obj in targets:
            for op in ops:
                json_patch(obj, op)
    for label in k.get("labels", []):
        assert not label.get("includeSelectors") and not label.get("includeTemplates")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = k["namespace"]
    return objects


def pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod spec(s) of a workload (Deployment, StatefulSet, Job); [] for other kinds."""
    template = obj.get("spec", {}).get("template") if obj["kind"] in (
        "Deployment", "StatefulSet", "Job", "DaemonSet") else None
    return [template["spec"]] if template else []


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _rename_config_maps(pod: dict[str, Any], renames: Mapping[str, str]) -> None:
    def rename(ref: dict[str, Any] | None) -> None:
        if ref is not None and ref.get("name") in renames:
            ref["name"] = renames[ref["name"]]

    for volume in pod.get("volumes", []):
        rename(volume.get("configMap"))
    for container in containers(pod):
        for source in container.get("envFrom", []):
            rename(source.get("configMapRef"))
        for env in container.get("env", []):
            rename(env.get("valueFrom", {}).get("configMapKeyRef"))


def _targeted(obj: dict[str, Any], target: Mapping[str, str]) -> bool:
    if "kind" in target and obj["kind"] != target["kind"]:
        return False
    if "name" in target and obj["metadata"]["name"] != target["name"]:
        return False
    if "labelSelector" in target:
        labels = obj["metadata"].get("labels", {})
        for term in target["labelSelector"].split(","):
            key, _, value = term.partition("=")
            if labels.get(key.strip()) != value.strip():
                return False
    return True


def json_patch(doc: Any, op: Mapping[str, Any]) -> None:
    """One RFC 6902 operation (add, replace, remove, test) on ``doc``, in place."""
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    kind = op["op"]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if kind == "add":
            node.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            node[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[index]
        else:
            assert kind == "test" and node[index] == op["value"], f"JSON patch test failed: {op}"
        return
    if kind in ("replace", "remove", "test"):
        assert last in node, f"JSON patch {kind} of a missing path: {op['path']}"
    if kind in ("add", "replace"):
        node[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del node[last]
    else:
        assert kind == "test" and node[last] == op["value"], f"JSON patch test failed: {op}"


KUBECTL = shutil.which("kubectl")


def _canonical(objects: list[dict[str, Any]]) -> list[str]:
    """Objects as sorted JSON, generated ConfigMaps' hash suffixes blanked."""
    generated = {GENERATED_SUFFIX.sub("", o["metadata"]["name"]) for o in objects
                 if o["kind"] == "ConfigMap"}
    pattern = re.compile(rf"\b({'|'.join(map(re.escape, sorted(generated)))})-[a-z0-9]{{10}}\b")
    return sorted(pattern.sub(r"\1-HASH", json.dumps(o, sort_keys=True)) for o in objects)


BUILT = {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: the overlays are built "
                    "by this test's own kustomize only")
@pytest.mark.parametrize("directory", ["base", "overlays/cpu", "overlays/gpu"])
def test_this_kustomize_builds_what_kubectl_builds(directory):
    result = subprocess.run([str(KUBECTL), "kustomize", str(K8S / directory)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    theirs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert _canonical(kustomize(K8S / directory)) == _canonical(theirs)


# ---- the objects, indexed ------------------------------------------------------------------

def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def config_map(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    [cm] = [o for o in objects if o["kind"] == "ConfigMap"
            and GENERATED_SUFFIX.sub("", o["metadata"]["name"]) == name]
    return cm


def workloads(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if pod_specs(o)}


def image_stage(image: str) -> Any:
    """The Dockerfile stage an image ``genmesh/<target>:<tag>`` is built from."""
    target = image.split("/", 1)[1].split(":")[0]
    stages = parse_dockerfile(GPU_DOCKERFILE if target == "worker-gpu" else DOCKERFILE)
    return stages[target]


PREFIXES = {config_class(m).env_prefix(): config_class(m) for m in SERVICE_PORTS}


def container_env(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The image's GENMESH_* ENV, then envFrom ConfigMaps, then env (as Kubernetes orders them;
    Secret references are checked apart). A ConfigMap shared by every service (telemetry)
    carries the others' settings too: each must be a setting of its own service, and is
    left out here."""
    module = entry_module(image_stage(container["image"]))
    own = config_class(module).env_prefix() if module in SERVICE_PORTS else None
    env = {k: v for k, v in image_stage(container["image"]).env.items()
           if k.startswith("GENMESH_")}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            [cm] = [o for o in objects if o["kind"] == "ConfigMap"
                    and o["metadata"]["name"] == source["configMapRef"]["name"]]
            for key, value in cm["data"].items():
                prefix = next((p for p in PREFIXES if key.startswith(p)), None)
                if prefix is not None and prefix != own:
                    field_name = key.removeprefix(prefix).lower()
                    assert field_name in _field_names(PREFIXES[prefix]), f"{key}: no such setting"
                    continue
                env[key] = value
    for item in container.get("env", []):
        assert "value" in item, f"{item['name']}: only literal values are used here"
        env[item["name"]] = item["value"]
    return env


def _field_names(config: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(config)}


def secret_refs(container: dict[str, Any]) -> set[str]:
    refs = {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
    refs |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
             if "secretKeyRef" in e.get("valueFrom", {})}
    return refs


def main_container(workload: dict[str, Any]) -> dict[str, Any]:
    [container] = pod_specs(workload)[0]["containers"]
    return container


def service_config(objects: list[dict[str, Any]], name: str) -> Any:
    """The config the workload's service builds from its environment (its own config class),
    after every GENMESH_* variable was checked to be one of its settings."""
    container = main_container(workloads(objects)[name])
    env = container_env(objects, container)
    for variable in deployment_variables(DEPLOYMENT_FILE):  # provided by the Secret
        if SECRET in secret_refs(container):
            env[variable] = "from-the-secret"
    module = entry_module(image_stage(container["image"]))
    return check_service_env(module or "", env,
                             deployment_vars=deployment_variables(DEPLOYMENT_FILE))


def named_ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) on ``labels``."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for term in selector.get("matchExpressions", []):
        key, operator, values = term["key"], term["operator"], term.get("values", [])
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[operator]
        if not ok:
            return False
    return True


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


# ---- the tests ---------------------------------------------------------------------------

@pytest.fixture(params=OVERLAYS)
def overlay(request) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    yield request.param, BUILT[request.param]


def test_every_object_is_valid_for_the_pinned_kubernetes_version(overlay):
    name, objects = overlay
    assert len(objects) > 30
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {exc.message} "
                        f"at {'.'.join(map(str, exc.path))}")
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"]["namespace"] == NAMESPACE


def test_every_service_runs_as_configured_on_the_launchers_ports(overlay):
    _, objects = overlay
    services = by_kind(objects, "Service")
    endpoints = deployment_ports(DEP)
    for name, workload in workloads(objects).items():
        if name in ("envoy", "redis", "model-store"):
            continue
        container = main_container(workload)
        assert container["image"].endswith(f":{VERSION}"), name
        cfg = service_config(objects, name)
        module = entry_module(image_stage(container["image"]))
        port_field, metrics_field = SERVICE_PORTS[module or ""]
        if module == "services.worker.main":
            port_field, metrics_field = LAUNCHER_WORKER_PORTS[cfg.model_version]
            assert name == f"worker-{cfg.model_version}" and cfg.model == DEP.model
            assert cfg.record_redis_url == DEP.redis_url
        assert cfg.host == "0.0.0.0", name
        assert cfg.port == getattr(DEFAULTS, port_field), name
        assert cfg.metrics_port == getattr(DEFAULTS, metrics_field), name
        serving = "http" if module in HTTP_HEALTH_PATHS else "grpc"  # the HTTP API: HTTP/1.1
        assert named_ports(container) == {serving: cfg.port, "metrics": cfg.metrics_port}, name
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(cfg.metrics_port), name
        # The deployment description reaches it by its headless Service, on its port.
        [(host, port)] = endpoints[name]  # worker-v1 is the cluster of version v1
        assert (host, port) == (name, cfg.port)
        service = services[host]
        assert service["spec"]["clusterIP"] == "None", f"{host}: Envoy needs every pod (headless)"
        assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(workload))
        assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
            (port, serving)], host
        assert cfg.otlp_endpoint == DEP.observability.otlp_endpoint, name
        assert cfg.trace_sample_ratio == DEP.observability.trace_sample_percent / 100, name


def test_probes_and_resources(overlay):
    _, objects = overlay
    for name, workload in workloads(objects).items():
        pod = pod_specs(workload)[0]
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] != 0, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in containers(pod):
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), (name, container["name"])
            assert "memory" in resources["limits"], (name, container["name"])
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        if workload["kind"] == "Job":
            continue
        container = main_container(workload)
        ports = named_ports(container)
        for probe in ("readinessProbe", "livenessProbe"):
            assert probe in container, f"{name} has no {probe}"
        if "grpc" in ports or "http" in ports:
            # A genmesh service: probe.py in its container asks its health port (its own
            # port admits Envoy's certificate alone; the kubelet's grpc and httpGet probes
            # dial the pod's address, not its loopback); the GPU image's interpreter is
            # python3. Each probe's timeout leaves the interpreter time to start.
            cfg = service_config(objects, name)
            health_port = check_health_port(cfg, set(ports.values()))
            python = "python3" if "worker-gpu" in container["image"] else "python"
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe in container:
                    assert container[probe]["exec"]["command"] == [
                        python, "/app/deploy/docker/probe.py",
                        *health_probe(entry_module(image_stage(container["image"])) or "",
                                      health_port)], (name, probe)
                    assert container[probe]["timeoutSeconds"] >= 3, (name, probe)
            env = {e["name"]: e.get("value") for e in container["env"]}
            [variable] = [k for k in env if k.endswith("_SECRETS_DIR")]
            assert env[variable] == DEP.security.secrets_dir, name
    envoy = main_container(workloads(objects)["envoy"])
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert named_ports(envoy) == {"edge": DEP.gateway.edge_port, "mesh": DEP.gateway.mesh_port,
                                  "metrics": DEP.gateway.metrics_port}


def test_every_deployment_has_a_disruption_budget(overlay):
    _, objects = overlay
    budgets = list(by_kind(objects, "PodDisruptionBudget").values())
    for name, deployment in by_kind(objects, "Deployment").items():
        matching = [b for b in budgets if selects(b["spec"]["selector"], pod_labels(deployment))]
        assert len(matching) == 1, f"{name}: {len(matching)} disruption budgets"
        [budget] = matching
        assert budget["spec"].get("maxUnavailable") == 1, name


def test_workers_autoscale_on_their_queue_and_kv_cache(overlay):
    _, objects = overlay
    metrics_source = (REPO_ROOT / "services" / "worker" / "metrics.py").read_text()
    adapter = yaml.safe_load((K8S / "extras" / "prometheus-adapter-values.yaml").read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    deployments = by_kind(objects, "Deployment")
    autoscalers = by_kind(objects, "HorizontalPodAutoscaler")
    workers = {n for n in deployments if n.startswith("worker-")}
    assert workers == {v.cluster for v in DEP.versions}
    assert {a["spec"]["scaleTargetRef"]["name"] for a in autoscalers.values()} == workers
    for autoscaler in autoscalers.values():
        target = autoscaler["spec"]["scaleTargetRef"]
        assert (target["kind"], target["apiVersion"]) == ("Deployment", "apps/v1")
        assert "replicas" not in deployments[target["name"]]["spec"], "the HPA owns replicas"
        names = {m["pods"]["metric"]["name"] for m in autoscaler["spec"]["metrics"]
                 if m["type"] == "Pods"}
        assert names == {"genmesh_num_requests_waiting", "genmesh_kv_cache_usage_perc"}
        for metric in names:
            assert f'"{metric}"' in metrics_source, f"the workers serve no {metric}"
            assert metric in served, f"prometheus-adapter does not serve {metric}"
        assert autoscaler["spec"]["minReplicas"] >= 1
        assert autoscaler["spec"]["maxReplicas"] > autoscaler["spec"]["minReplicas"]


def test_gateway_renders_envoys_config_from_the_deployment_config_map(overlay, tmp_path):
    _, objects = overlay
    deployment_cm = config_map(objects, "genmesh-deployment")
    assert deployment_cm["data"] == {"deployment.yaml": DEPLOYMENT_FILE.read_text()}
    envoy = workloads(objects)["envoy"]
    container = main_container(envoy)
    assert entry_module(image_stage(container["image"])) == "genmesh.commands.gateway"
    args = gateway_command.build_parser().parse_args(container["args"])
    assert args.func.__name__ == "_run"
    mounted = _mounted_config_maps(envoy)
    assert mounted[str(args.deployment.parent)] == deployment_cm["metadata"]["name"]
    assert args.deployment.name == "deployment.yaml"
    assert secret_refs(container) == {SECRET}
    # Where `genmesh gateway run` writes (its default, under the image user's home) is a
    # writable emptyDir: the root file system is read-only.
    home = re.search(r"--home-dir (\S+)", DOCKERFILE.read_text())
    assert home is not None
    run_dir = Path(home.group(1)) / args.run_dir.relative_to(Path.home())
    writable = {m["mountPath"] for m in container["volumeMounts"]}
    assert any(str(run_dir).startswith(p + "/") for p in writable), run_dir
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The frontend reads the same description.
    frontend = service_config(objects, "frontend")
    assert frontend.deployment_file == str(args.deployment)
    assert _mounted_config_maps(workloads(objects)["frontend"])[
        str(args.deployment.parent)] == deployment_cm["metadata"]["name"]
    mesh = f"envoy-mesh:{DEP.gateway.mesh_port}"
    for field_name in ("tokenizer_address", "worker_address", "safety_address", "cache_address"):
        assert getattr(frontend, field_name) == mesh, field_name
    mesh_service = by_kind(objects, "Service")["envoy-mesh"]
    assert [(p["port"], p["targetPort"]) for p in mesh_service["spec"]["ports"]] == [
        (DEP.gateway.mesh_port, "mesh")]
    # gateway/ renders it, Envoy accepts it, and the edge reaches nothing but the frontend
    # and the HTTP API.
    secrets = pki.ensure(tmp_path / "secrets")  # Envoy reads the files it is given
    dep = dataclasses.replace(DEP, security=dataclasses.replace(
        DEP.security, secrets_dir=str(secrets.directory)))
    routed = validated_routes(dep, tmp_path)
    assert routed == {"edge": {"frontend", "httpapi"},
                      "mesh": {"tokenizer", "safety", "cache", "worker-v1", "worker-v2",
                               "frontend"},  # the HTTP API's calls
                      "metrics": {ADMIN_CLUSTER}}


def _mounted_config_maps(workload: dict[str, Any]) -> dict[str, str]:
    """Mount path -> ConfigMap name, of the workload's main container."""
    pod = pod_specs(workload)[0]
    volumes = {v["name"]: v["configMap"]["name"] for v in pod.get("volumes", [])
               if "configMap" in v}
    return {m["mountPath"]: volumes[m["name"]] for m in main_container(workload)["volumeMounts"]
            if m["name"] in volumes}


def test_rate_limits_redis_and_telemetry_agree_with_the_deployment(overlay):
    _, objects = overlay
    limits_cm = config_map(objects, "genmesh-ratelimit-limits")
    assert yaml.safe_load(limits_cm["data"]["ratelimit.yaml"]) == ratelimits.service_limits(DEP), (
        "ratelimit-limits.yaml is stale: rerun `genmesh gateway limits --deployment "
        f"{DEPLOYMENT_FILE.relative_to(REPO_ROOT)}`")
    ratelimit = service_config(objects, "ratelimit")
    mounted = _mounted_config_maps(workloads(objects)["ratelimit"])
    assert mounted[str(Path(ratelimit.limits_file).parent)] == limits_cm["metadata"]["name"]
    assert Path(ratelimit.limits_file).name in limits_cm["data"]
    assert DEP.redis_url == f"redis://redis:{DEFAULTS.redis_port}/0"
    assert ratelimit.redis_url == DEP.redis_url
    assert service_config(objects, "cache").redis_url == DEP.redis_url
    assert service_config(objects, "safety").audit_redis_url == DEP.redis_url
    cache = service_config(objects, "cache")
    assert (cache.default_ttl_s, cache.max_memory_mb) == (DEP.limits.cache_ttl_s,
                                                          DEP.limits.cache_max_memory_mb)
    redis = by_kind(objects, "StatefulSet")["redis"]
    assert redis["spec"]["serviceName"] == "redis" and redis["spec"]["volumeClaimTemplates"]
    args = main_container(redis)["args"]
    assert args[args.index("--port") + 1] == str(DEFAULTS.redis_port)
    service = by_kind(objects, "Service")["redis"]
    assert service["spec"]["ports"][0]["port"] == DEFAULTS.redis_port
    telemetry = config_map(objects, "genmesh-telemetry")["data"]
    for key, value in telemetry.items():
        if key.endswith("_OTLP_ENDPOINT"):
            assert value == DEP.observability.otlp_endpoint, key
        else:
            assert float(value) == DEP.observability.trace_sample_percent / 100, key


def test_the_model_store_volume_is_filled_once_and_read_by_workers_and_tokenizers(overlay):
    _, objects = overlay
    claims = by_kind(objects, "PersistentVolumeClaim")
    assert "model-store" in claims
    for name, workload in workloads(objects).items():
        pod = pod_specs(workload)[0]
        volumes = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
                   for v in pod.get("volumes", [])}
        for container in containers(pod):
            for mount in container.get("volumeMounts", []):
                if volumes.get(mount["name"]) == "model-store":
                    assert mount["mountPath"] == "/models"
                    assert mount.get("readOnly", False) is (name != "model-store"), name
        if name in ("tokenizer", "worker-v1", "worker-v2"):
            [wait] = pod["initContainers"]
            model = {e["name"]: e["value"] for e in wait["env"]}["MODEL"]
            assert model == DEP.model and wait["image"] == main_container(workload)["image"]
    job = by_kind(objects, "Job")["model-store"]
    command = main_container(job)["command"]
    assert command == ["sh", "/app/deploy/docker/model-store.sh"]
    assert main_container(job)["args"] == [DEP.model]


def test_no_secret_is_in_the_manifests(overlay):
    _, objects = overlay
    assert not [o for o in objects if o["kind"] == "Secret"]
    refs = set()
    for workload in workloads(objects).values():
        for container in containers(pod_specs(workload)[0]):
            refs |= secret_refs(container)
    assert refs == {SECRET}
    for key in yaml.safe_load(DEPLOYMENT_FILE.read_text())["tenants"]["dev"]["api_keys"]:
        assert re.fullmatch(r"\$\{[A-Z0-9_]+\}", key)
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"create secret generic {SECRET}" in readme, "the README says how to create it"


def test_the_overlays_pick_the_engine(overlay):
    name, objects = overlay
    for version in DEP.versions:
        cfg = service_config(objects, version.cluster)
        container = main_container(workloads(objects)[version.cluster])
        resources = container["resources"]
        if name == "cpu":
            assert (cfg.backend.value, cfg.device, cfg.dtype) == ("native", "cpu", version.dtype)
            assert cfg.num_threads == int(resources["requests"]["cpu"])
            assert "nvidia.com/gpu" not in resources["limits"]
        else:
            assert (cfg.backend.value, cfg.device) == ("tensorrt_llm", "cuda")
            assert cfg.dtype in ("bfloat16", "float16")
            assert container["image"] == f"genmesh/worker-gpu:{VERSION}"
            assert resources["limits"]["nvidia.com/gpu"] == "1"
            pod = pod_specs(workloads(objects)[version.cluster])[0]
            assert {"key": "nvidia.com/gpu", "operator": "Exists",
                    "effect": "NoSchedule"} in pod["tolerations"]
            shm = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}["/dev/shm"]
            [volume] = [v for v in pod["volumes"] if v["name"] == shm]
            assert volume["emptyDir"]["medium"] == "Memory"


def test_http_api_calls_the_frontend_and_drains_within_its_grace(overlay):
    """The HTTP API: the frontend through Envoy's mesh listener (a frontend admits Envoy
    alone), its GET /healthz probed by Envoy and by the kubelet (on the health port), longer
    to stop than it takes to drain, and the frontend's resources and security settings."""
    _, objects = overlay
    workload = workloads(objects)["httpapi"]
    frontend_workload = workloads(objects)["frontend"]
    container = main_container(workload)
    assert container["image"] == f"genmesh/httpapi:{VERSION}"
    assert entry_module(image_stage(container["image"])) == "services.httpapi.main"
    assert "command" not in container and "args" not in container  # the image's entry point
    cfg = service_config(objects, "httpapi")
    dep = mesh_deployment(objects)
    assert cfg.frontend_address == f"envoy-mesh:{dep.gateway.mesh_port}"
    assert "envoy-mesh" in by_kind(objects, "Service")
    assert dep.services.httpapi == (("httpapi", cfg.port),)
    # Envoy probes the health path (503 while draining takes a pod out); the kubelet, which
    # holds no certificate Envoy's CA signed, asks the same path on the health port.
    path = HTTP_HEALTH_PATHS["services.httpapi.main"]
    health_port = check_health_port(cfg, set(named_ports(container).values()))
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == [
            "python", "/app/deploy/docker/probe.py", "http",
            f"http://127.0.0.1:{health_port}{path}"]
    [envoy_cluster] = [c for c in clusters(dep) if c["name"] == "httpapi"]
    [envoy_check] = envoy_cluster["health_checks"]
    assert envoy_check["http_health_check"]["path"] == path
    # Stopping: preStop's sleep, then the service's drain, both within the pod's grace; the
    # liveness probe tolerates a whole drain.
    pod = pod_specs(workload)[0]
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(sleep[1]) + cfg.shutdown_grace_s
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > cfg.shutdown_grace_s
    # In line with the frontend: resources, pod and container security.
    frontend = main_container(frontend_workload)
    assert container["resources"] == frontend["resources"]
    assert container["securityContext"] == frontend["securityContext"]
    assert pod["securityContext"] == pod_specs(frontend_workload)[0]["securityContext"]
    # No API keys, no Redis, no model store: the edge stamps the tenant, the frontend does
    # the rest; its own certificate and key only.
    assert not secret_refs(container)
    assert "genmesh.io/redis-client" not in pod_labels(workload)
    assert [m["mountPath"] for m in container["volumeMounts"]] == [
        DEP.security.secrets_dir, "/tmp"]
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true",
                           "prometheus.io/port": str(cfg.metrics_port)}


# ---- NetworkPolicies, evaluated ------------------------------------------------------------

@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: Mapping[str, str]
    ports: Mapping[str, int] = dataclasses.field(default_factory=dict)  # name -> number


MONITORING = "monitoring"  # the namespace of the cluster's Prometheus
PROMETHEUS_LABELS = {"app.kubernetes.io/name": "prometheus"}


def _pods(objects: list[dict[str, Any]]) -> list[Pod]:
    """The mesh's pods, and pods elsewhere that might try to reach them. Envoy's pod also
    lists its admin port ("admin"), which it has no container port for: it listens on the
    pod's loopback, and no policy may open that port should it ever listen wider."""
    pods = [Pod(name, NAMESPACE, pod_labels(w),
                {k: v for c in pod_specs(w)[0]["containers"] for k, v in named_ports(c).items()})
            for name, w in workloads(objects).items()]
    admin_port = mesh_deployment(objects).gateway.admin_port
    pods = [dataclasses.replace(p, ports={**p.ports, "admin": admin_port}) if p.name == "envoy"
            else p for p in pods]
    return [*pods,
            Pod("outside", "default", {}),  # any client of the cluster
            Pod("stranger", NAMESPACE, {"app.kubernetes.io/name": "debug"}),
            Pod("prometheus", MONITORING, PROMETHEUS_LABELS),
            Pod("other-prometheus", "default", PROMETHEUS_LABELS),  # any team's, anywhere
            Pod("monitoring-neighbour", MONITORING, {"app.kubernetes.io/name": "grafana"})]


def mesh_deployment(objects: list[dict[str, Any]]) -> Deployment:
    """The description in the ConfigMap genmesh-deployment, as the gateway loads it (each
    ${VAR} set to a test value)."""
    text = config_map(objects, "genmesh-deployment")["data"]["deployment.yaml"]
    variables = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    return deploy.from_dict(yaml.safe_load(text),
                            environ={v: f"test-{v.lower()}" for v in variables})


def reachable(objects: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """(pod, port name) -> the pods the NetworkPolicies let open a connection to it."""
    policies = list(by_kind(objects, "NetworkPolicy").values())
    pods = _pods(objects)
    return {(target.name, port): {s.name for s in pods
                                  if s is not target and allowed(policies, s, target, port)}
            for target in pods for port in target.ports}


def allowed(policies: list[dict[str, Any]], source: Pod, target: Pod, port: str) -> bool:
    """Whether ``source`` may open a TCP connection to ``target``'s named ``port``."""
    selecting = [p for p in policies if p["metadata"]["namespace"] == target.namespace
                 and "Ingress" in p["spec"]["policyTypes"]
                 and selects(p["spec"]["podSelector"], target.labels)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("protocol", "TCP") == "TCP" and (
                    p["port"] == port or p["port"] == target.ports[port]) for p in ports):
                continue
            peers = rule.get("from")
            if not peers or any(_peer(peer, source, policy["metadata"]["namespace"])
                                for peer in peers):
                return True
    return False


def _peer(peer: Mapping[str, Any], source: Pod, namespace: str) -> bool:
    assert "ipBlock" not in peer, "teach this evaluator ipBlock"
    if "namespaceSelector" in peer:
        in_namespace = selects(peer["namespaceSelector"],
                               {"kubernetes.io/metadata.name": source.namespace})
    else:
        in_namespace = source.namespace == namespace
    return in_namespace and selects(peer.get("podSelector"), source.labels)


def test_network_policies_let_only_the_gateway_reach_the_frontend_and_internal_services(overlay):
    _, objects = overlay
    everyone = {p.name for p in _pods(objects)} - {"envoy"}
    internal = ("tokenizer", "safety", "cache", "ratelimit", "worker-v1", "worker-v2")
    expected = {
        ("envoy", "edge"): everyone,  # the public API
        # The frontend's only way to internal services, the HTTP API's to the frontend.
        ("envoy", "mesh"): {"frontend", "httpapi"},
        ("envoy", "metrics"): {"prometheus"},  # GET /stats/prometheus and /ready only
        ("envoy", "admin"): set(),
        ("frontend", "grpc"): {"envoy"},  # it admits Envoy's certificate alone
        ("frontend", "metrics"): {"prometheus"},
        ("httpapi", "http"): {"envoy"},  # the edge's /v1/ routes
        ("httpapi", "metrics"): {"prometheus"},
        ("redis", "redis"): {"frontend", "safety", "cache", "ratelimit", "worker-v1",
                             "worker-v2"},
    }
    for name in internal:
        expected[(name, "grpc")] = {"envoy"}
        expected[(name, "metrics")] = {"prometheus"}
    assert reachable(objects) == expected
    # Only ingress is policed: what a pod may call (the HTTP API -> the frontend) is up to
    # the callee's rules above, never cut off at the caller.
    for policy in by_kind(objects, "NetworkPolicy").values():
        assert policy["spec"]["policyTypes"] == ["Ingress"], policy["metadata"]["name"]
        assert "egress" not in policy["spec"], policy["metadata"]["name"]
    # The gateway sends the mesh listener's calls to exactly those internal services.
    static = yaml.safe_load(render(DEP))["static_resources"]
    mesh = next(ln for ln in static["listeners"] if ln["name"] == "mesh")
    routes = mesh["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
    clusters = {c for vh in routes["virtual_hosts"] for r in vh["routes"]
                for c in route_clusters(r)}
    # ratelimit: Envoy's own RLS calls; the frontend: the HTTP API's calls.
    assert clusters | {"ratelimit"} == {*internal, "frontend"}


# ---- Envoy's admin stays in the pod, Prometheus scrapes its metrics listener ---------------

def check_envoy_admin_is_closed_and_its_metrics_scraped(objects: list[dict[str, Any]]) -> None:
    """AssertionError unless Envoy's admin interface is reachable from inside its pod only,
    while the monitoring namespace's Prometheus (and nothing else) scrapes Envoy's metrics
    and every service's: followed from the pod's annotations through the NetworkPolicies
    to the Envoy config the gateway renders from the ConfigMap."""
    dep = mesh_deployment(objects)
    g = dep.gateway
    bootstrap = build_bootstrap(dep)
    static = bootstrap["static_resources"]
    admin = bootstrap["admin"]["address"]["socket_address"]
    assert ipaddress.ip_address(admin["address"]).is_loopback, (
        f"Envoy's admin listens on {admin['address']}, beyond the pod")
    # Admin's port is no policy's to open, for any peer; only Prometheus reaches /metrics.
    for (target, port), sources in reachable(objects).items():
        if port == "admin":
            assert not sources, f"{sorted(sources)} may connect to {target}'s admin port"
        if port == "metrics":
            assert sources == {"prometheus"}, f"{target}'s metrics port: {sorted(sources)}"
    adapter = yaml.safe_load((K8S / "extras" / "prometheus-adapter-values.yaml").read_text())
    assert urllib.parse.urlsplit(adapter["prometheus"]["url"]).hostname.split(".")[1] == (
        MONITORING), "the policy admits Prometheus from the namespace the adapter reads from"
    # Prometheus scrapes the annotated port and path: Envoy's metrics listener, on every
    # address of the pod, which passes that path (and /ready) to admin and nothing else.
    envoy = workloads(objects)["envoy"]
    container = main_container(envoy)
    ports = named_ports(container)
    assert g.admin_port not in ports.values(), "the admin port is declared on the container"
    annotations = envoy["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"] == g.metrics_port, (
        f"Prometheus scrapes port {annotations['prometheus.io/port']}")
    [metrics] = [ln for ln in static["listeners"] if ln["name"] == "metrics"]
    assert metrics["address"]["socket_address"] == {"address": g.host,
                                                    "port_value": g.metrics_port}
    assert ipaddress.ip_address(g.host).is_unspecified, "other pods must reach the listener"
    routes = [r for vh in metrics["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"]["virtual_hosts"] for r in vh["routes"]]
    to_admin = {r["match"].get("path"): r["match"] for r in routes if route_clusters(r)}
    assert set(to_admin) == {"/stats/prometheus", "/ready"}, f"admin gets {sorted(to_admin)}"
    assert all(route_clusters(r) == {ADMIN_CLUSTER} for r in routes if route_clusters(r))
    assert annotations["prometheus.io/path"] in to_admin
    [cluster] = [c for c in static["clusters"] if c["name"] == ADMIN_CLUSTER]
    [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == admin
    # The kubelet probes through the metrics listener; the preStop drain runs in the pod.
    readiness = container["readinessProbe"]["httpGet"]
    assert readiness["port"] in ("metrics", g.metrics_port) and readiness["path"] in to_admin, (
        f"the kubelet cannot reach {readiness} (admin is on the pod's loopback)")
    assert container["livenessProbe"]["tcpSocket"]["port"] in ("metrics", g.metrics_port)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    drain = urllib.parse.urlsplit(command[command.index("drain") + 1])
    assert (drain.hostname, drain.port) == (admin["address"], g.admin_port)


def test_envoy_admin_is_closed_and_prometheus_scrapes_its_metrics(overlay):
    _, objects = overlay
    check_envoy_admin_is_closed_and_its_metrics_scraped(objects)


Mutation = Callable[[list[dict[str, Any]]], None]


def _patched(kind: str, name: str, *ops: dict[str, Any]) -> Mutation:
    """JSON patch operations on the object ``kind/name``."""
    def mutate(objects: list[dict[str, Any]]) -> None:
        [obj] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
        for op in ops:
            json_patch(obj, op)
    return mutate


def _deployment_edited(old: str, new: str) -> Mutation:
    """``old`` replaced by ``new`` in the ConfigMap genmesh-deployment's description."""
    def mutate(objects: list[dict[str, Any]]) -> None:
        data = config_map(objects, "genmesh-deployment")["data"]
        assert old in data["deployment.yaml"], f"{old!r} is no longer in the description"
        data["deployment.yaml"] = data["deployment.yaml"].replace(old, new)
    return mutate


_PEER = "/spec/ingress/0/from/0"
_ENVOY_POD = "/spec/template/spec/containers/0"
# Each breaks what the check above guards; the check must notice every one.
MUTATIONS: dict[str, Mutation] = {
    "prometheus from any namespace": _patched(
        "NetworkPolicy", "metrics-from-prometheus",
        {"op": "replace", "path": f"{_PEER}/namespaceSelector", "value": {}}),
    "prometheus only from the mesh's own namespace": _patched(
        "NetworkPolicy", "metrics-from-prometheus",
        {"op": "remove", "path": f"{_PEER}/namespaceSelector"}),
    "a second prometheus peer in any namespace": _patched(
        "NetworkPolicy", "metrics-from-prometheus",
        {"op": "add", "path": "/spec/ingress/0/from/-", "value": {
            "namespaceSelector": {}, "podSelector": {"matchLabels": PROMETHEUS_LABELS}}}),
    "any pod of the monitoring namespace": _patched(
        "NetworkPolicy", "metrics-from-prometheus",
        {"op": "remove", "path": f"{_PEER}/podSelector"}),
    "the admin port back, by name": _patched(
        "NetworkPolicy", "metrics-from-prometheus",
        {"op": "add", "path": "/spec/ingress/0/ports/-", "value": {"protocol": "TCP",
                                                                   "port": "admin"}}),
    "the admin port back, by number": _patched(
        "NetworkPolicy", "metrics-from-prometheus",
        {"op": "add", "path": "/spec/ingress/0/ports/-", "value": {"protocol": "TCP",
                                                                   "port": 9901}}),
    "prometheus on every port": _patched(
        "NetworkPolicy", "metrics-from-prometheus",
        {"op": "remove", "path": "/spec/ingress/0/ports"}),
    "the public rule on every port of the gateway": _patched(
        "NetworkPolicy", "gateway", {"op": "remove", "path": "/spec/ingress/0/ports"}),
    "admin on every address of the pod": _deployment_edited(
        "admin_host: 127.0.0.1", "admin_host: 0.0.0.0"),
    "no metrics listener": _deployment_edited("metrics_port: 9902", "metrics_port: 0"),
    "prometheus scrapes the admin port": _patched(
        "Deployment", "envoy", {"op": "replace", "value": "9901",
                                "path": "/spec/template/metadata/annotations/prometheus.io~1port"}),
    "the admin port declared on the container": _patched(
        "Deployment", "envoy", {"op": "add", "path": f"{_ENVOY_POD}/ports/-",
                                "value": {"name": "admin", "containerPort": 9901}}),
    "the readiness probe on the admin port": _patched(
        "Deployment", "envoy", {"op": "replace", "value": 9901,
                                "path": f"{_ENVOY_POD}/readinessProbe/httpGet/port"}),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_the_admin_and_metrics_check_catches_each_mutation(overlay, mutation):
    _, objects = overlay
    mutated = copy.deepcopy(objects)
    MUTATIONS[mutation](mutated)  # outside pytest.raises: a mutation that no longer applies fails
    with pytest.raises(AssertionError):
        check_envoy_admin_is_closed_and_its_metrics_scraped(mutated)


def test_each_pod_mounts_only_its_own_identitys_secret(overlay, tmp_path):
    """Every mesh pod mounts the Secret of its own identity (and no other) read-only where
    the deployment's security.secrets_dir says; `genmesh secrets k8s` makes those Secrets,
    each with its identity's key and Redis password alone and never a CA key. Redis
    mounts the ACL file alone; no other pod holds a secret of the mesh."""
    _, objects = overlay
    made = {s["metadata"]["name"]: s for s in secrets_command.k8s_secrets(
        pki.ensure(tmp_path / "secrets"), NAMESPACE)}
    assert not [s for s in made.values() if any(k.endswith("ca.key") for k in s["data"])]
    for name, workload in workloads(objects).items():
        pod = pod_specs(workload)[0]
        secret_volumes = {v["name"]: v["secret"] for v in pod.get("volumes", [])
                          if "secret" in v}
        if name not in IN_CLUSTER:
            assert name == "redis" or not secret_volumes, name
            continue
        identity = IN_CLUSTER[name]
        [(volume, spec)] = secret_volumes.items()
        assert spec["secretName"] == f"genmesh-secrets-{identity}", name
        # 0440: the kubelet grants the pod's fsGroup read whatever the mode; others nothing.
        assert spec["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"], name
        [mount] = [m for m in main_container(workload)["volumeMounts"] if m["name"] == volume]
        assert mount == {"name": volume, "mountPath": DEP.security.secrets_dir,
                         "readOnly": True}, name
        keys = set(made[spec["secretName"]]["data"])
        assert {k for k in keys if k.endswith(".key")} == {f"{identity}.key"}
        assert {k for k in keys if k.endswith(".password")} == (
            {f"redis-{identity}.password"} if identity in pki.REDIS_KEYS else set())
        assert {"gateway-ca.pem", "service-ca.pem", f"{identity}.pem"} <= keys
    redis = workloads(objects)["redis"]
    args = main_container(redis)["args"]
    acl = Path(args[args.index("--aclfile") + 1])
    [volume] = [v for v in pod_specs(redis)[0]["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "genmesh-redis-acl"
    assert set(made["genmesh-redis-acl"]["data"]) == {acl.name}
    [mount] = [m for m in main_container(redis)["volumeMounts"] if m["name"] == volume["name"]]
    assert mount == {"name": volume["name"], "mountPath": str(acl.parent), "readOnly": True}
    assert "requirepass" not in " ".join(args)
