//! The connection handshake: frames of a 4-byte little-endian length followed by JSON.
//!
//! One exchange per TCP connection:
//!
//! 1. on accept the server sends a [`Hello`] with a fresh random nonce;
//! 2. the client sends one [`Request`] that echoes the nonce (and, once peers authenticate,
//!    will carry a MAC over the nonce and the request: [`Request::auth`]);
//! 3. the server checks the request *before any state changes* and sends one [`Reply`].
//!
//! Remote keys travel only here, and only to a peer that set up a QP on that NIC: `Connect`
//! creates the QP and returns the keys with a per-QP token; `Keys` must name that QP and
//! present the token. The published segment descriptor never carries keys.
//!
//! [`FrameReader`] bounds every frame by its announced length before buffering it, so a
//! peer cannot make the reader hold more than the limit.

use mooncake_core::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};

/// The `extra` key of the segment descriptor holding the handshake `host:port`.
pub const HANDSHAKE_KEY: &str = "rdma_handshake";

/// Handshake protocol version; a peer speaking another one is refused.
pub(crate) const VERSION: u32 = 2;
/// Largest [`Hello`] a client accepts.
pub(crate) const MAX_HELLO: usize = 4 << 10;
/// Largest [`Request`] a server accepts (a request names a QP and a few strings).
pub(crate) const MAX_REQUEST: usize = 64 << 10;
/// Largest [`Reply`] a client accepts (a reply lists every registered region of a NIC).
pub(crate) const MAX_REPLY: usize = 16 << 20;

/// A QP's address as exchanged in the handshake.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct QpInfo {
    /// QP number.
    pub qpn: u32,
    /// Initial packet sequence number.
    pub psn: u32,
    /// GID, 32 hex digits.
    pub gid: String,
    /// LID (0 on RoCE).
    pub lid: u16,
    /// Active MTU in bytes.
    pub mtu: u32,
}

/// One remotely accessible region and its rkey on the NIC the peer connected to.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct RemoteKey {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Remote key.
    pub rkey: u32,
    /// Whether the region may be written (its MR has the remote-write right).
    #[serde(default = "yes")]
    pub writable: bool,
}

fn yes() -> bool {
    true
}

impl RemoteKey {
    /// True when `[addr, addr + len)` lies inside this region.
    pub fn covers(&self, addr: u64, len: u64) -> bool {
        addr >= self.addr && addr - self.addr <= self.len && len <= self.len - (addr - self.addr)
    }
}

impl std::fmt::Debug for RemoteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The rkey is a capability: keep it out of logs.
        write!(f, "RemoteKey({:#x}+{}", self.addr, self.len)?;
        if !self.writable {
            f.write_str(", read-only")?;
        }
        f.write_str(")")
    }
}

/// The server's first frame.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Hello {
    /// The server's protocol version.
    pub version: u32,
    /// A fresh random challenge (hex) the request must echo.
    pub nonce: String,
}

/// A handshake request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Request {
    /// Create a QP on `peer_nic` connected to the caller's QP.
    Connect {
        /// The caller's protocol version.
        version: u32,
        /// The server's [`Hello::nonce`], echoed.
        nonce: String,
        /// A MAC over the nonce and this request, once peers authenticate (none today).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        auth: Option<String>,
        /// The caller's segment name.
        from: String,
        /// The caller's generation.
        generation: u64,
        /// The caller's NIC.
        local_nic: String,
        /// The NIC of the callee to connect to.
        peer_nic: String,
        /// The caller's QP.
        qp: QpInfo,
    },
    /// List the regions and rkeys of `peer_nic` again (after new registrations), for the
    /// holder of a QP connected by an earlier `Connect`.
    Keys {
        /// The caller's protocol version.
        version: u32,
        /// The server's [`Hello::nonce`], echoed.
        nonce: String,
        /// A MAC over the nonce and this request, once peers authenticate (none today).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        auth: Option<String>,
        /// The caller's segment name.
        from: String,
        /// The callee's NIC.
        peer_nic: String,
        /// The callee's QP number, from the `Connect` reply.
        qpn: u32,
        /// The token the `Connect` reply gave for that QP.
        token: String,
    },
}

impl Request {
    /// Fills in the server's challenge (the client learns it from the [`Hello`]).
    pub fn set_nonce(&mut self, n: &str) {
        match self {
            Self::Connect { nonce, .. } | Self::Keys { nonce, .. } => *nonce = n.to_string(),
        }
    }

    /// The echoed challenge.
    pub fn nonce(&self) -> &str {
        match self {
            Self::Connect { nonce, .. } | Self::Keys { nonce, .. } => nonce,
        }
    }

    /// The caller's protocol version.
    pub fn version(&self) -> u32 {
        match self {
            Self::Connect { version, .. } | Self::Keys { version, .. } => *version,
        }
    }

    /// The MAC over the nonce and the request, if any.
    pub fn auth(&self) -> Option<&str> {
        match self {
            Self::Connect { auth, .. } | Self::Keys { auth, .. } => auth.as_deref(),
        }
    }
}

/// A handshake reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub(crate) enum Reply {
    /// Accepted.
    Ok {
        /// The callee's generation.
        generation: u64,
        /// The callee's QP (for `Connect`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        qp: Option<QpInfo>,
        /// The token that authorises later `Keys` requests for this QP (for `Connect`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// Regions the caller may access through this NIC.
        keys: Vec<RemoteKey>,
    },
    /// Refused, with the reason.
    Refused {
        /// Why.
        reason: String,
        /// The server is out of room for now (worth trying again later).
        #[serde(default)]
        busy: bool,
    },
}

/// Encodes one frame.
pub(crate) fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>> {
    let body = serde_json::to_vec(msg)
        .map_err(|e| Error::new(ErrorKind::Protocol, format!("encode handshake: {e}")))?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&body);
    Ok(buf)
}

/// Parses a frame body.
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| {
        Error::new(
            ErrorKind::Protocol,
            format!("malformed handshake message: {e}"),
        )
    })
}

/// Reassembles one frame from bytes as they arrive, refusing a length above `max` as soon as
/// the 4-byte header is in (before buffering the body).
#[derive(Debug)]
pub(crate) struct FrameReader {
    buf: Vec<u8>,
    max: usize,
}

impl FrameReader {
    /// A reader for frames of at most `max` body bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
        }
    }

    /// How many more bytes may be read without passing the end of the frame (so the reader
    /// never consumes bytes of a following frame). At least 1 until a frame is complete.
    pub fn want(&self) -> usize {
        match self.len() {
            None => 4 - self.buf.len(),
            Some(l) => (4 + l).saturating_sub(self.buf.len()),
        }
    }

    fn len(&self) -> Option<usize> {
        (self.buf.len() >= 4).then(|| {
            u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize
        })
    }

    /// Appends bytes (at most [`want`](Self::want) of them) and returns the frame body once
    /// complete.
    pub fn push(&mut self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        debug_assert!(data.len() <= self.want());
        self.buf.extend_from_slice(data);
        let Some(len) = self.len() else {
            return Ok(None);
        };
        if len == 0 || len > self.max {
            return Err(Error::new(
                ErrorKind::Protocol,
                format!("handshake frame of {len} bytes (max {})", self.max),
            ));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let body = self.buf.split_off(4);
        self.buf.clear();
        Ok(Some(body))
    }
}

/// GID bytes → 32 hex digits.
pub(crate) fn gid_to_hex(raw: &[u8; 16]) -> String {
    hex(raw)
}

/// Bytes → lowercase hex.
pub(crate) fn hex(raw: &[u8]) -> String {
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// 32 hex digits (colons allowed) → GID bytes.
pub(crate) fn gid_from_hex(s: &str) -> Result<[u8; 16]> {
    let digits: Vec<u8> = s.bytes().filter(|&c| c != b':').collect();
    let bad = || Error::new(ErrorKind::Protocol, format!("malformed GID {s:?}"));
    if digits.len() != 32 {
        return Err(bad());
    }
    let mut out = [0u8; 16];
    for (i, pair) in digits.chunks(2).enumerate() {
        let hex = std::str::from_utf8(pair).map_err(|_| bad())?;
        out[i] = u8::from_str_radix(hex, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Compares two secrets in time independent of where they differ.
pub(crate) fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect() -> Request {
        Request::Connect {
            version: VERSION,
            nonce: String::new(),
            auth: None,
            from: "a".into(),
            generation: 7,
            local_nic: "rxe0".into(),
            peer_nic: "rxe1".into(),
            qp: QpInfo {
                qpn: 17,
                psn: 99,
                gid: gid_to_hex(&[1; 16]),
                lid: 0,
                mtu: 1024,
            },
        }
    }

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let mut req = connect();
        req.set_nonce("abcd");
        assert_eq!(req.nonce(), "abcd");
        let bytes = serde_json::to_vec(&req).unwrap();
        assert_eq!(decode::<Request>(&bytes).unwrap(), req);
        assert!(decode::<Request>(b"{\"op\":\"nope\"}").is_err());
        assert!(decode::<Reply>(b"\xff\x00").is_err());
        let k = RemoteKey {
            addr: 0x1000,
            len: 4096,
            rkey: 0xdead,
            writable: false,
        };
        assert!(
            !format!("{k:?}").contains("dead"),
            "rkeys stay out of Debug"
        );
        assert!(k.covers(0x1000, 4096) && k.covers(0x1fff, 1));
        assert!(!k.covers(0x0fff, 2) && !k.covers(0x1000, 4097) && !k.covers(0x2000, 1));
        assert!(!k.covers(u64::MAX, 2));
    }

    #[test]
    fn frames_reassemble_from_any_split() {
        let frame = encode(&connect()).unwrap();
        for chunk in [1, 2, 3, 5, 64, frame.len()] {
            let mut r = FrameReader::new(MAX_REQUEST);
            let mut got = None;
            let mut pos = 0;
            while got.is_none() {
                let n = r.want().min(chunk).min(frame.len() - pos);
                assert!(n > 0, "the reader wants bytes until the frame is whole");
                got = r.push(&frame[pos..pos + n]).unwrap();
                pos += n;
            }
            assert_eq!(pos, frame.len(), "the reader never reads past its frame");
            assert_eq!(decode::<Request>(&got.unwrap()).unwrap(), connect());
        }
    }

    #[test]
    fn oversized_and_empty_frames_are_refused_at_the_header() {
        let mut r = FrameReader::new(MAX_REQUEST);
        let huge = (16u32 << 20).to_le_bytes();
        // Refused as soon as the header is in, before any body byte is buffered.
        assert!(r.push(&huge[..3]).unwrap().is_none());
        assert!(r.push(&huge[3..]).is_err());
        let mut r = FrameReader::new(MAX_REQUEST);
        assert!(r.push(&0u32.to_le_bytes()).is_err());
        let mut r = FrameReader::new(MAX_REQUEST);
        let exact = (MAX_REQUEST as u32).to_le_bytes();
        assert!(r.push(&exact).unwrap().is_none());
        assert_eq!(r.want(), MAX_REQUEST);
    }

    #[test]
    fn gids_parse_both_ways() {
        let raw: [u8; 16] = core::array::from_fn(|i| i as u8 * 17);
        assert_eq!(gid_from_hex(&gid_to_hex(&raw)).unwrap(), raw);
        assert_eq!(
            gid_from_hex("fe80:0000:0000:0000:0000:0000:0000:0001").unwrap()[15],
            1
        );
        assert!(gid_from_hex("fe80").is_err());
        assert!(gid_from_hex("zz80:0000:0000:0000:0000:0000:0000:0001").is_err());
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
}
