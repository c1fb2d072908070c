//! Fuzzes the P2P handshake decoders: frames (no panics, the size limit holds, decoded
//! frames re-encode to the bytes they came from) and the authentication hello (decodes
//! re-encode exactly; any bytes are refused or accepted without panicking), plus a proof
//! check on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooncake_core::ClusterSecret;
use mooncake_metadata::p2p::{
    AUTH_INITIATOR_ROLE, AuthHello, FRAME_AUTH_HELLO, FRAME_LEGACY, auth_verify, decode_frame,
    encode_frame,
};

fuzz_target!(|data: &[u8]| {
    let max = 4096;
    if let Ok(Some((frame, used))) = decode_frame(data, max) {
        assert!(used <= data.len());
        assert!(frame.body.len() <= max);
        if frame.kind != FRAME_LEGACY {
            assert_eq!(encode_frame(frame.kind, &frame.body), &data[..used]);
        }
        if frame.kind == FRAME_AUTH_HELLO
            && let Some(h) = AuthHello::decode(&frame.body)
        {
            assert_eq!(h.encode(), frame.body);
        }
    }
    if let Some(h) = AuthHello::decode(data) {
        assert_eq!(h.encode(), data);
        let s = ClusterSecret::from_bytes(b"fuzzing secret, 16+ bytes").unwrap();
        // A random proof never verifies (with overwhelming probability); it must not panic.
        let _ = auth_verify(
            &s,
            AUTH_INITIATOR_ROLE,
            &h,
            &data[..data.len().min(16)],
            data,
        );
    }
});
