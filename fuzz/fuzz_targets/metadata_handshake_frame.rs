//! Fuzzes the P2P handshake frame decoder: no panics, the size limit holds, and decoded frames
//! re-encode to the bytes they came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooncake_metadata::p2p::{FRAME_LEGACY, decode_frame, encode_frame};

fuzz_target!(|data: &[u8]| {
    let max = 4096;
    if let Ok(Some((frame, used))) = decode_frame(data, max) {
        assert!(used <= data.len());
        assert!(frame.body.len() <= max);
        if frame.kind != FRAME_LEGACY {
            assert_eq!(encode_frame(frame.kind, &frame.body), &data[..used]);
        }
    }
});
