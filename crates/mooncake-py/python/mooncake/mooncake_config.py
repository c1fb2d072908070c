"""`MooncakeConfig`: store client settings from JSON (`MOONCAKE_CONFIG_PATH`) or `MOONCAKE_*`
environment variables, as LMCache, vLLM and the reference wheel read them.

JSON dialects accepted: the store clients' (`local_hostname, metadata_server,
global_segment_size, local_buffer_size, protocol, device_name, master_server_address`, plus
`transfer_timeout, storage_root_dir, prefer_local_alloc, enable_ssd_offload,
ssd_offload_path, tenant_id, enable_client_http_server, client_http_port`), vLLM v1's (the
same without `local_hostname`, plus `mode`, `enable_offload`) and the legacy pipe's
(`prefill_url, decode_url, metadata_server, metadata_backend, protocol, device_name`).
Sizes are ints or strings like "4GB", "512 MiB", "2147483648".
"""

import json
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

DEFAULT_GLOBAL_SEGMENT_SIZE = 3355443200  # 3.125 GiB, the reference's default
DEFAULT_LOCAL_BUFFER_SIZE = 1073741824  # 1 GiB

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value) -> int:
    """Bytes for an int or a string like "4GB", "4 GiB", "512mb", "1024"."""
    if isinstance(value, bool):
        raise ValueError(f"size {value!r} is not a number")
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", str(value).lower())
    if not m:
        raise ValueError(f"size {value!r} is not a number with an optional K/M/G/T unit")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _bool(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


@dataclass
class MooncakeConfig:
    """A store client's settings; `setup_args()` gives `MooncakeDistributedStore.setup`'s
    seven positional arguments."""

    local_hostname: str
    metadata_server: str
    global_segment_size: int
    local_buffer_size: int
    protocol: str
    device_name: str
    master_server_address: str
    transfer_timeout: float = 1.0
    storage_root_dir: str = ""
    prefer_local_alloc: bool = False
    enable_ssd_offload: bool = False
    ssd_offload_path: str = ""
    tenant_id: str = "default"
    enable_client_http_server: bool = False
    client_http_port: int = 9300
    mode: str = "embedded"
    extra: Dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def from_dict(d: Dict[str, Any]) -> "MooncakeConfig":
        d = dict(d)
        get = d.pop
        master = get("master_server_address", None) or get("master_server_addr", None)
        if master is None:
            raise ValueError("the config names no master_server_address")
        return MooncakeConfig(
            local_hostname=get("local_hostname", None) or os.getenv("MOONCAKE_LOCAL_HOSTNAME")
            or socket.gethostbyname(socket.gethostname()),
            metadata_server=get("metadata_server", "P2PHANDSHAKE"),
            global_segment_size=parse_size(get("global_segment_size", DEFAULT_GLOBAL_SEGMENT_SIZE)),
            local_buffer_size=parse_size(get("local_buffer_size", DEFAULT_LOCAL_BUFFER_SIZE)),
            protocol=get("protocol", "tcp"),
            device_name=get("device_name", None) or get("rdma_devices", "") or "",
            master_server_address=master,
            transfer_timeout=float(get("transfer_timeout", 1.0)),
            storage_root_dir=get("storage_root_dir", ""),
            prefer_local_alloc=_bool(get("prefer_local_alloc", False)),
            enable_ssd_offload=_bool(get("enable_ssd_offload", get("enable_offload", False))),
            ssd_offload_path=get("ssd_offload_path", ""),
            tenant_id=get("tenant_id", "default"),
            enable_client_http_server=_bool(get("enable_client_http_server", False)),
            client_http_port=int(get("client_http_port", 9300)),
            mode=get("mode", "embedded"),
            extra=d,
        )

    @staticmethod
    def from_file(path: str) -> "MooncakeConfig":
        with open(path) as f:
            return MooncakeConfig.from_dict(json.load(f))

    @staticmethod
    def load_from_env() -> "MooncakeConfig":
        """From the JSON at `MOONCAKE_CONFIG_PATH` if set, else from `MOONCAKE_*` variables
        (`MOONCAKE_MASTER` is then required)."""
        path = os.getenv("MOONCAKE_CONFIG_PATH")
        if path:
            return MooncakeConfig.from_file(path)
        master = os.getenv("MOONCAKE_MASTER")
        if not master:
            raise ValueError("set MOONCAKE_CONFIG_PATH or MOONCAKE_MASTER")
        env = os.getenv
        return MooncakeConfig.from_dict(
            {
                "local_hostname": env("MOONCAKE_LOCAL_HOSTNAME") or env("LOCAL_HOSTNAME"),
                "metadata_server": env("MOONCAKE_TE_META_DATA_SERVER", "P2PHANDSHAKE"),
                "global_segment_size": env("MOONCAKE_GLOBAL_SEGMENT_SIZE", DEFAULT_GLOBAL_SEGMENT_SIZE),
                "local_buffer_size": env("MOONCAKE_LOCAL_BUFFER_SIZE", DEFAULT_LOCAL_BUFFER_SIZE),
                "protocol": env("MOONCAKE_PROTOCOL", "tcp"),
                "device_name": env("MOONCAKE_DEVICE", ""),
                "master_server_address": master,
                "enable_ssd_offload": env("MOONCAKE_OFFLOAD_ENABLED", env("MOONCAKE_ENABLE_SSD_OFFLOAD", "0")),
                "ssd_offload_path": env("MOONCAKE_OFFLOAD_FILE_STORAGE_PATH", ""),
                "tenant_id": env("MOONCAKE_TENANT_ID", "default"),
                "enable_client_http_server": env("MOONCAKE_ENABLE_CLIENT_HTTP_SERVER", "0"),
                "client_http_port": env("MOONCAKE_CLIENT_HTTP_PORT", "9300"),
                "storage_root_dir": env("MOONCAKE_STORAGE_ROOT_DIR", ""),
            }
        )

    def setup_args(self):
        """`setup`'s seven positional arguments, in order."""
        return (
            self.local_hostname,
            self.metadata_server,
            self.global_segment_size,
            self.local_buffer_size,
            self.protocol,
            self.device_name,
            self.master_server_address,
        )

    def setup_kwargs(self):
        """`setup`'s keyword arguments."""
        return dict(
            enable_ssd_offload=self.enable_ssd_offload,
            ssd_offload_path=self.ssd_offload_path,
            tenant_id=self.tenant_id,
            enable_client_http_server=self.enable_client_http_server,
            client_http_port=self.client_http_port,
        )


def parse_mooncakestore_url(url: str) -> Dict[str, Any]:
    """LMCache's `mooncakestore://host:port/?device=…` → master address and options."""
    m = re.fullmatch(r"mooncakestore://([^/?]+)/?(?:\?(.*))?", url.strip())
    if not m:
        raise ValueError(f"{url!r} is not mooncakestore://host:port/[?key=value&…]")
    out: Dict[str, Any] = {"master_server_address": m.group(1)}
    for kv in filter(None, (m.group(2) or "").split("&")):
        k, _, v = kv.partition("=")
        out[k] = v
    return out


__all__ = ["MooncakeConfig", "parse_size", "parse_mooncakestore_url"]
