"""Console scripts, as the reference wheel names them, running the bundled `mooncake` binary.

- `mooncake_master [flags]` → `mooncake master [flags]` (the reference's flags are accepted).
- `mooncake_http_metadata_server [--port 8080] [--host 0.0.0.0]` → `mooncake metadata-server`.
- `mooncake_client [flags]` → `mooncake store-node`, translating the reference's flags
  (`--master_server_address`, `--global_segment_size`, `--metadata_server`, `--protocol`,
  `--host`/`--local_hostname`, `--port`: the Unix socket `setup_dummy("host:port")` attaches
  to is `/tmp/mooncake-client-<port>.sock`).
"""

import os
import shutil
import sys
from pathlib import Path


def binary():
    """Path of the `mooncake` binary: the bundled one, else `$MOONCAKE_BIN`, else PATH."""
    env = os.environ.get("MOONCAKE_BIN")
    if env:
        return env
    bundled = Path(__file__).resolve().parent / "_bin" / "mooncake"
    if bundled.is_file():
        return str(bundled)
    found = shutil.which("mooncake")
    if found:
        return found
    sys.exit(
        "mooncake: the `mooncake` binary is not bundled in this install and not on PATH "
        "(build it with `cargo build --release -p mooncake-cli`, or set MOONCAKE_BIN)"
    )


def _exec(args):
    exe = binary()
    os.execv(exe, [exe, *args])


def master(argv=None):
    _exec(["master", *(sys.argv[1:] if argv is None else argv)])


def http_metadata_server(argv=None):
    args = sys.argv[1:] if argv is None else argv
    _exec(["metadata-server", *[a.replace("_", "-") if a.startswith("--") else a for a in args]])


def client_args(args):
    """The `mooncake store-node` arguments for reference `mooncake_client` flags."""
    names = {
        "master_server_address": "--master",
        "master_server_addr": "--master",
        "global_segment_size": "--segment-size",
        "metadata_server": "--metadata",
        "protocol": "--protocol",
        "host": "--hostname",
        "local_hostname": "--hostname",
        "tenant_id": "--tenant",
    }
    out = []
    port = 50052
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if not a.startswith("-"):
            continue
        name, _, value = a.lstrip("-").partition("=")
        name = name.replace("-", "_")
        if not value and i < len(args) and not args[i].startswith("--"):
            value = args[i]
            i += 1
        if name == "port":
            port = int(value)
        elif name in names:
            out += [names[name], value]
        else:
            print(f"mooncake_client: ignoring {a} {value}".rstrip(), file=sys.stderr)
    return [*out, "--socket", f"/tmp/mooncake-client-{port}.sock"]


def client(argv=None):
    _exec(["store-node", *client_args(sys.argv[1:] if argv is None else argv)])
