//! Fuzzes the RDMA handshake's frame reader and its hello, request and reply decoders: no
//! panics, frames within their limits, decoded messages re-encode to equal ones, and proof
//! checks over any message are safe.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mooncake_transport_rdma::fuzzing::handshake_frames(data);
});
