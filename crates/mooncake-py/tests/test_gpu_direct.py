"""Torch CUDA tensors registered directly (no host copies in the caller): the prefill/decode
split moves KV blocks from the prefill's CUDA paged pool into the decode's CUDA paged pool with
ONE `batch_transfer_sync_write`, over TCP (staged through pinned chunks by the engine) and over
CUDA IPC (`nvlink_intra`, same host); and a store put/get of GPU KV blocks with the zero-copy
calls. Needs a GPU and a wheel with the `cuda` feature (`cargo xtask wheel` builds it so);
skipped elsewhere.

    python -m pytest -q test_gpu_direct.py
"""

import multiprocessing as mp

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA device (this test runs on the GPU machine)", allow_module_level=True)
import mooncake  # noqa: E402

if not mooncake.features().get("device_memory_transport"):
    pytest.skip("this build moves no device memory (a wheel without the cuda feature)",
                allow_module_level=True)
pytest.importorskip("transformers")

from test_gpu import (BLOCK, D_BLOCKS, HEAD_DIM, KV_HEADS, LAYERS, NUM_BLOCKS, P_BLOCKS,  # noqa: E402
                      gather, greedy, layer_kv, model, pool_shape, prefill, scatter)

CTX = mp.get_context("spawn")


def decode_proc(conn, dtype, protocol, device):
    import mooncake.engine as me

    torch.cuda.set_device(device)
    te = me.TransferEngine()
    assert te.initialize("127.0.0.1", "P2PHANDSHAKE", protocol, "") == 0
    pool = torch.zeros(pool_shape(dtype), dtype=dtype, device="cuda")  # the decode's CUDA pool
    torch.cuda.synchronize()
    assert te.register_memory(pool.data_ptr(), pool.numel() * pool.element_size()) == 0
    conn.send({"session": f"127.0.0.1:{te.get_rpc_port()}", "base": pool.data_ptr()})
    first = conn.recv()
    cache = gather(pool)
    kv = [[t.cpu().contiguous().view(torch.uint8).numpy().tobytes() for t in layer_kv(cache, l)] for l in range(LAYERS)]
    conn.send({"kv": kv, "tokens": greedy(model(dtype), cache, first)})
    assert te.unregister_memory(pool.data_ptr()) == 0


def prefill_proc(conn, dtype, protocol):
    import mooncake.engine as me

    te = me.TransferEngine()
    assert te.initialize("127.0.0.1", "P2PHANDSHAKE", protocol, "") == 0
    m = model(dtype)
    first, cache = prefill(m)
    pool = torch.zeros(pool_shape(dtype), dtype=dtype, device="cuda")
    scatter(pool, cache)
    torch.cuda.synchronize()
    assert te.register_memory(pool.data_ptr(), pool.numel() * pool.element_size()) == 0
    info = conn.recv()
    blk = BLOCK * KV_HEADS * HEAD_DIM * pool.element_size()

    def off(l, j, b):
        return (((l * 2) + j) * NUM_BLOCKS + b) * blk

    src, dst, lens = [], [], []
    for l in range(LAYERS):
        for j in range(2):
            for sb, db in zip(P_BLOCKS, D_BLOCKS):
                src.append(pool.data_ptr() + off(l, j, sb))
                dst.append(info["base"] + off(l, j, db))
                lens.append(blk)
    rc = te.batch_transfer_sync_write(info["session"], src, dst, lens)
    conn.send({"rc": rc, "first": first})
    assert te.unregister_memory(pool.data_ptr()) == 0


@pytest.mark.parametrize("protocol", ["tcp", "nvlink_intra"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_split_direct(dtype, protocol):
    m = model(dtype)
    first, cache = prefill(m)
    ref_kv = [[t.cpu().contiguous().view(torch.uint8).numpy().tobytes() for t in layer_kv(cache, l)]
              for l in range(LAYERS)]
    ref_tokens = greedy(m, cache, first)
    # The decode side on the last GPU: with two GPUs the blocks cross NVLink.
    device = torch.cuda.device_count() - 1
    dp, dc = CTX.Pipe()
    pp, pc = CTX.Pipe()
    d = CTX.Process(target=decode_proc, args=(dc, dtype, protocol, device), daemon=True)
    p = CTX.Process(target=prefill_proc, args=(pc, dtype, protocol), daemon=True)
    d.start()
    p.start()
    def recv(conn, proc):
        # A child that failed (an assertion, a crash) never answers: fail instead of waiting.
        while not conn.poll(1):
            assert proc.is_alive(), f"{proc.name} exited with {proc.exitcode}"
        return conn.recv()

    try:
        pp.send(recv(dp, d))
        r = recv(pp, p)
        assert r["rc"] == 0 and r["first"] == first
        dp.send(r["first"])
        out = recv(dp, d)
        assert out["kv"] == ref_kv
        assert out["tokens"] == ref_tokens
    finally:
        p.join(60)
        d.join(60)


def test_store_gpu_kv_blocks(master):
    """GPU KV blocks put from and read back into CUDA tensors with the zero-copy calls (values
    live in the store's host DRAM segments); a second client on another GPU reads them too."""
    import mooncake.engine as me
    import mooncake.store as ms

    def client(seg):
        te = me.TransferEngine()
        assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
        st = ms.MooncakeDistributedStore()
        assert st.setup("127.0.0.1", "P2PHANDSHAKE", seg, 16 << 20, "tcp", "", master.addr, te.get_engine()) == 0
        return te, st

    blocks, blk = 16, 64 << 10
    te_w, w = client(64 << 20)
    te_r, r = client(0)
    g = torch.Generator(device="cuda").manual_seed(3)
    kv = torch.randint(0, 256, (blocks * blk,), dtype=torch.uint8, device="cuda", generator=g)
    out_w = torch.zeros_like(kv)
    last = torch.cuda.device_count() - 1
    out_r = torch.zeros(blocks * blk, dtype=torch.uint8, device=f"cuda:{last}")
    torch.cuda.synchronize()
    for st, t in [(w, kv), (w, out_w), (r, out_r)]:
        assert st.register_buffer(t.data_ptr(), t.numel()) == 0
    keys = [f"gpu-kv-{i}" for i in range(blocks)]
    ptrs = [kv.data_ptr() + i * blk for i in range(blocks)]
    assert w.batch_put_from(keys, ptrs, [blk] * blocks) == [0] * blocks
    assert w.get_into(keys[0], out_w.data_ptr(), blk) == blk
    assert w.batch_get_into(keys[1:], [out_w.data_ptr() + i * blk for i in range(1, blocks)],
                            [blk] * (blocks - 1)) == [blk] * (blocks - 1)
    assert r.batch_get_into(keys, [out_r.data_ptr() + i * blk for i in range(blocks)],
                            [blk] * blocks) == [blk] * blocks
    torch.cuda.synchronize()
    assert torch.equal(out_w, kv)
    assert torch.equal(out_r.to(kv.device), kv)
    for st, t in [(w, kv), (w, out_w), (r, out_r)]:
        assert st.unregister_buffer(t.data_ptr()) == 0
    w.close()
    r.close()
