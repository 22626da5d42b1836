from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Capacity(_message.Message):
    __slots__ = ("mu", "depth", "frozen_blocks", "widths")
    MU_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    FROZEN_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    WIDTHS_FIELD_NUMBER: _ClassVar[int]
    mu: float
    depth: int
    frozen_blocks: int
    widths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, mu: _Optional[float] = ..., depth: _Optional[int] = ..., frozen_blocks: _Optional[int] = ..., widths: _Optional[_Iterable[int]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "cluster", "peer_id", "model_fingerprint", "capacity", "address", "round", "members", "view_id", "join_round", "join_confirmed", "accepted_joins", "view_round", "leaves", "leaving", "bulk_port")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    VIEW_ID_FIELD_NUMBER: _ClassVar[int]
    JOIN_ROUND_FIELD_NUMBER: _ClassVar[int]
    JOIN_CONFIRMED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_JOINS_FIELD_NUMBER: _ClassVar[int]
    VIEW_ROUND_FIELD_NUMBER: _ClassVar[int]
    LEAVES_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    BULK_PORT_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    cluster: str
    peer_id: str
    model_fingerprint: str
    capacity: Capacity
    address: str
    round: int
    members: _containers.RepeatedScalarFieldContainer[str]
    view_id: str
    join_round: int
    join_confirmed: bool
    accepted_joins: _containers.RepeatedCompositeFieldContainer[JoinTicket]
    view_round: int
    leaves: _containers.RepeatedCompositeFieldContainer[LeaveTicket]
    leaving: bool
    bulk_port: int
    def __init__(self, protocol_version: _Optional[int] = ..., cluster: _Optional[str] = ..., peer_id: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., capacity: _Optional[_Union[Capacity, _Mapping]] = ..., address: _Optional[str] = ..., round: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ..., view_id: _Optional[str] = ..., join_round: _Optional[int] = ..., join_confirmed: _Optional[bool] = ..., accepted_joins: _Optional[_Iterable[_Union[JoinTicket, _Mapping]]] = ..., view_round: _Optional[int] = ..., leaves: _Optional[_Iterable[_Union[LeaveTicket, _Mapping]]] = ..., leaving: _Optional[bool] = ..., bulk_port: _Optional[int] = ...) -> None: ...

class JoinTicket(_message.Message):
    __slots__ = ("peer_id", "round", "confirmed")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    round: int
    confirmed: bool
    def __init__(self, peer_id: _Optional[str] = ..., round: _Optional[int] = ..., confirmed: _Optional[bool] = ...) -> None: ...

class LeaveTicket(_message.Message):
    __slots__ = ("peer_id", "round", "decided")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DECIDED_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    round: int
    decided: bool
    def __init__(self, peer_id: _Optional[str] = ..., round: _Optional[int] = ..., decided: _Optional[bool] = ...) -> None: ...

class GroupUnits(_message.Message):
    __slots__ = ("group", "units")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    group: str
    units: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, group: _Optional[str] = ..., units: _Optional[_Iterable[int]] = ...) -> None: ...

class StreamHeader(_message.Message):
    __slots__ = ("protocol_version", "cluster", "model_fingerprint", "sender", "receiver", "round", "view_id", "weight", "tensors", "total_bytes", "plan", "part")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    VIEW_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    cluster: str
    model_fingerprint: str
    sender: str
    receiver: str
    round: int
    view_id: str
    weight: float
    tensors: int
    total_bytes: int
    plan: _containers.RepeatedCompositeFieldContainer[GroupUnits]
    part: str
    def __init__(self, protocol_version: _Optional[int] = ..., cluster: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., sender: _Optional[str] = ..., receiver: _Optional[str] = ..., round: _Optional[int] = ..., view_id: _Optional[str] = ..., weight: _Optional[float] = ..., tensors: _Optional[int] = ..., total_bytes: _Optional[int] = ..., plan: _Optional[_Iterable[_Union[GroupUnits, _Mapping]]] = ..., part: _Optional[str] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("name", "dtype", "shape", "nbytes", "crc32")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    crc32: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ..., crc32: _Optional[int] = ...) -> None: ...

class SliceFrame(_message.Message):
    __slots__ = ("start", "tensor", "chunk")
    START_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    start: StreamHeader
    tensor: TensorHeader
    chunk: bytes
    def __init__(self, start: _Optional[_Union[StreamHeader, _Mapping]] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("bytes_received",)
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    def __init__(self, bytes_received: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("protocol_version", "cluster", "model_fingerprint", "requester", "round")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    cluster: str
    model_fingerprint: str
    requester: str
    round: int
    def __init__(self, protocol_version: _Optional[int] = ..., cluster: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., requester: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerStatus(_message.Message):
    __slots__ = ("peer_id", "address", "capacity", "position", "round", "last_seen_unix", "bytes_sent", "bytes_received", "neighbour")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOUR_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    address: str
    capacity: Capacity
    position: int
    round: int
    last_seen_unix: float
    bytes_sent: int
    bytes_received: int
    neighbour: bool
    def __init__(self, peer_id: _Optional[str] = ..., address: _Optional[str] = ..., capacity: _Optional[_Union[Capacity, _Mapping]] = ..., position: _Optional[int] = ..., round: _Optional[int] = ..., last_seen_unix: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., neighbour: _Optional[bool] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("self", "peers", "bytes_sent", "bytes_received", "train_loss", "rounds_done")
    SELF_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_DONE_FIELD_NUMBER: _ClassVar[int]
    self: Hello
    peers: _containers.RepeatedCompositeFieldContainer[PeerStatus]
    bytes_sent: int
    bytes_received: int
    train_loss: float
    rounds_done: int
    def __init__(self_, self: _Optional[_Union[Hello, _Mapping]] = ..., peers: _Optional[_Iterable[_Union[PeerStatus, _Mapping]]] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., train_loss: _Optional[float] = ..., rounds_done: _Optional[int] = ...) -> None: ...
