//! Optional TLS 1.3 (rustls, ring) under the frame protocol of a connection.
//!
//! Each transport makes an ephemeral self-signed certificate when it starts. Initiators accept
//! any certificate whose handshake signature verifies: who the peer is is proven by the
//! cluster secret's challenge-response, which with TLS also covers a value exported from the
//! TLS session ([`Tls::binding`]), so a proof made on one TLS session is worthless on another
//! and a relay that terminates TLS on both sides fails it. Without a cluster secret the
//! encryption stops passive eavesdroppers only.
//!
//! [`Tls`] wraps one rustls connection over a non-blocking socket. Reads hand out decrypted
//! bytes; sends hand plaintext to rustls and write the records out as far as the socket takes
//! them. Records that did not fit stay queued in rustls (at most [`BUFFER_LIMIT`] bytes of
//! plaintext): the socket returned `EAGAIN`, so its next writable edge calls [`Tls::flush`].

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use mooncake_core::{Error, ErrorKind, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::sys::{self, Chunk, Io};

/// Plaintext bytes rustls may hold for a connection before a send takes no more.
pub(crate) const BUFFER_LIMIT: usize = 256 * 1024;

/// Size of the bounce buffer between registered memory and rustls.
const BOUNCE: usize = 16 * 1024;

/// Label of the TLS exporter value that proofs of the cluster secret cover (RFC 8446 §7.5).
const EXPORTER_LABEL: &[u8] = b"EXPORTER-mooncake-tcp-channel-binding";

/// The TLS settings of one transport: both ends.
pub(crate) struct TlsConfig {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig")
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Config, format!("tcp transport TLS: {what}: {e}"))
}

impl TlsConfig {
    /// TLS 1.3 only, with a fresh self-signed certificate for the target side.
    pub(crate) fn new() -> Result<Self> {
        let provider = provider();
        let key = rcgen::generate_simple_self_signed(vec!["mooncake".to_string()])
            .map_err(|e| tls_error("cannot make a certificate", e))?;
        let cert = CertificateDer::from(key.cert.der().to_vec());
        let pkey = PrivateKeyDer::try_from(key.key_pair.serialize_der())
            .map_err(|e| tls_error("cannot use the certificate's key", e))?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_error("server settings", e))?
            .with_no_client_auth()
            .with_single_cert(vec![cert], pkey)
            .map_err(|e| tls_error("server certificate", e))?;
        let verifier = Arc::new(SignatureOnly {
            algorithms: provider.signature_verification_algorithms,
        });
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_error("client settings", e))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// The target end of a new connection.
    pub(crate) fn accept(&self) -> Result<Tls> {
        let c = rustls::ServerConnection::new(self.server.clone())
            .map_err(|e| tls_error("new connection", e))?;
        Ok(Tls::new(c.into()))
    }

    /// The initiator end of a new connection.
    pub(crate) fn connect(&self) -> Result<Tls> {
        let name = ServerName::try_from("mooncake").expect("a valid DNS name");
        let c = rustls::ClientConnection::new(self.client.clone(), name)
            .map_err(|e| tls_error("new connection", e))?;
        Ok(Tls::new(c.into()))
    }
}

/// Accepts any certificate, but checks that the peer holds its key (the handshake signature):
/// the peer's identity is proven by the cluster secret bound to the session, not by a CA.
#[derive(Debug)]
struct SignatureOnly {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SignatureOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A socket as `Write` for rustls: non-blocking, `EAGAIN` as `WouldBlock`.
struct Fd(RawFd);

impl Write for Fd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match sys::send_chunks(self.0, &[Chunk::Bytes(buf)])? {
            Io::Done(n) => Ok(n),
            Io::Eof => Err(io::ErrorKind::WriteZero.into()),
            Io::WouldBlock => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // rustls hands over all its queued records at once: one `sendmsg` for all of them.
        let chunks: Vec<Chunk<'_>> = bufs.iter().map(|b| Chunk::Bytes(b)).collect();
        match sys::send_chunks(self.0, &chunks)? {
            Io::Done(n) => Ok(n),
            Io::Eof => Err(io::ErrorKind::WriteZero.into()),
            Io::WouldBlock => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Bytes read from the socket in one `recv` before rustls takes them (it reads 4 KiB at a
/// time: straight from the socket that would be a system call per 4 KiB).
const INBUF: usize = 128 * 1024;

/// A session and the socket bytes it has not taken yet.
struct State {
    conn: rustls::Connection,
    inbuf: Vec<u8>,
    start: usize,
    end: usize,
}

/// One TLS session over a non-blocking socket. The lock lets the initiator's sending thread
/// and its loop's reading share it.
pub(crate) struct Tls {
    state: Mutex<State>,
}

impl Tls {
    fn new(mut conn: rustls::Connection) -> Self {
        conn.set_buffer_limit(Some(BUFFER_LIMIT));
        Self {
            state: Mutex::new(State {
                conn,
                inbuf: Vec::new(),
                start: 0,
                end: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes queued records; true when none is left, false when the socket is full.
    fn flush_locked(c: &mut rustls::Connection, fd: RawFd) -> io::Result<bool> {
        while c.wants_write() {
            match c.write_tls(&mut Fd(fd)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Writes the records rustls holds; true when none is left.
    pub(crate) fn flush(&self, fd: RawFd) -> io::Result<bool> {
        Self::flush_locked(&mut self.lock().conn, fd)
    }

    /// Decrypted bytes into `buf`: what rustls holds, else what one read of the socket
    /// brings. `WouldBlock` only once the socket returned `EAGAIN`.
    pub(crate) fn recv(&self, fd: RawFd, buf: &mut [u8]) -> io::Result<Io> {
        let mut st = self.lock();
        let State {
            conn: c,
            inbuf,
            start,
            end,
        } = &mut *st;
        loop {
            match c.reader().read(buf) {
                Ok(0) if !buf.is_empty() => return Ok(Io::Eof),
                Ok(n) => return Ok(Io::Done(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if *start == *end {
                if inbuf.is_empty() {
                    inbuf.resize(INBUF, 0);
                }
                match sys::recv(fd, inbuf)? {
                    Io::Done(n) => (*start, *end) = (0, n),
                    Io::Eof => return Ok(Io::Eof),
                    Io::WouldBlock => {
                        Self::flush_locked(c, fd)?;
                        return Ok(Io::WouldBlock);
                    }
                }
            }
            match c.read_tls(&mut &inbuf[*start..*end]) {
                Ok(n) => *start += n,
                Err(e) => return Err(e),
            }
            if let Err(e) = c.process_new_packets() {
                // Tell the peer why (best effort), then fail the connection.
                let _ = Self::flush_locked(c, fd);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            // Handshake replies, key updates.
            Self::flush_locked(c, fd)?;
        }
    }

    /// Decrypted bytes straight into `lease` at `offset`, up to `len`.
    pub(crate) fn recv_into_lease(
        &self,
        fd: RawFd,
        lease: &mooncake_core::RegionLease,
        offset: u64,
        len: usize,
    ) -> io::Result<Io> {
        let mut bounce = [0u8; BOUNCE];
        let mut got = 0usize;
        while got < len {
            let want = (len - got).min(BOUNCE);
            match self.recv(fd, &mut bounce[..want])? {
                Io::Done(n) => {
                    sys::copy_into_lease(lease, offset + got as u64, &bounce[..n]);
                    got += n;
                }
                r @ (Io::WouldBlock | Io::Eof) if got == 0 => return Ok(r),
                Io::WouldBlock | Io::Eof => break,
            }
        }
        Ok(Io::Done(got))
    }

    /// Hands the chunks' bytes to rustls, as far as its buffer takes them, and writes the
    /// records out. `Done(n)`: `n` plaintext bytes taken (their records may still be queued:
    /// a later send or [`flush`](Self::flush) writes them). `WouldBlock`: records from
    /// before are still queued and the socket is full.
    pub(crate) fn send_chunks(&self, fd: RawFd, chunks: &[Chunk<'_>]) -> io::Result<Io> {
        let mut st = self.lock();
        let c = &mut st.conn;
        if !Self::flush_locked(c, fd)? {
            return Ok(Io::WouldBlock);
        }
        let mut bounce = [0u8; BOUNCE];
        let mut taken = 0usize;
        'chunks: for chunk in chunks {
            let total = match chunk {
                Chunk::Bytes(b) => b.len() as u64,
                Chunk::Leased { len, .. } => *len,
            };
            let mut at = 0u64;
            while at < total {
                let n = match chunk {
                    Chunk::Bytes(b) => c.writer().write(&b[at as usize..])?,
                    Chunk::Leased { lease, offset, .. } => {
                        let k = (total - at).min(BOUNCE as u64) as usize;
                        sys::copy_from_lease(lease, offset + at, &mut bounce[..k]);
                        c.writer().write(&bounce[..k])?
                    }
                };
                taken += n;
                at += n as u64;
                if n == 0 {
                    // rustls holds its limit: write records out and go on if that made room;
                    // stop if the socket is full or nothing was waiting to go out (during
                    // the handshake, plaintext waits for it to finish).
                    if !c.wants_write() || !Self::flush_locked(c, fd)? {
                        break 'chunks;
                    }
                }
            }
        }
        Self::flush_locked(c, fd)?;
        if taken == 0 && c.wants_write() {
            return Ok(Io::WouldBlock);
        }
        Ok(Io::Done(taken))
    }

    /// The value both ends of this session (and only they) derive from it, once its
    /// handshake is done; the cluster secret's proofs cover it.
    pub(crate) fn binding(&self) -> io::Result<[u8; 32]> {
        let st = self.lock();
        let mut out = [0u8; 32];
        st.conn
            .export_keying_material(&mut out[..], EXPORTER_LABEL, None)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    /// Drives both ends over a socket pair until `a` has read `expect` bytes from `b`.
    fn pump(a: &Tls, fa: RawFd, b: &Tls, fb: RawFd, msg: &[u8]) -> Vec<u8> {
        let mut sent = 0;
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < msg.len() {
            assert!(Instant::now() < deadline, "no progress");
            if sent < msg.len() {
                if let Io::Done(n) = b.send_chunks(fb, &[Chunk::Bytes(&msg[sent..])]).unwrap() {
                    sent += n;
                }
            } else {
                b.flush(fb).unwrap();
            }
            // The initiator end must read to finish its handshake.
            let mut scratch = [0u8; 64];
            let _ = b.recv(fb, &mut scratch).unwrap();
            let mut buf = [0u8; 4096];
            match a.recv(fa, &mut buf).unwrap() {
                Io::Done(n) => got.extend_from_slice(&buf[..n]),
                Io::Eof => panic!("unexpected end"),
                Io::WouldBlock => std::thread::sleep(Duration::from_micros(100)),
            }
        }
        got
    }

    #[test]
    fn bytes_cross_and_both_ends_share_the_binding() {
        let cfg = TlsConfig::new().unwrap();
        let (x, y) = UnixStream::pair().unwrap();
        x.set_nonblocking(true).unwrap();
        y.set_nonblocking(true).unwrap();
        let server = cfg.accept().unwrap();
        let client = cfg.connect().unwrap();
        let msg: Vec<u8> = (0..700_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let got = pump(&server, x.as_raw_fd(), &client, y.as_raw_fd(), &msg);
        assert_eq!(got, msg);
        assert_eq!(server.binding().unwrap(), client.binding().unwrap());
        // Another session: another binding.
        let (x2, y2) = UnixStream::pair().unwrap();
        x2.set_nonblocking(true).unwrap();
        y2.set_nonblocking(true).unwrap();
        let s2 = cfg.accept().unwrap();
        let c2 = cfg.connect().unwrap();
        pump(&s2, x2.as_raw_fd(), &c2, y2.as_raw_fd(), b"hello");
        assert_ne!(s2.binding().unwrap(), server.binding().unwrap());
    }

    #[test]
    fn the_wire_carries_no_plaintext() {
        let cfg = TlsConfig::new().unwrap();
        let (x, y) = UnixStream::pair().unwrap();
        y.set_nonblocking(true).unwrap();
        let client = cfg.connect().unwrap();
        // The handshake cannot finish (nobody answers): the bytes wait in rustls, and
        // whatever reached the socket is records, never the plaintext.
        let secret = b"registered-memory-contents-0123456789";
        let _ = client
            .send_chunks(y.as_raw_fd(), &[Chunk::Bytes(secret)])
            .unwrap();
        x.set_nonblocking(true).unwrap();
        let mut wire = vec![0u8; 1 << 16];
        let n = (&x).read(&mut wire).unwrap();
        assert!(n > 0);
        assert_eq!(wire[0], 0x16, "a TLS handshake record");
        assert!(!wire[..n].windows(secret.len()).any(|w| w == secret));
    }

    #[test]
    fn garbage_from_the_peer_is_an_error_not_a_panic() {
        let cfg = TlsConfig::new().unwrap();
        let (x, y) = UnixStream::pair().unwrap();
        x.set_nonblocking(true).unwrap();
        let server = cfg.accept().unwrap();
        (&y).write_all(&[0x42; 64]).unwrap();
        let mut buf = [0u8; 64];
        let e = server.recv(x.as_raw_fd(), &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
