"""Random interleavings of add / abort / finish / expire / join / leave / reset / drain /
step, with the clock moving, prefix affinity on or off and the queue bounded or not.

After every operation the scheduler's invariants hold (check_invariants, run by the
harness after each step and by the invariant below), no plan exceeds the token or
sequence budget (the harness checks each plan), every stream is a prefix of its
reference tokens (nothing lost, nothing repeated, nothing from a wrong block), and
once everything has finished or been aborted every block of every replica is free.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pagoda.sampling_params import SamplingParams
from pagoda.v1 import session_pb2
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.scheduler import QueueFull
from tests.scheduler_svc.harness import Cluster

# A few shared prefixes make prefix-cache hits, shared blocks and evictions common.
PREFIXES = [[], list(range(1, 9)), list(range(1, 9)) + [50, 51, 52, 53], list(range(40, 53))]


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        block_size=st.sampled_from([1, 2, 4, 8]),
        max_model_len=st.integers(8, 48),
        budget=st.integers(4, 40),
        max_num_seqs=st.integers(1, 6),
        policy=st.sampled_from(["fcfs", "priority"]),
        caching=st.booleans(),
        affinity=st.sampled_from([0.0, 0.005, 1.0, 1.0]),
        bounds=st.sampled_from([(None, None)] * 3 + [(4, None), (None, 60), (8, 90)]),
    )
    def setup(
        self, block_size, max_model_len, budget, max_num_seqs, policy, caching, affinity, bounds
    ):
        cfg = SchedulerConfig(
            max_model_len=max_model_len,
            block_size=block_size,
            max_num_batched_tokens=max(budget, max_num_seqs),
            max_num_seqs=max_num_seqs,
            eos_token_ids=(0, 1),
            policy=policy,
            enable_prefix_caching=caching,
            seed=0,
            max_waiting_requests=bounds[0],
            max_waiting_tokens=bounds[1],
            affinity_wait_s=affinity,
        )
        # A small vocabulary: EOS (0 and 1) comes up now and then.
        self.cluster = Cluster(cfg, vocab_size=40)
        self.min_blocks = -(-max_model_len // block_size)
        self.requests: dict[tuple[str, str], tuple[list[int], SamplingParams]] = {}
        self.cut_short: set[tuple[str, str, int]] = set()  # aborted or finished by the gateway
        self.counter = 0
        self.clock_ms = 0

    # -- membership ----------------------------------------------------------------

    @rule(replica=st.integers(0, 3), extra=st.integers(0, 24))
    def join(self, replica, extra):
        if replica not in self.cluster.workers:
            self.cluster.join(replica, self.min_blocks + extra)

    @precondition(lambda self: self.cluster.workers)
    @rule(data=st.data())
    def leave(self, data):
        self.cluster.leave(data.draw(st.sampled_from(sorted(self.cluster.workers))))

    @precondition(lambda self: self.cluster.workers)
    @rule(data=st.data())
    def drain(self, data):
        self.cluster.scheduler.drain(data.draw(st.sampled_from(sorted(self.cluster.workers))))

    @rule(seconds=st.sampled_from([0.001, 0.01, 2.0]))
    def tick(self, seconds):
        self.cluster.now += seconds

    @precondition(lambda self: self.cluster.workers)
    @rule(data=st.data())
    def reset(self, data):
        replica = data.draw(st.sampled_from(sorted(self.cluster.workers)))
        epoch = self.cluster.scheduler.reset(replica)
        self.cluster.workers[replica].welcome(replica, epoch)

    # -- requests --------------------------------------------------------------------

    @rule(
        prefix=st.sampled_from(PREFIXES),
        suffix=st.lists(st.integers(2, 39), max_size=20),
        n=st.integers(1, 3),
        max_tokens=st.one_of(st.none(), st.integers(1, 20)),
        min_tokens=st.integers(0, 3),
        ignore_eos=st.booleans(),
        priority=st.integers(-2, 2),
        owner=st.sampled_from(["", "gw"]),
        deadline=st.sampled_from([0, 0, 5, 50]),
    )
    def add(self, prefix, suffix, n, max_tokens, min_tokens, ignore_eos, priority, owner, deadline):
        prompt = (prefix + suffix)[: self.cluster.config.max_model_len] or [7]
        if max_tokens is not None:
            min_tokens = min(min_tokens, max_tokens)
        params = SamplingParams(
            n=n, max_tokens=max_tokens, min_tokens=min_tokens, ignore_eos=ignore_eos
        )
        rid = f"r{self.counter}"
        self.counter += 1
        scheduler = self.cluster.scheduler
        before = (scheduler.num_waiting, scheduler.num_waiting_tokens)
        try:
            self.cluster.submit(
                rid,
                prompt,
                params,
                owner=owner,
                priority=priority,
                deadline_unix_ms=self.clock_ms + deadline if deadline else 0,
            )
        except QueueFull:
            assert (scheduler.num_waiting, scheduler.num_waiting_tokens) == before
            cfg = self.cluster.config
            full_of_seqs = before[0] + n > (cfg.max_waiting_requests or before[0] + n)
            full_of_tokens = before[1] + n * len(prompt) > (cfg.max_waiting_tokens or 2**62)
            assert full_of_seqs or full_of_tokens
            return
        except ValueError:  # a request too large for the queue however empty
            assert (scheduler.num_waiting, scheduler.num_waiting_tokens) == before
            return
        self.requests[(owner, rid)] = (prompt, params)

    @rule(ms=st.integers(1, 30))
    def expire(self, ms):
        self.clock_ms += ms
        for owner, records in self.cluster.scheduler.expire(self.clock_ms).items():
            self.cluster.deliver(owner, session_pb2.StepOutputs(finished=records))
            for fin in records:
                self.cut_short.add((owner, fin.request_id, fin.index))

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def abort(self, data):
        owner, rid = data.draw(st.sampled_from(sorted(self.requests)))
        if self.cluster.scheduler.abort(rid, owner):
            for i in range(self.requests[(owner, rid)][1].n):
                self.cut_short.add((owner, rid, i))

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), index=st.integers(0, 2))
    def finish(self, data, index):
        owner, rid = data.draw(st.sampled_from(sorted(self.requests)))
        if self.cluster.scheduler.finish(rid, index, owner=owner) is not None:
            self.cut_short.add((owner, rid, index))

    # -- steps -----------------------------------------------------------------------

    @precondition(lambda self: self.cluster.workers)
    @rule(data=st.data(), times=st.integers(1, 4))
    def step(self, data, times):
        replica = data.draw(st.sampled_from(sorted(self.cluster.workers)))
        for _ in range(times):
            self.cluster.step(replica)

    @invariant()
    def consistent(self):
        if hasattr(self, "cluster"):
            self.cluster.scheduler.check_invariants()
            self.check_streams(complete=False)

    def check_streams(self, complete: bool) -> None:
        cluster = self.cluster
        for (owner, rid, index), stream in cluster.streams.items():
            prompt, params = self.requests[(owner, rid)]
            want = cluster.expected(prompt, params, index)
            assert stream.tokens == want[: len(stream.tokens)], f"{rid}/{index} diverged"
            if complete and (owner, rid, index) not in self.cut_short:
                assert stream.tokens == want and stream.finished is not None, f"{rid}/{index}"

    def teardown(self):
        if not hasattr(self, "cluster"):
            return
        cluster = self.cluster
        scheduler = cluster.scheduler
        if all(scheduler.replica(r).draining for r in cluster.workers):
            cluster.join(9, self.min_blocks)
        cluster.run()
        self.check_streams(complete=True)
        for replica in cluster.workers:
            blocks = cluster.scheduler.replica(replica).blocks
            assert blocks.num_free_blocks == blocks.num_blocks and not blocks.tables
        assert cluster.scheduler.num_waiting == 0 and cluster.scheduler.num_running == 0


SchedulerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_scheduler_state_machine = SchedulerMachine.TestCase
