from pagoda.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "result", "heartbeat", "drain")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    result: StepResult
    heartbeat: Heartbeat
    drain: Drain
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., result: _Optional[_Union[StepResult, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., drain: _Optional[_Union[Drain, _Mapping]] = ...) -> None: ...

class SchedulerMessage(_message.Message):
    __slots__ = ("welcome", "refusal", "plan", "heartbeat", "reset")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    refusal: Refusal
    plan: StepPlan
    heartbeat: Heartbeat
    reset: Reset
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., refusal: _Optional[_Union[Refusal, _Mapping]] = ..., plan: _Optional[_Union[StepPlan, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., reset: _Optional[_Union[Reset, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "worker_id", "model_identity", "vocab_size", "eos_token_ids", "max_model_len", "tp_rank", "tp_size", "num_kv_blocks", "block_size", "dtype", "device", "shared_secret")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SHARED_SECRET_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    worker_id: str
    model_identity: str
    vocab_size: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_model_len: int
    tp_rank: int
    tp_size: int
    num_kv_blocks: int
    block_size: int
    dtype: str
    device: str
    shared_secret: str
    def __init__(self, protocol_version: _Optional[int] = ..., worker_id: _Optional[str] = ..., model_identity: _Optional[str] = ..., vocab_size: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., max_model_len: _Optional[int] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ..., num_kv_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., shared_secret: _Optional[str] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("replica_id", "epoch", "tp_rank", "tp_rendezvous", "config")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    replica_id: int
    epoch: int
    tp_rank: int
    tp_rendezvous: str
    config: WorkerConfig
    def __init__(self, replica_id: _Optional[int] = ..., epoch: _Optional[int] = ..., tp_rank: _Optional[int] = ..., tp_rendezvous: _Optional[str] = ..., config: _Optional[_Union[WorkerConfig, _Mapping]] = ...) -> None: ...

class WorkerConfig(_message.Message):
    __slots__ = ("block_size", "num_kv_blocks", "max_num_batched_tokens", "max_num_seqs", "max_model_len", "heartbeat_interval_ms", "heartbeat_timeout_ms")
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    block_size: int
    num_kv_blocks: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    heartbeat_interval_ms: int
    heartbeat_timeout_ms: int
    def __init__(self, block_size: _Optional[int] = ..., num_kv_blocks: _Optional[int] = ..., max_num_batched_tokens: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., max_model_len: _Optional[int] = ..., heartbeat_interval_ms: _Optional[int] = ..., heartbeat_timeout_ms: _Optional[int] = ...) -> None: ...

class Refusal(_message.Message):
    __slots__ = ("reason", "fatal")
    REASON_FIELD_NUMBER: _ClassVar[int]
    FATAL_FIELD_NUMBER: _ClassVar[int]
    reason: str
    fatal: bool
    def __init__(self, reason: _Optional[str] = ..., fatal: _Optional[bool] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("worker_id", "replica_id", "epoch", "last_step")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    replica_id: int
    epoch: int
    last_step: int
    def __init__(self, worker_id: _Optional[str] = ..., replica_id: _Optional[int] = ..., epoch: _Optional[int] = ..., last_step: _Optional[int] = ...) -> None: ...

class Drain(_message.Message):
    __slots__ = ("worker_id", "grace_ms")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    GRACE_MS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    grace_ms: int
    def __init__(self, worker_id: _Optional[str] = ..., grace_ms: _Optional[int] = ...) -> None: ...

class Reset(_message.Message):
    __slots__ = ("reason", "replica_id", "epoch")
    REASON_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    reason: str
    replica_id: int
    epoch: int
    def __init__(self, reason: _Optional[str] = ..., replica_id: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class StepPlan(_message.Message):
    __slots__ = ("replica_id", "epoch", "step", "new_sequences", "running_seqs", "running_num_new_tokens", "new_blocks", "finished_seqs", "preempted_seqs")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NEW_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SEQS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_NUM_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_SEQS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTED_SEQS_FIELD_NUMBER: _ClassVar[int]
    replica_id: int
    epoch: int
    step: int
    new_sequences: _containers.RepeatedCompositeFieldContainer[NewSequence]
    running_seqs: _containers.RepeatedScalarFieldContainer[int]
    running_num_new_tokens: _containers.RepeatedScalarFieldContainer[int]
    new_blocks: _containers.RepeatedCompositeFieldContainer[BlockGrant]
    finished_seqs: _containers.RepeatedScalarFieldContainer[int]
    preempted_seqs: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, replica_id: _Optional[int] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., new_sequences: _Optional[_Iterable[_Union[NewSequence, _Mapping]]] = ..., running_seqs: _Optional[_Iterable[int]] = ..., running_num_new_tokens: _Optional[_Iterable[int]] = ..., new_blocks: _Optional[_Iterable[_Union[BlockGrant, _Mapping]]] = ..., finished_seqs: _Optional[_Iterable[int]] = ..., preempted_seqs: _Optional[_Iterable[int]] = ...) -> None: ...

class NewSequence(_message.Message):
    __slots__ = ("seq", "token_ids", "num_prompt_tokens", "sampling", "seed", "sample_index", "block_ids", "num_cached_tokens", "num_new_tokens", "lora_id", "structured_output")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LORA_ID_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_prompt_tokens: int
    sampling: _common_pb2.SamplingParams
    seed: int
    sample_index: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_cached_tokens: int
    num_new_tokens: int
    lora_id: str
    structured_output: _common_pb2.StructuredOutput
    def __init__(self, seq: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., num_prompt_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., sample_index: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ..., num_cached_tokens: _Optional[int] = ..., num_new_tokens: _Optional[int] = ..., lora_id: _Optional[str] = ..., structured_output: _Optional[_Union[_common_pb2.StructuredOutput, _Mapping]] = ...) -> None: ...

class BlockGrant(_message.Message):
    __slots__ = ("seq", "block_ids")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("replica_id", "epoch", "step", "seqs", "token_ids", "logprobs", "prompt_logprobs", "error", "compute_seconds")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    replica_id: int
    epoch: int
    step: int
    seqs: _containers.RepeatedScalarFieldContainer[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[SequenceLogprobs]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[SequenceLogprobs]
    error: StepError
    compute_seconds: float
    def __init__(self, replica_id: _Optional[int] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., seqs: _Optional[_Iterable[int]] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[SequenceLogprobs, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[SequenceLogprobs, _Mapping]]] = ..., error: _Optional[_Union[StepError, _Mapping]] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class SequenceLogprobs(_message.Message):
    __slots__ = ("seq", "positions")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    positions: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    def __init__(self, seq: _Optional[int] = ..., positions: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ...) -> None: ...

class StepError(_message.Message):
    __slots__ = ("kind", "detail")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_NONE: _ClassVar[StepError.Kind]
        STEP_GAP: _ClassVar[StepError.Kind]
        STALE_EPOCH: _ClassVar[StepError.Kind]
        UNKNOWN_SEQUENCE: _ClassVar[StepError.Kind]
        INVALID_PLAN: _ClassVar[StepError.Kind]
        EXECUTION_FAILED: _ClassVar[StepError.Kind]
    KIND_NONE: StepError.Kind
    STEP_GAP: StepError.Kind
    STALE_EPOCH: StepError.Kind
    UNKNOWN_SEQUENCE: StepError.Kind
    INVALID_PLAN: StepError.Kind
    EXECUTION_FAILED: StepError.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    kind: StepError.Kind
    detail: str
    def __init__(self, kind: _Optional[_Union[StepError.Kind, str]] = ..., detail: _Optional[str] = ...) -> None: ...
