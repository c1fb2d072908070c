//! The master's request decoder (`mooncake_store::rpc::decode_request`) on arbitrary bytes:
//! never panics, and a decoded request re-encodes to a frame that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooncake_store::rpc::{self, FrameKind};

fuzz_target!(|data: &[u8]| {
    if let Ok((h, req, used)) = rpc::decode_request(data) {
        assert!(used <= data.len());
        let mut buf = Vec::new();
        rpc::encode(&mut buf, FrameKind::Request, h.request_id, &req).unwrap();
        let (_, again, _) = rpc::decode_request(&buf).unwrap();
        assert_eq!(again, req);
    }
});
