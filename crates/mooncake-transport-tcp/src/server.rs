//! The target side: accept connections, check every requested range against the registry,
//! and move payload bytes straight between the socket and registered memory.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mooncake_core::{BufferRegistry, Requester};
use tracing::{debug, warn};

use crate::io::{OutQueue, RecvBuf};
use crate::sys::{self, Deadline, Stall};
use crate::wire::{FrameKind, HEADER_LEN, Header, Status};

/// Shared state of all server threads of one transport.
pub(crate) struct ServerShared {
    pub(crate) registry: Arc<BufferRegistry>,
    pub(crate) local_name: String,
    pub(crate) generation: u64,
    pub(crate) timeout: Duration,
    pub(crate) max_data: u64,
    pub(crate) closed: AtomicBool,
    pub(crate) socket_buffer: Option<usize>,
}

/// Waits for the next header forever while idle, but gives up on a frame that stalls
/// half-way or when the transport closes.
struct IdleWait<'a> {
    shared: &'a ServerShared,
    started: bool,
    inner: Deadline,
}

impl Stall for IdleWait<'_> {
    fn on_stall(&mut self) -> io::Result<()> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "transport closed",
            ));
        }
        if self.started {
            self.inner.on_stall()
        } else {
            Ok(())
        }
    }
    fn on_progress(&mut self, n: usize) {
        self.started = true;
        self.inner.on_progress(n);
    }
}

pub(crate) fn accept_loop(listener: TcpListener, shared: Arc<ServerShared>) {
    for conn in listener.incoming() {
        if shared.closed.load(Ordering::Acquire) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                if shared.closed.load(Ordering::Acquire) {
                    break;
                }
                warn!("tcp accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("mooncake-tcp-srv".into())
            .spawn(move || {
                let peer = stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                if let Err(e) = serve(stream, &shared) {
                    debug!(peer, "tcp server connection ended: {e}");
                }
            });
        if let Err(e) = spawned {
            warn!("cannot spawn a tcp server thread: {e}");
        }
    }
}

fn send_error(
    fd: i32,
    id: u64,
    status: Status,
    msg: &str,
    stall: &mut dyn Stall,
) -> io::Result<()> {
    let msg = &msg.as_bytes()[..msg.len().min(crate::wire::MAX_CONTROL_PAYLOAD as usize)];
    let mut h = Header::new(FrameKind::Error, id, 0, msg.len() as u64);
    h.status = status;
    // SAFETY: the payload is the live `msg` slice.
    unsafe { sys::send_gather(fd, &h.encode(), msg.as_ptr(), msg.len(), stall) }
}

/// Flush queued responses once this many bytes (or frames) are waiting.
const FLUSH_BYTES: usize = 256 * 1024;
const FLUSH_FRAMES: usize = 256;

fn error_frame(id: u64, status: Status, msg: &str) -> ([u8; HEADER_LEN], Vec<u8>) {
    let msg = &msg.as_bytes()[..msg.len().min(crate::wire::MAX_CONTROL_PAYLOAD as usize)];
    let mut h = Header::new(FrameKind::Error, id, 0, msg.len() as u64);
    h.status = status;
    (h.encode(), msg.to_vec())
}

fn serve(stream: TcpStream, shared: &ServerShared) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let tick = shared.timeout.min(Duration::from_millis(250));
    stream.set_read_timeout(Some(tick))?;
    stream.set_write_timeout(Some(tick))?;
    crate::transport::apply_socket_buffer(&stream, shared.socket_buffer);
    let fd = stream.as_raw_fd();
    let mut rb = RecvBuf::new(fd, crate::io::RECV_BUF);
    let mut out = OutQueue::new();

    // Hello: the client names the segment (and generation) it means to reach.
    let mut wait = IdleWait {
        shared,
        started: false,
        inner: Deadline::new(shared.timeout),
    };
    let hdr = rb.header(&mut wait)?;
    let mut stall = Deadline::new(shared.timeout);
    let hello = Header::decode(&hdr, shared.max_data)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if hello.kind != FrameKind::Hello {
        let _ = send_error(
            fd,
            hello.request_id,
            Status::BadRequest,
            "expected a hello frame first",
            &mut stall,
        );
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "first frame was not a hello",
        ));
    }
    let name = rb.bytes(hello.len as usize, &mut stall)?;
    if name != shared.local_name.as_bytes() || (hello.addr != 0 && hello.addr != shared.generation)
    {
        let msg = format!(
            "this is segment {:?} generation {}, not {:?} generation {}",
            shared.local_name,
            shared.generation,
            String::from_utf8_lossy(&name),
            hello.addr
        );
        let _ = send_error(fd, hello.request_id, Status::WrongSegment, &msg, &mut stall);
        return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
    }
    sys::send_all(
        fd,
        &Header::new(FrameKind::HelloAck, hello.request_id, shared.generation, 0).encode(),
        &mut stall,
    )?;

    loop {
        // Answer everything handled so far before waiting for more requests.
        if !rb.has_header() || out.bytes() >= FLUSH_BYTES || out.len() >= FLUSH_FRAMES {
            out.flush(fd, &mut Deadline::new(shared.timeout))?;
        }
        let mut wait = IdleWait {
            shared,
            started: rb.buffered() > 0,
            inner: Deadline::new(shared.timeout),
        };
        let hdr = rb.header(&mut wait)?;
        let mut stall = Deadline::new(shared.timeout);
        let h = match Header::decode(&hdr, shared.max_data) {
            Ok(h) => h,
            Err(e) => {
                // The stream can't be trusted past a bad header: say why, then close.
                let _ = out.flush(fd, &mut stall);
                let _ = send_error(fd, 0, Status::BadRequest, &e.to_string(), &mut stall);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        };
        match h.kind {
            FrameKind::Read => match shared.registry.lease(h.addr, h.len, Requester::RemoteRead) {
                Ok(lease) => out.push_leased(
                    Header::new(FrameKind::ReadData, h.request_id, h.addr, h.len).encode(),
                    lease,
                ),
                Err(e) => {
                    let (head, msg) = error_frame(h.request_id, Status::OutOfRange, &e.to_string());
                    out.push_owned(head, msg);
                }
            },
            FrameKind::Write => {
                match shared.registry.lease(h.addr, h.len, Requester::RemoteWrite) {
                    Ok(lease) => {
                        // SAFETY: the lease keeps `[addr, addr+len)` registered and valid for writes.
                        unsafe { rb.payload(lease.as_ptr(), h.len as usize, &mut stall)? };
                        drop(lease);
                        out.push(
                            Header::new(FrameKind::WriteAck, h.request_id, h.addr, 0).encode(),
                        );
                    }
                    Err(e) => {
                        rb.discard(h.len, &mut stall)?;
                        let (head, msg) =
                            error_frame(h.request_id, Status::OutOfRange, &e.to_string());
                        out.push_owned(head, msg);
                    }
                }
            }
            other => {
                let msg = format!("unexpected {other:?} frame from a client");
                let _ = out.flush(fd, &mut stall);
                let _ = send_error(fd, h.request_id, Status::BadRequest, &msg, &mut stall);
                return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
            }
        }
    }
}
