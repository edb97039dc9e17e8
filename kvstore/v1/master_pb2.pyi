from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ItemStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ITEM_STATUS_UNSPECIFIED: _ClassVar[ItemStatus]
    OK: _ClassVar[ItemStatus]
    NOT_FOUND: _ClassVar[ItemStatus]
    ALREADY_EXISTS: _ClassVar[ItemStatus]
    BUSY: _ClassVar[ItemStatus]
    NO_SPACE: _ClassVar[ItemStatus]
    LEASED: _ClassVar[ItemStatus]
    PINNED: _ClassVar[ItemStatus]
    EXPIRED: _ClassVar[ItemStatus]
    INVALID: _ClassVar[ItemStatus]

class ReplicaState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLICA_STATE_UNSPECIFIED: _ClassVar[ReplicaState]
    PENDING: _ClassVar[ReplicaState]
    COMPLETE: _ClassVar[ReplicaState]
ITEM_STATUS_UNSPECIFIED: ItemStatus
OK: ItemStatus
NOT_FOUND: ItemStatus
ALREADY_EXISTS: ItemStatus
BUSY: ItemStatus
NO_SPACE: ItemStatus
LEASED: ItemStatus
PINNED: ItemStatus
EXPIRED: ItemStatus
INVALID: ItemStatus
REPLICA_STATE_UNSPECIFIED: ReplicaState
PENDING: ReplicaState
COMPLETE: ReplicaState

class Endpoint(_message.Message):
    __slots__ = ("scheme", "metadata", "region")
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    scheme: str
    metadata: bytes
    region: bytes
    def __init__(self, scheme: _Optional[str] = ..., metadata: _Optional[bytes] = ..., region: _Optional[bytes] = ...) -> None: ...

class TierCapacity(_message.Message):
    __slots__ = ("name", "capacity", "used")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    name: str
    capacity: int
    used: int
    def __init__(self, name: _Optional[str] = ..., capacity: _Optional[int] = ..., used: _Optional[int] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "epoch", "host", "control_address", "endpoints", "tiers", "objects", "assigned_bytes", "last_heartbeat_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    CONTROL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    host: str
    control_address: str
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    tiers: _containers.RepeatedCompositeFieldContainer[TierCapacity]
    objects: int
    assigned_bytes: int
    last_heartbeat_ms: int
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., host: _Optional[str] = ..., control_address: _Optional[str] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., tiers: _Optional[_Iterable[_Union[TierCapacity, _Mapping]]] = ..., objects: _Optional[int] = ..., assigned_bytes: _Optional[int] = ..., last_heartbeat_ms: _Optional[int] = ...) -> None: ...

class Replica(_message.Message):
    __slots__ = ("node_id", "epoch", "state")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    state: ReplicaState
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., state: _Optional[_Union[ReplicaState, str]] = ...) -> None: ...

class HeldKey(_message.Message):
    __slots__ = ("key", "size", "checksum")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    size: int
    checksum: int
    def __init__(self, key: _Optional[bytes] = ..., size: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class RegisterNodeRequest(_message.Message):
    __slots__ = ("node_id", "host", "control_address", "endpoints", "tiers", "held", "more_held")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    CONTROL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    MORE_HELD_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    host: str
    control_address: str
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    tiers: _containers.RepeatedCompositeFieldContainer[TierCapacity]
    held: _containers.RepeatedCompositeFieldContainer[HeldKey]
    more_held: bool
    def __init__(self, node_id: _Optional[str] = ..., host: _Optional[str] = ..., control_address: _Optional[str] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., tiers: _Optional[_Iterable[_Union[TierCapacity, _Mapping]]] = ..., held: _Optional[_Iterable[_Union[HeldKey, _Mapping]]] = ..., more_held: _Optional[bool] = ...) -> None: ...

class RegisterNodeResponse(_message.Message):
    __slots__ = ("epoch", "heartbeat_interval_ms", "node_ttl_ms", "drop", "client_digests", "auth_version", "client_scopes", "grant_key")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    NODE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    DROP_FIELD_NUMBER: _ClassVar[int]
    CLIENT_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    AUTH_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SCOPES_FIELD_NUMBER: _ClassVar[int]
    GRANT_KEY_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    heartbeat_interval_ms: int
    node_ttl_ms: int
    drop: _containers.RepeatedScalarFieldContainer[bytes]
    client_digests: _containers.RepeatedScalarFieldContainer[str]
    auth_version: str
    client_scopes: _containers.RepeatedScalarFieldContainer[bytes]
    grant_key: bytes
    def __init__(self, epoch: _Optional[int] = ..., heartbeat_interval_ms: _Optional[int] = ..., node_ttl_ms: _Optional[int] = ..., drop: _Optional[_Iterable[bytes]] = ..., client_digests: _Optional[_Iterable[str]] = ..., auth_version: _Optional[str] = ..., client_scopes: _Optional[_Iterable[bytes]] = ..., grant_key: _Optional[bytes] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "epoch", "tiers", "lost", "auth_version")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    AUTH_VERSION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    tiers: _containers.RepeatedCompositeFieldContainer[TierCapacity]
    lost: _containers.RepeatedScalarFieldContainer[bytes]
    auth_version: str
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[TierCapacity, _Mapping]]] = ..., lost: _Optional[_Iterable[bytes]] = ..., auth_version: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("reregister", "remove", "client_digests", "auth_version", "client_scopes", "grant_key")
    REREGISTER_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    AUTH_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SCOPES_FIELD_NUMBER: _ClassVar[int]
    GRANT_KEY_FIELD_NUMBER: _ClassVar[int]
    reregister: bool
    remove: _containers.RepeatedScalarFieldContainer[bytes]
    client_digests: _containers.RepeatedScalarFieldContainer[str]
    auth_version: str
    client_scopes: _containers.RepeatedScalarFieldContainer[bytes]
    grant_key: bytes
    def __init__(self, reregister: _Optional[bool] = ..., remove: _Optional[_Iterable[bytes]] = ..., client_digests: _Optional[_Iterable[str]] = ..., auth_version: _Optional[str] = ..., client_scopes: _Optional[_Iterable[bytes]] = ..., grant_key: _Optional[bytes] = ...) -> None: ...

class PutItem(_message.Message):
    __slots__ = ("key", "size", "checksum", "checksum_at_end")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_AT_END_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    size: int
    checksum: int
    checksum_at_end: bool
    def __init__(self, key: _Optional[bytes] = ..., size: _Optional[int] = ..., checksum: _Optional[int] = ..., checksum_at_end: _Optional[bool] = ...) -> None: ...

class PutStartRequest(_message.Message):
    __slots__ = ("items", "replicas", "client_host")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_HOST_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[PutItem]
    replicas: int
    client_host: str
    def __init__(self, items: _Optional[_Iterable[_Union[PutItem, _Mapping]]] = ..., replicas: _Optional[int] = ..., client_host: _Optional[str] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("status", "nodes", "grants")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    status: ItemStatus
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    grants: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, status: _Optional[_Union[ItemStatus, str]] = ..., nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ..., grants: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PutStartResponse(_message.Message):
    __slots__ = ("put_id", "expires_ms", "placements")
    PUT_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_MS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    put_id: int
    expires_ms: int
    placements: _containers.RepeatedCompositeFieldContainer[Placement]
    def __init__(self, put_id: _Optional[int] = ..., expires_ms: _Optional[int] = ..., placements: _Optional[_Iterable[_Union[Placement, _Mapping]]] = ...) -> None: ...

class PutEndRequest(_message.Message):
    __slots__ = ("put_id", "keys", "checksums")
    PUT_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    put_id: int
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, put_id: _Optional[int] = ..., keys: _Optional[_Iterable[bytes]] = ..., checksums: _Optional[_Iterable[int]] = ...) -> None: ...

class PutEndResponse(_message.Message):
    __slots__ = ("statuses",)
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedScalarFieldContainer[ItemStatus]
    def __init__(self, statuses: _Optional[_Iterable[_Union[ItemStatus, str]]] = ...) -> None: ...

class PutRevokeRequest(_message.Message):
    __slots__ = ("put_id", "keys")
    PUT_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    put_id: int
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, put_id: _Optional[int] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PutRevokeResponse(_message.Message):
    __slots__ = ("statuses",)
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedScalarFieldContainer[ItemStatus]
    def __init__(self, statuses: _Optional[_Iterable[_Union[ItemStatus, str]]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("keys", "lease", "client_host")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_HOST_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    lease: bool
    client_host: str
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., lease: _Optional[bool] = ..., client_host: _Optional[str] = ...) -> None: ...

class Location(_message.Message):
    __slots__ = ("status", "size", "checksum", "nodes")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    status: ItemStatus
    size: int
    checksum: int
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, status: _Optional[_Union[ItemStatus, str]] = ..., size: _Optional[int] = ..., checksum: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("lease_id", "lease_expires_ms", "locations")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_MS_FIELD_NUMBER: _ClassVar[int]
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    lease_expires_ms: int
    locations: _containers.RepeatedCompositeFieldContainer[Location]
    def __init__(self, lease_id: _Optional[int] = ..., lease_expires_ms: _Optional[int] = ..., locations: _Optional[_Iterable[_Union[Location, _Mapping]]] = ...) -> None: ...

class LongestPrefixRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class LongestPrefixResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class ReleaseLeasesRequest(_message.Message):
    __slots__ = ("lease_ids",)
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    lease_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, lease_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseLeasesResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RemoveRequest(_message.Message):
    __slots__ = ("keys", "force")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    force: bool
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., force: _Optional[bool] = ...) -> None: ...

class RemoveResponse(_message.Message):
    __slots__ = ("statuses",)
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedScalarFieldContainer[ItemStatus]
    def __init__(self, statuses: _Optional[_Iterable[_Union[ItemStatus, str]]] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("statuses",)
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedScalarFieldContainer[ItemStatus]
    def __init__(self, statuses: _Optional[_Iterable[_Union[ItemStatus, str]]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HelloResponse(_message.Message):
    __slots__ = ("fast_address", "key_prefix")
    FAST_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KEY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    fast_address: str
    key_prefix: bytes
    def __init__(self, fast_address: _Optional[str] = ..., key_prefix: _Optional[bytes] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("nodes", "objects", "pending", "bytes", "leases", "pins", "counters")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODES_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    PINS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    objects: int
    pending: int
    bytes: int
    leases: int
    pins: int
    counters: _containers.ScalarMap[str, int]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ..., objects: _Optional[int] = ..., pending: _Optional[int] = ..., bytes: _Optional[int] = ..., leases: _Optional[int] = ..., pins: _Optional[int] = ..., counters: _Optional[_Mapping[str, int]] = ...) -> None: ...

class BadReplica(_message.Message):
    __slots__ = ("key", "node_id", "checksum")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    node_id: str
    checksum: int
    def __init__(self, key: _Optional[bytes] = ..., node_id: _Optional[str] = ..., checksum: _Optional[int] = ...) -> None: ...

class ReportBadRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[BadReplica]
    def __init__(self, items: _Optional[_Iterable[_Union[BadReplica, _Mapping]]] = ...) -> None: ...

class ReportBadResponse(_message.Message):
    __slots__ = ("statuses",)
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedScalarFieldContainer[ItemStatus]
    def __init__(self, statuses: _Optional[_Iterable[_Union[ItemStatus, str]]] = ...) -> None: ...

class ReportHeldRequest(_message.Message):
    __slots__ = ("node_id", "epoch", "held", "last")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    held: _containers.RepeatedCompositeFieldContainer[HeldKey]
    last: bool
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., held: _Optional[_Iterable[_Union[HeldKey, _Mapping]]] = ..., last: _Optional[bool] = ...) -> None: ...

class ReportHeldResponse(_message.Message):
    __slots__ = ("reregister", "drop")
    REREGISTER_FIELD_NUMBER: _ClassVar[int]
    DROP_FIELD_NUMBER: _ClassVar[int]
    reregister: bool
    drop: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, reregister: _Optional[bool] = ..., drop: _Optional[_Iterable[bytes]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("after", "from_now")
    AFTER_FIELD_NUMBER: _ClassVar[int]
    FROM_NOW_FIELD_NUMBER: _ClassVar[int]
    after: int
    from_now: bool
    def __init__(self, after: _Optional[int] = ..., from_now: _Optional[bool] = ...) -> None: ...

class PoolEvent(_message.Message):
    __slots__ = ("seq", "kind", "key", "size", "nodes", "time_ms")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[PoolEvent.Kind]
        STORED: _ClassVar[PoolEvent.Kind]
        REMOVED: _ClassVar[PoolEvent.Kind]
        EVICTED: _ClassVar[PoolEvent.Kind]
        LOST: _ClassVar[PoolEvent.Kind]
        REPLICA_LOST: _ClassVar[PoolEvent.Kind]
        NODE_JOINED: _ClassVar[PoolEvent.Kind]
        NODE_LEFT: _ClassVar[PoolEvent.Kind]
        RESYNC: _ClassVar[PoolEvent.Kind]
    KIND_UNSPECIFIED: PoolEvent.Kind
    STORED: PoolEvent.Kind
    REMOVED: PoolEvent.Kind
    EVICTED: PoolEvent.Kind
    LOST: PoolEvent.Kind
    REPLICA_LOST: PoolEvent.Kind
    NODE_JOINED: PoolEvent.Kind
    NODE_LEFT: PoolEvent.Kind
    RESYNC: PoolEvent.Kind
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    kind: PoolEvent.Kind
    key: bytes
    size: int
    nodes: _containers.RepeatedScalarFieldContainer[str]
    time_ms: int
    def __init__(self, seq: _Optional[int] = ..., kind: _Optional[_Union[PoolEvent.Kind, str]] = ..., key: _Optional[bytes] = ..., size: _Optional[int] = ..., nodes: _Optional[_Iterable[str]] = ..., time_ms: _Optional[int] = ...) -> None: ...
