//! Frames: `[u32 len][u8 version][u8 kind][u16 reserved][u64 request_id][payload]`, little
//! endian, where `len` counts the payload bytes only and the payload is one postcard-encoded
//! message. The decoder validates everything and never panics.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 16;
/// Wire version this build speaks.
pub const VERSION: u8 = 1;
/// Largest payload accepted (64 MiB: a million 40-byte keys fit).
pub const MAX_PAYLOAD: usize = 64 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A [`Request`](super::Request).
    Request = 1,
    /// A [`Response`](super::Response).
    Response = 2,
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload length.
    pub len: u32,
    /// Kind of message.
    pub kind: FrameKind,
    /// Pairs a response with its request.
    pub request_id: u64,
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Fewer bytes than a header (or than the header announces).
    #[error("truncated frame: {0} bytes")]
    Truncated(usize),
    /// Another wire version.
    #[error("unsupported wire version {0} (this build speaks {VERSION})")]
    Version(u8),
    /// An unknown kind byte.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// The reserved field is not zero.
    #[error("reserved header bits set ({0:#x})")]
    Reserved(u16),
    /// The payload is larger than [`MAX_PAYLOAD`].
    #[error("frame payload of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLarge(u64),
    /// The payload does not decode as the expected message.
    #[error("malformed payload: {0}")]
    Payload(String),
}

/// Decodes and validates a header.
pub fn decode_header(b: &[u8]) -> Result<FrameHeader, FrameError> {
    let Some(h) = b.get(..HEADER_LEN) else {
        return Err(FrameError::Truncated(b.len()));
    };
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    if h[4] != VERSION {
        return Err(FrameError::Version(h[4]));
    }
    let kind = match h[5] {
        1 => FrameKind::Request,
        2 => FrameKind::Response,
        k => return Err(FrameError::Kind(k)),
    };
    let reserved = u16::from_le_bytes([h[6], h[7]]);
    if reserved != 0 {
        return Err(FrameError::Reserved(reserved));
    }
    if len as usize > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(len as u64));
    }
    let request_id = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    Ok(FrameHeader {
        len,
        kind,
        request_id,
    })
}

/// Appends one frame carrying `msg` to `out`.
pub fn encode_frame<T: Serialize>(
    out: &mut Vec<u8>,
    kind: FrameKind,
    request_id: u64,
    msg: &T,
) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    let mut v = std::mem::take(out);
    v = postcard::to_extend(msg, v).map_err(|e| FrameError::Payload(e.to_string()))?;
    *out = v;
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_PAYLOAD {
        out.truncate(start);
        return Err(FrameError::TooLarge(len as u64));
    }
    let h = &mut out[start..start + HEADER_LEN];
    h[..4].copy_from_slice(&(len as u32).to_le_bytes());
    h[4] = VERSION;
    h[5] = kind as u8;
    h[6..8].copy_from_slice(&0u16.to_le_bytes());
    h[8..16].copy_from_slice(&request_id.to_le_bytes());
    Ok(())
}

/// Decodes a payload; trailing bytes are refused.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) =
        postcard::take_from_bytes(payload).map_err(|e| FrameError::Payload(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Payload(format!(
            "{} trailing bytes after the message",
            rest.len()
        )));
    }
    Ok(msg)
}

/// Decodes one whole frame (header and payload) of the expected kind from `b`; returns the
/// header, the message and the bytes consumed.
pub fn decode_frame<T: DeserializeOwned>(
    b: &[u8],
    expect: FrameKind,
) -> Result<(FrameHeader, T, usize), FrameError> {
    let h = decode_header(b)?;
    if h.kind != expect {
        return Err(FrameError::Kind(h.kind as u8));
    }
    let end = HEADER_LEN + h.len as usize;
    let Some(payload) = b.get(HEADER_LEN..end) else {
        return Err(FrameError::Truncated(b.len()));
    };
    Ok((h, decode_payload(payload)?, end))
}
