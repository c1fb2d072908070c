//! The client's response decoder (`mooncake_store::rpc::decode_response`) on arbitrary bytes:
//! never panics, and a decoded response re-encodes to a frame that decodes and re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooncake_store::rpc::{self, FrameKind};

fuzz_target!(|data: &[u8]| {
    if let Ok((h, resp, used)) = rpc::decode_response(data) {
        assert!(used <= data.len());
        let mut buf = Vec::new();
        rpc::encode(&mut buf, FrameKind::Response, h.request_id, &resp).unwrap();
        let (_, again, _) = rpc::decode_response(&buf).unwrap();
        // Compared as bytes: a response may carry a NaN float.
        let mut buf2 = Vec::new();
        rpc::encode(&mut buf2, FrameKind::Response, h.request_id, &again).unwrap();
        assert_eq!(buf2, buf);
    }
});
