//! Fuzzes the decoder of HTTP watch replies (`wire::decode_events`, client side): no panic
//! and no allocation beyond the input on any bytes; what decodes re-encodes exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooncake_metadata::http::wire::{decode_events, encode_events};

fuzz_target!(|data: &[u8]| {
    if let Ok(events) = decode_events(data) {
        assert_eq!(encode_events(&events), data);
    }
});
