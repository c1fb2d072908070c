"""`mooncake.store`: Mooncake Store's Python client, over mooncake-rs.

Return codes are the reference's (0 / negative error code; reads return bytes read). See
docs/python.md for the call list and what differs from the reference.
"""

import ctypes

from mooncake import _native
from mooncake._native import (  # noqa: F401
    Descriptor,
    MemoryDescriptor,
    MooncakeHostMemAllocator,
    ObjectDataType,
    ReplicaDescriptor,
    ReplicaStatus,
    ReplicateConfig,
    SoftPinAction,
    TaskStatus,
    TaskType,
)


def _as_bytes(value):
    """bytes for any buffer-protocol object (bytes, bytearray, memoryview, numpy, …)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        raise TypeError("value must be a bytes-like object, not str")
    return memoryview(value).tobytes()


class BufferHandle(bytearray):
    """A value read by `get_buffer`: a writable buffer (memoryview, numpy, torch.frombuffer)
    with the reference's `ptr()` and `size()`."""

    def ptr(self):
        if not self:
            return 0
        return ctypes.addressof((ctypes.c_char * len(self)).from_buffer(self))

    def size(self):
        return len(self)


class MooncakeDistributedStore(_native.MooncakeDistributedStore):
    """Mooncake Store's client (`setup`, then put/get/…); thread-safe, GIL released while
    waiting."""

    def put(self, key, value, config=None):
        return super().put(key, _as_bytes(value), config)

    def upsert(self, key, value, config=None):
        return super().upsert(key, _as_bytes(value), config)

    def put_batch(self, keys, values, config=None):
        return super().put_batch(keys, [_as_bytes(v) for v in values], config)

    def put_parts(self, key, *parts, config=None):
        return super().put_parts(key, *[_as_bytes(p) for p in parts], config=config)

    def get_buffer(self, key):
        """The value of `key` as a `BufferHandle`, or None if it is missing."""
        v = self._get_buffer(key)
        return None if v is None else BufferHandle(v)

    def batch_get_buffer(self, keys):
        """`get_buffer` for many keys (one master round trip)."""
        return [None if v is None else BufferHandle(v) for v in self._batch_get_buffer(keys)]


# The reference also exports every enum member at module level (COMPLETE, KVCACHE, …).
for _enum, _names in (
    (SoftPinAction, ("PRESERVE", "ENABLE", "DISABLE")),
    (
        ObjectDataType,
        ("UNKNOWN", "KVCACHE", "TENSOR", "WEIGHT", "SAMPLE", "ACTIVATION", "GRADIENT",
         "OPTIMIZER_STATE", "METADATA", "GENERAL"),
    ),
    (ReplicaStatus, ("UNDEFINED", "INITIALIZED", "PROCESSING", "COMPLETE", "REMOVED", "FAILED")),
    (TaskStatus, ("PENDING", "PROCESSING", "SUCCESS", "FAILED")),
    (TaskType, ("REPLICA_COPY", "REPLICA_MOVE")),
):
    for _n in _names:
        globals().setdefault(_n, getattr(_enum, _n))
del _enum, _names, _n

__all__ = [
    "MooncakeDistributedStore",
    "ReplicateConfig",
    "ReplicaDescriptor",
    "MemoryDescriptor",
    "Descriptor",
    "BufferHandle",
    "MooncakeHostMemAllocator",
    "SoftPinAction",
    "ObjectDataType",
    "ReplicaStatus",
    "TaskStatus",
    "TaskType",
]
