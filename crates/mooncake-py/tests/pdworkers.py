"""Prefill and decode processes of the disaggregation tests (spawned, talking over pipes)."""

import numpy as np

import pdlib as m


def engine(host="127.0.0.1"):
    import mooncake.engine as me

    te = me.TransferEngine()
    assert te.initialize(host, "P2PHANDSHAKE", "tcp", "") == 0
    return te


def decode_engine(conn, blocks):
    """Registers a zeroed pool, publishes where KV should go, waits for the prefill's first
    token, then gathers its blocks and generates."""
    te = engine()
    pool = m.new_pool()
    assert te.batch_register_memory([pool.ctypes.data], [pool.nbytes]) == 0
    conn.send({"session": f"127.0.0.1:{te.get_rpc_port()}", "base": pool.ctypes.data, "blocks": blocks})
    while True:
        msg = conn.recv()
        if msg == "exit":
            return
        kv = m.gather(pool, blocks)
        conn.send({"kv": m.kv_bytes(kv), "tokens": m.decode(m.weights(), kv, msg["first"]),
                   "notifies": [(n.name, n.msg) for n in te.get_notifies()]})


def prefill_engine(conn, blocks):
    """Prefills, scatters the cache into its pool at `blocks`, and on each `push` writes it to
    the decode's blocks with ONE batch_transfer_sync_write."""
    te = engine()
    w = m.weights()
    first, kv = m.prefill(w, m.prompt())
    pool = m.new_pool()
    m.scatter(pool, kv, blocks)
    assert te.register_memory(pool.ctypes.data, pool.nbytes) == 0
    while True:
        msg = conn.recv()
        if msg == "exit":
            return
        src, dst, lens = m.descriptors(pool.ctypes.data, blocks, msg["base"], msg["blocks"])
        if msg.get("notify"):
            import mooncake.engine as me

            rc = te.batch_transfer_sync(msg["session"], src, dst, lens, me.TransferOpcode.Write,
                                        me.TransferNotify("prefill", "done"))
        else:
            rc = te.batch_transfer_sync_write(msg["session"], src, dst, lens)
        conn.send({"rc": rc, "first": first, "descriptors": len(src)})


def store(master):
    import mooncake.store as ms

    st = ms.MooncakeDistributedStore()
    rc = st.setup("127.0.0.1", "P2PHANDSHAKE", 64 << 20, 16 << 20, "tcp", "", master)
    assert rc == 0, rc
    return st


def _segments(base, blocks, layers=None):
    ls = range(m.LAYERS) if layers is None else layers
    ptrs = [[base + m.offset(l, j, b) for l in ls for j in range(2)] for b in blocks]
    sizes = [[m.BLOCK_BYTES] * (2 * len(ls)) for _ in blocks]
    return ptrs, sizes


def store_prefill(conn, master, blocks, mode):
    """Puts the prompt's KV by block hash: `multi` with batch_put_from_multi_buffers,
    `session` layer by layer with the session/range calls."""
    import mooncake.store as ms

    st = store(master)
    w = m.weights()
    first, kv = m.prefill(w, m.prompt())
    pool = m.new_pool()
    m.scatter(pool, kv, blocks)
    base = pool.ctypes.data
    assert st.register_buffer(base, pool.nbytes) == 0
    keys = m.block_keys(m.prompt(), mode)
    out = {"first": first, "exist_before": st.batch_is_exist(keys)}
    if mode == "multi":
        ptrs, sizes = _segments(base, blocks)
        out["put"] = st.batch_put_from_multi_buffers(keys, ptrs, sizes)
    else:
        obj = 2 * m.LAYERS * m.BLOCK_BYTES
        out["start"] = st.batch_put_session_start(keys, [obj] * len(keys), ms.ReplicateConfig())
        out["ranges"] = []
        for l in range(m.LAYERS):
            ptrs, sizes = _segments(base, blocks, [l])
            offs = [[(2 * l) * m.BLOCK_BYTES, (2 * l + 1) * m.BLOCK_BYTES] for _ in blocks]
            out["ranges"].append(st.batch_put_from_multi_buffer_ranges(keys, ptrs, sizes, offs))
        out["put"] = st.batch_put_session_end(keys)
    conn.send(out)
    conn.recv()
    st.close()


def store_decode(conn, master, blocks, mode):
    st = store(master)
    pool = m.new_pool()
    base = pool.ctypes.data
    assert st.register_buffer(base, pool.nbytes) == 0
    keys = m.block_keys(m.prompt(), mode)
    conn.send("ready")
    first = conn.recv()
    out = {"exist": st.batch_is_exist(keys)}
    if mode == "multi":
        ptrs, sizes = _segments(base, blocks)
        out["got"] = st.batch_get_into_multi_buffers(keys, ptrs, sizes)
    else:
        out["start"] = st.batch_get_session_start(keys)
        out["got"] = []
        for l in range(m.LAYERS):
            ptrs, sizes = _segments(base, blocks, [l])
            offs = [[(2 * l) * m.BLOCK_BYTES, (2 * l + 1) * m.BLOCK_BYTES] for _ in blocks]
            out["got"].append(st.batch_get_into_multi_buffer_ranges(keys, ptrs, sizes, offs))
        out["end"] = st.batch_get_session_end(keys)
    kv = m.gather(pool, blocks)
    out["kv"] = m.kv_bytes(kv)
    out["tokens"] = m.decode(m.weights(), kv, first)
    conn.send(out)
    conn.recv()
    st.close()


def hold_pool(conn):
    """A peer that registers a pool filled with a pattern and waits (killed by the test)."""
    te = engine()
    pool = np.zeros(1 << 20, dtype=np.uint8)
    assert te.register_memory(pool.ctypes.data, pool.nbytes) == 0
    conn.send({"session": f"127.0.0.1:{te.get_rpc_port()}", "base": pool.ctypes.data})
    while True:
        msg = conn.recv()
        if msg == "exit":
            return
        conn.send(pool[: msg].tobytes())
