//! The master's RPC: length-prefixed frames over TCP carrying postcard-encoded messages.
//!
//! - [`frame`]: the 16-byte header and its validating decoder.
//! - [`msg`]: [`Request`] and [`Response`].
//! - Blocking frame I/O ([`read_frame`], [`write_frame`]) and its async twin over
//!   `futures-lite` streams (`async-io`'s `Async<TcpStream>` in the client).
//!
//! A peer that sends a malformed header is disconnected; a well-framed request whose payload
//! does not decode gets a [`Response::Error`] with `INVALID_PARAMS`.

#![forbid(unsafe_code)]

pub mod frame;
pub mod msg;

use std::io::{self, Read, Write};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use serde::Serialize;

pub use frame::{FrameError, FrameHeader, FrameKind, HEADER_LEN, MAX_PAYLOAD, VERSION};
pub use msg::{PutItem, Request, Response, SessionInfo};

fn invalid(e: FrameError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Encodes `msg` as one frame into `buf` (cleared first).
pub fn encode<T: Serialize>(
    buf: &mut Vec<u8>,
    kind: FrameKind,
    id: u64,
    msg: &T,
) -> io::Result<()> {
    buf.clear();
    frame::encode_frame(buf, kind, id, msg).map_err(invalid)
}

/// Writes one frame.
pub fn write_frame<W: Write, T: Serialize>(
    w: &mut W,
    buf: &mut Vec<u8>,
    kind: FrameKind,
    id: u64,
    msg: &T,
) -> io::Result<()> {
    encode(buf, kind, id, msg)?;
    w.write_all(buf)
}

/// Reads one frame: its header, and its payload into `payload` (resized). An EOF before the
/// first header byte is `UnexpectedEof`; a bad header is `InvalidData`.
pub fn read_frame<R: Read>(r: &mut R, payload: &mut Vec<u8>) -> io::Result<FrameHeader> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h)?;
    let header = frame::decode_header(&h).map_err(invalid)?;
    payload.clear();
    payload.resize(header.len as usize, 0);
    r.read_exact(payload)?;
    Ok(header)
}

/// [`write_frame`] for async streams.
pub async fn write_frame_async<W: futures_lite::AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    buf: &mut Vec<u8>,
    kind: FrameKind,
    id: u64,
    msg: &T,
) -> io::Result<()> {
    encode(buf, kind, id, msg)?;
    w.write_all(buf).await?;
    w.flush().await
}

/// [`read_frame`] for async streams.
pub async fn read_frame_async<R: futures_lite::AsyncRead + Unpin>(
    r: &mut R,
    payload: &mut Vec<u8>,
) -> io::Result<FrameHeader> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).await?;
    let header = frame::decode_header(&h).map_err(invalid)?;
    payload.clear();
    payload.resize(header.len as usize, 0);
    r.read_exact(payload).await?;
    Ok(header)
}

/// Waits up to `spin` for bytes to arrive on `s` without sleeping (yielding the CPU between
/// polls), so a reply that comes back within microseconds is not delayed by a thread wake-up.
/// Returns early on data, EOF or an error; the caller then reads as usual.
pub fn spin_for_data(s: &std::net::TcpStream, spin: std::time::Duration) {
    if spin.is_zero() {
        return;
    }
    let start = std::time::Instant::now();
    let sock = socket2::SockRef::from(s);
    let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    loop {
        match sock.recv_with_flags(&mut b, libc::MSG_PEEK | libc::MSG_DONTWAIT) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            _ => return,
        }
        if start.elapsed() >= spin {
            return;
        }
        std::thread::yield_now();
    }
}

/// Decodes a request frame from untrusted bytes (what the fuzz target drives).
pub fn decode_request(b: &[u8]) -> Result<(FrameHeader, Request, usize), FrameError> {
    frame::decode_frame(b, FrameKind::Request)
}

/// Decodes a response frame from untrusted bytes (what the fuzz target drives).
pub fn decode_response(b: &[u8]) -> Result<(FrameHeader, Response, usize), FrameError> {
    frame::decode_frame(b, FrameKind::Response)
}

#[cfg(test)]
mod tests;

/// A plain blocking RPC connection to a master (benchmarks, tools, tests).
#[derive(Debug)]
pub struct RpcClient {
    stream: std::net::TcpStream,
    reader: std::io::BufReader<std::net::TcpStream>,
    buf: Vec<u8>,
    payload: Vec<u8>,
    next_id: u64,
}

impl RpcClient {
    /// Connects (TCP_NODELAY, `timeout` for connect, reads and writes).
    pub fn connect(addr: std::net::SocketAddr, timeout: std::time::Duration) -> io::Result<Self> {
        let stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let reader = std::io::BufReader::with_capacity(64 << 10, stream.try_clone()?);
        Ok(Self {
            stream,
            reader,
            buf: Vec::new(),
            payload: Vec::new(),
            next_id: 1,
        })
    }

    /// One request, one response.
    pub fn call(&mut self, req: &Request) -> io::Result<Response> {
        self.next_id += 1;
        let id = self.next_id;
        write_frame(&mut self.stream, &mut self.buf, FrameKind::Request, id, req)?;
        loop {
            let h = read_frame(&mut self.reader, &mut self.payload)?;
            if h.kind == FrameKind::Response && h.request_id == id {
                return frame::decode_payload(&self.payload)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }

    /// Writes raw bytes (malformed-input tests).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads one response frame (after [`send_raw`](Self::send_raw)).
    pub fn read_response(&mut self) -> io::Result<(FrameHeader, Response)> {
        let h = read_frame(&mut self.reader, &mut self.payload)?;
        let r = frame::decode_payload(&self.payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok((h, r))
    }
}
