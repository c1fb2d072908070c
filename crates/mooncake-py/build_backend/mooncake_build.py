"""PEP 517 backend for `pip install .`: maturin, after bundling the `mooncake` binary.

The console scripts `mooncake_master`, `mooncake_http_metadata_server` and `mooncake_client`
run `mooncake/_bin/mooncake` from the installed package. This backend builds it with cargo
(`cargo build --release -p mooncake-cli --features cuda`, the features of the extension) and copies it there before maturin packs the wheel.
`MOONCAKE_CLI_BIN=/path/to/mooncake` copies a binary built elsewhere instead;
`MOONCAKE_PY_SKIP_CLI=1` skips it (the scripts then look for `mooncake` on PATH).
"""

import os
import shutil
import subprocess
from pathlib import Path

import maturin

_CRATE = Path(__file__).resolve().parent.parent
_REPO = _CRATE.parent.parent


def _bundle_cli():
    if os.environ.get("MOONCAKE_PY_SKIP_CLI"):
        return
    dest = _CRATE / "python" / "mooncake" / "_bin" / "mooncake"
    src = os.environ.get("MOONCAKE_CLI_BIN")
    if src:
        src = Path(src)
    else:
        subprocess.run(
            ["cargo", "build", "--release", "-p", "mooncake-cli", "--features", "cuda",
             "--bin", "mooncake"],
            cwd=_REPO,
            check=True,
        )
        target = Path(os.environ.get("CARGO_TARGET_DIR") or _REPO / "target")
        src = target / "release" / "mooncake"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dest)
    # The release profile keeps line tables (for profiling); the wheel does not need them.
    # Best effort: without binutils' `strip` the wheel is only larger.
    if shutil.which("strip"):
        subprocess.run(["strip", "--strip-debug", str(dest)], check=False)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _bundle_cli()
    return maturin.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _bundle_cli()
    return maturin.build_editable(wheel_directory, config_settings, metadata_directory)


build_sdist = maturin.build_sdist
get_requires_for_build_wheel = maturin.get_requires_for_build_wheel
get_requires_for_build_sdist = maturin.get_requires_for_build_sdist
get_requires_for_build_editable = getattr(
    maturin, "get_requires_for_build_editable", maturin.get_requires_for_build_wheel
)
prepare_metadata_for_build_wheel = maturin.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = getattr(
    maturin, "prepare_metadata_for_build_editable", maturin.prepare_metadata_for_build_wheel
)
