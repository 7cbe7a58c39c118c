"""Reading the Kubernetes manifests of deploy/k8s the way the cluster and pagoda would.

``render`` runs ``kubectl kustomize`` on an overlay; the other helpers answer what a
container would really get: its environment (ConfigMaps and Secrets resolved), its
flags as the real ``pagoda`` parser reads them, where a port name or a Service port
leads, which volume a path lies on. ``promql_metric_names`` and ``exposed_names``
compare the metric names that the dashboard and the Prometheus Adapter rules use with
those a service's ``/metrics`` exposes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

from tests.deploy.tools import REPO, tool

K8S = REPO / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
COMPONENTS = sorted(p.name for p in (K8S / "components").iterdir() if p.is_dir())
ADAPTER_VALUES = K8S / "monitoring" / "prometheus-adapter-values.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "pagoda-dashboard.json"
NAMESPACE = "pagoda"

# What the images set (deploy/docker): the slim image carries the default model's card.
IMAGE_ENV = {
    "pagoda-gateway": {"PAGODA_MODEL_CARD": "/models/default-card"},
    "pagoda-scheduler": {"PAGODA_MODEL_CARD": "/models/default-card"},
}
# Placeholders for values the cluster fills in at run time.
SECRET_VALUE = "secret-from-a-kubernetes-secret"
POD_NAME = "pagoda-pod-0"

Obj = dict[str, Any]


# -- rendering ---------------------------------------------------------------------------


@functools.cache
def render_text(overlay: str) -> str:
    """``kubectl kustomize`` of one overlay (cached: every test reads the same render)."""
    done = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(f"kubectl kustomize {overlay} failed:\n{done.stderr}")
    return done.stdout


def render(overlay: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(render_text(overlay)) if doc]


def overlay_components(overlay: str) -> list[str]:
    """The component folder names an overlay's kustomization.yaml lists."""
    folder = K8S / "overlays" / overlay
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    return [(folder / c).resolve().name for c in spec.get("components", [])]


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def pod_spec(workload: Obj) -> Obj:
    return workload["spec"]["template"]["spec"]


def all_containers(workload: Obj) -> list[Obj]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -- what a container gets ---------------------------------------------------------------


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str
    optional: bool


@dataclass(frozen=True)
class FieldRef:
    path: str


EnvValue = str | SecretRef | FieldRef


def container_env(objs: list[Obj], container: Obj) -> dict[str, EnvValue]:
    """The container's environment as the kubelet builds it: envFrom first, then env
    (which wins), ConfigMap references resolved against the render."""
    env: dict[str, EnvValue] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"unexpected envFrom {source}"
        env.update(one(objs, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]
        if "secretKeyRef" in ref:
            s = ref["secretKeyRef"]
            env[var["name"]] = SecretRef(s["name"], s["key"], s.get("optional", False))
        elif "fieldRef" in ref:
            env[var["name"]] = FieldRef(ref["fieldRef"]["fieldPath"])
        elif "configMapKeyRef" in ref:
            c = ref["configMapKeyRef"]
            env[var["name"]] = one(objs, "ConfigMap", c["name"])["data"][c["key"]]
        else:
            raise AssertionError(f"unexpected valueFrom {ref}")
    return env


def image_name(container: Obj) -> str:
    return container["image"].rsplit("/", 1)[-1].split("@")[0].split(":")[0]


def process_env(objs: list[Obj], container: Obj) -> dict[str, str]:
    """What the process sees: the image's environment, then the container's, with
    placeholders for Secrets (optional ones absent) and the pod name."""
    env = dict(IMAGE_ENV.get(image_name(container), {}))
    for name, value in container_env(objs, container).items():
        if isinstance(value, SecretRef):
            if not value.optional:
                env[name] = SECRET_VALUE
        elif isinstance(value, FieldRef):
            assert value.path == "metadata.name", value
            env[name] = POD_NAME
        else:
            env[name] = value
    return env


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ with no PAGODA_* variable of this machine's, and ``env``."""
    with mock.patch.dict(os.environ):
        for name in [n for n in os.environ if n.startswith("PAGODA_")]:
            del os.environ[name]
        os.environ.update(env)
        yield


def parse_cli(argv: list[str], env: dict[str, str] | None = None) -> argparse.Namespace:
    """``pagoda ARGV`` parsed by the real parser, which reads its environment fallbacks
    while it is built; a usage error becomes an AssertionError with argparse's message."""
    from pagoda.entrypoints.cli import SERVICES, build_parser

    command = argv[0] if argv else None
    err = io.StringIO()
    with environment(env or {}), contextlib.redirect_stderr(err):
        parser = build_parser(command if command in SERVICES else None)
        try:
            return parser.parse_args(argv)
        except SystemExit:
            raise AssertionError(f"pagoda {argv} does not parse: {err.getvalue()}") from None


def cli_help(command: str) -> str:
    """``pagoda COMMAND --help``, unwrapped by a wide terminal."""
    from pagoda.entrypoints.cli import build_parser

    out = io.StringIO()
    with (
        environment({"COLUMNS": "1000"}),
        contextlib.redirect_stdout(out),
        contextlib.suppress(SystemExit),
    ):
        build_parser(command).parse_args([command, "--help"])
    return out.getvalue()


def cli_defaults(command: str, *required: str) -> argparse.Namespace:
    """The parser's defaults with no environment at all (``required``: flags it needs)."""
    return parse_cli([command, *required], {})


def container_args(objs: list[Obj], container: Obj) -> argparse.Namespace:
    """The container's ``pagoda`` command line (the image's entrypoint) as it parses
    inside the pod."""
    assert "command" not in container, f"{container['name']} overrides the pagoda entrypoint"
    return parse_cli(list(container.get("args", [])), process_env(objs, container))


def container_port(container: Obj, port: int | str) -> int:
    """A probe's or Service's target port (a name or a number) as a container port."""
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert named, f"{container['name']} has no port named {port!r}"
    return named[0]


def service_target(objs: list[Obj], address: str) -> tuple[Obj, Obj, int]:
    """Where ``host:port`` leads inside the namespace: the Service that host names, the
    Deployment whose pods it selects, and the container port it reaches there."""
    host, _, port = address.rpartition(":")
    name = host.split(".")[0]
    suffixes = ("", f".{NAMESPACE}", f".{NAMESPACE}.svc", f".{NAMESPACE}.svc.cluster.local")
    assert host in {name + s for s in suffixes}, f"{host} is not a Service of {NAMESPACE}"
    service = one(objs, "Service", name)
    ports = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    assert ports, f"Service {name} has no port {port}"
    selector = service["spec"]["selector"]
    pods = [
        d for d in of_kind(objs, "Deployment")
        if selects(selector, d["spec"]["template"]["metadata"]["labels"])
    ]  # fmt: skip
    assert len(pods) == 1, f"Service {name} selects {len(pods)} Deployments"
    target = ports[0].get("targetPort", ports[0]["port"])
    container = pod_spec(pods[0])["containers"][0]
    return service, pods[0], container_port(container, target)


def volume_of(workload: Obj, container: Obj, path: str) -> tuple[str, str, bool] | None:
    """(claim name, path inside the claim, read-only) of ``path`` in that container, or
    None when no PersistentVolumeClaim holds it."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    for mount in sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"])):
        root = mount["mountPath"].rstrip("/")
        if path != root and not path.startswith(root + "/"):
            continue
        claim = volumes[mount["name"]].get("persistentVolumeClaim")
        if claim is None:
            return None
        inside = str(Path(mount.get("subPath", "")) / path[len(root) :].lstrip("/"))
        read_only = mount.get("readOnly", False) or claim.get("readOnly", False)
        return claim["claimName"], inside, read_only
    return None


# -- metric names ------------------------------------------------------------------------

_PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan", "start", "end",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.:$])[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (Grafana variables allowed).

    Strings, label matchers, ranges, grouping label lists and variables go first; what
    is left that is an identifier, not a function call and not a keyword, is a metric
    name (as stored: a counter's ``_total`` and a histogram's ``_bucket`` included).
    """
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)
    s = re.sub(r"\[[^\[\]]*\]", " ", s)
    s = _GROUPING.sub(" ", s)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", " ", s)
    names = set()
    for match in _IDENT.finditer(s):
        name = match.group(0)
        if s[match.end() :].lstrip().startswith("("):
            continue  # a function, or an aggregation written before its grouping
        if name.lower() not in _PROMQL_KEYWORDS:
            names.add(name)
    return names


def grafana_metric_names(dashboard: dict) -> dict[str, set[str]]:
    """Metric names per expression of a dashboard: every panel target and every query
    variable (``label_values(METRIC, label)`` reads METRIC)."""
    exprs: list[str] = []

    def panels(items: list[dict]) -> Iterator[dict]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        exprs += [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
        exprs.append(match.group(1) if match else query)
    return {expr: promql_metric_names(expr) for expr in exprs}


def exposed_names(exposition: str) -> dict[str, str]:
    """Every name a scrape of this text stores in Prometheus, with its family's type.

    A counter ``x`` is stored as ``x_total``, a histogram as ``x_bucket``, ``x_sum`` and
    ``x_count``; families without samples yet (labelled metrics before their first
    observation) count by their type."""
    from prometheus_client.parser import text_string_to_metric_families

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                "summary": ["", "_sum", "_count"]}  # fmt: skip
    names: dict[str, str] = {}
    for family in text_string_to_metric_families(exposition):
        for suffix in suffixes.get(family.type, [""]):
            names[family.name + suffix] = family.type
        for sample in family.samples:
            names.setdefault(sample.name, family.type)
    return names


# -- Prometheus Adapter ------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterRule:
    series: str  # the metric name the rule's seriesQuery selects
    name: str  # the metric name the adapter serves
    rule: dict


def adapter_external_rules() -> list[AdapterRule]:
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    out = []
    for rule in values["rules"]["external"]:
        found = promql_metric_names(rule["seriesQuery"])
        assert len(found) == 1, f"seriesQuery names one metric: {rule['seriesQuery']}"
        series = found.pop()
        out.append(AdapterRule(series, _adapter_name(rule.get("name", {}), series), rule))
    return out


def _adapter_name(naming: dict, series: str) -> str:
    """The adapter's naming: ``matches`` finds, then Go's Regexp.ExpandString of ``as``
    (default ``$1`` with one capture group, else ``$0``)."""
    regex = re.compile(naming.get("matches", "^(.*)$"))
    found = regex.search(series)
    assert found, f"{regex.pattern} does not match {series}"
    template = naming.get("as") or ("$1" if regex.groups == 1 else "$0")
    return found.expand(re.sub(r"\$\{?(\w+)\}?", r"\\g<\1>", template))
