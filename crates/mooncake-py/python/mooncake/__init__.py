"""mooncake-rs's Python package: a drop-in for Mooncake's `mooncake.engine` and `mooncake.store`.

Importing `mooncake` loads nothing native: `mooncake.engine` and `mooncake.store` load the
extension (which itself loads no CUDA or rdma-core library). `features()` says what this build
and this host offer.
"""

__all__ = ["features", "__version__"]


def features():
    """What this build and host offer: transports, RDMA, whether CUDA is loaded, version."""
    from mooncake import _native

    return _native.features()


def __getattr__(name):
    if name == "__version__":
        from mooncake import _native

        return _native.features()["version"]
    raise AttributeError(f"module 'mooncake' has no attribute {name!r}")
