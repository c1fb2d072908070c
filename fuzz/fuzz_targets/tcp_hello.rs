//! Fuzzes the TCP transport's hello decoder: arbitrary bytes must decode or be rejected,
//! never panic, and whatever decodes must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooncake_transport_tcp::wire::Hello;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Hello::decode(data) {
        assert_eq!(h.encode(), data);
    }
});
