"""The Kubernetes manifests (deploy/k8s), checked offline with real tools and the real CLI.

Every overlay renders with ``kubectl kustomize``, validates strictly against the
Kubernetes schemas of the oldest supported release and of the newest one
(kubernetes-validate), and passes checkov except for checks skipped with a written
reason. The wiring tests read the renders as the cluster would: each container's
flags go through the real ``pagoda`` parser with the environment its ConfigMaps and
Secrets give it, so a probe on the wrong port, a worker dialing the wrong Service port
or an environment variable no service reads fails here, not in a cluster.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from pagoda.model_card.card import MODEL_JSON
from tests.deploy import k8s
from tests.deploy.k8s import (
    OVERLAYS,
    Obj,
    SecretRef,
    all_containers,
    container_args,
    container_env,
    container_port,
    one,
    pod_spec,
    render,
    render_text,
    selects,
)
from tests.deploy.tools import tool

# Kubernetes releases the manifests support: 1.30 is the first with the preStop `sleep`
# action on by default (beta; alpha and off in 1.29); 1.37 is the newest schema that
# kubernetes-validate 1.37.0 ships.
OLDEST_KUBERNETES = "1.30.0"
NEWEST_KUBERNETES = "1.37.0"
# Custom resources kubernetes-validate has no schema for, and why that is acceptable.
CUSTOM_RESOURCES = {
    "ServiceMonitor": "a Prometheus Operator custom resource: kubernetes-validate ships the "
    "built-in Kubernetes schemas only; test_servicemonitors_scrape_every_service checks "
    "what it selects",
}
# checkov checks the manifests skip (each skip carries its reason in a checkov.io/skipN
# annotation; test_checkov_skips_carry_reasons checks them). A new skip is added here
# too, on purpose.
ACCEPTED_SKIPS = {"CKV_K8S_15", "CKV_K8S_43"}
# Deployment name -> the pagoda subcommand its service container runs.
SERVICES = {"pagoda-gateway": "gateway", "pagoda-scheduler": "scheduler",
            "pagoda-worker": "worker"}  # fmt: skip
IMAGES = {"gateway": {"pagoda-gateway"}, "scheduler": {"pagoda-scheduler"},
          "worker": {"pagoda-worker-cpu", "pagoda-worker-cuda"}}  # fmt: skip
# A worker that gets no release exits this long after its drain grace (docs/services.md).
WORKER_EXIT_MARGIN_S = 5


def with_component(name: str) -> list[str]:
    return [o for o in OVERLAYS if name in k8s.overlay_components(o)]


def service_container(objs, deployment: str) -> dict:
    return pod_spec(one(objs, "Deployment", deployment))["containers"][0]


def http_port(command: str, args) -> int:
    return args.port if command == "gateway" else args.http_port


# -- rendering -----------------------------------------------------------------------------


def test_every_overlay_and_component_is_rendered():
    assert {"cpu", "gpu"} <= set(OVERLAYS)
    used = {c for o in OVERLAYS for c in k8s.overlay_components(o)}
    assert used == set(k8s.COMPONENTS), f"components no overlay uses: {set(k8s.COMPONENTS) - used}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_into_the_pagoda_namespace(overlay):
    objs = render(overlay)
    kinds = {o["kind"] for o in objs}
    assert {"Namespace", "Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler",
            "PodDisruptionBudget", "NetworkPolicy"} <= kinds  # fmt: skip
    assert [o["metadata"]["name"] for o in k8s.of_kind(objs, "Namespace")] == [k8s.NAMESPACE]
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == k8s.NAMESPACE, obj["metadata"]["name"]
    assert set(SERVICES) == {d["metadata"]["name"] for d in k8s.of_kind(objs, "Deployment")}


# -- kubernetes-validate -------------------------------------------------------------------


def validate(overlay: str, version: str, tmp_path: Path) -> tuple[dict, dict]:
    """kubernetes-validate --strict on the render: (passed, unvalidated) objects keyed by
    kind/name; an object that fails fails the test with the tool's message."""
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(render_text(overlay))
    done = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", version, str(rendered)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    out = done.stdout + done.stderr
    errors = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert not errors and done.returncode == 0, "\n".join(errors) or out
    passed = set(re.findall(r"^INFO .* passed for resource (\S+) against", out, re.M))
    unvalidated = re.findall(r"^WARN .*Couldn't find schema for kind (\S+) with api version", out,
                             re.M)  # fmt: skip
    return passed, unvalidated


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, NEWEST_KUBERNETES])
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_validate_strict(overlay, version, tmp_path):
    objs = render(overlay)
    passed, unvalidated = validate(overlay, version, tmp_path)
    custom = [o for o in objs if o["kind"] in CUSTOM_RESOURCES]
    builtin = {f"{o['kind'].lower()}/{o['metadata']['name']}" for o in objs if o not in custom}
    assert builtin == passed, f"not validated: {builtin - passed}"
    # Only the known custom resources may go unvalidated (a typo in a built-in
    # apiVersion would land here too).
    assert sorted(unvalidated) == sorted(o["kind"] for o in custom)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_are_listed_as_not_schema_validated(overlay, tmp_path):
    _, unvalidated = validate(overlay, NEWEST_KUBERNETES, tmp_path)
    if not unvalidated:
        return
    objs = [o for o in render(overlay) if o["kind"] in CUSTOM_RESOURCES]
    listed = "; ".join(
        f"{', '.join(o['metadata']['name'] for o in objs if o['kind'] == kind)} "
        f"({kind}, {CUSTOM_RESOURCES[kind]})"
        for kind in sorted({o["kind"] for o in objs})
    )
    pytest.skip(f"not schema-validated: {listed}")


def test_releases_before_the_oldest_lack_the_prestop_sleep(tmp_path):
    """1.29's schema knows the sleep action but its feature gate is off; 1.28 rejects it."""
    rendered = tmp_path / "cpu.yaml"
    rendered.write_text(render_text("cpu"))
    done = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", "1.28.0", str(rendered)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0 and "'sleep' was unexpected" in done.stdout + done.stderr


# -- checkov -------------------------------------------------------------------------------


_checkov_reports: dict[str, dict] = {}


def checkov(overlay: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """checkov's JSON report of one render (once per overlay: it takes seconds to start)."""
    if overlay not in _checkov_reports:
        rendered = tmp_path_factory.mktemp("checkov") / f"{overlay}.yaml"
        rendered.write_text(render_text(overlay))
        done = subprocess.run(
            [tool("checkov"), "-f", str(rendered), "--framework", "kubernetes", "--compact",
             "-o", "json", "--skip-download"],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
        )  # fmt: skip
        try:  # the report is the one JSON document on stdout (notices may come first)
            _checkov_reports[overlay] = json.loads(done.stdout[done.stdout.index("{") :])
        except ValueError:
            raise AssertionError(f"checkov failed ({done.returncode}):\n{done.stderr}") from None
    return _checkov_reports[overlay]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_passes(overlay, tmp_path_factory):
    report = checkov(overlay, tmp_path_factory)
    results, summary = report["results"], report["summary"]
    failed = [f"{f['check_id']} {f['check_name']}: {f['resource']}"
              for f in results["failed_checks"]]  # fmt: skip
    assert not failed, "\n".join(failed)
    assert summary["parsing_errors"] == 0
    checked = {c["resource"] for c in results["passed_checks"] + results["skipped_checks"]}
    for obj in render(overlay):
        if obj["kind"] in {"Deployment", "Job"}:
            key = f"{obj['kind']}.{k8s.NAMESPACE}.{obj['metadata']['name']}"
            assert key in checked, f"checkov did not check {key}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_skips_carry_reasons(overlay, tmp_path_factory):
    skipped = checkov(overlay, tmp_path_factory)["results"]["skipped_checks"]
    for check in skipped:
        reason = check["check_result"].get("suppress_comment", "").strip()
        where = f"{check['check_id']} on {check['resource']}"
        assert len(reason.split()) >= 8, f"{where} is skipped without a written reason"
        assert check["check_id"] in ACCEPTED_SKIPS, f"{where}: a new skip ({reason})"


# -- wiring --------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_run_real_pagoda_commands(overlay):
    objs = render(overlay)
    for deployment, command in SERVICES.items():
        container = service_container(objs, deployment)
        args = container_args(objs, container)
        assert container["args"][0] == command, deployment
        assert args.func.__module__.split(".")[0] in {"gateway", "scheduler_svc", "worker_svc"}
        assert k8s.image_name(container) in IMAGES[command]
    for job in k8s.of_kind(objs, "Job"):
        for container in pod_spec(job)["containers"]:
            container_args(objs, container)  # parses, or fails with argparse's message


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_ports_are_the_cli_defaults(overlay):
    objs = render(overlay)
    for deployment, command in SERVICES.items():
        workload = one(objs, "Deployment", deployment)
        container = service_container(objs, deployment)
        args = container_args(objs, container)
        default = k8s.cli_defaults(command, *(["--model", "x"] if command == "scheduler" else []))
        port = http_port(command, args)
        assert port == http_port(command, default), f"{deployment} moved its probe port"
        probes = {kind: container[kind] for kind in
                  ("startupProbe", "livenessProbe", "readinessProbe")}  # fmt: skip
        for kind, probe in probes.items():
            path = "/ready" if kind == "readinessProbe" else "/health"
            assert probe["httpGet"]["path"] == path, f"{deployment} {kind}"
            assert container_port(container, probe["httpGet"]["port"]) == port, (
                f"{deployment} {kind} probes another port than the service's HTTP port {port}"
            )
        notes = workload["spec"]["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert int(notes["prometheus.io/port"]) == port, deployment
        assert notes["prometheus.io/path"] == "/metrics", deployment
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        expected = {"http": port}
        if command in {"gateway", "scheduler"}:
            expected["grpc"] = args.grpc_port
            assert args.grpc_port == default.grpc_port
        if command == "scheduler":
            expected["step"] = args.step_port
            assert args.step_port == default.step_port
        assert ports == expected, deployment


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_bind_beyond_loopback(overlay):
    """Kubelet probes, Services and Prometheus reach a pod on its pod IP."""
    objs = render(overlay)
    hosts = {
        "gateway": container_args(objs, service_container(objs, "pagoda-gateway")).host,
        "scheduler": container_args(objs, service_container(objs, "pagoda-scheduler")).host,
        "worker": container_args(objs, service_container(objs, "pagoda-worker")).http_host,
    }
    assert hosts == dict.fromkeys(hosts, "0.0.0.0")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_and_gateways_dial_the_scheduler_service(overlay):
    objs = render(overlay)
    scheduler = container_args(objs, service_container(objs, "pagoda-scheduler"))
    worker = container_args(objs, service_container(objs, "pagoda-worker"))
    gateway = container_args(objs, service_container(objs, "pagoda-gateway"))
    _, target, port = k8s.service_target(objs, worker.scheduler)
    assert target["metadata"]["name"] == "pagoda-scheduler" and port == scheduler.step_port
    _, target, port = k8s.service_target(objs, gateway.scheduler)
    assert target["metadata"]["name"] == "pagoda-scheduler" and port == scheduler.grpc_port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_service_reaches_both_apis(overlay):
    objs = render(overlay)
    gateway = container_args(objs, service_container(objs, "pagoda-gateway"))
    reached = {k8s.service_target(objs, f"pagoda-gateway:{p['port']}")[2]
               for p in one(objs, "Service", "pagoda-gateway")["spec"]["ports"]}  # fmt: skip
    assert reached == {gateway.port, gateway.grpc_port}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pagoda_variable_is_one_the_service_reads(overlay):
    objs = render(overlay)
    for deployment, command in SERVICES.items():
        text = k8s.cli_help(command)
        env = container_env(objs, service_container(objs, deployment))
        unknown = [n for n in env if n.startswith("PAGODA_") and not re.search(rf"\b{n}\b", text)]
        assert not unknown, f"{deployment} sets variables `pagoda {command}` never reads: {unknown}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_come_from_mounted_secrets(overlay):
    """The shared secret (and an API key, where one is set) reach the processes as files
    of a mounted Secret: never a ConfigMap, never an environment variable's value."""
    objs = render(overlay)
    assert not k8s.of_kind(objs, "Secret"), "secrets are created by the operator, not in git"
    for config in k8s.of_kind(objs, "ConfigMap"):
        held = [key for key in config.get("data", {}) if "SECRET" in key or "KEY" in key]
        assert not held, f"ConfigMap {config['metadata']['name']} holds {held}"
    sources = set()
    for deployment in ("pagoda-scheduler", "pagoda-worker", "pagoda-gateway"):
        pod = k8s.one(objs, "Deployment", deployment)["spec"]["template"]["spec"]
        container = service_container(objs, deployment)
        env = container_env(objs, container)
        assert not {"PAGODA_SHARED_SECRET", "PAGODA_API_KEY"} & set(env), deployment
        assert not any(isinstance(v, SecretRef) for v in env.values()), deployment
        for var, secret in (
            ("PAGODA_SHARED_SECRET_FILE", "pagoda-shared-secret"),
            ("PAGODA_API_KEY_FILE", "pagoda-api-key"),
        ):
            if var not in env:
                assert var == "PAGODA_API_KEY_FILE" or deployment == "pagoda-gateway", (
                    f"{deployment} has no {var}"
                )
                continue
            name, key = secret_file_source(pod, container, env[var])
            assert name == secret, f"{deployment}: {var} reads Secret {name}"
            if var == "PAGODA_SHARED_SECRET_FILE":
                sources.add((name, key))
    assert len(sources) == 1, f"the scheduler and the workers read different secrets: {sources}"


def secret_file_source(pod: dict, container: dict, path: str) -> tuple[str, str]:
    """The Secret and key a file path in the container comes from (via its mounts), and
    that the uid the pod runs as can read it: mode 0440 and fsGroup, no more."""
    mounts = [
        m for m in container.get("volumeMounts", [])
        if path.startswith(m["mountPath"].rstrip("/") + "/")
    ]  # fmt: skip
    assert len(mounts) == 1, f"{path} is on no single mount: {mounts}"
    mount = mounts[0]
    assert mount.get("readOnly") and "subPath" not in mount, mount
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert "secret" in volume, f"{path} is not on a Secret volume: {volume}"
    secret = volume["secret"]
    assert not secret.get("optional"), f"{path}: a missing Secret must stop the pod"
    assert secret.get("defaultMode") == 0o440, "readable by owner and group only"
    assert pod["securityContext"].get("fsGroup") == pod["securityContext"]["runAsUser"]
    key = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    return secret["secretName"], key


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_the_drain(overlay):
    objs = render(overlay)
    for deployment in SERVICES:
        workload = one(objs, "Deployment", deployment)
        container = service_container(objs, deployment)
        drain = container_args(objs, container).drain_grace
        pre_stop = container.get("lifecycle", {}).get("preStop")
        delay = 0 if pre_stop is None else pre_stop["sleep"]["seconds"]
        if pre_stop is not None:
            assert set(pre_stop) == {"sleep"}, "a preStop exec needs a shell the images lack"
        grace = pod_spec(workload)["terminationGracePeriodSeconds"]
        needed = delay + drain + WORKER_EXIT_MARGIN_S
        assert grace > needed, f"{deployment}: {grace} s do not cover {needed} s"
    gateway = service_container(objs, "pagoda-gateway")
    assert gateway["lifecycle"]["preStop"]["sleep"]["seconds"] > 0, (
        "a gateway must leave its Service's endpoints before it refuses requests"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_scheduler_is_one_replica_replaced_by_recreate(overlay):
    objs = render(overlay)
    scheduler = one(objs, "Deployment", "pagoda-scheduler")
    assert scheduler["spec"]["replicas"] == 1
    assert scheduler["spec"]["strategy"]["type"] == "Recreate"
    assert one(objs, "Deployment", "pagoda-gateway")["spec"]["replicas"] >= 2
    labels = scheduler["spec"]["template"]["metadata"]["labels"]
    for budget in k8s.of_kind(objs, "PodDisruptionBudget"):
        assert not selects(budget["spec"]["selector"]["matchLabels"], labels), (
            "a budget on the single scheduler either allows nothing or blocks node drains"
        )
    budgets = {b["metadata"]["name"]: b for b in k8s.of_kind(objs, "PodDisruptionBudget")}
    for name in ("pagoda-gateway", "pagoda-worker"):
        pods = one(objs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert selects(budgets[name]["spec"]["selector"]["matchLabels"], pods)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_hpa_scales_the_worker_deployment(overlay):
    objs = render(overlay)
    hpa = one(objs, "HorizontalPodAutoscaler", "pagoda-worker")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    worker = one(objs, "Deployment", target["name"])
    assert service_container(objs, target["name"])["args"][0] == "worker"
    assert "replicas" not in worker["spec"], "an apply would reset the HPA's worker count"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    scale_down = hpa["spec"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= 60
    [metric] = hpa["spec"]["metrics"]
    if "hpa-cpu-utilisation" in k8s.overlay_components(overlay):
        assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
        assert "cpu" in service_container(objs, target["name"])["resources"]["requests"]
        return
    assert metric["type"] == "External"
    assert metric["external"]["target"]["type"] == "AverageValue"
    served = {rule.name: rule for rule in k8s.adapter_external_rules()}
    name = metric["external"]["metric"]["name"]
    assert name in served, f"no Prometheus Adapter rule serves {name}"
    rule = served[name].rule
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
    assert rule["resources"]["overrides"]["namespace"]["resource"] == "namespace", (
        "the metric must be scoped to the HPA's namespace"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down(overlay):
    objs = render(overlay)
    for workload in k8s.of_kind(objs, "Deployment") + k8s.of_kind(objs, "Job"):
        name = workload["metadata"]["name"]
        spec = pod_spec(workload)
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in all_containers(workload):
            where = f"{name}/{container['name']}"
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), where
            if container in spec["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                for path in ("/cache", "/tmp"):
                    assert "emptyDir" in volumes[mounts[path]], f"{where} cannot write {path}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_threads_follow_its_cpu_limit(overlay):
    """The worker sizes its torch threads from its cgroup's CPU quota, so the pod must
    have a CPU limit of at least one core, and no --threads pinned beside it to drift
    from that limit."""
    objs = render(overlay)
    container = service_container(objs, "pagoda-worker")
    limit = container["resources"]["limits"]["cpu"]
    cores = float(limit[:-1]) / 1000 if limit.endswith("m") else float(limit)
    assert cores >= 1
    args = container.get("args", [])
    assert not any(a == "--threads" or a.startswith("--threads=") for a in args), args


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_workers(overlay):
    objs = render(overlay)
    worker = one(objs, "Deployment", "pagoda-worker")
    container = service_container(objs, "pagoda-worker")
    args = container_args(objs, container)
    limits = container["resources"]["limits"]
    if "gpu" not in k8s.overlay_components(overlay):
        assert k8s.image_name(container) == "pagoda-worker-cpu"
        assert "nvidia.com/gpu" not in limits and args.device in {"auto", "cpu"}
        return
    assert k8s.image_name(container) == "pagoda-worker-cuda"
    assert int(limits["nvidia.com/gpu"]) == 1
    assert args.dtype == "bfloat16" and args.device.startswith("cuda")
    spec = pod_spec(worker)
    assert spec["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    for other in ("pagoda-gateway", "pagoda-scheduler"):
        assert "nodeSelector" not in pod_spec(one(objs, "Deployment", other)), other


@pytest.mark.parametrize("overlay", with_component("model-pvc"))
def test_the_model_pvc_feeds_every_service_the_same_model(overlay):
    objs = render(overlay)
    [claim] = k8s.of_kind(objs, "PersistentVolumeClaim")
    claim_name = claim["metadata"]["name"]

    def on_claim(deployment: Obj, container: dict, path: str, read_only: bool) -> str:
        found = k8s.volume_of(deployment, container, path)
        assert found is not None, f"{container['name']}: {path} is not on a volume claim"
        name, inside, ro = found
        assert name == claim_name and ro == read_only, (container["name"], found)
        return inside

    worker = one(objs, "Deployment", "pagoda-worker")
    weights = on_claim(worker, service_container(objs, "pagoda-worker"),
                       str(container_args(objs, service_container(objs, "pagoda-worker")).model),
                       read_only=True)  # fmt: skip
    cards = set()
    for deployment in ("pagoda-gateway", "pagoda-scheduler"):
        container = service_container(objs, deployment)
        card = container_args(objs, container).model
        cards.add(on_claim(one(objs, "Deployment", deployment), container, card, True))
    [card] = cards
    [job] = k8s.of_kind(objs, "Job")
    [prepare] = pod_spec(job)["containers"]
    args = container_args(objs, prepare)
    assert prepare["args"][0] == "prepare-model"
    assert on_claim(job, prepare, args.model, read_only=False) == weights
    assert on_claim(job, prepare, str(args.out), read_only=False) == card
    # Every service waits for model.json, which prepare-model writes last.
    for deployment in SERVICES:
        workload = one(objs, "Deployment", deployment)
        [init] = pod_spec(workload)["initContainers"]
        waited = re.search(r'Path\("([^"]+)"\)', init["command"][-1]).group(1)
        assert on_claim(workload, init, waited, read_only=True) == f"{card}/{MODEL_JSON}"


@pytest.mark.parametrize("overlay", with_component("monitoring"))
def test_servicemonitors_scrape_every_service(overlay):
    objs = render(overlay)
    scraped = set()
    for monitor in k8s.of_kind(objs, "ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [s for s in k8s.of_kind(objs, "Service")
                    if selects(selector, s["metadata"].get("labels", {}))]  # fmt: skip
        assert len(services) == 1, f"{monitor['metadata']['name']} selects {len(services)}"
        [service] = services
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint.get("path", "/metrics") == "/metrics"
            [port] = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
            _, deployment, reached = k8s.service_target(
                objs, f"{service['metadata']['name']}:{port['port']}"
            )
            name = deployment["metadata"]["name"]
            command = SERVICES[name]
            args = container_args(objs, service_container(objs, name))
            assert reached == http_port(command, args), f"{name} metrics on another port"
            scraped.add(name)
    assert scraped == set(SERVICES)


def test_the_dashboard_reads_its_datasource_variable():
    dashboard = json.loads(k8s.DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(targets) >= 10
    for panel in dashboard["panels"]:
        for item in [panel, *panel.get("targets", [])]:
            if "datasource" in item:
                assert item["datasource"]["uid"] == "${datasource}", panel["title"]
    names = set().union(*(k8s.promql_metric_names(t["expr"]) for t in targets))
    wanted = {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "pagoda_replicas_live",
              "vllm:time_to_first_token_seconds_bucket", "pagoda_gateway_requests_total",
              "vllm:time_per_output_token_seconds_bucket", "pagoda_worker_step_seconds_bucket",
              "pagoda_worker_tokens_total"}  # fmt: skip
    assert wanted <= names, wanted - names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("sum(vllm:num_requests_waiting{namespace=\"$namespace\"})",
         {"vllm:num_requests_waiting"}),
        ("histogram_quantile(0.99, sum by (le) (rate(x_seconds_bucket{a=~\"b|c\"}"
         "[$__rate_interval])))", {"x_seconds_bucket"}),
        ("sum(rate(a_total[5m] offset 1h)) by (pod) / on(pod) group_left(node) b * 1e3",
         {"a_total", "b"}),
        ("max without (le) (c) and d unless e or f", {"c", "d", "e", "f"}),
        ("label_replace(g, \"dst\", \"$1\", \"src\", \"(.*)\")", {"g"}),
        ("rate(h[5m:1m]) > bool 0", {"h"}),
    ],
)  # fmt: skip
def test_promql_metric_names(expr, names):
    assert k8s.promql_metric_names(expr) == names


def test_adapter_naming_follows_go_expand():
    rule = {"name": {"matches": "^(.*)_total$", "as": "${1}_per_second"}}
    assert k8s._adapter_name(rule["name"], "x_total") == "x_per_second"
    assert k8s._adapter_name({}, "vllm:num_requests_waiting") == "vllm:num_requests_waiting"
    assert k8s._adapter_name({"matches": "^vllm:(.*)$"}, "vllm:q") == "q"
