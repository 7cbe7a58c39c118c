"""The scheduler service over real sockets: gRPC sessions in, ZeroMQ workers out.

Each test runs the service on ephemeral ports in its own event loop and drives it
with a grpc.aio session and with workers made of ZeroMQ DEALERs and the real
ModelRunner on a tiny random-weight Llama, in fp32, so the tokens a session streams
can be compared with the offline ``pagoda.LLM``'s greedy tokens.
"""

from __future__ import annotations

import asyncio
import urllib.request
from dataclasses import replace

import grpc
import pytest
import zmq
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagoda.v1 import PROTOCOL_VERSION, common_pb2, session_pb2, step_pb2
from scheduler_svc.replicas import ACTIVE, DEAD, DRAINING
from scheduler_svc.service import SERVICE_NAME
from tests.scheduler_svc.service_harness import (
    FAST_SETTINGS,
    KV_BLOCKS,
    GatewaySession,
    asynctest,
    greedy,
    prompts,
    running_service,
    wait_until,
    worker,
)

STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH


# -- registration ---------------------------------------------------------------------------


@asynctest
async def test_a_worker_registers_and_a_request_streams_the_offline_greedy_tokens(
    card, runners, check_greedy
):
    async with running_service(card) as running:
        w = worker(running, runners[0], card, "w0")
        try:
            await wait_until(lambda: w.registered, what="a Welcome")
            welcome = w.welcomes[0]
            cfg = welcome.config
            assert welcome.replica_id >= 1 and welcome.epoch >= 1
            assert (cfg.block_size, cfg.num_kv_blocks, cfg.max_model_len) == (16, KV_BLOCKS, 512)
            assert (cfg.max_num_seqs, cfg.max_num_batched_tokens) == (64, 2048)
            assert (cfg.heartbeat_interval_ms, cfg.heartbeat_timeout_ms) == (100, 1000)

            session = await running.session()
            model = session.opened.model
            assert session.opened.protocol_version == PROTOCOL_VERSION
            assert (model.identity, model.vocab_size, model.max_model_len) == (
                card.identity,
                card.vocab_size,
                512,
            )
            assert list(model.eos_token_ids) == list(card.eos_token_ids)
            ps = prompts(9, 40, 17)
            for i, p in enumerate(ps):
                await session.submit(f"r{i}", p, greedy(20))
            for i, p in enumerate(ps):
                await session.wait_finished(f"r{i}")
                check_greedy(p, session.output(f"r{i}"), 20)
                fin = session.finished[(f"r{i}", 0)]
                assert fin.reason == LENGTH
                assert (fin.num_prompt_tokens, fin.num_generated_tokens) == (len(p), 20)
            await wait_until(lambda: w.heartbeat_answers > 0, what="a heartbeat answer")
            await session.close()
        finally:
            w.kill()


@asynctest
async def test_workers_of_another_model_secret_block_size_or_protocol_are_refused(card, runners):
    settings = replace(FAST_SETTINGS, shared_secret="s3cret")
    cases = {
        "identity": dict(model_identity="0" * 64, shared_secret="s3cret"),
        "secret": dict(shared_secret="wrong"),
        "no-secret": dict(),
        "block-size": dict(block_size=32, shared_secret="s3cret"),
        "protocol": dict(protocol_version=PROTOCOL_VERSION + 1, shared_secret="s3cret"),
        "kv-blocks": dict(num_kv_blocks=8, shared_secret="s3cret"),
    }
    async with running_service(card, settings) as running:
        workers = {
            name: worker(running, runners[0], card, f"bad-{name}", **fields)
            for name, fields in cases.items()
        }
        try:
            await wait_until(lambda: all(w.refusals for w in workers.values()), what="refusals")
            reasons = {name: w.refusals[0].reason for name, w in workers.items()}
            assert all(w.refusals[0].fatal and not w.welcomes for w in workers.values())
            assert "model" in reasons["identity"]
            assert "secret" in reasons["secret"] and "secret" in reasons["no-secret"]
            assert "blocks of 32 tokens" in reasons["block-size"]
            assert "protocol" in reasons["protocol"]
            assert "cannot hold one sequence" in reasons["kv-blocks"]
            good = worker(running, runners[1], card, "good", shared_secret="s3cret")
            await wait_until(lambda: good.registered, what="the good worker's Welcome")
            good.kill()
            assert [r.state for r in (await running.stats()).replicas] == [ACTIVE]
        finally:
            for w in workers.values():
                w.kill()


# -- failures -------------------------------------------------------------------------------


@asynctest
async def test_a_refused_step_resets_the_replica_and_its_requests_finish_after_it_returns(
    card, runners, check_greedy
):
    async with running_service(card) as running:
        w = worker(running, runners[0], card, "w0")
        try:
            session = await running.session()
            p = prompts(23, seed=1)[0]
            await session.submit("r", p, greedy(30))
            await wait_until(lambda: len(session.output("r")) >= 5, what="five tokens")
            w.corrupt_next_step = True
            await session.wait_finished("r")
            assert len(w.resets) == 1 and "STEP_GAP" in w.resets[0].reason
            first = w.welcomes[0]
            # The Reset names the replica it ends, so a late one cannot end the next.
            assert (w.resets[0].replica_id, w.resets[0].epoch) == (first.replica_id, first.epoch)
            assert len(w.welcomes) == 2
            assert w.welcomes[1].replica_id != w.welcomes[0].replica_id
            assert w.welcomes[1].epoch > w.welcomes[0].epoch
            check_greedy(p, session.output("r"), 30)
            stats = await running.stats()
            assert [(r.replica_id, r.state) for r in stats.replicas] == [
                (w.welcomes[1].replica_id, ACTIVE)
            ]
            await session.close()
        finally:
            w.kill()


@asynctest
async def test_a_silent_replica_is_declared_dead_and_its_requests_finish_on_another(
    card, runners, check_greedy
):
    async with running_service(card) as running:
        a = worker(running, runners[0], card, "a", step_delay_s=0.02)
        b = None
        try:
            await wait_until(lambda: a.registered)
            session = await running.session()
            ps = prompts(11, 30, seed=2)
            for i, p in enumerate(ps):
                await session.submit(f"r{i}", p, greedy(40))
            await wait_until(lambda: len(session.output("r1")) >= 3, what="three tokens")
            b = worker(running, runners[1], card, "b")
            await wait_until(lambda: b.registered)
            a.kill()  # no Drain, no more heartbeats: a crash
            for i, p in enumerate(ps):
                await session.wait_finished(f"r{i}")
                check_greedy(p, session.output(f"r{i}"), 40)
            stats = await running.stats()
            states = {r.replica_id: r.state for r in stats.replicas}
            assert states == {a.welcomes[0].replica_id: DEAD, b.welcomes[0].replica_id: ACTIVE}
            assert b.new_sequences >= 2, "the re-queued sequences ran on b"
            await session.close()
        finally:
            a.kill()
            if b is not None:
                b.kill()


@asynctest
async def test_a_draining_worker_hands_its_requests_to_another_replica(card, runners, check_greedy):
    async with running_service(card) as running:
        a = worker(running, runners[0], card, "a", step_delay_s=0.02)
        b = None
        try:
            await wait_until(lambda: a.registered)
            session = await running.session()
            p = prompts(19, seed=10)[0]
            await session.submit("r", p, greedy(30))
            await wait_until(lambda: len(session.output("r")) >= 3)
            b = worker(running, runners[1], card, "b")
            await wait_until(lambda: b.registered)
            a.drain()
            await wait_until(lambda: b.new_sequences == 1, 5, "the hand-over")
            states = {r.replica_id: r.state for r in (await running.stats()).replicas}
            # Without a grace period the worker closes its socket right after its Drain:
            # the next plan may find it gone before the Drain is read (DEAD, "its worker
            # is unreachable"). Either way it is out, and its sequence moved.
            assert states[a.welcomes[0].replica_id] in (DRAINING, DEAD)
            assert a.welcomes[0].replica_id not in running.service.workers.table.live
            await session.wait_finished("r")
            check_greedy(p, session.output("r"), 30)
            await wait_until(lambda: len(running.service.workers.table.listed) == 1, 5)
            await session.close()
        finally:
            a.kill()
            if b is not None:
                b.kill()


@asynctest
async def test_a_hung_step_stalls_health_then_times_out_and_the_worker_comes_back(
    card, runners, check_greedy
):
    settings = replace(FAST_SETTINGS, stall_timeout_s=0.3, step_timeout_s=1.5)
    async with running_service(card, settings) as running:
        health = health_pb2_grpc.HealthStub(running.channel)

        async def status() -> int:
            check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            return (await health.Check(check)).status

        w = worker(running, runners[0], card, "w0")
        try:
            session = await running.session()
            p = prompts(15, seed=3)[0]
            await session.submit("r", p, greedy(25))
            await wait_until(lambda: len(session.output("r")) >= 2)
            w.hang()  # the step in hand never ends; heartbeats go on
            await wait_until(lambda: running.service.stalled, 5, "the stall judgement")
            assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
            await wait_until(lambda: not running.service.workers.table.live, 5, "the step timeout")
            stats = await running.stats()
            assert [r.state for r in stats.replicas] == [DEAD]
            await wait_until(lambda: not running.service.stalled, 2, "no stall without replicas")
            assert await status() == health_pb2.HealthCheckResponse.SERVING
            w.resume()  # it finds the Reset, registers again, and finishes the request
            await session.wait_finished("r")
            check_greedy(p, session.output("r"), 25)
            assert len(w.welcomes) == 2 and w.resets
            await session.close()
        finally:
            w.kill()


# -- replicas and sessions -----------------------------------------------------------------


@asynctest
async def test_two_replicas_share_the_queue(card, runners, check_greedy):
    async with running_service(card, max_num_seqs=3) as running:
        ws = [worker(running, runners[i], card, f"w{i}", step_delay_s=0.005) for i in range(2)]
        try:
            await wait_until(lambda: all(w.registered for w in ws))
            session = await running.session()
            ps = prompts(*range(5, 65, 10), seed=4)
            for i, p in enumerate(ps):
                await session.submit(f"r{i}", p, greedy(12))
            for i, p in enumerate(ps):
                await session.wait_finished(f"r{i}")
                check_greedy(p, session.output(f"r{i}"), 12)
            assert all(w.new_sequences >= 1 for w in ws), [w.new_sequences for w in ws]
            assert sum(w.new_sequences for w in ws) == len(ps)
            await session.close()
        finally:
            for w in ws:
                w.kill()


@asynctest
async def test_a_broken_session_aborts_its_requests_and_frees_their_blocks(card, runners):
    async with running_service(card) as running:
        w = worker(running, runners[0], card, "w0", step_delay_s=0.01)
        try:
            await wait_until(lambda: w.registered)
            doomed = await running.session("doomed")
            other = await running.session("other")
            for i, p in enumerate(prompts(40, 70, 100, seed=5)):
                await doomed.submit(f"r{i}", p, greedy(400, n=2))
            await other.submit("x", prompts(8, seed=6)[0], greedy(300))
            await wait_until(lambda: len(doomed.output("r2", 1)) >= 2)
            stats = await running.stats()
            assert stats.num_running == 7 and stats.num_sessions == 2
            doomed.cancel()
            await wait_until(lambda: running.service.core.num_running == 1, 5, "the abort")
            await other.abort("x")
            await wait_until(lambda: running.service.core.num_running == 0, 5, "the abort")
            stats = await running.stats()
            (replica,) = stats.replicas
            assert (stats.num_running, stats.num_waiting, stats.num_sessions) == (0, 0, 1)
            assert replica.num_free_blocks == replica.num_blocks and replica.kv_usage == 0
            assert ("x", 0) not in other.finished
            await other.close()
        finally:
            w.kill()


@asynctest
async def test_finish_sequence_ends_one_sample_and_returns_its_record(card, runners):
    async with running_service(card) as running:
        w = worker(running, runners[0], card, "w0")
        try:
            session = await running.session()
            await session.submit("r", prompts(10, seed=7)[0], greedy(30, n=2))
            await wait_until(lambda: len(session.output("r", 1)) >= 3)
            await session.finish("r", 1)
            await session.wait_finished("r", n=2)
            fin1, fin0 = session.finished[("r", 1)], session.finished[("r", 0)]
            assert fin1.reason == STOP and not fin1.HasField("stop_token_id")
            assert fin1.num_generated_tokens == len(session.output("r", 1)) < 30
            assert fin0.reason == LENGTH and fin0.num_generated_tokens == 30
            await session.close()
        finally:
            w.kill()


@asynctest
async def test_invalid_submits_are_rejected_and_a_wrong_version_cannot_open(card):
    async with running_service(card) as running:
        session = await running.session()
        await session.submit("long", [5] * 513, greedy(4))
        await session.submit("empty", [], greedy(4))
        await session.submit("dup", [5, 6], greedy(4))
        await session.submit("dup", [5, 6], greedy(4))
        await wait_until(lambda: {"long", "empty", "dup"} <= set(session.rejected))
        long = session.rejected["long"]
        assert long.reason == session_pb2.Rejected.INVALID
        assert "513 tokens" in long.message and "maximum context length is 512" in long.message
        assert session.rejected["empty"].reason == session_pb2.Rejected.INVALID
        assert "already running" in session.rejected["dup"].message
        assert not session.ended
        await session.close()

        bad = GatewaySession(running.stub)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await bad.open("old-gateway", version=PROTOCOL_VERSION + 7)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@asynctest
async def test_stats_health_and_metrics_speak_vllm_names(card, runners):
    async with running_service(card) as running:
        w = worker(running, runners[0], card, "w0")
        try:
            await wait_until(lambda: w.registered)
            session = await running.session()
            await session.submit("r", prompts(33, seed=8)[0], greedy(8))
            await session.wait_finished("r")
            health = health_pb2_grpc.HealthStub(running.channel)
            for name in ("", SERVICE_NAME):
                answer = await health.Check(health_pb2.HealthCheckRequest(service=name))
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            stats = await running.stats()
            assert stats.num_sessions == 1 and len(stats.replicas) == 1
            assert stats.replicas[0].num_blocks == KV_BLOCKS and stats.replicas[0].steps >= 8

            base = f"http://127.0.0.1:{running.addresses.http_port}"

            def get(path: str) -> tuple[int, str]:
                with urllib.request.urlopen(base + path, timeout=5) as reply:
                    return reply.status, reply.read().decode()

            assert (await asyncio.to_thread(get, "/health"))[0] == 200
            assert (await asyncio.to_thread(get, "/ready"))[0] == 200
            status, text = await asyncio.to_thread(get, "/metrics")
            assert status == 200
            model = f'model_name="{card.name}"'
            for line in (
                f"vllm:num_requests_waiting{{{model}}} 0.0",
                f"vllm:num_requests_running{{{model}}} 0.0",
                f"vllm:kv_cache_usage_perc{{{model}}} 0.0",
                f'vllm:cache_config_info{{block_size="16",enable_prefix_caching="True",'
                f'num_gpu_blocks="{KV_BLOCKS}"}} 1.0',
                'pagoda_replicas{state="ACTIVE"} 1.0',
                'pagoda_replicas{state="DEAD"} 0.0',
                "pagoda_sessions 1.0",
                "pagoda_scheduler_stalled 0.0",
                "pagoda_preemptions_total 0.0",
                "pagoda_waiting_prompt_tokens 0.0",
                f'pagoda_replica_kv_usage{{replica="{w.welcomes[0].replica_id}"}} 0.0',
                f'pagoda_replica_running{{replica="{w.welcomes[0].replica_id}"}} 0.0',
            ):
                assert line in text, line
            assert "pagoda_prefix_cache_hit_rate " in text
            assert "pagoda_step_seconds_count " in text
            count = next(x for x in text.splitlines() if x.startswith("pagoda_step_seconds_count"))
            assert float(count.split()[1]) >= 8
            await session.close()
        finally:
            w.kill()


@asynctest
async def test_a_gateway_that_falls_behind_is_cut_off_and_its_requests_aborted(card, runners):
    settings = replace(FAST_SETTINGS, session_queue_size=8)
    async with running_service(card, settings) as running:
        session = await running.session()
        await session.submit("r", prompts(5, seed=9)[0], greedy(8))
        await wait_until(lambda: running.service.core.num_waiting == 1)
        hub = running.service.sessions
        (sid,) = hub.sessions
        # A burst larger than the queue, delivered while the stream cannot drain it.
        for _ in range(20):
            hub.deliver({sid: session_pb2.StepOutputs()})
        assert not hub.sessions and running.service.core.num_waiting == 0
        await wait_until(lambda: session.ended)
        assert session.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # A gateway that stops reading: flow control blocks the handler's writes, the
        # queue fills, and the session ends; reading again, the gateway learns why.
        deaf = GatewaySession(running.stub)
        await deaf.open("deaf", read=False)
        (sid,) = hub.sessions
        big = session_pb2.StepOutputs(request_ids=["x"] * 50_000)
        for _ in range(500):
            if not hub.sessions:
                break
            hub.deliver({sid: big})
            await asyncio.sleep(0.002)
        assert not hub.sessions
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while True:
                await deaf.call.read()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@asynctest
async def test_every_session_learns_the_load_after_opened_and_when_it_changes(card, runners):
    """SchedulerLoad: the queue, the running sequences, the KV usage and the live
    replicas, sent by the tick (never the step loop) and only when they changed."""
    async with running_service(card) as running:
        session = await running.session()
        await wait_until(lambda: session.loads, what="the first load")
        assert session.loads[0] == session_pb2.SchedulerLoad()  # nothing yet, no replica
        await session.submit("r", prompts(40, seed=3)[0], greedy(200))
        await wait_until(lambda: session.loads[-1].num_waiting == 1, what="a waiting request")
        assert session.loads[-1].num_live_replicas == 0
        w = worker(running, runners[0], card, "w0")
        try:
            await wait_until(lambda: w.registered, what="a Welcome")
            w.hang()  # the request stays running, however fast the steps would be
            await wait_until(lambda: session.loads[-1].num_running == 1, what="running")
            load = session.loads[-1]
            assert (load.num_waiting, load.num_live_replicas) == (0, 1)
            assert 0 < load.kv_cache_usage < 1
            # A session that opens now is told the current load at once, after `opened`.
            late = await running.session("late")
            await wait_until(lambda: late.loads, what="the late session's load")
            assert late.loads[0].num_live_replicas == 1
            w.resume()
            await session.wait_finished("r")
            await wait_until(lambda: session.loads[-1].num_running == 0, what="the end")
            assert session.loads[-1].kv_cache_usage == 0.0
            # Only changes are sent: no two loads in a row are equal.
            assert all(a != b for a, b in zip(session.loads, session.loads[1:], strict=False))
            await late.close()
            await session.close()
        finally:
            w.kill()


@asynctest
async def test_a_burst_of_hellos_larger_than_one_drain_is_answered_in_full(card):
    # 150 workers say Hello at once with a protocol the scheduler refuses: every message
    # is read (the step port drains at most 64 a callback, then goes on), and the sends
    # of the refusals in between lose none of the messages that arrive meanwhile.
    async with running_service(card) as running:
        refused = await asyncio.to_thread(_hellos_refused, running.step_address, 150)
        assert refused == 150
        assert not (await running.stats()).replicas


def _hellos_refused(address: str, count: int) -> int:
    ctx = zmq.Context()
    socks = []
    try:
        for i in range(count):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, f"burst-{i}/main".encode())
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
            socks.append(sock)
        hello = step_pb2.Hello(protocol_version=PROTOCOL_VERSION + 1, worker_id="burst")
        for i, sock in enumerate(socks):
            hello.worker_id = f"burst-{i}"
            sock.send(step_pb2.WorkerMessage(hello=hello).SerializeToString())
        refused = 0
        for sock in socks:
            if sock.poll(20_000):
                msg = step_pb2.SchedulerMessage.FromString(sock.recv())
                refused += msg.WhichOneof("kind") == "refusal"
        return refused
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()
