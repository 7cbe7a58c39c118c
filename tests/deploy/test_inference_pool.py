"""The InferencePool of deploy/k8s/inference-pool, checked offline like the overlays.

kubernetes-validate has no schema for a custom resource, so the render is validated,
strictly (unknown fields rejected, as ``kubectl apply`` with server-side field
validation does), against the InferencePool CRD's schema kept in tests/deploy/schemas,
with the jsonschema of the deploy tools' environment. Then the wiring, read as the
cluster would: the pool selects the gateway pods of every overlay and nothing else,
and its target port is the port where the gateway container, as the real ``pagoda``
parser reads its flags and environment, serves the OpenAI API and /metrics.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.deploy import k8s
from tests.deploy.k8s import OVERLAYS, container_args, one, pod_spec, selects
from tests.deploy.tools import tool

POOL_DIR = k8s.K8S / "inference-pool"
CRD = Path(__file__).parent / "schemas" / "inferencepools.inference.networking.k8s.io-v1.yaml"

# Run by the deploy tools' python: validates each document of stdin (a JSON list of
# [schema, object] pairs) and prints one line per object, "ok" or the first error.
VALIDATE = textwrap.dedent("""
    import json, sys
    from jsonschema import Draft7Validator
    from jsonschema.exceptions import best_match
    for schema, obj in json.load(sys.stdin):
        error = best_match(Draft7Validator(schema).iter_errors(obj))
        where = error and "/".join(map(str, error.absolute_path))
        print("ok" if error is None else f"{where}: {error.message}")
""")


def pool_objects() -> list[dict]:
    done = subprocess.run(
        [tool("kubectl"), "kustomize", str(POOL_DIR)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def strict(schema: dict) -> dict:
    """The CRD schema with unknown fields refused wherever it lists the known ones."""
    out = {k: (strict(v) if isinstance(v, dict) else v) for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    return out


def crd_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: Kubernetes' own
    return schema


def validate(*objs: dict) -> list[str]:
    done = subprocess.run(
        [tool("python"), "-c", VALIDATE],
        input=json.dumps([[crd_schema(), obj] for obj in objs]),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.fixture(scope="module")
def pool() -> dict:
    objs = pool_objects()
    assert [o["kind"] for o in objs] == ["InferencePool"]
    return objs[0]


def test_the_pool_is_a_valid_v1_inference_pool_in_the_pagoda_namespace(pool):
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["metadata"]["namespace"] == k8s.NAMESPACE
    assert validate(pool) == ["ok"]
    # The CRD's CEL rule: a Service referent needs its port.
    ref = pool["spec"]["endpointPickerRef"]
    assert ref.get("kind", "Service") != "Service" or "number" in ref.get("port", {})


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda s: s.update(targetPort=s.pop("targetPorts")), "targetPort"),
        (lambda s: s["targetPorts"][0].update(number=0), "0 is less than the minimum"),
        (lambda s: s["targetPorts"].append({"number": 8001}), "is too long"),
        (lambda s: s["endpointPickerRef"].update(failureMode="Open"), "is not one of"),
        (lambda s: s["endpointPickerRef"].pop("name"), "'name' is a required property"),
        (lambda s: s["selector"].update(matchLabels={}), "should be non-empty"),
    ],
)
def test_the_schema_check_refuses_a_broken_pool(pool, change, complaint):
    broken = json.loads(json.dumps(pool))
    change(broken["spec"])
    [answer] = validate(broken)
    assert answer != "ok" and complaint in answer, answer


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pool_selects_the_gateways_on_the_port_of_their_api_and_metrics(pool, overlay):
    objs = k8s.render(overlay)
    selector = pool["spec"]["selector"]["matchLabels"]
    chosen = [d["metadata"]["name"] for d in k8s.of_kind(objs, "Deployment")
              if selects(selector, d["spec"]["template"]["metadata"]["labels"])]  # fmt: skip
    assert chosen == ["pagoda-gateway"]
    gateway = one(objs, "Deployment", "pagoda-gateway")
    [container] = pod_spec(gateway)["containers"]
    args = container_args(objs, container)
    [target] = pool["spec"]["targetPorts"]
    assert target["number"] == args.port
    assert any(p["containerPort"] == args.port for p in container["ports"])
    annotations = gateway["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(args.port)
    assert annotations["prometheus.io/path"] == "/metrics"
