"""Runs the scheduler's StepPlans on a model: the worker's transport-free core.

The runner keeps every sequence's tokens, block table and sampling state between
steps and applies each plan's diff (new, running with new blocks, finished,
preempted). A step is one forward over a flattened batch — every scheduled token of
every sequence in one dimension, decodes first, then prefill chunks — followed by
logits for the rows that sample and one batched sampler call. A plan that does not
follow from the runner's state (another epoch, a step gap, an unknown sequence, a
block id out of range) is refused, never computed on stale state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pagoda.model_card.hf_config import eos_ids, hf_eos_token_ids, max_model_len_of
from pagoda.sampling_params import SamplingParams
from pagoda.v1 import step_pb2
from pagoda_kernels.dispatch import get_ops
from worker_svc import kv_cache
from worker_svc.cuda_graphs import DEFAULT_MAX_BATCH, DecodeGraphs
from worker_svc.layers import cpu_gemm
from worker_svc.layers.attention import AttentionMetadata
from worker_svc.loader import is_gguf, load_model
from worker_svc.memory import cap_onednn_cache, keep_freed_memory, release_freed_memory
from worker_svc.sampling import Sampler, prompt_logprobs

DEFAULT_CPU_KV_CACHE_MEMORY = 1 << 30  # 1 GiB
# Prompt length of the warm-up's dummy prefill (fewer when the model or the cache is
# smaller): enough to run every code path of a step, short enough to cost little on a CPU.
WARM_UP_TOKENS = 16

StepError = step_pb2.StepError


@dataclass(eq=False, slots=True)
class SequenceState:
    """What the worker knows of one sequence (also the sampler's view of it)."""

    seq: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    sample_index: int
    block_table: list[int]
    num_computed: int


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # rows of the flattened batch whose logits are sampled
    samplers: list[SequenceState]  # the sequences those rows belong to, in order
    prompt_rows: list[tuple[SequenceState, list[int], list[int]]]  # (seq, rows, target ids)


class PlanError(Exception):
    def __init__(self, kind: int, detail: str):
        super().__init__(detail)
        self.kind = kind


class ModelRunner:
    """``execute(StepPlan) -> StepResult`` over one model copy and its paged KV cache."""

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str | torch.dtype = "auto",
        device: str = "auto",
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        attention_backend: str = "auto",
        compile: bool = False,
        cuda_graphs: bool = False,
        cuda_graph_max_batch: int = DEFAULT_MAX_BATCH,
        show_progress: bool = True,
    ):
        self.device = _resolve_device(device)
        if self.device.type == "cpu":
            keep_freed_memory()
            cap_onednn_cache()
        self.ops = get_ops(attention_backend, self.device)
        self.model, self.config, self.dtype = load_model(
            model, dtype, self.device, self.ops, show_progress=show_progress
        )
        if self.device.type == "cpu" and not compile:
            cpu_gemm.pack_model(self.model, self.dtype)
        self.vocab_size = int(self.config["vocab_size"])
        self.eos_token_ids = _eos_token_ids(Path(model), self.config)
        self.max_model_len = _max_model_len(self.config, max_model_len)
        self.block_size = block_size
        shape = kv_cache.cache_shape(self.model, self.dtype)
        if num_kv_blocks is None:
            if kv_cache_memory is None:
                kv_cache_memory = (
                    kv_cache.gpu_cache_memory(self.device, gpu_memory_utilization)
                    if self.device.type == "cuda"
                    else DEFAULT_CPU_KV_CACHE_MEMORY
                )
            num_kv_blocks = kv_cache.blocks_for_memory(shape, block_size, kv_cache_memory)
        if num_kv_blocks < 1:
            raise ValueError("the KV cache budget holds no block: give more kv_cache_memory")
        self.num_kv_blocks = num_kv_blocks
        self.kv_cache = kv_cache.allocate(self.model, shape, num_kv_blocks, block_size, self.device)
        self.sampler = Sampler(self.vocab_size, self.eos_token_ids, self.ops.argmax)
        self._forward = self.model.forward
        if compile:
            # Freezing lets inductor treat weights as constants and pre-pack them for
            # oneDNN itself (the eager path packs them by hand instead).
            torch._inductor.config.freezing = True
            self._forward = torch.compile(self.model.forward)
        self.graphs = self._decode_graphs(cuda_graph_max_batch) if cuda_graphs else None
        self.seqs: dict[int, SequenceState] = {}
        self.replica_id = 0
        self.epoch = 0
        self.last_step = 0

    @property
    def kernels(self) -> str:
        """Which kernels the model runs on, for the log and ``/metrics``."""
        return self.ops.describe()

    def _decode_graphs(self, max_batch: int) -> DecodeGraphs:
        if self.device.type != "cuda" or self.ops.name != "triton":
            raise ValueError(
                "cuda_graphs needs a CUDA device and the triton attention backend "
                f"(have {self.device.type} and {self.ops.name})"
            )
        width = -(-self.max_model_len // self.block_size)
        return DecodeGraphs(self._forward, self.device, width, max_batch)

    # -- warm-up -----------------------------------------------------------------------

    @torch.inference_mode()
    def warm_up(self) -> int:
        """Run one dummy prefill and one decode through the whole step (forward, logits,
        sampler), so the first real step pays none of the costs of a first call: kernel
        compilation and autotuning on a GPU, a CUDA graph's capture, oneDNN's primitives,
        the allocator's growth. Returns the prompt length it used.

        The dummy sequence writes KV slots of its own blocks only, and a sequence given
        those blocks later writes each slot before it reads it. The runner's state
        (sequences, replica, step) is left as it was.
        """
        capacity = self.num_kv_blocks * self.block_size
        num_tokens = max(1, min(WARM_UP_TOKENS, self.max_model_len - 1, capacity - 1))
        state = SequenceState(
            seq=0,
            token_ids=[i % self.vocab_size for i in range(num_tokens)],
            num_prompt_tokens=num_tokens,
            params=SamplingParams(max_tokens=2),
            seed=0,
            sample_index=0,
            block_table=list(
                range(min(self.num_kv_blocks, -(-(num_tokens + 1) // self.block_size)))
            ),
            num_computed=0,
        )
        self._run([(state, num_tokens)], step_pb2.StepResult())
        if num_tokens + 1 <= min(capacity, self.max_model_len):
            self._run([(state, 1)], step_pb2.StepResult())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return num_tokens

    # -- protocol --------------------------------------------------------------------

    def reset(self, replica_id: int, epoch: int) -> None:
        """A (new) Welcome: forget every sequence; plans of this epoch count from step 1."""
        self.replica_id, self.epoch, self.last_step = replica_id, epoch, 0
        self.seqs.clear()

    @torch.inference_mode()
    def execute(self, plan: step_pb2.StepPlan) -> step_pb2.StepResult:
        start = time.perf_counter()
        result = step_pb2.StepResult(replica_id=plan.replica_id, epoch=plan.epoch, step=plan.step)
        was_busy = bool(self.seqs)
        try:
            batch = self._apply(plan)
        except PlanError as e:
            result.error.kind = e.kind
            result.error.detail = str(e)
            return result
        if batch:
            self._run(batch, result)
        elif was_busy and not self.seqs and self.device.type == "cpu":
            release_freed_memory()  # idle now: the last load's free heap goes back
        result.compute_seconds = time.perf_counter() - start
        return result

    # -- applying the plan -------------------------------------------------------------

    def _apply(self, plan: step_pb2.StepPlan) -> list[tuple[SequenceState, int]]:
        """Check the whole plan against the runner's state, then apply its diff.

        Nothing changes unless every check passes: a refused plan leaves the runner
        exactly as it was, ready for the scheduler's reset.
        """
        if (plan.replica_id, plan.epoch) != (self.replica_id, self.epoch):
            raise PlanError(
                StepError.STALE_EPOCH,
                f"plan for replica {plan.replica_id} epoch {plan.epoch}, "
                f"worker holds replica {self.replica_id} epoch {self.epoch}",
            )
        if plan.step != self.last_step + 1:
            raise PlanError(StepError.STEP_GAP, f"step {plan.step} after {self.last_step}")
        seqs = self.seqs
        for seq in (*plan.finished_seqs, *plan.preempted_seqs, *plan.running_seqs):
            if seq not in seqs:
                raise PlanError(StepError.UNKNOWN_SEQUENCE, f"sequence {seq} is unknown")
        dropped = {*plan.finished_seqs, *plan.preempted_seqs}
        grants = {g.seq: g.block_ids for g in plan.new_blocks}
        for new in plan.new_sequences:
            if new.seq in seqs and new.seq not in dropped:
                raise PlanError(StepError.INVALID_PLAN, f"sequence {new.seq} is already running")
            self._check_blocks(new.block_ids)
            self._check_fits(
                new.seq, new.num_cached_tokens, new.num_new_tokens,
                len(new.token_ids), len(new.block_ids),
            )  # fmt: skip
        for block_ids in grants.values():
            self._check_blocks(block_ids)
        for seq, num_new in zip(plan.running_seqs, plan.running_num_new_tokens, strict=True):
            state = seqs[seq]
            blocks = len(state.block_table) + len(grants.get(seq, ()))
            self._check_fits(seq, state.num_computed, num_new, len(state.token_ids), blocks)

        self.last_step = plan.step
        for seq in dropped:
            del seqs[seq]
        batch = []
        for new in plan.new_sequences:
            state = SequenceState(
                seq=new.seq,
                token_ids=list(new.token_ids),
                num_prompt_tokens=new.num_prompt_tokens,
                params=SamplingParams.from_proto(new.sampling),
                seed=new.seed,
                sample_index=new.sample_index,
                block_table=list(new.block_ids),
                num_computed=new.num_cached_tokens,
            )
            seqs[new.seq] = state
            batch.append((state, new.num_new_tokens))
        for seq, num_new in zip(plan.running_seqs, plan.running_num_new_tokens, strict=True):
            state = seqs[seq]
            if grants:
                state.block_table.extend(grants.get(seq, ()))
            batch.append((state, num_new))
        return batch

    def _check_fits(self, seq: int, computed: int, num_new: int, tokens: int, blocks: int) -> None:
        end = computed + num_new
        if num_new < 1 or end > tokens or end > blocks * self.block_size:
            raise PlanError(
                StepError.INVALID_PLAN,
                f"sequence {seq}: {num_new} tokens from {computed} do not fit "
                f"its {tokens} tokens and {blocks} blocks",
            )

    def _check_blocks(self, block_ids) -> None:
        if block_ids and (max(block_ids) >= self.num_kv_blocks):
            raise PlanError(
                StepError.INVALID_PLAN,
                f"block id {max(block_ids)} out of range ({self.num_kv_blocks} blocks)",
            )

    # -- running it ----------------------------------------------------------------------

    def _run(self, batch: list[tuple[SequenceState, int]], result: step_pb2.StepResult) -> None:
        inputs = self._prepare(batch)
        hidden = None
        if self.graphs is not None:
            hidden = self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
        if hidden is None:
            hidden = self._forward(inputs.input_ids, inputs.positions, inputs.meta)
        for state, num_new in batch:
            state.num_computed += num_new
        if inputs.prompt_rows:
            self._prompt_logprobs(hidden, inputs.prompt_rows, result)
        if not inputs.samplers:
            return
        logits = self.model.compute_logits(hidden.index_select(0, inputs.sample_rows))
        out = self.sampler(logits, inputs.samplers)
        for state, token, logprobs in zip(
            inputs.samplers, out.token_ids, out.logprobs, strict=True
        ):
            state.token_ids.append(token)
            if logprobs is not None:
                result.logprobs.add(seq=state.seq, positions=[logprobs])
        result.seqs.extend(state.seq for state in inputs.samplers)
        result.token_ids.extend(out.token_ids)

    def _prepare(self, batch: list[tuple[SequenceState, int]]) -> StepInputs:
        """The flattened inputs: decodes (one query token) first, then prefill chunks."""
        bs = self.block_size
        decodes = [(s, n) for s, n in batch if n == 1]
        prefills = [(s, n) for s, n in batch if n > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        samplers: list[SequenceState] = []
        sample_rows: list[int] = []
        prompt_rows: list[tuple[SequenceState, list[int], list[int]]] = []
        for state, _ in decodes:
            pos = state.num_computed
            input_ids.append(state.token_ids[pos])
            positions.append(pos)
            slots.append(state.block_table[pos // bs] * bs + pos % bs)
        query_start = [0]
        for state, num_new in prefills:
            start, end = state.num_computed, state.num_computed + num_new
            input_ids.extend(state.token_ids[start:end])
            positions.extend(range(start, end))
            table = state.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(query_start[-1] + num_new)
        row = 0
        for state, num_new in decodes + prefills:
            end = state.num_computed + num_new
            if end == len(state.token_ids):
                samplers.append(state)
                sample_rows.append(row + num_new - 1)
            want = state.params.prompt_logprobs
            if want is not None and state.num_computed + 1 < state.num_prompt_tokens:
                last = min(end, state.num_prompt_tokens - 1)
                rows = list(range(row, row + last - state.num_computed))
                targets = state.token_ids[state.num_computed + 1 : last + 1]
                prompt_rows.append((state, rows, targets))
            row += num_new
        device = self.device
        meta = AttentionMetadata(
            slot_mapping=_tensor(slots, device),
            num_decodes=len(decodes),
            decode_block_tables=self._block_tables(decodes, device),
            decode_context_lens=_tensor([s.num_computed + 1 for s, _ in decodes], device),
            prefill_block_tables=self._block_tables(prefills, device),
            prefill_query_start_loc=_tensor(query_start, device),
            prefill_context_lens=_tensor([s.num_computed + n for s, n in prefills], device),
            num_tokens=len(input_ids),
        )
        return StepInputs(
            input_ids=_tensor(input_ids, device),
            positions=_tensor(positions, device),
            meta=meta,
            sample_rows=_tensor(sample_rows, device),
            samplers=samplers,
            prompt_rows=prompt_rows,
        )

    def _block_tables(
        self, part: list[tuple[SequenceState, int]], device: torch.device
    ) -> torch.Tensor:
        """Each sequence's blocks up to its context length, padded with block 0."""
        bs = self.block_size
        needed = [-(-(s.num_computed + n) // bs) for s, n in part]
        width = max(needed, default=0)
        flat: list[int] = []
        for (state, _), count in zip(part, needed, strict=True):
            flat.extend(state.block_table[:count])
            flat.extend([0] * (width - count))
        return _tensor(flat, device).view(len(part), width)

    def _prompt_logprobs(self, hidden, prompt_rows, result: step_pb2.StepResult) -> None:
        for state, rows, targets in prompt_rows:
            if not rows:
                continue
            logits = self.model.compute_logits(hidden.index_select(0, _tensor(rows, self.device)))
            positions = prompt_logprobs(
                logits, _tensor(targets, self.device), state.params.prompt_logprobs
            )
            result.prompt_logprobs.add(seq=state.seq, positions=positions)


def _tensor(values: list[int], device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.long)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _eos_token_ids(path: Path, config: dict) -> list[int]:
    """The same EOS ids the model card gives the scheduler and the gateway."""
    if is_gguf(path):
        return eos_ids(config.get("eos_token_id"))
    return list(hf_eos_token_ids(path, config))


def _max_model_len(config: dict, requested: int | None) -> int:
    limit = max_model_len_of(config)
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len {requested} exceeds the model's {limit} positions")
    return requested
