"""Replicas that come and go, and load that must be bounded, over real sockets.

The scheduler service on ephemeral ports, driven by grpc.aio sessions and by workers
made of ZeroMQ DEALERs around the real ModelRunner (tiny random-weight Llama, fp32):
a graceful drain, the bounded queue, deadlines, zero capacity, and prefix-affinity
routing. Greedy outputs are compared with the offline ``pagoda.LLM``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagoda.v1 import common_pb2, session_pb2
from scheduler_svc.replicas import ACTIVE, DRAINING
from scheduler_svc.service import SERVICE_NAME
from tests.scheduler_svc.service_harness import (
    FAST_SETTINGS,
    KV_BLOCKS,
    asynctest,
    greedy,
    http_get,
    prompts,
    running_service,
    scrape,
    wait_until,
    worker,
)

ABORT = common_pb2.FINISH_REASON_ABORT
LENGTH = common_pb2.FINISH_REASON_LENGTH


# -- graceful drain -------------------------------------------------------------------------


@asynctest
async def test_a_draining_replica_finishes_its_requests_takes_no_new_ones_then_is_released(
    card, runners, check_greedy
):
    async with running_service(card) as running:
        a = worker(running, runners[0], card, "a", step_delay_s=0.02)
        b = None
        try:
            await wait_until(lambda: a.registered)
            session = await running.session()
            ps = prompts(14, 27, 9, seed=20)
            for i, p in enumerate(ps[:2]):
                await session.submit(f"r{i}", p, greedy(60))
            await wait_until(lambda: len(session.output("r1")) >= 3, what="three tokens")
            b = worker(running, runners[1], card, "b")
            await wait_until(lambda: b.registered)
            a.drain(grace_ms=20_000)
            rid_a = a.welcomes[0].replica_id
            await wait_until(lambda: running.service.core.replica(rid_a).draining, 5)
            states = {r.replica_id: r.state for r in (await running.stats()).replicas}
            assert states[rid_a] == DRAINING
            await session.submit("late", ps[2], greedy(10))
            for rid, p, n in (("r0", ps[0], 60), ("r1", ps[1], 60), ("late", ps[2], 10)):
                await session.wait_finished(rid)
                check_greedy(p, session.output(rid), n)
                assert session.finished[(rid, 0)].reason == LENGTH
            assert (a.new_sequences, b.new_sequences) == (2, 1), "nothing moved, late went to b"
            await wait_until(lambda: a.released.is_set(), 5, "the release")
            assert [(r.reason, r.replica_id) for r in a.resets] == [("drained", rid_a)]
            assert rid_a not in running.service.workers.table.live
            # Its heartbeats stopped with it: it is forgotten soon after.
            await wait_until(lambda: len(running.service.workers.table.listed) == 1, 5)
            await session.close()
        finally:
            a.kill()
            if b is not None:
                b.kill()


@asynctest
async def test_what_a_draining_replica_holds_when_its_grace_ends_moves_to_another(
    card, runners, check_greedy
):
    async with running_service(card) as running:
        a = worker(running, runners[0], card, "a", step_delay_s=0.03)
        b = None
        try:
            await wait_until(lambda: a.registered)
            session = await running.session()
            p = prompts(21, seed=21)[0]
            await session.submit("r", p, greedy(60))
            await wait_until(lambda: len(session.output("r")) >= 3)
            b = worker(running, runners[1], card, "b")
            await wait_until(lambda: b.registered)
            a.drain(grace_ms=300)
            await wait_until(lambda: a.released.is_set(), 5, "the end of the grace period")
            assert [r.reason for r in a.resets] == ["drained"]
            assert len(session.output("r")) < 60
            await session.wait_finished("r")
            check_greedy(p, session.output("r"), 60)
            assert b.new_sequences == 1, "the rest was recomputed on b"
            await session.close()
        finally:
            a.kill()
            if b is not None:
                b.kill()


# -- limits ---------------------------------------------------------------------------------


@asynctest
async def test_with_no_replica_requests_wait_in_the_bounded_queue_and_run_once_one_joins(
    card, runners, check_greedy
):
    async with running_service(card, max_waiting_requests=3, max_waiting_tokens=200) as running:
        health = health_pb2_grpc.HealthStub(running.channel)
        session = await running.session()
        ps = prompts(40, 50, 8, 130, seed=22)
        await session.submit("a", ps[0], greedy(6))
        await session.submit("b", ps[1], greedy(6, n=2))
        await wait_until(lambda: running.service.core.num_waiting == 3)
        started = time.monotonic()
        await session.submit("full", ps[2], greedy(6))
        await wait_until(lambda: "full" in session.rejected, 2, "the refusal")
        assert time.monotonic() - started < 1, "refused at once"
        full = session.rejected["full"]
        assert full.reason == session_pb2.Rejected.QUEUE_FULL and full.retry_after_s >= 1
        assert "3 sequences waiting, at most 3" in full.message
        await session.submit("huge", [5] * 300, greedy(6))  # can never fit 200 tokens
        await wait_until(lambda: "huge" in session.rejected, 2)
        assert session.rejected["huge"].reason == session_pb2.Rejected.INVALID

        # Zero capacity: ready and serving, the requests simply wait.
        await asyncio.sleep(0.5)
        assert not running.service.stalled
        check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
        assert (await asyncio.to_thread(http_get, running.addresses.http_port, "/ready"))[0] == 200
        text = await scrape(running)
        for line in ("pagoda_capacity_blocks 0.0", "pagoda_replicas_live 0.0",
                     f'vllm:num_requests_waiting{{model_name="{card.name}"}} 3.0',
                     "pagoda_waiting_prompt_tokens 140.0"):  # fmt: skip
            assert line in text, line

        w = worker(running, runners[0], card, "w")
        try:
            for rid, p, n in (("a", ps[0], 1), ("b", ps[1], 2)):
                await session.wait_finished(rid, n)
                for i in range(n):
                    check_greedy(p, session.output(rid, i), 6)
            await session.submit("now", ps[3], greedy(6))  # room again (130 tokens)
            await session.wait_finished("now")
            text = await scrape(running)
            assert f"pagoda_capacity_blocks {KV_BLOCKS}.0" in text
            assert "pagoda_replicas_live 1.0" in text
        finally:
            w.kill()
        await session.close()


@asynctest
async def test_requests_past_their_deadline_end_with_an_abort_record(card, runners):
    settings = replace(FAST_SETTINGS, request_timeout_s=0.6)
    async with running_service(card, settings, max_num_seqs=1) as running:
        w = worker(running, runners[0], card, "w", step_delay_s=0.02)
        try:
            session = await running.session()
            ps = prompts(12, 10, 11, seed=23)
            soon = int(time.time() * 1000) + 400
            await session.submit("running", ps[0], greedy(400), deadline_unix_ms=soon)
            await session.submit("waiting", ps[1], greedy(400), deadline_unix_ms=soon)
            await session.submit("default", ps[2], greedy(400))  # the server's 0.6 s
            await wait_until(lambda: len(session.output("running")) >= 2)
            for rid in ("running", "waiting"):
                await session.wait_finished(rid, timeout=5)
            fin = session.finished[("running", 0)]
            assert fin.reason == ABORT and 0 < fin.num_generated_tokens < 400
            assert fin.num_generated_tokens == len(session.output("running"))
            assert session.finished[("waiting", 0)].reason == ABORT
            await session.wait_finished("default", timeout=5)
            assert session.finished[("default", 0)].reason == ABORT
            core = running.service.core
            await wait_until(lambda: core.num_running == 0 and not core.has_unfinished(), 5)
            (replica,) = (await running.stats()).replicas
            assert replica.num_free_blocks == replica.num_blocks
            await session.close()
        finally:
            w.kill()


# -- prefix-affinity routing ----------------------------------------------------------------


@asynctest
async def test_a_request_goes_to_the_replica_caching_its_prefix_even_when_another_asks_first(
    card, runners, check_greedy
):
    async with running_service(card, affinity_wait_s=5.0) as running:
        a = worker(running, runners[0], card, "a")
        b = None
        try:
            await wait_until(lambda: a.registered)
            session = await running.session()
            system = prompts(96, seed=24)[0]  # 6 blocks of 16
            ps = [system + s for s in prompts(3, 5, seed=25)]
            await session.submit("warm", system + [7], greedy(2))
            await session.wait_finished("warm")
            b = worker(running, runners[1], card, "b")
            await wait_until(lambda: b.registered)
            # a steps slowly, so that b, idle, is the one that sees each submit first.
            a.step_delay_s = 0.3
            await session.submit("busy", ps[0], greedy(8))
            await wait_until(lambda: len(session.output("busy")) >= 1)
            assert (a.new_sequences, b.new_sequences) == (2, 0)
            await session.submit("shared", ps[1], greedy(8))
            await session.submit("other", prompts(20, seed=26)[0], greedy(4))
            await session.wait_finished("other")
            assert b.new_sequences == 1, "b took the request nobody caches at once"
            await session.wait_finished("shared")
            await session.wait_finished("busy")
            assert (a.new_sequences, b.new_sequences) == (3, 1), "shared ran on a"
            assert session.finished[("shared", 0)].num_cached_tokens == 96
            check_greedy(ps[1], session.output("shared"), 8)
            check_greedy(ps[0], session.output("busy"), 8)
            rid_a = a.welcomes[0].replica_id
            stats = {r.replica_id: r for r in (await running.stats()).replicas}
            assert stats[rid_a].state == ACTIVE and stats[rid_a].prefix_cache_hit_rate > 0
            text = await scrape(running)
            rate = f'pagoda_replica_prefix_cache_hit_rate{{replica="{rid_a}"}} '
            assert rate in text and 'pagoda_replica_prefix_cache_hit_rate{replica="' in text
            await session.close()
        finally:
            a.kill()
            if b is not None:
                b.kill()


# -- flags ----------------------------------------------------------------------------------


def test_the_limit_flags_and_their_environment_fallbacks(monkeypatch, model_dir):
    import argparse

    from scheduler_svc import server

    for name in ("PAGODA_MAX_WAITING_REQUESTS", "PAGODA_MAX_WAITING_TOKENS",
                 "PAGODA_REQUEST_TIMEOUT", "PAGODA_AFFINITY_WAIT_MS"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)

    def build(*argv: str):
        parser = argparse.ArgumentParser()
        server.add_arguments(parser)
        _, config, settings = server.build(parser.parse_args(["--model", str(model_dir), *argv]))
        return config, settings

    config, settings = build()
    assert (config.max_waiting_requests, config.max_waiting_tokens) == (1024, 1_048_576)
    assert (config.affinity_wait_s, settings.request_timeout_s) == (0.2, 0.0)
    config, settings = build("--max-waiting-requests", "0", "--max-waiting-tokens", "0",
                             "--affinity-wait-ms", "0", "--request-timeout", "2.5")  # fmt: skip
    assert (config.max_waiting_requests, config.max_waiting_tokens) == (None, None)
    assert (config.affinity_wait_s, settings.request_timeout_s) == (0.0, 2.5)
    monkeypatch.setenv("PAGODA_MAX_WAITING_REQUESTS", "7")
    monkeypatch.setenv("PAGODA_MAX_WAITING_TOKENS", "900")
    monkeypatch.setenv("PAGODA_REQUEST_TIMEOUT", "30")
    monkeypatch.setenv("PAGODA_AFFINITY_WAIT_MS", "50")
    config, settings = build()
    assert (config.max_waiting_requests, config.max_waiting_tokens) == (7, 900)
    assert (config.affinity_wait_s, settings.request_timeout_s) == (0.05, 30.0)
