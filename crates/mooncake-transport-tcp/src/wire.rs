//! The TCP wire format: a fixed 32-byte, versioned header, then the payload it announces.
//!
//! ```text
//! 0      4        5     6        8            16          24          32
//! | magic | version | kind | status | request_id |   addr    |    len    |
//! ```
//! All integers are little-endian. `len` counts the payload bytes that follow the header
//! (for a `Read` request, the bytes asked for; none follow). Every frame is checked by
//! [`Header::decode`], which rejects garbage without panicking.

use std::fmt;

use mooncake_core::ClusterSecret;

/// `"MCRS"` in little-endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"MCRS");
/// The wire version this build speaks (3: the hello names the initiator, its epoch and a
/// nonce; targets with a cluster secret answer it with a challenge).
pub const VERSION: u8 = 3;
/// Length of every header.
pub const HEADER_LEN: usize = 32;
/// Largest payload of a control frame (hello, error message).
pub const MAX_CONTROL_PAYLOAD: u64 = 4096;

/// Frame types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Client → server, first frame: the payload is a [`Hello`]; `addr` is the generation
    /// of the target the client expects (0 = any).
    Hello = 1,
    /// Server → client: the hello was accepted; `addr` is the server's generation.
    HelloAck = 2,
    /// Client → server: send me `len` bytes at `addr`.
    Read = 3,
    /// Client → server: apply the `len` payload bytes that follow at `addr`.
    Write = 4,
    /// Server → client: the `len` bytes of a read follow.
    ReadData = 5,
    /// Server → client: a write was applied.
    WriteAck = 6,
    /// Server → client: the request failed; `status` says why and the payload is a message.
    Error = 7,
    /// Server → client, in reply to a hello when the target has a cluster secret: the
    /// payload is the target's nonce and its proof; `addr` is its generation.
    Challenge = 8,
    /// Client → server, in reply to a challenge: the payload is the initiator's proof.
    Proof = 9,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::HelloAck,
            3 => Self::Read,
            4 => Self::Write,
            5 => Self::ReadData,
            6 => Self::WriteAck,
            7 => Self::Error,
            8 => Self::Challenge,
            9 => Self::Proof,
            _ => return None,
        })
    }
}

/// Why a request failed (the `status` of an [`FrameKind::Error`] frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Status {
    /// Success (every non-error frame).
    Ok = 0,
    /// The range is not inside registered memory, or not permitted.
    OutOfRange = 1,
    /// The request was malformed.
    BadRequest = 2,
    /// The hello named another segment or generation, or an epoch older than one this
    /// initiator already used.
    WrongSegment = 3,
    /// The server failed internally.
    Internal = 4,
}

impl Status {
    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            0 => Self::Ok,
            1 => Self::OutOfRange,
            2 => Self::BadRequest,
            3 => Self::WrongSegment,
            4 => Self::Internal,
            _ => return None,
        })
    }
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frame type.
    pub kind: FrameKind,
    /// Status (non-`Ok` only in error frames).
    pub status: Status,
    /// Matches a response to its request.
    pub request_id: u64,
    /// Remote address (requests) or generation (hello frames).
    pub addr: u64,
    /// Payload length, or the requested length of a read.
    pub len: u64,
}

/// Why a header was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// Fewer than [`HEADER_LEN`] bytes.
    Short(usize),
    /// The magic number is wrong: not our protocol.
    BadMagic(u32),
    /// A version this build does not speak.
    BadVersion(u8),
    /// An unknown frame type.
    BadKind(u8),
    /// An unknown status code.
    BadStatus(u16),
    /// A payload longer than the limit for its frame type.
    TooLong {
        /// Frame type.
        kind: FrameKind,
        /// Announced length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A data request of zero bytes.
    Empty,
    /// A hello payload that does not parse.
    BadHello(&'static str),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Short(n) => write!(f, "short header: {n} of {HEADER_LEN} bytes"),
            Self::BadMagic(m) => write!(f, "bad magic {m:#010x} (not a mooncake-rs TCP peer)"),
            Self::BadVersion(v) => write!(
                f,
                "unsupported wire version {v} (this build speaks {VERSION})"
            ),
            Self::BadKind(k) => write!(f, "unknown frame type {k}"),
            Self::BadStatus(s) => write!(f, "unknown status {s}"),
            Self::TooLong { kind, len, max } => write!(
                f,
                "{kind:?} frame of {len} bytes exceeds the limit of {max}"
            ),
            Self::Empty => f.write_str("zero-length data request"),
            Self::BadHello(why) => write!(f, "malformed hello: {why}"),
        }
    }
}

impl std::error::Error for WireError {}

impl Header {
    /// A header with status `Ok`.
    pub fn new(kind: FrameKind, request_id: u64, addr: u64, len: u64) -> Self {
        Self {
            kind,
            status: Status::Ok,
            request_id,
            addr,
            len,
        }
    }

    /// Encodes into the 32-byte wire form.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = VERSION;
        b[5] = self.kind as u8;
        b[6..8].copy_from_slice(&(self.status as u16).to_le_bytes());
        b[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.addr.to_le_bytes());
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decodes and validates a header; `max_data` bounds `Read`/`Write`/`ReadData` lengths.
    pub fn decode(b: &[u8], max_data: u64) -> Result<Self, WireError> {
        if b.len() < HEADER_LEN {
            return Err(WireError::Short(b.len()));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let magic = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes"));
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        if b[4] != VERSION {
            return Err(WireError::BadVersion(b[4]));
        }
        let kind = FrameKind::from_u8(b[5]).ok_or(WireError::BadKind(b[5]))?;
        let raw_status = u16::from_le_bytes([b[6], b[7]]);
        let status = Status::from_u16(raw_status).ok_or(WireError::BadStatus(raw_status))?;
        let h = Self {
            kind,
            status,
            request_id: u64_at(8),
            addr: u64_at(16),
            len: u64_at(24),
        };
        let max = match kind {
            FrameKind::Read | FrameKind::Write | FrameKind::ReadData => max_data,
            FrameKind::Hello | FrameKind::Error | FrameKind::Challenge | FrameKind::Proof => {
                MAX_CONTROL_PAYLOAD
            }
            FrameKind::HelloAck | FrameKind::WriteAck => 0,
        };
        if h.len > max {
            return Err(WireError::TooLong {
                kind,
                len: h.len,
                max,
            });
        }
        if matches!(kind, FrameKind::Read | FrameKind::Write) && h.len == 0 {
            return Err(WireError::Empty);
        }
        Ok(h)
    }

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> u64 {
        match self.kind {
            FrameKind::Read => 0,
            _ => self.len,
        }
    }
}

/// The payload of a [`FrameKind::Hello`]: who connects to whom, and under which epoch.
///
/// ```text
/// u16 target length | target name | u16 initiator length | initiator name |
/// u64 initiator generation | u64 epoch | 16-byte nonce
/// ```
/// The epoch fences retried writes: an initiator that retries after a failed connection
/// connects with a higher epoch, and the target closes every older-epoch connection of that
/// initiator before it acknowledges the new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The segment the initiator means to reach.
    pub target: String,
    /// The initiator's segment name.
    pub initiator: String,
    /// The initiator engine's generation.
    pub initiator_generation: u64,
    /// The initiator's connection epoch towards this target.
    pub epoch: u64,
    /// A fresh random nonce (the challenge-response with a cluster secret covers it).
    pub nonce: [u8; 16],
}

impl Hello {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(20 + self.target.len() + self.initiator.len());
        for s in [&self.target, &self.initiator] {
            v.extend_from_slice(&(s.len() as u16).to_le_bytes());
            v.extend_from_slice(s.as_bytes());
        }
        v.extend_from_slice(&self.initiator_generation.to_le_bytes());
        v.extend_from_slice(&self.epoch.to_le_bytes());
        v.extend_from_slice(&self.nonce);
        v
    }

    /// Decodes a payload; refuses truncated, oversized or non-UTF-8 input.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        fn name(b: &[u8], at: &mut usize) -> Result<String, WireError> {
            let len = b
                .get(*at..*at + 2)
                .map(|x| u16::from_le_bytes([x[0], x[1]]) as usize)
                .ok_or(WireError::BadHello("truncated name length"))?;
            let bytes = b
                .get(*at + 2..*at + 2 + len)
                .ok_or(WireError::BadHello("truncated name"))?;
            *at += 2 + len;
            String::from_utf8(bytes.to_vec()).map_err(|_| WireError::BadHello("name is not UTF-8"))
        }
        if b.len() as u64 > MAX_CONTROL_PAYLOAD {
            return Err(WireError::BadHello("too long"));
        }
        let mut at = 0;
        let target = name(b, &mut at)?;
        let initiator = name(b, &mut at)?;
        let tail = b
            .get(at..at + 32)
            .ok_or(WireError::BadHello("truncated generation, epoch or nonce"))?;
        if b.len() != at + 32 {
            return Err(WireError::BadHello("trailing bytes"));
        }
        Ok(Self {
            target,
            initiator,
            initiator_generation: u64::from_le_bytes(tail[..8].try_into().expect("8 bytes")),
            epoch: u64::from_le_bytes(tail[8..16].try_into().expect("8 bytes")),
            nonce: tail[16..].try_into().expect("16 bytes"),
        })
    }
}

/// A proof of `role` for the connection `hello` opened to a target of `target_generation`
/// that answered with `target_nonce`: it covers who talks to whom, under which generations
/// and epoch, with both nonces, and `binding` (the TLS session's exported value, empty
/// without TLS), so it is good for this connection only.
pub fn proof(
    secret: &ClusterSecret,
    role: &[u8],
    hello: &Hello,
    target_generation: u64,
    target_nonce: &[u8],
    binding: &[u8],
) -> [u8; mooncake_core::auth::PROOF_LEN] {
    secret.prove(
        role,
        &transcript(hello, target_generation, target_nonce, binding)
            .each_ref()
            .map(|v| v.as_slice()),
    )
}

/// Checks a proof made by [`proof`].
pub fn verify(
    secret: &ClusterSecret,
    role: &[u8],
    hello: &Hello,
    target_generation: u64,
    target_nonce: &[u8],
    binding: &[u8],
    proof: &[u8],
) -> bool {
    secret.verify(
        role,
        &transcript(hello, target_generation, target_nonce, binding)
            .each_ref()
            .map(|v| v.as_slice()),
        proof,
    )
}

fn transcript(
    hello: &Hello,
    target_generation: u64,
    target_nonce: &[u8],
    binding: &[u8],
) -> [Vec<u8>; 8] {
    [
        hello.target.as_bytes().to_vec(),
        target_generation.to_le_bytes().to_vec(),
        hello.initiator.as_bytes().to_vec(),
        hello.initiator_generation.to_le_bytes().to_vec(),
        hello.epoch.to_le_bytes().to_vec(),
        hello.nonce.to_vec(),
        target_nonce.to_vec(),
        binding.to_vec(),
    ]
}

/// The role tag of the target's proof.
pub const TARGET_ROLE: &[u8] = b"mooncake-tcp-target";
/// The role tag of the initiator's proof.
pub const INITIATOR_ROLE: &[u8] = b"mooncake-tcp-initiator";

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind() -> impl Strategy<Value = FrameKind> {
        (1u8..=9).prop_map(|k| FrameKind::from_u8(k).unwrap())
    }

    proptest! {
        #[test]
        fn round_trip(k in kind(), id: u64, addr: u64, len in 1u64..4096) {
            let len = if matches!(k, FrameKind::HelloAck | FrameKind::WriteAck) { 0 } else { len };
            let h = Header::new(k, id, addr, len);
            prop_assert_eq!(Header::decode(&h.encode(), 1 << 30).unwrap(), h);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Header::decode(&bytes, 1 << 20);
        }

        #[test]
        fn hello_round_trip(target in ".{0,40}", initiator in ".{0,40}", generation: u64, epoch: u64, nonce: [u8; 16]) {
            let h = Hello { target, initiator, initiator_generation: generation, epoch, nonce };
            prop_assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        }

        #[test]
        fn hello_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Hello::decode(&bytes);
        }

        #[test]
        fn corrupting_magic_is_rejected(k in kind(), flip in 0usize..4) {
            let mut b = Header::new(k, 1, 2, 0).encode();
            b[flip] ^= 0xff;
            prop_assert!(matches!(Header::decode(&b, 1 << 20), Err(WireError::BadMagic(_))));
        }
    }

    #[test]
    fn limits_are_enforced() {
        let h = Header::new(FrameKind::Write, 1, 0x1000, 1 << 21);
        assert!(matches!(
            Header::decode(&h.encode(), 1 << 20),
            Err(WireError::TooLong { .. })
        ));
        let h = Header::new(FrameKind::Read, 1, 0x1000, 0);
        assert_eq!(Header::decode(&h.encode(), 1 << 20), Err(WireError::Empty));
        let h = Header::new(FrameKind::Error, 1, 0, MAX_CONTROL_PAYLOAD + 1);
        assert!(Header::decode(&h.encode(), 1 << 20).is_err());
        assert_eq!(Header::decode(&[0; 8], 1), Err(WireError::Short(8)));
        let mut b = Header::new(FrameKind::Read, 1, 0, 8).encode();
        b[4] = 9;
        assert_eq!(Header::decode(&b, 64), Err(WireError::BadVersion(9)));
    }
}
