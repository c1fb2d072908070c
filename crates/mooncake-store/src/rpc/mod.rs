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
