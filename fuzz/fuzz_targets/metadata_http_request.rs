//! Fuzzes the HTTP metadata server's request decoder: it must never panic, never read past
//! the buffer, and never accept a body over the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooncake_metadata::http::wire::{HttpLimits, decode_request, decode_response};

fuzz_target!(|data: &[u8]| {
    let limits = HttpLimits {
        max_head: 4096,
        max_body: 1024,
    };
    if let Ok(Some((req, used))) = decode_request(data, &limits) {
        assert!(used <= data.len());
        assert!(req.body.len() <= limits.max_body);
        assert_eq!(req.body.len(), req.head.content_length);
    }
    let _ = decode_response(data, true, 1024);
    let _ = decode_response(data, false, 1024);
});
