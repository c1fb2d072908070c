//! The connection handshake: frames of a 4-byte little-endian length followed by JSON.
//!
//! One exchange per TCP connection:
//!
//! 1. on accept the server sends a [`Hello`] with a fresh random nonce;
//! 2. the client sends one [`Request`] that echoes the nonce, with a nonce of its own;
//! 3. the server checks the request *before any state changes* and sends one [`Reply`].
//!
//! With a cluster secret ([`ClusterSecret`]) both messages carry a proof (HMAC-SHA256 under
//! the secret): the request's covers both nonces, the caller's segment name and generation,
//! the callee's name and every field of the request; the reply's covers the request's proof,
//! the callee's name and generation and every field of the reply. A proof is good for one
//! connection, one direction and one identity only, so names and generations in handshakes
//! cannot be spoofed and keys reach only a holder of the secret.
//!
//! Remote keys travel only here, and only to a peer that set up a QP on that NIC: `Connect`
//! creates the QP and returns the keys with a per-QP token; `Keys` must name that QP and
//! present the token. The published segment descriptor never carries keys.
//!
//! [`FrameReader`] bounds every frame by its announced length before buffering it, so a
//! peer cannot make the reader hold more than the limit.

use mooncake_core::{ClusterSecret, Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};

/// The `extra` key of the segment descriptor holding the handshake `host:port`.
pub const HANDSHAKE_KEY: &str = "rdma_handshake";

/// The descriptor field listing the base addresses of the device regions (`cuda:N`) the
/// owner registered with its NICs from dma-bufs: peers move bytes of only those device
/// buffers over RDMA (GPUDirect).
pub const GPUDIRECT_KEY: &str = "rdma_gpudirect";

/// Handshake protocol version; a peer speaking another one is refused.
pub(crate) const VERSION: u32 = 3;
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
        /// The caller's nonce (hex), which the reply's proof covers.
        #[serde(default)]
        cnonce: String,
        /// The proof of the cluster secret over both nonces and this request (hex), when
        /// the caller has a secret.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        auth: Option<String>,
        /// The caller's segment name.
        from: String,
        /// The caller's generation.
        generation: u64,
        /// The callee's segment name, as the caller knows it.
        #[serde(default)]
        to: String,
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
        /// The caller's nonce (hex), which the reply's proof covers.
        #[serde(default)]
        cnonce: String,
        /// The proof of the cluster secret over both nonces and this request (hex), when
        /// the caller has a secret.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        auth: Option<String>,
        /// The caller's segment name.
        from: String,
        /// The caller's generation (the QP's owner must be this incarnation).
        #[serde(default)]
        generation: u64,
        /// The callee's segment name, as the caller knows it.
        #[serde(default)]
        to: String,
        /// The callee's NIC.
        peer_nic: String,
        /// The callee's QP number, from the `Connect` reply.
        qpn: u32,
        /// The token the `Connect` reply gave for that QP.
        token: String,
    },
}

impl Request {
    /// Answers the server's challenge `n` with our nonce `cn`, and proves the secret (if
    /// any) over the whole request.
    pub fn answer(&mut self, n: &str, cn: &str, secret: Option<&ClusterSecret>) {
        match self {
            Self::Connect {
                nonce,
                cnonce,
                auth,
                ..
            }
            | Self::Keys {
                nonce,
                cnonce,
                auth,
                ..
            } => {
                *nonce = n.to_string();
                *cnonce = cn.to_string();
                *auth = None;
            }
        }
        if let Some(secret) = secret {
            let proof = hex(&self.proof(secret));
            match self {
                Self::Connect { auth, .. } | Self::Keys { auth, .. } => *auth = Some(proof),
            }
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

    /// The proof over the request, if any.
    pub fn auth(&self) -> Option<&str> {
        match self {
            Self::Connect { auth, .. } | Self::Keys { auth, .. } => auth.as_deref(),
        }
    }

    /// The callee's segment name, as the caller knows it.
    pub fn to(&self) -> &str {
        match self {
            Self::Connect { to, .. } | Self::Keys { to, .. } => to,
        }
    }

    /// True when the request carries `secret`'s proof over all its fields.
    pub fn verify(&self, secret: &ClusterSecret) -> bool {
        let Some(proof) = self.auth().and_then(unhex) else {
            return false;
        };
        secret.verify(REQUEST_ROLE, &refs(&self.transcript()), &proof)
    }

    fn proof(&self, secret: &ClusterSecret) -> [u8; mooncake_core::auth::PROOF_LEN] {
        secret.prove(REQUEST_ROLE, &refs(&self.transcript()))
    }

    /// Every field but the proof, length-prefixed by [`ClusterSecret::prove`].
    fn transcript(&self) -> Vec<Vec<u8>> {
        let s = |x: &str| x.as_bytes().to_vec();
        match self {
            Self::Connect {
                version,
                nonce,
                cnonce,
                auth: _,
                from,
                generation,
                to,
                local_nic,
                peer_nic,
                qp,
            } => vec![
                b"connect".to_vec(),
                version.to_le_bytes().to_vec(),
                s(nonce),
                s(cnonce),
                s(from),
                generation.to_le_bytes().to_vec(),
                s(to),
                s(local_nic),
                s(peer_nic),
                qp_bytes(qp),
            ],
            Self::Keys {
                version,
                nonce,
                cnonce,
                auth: _,
                from,
                generation,
                to,
                peer_nic,
                qpn,
                token,
            } => vec![
                b"keys".to_vec(),
                version.to_le_bytes().to_vec(),
                s(nonce),
                s(cnonce),
                s(from),
                generation.to_le_bytes().to_vec(),
                s(to),
                s(peer_nic),
                qpn.to_le_bytes().to_vec(),
                s(token),
            ],
        }
    }
}

const REQUEST_ROLE: &[u8] = b"mooncake-rdma-request";
const REPLY_ROLE: &[u8] = b"mooncake-rdma-reply";

fn refs(v: &[Vec<u8>]) -> Vec<&[u8]> {
    v.iter().map(Vec::as_slice).collect()
}

fn qp_bytes(qp: &QpInfo) -> Vec<u8> {
    let mut b = Vec::with_capacity(14 + qp.gid.len());
    b.extend_from_slice(&qp.qpn.to_le_bytes());
    b.extend_from_slice(&qp.psn.to_le_bytes());
    b.extend_from_slice(&qp.lid.to_le_bytes());
    b.extend_from_slice(&qp.mtu.to_le_bytes());
    b.extend_from_slice(qp.gid.as_bytes());
    b
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
        /// The callee's proof of the cluster secret over the request's proof and this reply
        /// (hex), when it has a secret.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        auth: Option<String>,
    },
    /// Refused, with the reason.
    Refused {
        /// Why.
        reason: String,
        /// The server is out of room for now (worth trying again later).
        #[serde(default)]
        busy: bool,
        /// The caller did not prove the cluster secret (trying again will not help).
        #[serde(default)]
        denied: bool,
    },
}

impl Reply {
    /// Proves `secret` over this reply to `req`, as the segment `me`. Refusals carry no
    /// proof.
    pub fn seal(&mut self, secret: &ClusterSecret, req: &Request, me: &str) {
        if let Some(t) = self.transcript(req, me) {
            let proof = hex(&secret.prove(REPLY_ROLE, &refs(&t)));
            if let Self::Ok { auth, .. } = self {
                *auth = Some(proof);
            }
        }
    }

    /// True when this is an accepting reply to `req` carrying `secret`'s proof, made by the
    /// segment the request was for.
    pub fn verify(&self, secret: &ClusterSecret, req: &Request) -> bool {
        let Self::Ok { auth: Some(a), .. } = self else {
            return false;
        };
        let (Some(proof), Some(t)) = (unhex(a), self.transcript(req, req.to())) else {
            return false;
        };
        secret.verify(REPLY_ROLE, &refs(&t), &proof)
    }

    fn transcript(&self, req: &Request, me: &str) -> Option<Vec<Vec<u8>>> {
        let Self::Ok {
            generation,
            qp,
            token,
            keys,
            auth: _,
        } = self
        else {
            return None;
        };
        let mut k = Vec::with_capacity(keys.len() * 21);
        for key in keys {
            k.extend_from_slice(&key.addr.to_le_bytes());
            k.extend_from_slice(&key.len.to_le_bytes());
            k.extend_from_slice(&key.rkey.to_le_bytes());
            k.push(key.writable as u8);
        }
        Some(vec![
            req.auth().unwrap_or_default().as_bytes().to_vec(),
            me.as_bytes().to_vec(),
            generation.to_le_bytes().to_vec(),
            qp.as_ref().map(qp_bytes).unwrap_or_default(),
            token.as_deref().unwrap_or_default().as_bytes().to_vec(),
            k,
        ])
    }
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

/// Lowercase or uppercase hex → bytes (`None` if malformed).
pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect()
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

/// Runs arbitrary bytes through the frame reader (in chunks of the first byte's size, for
/// each size limit) and every message decoder, checking their invariants: frames stay within
/// their limit and never read past their end, whatever decodes re-encodes to an equal
/// message, and checking proofs over any message never panics. Panics on a violation (the
/// fuzz target `rdma_handshake_frame`).
pub(crate) fn fuzz_frames(data: &[u8]) {
    let Some((&c, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(c).max(1);
    for max in [MAX_HELLO, MAX_REQUEST, MAX_REPLY] {
        let mut r = FrameReader::new(max);
        let mut pos = 0;
        while pos < rest.len() {
            let n = r.want().min(chunk).min(rest.len() - pos);
            assert!(n > 0, "the reader wants bytes until its frame is whole");
            match r.push(&rest[pos..pos + n]) {
                Ok(Some(body)) => {
                    assert!(!body.is_empty() && body.len() <= max);
                    let len = u32::from_le_bytes(
                        rest[pos + n - body.len() - 4..pos + n - body.len()]
                            .try_into()
                            .expect("4 bytes"),
                    ) as usize;
                    assert_eq!(len, body.len(), "a frame ends where its header says");
                    fuzz_bodies(&body);
                }
                Ok(None) => {}
                Err(_) => break,
            }
            pos += n;
        }
    }
    fuzz_bodies(rest);
}

fn fuzz_bodies(body: &[u8]) {
    let secret = ClusterSecret::from_bytes(&[7; 32]).expect("32 bytes");
    let req = decode::<Request>(body).ok();
    if let Some(r) = &req {
        let back: Request = decode(&encode(r).expect("encodes")[4..]).expect("decodes");
        assert_eq!(&back, r);
        let _ = r.verify(&secret);
        let mut signed = r.clone();
        signed.answer("00", "11", Some(&secret));
        assert!(signed.verify(&secret));
    }
    if let Ok(reply) = decode::<Reply>(body) {
        let back: Reply = decode(&encode(&reply).expect("encodes")[4..]).expect("decodes");
        assert_eq!(back, reply);
        if let Some(r) = &req {
            let _ = reply.verify(&secret, r);
        }
    }
    if let Ok(h) = decode::<Hello>(body) {
        let back: Hello = decode(&encode(&h).expect("encodes")[4..]).expect("decodes");
        assert_eq!(back, h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect() -> Request {
        Request::Connect {
            version: VERSION,
            nonce: String::new(),
            cnonce: String::new(),
            auth: None,
            from: "a".into(),
            generation: 7,
            to: "b".into(),
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
        req.answer("abcd", "ef01", None);
        assert_eq!(req.nonce(), "abcd");
        assert!(req.auth().is_none());
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

    fn secret(b: u8) -> ClusterSecret {
        ClusterSecret::from_bytes(&[b; 32]).unwrap()
    }

    fn keys_req() -> Request {
        Request::Keys {
            version: VERSION,
            nonce: String::new(),
            cnonce: String::new(),
            auth: None,
            from: "a".into(),
            generation: 7,
            to: "b".into(),
            peer_nic: "rxe1".into(),
            qpn: 5,
            token: "00ff".into(),
        }
    }

    /// Every field a request may carry, changed one at a time.
    fn tampered(req: &Request) -> Vec<Request> {
        let mut out = Vec::new();
        for k in 0..10 {
            let mut r = req.clone();
            match &mut r {
                Request::Connect {
                    nonce,
                    cnonce,
                    from,
                    generation,
                    to,
                    local_nic,
                    peer_nic,
                    qp,
                    ..
                } => match k {
                    0 => nonce.push('0'),
                    1 => cnonce.push('0'),
                    2 => *from = "mallory".into(),
                    3 => *generation += 1,
                    4 => *to = "c".into(),
                    5 => local_nic.push('x'),
                    6 => peer_nic.push('x'),
                    7 => qp.qpn += 1,
                    8 => qp.psn += 1,
                    _ => qp.gid = gid_to_hex(&[2; 16]),
                },
                Request::Keys {
                    nonce,
                    cnonce,
                    from,
                    generation,
                    to,
                    peer_nic,
                    qpn,
                    token,
                    ..
                } => match k {
                    0 => nonce.push('0'),
                    1 => cnonce.push('0'),
                    2 => *from = "mallory".into(),
                    3 => *generation += 1,
                    4 => *to = "c".into(),
                    5 => peer_nic.push('x'),
                    6 => *qpn += 1,
                    7 => token.push('0'),
                    _ => continue,
                },
            }
            out.push(r);
        }
        out
    }

    #[test]
    fn request_proofs_bind_every_field_and_the_secret() {
        for base in [connect(), keys_req()] {
            let mut req = base.clone();
            req.answer("aa", "bb", Some(&secret(1)));
            assert!(req.verify(&secret(1)));
            assert!(!req.verify(&secret(2)), "another secret");
            for t in tampered(&req) {
                assert!(!t.verify(&secret(1)), "a changed field passed: {t:?}");
            }
            // Without a proof, or with a malformed one.
            let mut bare = base.clone();
            bare.answer("aa", "bb", None);
            assert!(!bare.verify(&secret(1)));
            let mut bad = req.clone();
            let (Request::Connect { auth, .. } | Request::Keys { auth, .. }) = &mut bad;
            *auth = Some("zz".into());
            assert!(!bad.verify(&secret(1)));
            // A proof survives the wire.
            let back: Request = decode(&serde_json::to_vec(&req).unwrap()).unwrap();
            assert!(back.verify(&secret(1)));
        }
    }

    #[test]
    fn reply_proofs_bind_the_request_the_callee_and_every_field() {
        let mut req = connect();
        req.answer("aa", "bb", Some(&secret(1)));
        let ok = || Reply::Ok {
            generation: 9,
            qp: Some(QpInfo {
                qpn: 3,
                psn: 4,
                gid: gid_to_hex(&[3; 16]),
                lid: 0,
                mtu: 4096,
            }),
            token: Some("beef".into()),
            keys: vec![RemoteKey {
                addr: 0x1000,
                len: 4096,
                rkey: 42,
                writable: true,
            }],
            auth: None,
        };
        let mut reply = ok();
        assert!(!reply.verify(&secret(1), &req), "no proof");
        reply.seal(&secret(1), &req, "b");
        assert!(reply.verify(&secret(1), &req));
        assert!(!reply.verify(&secret(2), &req), "another secret");
        // Made by another segment than the one the request was for.
        let mut other = ok();
        other.seal(&secret(1), &req, "c");
        assert!(!other.verify(&secret(1), &req));
        // For another request (another connection's nonces).
        let mut req2 = connect();
        req2.answer("aa", "bc", Some(&secret(1)));
        assert!(!reply.verify(&secret(1), &req2));
        // Any changed field.
        let Reply::Ok {
            generation,
            qp,
            token,
            keys,
            auth,
        } = reply.clone()
        else {
            unreachable!()
        };
        let variants = [
            Reply::Ok {
                generation: generation + 1,
                qp: qp.clone(),
                token: token.clone(),
                keys: keys.clone(),
                auth: auth.clone(),
            },
            Reply::Ok {
                generation,
                qp: None,
                token: token.clone(),
                keys: keys.clone(),
                auth: auth.clone(),
            },
            Reply::Ok {
                generation,
                qp: qp.clone(),
                token: Some("beee".into()),
                keys: keys.clone(),
                auth: auth.clone(),
            },
            Reply::Ok {
                generation,
                qp,
                token,
                keys: vec![RemoteKey {
                    writable: false,
                    ..keys[0].clone()
                }],
                auth,
            },
        ];
        for v in variants {
            assert!(!v.verify(&secret(1), &req), "{v:?}");
        }
        // Refusals carry no proof and never verify.
        let mut no = Reply::Refused {
            reason: "x".into(),
            busy: false,
            denied: false,
        };
        no.seal(&secret(1), &req, "b");
        assert!(!no.verify(&secret(1), &req));
    }

    #[test]
    fn hex_round_trips_and_garbage_is_none() {
        assert_eq!(
            unhex(&hex(&[0, 1, 0xab, 0xff])).unwrap(),
            vec![0, 1, 0xab, 0xff]
        );
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
        assert!(unhex("é0").is_none());
    }

    #[test]
    fn the_fuzz_entry_accepts_valid_and_broken_frames() {
        let mut req = connect();
        req.answer(
            "aa",
            "bb",
            Some(&ClusterSecret::from_bytes(&[7; 32]).unwrap()),
        );
        let frame = encode(&req).unwrap();
        for chunk in [1u8, 3, 255] {
            let mut data = vec![chunk];
            data.extend_from_slice(&frame);
            data.extend_from_slice(&frame[..frame.len() / 2]);
            fuzz_frames(&data);
        }
        fuzz_frames(&[]);
        fuzz_frames(&[9, 0xff, 0xff, 0xff, 0xff, b'{']);
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
}
