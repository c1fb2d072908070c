//! Round trips and robustness of the frame codec.

use proptest::prelude::*;

use super::*;
use crate::master::{ClientId, GetReply, MountRequest};
use crate::types::{ReplicaDesc, ReplicaKind, ReplicateConfig, StoreError, StoreErrorCode};

fn sample_requests() -> Vec<Request> {
    vec![
        Request::Ping,
        Request::RegisterClient {
            host: "h".into(),
            name: "n".into(),
        },
        Request::MountSegment {
            client: ClientId(3),
            mount: MountRequest {
                name: "seg".into(),
                base: 1 << 40,
                size: 1 << 30,
                host: "h".into(),
                held: vec![],
            },
        },
        Request::BatchPutStart {
            client: ClientId(7),
            tenant: "default".into(),
            items: vec![PutItem {
                key: "k".into(),
                size: 4096,
                group: Some("g".into()),
            }],
            config: ReplicateConfig::default().with_replica_num(2),
            upsert: false,
        },
        Request::BatchExists {
            tenant: "t".into(),
            keys: vec!["a".into(), "b".into()],
        },
    ]
}

fn sample_responses() -> Vec<Response> {
    vec![
        Response::Pong,
        Response::Error(StoreError::from(StoreErrorCode::ObjectNotFound)),
        Response::Replicas(vec![
            Ok(GetReply {
                replicas: vec![ReplicaDesc {
                    segment: "s".into(),
                    addr: 42,
                    len: 7,
                    kind: ReplicaKind::Memory,
                    epoch: 9,
                }],
                lease_ttl_ms: 10_000,
            }),
            Err(StoreError::from(StoreErrorCode::LeaseExpired)),
        ]),
        Response::Exists(vec![true, false]),
    ]
}

#[test]
fn requests_and_responses_round_trip() {
    let mut buf = Vec::new();
    for (i, r) in sample_requests().into_iter().enumerate() {
        encode(&mut buf, FrameKind::Request, i as u64, &r).unwrap();
        let (h, back, used) = decode_request(&buf).unwrap();
        assert_eq!((h.request_id, used), (i as u64, buf.len()));
        assert_eq!(back, r);
        // A request is not a response.
        assert!(decode_response(&buf).is_err());
    }
    for r in sample_responses() {
        encode(&mut buf, FrameKind::Response, 5, &r).unwrap();
        let (_, back, _) = decode_response(&buf).unwrap();
        assert_eq!(back, r);
    }
}

#[test]
fn error_codes_cross_the_wire_as_reference_integers() {
    let mut buf = Vec::new();
    let e = StoreError::new(StoreErrorCode::LeaseExpired, "late");
    encode(
        &mut buf,
        FrameKind::Response,
        1,
        &Response::Error(e.clone()),
    )
    .unwrap();
    let (_, back, _) = decode_response(&buf).unwrap();
    assert_eq!(back.into_error().unwrap().code(), -707);
}

#[test]
fn bad_headers_are_refused() {
    let mut buf = Vec::new();
    encode(&mut buf, FrameKind::Request, 1, &Request::Ping).unwrap();
    let mut v = buf.clone();
    v[4] = 9;
    assert_eq!(decode_request(&v).unwrap_err(), FrameError::Version(9));
    let mut v = buf.clone();
    v[5] = 7;
    assert_eq!(decode_request(&v).unwrap_err(), FrameError::Kind(7));
    let mut v = buf.clone();
    v[6] = 1;
    assert!(matches!(decode_request(&v), Err(FrameError::Reserved(_))));
    let mut v = buf.clone();
    v[..4].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
    assert!(matches!(decode_request(&v), Err(FrameError::TooLarge(_))));
    assert!(matches!(
        decode_request(&buf[..10]),
        Err(FrameError::Truncated(10))
    ));
    // Trailing garbage inside the payload is refused.
    let mut v = buf.clone();
    v.push(0);
    let len = (v.len() - HEADER_LEN) as u32;
    v[..4].copy_from_slice(&len.to_le_bytes());
    assert!(matches!(decode_request(&v), Err(FrameError::Payload(_))));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary bytes never panic the decoders.
    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_request(&bytes);
        let _ = decode_response(&bytes);
    }

    /// A valid header followed by arbitrary payload bytes never panics, and a decoded message
    /// re-encodes to a frame that decodes to the same message.
    #[test]
    fn arbitrary_payloads(kind in 1u8..3, payload in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut b = Vec::new();
        b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(&[VERSION, kind, 0, 0]);
        b.extend_from_slice(&7u64.to_le_bytes());
        b.extend_from_slice(&payload);
        if let Ok((_, req, _)) = decode_request(&b) {
            let mut again = Vec::new();
            encode(&mut again, FrameKind::Request, 7, &req).unwrap();
            prop_assert_eq!(decode_request(&again).unwrap().1, req);
        }
        if let Ok((_, resp, _)) = decode_response(&b) {
            let mut again = Vec::new();
            encode(&mut again, FrameKind::Response, 7, &resp).unwrap();
            // Compared as bytes: a response may carry a NaN float.
            let mut twice = Vec::new();
            encode(&mut twice, FrameKind::Response, 7, &decode_response(&again).unwrap().1).unwrap();
            prop_assert_eq!(twice, again);
        }
    }

    /// Mutating one byte of a valid frame never panics.
    #[test]
    fn mutated_frames(i in 0usize..4, pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let reqs = sample_requests();
        let mut b = Vec::new();
        encode(&mut b, FrameKind::Request, 1, &reqs[i % reqs.len()]).unwrap();
        let p = pos.index(b.len());
        b[p] = byte;
        let _ = decode_request(&b);
    }
}
