"""The files in cluster/ hold together without a cluster: the RayService validates against
KubeRay's CRD schema, its Serve config is production.yaml and builds the real graph, the
launcher config passes Ray's own checks, and the dashboard charts the metrics the code records."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from opskit import CLUSTER, PRODUCTION, RAYSERVICE, load_yaml

from pacore.config import PlatformArgs, Settings
from pacore.engines.config import SelfHostedModel
from pacore.engines.vllm import llm_config_kwargs
from pacore.metrics import DEFINITIONS

CRD_SCHEMA = Path(__file__).parent / "data" / "rayservice-v1.schema.json"
FAST_MODE = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
# Serve keeps a draining direct-ingress replica reachable this long before it waits for its
# requests (ray.serve._private.constants.RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S).
DIRECT_INGRESS_MIN_DRAINING_S = 30


def strict(schema: Any) -> Any:
    """A CRD schema as the API server applies it under strict field validation: an object that
    lists its properties accepts no other field (unless it preserves unknown fields), so a
    misspelt key fails here instead of being silently pruned by Kubernetes."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if (
        schema.get("type") == "object"
        and isinstance(schema.get("properties"), dict)
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(strict(json.loads(CRD_SCHEMA.read_text())))


@pytest.fixture(scope="module")
def service() -> dict[str, Any]:
    return dict(load_yaml(RAYSERVICE))


@pytest.fixture(scope="module")
def production() -> dict[str, Any]:
    return dict(load_yaml(PRODUCTION))


def _containers(service: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group name, group spec, its Ray container) for the head and every worker group."""
    cluster = service["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [(name, g, g["template"]["spec"]["containers"][0]) for name, g in groups]


# --------------------------------------------------------------------------- KubeRay


def test_rayservice_validates_against_the_kuberay_crd(
    validator: jsonschema.Draft7Validator, service: dict[str, Any]
) -> None:
    errors = sorted(validator.iter_errors(service), key=lambda e: list(e.absolute_path))
    assert not errors, [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "rayClusterConfig", "headGroupSpec", "rayStartParam"), {}),  # misspelt
        (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "maxReplicas"), "ten"),
        (("spec", "rayClusterConfig", "authOptions", "mode"), "password"),
    ],
)
def test_the_crd_validation_rejects_a_broken_manifest(
    validator: jsonschema.Draft7Validator, service: dict[str, Any], path: tuple[Any, ...],
    value: Any,
) -> None:
    broken = copy.deepcopy(service)
    node: Any = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert not validator.is_valid(broken)


def test_the_inline_serve_config_is_production_yaml(
    service: dict[str, Any], production: dict[str, Any]
) -> None:
    # Edit cluster/serve/production.yaml, then paste it under serveConfigV2.
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == production


def test_every_ray_container_runs_in_fast_mode_with_the_secrets_and_probes(
    service: dict[str, Any],
) -> None:
    for group, spec, container in _containers(service):
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert FAST_MODE.items() <= env.items(), group
        assert env["RAY_SERVE_HAPROXY_RETRY_ON"].split() == ["conn-failure", "empty-response"]
        assert {"secretRef": {"name": "pacore-secrets"}} in container["envFrom"], group
        assert container.get("readinessProbe") and container.get("livenessProbe"), group
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == 8000, group
        assert str(ports["metrics"]) == spec["rayStartParams"]["metrics-export-port"], group
    ray_version = service["spec"]["rayClusterConfig"]["rayVersion"]
    # The manifest names the Ray release the platform is built and tested on.
    assert ray_version == ray.__version__
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray_version}-py311" in dockerfile
    assert all(f"{k}={v}" in dockerfile for k, v in FAST_MODE.items())


def test_the_gpu_worker_group_fits_the_gpu_deployments(
    service: dict[str, Any], production: dict[str, Any]
) -> None:
    [gpu] = [c for g, _, c in _containers(service) if g == "gpu"]
    gpus_per_pod = int(gpu["resources"]["limits"]["nvidia.com/gpu"])
    app = production["applications"][0]
    for entry in app["args"]["self_hosted"]:
        model = SelfHostedModel.model_validate(entry)
        assert model.engine == "vllm"
        assert llm_config_kwargs(model)["engine_kwargs"]["tensor_parallel_size"] <= gpus_per_pod
        assert (model.num_gpus or 1) * model.tensor_parallel_size <= gpus_per_pod
    [embedder] = [d for d in app["deployments"] if d["name"] == "Embedder"]
    assert 0 < embedder["ray_actor_options"]["num_gpus"] <= gpus_per_pod
    assert app["args"]["settings"]["embedding_device"] == "cuda"


def test_draining_fits_in_the_pods_grace_period(
    service: dict[str, Any], production: dict[str, Any]
) -> None:
    deployments = production["applications"][0]["deployments"]
    longest = max(d.get("graceful_shutdown_timeout_s", 0) for d in deployments)
    # A direct-ingress replica stays reachable for the minimum draining period first.
    longest = max(longest, DIRECT_INGRESS_MIN_DRAINING_S + 5)
    for group, spec, container in _containers(service):
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert int(env["RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S"]) > longest, group
        if group != "head":
            assert spec["template"]["spec"]["terminationGracePeriodSeconds"] > longest, group
    assert service["spec"]["rayClusterDeletionDelaySeconds"] > longest
    for entry in deployments:
        if entry["name"] in ("Gateway", "Router") or entry["name"].startswith("Provider-"):
            assert entry["max_surge_percent"] == 100, entry["name"]


def _secrets() -> dict[str, dict[str, str]]:
    docs = yaml.safe_load_all((CLUSTER / "kuberay" / "secrets.example.yaml").read_text())
    return {d["metadata"]["name"]: d["stringData"] for d in docs}


def test_the_secrets_and_the_migration_job_match_the_service(service: dict[str, Any]) -> None:
    by_name = _secrets()
    cluster = service["spec"]["rayClusterConfig"]
    assert "auth_token" in by_name[cluster["authOptions"]["secretName"]]
    redis_ref = cluster["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert redis_ref["key"] in by_name[redis_ref["name"]]
    job = load_yaml(CLUSTER / "kuberay" / "db-migrate.yaml")
    [migrate] = job["spec"]["template"]["spec"]["containers"]
    [(_, _, head)] = [c for c in _containers(service) if c[0] == "head"]
    assert migrate["image"] == head["image"]
    assert migrate["command"] == ["pacore", "db", "upgrade"]
    assert migrate["envFrom"] == head["envFrom"]


# --------------------------------------------------------------------------- the Serve config


def test_production_yaml_is_a_serve_config_for_the_builder(production: dict[str, Any]) -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(production)
    [app] = schema.applications
    assert app.import_path == "deployments.app:build_app"
    args = PlatformArgs.model_validate(app.args)
    assert args.settings["mode"] == "production"
    assert args.settings["qdrant_url"].startswith("http")
    # No secret in the file: they come from each node's environment.
    for field in ("secret_key", "master_key", "database_url", "qdrant_api_key", "redis_url"):
        assert field not in args.settings
    assert all(p.api_key_env for p in args.shared_providers)


def test_every_override_names_a_deployment_of_the_built_graph(production: dict[str, Any]) -> None:
    from ray.serve._private.build_app import build_app as build_serve_app

    from deployments.app import build_app

    app = production["applications"][0]
    # vLLM deployments need the gpu extra to bind; their options live in `self_hosted`.
    args = {**app["args"], "self_hosted": []}
    built = build_serve_app(build_app(args), name=app["name"])
    graph = {d.name for d in built.deployments}
    overridden = {d["name"] for d in app["deployments"]}
    assert overridden == graph


def test_the_environment_the_secrets_provide_makes_production_settings(
    production: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pacore.security.secrets import load_secrets

    names = _secrets()["pacore-secrets"]
    values = {
        "PACORE_SECRET_KEY": secrets.token_urlsafe(48),
        "PACORE_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
        "PACORE_DATABASE_URL": "postgresql+asyncpg://pacore:pw@postgres:5432/pacore",
        "PACORE_REDIS_URL": "redis://:pw@redis:6379/0",
        "PACORE_QDRANT_API_KEY": "qdrant-key",
    }
    assert values.keys() <= names.keys()
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    settings = PlatformArgs.model_validate(production["applications"][0]["args"]).build_settings()
    assert isinstance(settings, Settings) and settings.mode == "production"
    assert settings.resolved_database_url.startswith("postgresql+asyncpg://")
    assert settings.redis_url and settings.qdrant_api_key is not None
    load_secrets(settings)  # raises unless both platform secrets are real


# --------------------------------------------------------------------------- VMs


def test_the_cluster_launcher_config_passes_rays_checks() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml(CLUSTER / "ray" / "cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))
    for remote, local in config["file_mounts"].items():
        if not local.startswith("~"):
            assert (CLUSTER.parent / local).is_dir(), remote
    env_script = (CLUSTER / "ray" / "pacore-env").read_text()
    assert all(f"{k}={v}" in env_script for k, v in FAST_MODE.items())
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("pacore-env ray start" in c for c in starts if "ray start" in c)
    assert all("--metrics-export-port=8080" in c for c in starts if "ray start" in c)


# --------------------------------------------------------------------------- Grafana


def test_the_dashboard_charts_every_platform_metric_and_no_other() -> None:
    dashboard = json.loads((CLUSTER / "grafana" / "pacore-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {re.sub(r"_(bucket|count|sum)$", "", m)
            for e in exprs for m in re.findall(r"ray_(pacore_\w+)", e)}
    assert used == set(DEFINITIONS)
    panel_ids = [p["id"] for p in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids))
