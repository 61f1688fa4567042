from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadReply(_message.Message):
    __slots__ = ("active_sessions", "queued_rounds", "busy_fraction", "max_sessions")
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    BUSY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    active_sessions: int
    queued_rounds: int
    busy_fraction: float
    max_sessions: int
    def __init__(self, active_sessions: _Optional[int] = ..., queued_rounds: _Optional[int] = ..., busy_fraction: _Optional[float] = ..., max_sessions: _Optional[int] = ...) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("protocol_version", "model_name", "tokenizer_fingerprint", "vocab_size", "max_tree_nodes", "max_tree_depth", "max_context")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_TREE_NODES_FIELD_NUMBER: _ClassVar[int]
    MAX_TREE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    model_name: str
    tokenizer_fingerprint: str
    vocab_size: int
    max_tree_nodes: int
    max_tree_depth: int
    max_context: int
    def __init__(self, protocol_version: _Optional[int] = ..., model_name: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_tree_nodes: _Optional[int] = ..., max_tree_depth: _Optional[int] = ..., max_context: _Optional[int] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ("protocol_version", "tokenizer_fingerprint", "prompt_token_ids", "sampling", "max_tokens", "stop_token_ids", "accepts_streaming", "start_streaming", "accepts_token_runs")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_STREAMING_FIELD_NUMBER: _ClassVar[int]
    START_STREAMING_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_TOKEN_RUNS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    tokenizer_fingerprint: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    max_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    accepts_streaming: bool
    start_streaming: bool
    accepts_token_runs: bool
    def __init__(self, protocol_version: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., max_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., accepts_streaming: _Optional[bool] = ..., start_streaming: _Optional[bool] = ..., accepts_token_runs: _Optional[bool] = ...) -> None: ...

class Tree(_message.Message):
    __slots__ = ("round", "tokens", "parents", "estimates")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATES_FIELD_NUMBER: _ClassVar[int]
    round: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    estimates: bytes
    def __init__(self, round: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ..., estimates: _Optional[bytes] = ...) -> None: ...

class Close(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Resume(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EdgeMessage(_message.Message):
    __slots__ = ("open", "tree", "close", "resume")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    open: Open
    tree: Tree
    close: Close
    resume: Resume
    def __init__(self, open: _Optional[_Union[Open, _Mapping]] = ..., tree: _Optional[_Union[Tree, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ..., resume: _Optional[_Union[Resume, _Mapping]] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("session_id", "max_new_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_new_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...

class Verified(_message.Message):
    __slots__ = ("round", "emitted_token_ids", "num_accepted", "finish_reason", "num_verified", "streaming", "resume_tokens_per_round")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    EMITTED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    STREAMING_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKENS_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    emitted_token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_accepted: int
    finish_reason: FinishReason
    num_verified: int
    streaming: bool
    resume_tokens_per_round: float
    def __init__(self, round: _Optional[int] = ..., emitted_token_ids: _Optional[_Iterable[int]] = ..., num_accepted: _Optional[int] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., num_verified: _Optional[int] = ..., streaming: _Optional[bool] = ..., resume_tokens_per_round: _Optional[float] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("opened", "verified")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    opened: Opened
    verified: Verified
    def __init__(self, opened: _Optional[_Union[Opened, _Mapping]] = ..., verified: _Optional[_Union[Verified, _Mapping]] = ...) -> None: ...
