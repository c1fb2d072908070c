//! Fuzzes the HTTP metadata server's request decoding: the one-shot decoder and the
//! incremental head reader the server runs (fed in pieces) must never panic, never read past
//! the buffer, never accept a body over the limit, and agree with each other.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooncake_metadata::http::wire::{
    HeadReader, HeadStatus, HttpLimits, decode_request, decode_request_head, decode_response,
};

fuzz_target!(|data: &[u8]| {
    let limits = HttpLimits {
        max_head: 4096,
        max_body: 1024,
    };
    if let Ok(Some((req, used))) = decode_request(data, &limits) {
        assert!(used <= data.len());
        assert!(req.body.len() <= limits.max_body);
        assert_eq!(req.body.len(), req.head.content_length);
        let _ = req.head.bearer_token();
    }
    // The server's reader, fed in pieces whose sizes come from the input itself.
    let step = data.first().map_or(1, |&b| (b as usize % 17) + 1);
    let mut reader = HeadReader::new();
    let mut buf = Vec::new();
    let mut fed = 0;
    for piece in data.chunks(step) {
        buf.extend_from_slice(piece);
        fed += piece.len();
        match reader.poll(&mut buf, &limits) {
            Ok(HeadStatus::Incomplete) => assert!(buf.len() < limits.max_head),
            Ok(HeadStatus::Complete { head, len }) => {
                assert!(len <= buf.len() && len <= limits.max_head);
                assert!(head.content_length <= limits.max_body);
                // The reader dropped only leading empty lines: the one-shot decoder agrees.
                let skipped = fed - buf.len();
                assert!(data[..skipped].iter().all(|&b| b == b'\r' || b == b'\n'));
                if let Ok(HeadStatus::Complete { head: h2, .. }) =
                    decode_request_head(&buf, &limits)
                {
                    assert_eq!(head, h2);
                }
                break;
            }
            Err(_) => break,
        }
    }
    let _ = decode_response(data, true, 1024);
    let _ = decode_response(data, false, 1024);
});
