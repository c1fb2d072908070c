"""The prefill/decode split with torch CUDA tensors and a small `transformers` Llama built
from a config (no download). Runs only where torch sees a GPU (the lead's GPU machine):

    python -m pytest -q test_gpu.py

The KV cache lives in a CUDA paged pool on both sides; it crosses processes through
registered pinned host pools (this build's TCP transport moves host memory) with ONE
`batch_transfer_sync_write`. The decode process rebuilds the cache from its own blocks and
generates 16 tokens: bytes and tokens must equal a single-process reference.
"""

import multiprocessing as mp

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA device (this test runs on the GPU machine)", allow_module_level=True)
transformers = pytest.importorskip("transformers")

LAYERS, KV_HEADS, HEAD_DIM, BLOCK, NUM_BLOCKS, PROMPT, NEW = 2, 2, 16, 16, 16, 37, 16
P_BLOCKS, D_BLOCKS = [7, 2, 11], [5, 13, 0]
CTX = mp.get_context("spawn")


def model(dtype):
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=LAYERS, num_attention_heads=4,
                                   num_key_value_heads=KV_HEADS, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to("cuda", dtype).eval()


def prompt():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (1, PROMPT), generator=g).cuda()


def layer_kv(cache, l):
    layer = cache.layers[l]
    return layer.keys[0], layer.values[0]  # [kv_heads, T, head_dim]


@torch.no_grad()
def greedy(m, cache, first, n=NEW):
    out, tok = [first], first
    for _ in range(n - 1):
        logits = m(input_ids=torch.tensor([[tok]], device="cuda"), past_key_values=cache, use_cache=True).logits
        tok = int(logits[0, -1].argmax())
        out.append(tok)
    return out


@torch.no_grad()
def prefill(m):
    r = m(input_ids=prompt(), use_cache=True)
    return int(r.logits[0, -1].argmax()), r.past_key_values


def pool_shape(dtype):
    return (LAYERS, 2, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM)


def scatter(pool, cache):
    for l in range(LAYERS):
        for j, t in enumerate(layer_kv(cache, l)):
            t = t.transpose(0, 1)  # [T, kv_heads, head_dim]
            for i, b in enumerate(P_BLOCKS):
                chunk = t[i * BLOCK:(i + 1) * BLOCK]
                pool[l, j, b, :len(chunk)] = chunk


def gather(pool):
    cache = transformers.DynamicCache()
    for l in range(LAYERS):
        kv = [torch.cat([pool[l, j, b] for b in D_BLOCKS])[:PROMPT].transpose(0, 1).unsqueeze(0).contiguous()
              for j in range(2)]
        cache.update(kv[0], kv[1], l)
    return cache


def decode_proc(conn, dtype):
    import mooncake.engine as me

    te = me.TransferEngine()
    assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    host = torch.zeros(pool_shape(dtype), dtype=dtype).pin_memory()
    assert te.register_memory(host.data_ptr(), host.numel() * host.element_size()) == 0
    conn.send({"session": f"127.0.0.1:{te.get_rpc_port()}", "base": host.data_ptr()})
    first = conn.recv()
    gpu = host.cuda()  # the decode's CUDA paged pool
    cache = gather(gpu)
    kv = [[t.cpu().contiguous().view(torch.uint8).numpy().tobytes() for t in layer_kv(cache, l)] for l in range(LAYERS)]
    conn.send({"kv": kv, "tokens": greedy(model(dtype), cache, first)})


def prefill_proc(conn, dtype):
    import mooncake.engine as me

    te = me.TransferEngine()
    assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    m = model(dtype)
    first, cache = prefill(m)
    gpu = torch.zeros(pool_shape(dtype), dtype=dtype, device="cuda")
    scatter(gpu, cache)
    host = gpu.cpu().pin_memory()
    torch.cuda.synchronize()
    assert te.register_memory(host.data_ptr(), host.numel() * host.element_size()) == 0
    info = conn.recv()
    es = host.element_size()
    blk = BLOCK * KV_HEADS * HEAD_DIM * es

    def off(l, j, b):
        return (((l * 2) + j) * NUM_BLOCKS + b) * blk

    src, dst, lens = [], [], []
    for l in range(LAYERS):
        for j in range(2):
            for sb, db in zip(P_BLOCKS, D_BLOCKS):
                src.append(host.data_ptr() + off(l, j, sb))
                dst.append(info["base"] + off(l, j, db))
                lens.append(blk)
    conn.send({"rc": te.batch_transfer_sync_write(info["session"], src, dst, lens), "first": first})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_split(dtype):
    m = model(dtype)
    first, cache = prefill(m)
    ref_kv = [[t.cpu().contiguous().view(torch.uint8).numpy().tobytes() for t in layer_kv(cache, l)]
              for l in range(LAYERS)]
    ref_tokens = greedy(m, cache, first)
    dp, dc = CTX.Pipe()
    pp, pc = CTX.Pipe()
    d = CTX.Process(target=decode_proc, args=(dc, dtype), daemon=True)
    p = CTX.Process(target=prefill_proc, args=(pc, dtype), daemon=True)
    d.start()
    p.start()
    try:
        pp.send(dp.recv())
        r = pp.recv()
        assert r["rc"] == 0 and r["first"] == first
        dp.send(r["first"])
        out = dp.recv()
        assert out["kv"] == ref_kv
        assert out["tokens"] == ref_tokens
    finally:
        p.join(60)
        d.join(60)


def test_cuda_pointer_is_recognised():
    """A CUDA pointer registered with location `*` is device memory: a host-only transport
    refuses transfers from it (negative code, no crash); one that moves device memory
    delivers the bytes."""
    import mooncake
    import mooncake.engine as me

    a, b = me.TransferEngine(), me.TransferEngine()
    assert a.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    assert b.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    src = torch.arange(4096, dtype=torch.uint8, device="cuda")
    dst = torch.zeros(4096, dtype=torch.uint8).pin_memory()
    assert mooncake.features()["cuda_loaded"]
    assert a.register_memory(src.data_ptr(), 4096, "cpu:0") < 0  # CUDA memory named as host memory
    assert a.register_memory(src.data_ptr(), 4096) == 0
    assert b.register_memory(dst.data_ptr(), 4096) == 0
    rc = a.transfer_sync_write(f"127.0.0.1:{b.get_rpc_port()}", src.data_ptr(), dst.data_ptr(), 4096)
    if mooncake.features()["device_memory_transport"]:
        assert rc == 0 and torch.equal(dst.cuda(), src)
    else:
        assert rc < 0 and int(dst.sum()) == 0
