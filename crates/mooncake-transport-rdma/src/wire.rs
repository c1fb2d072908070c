//! The connection handshake: one request and one reply per TCP connection, each a 4-byte
//! little-endian length followed by JSON.
//!
//! Remote keys travel only here, and only to the peer that asked for a QP on that NIC; the
//! published segment descriptor never carries them.

use std::io::{Read, Write};
use std::net::TcpStream;

use mooncake_core::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};

/// Largest handshake message accepted (a reply lists every registered region).
pub(crate) const MAX_MESSAGE: usize = 16 << 20;

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
}

impl std::fmt::Debug for RemoteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The rkey is a capability: keep it out of logs.
        write!(f, "RemoteKey({:#x}+{})", self.addr, self.len)
    }
}

/// A handshake request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Request {
    /// Create a QP on `peer_nic` connected to the caller's QP.
    Connect {
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
    /// List the regions and rkeys of `peer_nic` again (after new registrations).
    Keys {
        /// The caller's segment name.
        from: String,
        /// The callee's NIC.
        peer_nic: String,
    },
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
        qp: Option<QpInfo>,
        /// Regions the caller may access through this NIC.
        keys: Vec<RemoteKey>,
    },
    /// Refused, with the reason.
    Refused {
        /// Why.
        reason: String,
    },
}

/// Writes one framed message.
pub(crate) fn send<T: Serialize>(s: &mut TcpStream, msg: &T) -> Result<()> {
    let body = serde_json::to_vec(msg)
        .map_err(|e| Error::new(ErrorKind::Protocol, format!("encode handshake: {e}")))?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&body);
    s.write_all(&buf)
        .map_err(|e| Error::io("handshake send", &e))
}

/// Reads one framed message.
pub(crate) fn recv<T: for<'de> Deserialize<'de>>(s: &mut TcpStream) -> Result<T> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)
        .map_err(|e| Error::io("handshake receive", &e))?;
    let len = u32::from_le_bytes(len) as usize;
    decode_len(len)?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)
        .map_err(|e| Error::io("handshake receive", &e))?;
    decode(&body)
}

fn decode_len(len: usize) -> Result<()> {
    if len == 0 || len > MAX_MESSAGE {
        return Err(Error::new(
            ErrorKind::Protocol,
            format!("handshake message of {len} bytes (max {MAX_MESSAGE})"),
        ));
    }
    Ok(())
}

/// Parses a message body.
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| {
        Error::new(
            ErrorKind::Protocol,
            format!("malformed handshake message: {e}"),
        )
    })
}

/// GID bytes → 32 hex digits.
pub(crate) fn gid_to_hex(raw: &[u8; 16]) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let req = Request::Connect {
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
        };
        let bytes = serde_json::to_vec(&req).unwrap();
        assert_eq!(decode::<Request>(&bytes).unwrap(), req);
        assert!(decode::<Request>(b"{\"op\":\"nope\"}").is_err());
        assert!(decode::<Reply>(b"\xff\x00").is_err());
        assert!(decode_len(0).is_err());
        assert!(decode_len(MAX_MESSAGE + 1).is_err());
        let k = RemoteKey {
            addr: 0x1000,
            len: 4096,
            rkey: 0xdead,
        };
        assert!(
            !format!("{k:?}").contains("dead"),
            "rkeys stay out of Debug"
        );
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
}
