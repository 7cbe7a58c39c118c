from pagoda.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GatewayMessage(_message.Message):
    __slots__ = ("open", "submit", "abort", "finish")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    submit: Submit
    abort: Abort
    finish: FinishSequence
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., submit: _Optional[_Union[Submit, _Mapping]] = ..., abort: _Optional[_Union[Abort, _Mapping]] = ..., finish: _Optional[_Union[FinishSequence, _Mapping]] = ...) -> None: ...

class SchedulerUpdate(_message.Message):
    __slots__ = ("opened", "outputs", "rejected", "load")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    outputs: StepOutputs
    rejected: Rejected
    load: SchedulerLoad
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., outputs: _Optional[_Union[StepOutputs, _Mapping]] = ..., rejected: _Optional[_Union[Rejected, _Mapping]] = ..., load: _Optional[_Union[SchedulerLoad, _Mapping]] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("protocol_version", "gateway_id")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    gateway_id: str
    def __init__(self, protocol_version: _Optional[int] = ..., gateway_id: _Optional[str] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("protocol_version", "session_id", "model")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    session_id: str
    model: _common_pb2.ModelInfo
    def __init__(self, protocol_version: _Optional[int] = ..., session_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class SchedulerLoad(_message.Message):
    __slots__ = ("num_waiting", "num_running", "kv_cache_usage", "num_live_replicas")
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_LIVE_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    num_waiting: int
    num_running: int
    kv_cache_usage: float
    num_live_replicas: int
    def __init__(self, num_waiting: _Optional[int] = ..., num_running: _Optional[int] = ..., kv_cache_usage: _Optional[float] = ..., num_live_replicas: _Optional[int] = ...) -> None: ...

class Submit(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "priority", "deadline_unix_ms", "cache_salt", "lora_id", "structured_output")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    LORA_ID_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    priority: int
    deadline_unix_ms: int
    cache_salt: str
    lora_id: str
    structured_output: _common_pb2.StructuredOutput
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., priority: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ..., cache_salt: _Optional[str] = ..., lora_id: _Optional[str] = ..., structured_output: _Optional[_Union[_common_pb2.StructuredOutput, _Mapping]] = ...) -> None: ...

class Abort(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class FinishSequence(_message.Message):
    __slots__ = ("request_id", "index", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: int
    reason: _common_pb2.FinishReason
    def __init__(self, request_id: _Optional[str] = ..., index: _Optional[int] = ..., reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ...) -> None: ...

class Rejected(_message.Message):
    __slots__ = ("request_id", "reason", "message", "retry_after_s")
    class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REASON_NONE: _ClassVar[Rejected.Reason]
        INVALID: _ClassVar[Rejected.Reason]
        QUEUE_FULL: _ClassVar[Rejected.Reason]
        DRAINING: _ClassVar[Rejected.Reason]
    REASON_NONE: Rejected.Reason
    INVALID: Rejected.Reason
    QUEUE_FULL: Rejected.Reason
    DRAINING: Rejected.Reason
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reason: Rejected.Reason
    message: str
    retry_after_s: int
    def __init__(self, request_id: _Optional[str] = ..., reason: _Optional[_Union[Rejected.Reason, str]] = ..., message: _Optional[str] = ..., retry_after_s: _Optional[int] = ...) -> None: ...

class StepOutputs(_message.Message):
    __slots__ = ("request_ids", "indices", "token_ids", "logprobs", "finished")
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    indices: _containers.RepeatedScalarFieldContainer[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[DeltaLogprobs]
    finished: _containers.RepeatedCompositeFieldContainer[SequenceFinished]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ..., indices: _Optional[_Iterable[int]] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[DeltaLogprobs, _Mapping]]] = ..., finished: _Optional[_Iterable[_Union[SequenceFinished, _Mapping]]] = ...) -> None: ...

class DeltaLogprobs(_message.Message):
    __slots__ = ("request_id", "index", "tokens", "prompt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: int
    tokens: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    prompt: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    def __init__(self, request_id: _Optional[str] = ..., index: _Optional[int] = ..., tokens: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ..., prompt: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ...) -> None: ...

class SequenceFinished(_message.Message):
    __slots__ = ("request_id", "index", "reason", "stop_token_id", "num_prompt_tokens", "num_cached_tokens", "num_generated_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: int
    reason: _common_pb2.FinishReason
    stop_token_id: int
    num_prompt_tokens: int
    num_cached_tokens: int
    num_generated_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., index: _Optional[int] = ..., reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., stop_token_id: _Optional[int] = ..., num_prompt_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., num_generated_tokens: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("num_waiting", "num_running", "num_waiting_tokens", "prefix_cache_hit_rate", "replicas", "num_sessions", "num_preemptions")
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    NUM_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    num_waiting: int
    num_running: int
    num_waiting_tokens: int
    prefix_cache_hit_rate: float
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStats]
    num_sessions: int
    num_preemptions: int
    def __init__(self, num_waiting: _Optional[int] = ..., num_running: _Optional[int] = ..., num_waiting_tokens: _Optional[int] = ..., prefix_cache_hit_rate: _Optional[float] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStats, _Mapping]]] = ..., num_sessions: _Optional[int] = ..., num_preemptions: _Optional[int] = ...) -> None: ...

class ReplicaStats(_message.Message):
    __slots__ = ("replica_id", "epoch", "state", "num_running", "num_blocks", "num_free_blocks", "kv_usage", "prefix_cache_hit_rate", "steps")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_NONE: _ClassVar[ReplicaStats.State]
        ACTIVE: _ClassVar[ReplicaStats.State]
        DRAINING: _ClassVar[ReplicaStats.State]
        DEAD: _ClassVar[ReplicaStats.State]
    STATE_NONE: ReplicaStats.State
    ACTIVE: ReplicaStats.State
    DRAINING: ReplicaStats.State
    DEAD: ReplicaStats.State
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    replica_id: int
    epoch: int
    state: ReplicaStats.State
    num_running: int
    num_blocks: int
    num_free_blocks: int
    kv_usage: float
    prefix_cache_hit_rate: float
    steps: int
    def __init__(self, replica_id: _Optional[int] = ..., epoch: _Optional[int] = ..., state: _Optional[_Union[ReplicaStats.State, str]] = ..., num_running: _Optional[int] = ..., num_blocks: _Optional[int] = ..., num_free_blocks: _Optional[int] = ..., kv_usage: _Optional[float] = ..., prefix_cache_hit_rate: _Optional[float] = ..., steps: _Optional[int] = ...) -> None: ...
