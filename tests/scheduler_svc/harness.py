"""Drives a Scheduler against PagedTokenWorkers, one per replica, and collects what streams out."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.sampling_params import SamplingParams
from pagoda.v1 import session_pb2, step_pb2
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.scheduler import Scheduler
from tests.scheduler_svc.paged_token_worker import PagedTokenWorker, reference_tokens

VOCAB = 512


@dataclass
class Stream:
    """What one sequence's client has received."""

    tokens: list[int] = field(default_factory=list)
    finished: session_pb2.SequenceFinished | None = None


@dataclass
class Cluster:
    config: SchedulerConfig
    vocab_size: int = VOCAB
    scheduler: Scheduler = field(init=False)
    workers: dict[int, PagedTokenWorker] = field(default_factory=dict)
    streams: dict[tuple[str, str, int], Stream] = field(default_factory=dict)
    plans: list[step_pb2.StepPlan] = field(default_factory=list)
    now: float = 0.0

    def __post_init__(self) -> None:
        self.scheduler = Scheduler(self.config)

    def join(self, replica_id: int, num_blocks: int) -> PagedTokenWorker:
        epoch = self.scheduler.join(replica_id, num_blocks)
        worker = PagedTokenWorker(num_blocks, self.config.block_size, self.vocab_size)
        worker.welcome(replica_id, epoch)
        self.workers[replica_id] = worker
        return worker

    def leave(self, replica_id: int) -> None:
        self.scheduler.leave(replica_id)
        del self.workers[replica_id]

    def submit(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams | None = None,
        *,
        owner: str = "",
        priority: int = 0,
        cache_salt: str = "",
        deadline_unix_ms: int = 0,
    ) -> None:
        params = params or SamplingParams(max_tokens=8, ignore_eos=True)
        self.now += 0.001
        submit = session_pb2.Submit(
            request_id=request_id,
            prompt_token_ids=prompt,
            sampling=params.to_proto(),
            priority=priority,
            cache_salt=cache_salt,
            deadline_unix_ms=deadline_unix_ms,
        )
        self.scheduler.add(submit, self.now, owner)
        for i in range(params.n):
            self.streams[(owner, request_id, i)] = Stream()

    def step(self, replica_id: int, *, check: bool = True) -> step_pb2.StepPlan | None:
        """One schedule -> execute -> update round on one replica."""
        plan = self.scheduler.schedule(replica_id, self.now)
        if plan is None:
            return None
        self._check_budgets(plan)
        self.plans.append(plan)
        result = self.workers[replica_id].execute(plan.SerializeToString())
        result = step_pb2.StepResult.FromString(result.SerializeToString())
        for owner, outputs in self.scheduler.update(result).items():
            self.deliver(owner, outputs)
        if check:
            self.scheduler.check_invariants()
        return plan

    def deliver(self, owner: str, outputs: session_pb2.StepOutputs) -> None:
        for rid, index, token in zip(
            outputs.request_ids, outputs.indices, outputs.token_ids, strict=True
        ):
            stream = self.streams[(owner, rid, index)]
            assert stream.finished is None, f"token after the end of {rid}/{index}"
            stream.tokens.append(token)
        for fin in outputs.finished:
            stream = self.streams[(owner, fin.request_id, fin.index)]
            assert stream.finished is None, f"{fin.request_id}/{fin.index} finished twice"
            stream.finished = fin

    def run(self, max_rounds: int = 10_000, check: bool = True) -> int:
        """Step every replica in turn until nothing is left; returns the rounds taken."""
        for rounds in range(1, max_rounds + 1):
            ran = [self.step(r, check=check) for r in list(self.workers)]
            if not self.scheduler.has_unfinished() and all(p is None for p in ran):
                return rounds
            assert any(p is not None for p in ran) or not self.workers, "no replica made progress"
        raise AssertionError(f"not finished after {max_rounds} rounds")

    def expected(self, prompt: list[int], params: SamplingParams, index: int = 0) -> list[int]:
        return reference_tokens(
            prompt,
            vocab_size=self.vocab_size,
            max_tokens=params.max_tokens,
            max_model_len=self.config.max_model_len,
            eos_token_ids=self.config.eos_token_ids,
            stop_token_ids=tuple(params.stop_token_ids),
            min_tokens=params.min_tokens,
            ignore_eos=params.ignore_eos,
            sample_index=index,
        )

    def _check_budgets(self, plan: step_pb2.StepPlan) -> None:
        cfg = self.config
        tokens = sum(n.num_new_tokens for n in plan.new_sequences) + sum(
            plan.running_num_new_tokens
        )
        assert tokens <= cfg.max_num_batched_tokens, f"step of {tokens} tokens"
        assert len(plan.new_sequences) + len(plan.running_seqs) <= cfg.max_num_seqs
