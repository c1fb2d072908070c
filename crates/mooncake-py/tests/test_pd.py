"""Prefill/decode split of a real (tiny) transformer across processes: the KV bytes the decode
process ends up with equal a single-process reference bit for bit, and so do the tokens."""

import multiprocessing as mp

import pytest

import pdlib as m
import pdworkers as w

CTX = mp.get_context("spawn")
P_BLOCKS = [7, 2, 11]  # shuffled, non-contiguous, and different on each side
D_BLOCKS = [5, 13, 0]


@pytest.fixture(scope="module")
def ref():
    kv, tokens = m.reference()
    return m.kv_bytes(kv), tokens


def spawn(target, *args):
    parent, child = CTX.Pipe()
    p = CTX.Process(target=target, args=(child, *args), daemon=True)
    p.start()
    return p, parent


def finish(*pairs):
    for p, conn in pairs:
        try:
            conn.send("exit")
        except (BrokenPipeError, OSError):
            pass
        p.join(20)
        if p.is_alive():
            p.kill()


@pytest.mark.parametrize("notify", [False, True])
def test_engine_split(ref, notify):
    ref_kv, ref_tokens = ref
    d = spawn(w.decode_engine, D_BLOCKS)
    p = spawn(w.prefill_engine, P_BLOCKS)
    try:
        info = d[1].recv()
        p[1].send({**info, "notify": notify})
        r = p[1].recv()
        assert r["rc"] == 0
        # one descriptor per layer, K/V and block (nothing is contiguous on both sides)
        assert r["descriptors"] == m.LAYERS * 2 * m.num_blocks()
        d[1].send({"first": r["first"]})
        out = d[1].recv()
        assert out["kv"] == ref_kv
        assert out["tokens"] == ref_tokens
        assert len(out["tokens"]) == m.NEW_TOKENS
        if notify:
            assert out["notifies"] == [("prefill", "done")]
    finally:
        finish(p, d)


def test_model_is_not_trivial(ref):
    """The check above could not pass by accident: other bytes give other tokens."""
    _, ref_tokens = ref
    kv, _ = m.reference()
    kv[0][0][3, 0, 0] += 1.0
    assert m.decode(m.weights(), kv, ref_tokens[0]) != ref_tokens
    assert len(set(ref_tokens)) > 3


@pytest.mark.parametrize("mode", ["multi", "session"])
def test_store_split(ref, master, mode):
    ref_kv, ref_tokens = ref
    n = m.num_blocks()
    obj = 2 * m.LAYERS * m.BLOCK_BYTES
    d = spawn(w.store_decode, master.addr, D_BLOCKS, mode)
    p = spawn(w.store_prefill, master.addr, P_BLOCKS, mode)
    try:
        assert d[1].recv() == "ready"
        put = p[1].recv()
        assert put["exist_before"] == [0] * n
        assert put["put"] == [0] * n
        if mode == "session":
            assert put["start"] == [0] * n
            assert put["ranges"] == [[2 * m.BLOCK_BYTES] * n] * m.LAYERS
        d[1].send(put["first"])
        out = d[1].recv()
        assert out["exist"] == [1] * n
        if mode == "multi":
            assert out["got"] == [obj] * n
        else:
            assert out["start"] == [0] * n
            assert out["got"] == [[2 * m.BLOCK_BYTES] * n] * m.LAYERS
            assert out["end"] == 0
        assert out["kv"] == ref_kv
        assert out["tokens"] == ref_tokens
    finally:
        finish(p, d)
