"""Four hosts on one machine: the gateway, the scheduler and two workers, each in a network
namespace of its own on one bridge (tests/e2e/netns.py), and a link cut mid-stream.

Every service binds its host's bridge address and dials the others' bridge addresses;
nothing listens on loopback or on the wildcard, which the test checks. The scheduler
binds beyond loopback, so it takes a shared secret, which the workers present. The
official ``openai`` client runs on the gateway's host (tests/e2e/multihost_client.py)
and streams greedy completions and a chat at once. While they stream, the bridge port
of the worker running them goes down (``ip link set ... down``): the scheduler hears no
more heartbeats, declares the replica dead and moves its sequences to the other worker,
and every stream must still end with exactly the offline engine's greedy tokens (fp32,
the near-tie rule of tests/worker_svc/hf_oracle.py) and no client error. The REST API
shows each streamed token through its text (the logprobs' tokens), so tokens are
compared as the texts of the offline token ids, each decoded alone as the gateway does.
The survivor must have sampled at least every token the clients got after the death
was declared. Then the link comes back and the cut worker must register again, once, as a new
replica. Every process has an unreachable egress proxy in its environment, which
nothing between the hosts may use.

Needs root and iproute2; elsewhere it skips with the reason, except in CI (``CI=true``),
where it fails. Every namespace it made (and with them every link) is gone afterwards.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from pagoda import LLM, SamplingParams
from pagoda.text.tokenizer import Tokenizer
from tests.deploy.tools import unavailable
from tests.e2e import netns
from tests.e2e.stack import LIVE, REPO, Gateway, Scheduler, Worker, tiny_model
from tests.worker_svc.hf_oracle import VOCAB_SIZE, assert_matches_reference, hf_greedy

CLIENT = REPO / "tests" / "e2e" / "multihost_client.py"
SECRET = "multihost-test-secret"
MAX_MODEL_LEN = 512
HEARTBEAT_INTERVAL_MS = 200
HEARTBEAT_TIMEOUT_MS = 1500
SCHEDULER_FLAGS = [
    "--shared-secret", SECRET, "--max-model-len", str(MAX_MODEL_LEN), "--seed", "0",
    "--heartbeat-interval-ms", str(HEARTBEAT_INTERVAL_MS),
    "--heartbeat-timeout-ms", str(HEARTBEAT_TIMEOUT_MS),
]  # fmt: skip
# An egress proxy in every process's environment, as a corporate network sets one: no
# traffic between pagoda's hosts may go through it (192.0.2.1 is TEST-NET-1, unreachable).
PROXY_ENV = {
    name: "http://192.0.2.1:3128"
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "grpc_proxy")
}
WORKER_FLAGS = ["--kv-cache-memory", "64MiB", "--threads", "1"]
# Long enough that every stream still runs for seconds after the cut (which comes as soon
# as each has its first tokens), well past the heartbeat timeout.
COMPLETIONS, CHATS = 7, 1
FEWEST, MOST = 420, 480
CHAT = [{"role": "user", "content": "Tell me a long story about the sea and its ships."}]


@dataclass(frozen=True)
class Expected:
    """The offline engine's uninterrupted greedy answer to one request."""

    request: dict[str, Any]  # as multihost_client.py takes it
    prompt: list[int]
    token_ids: list[int]
    token_texts: list[str]  # each token decoded alone, as the logprobs show it
    text: str


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("e2e-multihost"))


@pytest.fixture(scope="module")
def expected(model: Path) -> list[Expected]:
    rng = random.Random(12)
    requests: list[dict[str, Any]] = []
    prompts: list[Any] = []
    for _ in range(COMPLETIONS):
        ids = [rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randrange(6, 20))]
        requests.append({"kind": "completion", "prompt": ids, "max_tokens": 0})
        prompts.append({"prompt_token_ids": ids})
    offline = LLM(model, dtype="float32", max_model_len=MAX_MODEL_LEN, show_progress=False,
                  kv_cache_memory=64 * 2**20)  # fmt: skip
    tokenizer = offline.get_tokenizer()
    assert tokenizer is not None
    requests += [{"kind": "chat", "messages": CHAT, "max_tokens": 0} for _ in range(CHATS)]
    params = []
    for request in requests:
        request["max_tokens"] = rng.randint(FEWEST, MOST)
        params.append(
            SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True)
        )
    # One thread: a model this small runs many times slower on two threads than on one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outputs = offline.generate(prompts, params[:COMPLETIONS], use_tqdm=False)
        outputs += offline.chat([CHAT] * CHATS, params[COMPLETIONS:], use_tqdm=False)
    finally:
        torch.set_num_threads(threads)
    found = []
    for request, out in zip(requests, outputs, strict=True):
        ids = list(out.outputs[0].token_ids)
        texts = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        found.append(Expected(request, list(out.prompt_token_ids), ids, texts, out.outputs[0].text))
    return found


# -- the hosts -----------------------------------------------------------------------------


class Cluster:
    """The four hosts, the processes started on them, and the client's."""

    def __init__(self, lan: netns.Lan) -> None:
        self.lan = lan
        self.gw, self.sched = lan.add("gw"), lan.add("sched")
        self.hosts = {"wa": lan.add("wa"), "wb": lan.add("wb")}
        self._first = len(LIVE)  # every Process started from here on is ours
        self.clients: list[subprocess.Popen[str]] = []
        self.scheduler: Scheduler | None = None
        self.gateway: Gateway | None = None
        self.workers: dict[str, Worker] = {}

    def start(self, model: Path) -> None:
        sched, gw = self.sched, self.gw
        self.scheduler = Scheduler(
            model, extra=["--host", sched.ip, *SCHEDULER_FLAGS], env=PROXY_ENV,
            launcher=sched.launcher,
        )  # fmt: skip
        grpc_port = self.scheduler.grpc_addr.rsplit(":", 1)[1]
        step_addr = self.scheduler.step_addr
        assert step_addr.startswith(f"{sched.ip}:"), step_addr

        def worker(name: str) -> Worker:
            host = self.hosts[name]
            flags = [*WORKER_FLAGS, "--http-host", host.ip]
            env = {"PAGODA_SHARED_SECRET": SECRET, **PROXY_ENV}
            return Worker(model, step_addr, name, flags, env, launcher=host.launcher)

        with ThreadPoolExecutor(len(self.hosts)) as pool:
            loading = {name: pool.submit(worker, name) for name in self.hosts}
            self.gateway = Gateway(
                model, f"{sched.ip}:{grpc_port}", extra=["--host", gw.ip], ready=False,
                env=PROXY_ENV, launcher=gw.launcher,
            )  # fmt: skip
            self.workers = {name: future.result() for name, future in loading.items()}
        gw.call(self.gateway.wait_ready, 60.0, timeout=90)

    def scheduler_metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        assert self.scheduler is not None
        return parse_metrics(self.sched.get(f"http://{self.scheduler.http_addr}/metrics"))

    def running(self) -> dict[int, int]:
        """Sequences running per live replica, as the scheduler counts them."""
        samples = self.scheduler_metrics().get("pagoda_replica_running", [])
        return {int(labels["replica"]): int(value) for labels, value in samples}

    def worker_metric(self, name: str, metric: str) -> float:
        """A worker's metric, read on the worker's own host (its link may be down)."""
        worker = self.workers[name]
        http = re.findall(r"registered replica=\d+ epoch=\d+ http=(\S+)", "".join(worker.lines))
        assert http, worker.log
        found = parse_metrics(self.hosts[name].get(f"http://{http[-1]}/metrics"))
        return sum(value for _, value in found.get(metric, []))

    def start_client(self, requests: list[dict[str, Any]], spec: Path) -> Client:
        assert self.gateway is not None
        spec.write_text(json.dumps(requests))
        client = Client([*self.gw.launcher, str(CLIENT), self.gateway.base_url, str(spec)])
        self.clients.append(client.proc)
        return client

    def logs(self) -> str:
        processes = LIVE[self._first :]
        return "".join(f"\n--- {p.name}:\n{''.join(p.lines[-30:])}" for p in processes)

    def close(self) -> None:
        """Kill every process started here, then delete every namespace (and link)."""
        try:
            for proc in self.clients:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            for process in reversed(LIVE[self._first :]):
                if process.proc.poll() is None:
                    process.kill()
        finally:
            self.lan.close()


class Client:
    """multihost_client.py, its JSON lines read as they come."""

    def __init__(self, argv: list[str]) -> None:
        self.events: list[dict[str, Any]] = []
        self.other: list[str] = []
        self.ended = False  # its stdout is read to the end
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1, start_new_session=True, env={**os.environ, **PROXY_ENV},
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                try:
                    self.events.append(json.loads(line))
                except json.JSONDecodeError:
                    self.other.append(line)
                self._cond.notify_all()
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e["event"] == kind]

    def wait(self, check: Callable[[], bool], within: float, what: str) -> None:
        deadline = time.monotonic() + within
        with self._cond:
            while not check():
                left = deadline - time.monotonic()
                if self.ended:
                    raise AssertionError(f"the client exited before {what}:{self.output}")
                if left <= 0:
                    raise AssertionError(f"no {what} within {within} s:{self.output}")
                self._cond.wait(min(left, 0.2))

    @property
    def output(self) -> str:
        return "\n" + "".join(self.other[-40:])


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text as {sample name: [(labels, value)]}."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def wait_until(check: Callable[[], object], within: float, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {within} s{cluster.logs()}")
        time.sleep(0.05)


def replica_of(worker: Worker) -> int:
    found = re.findall(r"registered replica=(\d+)", "".join(worker.lines))
    assert found, worker.log
    return int(found[-1])


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    try:
        netns.check_available()
    except netns.Unavailable as exc:
        unavailable(f"cannot build hosts from network namespaces: {exc}")
    netns.remove_stale()
    lan = netns.Lan()
    try:
        made = Cluster(lan)
    except netns.Unavailable as exc:
        lan.close()
        unavailable(f"cannot build hosts from network namespaces: {exc}")
    except BaseException:
        lan.close()
        raise
    try:
        yield made
    finally:
        made.close()


# -- the checks ----------------------------------------------------------------------------


def assert_greedy(model: Path, want: Expected, got: dict[str, Any], label: str) -> None:
    """The stream delivered the offline answer: full length, no client error, and the
    same tokens, up to one near-tie flip (then nothing after it counts)."""
    assert got["error"] is None, f"{label} failed: {got['error']}"
    assert got["finish_reason"] == "length", f"{label} ended with {got['finish_reason']}"
    assert got["completion_tokens"] == len(want.token_ids), label
    assert len(got["tokens"]) == len(want.token_ids), (
        f"{label}: {len(got['tokens'])} tokens streamed, {len(want.token_ids)} expected"
    )
    if got["tokens"] == want.token_texts:
        assert got["text"] == want.text, f"{label}: the streamed text differs"
        return
    # The stream shows each token's text; a token whose text is neither HF's greedy
    # token's nor its runner-up's is a plain mismatch.
    [ref] = hf_greedy(model, [want.prompt], len(want.token_ids))
    decode = {t: text for t, text in zip(want.token_ids, want.token_texts, strict=True)}

    def text_of(token: int) -> str:
        return decode[token] if token in decode else token_text(model, token)

    ids = []
    for i, text in enumerate(got["tokens"]):
        first, second = ref.top2_ids[i]
        ids.append(first if text == text_of(first) else second if text == text_of(second) else -1)
    assert_matches_reference(ids, ref, label)


def token_text(model: Path, token: int) -> str:
    """A token decoded alone, as the gateway shows it in logprobs."""
    return tokenizer_of(model).decode([token], skip_special_tokens=False)


@functools.cache
def tokenizer_of(model: Path) -> Tokenizer:
    return Tokenizer.from_dir(model)


def listeners_only_on_bridge(cluster: Cluster) -> None:
    """Each host listens on its bridge address and nowhere else (no loopback, no wildcard)."""
    for host in (cluster.gw, cluster.sched, *cluster.hosts.values()):
        found = host.listening()
        assert found, f"nothing listens on {host.name}"
        stray = [a for a in found if not a.startswith(f"{host.ip}:")]
        assert not stray, f"{host.name} ({host.ip}) listens on {stray}"


# -- the test ------------------------------------------------------------------------------


def test_a_cut_link_moves_streams_to_the_other_worker_on_another_host(
    cluster: Cluster, model: Path, expected: list[Expected], tmp_path: Path
) -> None:
    cluster.start(model)
    listeners_only_on_bridge(cluster)
    wait_until(lambda: len(cluster.running()) == 2, 30, "two live replicas", cluster)
    replicas = {replica_of(w): name for name, w in cluster.workers.items()}

    client = cluster.start_client([e.request for e in expected], tmp_path / "requests.json")
    every = set(range(len(expected)))
    started = lambda: {e["index"] for e in client.of("started")} == every  # noqa: E731
    client.wait(started, 120, "tokens on every stream")

    # Cut the worker that runs the most of them.
    load = cluster.running()
    victim = max(load, key=lambda r: load[r])
    assert load[victim] > 0, f"no replica runs anything: {load}"
    victim_name = replicas[victim]
    [survivor_name] = [n for n in cluster.workers if n != victim_name]
    survivor_before = cluster.worker_metric(survivor_name, "pagoda_worker_tokens_total")
    cluster.lan.cut(cluster.hosts[victim_name])
    held = cluster.running().get(victim, 0)
    assert held > 0, f"the cut worker held nothing: {cluster.running()}"

    # No heartbeat crosses the cut link: the scheduler declares the replica dead.
    dead = rf"replica {victim} \(worker {victim_name}\) left: no heartbeat"
    assert cluster.scheduler is not None
    cluster.scheduler.wait_for(dead, timeout=30)
    declared = time.monotonic()
    client.wait(lambda: bool(client.of("done")), 120, "the end of every stream")
    results = {r["index"]: r for r in client.of("result")}
    assert client.proc.wait(30) == 0, client.output

    for i, want in enumerate(expected):
        assert_greedy(model, want, results[i], f"request {i} ({want.request['kind']})")

    # Every token that arrived after the death was declared was computed by the survivor
    # (the cut worker can reach nobody), among them the moved sequences' tokens.
    after = sum(n for r in results.values() for t, n in r["arrivals"] if t > declared)
    survivor_ran = cluster.worker_metric(survivor_name, "pagoda_worker_tokens_total")
    assert after >= held, f"only {after} tokens streamed after the death was declared"
    assert survivor_ran - survivor_before >= after, (
        f"the survivor sampled {survivor_ran - survivor_before} tokens after the cut; the "
        f"clients got {after} after the cut worker was declared dead"
    )
    # The moved streams paused while the death went unnoticed.
    pauses = sorted(r["longest_pause"] for r in results.values())
    assert sum(p > HEARTBEAT_TIMEOUT_MS / 2000 for p in pauses) >= held, pauses

    metrics = cluster.scheduler_metrics()
    states = {labels["state"]: value for labels, value in metrics["pagoda_replicas"]}
    assert states["DEAD"] == 1 and states["ACTIVE"] == 1, states

    # The link comes back: the cut worker learns that its replica is gone and registers
    # again, as a new replica.
    victim_worker = cluster.workers[victim_name]
    seen = len(victim_worker.lines)
    cluster.lan.mend(cluster.hosts[victim_name])

    def rejoined() -> list[int]:
        found = re.findall(r"registered replica=(\d+)", "".join(victim_worker.lines[seen:]))
        return [int(r) for r in found]

    wait_until(rejoined, 60, f"{victim_name} registered again", cluster)
    assert victim not in rejoined(), rejoined()
    wait_until(lambda: len(cluster.running()) == 2, 30, "two live replicas again", cluster)
    # Exactly once: Hellos sent into the dead link must not arrive late, each one
    # registering a new replica and ending the one before (a few heartbeats to show it).
    time.sleep(5 * HEARTBEAT_INTERVAL_MS / 1000)
    assert len(rejoined()) == 1, f"registered {len(rejoined())} times:\n{cluster.logs()}"

    # Everything made here goes: the processes, the namespaces, and with them every link.
    cluster.close()
    assert not cluster.lan.left(), f"namespaces left behind: {cluster.lan.left()}"
