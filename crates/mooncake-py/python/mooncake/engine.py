"""`mooncake.engine`: Mooncake's Transfer Engine binding, over mooncake-rs.

Every call returns ints (0 = done: for transfers, the bytes are in the destination's memory;
negative = error) and releases the GIL while it waits. See docs/python.md.
"""

from mooncake._native import (  # noqa: F401
    SUPPORT_CUDA,
    SUPPORT_EFA,
    SUPPORT_HIP,
    SUPPORT_INTRA_NVLINK,
    SUPPORT_MNNVL,
    SUPPORT_MUSA,
    InnerTransferEngine,
    TransferEngine,
    TransferNotify,
    TransferOpcode,
)

Read = TransferOpcode.Read
Write = TransferOpcode.Write

__all__ = [
    "TransferEngine",
    "TransferOpcode",
    "TransferNotify",
    "InnerTransferEngine",
    "Read",
    "Write",
    "SUPPORT_CUDA",
    "SUPPORT_EFA",
    "SUPPORT_HIP",
    "SUPPORT_INTRA_NVLINK",
    "SUPPORT_MNNVL",
    "SUPPORT_MUSA",
]
