"""`python -m mooncake.bench_kv`: move a realistic KV cache from a prefill to a decode process.

Default shape: 32 layers, 8 KV heads, head dim 128, bf16, 8192 tokens in 16-token blocks
(1 GiB; K and V of each layer are separate `[blocks, 16, 8, 128]` tensors, as vLLM lays
them out). The prefill process holds the cache at shuffled block ids and the decode process
receives it at other shuffled ids: one `batch_transfer_sync_write` of one descriptor per
(layer, K/V, block) run. Printed in the same run:
- ours: that call, verified block by block on the decode side;
- gloo: `torch.distributed` (gloo) send/recv of the same bytes (if torch is importable);
- pump: a raw socket pump of the same bytes over as many TCP connections as the engine uses,
  straight into the decode process's memory;
- the tiny model's TTFT split: prefill compute, KV transfer, first decode step.
`--json` prints one JSON object as the last line.
"""

import argparse
import json
import multiprocessing as mp
import os
import socket
import threading
import time

import numpy as np

PUMP_CONNS = 4  # the TCP transport's connections per peer (TcpConfig default)


def _layout(a):
    lk = a.layers * 2
    blk = a.block * a.heads * a.head_dim * 2  # bf16
    return lk, blk, lk * a.blocks * blk


def _fill(pool):
    w = pool.view(np.uint64)
    w[:] = np.arange(w.size, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)


def _block_digest(pool, lk, nblocks, ids):
    """Per (layer·K/V, logical block) xor of the block's words, in logical order."""
    v = pool.view(np.uint64).reshape(lk, nblocks, -1)
    return np.bitwise_xor.reduce(v[:, ids, :], axis=2)


def _decode_proc(conn, a):
    import mooncake.engine as me

    lk, blk, total = _layout(a)
    te = me.TransferEngine()
    assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    pool = np.zeros(total, dtype=np.uint8)
    pool[::4096] = 1  # fault the pages in before timing
    assert te.register_memory(pool.ctypes.data, pool.nbytes) == 0
    ids = np.random.default_rng(2).permutation(a.blocks)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(PUMP_CONNS)
    conn.send({"session": f"127.0.0.1:{te.get_rpc_port()}", "base": pool.ctypes.data, "ids": ids.tolist(),
               "pump": srv.getsockname()[1]})
    view = memoryview(pool)
    while True:
        cmd = conn.recv()
        if cmd == "exit":
            return
        if cmd == "digest":
            conn.send(_block_digest(pool, lk, a.blocks, ids))
        elif cmd == "zero":
            pool[:] = 0
            conn.send("ok")
        elif cmd == "pump":
            part = total // PUMP_CONNS

            def recv(c, lo, hi):
                mv = view[lo:hi]
                while len(mv):
                    n = c.recv_into(mv)
                    if n == 0:
                        raise ConnectionError("pump closed early")
                    mv = mv[n:]
                c.sendall(b"k")
                c.close()

            conn.send("listening")
            ths = []
            for _ in range(PUMP_CONNS):
                c, _ = srv.accept()
                i = int.from_bytes(c.recv(1), "little")
                ths.append(threading.Thread(target=recv, args=(c, i * part, total if i == PUMP_CONNS - 1 else (i + 1) * part)))
                ths[-1].start()
            for t in ths:
                t.join()
        elif cmd[0] == "tiny":
            # TTFT split: the decode side of the tiny model
            from mooncake import tiny_model as m

            tpool = m.new_pool()
            assert te.register_memory(tpool.ctypes.data, tpool.nbytes) == 0
            conn.send({"base": tpool.ctypes.data})
            first = conn.recv()
            t = time.perf_counter()
            kv = m.gather(tpool, cmd[1])
            w = m.weights()
            m.forward(w, [first], kv, m.PROMPT_LEN)
            conn.send(time.perf_counter() - t)
            te.unregister_memory(tpool.ctypes.data)
        elif cmd[0] == "gloo":
            conn.send(_gloo(1, cmd[1], pool))


def _gloo(rank, port, pool):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    t = torch.from_numpy(pool)
    dist.barrier()
    start = time.perf_counter()
    if rank == 0:
        dist.send(t, 1)
    else:
        dist.recv(t, 0)
    dist.barrier()
    took = time.perf_counter() - start
    dist.destroy_process_group()
    return took


def _gloo_sender(port, total, out):
    pool = np.zeros(total, dtype=np.uint8)
    _fill(pool)
    out.put(_gloo(0, port, pool))


def run(a):
    import mooncake.engine as me

    ctx = mp.get_context("spawn")
    lk, blk, total = _layout(a)
    parent, child = ctx.Pipe()
    dproc = ctx.Process(target=_decode_proc, args=(child, a), daemon=True)
    dproc.start()
    res = {"bytes": total, "layers": a.layers, "kv_heads": a.heads, "head_dim": a.head_dim,
           "tokens": a.blocks * a.block, "block": a.block}
    try:
        info = parent.recv()
        te = me.TransferEngine()
        assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
        pool = np.zeros(total, dtype=np.uint8)
        _fill(pool)
        assert te.register_memory(pool.ctypes.data, pool.nbytes) == 0
        src_ids = np.random.default_rng(1).permutation(a.blocks)
        dst_ids = np.asarray(info["ids"])
        src, dst, lens = [], [], []
        sb, db = pool.ctypes.data, info["base"]
        for t in range(lk):
            for s_, d_ in zip(src_ids, dst_ids):
                s = sb + (t * a.blocks + int(s_)) * blk
                d = db + (t * a.blocks + int(d_)) * blk
                if src and src[-1] + lens[-1] == s and dst[-1] + lens[-1] == d:
                    lens[-1] += blk
                else:
                    src.append(s)
                    dst.append(d)
                    lens.append(blk)
        res["descriptors"] = len(src)
        times = []
        for i in range(a.iters):
            t = time.perf_counter()
            rc = te.batch_transfer_sync_write(info["session"], src, dst, lens)
            times.append(time.perf_counter() - t)
            assert rc == 0, rc
            if i == 0:
                parent.send("digest")
                assert np.array_equal(parent.recv(), _block_digest(pool, lk, a.blocks, src_ids)), "KV bytes differ"
                res["verified"] = True
        res["ours_s"] = min(times)
        res["ours_gbps"] = total / min(times) / 1e9
        # raw socket pump of the same bytes
        parent.send("zero")
        parent.recv()
        ptimes = []
        view = memoryview(pool)
        part = total // PUMP_CONNS
        for _ in range(a.iters):
            parent.send("pump")
            parent.recv()
            socks = []
            for i in range(PUMP_CONNS):
                c = socket.create_connection(("127.0.0.1", info["pump"]))
                c.sendall(bytes([i]))
                socks.append(c)
            t = time.perf_counter()

            def send(c, lo, hi):
                c.sendall(view[lo:hi])
                assert c.recv(1) == b"k"
                c.close()

            ths = [threading.Thread(target=send, args=(c, i * part, total if i == PUMP_CONNS - 1 else (i + 1) * part))
                   for i, c in enumerate(socks)]
            for th in ths:
                th.start()
            for th in ths:
                th.join()
            ptimes.append(time.perf_counter() - t)
        res["pump_s"] = min(ptimes)
        res["pump_gbps"] = total / min(ptimes) / 1e9
        res["ours_vs_pump"] = res["pump_s"] / res["ours_s"]
        # gloo, if torch is here
        try:
            import torch  # noqa: F401

            have_torch = True
        except ImportError:
            have_torch = False
        if have_torch:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            q = ctx.Queue()
            sender = ctx.Process(target=_gloo_sender, args=(port, total, q), daemon=True)
            sender.start()
            parent.send(("gloo", port))
            recv_s = parent.recv()
            send_s = q.get()
            sender.join()
            res["gloo_s"] = max(recv_s, send_s)
            res["gloo_gbps"] = total / res["gloo_s"] / 1e9
            res["ours_vs_gloo"] = res["gloo_s"] / res["ours_s"]
        else:
            res["gloo"] = "torch is not importable here: not measured"
        # the tiny model's TTFT split
        from mooncake import tiny_model as m

        d_blocks = [5, 13, 0]
        parent.send(("tiny", d_blocks))
        tb = parent.recv()["base"]
        w = m.weights()
        t0 = time.perf_counter()
        first, kv = m.prefill(w, m.prompt())
        t1 = time.perf_counter()
        tpool = m.new_pool()
        m.scatter(tpool, kv, [7, 2, 11])
        assert te.register_memory(tpool.ctypes.data, tpool.nbytes) == 0
        s2, d2, l2 = m.descriptors(tpool.ctypes.data, [7, 2, 11], tb, d_blocks)
        t2 = time.perf_counter()
        assert te.batch_transfer_sync_write(info["session"], s2, d2, l2) == 0
        t3 = time.perf_counter()
        parent.send(first)
        dstep = parent.recv()
        res["ttft_ms"] = {"prefill": (t1 - t0) * 1e3, "kv_transfer": (t3 - t2) * 1e3,
                          "decode_first_step": dstep * 1e3, "kv_bytes": sum(l2)}
    finally:
        try:
            parent.send("exit")
        except OSError:
            pass
        dproc.join(30)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mooncake.bench_kv", description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=8, help="KV heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--iters", type=int, default=3, help="best of this many runs")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    a.blocks = (a.tokens + a.block - 1) // a.block
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    r = run(a)
    gib = r["bytes"] / (1 << 30)
    print(f"KV cache: {a.layers} layers x {a.heads} KV heads x {a.head_dim} dim, bf16, {r['tokens']} tokens "
          f"in {a.block}-token blocks = {gib:.2f} GiB, {r['descriptors']} descriptors (shuffled blocks)")
    print(f"  ours  (batch_transfer_sync_write, TCP): {r['ours_s']*1e3:8.1f} ms  {r['ours_gbps']:6.2f} GB/s  verified")
    print(f"  pump  (raw sockets, {PUMP_CONNS} conns):          {r['pump_s']*1e3:8.1f} ms  {r['pump_gbps']:6.2f} GB/s"
          f"  -> ours/pump {r['ours_vs_pump']:.2f}x")
    if "gloo_s" in r:
        print(f"  gloo  (torch.distributed send/recv):      {r['gloo_s']*1e3:8.1f} ms  {r['gloo_gbps']:6.2f} GB/s"
              f"  -> ours/gloo {r['ours_vs_gloo']:.2f}x")
    else:
        print(f"  gloo: {r['gloo']}")
    t = r["ttft_ms"]
    print(f"  tiny model TTFT split: prefill {t['prefill']:.2f} ms + KV transfer {t['kv_transfer']:.2f} ms "
          f"({t['kv_bytes']} B) + first decode step {t['decode_first_step']:.2f} ms")
    if a.json:
        print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
