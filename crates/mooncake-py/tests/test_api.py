"""API conformance: every call the integrations make, positional and keyword as they write
them, the attribute probes they make, return codes, config loading, console scripts."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import mooncake.engine as me
import mooncake.store as ms
from mooncake import cli
from mooncake.mooncake_config import MooncakeConfig, parse_mooncakestore_url, parse_size

ENGINE_METHODS = [
    "initialize", "initialize_ext", "get_rpc_port", "register_memory", "unregister_memory",
    "batch_register_memory", "batch_unregister_memory", "transfer_sync_write",
    "transfer_sync_read", "batch_transfer_sync_write", "batch_transfer_sync_read",
    "transfer_sync", "batch_transfer_sync", "transfer_submit_write",
    "batch_transfer_async_write", "batch_transfer_async_read", "batch_transfer_async",
    "transfer_check_status", "get_batch_transfer_status", "get_first_buffer_address",
    "get_notifies", "send_probe", "get_engine", "get_engine_ptr", "get_local_topology",
    "allocate_managed_buffer", "free_managed_buffer", "write_bytes_to_buffer",
    "read_bytes_from_buffer", "warmup_efa_segment",
]
SESSION_CALLS = [  # vLLM's layer-wise path needs all seven
    "batch_put_session_start", "batch_put_session_end", "batch_put_session_revoke",
    "batch_get_session_start", "batch_get_session_end",
    "batch_put_from_multi_buffer_ranges", "batch_get_into_multi_buffer_ranges",
]
STORE_METHODS = SESSION_CALLS + [
    "setup", "setup_dummy", "get_hostname", "health_check", "register_buffer",
    "unregister_buffer", "put", "get", "put_from", "get_into", "batch_put_from",
    "batch_get_into", "batch_put_from_multi_buffers", "batch_get_into_multi_buffers",
    "batch_is_exist", "is_exist", "get_buffer", "batch_get_buffer", "batch_get_replica_desc",
    "get_replica_desc", "remove", "remove_all", "batch_remove", "put_parts", "close",
    "get_size", "put_batch", "get_batch", "upsert", "upsert_from", "batch_upsert_from",
]


def test_import_does_not_load_native():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, mooncake; print('mooncake._native' in sys.modules)"],
        capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_module_surface():
    for name in ENGINE_METHODS:
        assert hasattr(me.TransferEngine, name), name
    for name in STORE_METHODS:
        assert hasattr(ms.MooncakeDistributedStore, name), name
    # SGLang probes these; Mooncake HEAD has neither, so neither do we.
    for name in ["batch_get_session_start_with_sources", "record_prefetched_tokens"]:
        assert not hasattr(ms.MooncakeDistributedStore, name)
    assert me.TransferOpcode.Read != me.TransferOpcode.Write
    assert int(me.TransferOpcode.Read) == 0 and int(me.TransferOpcode.Write) == 1
    assert me.Read == me.TransferOpcode.Read and me.Write == me.TransferOpcode.Write
    assert me.TransferEngine.TransferOpcode is me.TransferOpcode
    for flag in ["SUPPORT_CUDA", "SUPPORT_EFA", "SUPPORT_HIP", "SUPPORT_MNNVL", "SUPPORT_MUSA",
                 "SUPPORT_INTRA_NVLINK"]:
        assert getattr(me, flag) in (True, False)
    n = me.TransferNotify("a", "b")
    assert (n.name, n.msg) == ("a", "b")
    n.msg = "c"
    assert me.TransferNotify().name == "" and n.msg == "c"
    c = ms.ReplicateConfig()
    assert c.replica_num == 1 and c.group_ids is None and c.preferred_segment == ""
    c.replica_num, c.preferred_segment, c.preferred_segments = 2, "h:1", ["h:2"]
    c.prefer_alloc_in_same_node, c.with_hard_pin = True, True
    c.soft_pin_action, c.soft_pin_ttl_ms = ms.SoftPinAction.ENABLE, 500
    c.group_ids, c.data_type = ["g"], ms.ObjectDataType.KVCACHE
    assert (c.replica_num, c.preferred_segments, c.group_ids, c.soft_pin_ttl_ms) == (2, ["h:2"], ["g"], 500)
    assert "replica_num: 2" in str(c)
    assert ms.COMPLETE == ms.ReplicaStatus.COMPLETE and ms.KVCACHE == ms.ObjectDataType.KVCACHE
    a = ms.MooncakeHostMemAllocator()
    p = a.alloc(1 << 20)
    assert p != 0
    np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * 16).from_address(p))[:] = 7
    assert a.free(p) == 0 and a.free(p) == -1
    assert mooncake_features()["transports"][0] == "tcp"


def mooncake_features():
    import mooncake

    return mooncake.features()


@pytest.fixture(scope="module")
def pair():
    a, b = me.TransferEngine(), me.TransferEngine()
    # positional (vLLM, SGLang, checkpoint-engine), keyword, and initialize_ext
    assert a.initialize("127.0.0.1", "P2PHANDSHAKE", "rdma", "") == 0  # no RDMA here: TCP
    assert b.initialize_ext("127.0.0.1:12345", "P2PHANDSHAKE", "tcp", "", "p2p") == 0
    return a, b


def test_engine_calls(pair):
    a, b = pair
    lo, hi = 15000, 17000
    assert lo <= a.get_rpc_port() <= hi and a.get_rpc_port() != b.get_rpc_port()
    assert b.get_local_name() == f"127.0.0.1:{b.get_rpc_port()}"  # the port of the name is ignored
    src = np.random.default_rng(0).integers(0, 255, 1 << 16, dtype=np.uint8)
    dst = np.zeros(1 << 16, dtype=np.uint8)
    assert a.register_memory(src.ctypes.data, src.nbytes) == 0
    assert b.batch_register_memory(buffer_addresses=[dst.ctypes.data], capacities=[dst.nbytes], location="cpu:0") == 0
    peer = f"127.0.0.1:{b.get_rpc_port()}"
    assert a.get_first_buffer_address(peer) == dst.ctypes.data
    assert a.get_first_buffer_address("127.0.0.1:1") == 0
    s, d = src.ctypes.data, dst.ctypes.data
    assert a.transfer_sync_write(peer, s, d, 1024) == 0
    assert a.transfer_sync_write(target_hostname=peer, buffer=s + 1024, peer_buffer_address=d + 1024,
                                 length=1024, transport_hint="") == 0
    assert a.batch_transfer_sync_write(peer, [s + 2048, s + 4096], [d + 2048, d + 4096], [2048, 1024]) == 0
    assert a.batch_transfer_sync_write(target_hostname=peer, buffers=[s + 5120], peer_buffer_addresses=[d + 5120],
                                       lengths=[3072]) == 0
    assert a.transfer_sync(peer, s + 8192, d + 8192, 4096, me.TransferOpcode.Write) == 0
    assert a.batch_transfer_sync(peer, [s + 12288], [d + 12288], [4096], me.TransferOpcode.Write,
                                 notify=me.TransferNotify("n1", "m1")) == 0
    assert dst[:16384].tobytes() == src[:16384].tobytes()
    # reads back into a fresh local area
    back = np.zeros(16384, dtype=np.uint8)
    assert a.register_memory(back.ctypes.data, back.nbytes, "*") == 0
    assert a.transfer_sync_read(peer, back.ctypes.data, d, 8192) == 0
    assert a.batch_transfer_sync_read(peer, [back.ctypes.data + 8192], [d + 8192], [8192]) == 0
    assert back.tobytes() == src[:16384].tobytes()
    assert a.transfer_sync(peer, back.ctypes.data, d, 64, me.TransferOpcode.Read, None) == 0
    assert b.get_notifies()[0].name == "n1" and b.get_notifies() == []
    # empty batch
    assert a.batch_transfer_sync_write(peer, [], [], []) == 0
    # mismatched lengths
    assert a.batch_transfer_sync_write(peer, [s], [d, d], [64]) < 0
    assert a.send_probe(peer) == 0
    assert a.send_probe("127.0.0.1:1") != 0
    assert isinstance(a.get_engine_ptr(), int) and a.get_engine_ptr() != 0
    assert "cpu:0" in json.loads(a.get_local_topology())
    assert a.warmup_efa_segment(peer) == 0
    # managed buffers (legacy vLLM v0 pipe)
    mb = b.allocate_managed_buffer(4096)
    assert mb != 0
    assert b.write_bytes_to_buffer(mb, b"hello", 5) == 0
    assert a.transfer_sync_read(peer, back.ctypes.data, mb, 5) == 0
    assert back[:5].tobytes() == b"hello"
    assert b.read_bytes_from_buffer(mb, 5) == b"hello"
    assert b.read_bytes_from_buffer(0x10, 5) == b""  # not registered: empty, no crash
    assert b.write_bytes_to_buffer(0x10, b"x", 1) < 0
    assert b.free_managed_buffer(mb, 4096) == 0
    assert a.batch_unregister_memory([src.ctypes.data, back.ctypes.data]) == 0
    assert b.unregister_memory(dst.ctypes.data) == 0


def test_uninitialised_engine_returns_codes():
    t = me.TransferEngine()
    assert t.get_rpc_port() == -1
    assert t.transfer_sync_write("x:1", 1, 1, 1) < 0
    assert t.register_memory(1, 1) < 0
    assert t.transfer_submit_write("x:1", 1, 1, 1) == 0
    assert t.initialize("127.0.0.1", "http://127.0.0.1:1/metadata", "tcp", "") < 0


def test_metadata_server_mode(tmp_path):
    """Segment names verbatim and descriptors through Mooncake's HTTP metadata API."""
    from conftest import free_port

    port = free_port()
    srv = subprocess.Popen([cli.binary(), "metadata-server", "--port", str(port), "--host", "127.0.0.1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/metadata"
        a, b = me.TransferEngine(), me.TransferEngine()
        for _ in range(100):
            if a.initialize("127.0.0.1:20001", url, "tcp", "") == 0:
                break
            time.sleep(0.1)
        assert b.initialize_ext("127.0.0.1:20002", f"127.0.0.1:{port}/metadata", "tcp", "", "http") == 0
        assert b.get_local_name() == "127.0.0.1:20002"  # verbatim: the name, not the RPC port
        src = np.arange(4096, dtype=np.uint8) % 251
        dst = np.zeros(4096, dtype=np.uint8)
        assert a.register_memory(src.ctypes.data, src.nbytes) == 0
        assert b.register_memory(dst.ctypes.data, dst.nbytes) == 0
        assert a.transfer_sync(peer := "127.0.0.1:20002", src.ctypes.data, dst.ctypes.data, 4096, me.Write,
                               me.TransferNotify("a", "hi")) == 0
        assert dst.tobytes() == src.tobytes()
        assert [(n.name, n.msg) for n in b.get_notifies()] == [("a", "hi")]
        assert a.send_probe(peer) == 0
        del a, b
    finally:
        srv.terminate()
        srv.wait()


def test_store_calls(master):
    st = ms.MooncakeDistributedStore()
    assert st.health_check() == 1
    assert st.is_exist("k") == -1 and st.get("k") == b""
    with pytest.raises(TypeError, match="bogus_option"):
        st.setup("127.0.0.1", "P2PHANDSHAKE", 16 << 20, 16 << 20, "tcp", "", master.addr, bogus_option=1)
    te = me.TransferEngine()
    assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    # SGLang's form: 7 positional + the engine + keywords
    assert st.setup("127.0.0.1", "P2PHANDSHAKE", 16 << 20, 16 << 20, "tcp", "", master.addr, te.get_engine(),
                    enable_ssd_offload=False, ssd_offload_path="", tenant_id="api-test",
                    enable_client_http_server=False, client_http_port=9300) == 0
    assert st.get_hostname() == f"127.0.0.1:{te.get_rpc_port()}"  # the shared engine's segment
    assert st.health_check() == 0
    assert st.remove_all(force=True) >= 0
    cfg = ms.ReplicateConfig()
    cfg.replica_num = 1
    cfg.preferred_segment = st.get_hostname()
    assert st.put("k1", b"v" * 100, cfg) == 0
    assert st.put("k2", bytearray(b"w" * 10)) == 0
    assert st.put("k3", np.arange(5, dtype=np.uint8), config=cfg) == 0
    assert st.get("k1") == b"v" * 100 and st.get("k3") == bytes(range(5))
    assert st.get("missing") == b""
    assert st.is_exist("k1") == 1 and st.is_exist("missing") == 0
    assert st.batch_is_exist(["k1", "missing", "k2"]) == [1, 0, 1]
    assert st.get_size("k1") == 100 and st.get_size("missing") == -704
    h = st.get_buffer("k2")
    assert bytes(h) == b"w" * 10 and h.size() == 10 and h.ptr() != 0
    assert st.get_buffer("missing") is None
    assert [None if x is None else bytes(x) for x in st.batch_get_buffer(["k1", "missing"])] == [b"v" * 100, None]
    assert st.put_parts("parts", b"ab", memoryview(b"cd"), bytearray(b"ef"), config=cfg) == 0
    assert st.get("parts") == b"abcdef"
    assert st.put_batch(["b1", "b2"], [b"1", b"22"]) == 0 and st.get_batch(["b1", "b2", "zz"]) == [b"1", b"22", b""]
    assert st.upsert("k1", b"new") == 0 and st.get("k1") == b"new"
    # zero-copy
    buf = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)[: 1 << 16].copy()
    out = np.zeros(1 << 16, dtype=np.uint8)
    assert st.register_buffer(buf.ctypes.data, buf.nbytes) == 0
    assert st.register_buffer(buffer_ptr=out.ctypes.data, size=out.nbytes) == 0
    b, o = buf.ctypes.data, out.ctypes.data
    assert st.put_from("z1", b, 4096, cfg) == 0
    assert st.put_from(key="z2", buffer_ptr=b + 4096, size=4096, config=cfg) == 0
    assert st.get_into("z1", o, 4096) == 4096
    assert st.get_into("z1", o, 100) == -600  # buffer too small
    assert st.get_into("nope", o, 4096) == -704
    assert st.batch_put_from(["z3", "z4"], [b + 8192, b + 12288], [4096, 4096]) == [0, 0]
    assert st.batch_get_into(["z2", "z3", "nope"], [o + 4096, o + 8192, o + 12288], [4096, 4096, 4096]) == [4096, 4096, -704]
    assert out[:12288].tobytes() == buf[:12288].tobytes()
    assert st.batch_put_from_multi_buffers(["m1"], [[b, b + 8192]], [[100, 200]], cfg) == [0]
    assert st.batch_get_into_multi_buffers(["m1"], [[o + 20000, o + 30000]], [[150, 150]]) == [300]
    assert out[20000:20100].tobytes() == buf[:100].tobytes()
    assert out[20100:20150].tobytes() == buf[8192:8242].tobytes()
    assert st.batch_get_into_multi_buffers(["m1"], [[o]], [[10, 20]]) == [-600]
    desc = st.batch_get_replica_desc(["z1", "nope"])
    assert desc["nope"] == [] and len(desc["z1"]) == 1
    r = desc["z1"][0]
    assert r.is_memory_replica() and not r.is_disk_replica() and not r.is_local_disk_replica()
    assert r.status == ms.ReplicaStatus.COMPLETE
    assert r.get_memory_descriptor().buffer_descriptor.size == 4096
    assert len(st.get_replica_desc("z1")) == 1
    # sessions, key by key: end some keys, revoke others, of one session
    keys = ["s1", "s2", "s3"]
    assert st.batch_put_session_start(keys, [200, 200, 200], cfg) == [0, 0, 0]
    assert st.batch_put_session_start(["s1"], [200]) == [-600]  # already in a session
    assert st.batch_put_from_multi_buffer_ranges(keys, [[b, b + 100]] * 3, [[100, 100]] * 3, [[0, 100]] * 3) == [200] * 3
    assert st.batch_put_session_revoke(["s2"]) == [0]
    assert st.batch_put_session_end(["s1", "s3"]) == [0, 0]
    assert st.batch_put_session_end(["s1"]) == [-600]  # no longer in a session
    assert st.batch_is_exist(keys) == [1, 0, 1]
    assert st.batch_get_session_start(["s1", "s2"]) == [0, -704]
    assert st.batch_get_into_multi_buffer_ranges(["s1"], [[o + 40000]], [[50]], [[150]]) == [50]
    assert out[40000:40050].tobytes() == buf[150:200].tobytes()
    assert st.batch_get_session_end(["s1"]) == 0
    assert st.batch_get_into_multi_buffer_ranges(["s1"], [[o]], [[50]], [[0]]) == [-600]
    # remove
    assert st.remove("z4") == 0 and st.remove("z4") == -704
    assert st.batch_remove(["z3", "nope"], force=True) == [0, -704]
    assert st.remove_all() >= 0  # leaves the objects read within the lease (k1, z1)
    assert st.batch_is_exist(["k1", "z1"]) == [1, 1]
    assert st.remove("k1") == -706  # under a read lease
    assert st.remove_all(force=True) >= 2
    assert st.batch_is_exist(["k1", "z1"]) == [0, 0]
    assert st.unregister_buffer(out.ctypes.data) == 0
    assert st.unregister_buffer(buf.ctypes.data) == 0
    assert st.close() == 0
    assert st.health_check() == 1


def test_setup_dict_and_config(master, tmp_path, monkeypatch):
    st = ms.MooncakeDistributedStore()
    assert st.setup({"local_hostname": "127.0.0.1", "metadata_server": "P2PHANDSHAKE",
                     "global_segment_size": "8MB", "local_buffer_size": "4 MiB", "protocol": "tcp",
                     "master_server_addr": master.addr, "tenant_id": "dict"}) == 0
    assert st.put("d", b"x") == 0 and st.get("d") == b"x"
    assert st.close() == 0
    assert parse_size("4GB") == 4 << 30 and parse_size("512 MiB") == 512 << 20 and parse_size(7) == 7
    assert parse_size("2147483648") == 2 << 30
    p = tmp_path / "mc.json"
    p.write_text(json.dumps({"local_hostname": "127.0.0.1", "metadata_server": "P2PHANDSHAKE",
                             "global_segment_size": "8MB", "local_buffer_size": 4194304, "protocol": "tcp",
                             "device_name": "", "master_server_address": master.addr}))
    monkeypatch.setenv("MOONCAKE_CONFIG_PATH", str(p))
    c = MooncakeConfig.load_from_env()
    assert c.global_segment_size == 8 << 20 and c.master_server_address == master.addr
    st = ms.MooncakeDistributedStore()
    assert st.setup(*c.setup_args(), **c.setup_kwargs()) == 0
    assert st.close() == 0
    monkeypatch.delenv("MOONCAKE_CONFIG_PATH")
    monkeypatch.setenv("MOONCAKE_MASTER", master.addr)
    monkeypatch.setenv("MOONCAKE_GLOBAL_SEGMENT_SIZE", "1gb")
    monkeypatch.setenv("MOONCAKE_PROTOCOL", "rdma")
    c = MooncakeConfig.load_from_env()
    assert (c.global_segment_size, c.protocol, c.metadata_server) == (1 << 30, "rdma", "P2PHANDSHAKE")
    # vLLM v1 dialect: no local_hostname, mode
    c = MooncakeConfig.from_dict({"metadata_server": "P2PHANDSHAKE", "master_server_address": "h:1",
                                  "global_segment_size": 0, "mode": "standalone-store"})
    assert c.mode == "standalone-store" and c.global_segment_size == 0
    assert parse_mooncakestore_url("mooncakestore://m:50051/?device=mlx5_0") == {
        "master_server_address": "m:50051", "device": "mlx5_0"}
    st = ms.MooncakeDistributedStore()
    assert st.setup("127.0.0.1", "P2PHANDSHAKE", 0, 1 << 20, "tcp", "", "127.0.0.1:1") < 0  # no master


def test_setup_dummy_attaches_to_a_store_node(master):
    import socket as so

    with so.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = subprocess.Popen(
        [cli.binary(), "store-node", *cli.client_args(
            ["--master_server_address", master.addr, "--global_segment_size=16MB", "--port", str(port)])],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "store-node ready" in node.stdout.readline()
        st = ms.MooncakeDistributedStore()
        assert st.setup_dummy(0, 4 << 20, f"127.0.0.1:{port}", master_server_addr=master.addr) == 0
        buf = np.arange(1 << 20, dtype=np.uint32).view(np.uint8)[: 1 << 20].copy()
        out = np.zeros_like(buf)
        assert st.register_buffer(buf.ctypes.data, buf.nbytes) == 0
        assert st.register_buffer(out.ctypes.data, out.nbytes) == 0
        assert st.put_from("dummy", buf.ctypes.data, buf.nbytes) == 0
        assert st.get_into("dummy", out.ctypes.data, out.nbytes) == buf.nbytes
        assert out.tobytes() == buf.tobytes()
        assert st.close() == 0
        assert ms.MooncakeDistributedStore().setup_dummy(0, 1 << 20, "/nonexistent.sock", master_server_addr=master.addr) < 0
    finally:
        node.terminate()
        node.wait()


def test_console_scripts():
    bindir = os.path.dirname(sys.executable)
    for s in ["mooncake_master", "mooncake_http_metadata_server", "mooncake_client"]:
        assert shutil.which(s, path=bindir), s
    out = subprocess.run([os.path.join(bindir, "mooncake_master"), "--help"], capture_output=True, text=True)
    assert "rpc_port" in out.stdout + out.stderr
    assert cli.client_args(["--master_server_address=m:1", "--global_segment_size", "4GB", "--port", "9",
                            "--protocol=tcp", "--unknown=1"]) == [
        "--master", "m:1", "--segment-size", "4GB", "--protocol", "tcp", "--socket", "/tmp/mooncake-client-9.sock"]
