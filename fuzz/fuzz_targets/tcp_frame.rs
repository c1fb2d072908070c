//! Fuzzes the TCP transport's frame header decoder: arbitrary bytes must decode or be
//! rejected, never panic, and whatever decodes must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooncake_transport_tcp::wire::{HEADER_LEN, Header};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::decode(data, 1 << 30) {
        assert_eq!(&h.encode()[..], &data[..HEADER_LEN]);
    }
});
