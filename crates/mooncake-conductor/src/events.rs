//! vLLM's KV-cache events (`vllm/distributed/kv_events.py`): the msgpack payload of a
//! `KVEventBatch` and the per-stream sequence numbers of its ZMQ publisher.
//!
//! # Wire format
//!
//! The publisher (`ZmqEventPublisher`) sends each batch on a PUB socket as three frames:
//! `[topic, seq, payload]`, `seq` an 8-byte big-endian counter from 0 per publisher, `payload`
//! the msgspec msgpack of
//!
//! ```text
//! KVEventBatch { ts: float, events: [BlockStored | BlockRemoved | AllBlocksCleared],
//!                data_parallel_rank: int | None = None }
//! BlockStored  { block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, … }
//! BlockRemoved { block_hashes, medium, … }
//! AllBlocksCleared {}
//! ```
//!
//! vLLM releases up to 0.11 declare the structs `array_like=True` (a batch is
//! `[ts, [events…], dp_rank?]`, an event `["BlockStored", hashes, parent, tokens, size, lora,
//! medium?, …]`); later ones encode maps with the tag in `"type"`. Both decode here; trailing
//! fields left out under `omit_defaults` are optional. A block hash is an integer or the raw
//! digest bytes (taken as their low 64 bits, like `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`).
//!
//! Its ROUTER replay socket answers a request `[identity, "", start_seq]` with one message
//! `[identity, "", seq, payload]` per buffered batch with `seq ≥ start_seq`, then
//! `[identity, "", -1 (8 bytes), ""]`.

use rmpv::Value;

use crate::hash::digest_to_u64;

/// One KV-cache event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    /// Blocks now cached by the engine.
    BlockStored {
        /// Their hashes (low 64 bits), in order.
        block_hashes: Vec<u64>,
        /// The hash of the block before the first one, if any.
        parent_block_hash: Option<u64>,
        /// The tokens of the blocks.
        token_ids: Vec<u32>,
        /// Tokens per block.
        block_size: u32,
        /// Where the blocks live (`"GPU"`, `"CPU"`, …), when told.
        medium: Option<String>,
    },
    /// Blocks evicted.
    BlockRemoved {
        /// Their hashes.
        block_hashes: Vec<u64>,
        /// Where they were evicted from, when told.
        medium: Option<String>,
    },
    /// The engine dropped its whole prefix cache.
    AllBlocksCleared,
}

/// A decoded `KVEventBatch`.
#[derive(Debug, Clone, PartialEq)]
pub struct KvEventBatch {
    /// Publisher timestamp (seconds since the epoch).
    pub ts: f64,
    /// Events in order.
    pub events: Vec<KvEvent>,
    /// Data-parallel rank of the publisher, when told.
    pub data_parallel_rank: Option<i64>,
}

/// A payload that is not a `KVEventBatch`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad KV event payload: {0}")]
pub struct DecodeError(pub String);

fn err(m: impl Into<String>) -> DecodeError {
    DecodeError(m.into())
}

fn as_hash(v: &Value) -> Result<u64, DecodeError> {
    match v {
        Value::Integer(i) => i
            .as_u64()
            .or_else(|| i.as_i64().map(|x| x as u64))
            .ok_or_else(|| err("hash out of range")),
        Value::Binary(b) => Ok(digest_to_u64(b)),
        _ => Err(err(format!("block hash is {v}"))),
    }
}

fn as_hashes(v: Option<&Value>) -> Result<Vec<u64>, DecodeError> {
    match v {
        Some(Value::Array(a)) => a.iter().map(as_hash).collect(),
        Some(Value::Nil) | None => Ok(Vec::new()),
        Some(v) => Err(err(format!("block_hashes is {v}"))),
    }
}

fn as_opt_str(v: Option<&Value>) -> Option<String> {
    v.and_then(|v| v.as_str()).map(str::to_owned)
}

/// Field `name` at array position `pos` (array-like structs, position after the tag) or map
/// key `name`.
fn field<'a>(ev: &'a Value, pos: usize, name: &str) -> Option<&'a Value> {
    match ev {
        Value::Array(a) => a.get(pos + 1),
        Value::Map(m) => m
            .iter()
            .find(|(k, _)| k.as_str() == Some(name))
            .map(|(_, v)| v),
        _ => None,
    }
}

fn decode_event(ev: &Value) -> Result<Option<KvEvent>, DecodeError> {
    let tag = match ev {
        Value::Array(a) => a.first().and_then(Value::as_str),
        Value::Map(m) => m
            .iter()
            .find(|(k, _)| k.as_str() == Some("type"))
            .and_then(|(_, v)| v.as_str()),
        _ => None,
    }
    .ok_or_else(|| err("event without a tag"))?;
    Ok(Some(match tag {
        "BlockStored" => KvEvent::BlockStored {
            block_hashes: as_hashes(field(ev, 0, "block_hashes"))?,
            parent_block_hash: match field(ev, 1, "parent_block_hash") {
                None | Some(Value::Nil) => None,
                Some(v) => Some(as_hash(v)?),
            },
            token_ids: match field(ev, 2, "token_ids") {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|t| t.as_u64().map(|t| t as u32))
                    .collect::<Option<_>>()
                    .ok_or_else(|| err("token id not an integer"))?,
                _ => Vec::new(),
            },
            block_size: field(ev, 3, "block_size")
                .and_then(Value::as_u64)
                .unwrap_or(0) as u32,
            medium: as_opt_str(field(ev, 5, "medium")),
        },
        "BlockRemoved" => KvEvent::BlockRemoved {
            block_hashes: as_hashes(field(ev, 0, "block_hashes"))?,
            medium: as_opt_str(field(ev, 1, "medium")),
        },
        "AllBlocksCleared" => KvEvent::AllBlocksCleared,
        // Event kinds added later (other tags) are skipped, not fatal.
        _ => return Ok(None),
    }))
}

/// Decodes one payload.
pub fn decode_batch(payload: &[u8]) -> Result<KvEventBatch, DecodeError> {
    let v = rmpv::decode::read_value(&mut &payload[..]).map_err(|e| err(e.to_string()))?;
    let (ts, events, dp) = match &v {
        Value::Array(a) => (a.first(), a.get(1), a.get(2)),
        Value::Map(_) => (
            field(&v, usize::MAX, "ts"),
            field(&v, usize::MAX, "events"),
            field(&v, usize::MAX, "data_parallel_rank"),
        ),
        _ => return Err(err("batch is neither an array nor a map")),
    };
    let ts = ts.and_then(Value::as_f64).unwrap_or(0.0);
    let Some(Value::Array(evs)) = events else {
        return Err(err("batch without events"));
    };
    let mut out = Vec::with_capacity(evs.len());
    for e in evs {
        if let Some(e) = decode_event(e)? {
            out.push(e);
        }
    }
    Ok(KvEventBatch {
        ts,
        events: out,
        data_parallel_rank: dp.and_then(Value::as_i64),
    })
}

/// How block hashes are written by [`encode_batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashEncoding {
    /// Integers (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`).
    Int,
    /// 32-byte digests (vLLM's default since sha256 block hashes); the digests are given.
    Bytes,
}

/// An event to encode, with full digests where [`HashEncoding::Bytes`] needs them.
#[derive(Debug, Clone)]
pub enum OutEvent {
    /// `BlockStored`.
    Stored {
        /// Digests of the blocks.
        hashes: Vec<[u8; 32]>,
        /// Digest of the parent block.
        parent: Option<[u8; 32]>,
        /// Tokens of the blocks.
        token_ids: Vec<u32>,
        /// Tokens per block.
        block_size: u32,
    },
    /// `BlockRemoved`.
    Removed {
        /// Digests of the blocks.
        hashes: Vec<[u8; 32]>,
    },
    /// `AllBlocksCleared`.
    Cleared,
}

/// Encodes a batch as vLLM's array-like structs do (`[ts, [events], dp_rank]`), the way a
/// publisher on vLLM ≤ 0.11 does; the engine simulator and the tests use it.
pub fn encode_batch(ts: f64, events: &[OutEvent], enc: HashEncoding, dp_rank: i64) -> Vec<u8> {
    let hash = |h: &[u8; 32]| match enc {
        HashEncoding::Int => Value::from(digest_to_u64(h)),
        HashEncoding::Bytes => Value::Binary(h.to_vec()),
    };
    let evs = events
        .iter()
        .map(|e| match e {
            OutEvent::Stored {
                hashes,
                parent,
                token_ids,
                block_size,
            } => Value::Array(vec![
                Value::from("BlockStored"),
                Value::Array(hashes.iter().map(hash).collect()),
                parent.as_ref().map_or(Value::Nil, hash),
                Value::Array(token_ids.iter().map(|&t| Value::from(t)).collect()),
                Value::from(*block_size),
                Value::Nil,
                Value::from("GPU"),
            ]),
            OutEvent::Removed { hashes } => Value::Array(vec![
                Value::from("BlockRemoved"),
                Value::Array(hashes.iter().map(hash).collect()),
                Value::from("GPU"),
            ]),
            OutEvent::Cleared => Value::Array(vec![Value::from("AllBlocksCleared")]),
        })
        .collect();
    let v = Value::Array(vec![
        Value::F64(ts),
        Value::Array(evs),
        Value::from(dp_rank),
    ]);
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &v).expect("writing to a Vec cannot fail");
    out
}

/// What a sequence number says about a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqVerdict {
    /// The next one: apply it.
    InOrder,
    /// Already applied (a replayed or repeated batch): skip it.
    Duplicate,
    /// Batches `[expected, got)` were missed: recover them, then apply this one.
    Gap {
        /// The first missed sequence number.
        expected: u64,
        /// This batch's.
        got: u64,
    },
    /// The publisher started over (its sequence went back to 0): its cache view is stale.
    Restarted,
}

/// Tracks one publisher's sequence numbers (sans-IO: the subscriber task feeds it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqTracker {
    next: Option<u64>,
}

impl SeqTracker {
    /// The sequence number expected next (`None` before the first batch).
    pub fn next(&self) -> Option<u64> {
        self.next
    }

    /// Classifies `seq` without recording it.
    pub fn check(&self, seq: u64) -> SeqVerdict {
        match self.next {
            None if seq == 0 => SeqVerdict::InOrder,
            None => SeqVerdict::Gap {
                expected: 0,
                got: seq,
            },
            Some(n) if seq == n => SeqVerdict::InOrder,
            Some(n) if seq > n => SeqVerdict::Gap {
                expected: n,
                got: seq,
            },
            Some(_) if seq == 0 => SeqVerdict::Restarted,
            Some(_) => SeqVerdict::Duplicate,
        }
    }

    /// Records that `seq` was applied.
    pub fn applied(&mut self, seq: u64) {
        self.next = Some(seq + 1);
    }

    /// Forgets the stream (after a restart or a view rebuild).
    pub fn reset(&mut self) {
        self.next = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// `msgspec.msgpack.encode` of vLLM's array-like structs (0.9–0.11 layout, with `medium`
    /// and a data-parallel rank), generated with msgspec 0.19.
    #[test]
    fn decodes_array_like_batch() {
        let p = hex(
            "93cb3ff80000000000009397ab426c6f636b53746f7265649201cfffffffffffffffffc0940102030402c0a347505593ac426c6f636b52656d6f76656491cfffffffffffffffffa347505591b0416c6c426c6f636b73436c656172656401",
        );
        let b = decode_batch(&p).unwrap();
        assert_eq!(b.ts, 1.5);
        assert_eq!(b.data_parallel_rank, Some(1));
        assert_eq!(
            b.events,
            vec![
                KvEvent::BlockStored {
                    block_hashes: vec![1, u64::MAX],
                    parent_block_hash: None,
                    token_ids: vec![1, 2, 3, 4],
                    block_size: 2,
                    medium: Some("GPU".into()),
                },
                KvEvent::BlockRemoved {
                    block_hashes: vec![u64::MAX],
                    medium: Some("GPU".into())
                },
                KvEvent::AllBlocksCleared,
            ]
        );
    }

    /// The map layout of current vLLM (tagged structs without `array_like`), with 32-byte
    /// digests as block hashes.
    #[test]
    fn decodes_map_batch_with_digests() {
        let p = hex(
            "83a27473cb4002000000000000a66576656e74739388a474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657392c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1fc420202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3fb1706172656e745f626c6f636b5f68617368c4200000000000000000000000000000000000000000000000000000000000000000a9746f6b656e5f6964739405060708aa626c6f636b5f73697a6502a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f6e616d65c083a474797065ac426c6f636b52656d6f766564ac626c6f636b5f68617368657391c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1fa66d656469756da343505581a474797065b0416c6c426c6f636b73436c6561726564b2646174615f706172616c6c656c5f72616e6b00",
        );
        let b = decode_batch(&p).unwrap();
        assert_eq!(b.ts, 2.25);
        assert_eq!(b.data_parallel_rank, Some(0));
        assert_eq!(
            b.events,
            vec![
                KvEvent::BlockStored {
                    block_hashes: vec![0x18191a1b1c1d1e1f, 0x38393a3b3c3d3e3f],
                    parent_block_hash: Some(0),
                    token_ids: vec![5, 6, 7, 8],
                    block_size: 2,
                    medium: Some("GPU".into()),
                },
                KvEvent::BlockRemoved {
                    block_hashes: vec![0x18191a1b1c1d1e1f],
                    medium: Some("CPU".into())
                },
                KvEvent::AllBlocksCleared,
            ]
        );
    }

    #[test]
    fn encode_round_trips() {
        let d = |x: u8| [x; 32];
        let evs = [
            OutEvent::Stored {
                hashes: vec![d(1), d(2)],
                parent: Some(d(0)),
                token_ids: vec![1, 2],
                block_size: 1,
            },
            OutEvent::Removed { hashes: vec![d(2)] },
            OutEvent::Cleared,
        ];
        for enc in [HashEncoding::Int, HashEncoding::Bytes] {
            let b = decode_batch(&encode_batch(3.0, &evs, enc, 0)).unwrap();
            assert_eq!(b.events.len(), 3);
            assert_eq!(
                b.events[1],
                KvEvent::BlockRemoved {
                    block_hashes: vec![digest_to_u64(&d(2))],
                    medium: Some("GPU".into())
                }
            );
        }
        assert!(decode_batch(b"\x01").is_err());
        assert!(decode_batch(&[0xc1]).is_err());
    }

    #[test]
    fn sequence_tracking() {
        let mut t = SeqTracker::default();
        assert_eq!(
            t.check(3),
            SeqVerdict::Gap {
                expected: 0,
                got: 3
            }
        );
        assert_eq!(t.check(0), SeqVerdict::InOrder);
        t.applied(0);
        assert_eq!(t.check(1), SeqVerdict::InOrder);
        t.applied(1);
        assert_eq!(t.check(1), SeqVerdict::Duplicate);
        assert_eq!(
            t.check(5),
            SeqVerdict::Gap {
                expected: 2,
                got: 5
            }
        );
        assert_eq!(t.check(0), SeqVerdict::Restarted);
    }
}
