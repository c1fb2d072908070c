"""A tiny decoder-only transformer in numpy (fixed seed, no downloads), used by the tests and
by `python -m mooncake.bench_kv` (the TTFT split), with the block layout helpers of a prefill/decode split.

Model: 2 layers, hidden 64, 4 query heads, 2 KV heads (grouped-query attention), head dim
16, vocab 256, RMSNorm, rotary positions, SiLU MLP; fp32. Greedy decoding.
KV pool (per process): float32 `[layers, 2 (K/V), num_blocks, block_size, kv_heads, head_dim]`.
"""

import hashlib

import numpy as np

LAYERS, HIDDEN, HEADS, KV_HEADS, VOCAB, BLOCK = 2, 64, 4, 2, 256, 16
HEAD_DIM = HIDDEN // HEADS
PROMPT_LEN, NEW_TOKENS = 37, 16
NUM_BLOCKS = 16
BLOCK_BYTES = BLOCK * KV_HEADS * HEAD_DIM * 4


def weights(seed=0):
    rng = np.random.default_rng(seed)
    w = {"embed": rng.standard_normal((VOCAB, HIDDEN), dtype=np.float32) * 0.5}
    for l in range(LAYERS):
        s = 1.0 / np.sqrt(HIDDEN)
        w[f"{l}.q"] = rng.standard_normal((HIDDEN, HEADS * HEAD_DIM), dtype=np.float32) * s
        w[f"{l}.k"] = rng.standard_normal((HIDDEN, KV_HEADS * HEAD_DIM), dtype=np.float32) * s
        w[f"{l}.v"] = rng.standard_normal((HIDDEN, KV_HEADS * HEAD_DIM), dtype=np.float32) * s
        w[f"{l}.o"] = rng.standard_normal((HEADS * HEAD_DIM, HIDDEN), dtype=np.float32) * s
        w[f"{l}.up"] = rng.standard_normal((HIDDEN, 4 * HIDDEN), dtype=np.float32) * s
        w[f"{l}.gate"] = rng.standard_normal((HIDDEN, 4 * HIDDEN), dtype=np.float32) * s
        w[f"{l}.down"] = rng.standard_normal((4 * HIDDEN, HIDDEN), dtype=np.float32) * (s / 2)
    w["head"] = rng.standard_normal((HIDDEN, VOCAB), dtype=np.float32) / np.sqrt(HIDDEN)
    return w


def prompt(seed=1):
    return [int(t) for t in np.random.default_rng(seed).integers(0, VOCAB, PROMPT_LEN)]


def _rms(x):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def _rope(x, pos):
    # x: [T, heads, HEAD_DIM]
    half = HEAD_DIM // 2
    freq = 1.0 / (10000.0 ** (np.arange(half, dtype=np.float32) / half))
    ang = np.asarray(pos, dtype=np.float32)[:, None] * freq[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).astype(np.float32)


def forward(w, tokens, kv, start):
    """Runs `tokens` at positions start.. with cache `kv` (list of [K, V] per layer, each
    [T, KV_HEADS, HEAD_DIM]); returns the last position's logits and the grown cache."""
    pos = list(range(start, start + len(tokens)))
    x = w["embed"][np.asarray(tokens)]
    new = []
    for l in range(LAYERS):
        h = _rms(x)
        q = _rope((h @ w[f"{l}.q"]).reshape(-1, HEADS, HEAD_DIM), pos)
        k = _rope((h @ w[f"{l}.k"]).reshape(-1, KV_HEADS, HEAD_DIM), pos)
        v = (h @ w[f"{l}.v"]).reshape(-1, KV_HEADS, HEAD_DIM)
        K = np.concatenate([kv[l][0], k]) if kv else k
        V = np.concatenate([kv[l][1], v]) if kv else v
        new.append([K.astype(np.float32), V.astype(np.float32)])
        rep = HEADS // KV_HEADS
        Kr, Vr = np.repeat(K, rep, axis=1), np.repeat(V, rep, axis=1)
        att = np.einsum("thd,shd->hts", q, Kr) / np.sqrt(HEAD_DIM)
        T, S = len(tokens), K.shape[0]
        mask = np.arange(S)[None, :] > (np.arange(T)[:, None] + start)
        att = np.where(mask[None], -1e30, att)
        att = np.exp(att - att.max(-1, keepdims=True))
        att = att / att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, Vr).reshape(T, HEADS * HEAD_DIM)
        x = x + o @ w[f"{l}.o"]
        h = _rms(x)
        x = x + ((h @ w[f"{l}.up"]) * (1 / (1 + np.exp(-(h @ w[f"{l}.gate"]))))) @ w[f"{l}.down"]
    return (_rms(x[-1]) @ w["head"]).astype(np.float32), new


def prefill(w, toks):
    logits, kv = forward(w, toks, None, 0)
    return int(np.argmax(logits)), kv


def decode(w, kv, first, n=NEW_TOKENS):
    out, tok, length = [first], first, kv[0][0].shape[0]
    for _ in range(n - 1):
        logits, kv = forward(w, [tok], kv, length)
        length += 1
        tok = int(np.argmax(logits))
        out.append(tok)
    return out


def reference():
    w = weights()
    first, kv = prefill(w, prompt())
    return kv, decode(w, kv, first)


def num_blocks(n_tokens=PROMPT_LEN):
    return (n_tokens + BLOCK - 1) // BLOCK


def new_pool():
    return np.zeros((LAYERS, 2, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM), dtype=np.float32)


def scatter(pool, kv, blocks):
    for l in range(LAYERS):
        for j in range(2):
            t = kv[l][j]
            for i, b in enumerate(blocks):
                chunk = t[i * BLOCK:(i + 1) * BLOCK]
                pool[l, j, b, :len(chunk)] = chunk


def gather(pool, blocks, n_tokens=PROMPT_LEN):
    kv = []
    for l in range(LAYERS):
        pair = []
        for j in range(2):
            t = np.concatenate([pool[l, j, b] for b in blocks])[:n_tokens]
            pair.append(np.ascontiguousarray(t))
        kv.append(pair)
    return kv


def offset(l, j, b):
    return (((l * 2) + j) * NUM_BLOCKS + b) * BLOCK_BYTES


def descriptors(src_base, src_blocks, dst_base, dst_blocks):
    """Per layer, K/V and block: (src, dst, len), runs contiguous on both sides coalesced."""
    src, dst, lens = [], [], []
    for l in range(LAYERS):
        for j in range(2):
            for sb, db in zip(src_blocks, dst_blocks):
                s, d = src_base + offset(l, j, sb), dst_base + offset(l, j, db)
                if src and src[-1] + lens[-1] == s and dst[-1] + lens[-1] == d:
                    lens[-1] += BLOCK_BYTES
                else:
                    src.append(s)
                    dst.append(d)
                    lens.append(BLOCK_BYTES)
    return src, dst, lens


def block_keys(toks, prefix="pd"):
    """One key per block: a hash chained over the tokens up to the block's end."""
    keys, h = [], hashlib.sha256(prefix.encode())
    for i in range(num_blocks(len(toks))):
        h.update(np.asarray(toks[i * BLOCK:(i + 1) * BLOCK], dtype=np.int64).tobytes())
        keys.append(h.copy().hexdigest()[:32])
    return keys


def kv_bytes(kv):
    return [[np.ascontiguousarray(t).tobytes() for t in pair] for pair in kv]
