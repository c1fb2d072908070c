"""Failure paths: every one returns a negative code (never raises, never crashes) within the
timeout, and the engine keeps working afterwards."""

import multiprocessing as mp
import socket
import threading
import time

import numpy as np
import pytest

import mooncake.engine as me
import mooncake.store as ms
import pdworkers as w
from conftest import Master

CTX = mp.get_context("spawn")


def spawn(target, *args):
    parent, child = CTX.Pipe()
    p = CTX.Process(target=target, args=(child, *args), daemon=True)
    p.start()
    return p, parent


@pytest.fixture(scope="module")
def te():
    t = me.TransferEngine()
    assert t.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    return t


@pytest.fixture(scope="module")
def src(te):
    buf = np.arange(1 << 20, dtype=np.uint32).view(np.uint8)[: 1 << 20].copy()
    assert te.register_memory(buf.ctypes.data, buf.nbytes) == 0
    yield buf
    assert te.unregister_memory(buf.ctypes.data) == 0


def test_unknown_peer_fails_fast(te, src):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nobody listens there
    t = time.time()
    assert te.transfer_sync_write(f"127.0.0.1:{port}", src.ctypes.data, 0x10000, 4096) < 0
    assert te.batch_transfer_sync_read(f"127.0.0.1:{port}", [src.ctypes.data], [0x10000], [64]) < 0
    assert te.transfer_sync_write("no-such-host.invalid:1", src.ctypes.data, 0x10000, 64) < 0
    assert time.time() - t < 10


def test_silent_peer_times_out_without_holding_the_gil(te, src):
    """A peer that accepts connections and never answers: the call returns a negative code
    within the handshake deadline, and other Python threads run meanwhile."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                pass

    acc = threading.Thread(target=accept, daemon=True)
    acc.start()
    result = {}

    def call():
        t = time.time()
        result["rc"] = te.transfer_sync_write(
            f"127.0.0.1:{srv.getsockname()[1]}", src.ctypes.data, 0x10000, 4096)
        result["s"] = time.time() - t

    th = threading.Thread(target=call)
    th.start()
    spins = 0
    while th.is_alive():
        spins += 1  # pure-Python work: only possible while the call released the GIL
        if spins % 10000 == 0:
            time.sleep(0)
    th.join()
    stop.set()
    acc.join()
    for c in held:
        c.close()
    srv.close()
    assert result["rc"] < 0
    assert 1 < result["s"] < 40
    assert spins > 100000


def test_dead_peer(te, src):
    p, conn = spawn(w.hold_pool)
    info = conn.recv()
    assert te.transfer_sync_write(info["session"], src.ctypes.data, info["base"], 4096) == 0
    conn.send(4096)
    assert conn.recv() == src[:4096].tobytes()
    p.kill()
    p.join()
    t = time.time()
    assert te.transfer_sync_write(info["session"], src.ctypes.data, info["base"], 4096) < 0
    assert te.batch_transfer_sync_write(info["session"], [src.ctypes.data], [info["base"]], [4096]) < 0
    assert time.time() - t < 35


def test_outside_registered_region_then_valid(te, src):
    """Rejected ranges fail alone: every valid transfer after them succeeds (the reference
    fails one valid transfer after every few rejected ones)."""
    p, conn = spawn(w.hold_pool)
    try:
        info = conn.recv()
        s, base = info["session"], info["base"]
        for i in range(12):
            assert te.transfer_sync_write(s, src.ctypes.data, base + (1 << 20), 4096) < 0  # past the end
            assert te.transfer_sync_write(s, src.ctypes.data, base + (1 << 20) - 100, 4096) < 0  # straddles
            assert te.transfer_sync_write(s, src.ctypes.data + (1 << 20), base, 4096) < 0  # local past end
            assert te.transfer_sync_write(s, 0x1000, base, 64) < 0  # local unregistered
            off = i * 4096
            assert te.transfer_sync_write(s, src.ctypes.data + off, base + off, 4096) == 0, i
        # a batch with one bad entry fails as a whole, the good entries still land
        assert te.batch_transfer_sync_write(
            s, [src.ctypes.data, src.ctypes.data], [base + (1 << 20), base + 65536], [64, 64]) < 0
        conn.send(65536 + 64)
        got = conn.recv()
        assert got[: 12 * 4096] == src[: 12 * 4096].tobytes()
        assert got[65536:] == src[:64].tobytes()
    finally:
        conn.send("exit")
        p.join(10)


def test_decode_restarted_on_a_new_port(te, src):
    p1, c1 = spawn(w.hold_pool)
    i1 = c1.recv()
    assert te.transfer_sync_write(i1["session"], src.ctypes.data, i1["base"], 4096) == 0
    p1.kill()
    p1.join()
    p2, c2 = spawn(w.hold_pool)
    try:
        i2 = c2.recv()
        assert i2["session"] != i1["session"]
        assert te.transfer_sync_write(i2["session"], src.ctypes.data + 8192, i2["base"], 4096) == 0
        c2.send(4096)
        assert c2.recv() == src[8192:8192 + 4096].tobytes()
    finally:
        c2.send("exit")
        p2.join(10)


def test_async_status_covers_the_whole_batch(te, src):
    p, conn = spawn(w.hold_pool)
    try:
        info = conn.recv()
        s, base = info["session"], info["base"]
        good = te.batch_transfer_async_write(s, [src.ctypes.data] * 4, [base + i * 4096 for i in range(4)], [4096] * 4)
        assert good != 0
        deadline = time.time() + 30
        while (st := te.transfer_check_status(good)) == 0 and time.time() < deadline:
            time.sleep(0.001)
        assert st == 1
        # the bad entry is the LAST one: a status that looks only at the first entry says 1
        bad = te.batch_transfer_async(s, [src.ctypes.data] * 3, [base, base + 4096, base + (2 << 20)], [64] * 3,
                                      me.TransferOpcode.Write)
        assert bad != 0
        deadline = time.time() + 30
        while (st := te.transfer_check_status(bad)) == 0 and time.time() < deadline:
            time.sleep(0.001)
        assert st == -1
        ids = [te.transfer_submit_write(s, src.ctypes.data, base + i * 64, 64) for i in range(8)]
        assert all(ids)
        assert te.get_batch_transfer_status(ids) == 0
        ids = [te.batch_transfer_async_read(s, [src.ctypes.data + 4096], [base], [64]),
               te.batch_transfer_async_read(s, [src.ctypes.data + 4096], [base + (4 << 20)], [64])]
        assert te.get_batch_transfer_status(ids) == -1
        assert te.transfer_check_status(123456789) == -1
    finally:
        conn.send("exit")
        p.join(10)


def test_ten_threads_concurrently(te, src):
    p, conn = spawn(w.hold_pool)
    try:
        info = conn.recv()
        s, base = info["session"], info["base"]
        errors = []

        def worker(t):
            for i in range(40):
                off = (t * 40 + i) * 1024
                rc = te.batch_transfer_sync_write(s, [src.ctypes.data + off], [base + off], [1024])
                if rc != 0:
                    errors.append((t, i, rc))

        ths = [threading.Thread(target=worker, args=(t,)) for t in range(10)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        assert errors == []
        conn.send(400 * 1024)
        assert conn.recv() == src[: 400 * 1024].tobytes()
    finally:
        conn.send("exit")
        p.join(10)


def test_registration_errors(te):
    buf = np.zeros(8192, dtype=np.uint8)
    a = buf.ctypes.data
    assert te.register_memory(0, 4096) < 0
    assert te.register_memory(a, 0) < 0
    assert te.register_memory(0x10, 4096) < 0  # not mapped: refused, no crash later
    assert te.register_memory(a, 8192) == 0
    assert te.register_memory(a, 8192) < 0  # the same region twice
    assert te.register_memory(a + 4096, 4096) < 0  # overlapping
    assert te.unregister_memory(a) == 0
    assert te.unregister_memory(a) < 0
    assert te.batch_register_memory([a, 0x10], [4096, 4096]) < 0
    assert te.register_memory(a, 4096) == 0  # the failed batch left nothing behind
    assert te.unregister_memory(a) == 0


def test_store_full_then_eviction():
    """Leased objects cannot be evicted: a put into a full pool gets -200. Once the leases
    end, the next put evicts and succeeds."""
    m = Master("--default_kv_lease_ttl=1500", "--ramp_up_ms=0", "--eviction_high_watermark_ratio=1.0")
    st = ms.MooncakeDistributedStore()
    try:
        assert st.setup("127.0.0.1", "P2PHANDSHAKE", 4 << 20, 1 << 20, "tcp", "", m.addr) == 0
        buf = np.arange(5 << 20, dtype=np.uint64).view(np.uint8)[: 5 << 20].copy()
        out = np.zeros(1 << 20, dtype=np.uint8)
        assert st.register_buffer(buf.ctypes.data, buf.nbytes) == 0
        assert st.register_buffer(out.ctypes.data, out.nbytes) == 0
        mib = 1 << 20
        keys = [f"full-{i}" for i in range(4)]
        assert st.batch_put_from(keys, [buf.ctypes.data + i * mib for i in range(4)], [mib] * 4) == [0] * 4
        # read each (a read lease), then the pool has nothing to evict
        for k in keys:
            assert st.get_into(k, out.ctypes.data, mib) == mib
        assert st.put_from("full-4", buf.ctypes.data + 4 * mib, mib) == -200
        time.sleep(2.0)
        assert st.put_from("full-4", buf.ctypes.data + 4 * mib, mib) == 0
        assert st.get_into("full-4", out.ctypes.data, mib) == mib
        assert out.tobytes() == buf[4 * mib:].tobytes()
        assert sum(st.batch_is_exist(keys)) == 3  # one was evicted for it
    finally:
        st.close()
        m.stop()
