//! vLLM's prefix-cache block hashes, so a request given as token ids maps to the same block
//! keys the engines report in their KV events.
//!
//! vLLM (`vllm/v1/core/kv_cache_utils.py`) hashes each *full* block of `block_size` tokens as
//! `hash_fn((parent_block_hash, tuple(block_token_ids), extra_keys))`, the first block's parent
//! being `NONE_HASH = hash_fn(seed)` with `seed = "vllm-none-hash"` for the cryptographic
//! algorithms (or `PYTHONHASHSEED` when set). `hash_fn` is `--prefix-caching-hash-algo`:
//!
//! - `sha256` (the default): SHA-256 of `pickle.dumps(obj, protocol=5)`;
//! - `sha256_cbor`: SHA-256 of `cbor2.dumps(obj, canonical=True)`.
//!
//! Events carry the 32-byte digest, or its low 64 bits as an integer under
//! `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES` (`int.from_bytes(h, "big") & (2⁶⁴ − 1)`); the
//! Conductor keys its index by those 64 bits ([`digest_to_u64`]). Requests with extra keys
//! (LoRA, multimodal inputs, `cache_salt`) hash differently; send their block hashes instead.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `NONE_HASH` seed of vLLM's cryptographic hash algorithms.
pub const DEFAULT_NONE_HASH_SEED: &str = "vllm-none-hash";

/// vLLM's `--prefix-caching-hash-algo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashAlgo {
    /// SHA-256 over pickle protocol 5 (vLLM's default).
    #[default]
    Sha256,
    /// SHA-256 over canonical CBOR.
    Sha256Cbor,
}

impl std::str::FromStr for HashAlgo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sha256" => Ok(Self::Sha256),
            "sha256_cbor" | "sha256-cbor" => Ok(Self::Sha256Cbor),
            _ => Err(format!(
                "unknown hash algorithm `{s}` (expected sha256 or sha256_cbor)"
            )),
        }
    }
}

/// The low 64 bits of a digest, as vLLM converts block hashes to integers.
pub fn digest_to_u64(digest: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = digest.len().min(8);
    b[8 - n..].copy_from_slice(&digest[digest.len() - n..]);
    u64::from_be_bytes(b)
}

/// Computes vLLM block hashes of token sequences.
#[derive(Debug, Clone)]
pub struct BlockHasher {
    algo: HashAlgo,
    none_hash: [u8; 32],
}

impl BlockHasher {
    /// A hasher for `algo` with `NONE_HASH` derived from `seed` (vLLM's
    /// [`DEFAULT_NONE_HASH_SEED`], or the engines' `PYTHONHASHSEED`).
    pub fn new(algo: HashAlgo, seed: &str) -> Self {
        let mut buf = Vec::with_capacity(seed.len() + 16);
        match algo {
            HashAlgo::Sha256 => {
                let mut body = Vec::new();
                pickle_str(&mut body, seed);
                body.push(0x94); // MEMOIZE
                body.push(b'.');
                pickle_frame(&mut buf, &body);
            }
            HashAlgo::Sha256Cbor => cbor_head(&mut buf, 3, seed.len() as u64, seed.as_bytes()),
        }
        Self {
            algo,
            none_hash: Sha256::digest(&buf).into(),
        }
    }

    /// `NONE_HASH`: the parent digest of a prompt's first block.
    pub fn none_hash(&self) -> [u8; 32] {
        self.none_hash
    }

    /// The algorithm.
    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    /// The digest of one block given its parent's digest.
    pub fn block_digest(&self, parent: &[u8; 32], tokens: &[u32]) -> [u8; 32] {
        let mut buf = Vec::with_capacity(48 + tokens.len() * 5);
        match self.algo {
            HashAlgo::Sha256 => {
                let mut body = Vec::with_capacity(48 + tokens.len() * 5);
                // (parent: bytes, tokens: tuple[int, ...], None), each container memoized.
                body.push(b'C');
                body.push(32);
                body.extend_from_slice(parent);
                body.push(0x94);
                match tokens.len() {
                    0 => body.push(b')'),
                    1..=3 => {
                        for &t in tokens {
                            pickle_int(&mut body, t);
                        }
                        body.push(0x84 + tokens.len() as u8);
                    }
                    _ => {
                        body.push(b'(');
                        for &t in tokens {
                            pickle_int(&mut body, t);
                        }
                        body.push(b't');
                    }
                }
                if !tokens.is_empty() {
                    body.push(0x94);
                }
                body.push(b'N');
                body.push(0x87); // TUPLE3
                body.push(0x94);
                body.push(b'.');
                pickle_frame(&mut buf, &body);
            }
            HashAlgo::Sha256Cbor => {
                buf.push(0x83);
                cbor_head(&mut buf, 2, 32, parent);
                cbor_head(&mut buf, 4, tokens.len() as u64, &[]);
                for &t in tokens {
                    cbor_head(&mut buf, 0, u64::from(t), &[]);
                }
                buf.push(0xf6);
            }
        }
        Sha256::digest(&buf).into()
    }

    /// The 64-bit block hashes of every full block of `tokens`, chained from `NONE_HASH`.
    pub fn block_hashes(&self, tokens: &[u32], block_size: usize) -> Vec<u64> {
        if block_size == 0 {
            return Vec::new();
        }
        let mut parent = self.none_hash;
        tokens
            .chunks_exact(block_size)
            .map(|b| {
                parent = self.block_digest(&parent, b);
                digest_to_u64(&parent)
            })
            .collect()
    }
}

impl Default for BlockHasher {
    fn default() -> Self {
        Self::new(HashAlgo::Sha256, DEFAULT_NONE_HASH_SEED)
    }
}

/// `PROTO 5`, then `body` in one frame (the pickler frames anything of 4 bytes or more).
fn pickle_frame(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&[0x80, 5]);
    if body.len() >= 4 {
        out.push(0x95);
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    }
    out.extend_from_slice(body);
}

fn pickle_str(out: &mut Vec<u8>, s: &str) {
    if s.len() < 256 {
        out.push(0x8c); // SHORT_BINUNICODE
        out.push(s.len() as u8);
    } else {
        out.push(b'X'); // BINUNICODE
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(s.as_bytes());
}

fn pickle_int(out: &mut Vec<u8>, t: u32) {
    if t < 256 {
        out.push(b'K');
        out.push(t as u8);
    } else if t < 65536 {
        out.push(b'M');
        out.extend_from_slice(&(t as u16).to_le_bytes());
    } else if t <= i32::MAX as u32 {
        out.push(b'J');
        out.extend_from_slice(&(t as i32).to_le_bytes());
    } else {
        // LONG1: little-endian two's complement, 5 bytes for 2³¹ ≤ t < 2³².
        out.push(0x8a);
        out.push(5);
        out.extend_from_slice(&u64::from(t).to_le_bytes()[..5]);
    }
}

/// A CBOR head of major type `major` with argument `n`, then `payload`.
fn cbor_head(out: &mut Vec<u8>, major: u8, n: u64, payload: &[u8]) {
    let m = major << 5;
    if n < 24 {
        out.push(m | n as u8);
    } else if n < 256 {
        out.extend_from_slice(&[m | 24, n as u8]);
    } else if n < 65536 {
        out.push(m | 25);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else if n <= u64::from(u32::MAX) {
        out.push(m | 26);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&n.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors computed with CPython 3.11 (`pickle`, `cbor2`, `hashlib`) the way vLLM does:
    /// tokens 0..40 then 300, 70000, 2³¹ + 5, block size 16 (two full blocks).
    #[test]
    fn matches_vllm_hashes() {
        let mut toks: Vec<u32> = (0..40).collect();
        toks.extend([300, 70000, (1 << 31) + 5]);
        let p = BlockHasher::new(HashAlgo::Sha256, DEFAULT_NONE_HASH_SEED);
        assert_eq!(
            p.none_hash.to_vec(),
            hex("066b1e8987e027138e98701c46128929378935f9b6cd1549105ae6b4f0d71198")
        );
        assert_eq!(
            p.block_hashes(&toks, 16),
            vec![0x2d45_fcb5_1d43_4798, 0x631d_f888_15cc_4629]
        );
        let c = BlockHasher::new(HashAlgo::Sha256Cbor, DEFAULT_NONE_HASH_SEED);
        assert_eq!(
            c.none_hash.to_vec(),
            hex("9bd96a485ad84efdafb72ee48a1d7a69bcead0f8f0433173941b276b9581eef0")
        );
        assert_eq!(
            c.block_hashes(&toks, 16),
            vec![0x1efe_a062_06ac_0749, 0xf892_553b_ef84_ef0c]
        );
    }

    /// The pickle of a block with large token ids, byte for byte (CPython's output).
    #[test]
    fn pickles_like_cpython() {
        let mut body = Vec::new();
        body.push(b'C');
        body.push(32);
        body.extend_from_slice(&[0; 32]);
        body.push(0x94);
        body.push(b'(');
        for t in [1u32, 300, 70000, (1 << 31) + 5] {
            pickle_int(&mut body, t);
        }
        let got = hex_of(&body);
        assert!(
            got.ends_with("94284b014d2c014a701101008a050500008000"),
            "{got}"
        );
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn hex_of(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn digest_low_bits() {
        let d: Vec<u8> = (0..32).collect();
        assert_eq!(digest_to_u64(&d), 0x18191a1b1c1d1e1f);
        assert_eq!(digest_to_u64(&[1, 2]), 0x0102);
    }
}
