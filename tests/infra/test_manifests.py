"""KubeRay and Kubernetes manifests in infra/k8s, and the Ray Serve config they carry, checked offline.

Ray resources validate against the KubeRay `ray.io/v1` CRD schemas in ../shared/kuberay (beside the repository).
Core objects (Deployment, StatefulSet, Job, Service) validate against the Kubernetes schemas those CRDs embed
(PodTemplateSpec, Service, PersistentVolumeClaimSpec). The Serve config validates against Ray Serve's own schema.
"""

import json
import re
from pathlib import Path

import pytest
import ray
import yaml
from jsonschema import Draft202012Validator

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
SERVE_CONFIG = ROOT / "infra" / "serve" / "serve-config.yaml"
INFRA_README = ROOT / "infra" / "README.md"
KUBERAY = ROOT.parent / "shared" / "kuberay"

RAY_KINDS = ("RayCluster", "RayJob", "RayService")
NAMESPACE = "raydiff"
ENTRYPOINT = "raydiff run configs/cifar10-gpu.yaml"
SECRET_LIKE = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|KEY_ID|CREDENTIAL|PRIVATE_KEY|API_KEY", re.I)
URL_CREDENTIALS = re.compile(r"://([^/\s:@]+):([^/\s@]+)@")
K8S_VAR = re.compile(r"^\$\([A-Z_][A-Z0-9_]*\)$")


# ---------------------------------------------------------------------------------------------- loading


def kuberay_schema(kind: str) -> dict:
    if not KUBERAY.is_dir():
        pytest.fail(f"KubeRay CRD schemas not found at {KUBERAY}: the repository expects shared/ beside it "
                    f"(../shared/kuberay relative to {ROOT}), holding raycluster/rayjob/rayservice.schema.json")
    path = KUBERAY / f"{kind.lower()}.schema.json"
    if not path.is_file():
        pytest.fail(f"{path} is missing from the KubeRay schema folder {KUBERAY}")
    return json.loads(path.read_text())


def load_manifests() -> dict[str, list[dict]]:
    files = sorted(K8S.glob("*.yaml"))
    assert files, f"no manifests in {K8S}"
    return {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None] for path in files}


MANIFESTS = load_manifests()
DOCS = [(name, doc) for name, docs in MANIFESTS.items() for doc in docs]


def docs_of(kind: str) -> list[dict]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def one(kind: str, name: str) -> dict:
    found = [doc for doc in docs_of(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name!r}, found {len(found)}"
    return found[0]


def ray_cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda: doc["spec"], "RayJob": lambda: doc["spec"]["rayClusterSpec"],
            "RayService": lambda: doc["spec"]["rayClusterConfig"]}[doc["kind"]]()


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod template) for every pod a manifest creates."""
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    if doc["kind"] in RAY_KINDS:
        spec = ray_cluster_spec(doc)
        groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
        return [(f"{name} {group}", g["template"]) for group, g in groups]
    if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
        return [(name, doc["spec"]["template"])]
    return []


def ray_containers() -> list[tuple[str, dict]]:
    return [(f"{where} {c['name']}", c) for _, doc in DOCS if doc["kind"] in RAY_KINDS
            for where, template in pod_templates(doc) for c in template["spec"]["containers"]]


def all_containers() -> list[tuple[str, dict]]:
    return [(f"{where} {c['name']}", c) for _, doc in DOCS for where, template in pod_templates(doc)
            for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]]


def walk_strings(node, path="$"):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk_strings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk_strings(value, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def schema_errors(schema: dict, instance) -> list[str]:
    errors = sorted(Draft202012Validator(schema).iter_errors(instance), key=lambda e: e.json_path)
    return [f"{e.json_path}: {e.message}" for e in errors]


def unknown_fields(schema: dict, instance, path: str = "$") -> list[str]:
    """Keys the schema does not define. The CRD schemas never set additionalProperties: false, so jsonschema
    accepts a misspelt field (`replica:`, `minReplica:`) that the API server would silently prune; catch it here."""
    found = []
    if isinstance(instance, dict) and isinstance(schema.get("properties"), dict):
        for key, value in instance.items():
            if key in schema["properties"]:
                found += unknown_fields(schema["properties"][key], value, f"{path}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                found += unknown_fields(schema["additionalProperties"], value, f"{path}.{key}")
            else:
                found.append(f"{path}.{key}")
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(instance):
            found += unknown_fields(schema["items"], value, f"{path}[{i}]")
    return found


# ---------------------------------------------------------------------------------------------- parsing, schemas


def test_every_manifest_parses_into_named_namespaced_objects():
    assert {"rayjob.yaml", "rayservice.yaml", "raycluster.yaml", "mlflow.yaml"} <= set(MANIFESTS)
    for name, doc in DOCS:
        assert isinstance(doc, dict), f"{name}: a document is not a mapping"
        assert doc.get("apiVersion") and doc.get("kind"), f"{name}: document without apiVersion/kind"
        assert doc.get("metadata", {}).get("name"), f"{name}: {doc['kind']} without metadata.name"
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{name}: {doc['kind']} not in {NAMESPACE}"
    assert [d["metadata"]["name"] for d in docs_of("Namespace")] == [NAMESPACE]
    keys = [(d["kind"], d["metadata"]["name"]) for _, d in DOCS]
    assert len(keys) == len(set(keys)), f"duplicate objects: {keys}"


@pytest.mark.parametrize("kind", RAY_KINDS)
def test_ray_resources_validate_against_kuberay_crd_schemas(kind):
    schema = kuberay_schema(kind)
    found = [(name, doc) for name, doc in DOCS if doc["kind"] == kind]
    assert found, f"no {kind} manifest in {K8S}"
    for name, doc in found:
        assert doc["apiVersion"] == "ray.io/v1", f"{name}: {kind} must use ray.io/v1"
        errors = schema_errors(schema, doc)
        assert not errors, f"{name}: {kind} does not match the KubeRay CRD schema:\n" + "\n".join(errors)
        unknown = unknown_fields(schema, doc)
        assert not unknown, f"{name}: {kind} has fields the KubeRay CRD does not define (typos?): {unknown}"


def test_core_objects_validate_against_the_kubernetes_schemas_embedded_in_the_crds():
    spec = kuberay_schema("RayCluster")["properties"]["spec"]["properties"]
    template_schema = spec["headGroupSpec"]["properties"]["template"]
    service_schema = spec["headGroupSpec"]["properties"]["headService"]
    volumes = template_schema["properties"]["spec"]["properties"]["volumes"]["items"]["properties"]
    pvc_spec_schema = volumes["ephemeral"]["properties"]["volumeClaimTemplate"]["properties"]["spec"]
    checked = 0
    for name, doc in DOCS:
        kind = doc["kind"]
        if kind in ("Deployment", "StatefulSet"):
            assert doc["apiVersion"] == "apps/v1", f"{name}: {kind} must be apps/v1"
        if kind == "Job":
            assert doc["apiVersion"] == "batch/v1", f"{name}: Job must be batch/v1"
        if kind in ("Service", "ConfigMap", "Namespace"):
            assert doc["apiVersion"] == "v1", f"{name}: {kind} must be v1"
        for where, template in pod_templates(doc) if kind not in RAY_KINDS else []:
            errors = schema_errors(template_schema, template)
            assert not errors, f"{name}: {where} pod template:\n" + "\n".join(errors)
            unknown = unknown_fields(template_schema, template)
            assert not unknown, f"{name}: {where} pod template has undefined fields: {unknown}"
            checked += 1
        if kind == "Service":
            errors = schema_errors(service_schema, doc)
            assert not errors, f"{name}: Service {doc['metadata']['name']}:\n" + "\n".join(errors)
            assert not unknown_fields(service_schema, doc), f"{name}: Service with undefined fields"
            checked += 1
        for claim in doc["spec"].get("volumeClaimTemplates", []) if kind == "StatefulSet" else []:
            errors = schema_errors(pvc_spec_schema, claim["spec"])
            assert not errors, f"{name}: volumeClaimTemplate {claim['metadata']['name']}:\n" + "\n".join(errors)
        if kind == "ConfigMap":
            assert all(isinstance(v, str) for v in doc["data"].values()), f"{name}: ConfigMap values must be strings"
    assert checked >= 6


def test_workloads_select_their_own_pods_and_services_reach_them():
    for kind in ("Deployment", "StatefulSet"):
        for doc in docs_of(kind):
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{kind} {doc['metadata']['name']}: selector misses its pods"
            if kind == "StatefulSet":
                one("Service", doc["spec"]["serviceName"])
    pods = [(t["metadata"].get("labels", {}), t["spec"]) for _, d in DOCS if d["kind"] not in RAY_KINDS
            for _, t in pod_templates(d)]
    for service in docs_of("Service"):
        selector = service["spec"]["selector"]
        matched = [spec for labels, spec in pods if selector.items() <= labels.items()]
        assert matched, f"Service {service['metadata']['name']} selects no pod"
        port_names = {p.get("name") for spec in matched for c in spec["containers"] for p in c.get("ports", [])}
        port_numbers = {p["containerPort"] for spec in matched for c in spec["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in port_names | port_numbers, f"Service {service['metadata']['name']}: no port {target}"


def test_mounted_volumes_and_named_probe_ports_exist():
    for _, doc in DOCS:
        claims = {c["metadata"]["name"] for c in doc["spec"].get("volumeClaimTemplates", [])} \
            if doc["kind"] == "StatefulSet" else set()
        for where, template in pod_templates(doc):
            volumes = {v["name"] for v in template["spec"].get("volumes", [])} | claims
            for container in template["spec"]["containers"]:
                for mount in container.get("volumeMounts", []):
                    assert mount["name"] in volumes, f"{where}: mounts undefined volume {mount['name']}"
                ports = {p.get("name") for p in container.get("ports", [])}
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    port = container.get(probe, {}).get("httpGet", {}).get("port")
                    if isinstance(port, str):
                        assert port in ports, f"{where}: {probe} uses unknown port {port}"


def test_config_maps_referenced_by_pods_exist():
    config_maps = {d["metadata"]["name"]: d["data"] for d in docs_of("ConfigMap")}
    for where, container in all_containers():
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in config_maps, f"{where}: no ConfigMap {source}"
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                assert ref["key"] in config_maps.get(ref["name"], {}), f"{where}: no ConfigMap key {ref}"


# ---------------------------------------------------------------------------------------------- Ray specifics


def test_ray_versions_and_images_match_the_installed_ray():
    version = ray.__version__
    for _, doc in DOCS:
        if doc["kind"] in RAY_KINDS:
            assert ray_cluster_spec(doc)["rayVersion"] == version, \
                f"{doc['kind']} {doc['metadata']['name']}: rayVersion must be the installed Ray {version}"
    for where, container in ray_containers():
        image = container["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag, f"{where}: image {image} has no tag"
        expected = f"{version}-" if repository == "rayproject/ray" else f"ray{version}-"
        assert tag.startswith(expected), f"{where}: image {image} is not built for Ray {version}"
        assert re.search(r"-py3\d+-(cpu|cu\d+)$", tag), f"{where}: image tag {tag} names no Python/platform"


def test_kuberay_finds_the_ray_container_first_and_pods_run_in_app():
    for _, doc in DOCS:
        for where, template in pod_templates(doc) if doc["kind"] in RAY_KINDS else []:
            first = template["spec"]["containers"][0]
            assert first["name"] in ("ray-head", "ray-worker"), f"{where}: the Ray container must come first"
            assert first.get("workingDir", "/app") == "/app", f"{where}: the image's project lives at /app"


def test_gpu_worker_groups_request_gpus_and_run_the_cuda_image():
    for _, doc in DOCS:
        if doc["kind"] not in RAY_KINDS:
            continue
        groups = ray_cluster_spec(doc).get("workerGroupSpecs", [])
        gpu_groups = [g for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]
                      .get("limits", {})]
        assert gpu_groups, f"{doc['kind']} {doc['metadata']['name']}: no GPU worker group"
        for group in gpu_groups:
            where = f"{doc['kind']} {doc['metadata']['name']} group {group['groupName']}"
            resources = group["template"]["spec"]["containers"][0]["resources"]
            gpus = int(resources["limits"]["nvidia.com/gpu"])
            assert gpus >= 1 and int(resources["requests"]["nvidia.com/gpu"]) == gpus, \
                f"{where}: nvidia.com/gpu must be requested and limited alike"
            assert re.search(r"-cu\d+$", group["template"]["spec"]["containers"][0]["image"]), \
                f"{where}: GPU workers need the CUDA image"
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
            tolerations = group["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), f"{where}: no GPU-taint toleration"


def test_rayjob_runs_the_gpu_pipeline_and_shuts_down():
    job = one("RayJob", "raydiff-train")
    assert job["spec"]["entrypoint"] == ENTRYPOINT
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode"


def test_ray_pods_track_to_the_in_cluster_mlflow_with_s3_credentials_from_secrets():
    service = one("Service", "raydiff-mlflow")
    port = service["spec"]["ports"][0]["port"]
    expected = {f"http://raydiff-mlflow:{port}", f"http://raydiff-mlflow.{NAMESPACE}.svc:{port}",
                f"http://raydiff-mlflow.{NAMESPACE}.svc.cluster.local:{port}"}
    containers = ray_containers()
    assert len(containers) >= 6
    for where, container in containers:
        env = {e["name"]: e for e in container.get("env", [])}
        assert env.get("MLFLOW_TRACKING_URI", {}).get("value") in expected, \
            f"{where}: MLFLOW_TRACKING_URI must point at the MLflow Service (http://raydiff-mlflow:{port})"
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = env.get(key, {}).get("valueFrom", {}).get("secretKeyRef")
            assert ref == {"name": "raydiff-s3", "key": key}, f"{where}: {key} must come from Secret raydiff-s3"


def test_mlflow_server_uses_postgres_and_the_s3_store_with_secret_credentials():
    deployment = one("Deployment", "raydiff-mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = container["command"] + container.get("args", [])
    assert command[:2] == ["mlflow", "server"]
    flags = dict(arg.split("=", 1) for arg in command[2:])
    assert flags["--host"] == "0.0.0.0"
    assert flags["--port"] == str(container["ports"][0]["containerPort"])
    backend = flags["--backend-store-uri"]
    assert backend.startswith("postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@raydiff-postgres:5432/")
    one("Service", "raydiff-postgres")
    destination = flags["--artifacts-destination"]
    env = {e["name"]: e for e in container["env"]}
    config = one("ConfigMap", "raydiff-storage")["data"]
    for var in re.findall(r"\$\(([A-Z_0-9]+)\)", backend + destination):
        assert var in env or var in config, f"$({var}) is not defined for the MLflow container"
    assert re.sub(r"\$\((\w+)\)", lambda m: config.get(m.group(1), ""), destination).startswith("s3://")
    for key in ("POSTGRES_USER", "POSTGRES_PASSWORD"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "raydiff-postgres", "key": key}
    hosts = flags["--allowed-hosts"].split(",")
    assert "raydiff-mlflow:*" in hosts and "localhost:*" in hosts, \
        "MLflow must accept its Service name and port-forwards"


# ---------------------------------------------------------------------------------------------- secrets


def test_no_secret_is_inlined_in_any_manifest():
    assert not docs_of("Secret"), "Secrets are created with kubectl (infra/README.md), never committed"
    for where, container in all_containers():
        for env in container.get("env", []):
            if SECRET_LIKE.search(env["name"]):
                assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), \
                    f"{where}: {env['name']} must come from a secretKeyRef, not a literal value"
    for name, doc in DOCS:
        for path, text in walk_strings(doc):
            for user, password in URL_CREDENTIALS.findall(text):
                assert K8S_VAR.match(user) and K8S_VAR.match(password), \
                    f"{name} {path}: credentials written into a URL ({user}:…)"
            assert not re.search(r"(?i)(password|secret|token)\s*[:=]\s*['\"]?\w{6,}", text), \
                f"{name} {path}: looks like an inlined credential"
        if doc["kind"] == "ConfigMap":
            for key in doc["data"]:
                assert not SECRET_LIKE.search(key), f"{name}: ConfigMap key {key} belongs in a Secret"


def test_every_referenced_secret_is_created_in_the_readme():
    text = INFRA_README.read_text().replace("\\\n", " ")
    created: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = re.search(r"create secret generic (\S+)", line)
        if match:
            created[match.group(1)] = set(re.findall(r"--from-literal=(\w+)=", line))
    referenced = set()
    for _, container in all_containers():
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                referenced.add((ref["name"], ref["key"]))
    for _, doc in DOCS:
        if doc["kind"] in RAY_KINDS:
            auth = ray_cluster_spec(doc).get("authOptions", {})
            if auth.get("mode") == "token" and auth.get("secretName"):
                referenced.add((auth["secretName"], "auth_token"))  # KubeRay's RAY_AUTH_TOKEN_SECRET_KEY
    assert referenced
    for secret, key in sorted(referenced):
        assert key in created.get(secret, set()), \
            f"Secret {secret} key {key} is used by the manifests but infra/README.md never creates it"


# ---------------------------------------------------------------------------------------------- Serve


def serve_config_file() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())


def assert_known_keys(data: dict, model, where: str) -> None:
    """Ray Serve's schemas ignore unknown keys; a misspelt option would be dropped silently, so check names here."""
    known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    unknown = set(data) - known
    assert not unknown, f"{where}: unknown Serve config keys {sorted(unknown)}"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic deprecations inside ray.serve itself
def test_serve_config_validates_against_ray_serves_schema():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (DeploymentSchema, HTTPOptionsSchema, RayActorOptionsSchema,
                                  ServeApplicationSchema, ServeDeploySchema)

    config = serve_config_file()
    schema = ServeDeploySchema.model_validate(config)
    assert_known_keys(config, ServeDeploySchema, "top level")
    assert_known_keys(config["http_options"], HTTPOptionsSchema, "http_options")
    for app in config["applications"]:
        assert_known_keys(app, ServeApplicationSchema, f"application {app['name']}")
        for deployment in app["deployments"]:
            where = f"deployment {deployment['name']}"
            assert_known_keys(deployment, DeploymentSchema, where)
            assert_known_keys(deployment.get("ray_actor_options", {}), RayActorOptionsSchema, where)
            if "autoscaling_config" in deployment:
                AutoscalingConfig.model_validate(deployment["autoscaling_config"])
                assert_known_keys(deployment["autoscaling_config"], AutoscalingConfig, where)
    assert schema.http_options.port == 8000 and schema.http_options.host == "0.0.0.0"


def test_serve_config_follows_the_serve_contract():
    config = serve_config_file()
    (app,) = config["applications"]
    assert app["import_path"] == "services.app:build_app"
    assert app["route_prefix"] == "/"
    assert app["args"] == {"model_uri": "models:/cifar10-ddpm@champion", "tracking_uri": "http://raydiff-mlflow:5000",
                           "max_batch_size": 16, "device": "cuda"}
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {"SamplerDeployment", "Ingress"}
    sampler, ingress = deployments["SamplerDeployment"], deployments["Ingress"]
    assert sampler["ray_actor_options"]["num_gpus"] == 1
    assert sampler["autoscaling_config"]["min_replicas"] == 1 and sampler["autoscaling_config"]["max_replicas"] == 4
    assert sampler["max_ongoing_requests"] == 32
    assert sampler["autoscaling_config"]["target_ongoing_requests"] <= sampler["max_ongoing_requests"]
    assert not ingress.get("ray_actor_options", {}).get("num_gpus"), "the Ingress runs on CPU"
    # The ingress must be able to hold every request the samplers can take, or it throttles them.
    assert ingress.get("num_replicas", 1) * ingress["max_ongoing_requests"] >= \
        sampler["autoscaling_config"]["max_replicas"] * sampler["max_ongoing_requests"]


def test_rayservice_carries_the_serve_config_file_verbatim():
    service = one("RayService", "raydiff-serve")
    assert isinstance(service["spec"]["serveConfigV2"], str)
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == serve_config_file(), \
        "infra/k8s/rayservice.yaml spec.serveConfigV2 drifted from infra/serve/serve-config.yaml"


def test_serve_app_tracks_to_the_mlflow_the_ray_pods_use():
    (app,) = serve_config_file()["applications"]
    for where, container in ray_containers():
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert app["args"]["tracking_uri"] == env["MLFLOW_TRACKING_URI"], where


def test_rayservice_cluster_fits_the_serve_autoscaling_range():
    service = one("RayService", "raydiff-serve")
    cluster = service["spec"]["rayClusterConfig"]
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    sampler = next(d for d in app["deployments"] if d["name"] == "SamplerDeployment")
    gpus_per_replica = sampler["ray_actor_options"]["num_gpus"]
    (group,) = cluster["workerGroupSpecs"]
    gpus_per_worker = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    scaling = sampler["autoscaling_config"]
    assert group["minReplicas"] * gpus_per_worker >= scaling["min_replicas"] * gpus_per_replica
    assert group["maxReplicas"] * gpus_per_worker >= scaling["max_replicas"] * gpus_per_replica
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    port = yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]["port"]
    assert {"name": "serve", "containerPort": port} in head["ports"], \
        "KubeRay's serve Service targets the head's serve port"


def test_unknown_field_check_catches_misspelt_fields():
    schema = kuberay_schema("RayCluster")
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"},
               "spec": {"headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [
                   {"name": "ray-head", "image": "i", "resourcez": {}}]}}},
                        "workerGroupSpecs": [{"groupName": "g", "replica": 1, "minReplicas": 0, "maxReplicas": 1,
                                              "rayStartParams": {}, "template": {"spec": {"containers": []}}}]}}
    assert not schema_errors(schema, cluster), "the misspellings pass the CRD schema itself"
    assert unknown_fields(schema, cluster) == [
        "$.spec.headGroupSpec.template.spec.containers[0].resourcez", "$.spec.workerGroupSpecs[0].replica"]
