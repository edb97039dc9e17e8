from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SlotStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SLOT_STATUS_UNSPECIFIED: _ClassVar[SlotStatus]
    SLOT_OK: _ClassVar[SlotStatus]
    SLOT_NOT_FOUND: _ClassVar[SlotStatus]
    SLOT_NO_SPACE: _ClassVar[SlotStatus]
    SLOT_CORRUPT: _ClassVar[SlotStatus]
    SLOT_EXPIRED: _ClassVar[SlotStatus]
    SLOT_INVALID: _ClassVar[SlotStatus]
SLOT_STATUS_UNSPECIFIED: SlotStatus
SLOT_OK: SlotStatus
SLOT_NOT_FOUND: SlotStatus
SLOT_NO_SPACE: SlotStatus
SLOT_CORRUPT: SlotStatus
SLOT_EXPIRED: SlotStatus
SLOT_INVALID: SlotStatus

class AllocItem(_message.Message):
    __slots__ = ("key", "size")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    size: int
    def __init__(self, key: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...

class AllocateRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[AllocItem]
    def __init__(self, items: _Optional[_Iterable[_Union[AllocItem, _Mapping]]] = ...) -> None: ...

class Slot(_message.Message):
    __slots__ = ("status", "handle", "offset", "size", "checksum")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    status: SlotStatus
    handle: int
    offset: int
    size: int
    checksum: int
    def __init__(self, status: _Optional[_Union[SlotStatus, str]] = ..., handle: _Optional[int] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class AllocateResponse(_message.Message):
    __slots__ = ("slots",)
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[Slot]
    def __init__(self, slots: _Optional[_Iterable[_Union[Slot, _Mapping]]] = ...) -> None: ...

class CommitItem(_message.Message):
    __slots__ = ("handle", "key", "checksum")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    handle: int
    key: bytes
    checksum: int
    def __init__(self, handle: _Optional[int] = ..., key: _Optional[bytes] = ..., checksum: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[CommitItem]
    def __init__(self, items: _Optional[_Iterable[_Union[CommitItem, _Mapping]]] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("statuses",)
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedScalarFieldContainer[SlotStatus]
    def __init__(self, statuses: _Optional[_Iterable[_Union[SlotStatus, str]]] = ...) -> None: ...

class AcquireRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class AcquireResponse(_message.Message):
    __slots__ = ("slots",)
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[Slot]
    def __init__(self, slots: _Optional[_Iterable[_Union[Slot, _Mapping]]] = ...) -> None: ...

class HandlesRequest(_message.Message):
    __slots__ = ("handles",)
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    handles: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, handles: _Optional[_Iterable[int]] = ...) -> None: ...

class HandlesResponse(_message.Message):
    __slots__ = ("statuses",)
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedScalarFieldContainer[SlotStatus]
    def __init__(self, statuses: _Optional[_Iterable[_Union[SlotStatus, str]]] = ...) -> None: ...
