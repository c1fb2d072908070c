//! Fuzzes the Conductor's decoder of vLLM KV event batches (msgpack from a ZMQ publisher) and
//! its parser of store keys: no panics, and no more block hashes than the input has bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooncake_conductor::events::{KvEvent, decode_batch};
use mooncake_conductor::store::store_key_hash;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = decode_batch(data) {
        for e in &b.events {
            if let KvEvent::BlockStored { block_hashes, .. }
            | KvEvent::BlockRemoved { block_hashes, .. } = e
            {
                assert!(block_hashes.len() <= data.len());
            }
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = store_key_hash(s);
    }
});
