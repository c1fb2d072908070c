//! The RPC port's Notify and Probe frames (Mooncake's handshake framing: 8-byte little-endian
//! length counting the type byte, a type byte, a JSON body).
//!
//! In P2P mode the handshake store owns the RPC port and hands Notify bodies to
//! [`Notifies::on_frame`]; with a metadata service, [`RpcServer`] listens on a port of the RPC
//! range, published in `rpc_meta`. A notify body is `{"name": …, "notify_msg": …}`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mooncake::metadata::p2p::{FRAME_NOTIFY, FRAME_PROBE, decode_frame, encode_frame};
use mooncake::{MetadataKeys, RpcMeta, TransferEngine};

/// Largest frame accepted here (notify messages are small).
const MAX_FRAME: usize = 1 << 20;

/// Received notifies, drained by `get_notifies`.
#[derive(Clone, Default)]
pub(crate) struct Notifies(Arc<Mutex<Vec<(String, String)>>>);

impl Notifies {
    /// Records a Notify frame's body and returns the reply body.
    pub(crate) fn on_frame(&self, body: &[u8]) -> Vec<u8> {
        match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v) => {
                let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
                self.push(s("name"), s("notify_msg"));
                b"{}".to_vec()
            }
            Err(e) => {
                tracing::warn!("malformed notify frame: {e}");
                br#"{"error":"malformed notify"}"#.to_vec()
            }
        }
    }

    pub(crate) fn push(&self, name: String, msg: String) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name, msg));
    }

    /// Takes every notify received so far.
    pub(crate) fn drain(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The RPC listener of an engine that uses a metadata service.
pub(crate) struct RpcServer {
    port: u16,
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RpcServer {
    /// Binds a port of the RPC range on `host` and serves Notify and Probe frames.
    pub(crate) fn start(host: &str, notifies: Notifies) -> Result<Self, String> {
        let listener = crate::node::bind_in_range(|port| {
            TcpListener::bind((host, port))
                .map_err(|e| mooncake::Error::io(&format!("binding {host}:{port}"), &e))
        })?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("mooncake-py-rpc".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.load(Ordering::Acquire) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let n = notifies.clone();
                    let _ = std::thread::Builder::new()
                        .name("mooncake-py-rpc-conn".into())
                        .spawn(move || serve(conn, &n));
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Self {
            port: addr.port(),
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut conn: TcpStream, notifies: &Notifies) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = conn.set_nodelay(true);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match decode_frame(&buf, MAX_FRAME) {
            Ok(Some((frame, used))) => {
                buf.drain(..used);
                let reply = match frame.kind {
                    FRAME_NOTIFY => encode_frame(FRAME_NOTIFY, &notifies.on_frame(&frame.body)),
                    FRAME_PROBE => encode_frame(FRAME_PROBE, b"{}"),
                    _ => return,
                };
                if conn.write_all(&reply).is_err() {
                    return;
                }
            }
            Ok(None) => match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            },
            Err(_) => return,
        }
    }
}

/// Where `target`'s RPC port is (from its name in P2P mode, else `rpc_meta`).
fn rpc_addr(engine: &TransferEngine, target: &str) -> Result<(String, u16), String> {
    let key = MetadataKeys::from_env().rpc_meta(target);
    let bytes = mooncake::block_on(engine.metadata().get(&key))
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{target:?} publishes no RPC address ({key})"))?;
    let meta: RpcMeta = serde_json::from_slice(&bytes).map_err(|e| format!("{key}: {e}"))?;
    Ok((meta.ip_or_host_name, meta.rpc_port))
}

/// Sends one frame to `target`'s RPC port and returns the reply's type and body.
pub(crate) fn call(
    engine: &TransferEngine,
    target: &str,
    kind: u8,
    body: &[u8],
    timeout: Duration,
) -> Result<(u8, Vec<u8>), String> {
    let (host, port) = rpc_addr(engine, target)?;
    let deadline = Instant::now() + timeout;
    let addrs: Vec<_> = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| format!("resolving {host}:{port}: {e}"))?
        .collect();
    let mut last = format!("{host}:{port} has no address");
    let mut conn = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(c) => {
                conn = Some(c);
                break;
            }
            Err(e) => last = format!("connecting to {a}: {e}"),
        }
    }
    let mut conn = conn.ok_or(last)?;
    let _ = conn.set_nodelay(true);
    conn.write_all(&encode_frame(kind, body))
        .map_err(|e| format!("sending to {target}: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((f, _)) = decode_frame(&buf, MAX_FRAME).map_err(|e| e.to_string())? {
            let _ = conn.shutdown(Shutdown::Both);
            return Ok((f.kind, f.body));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("{target} did not answer in {timeout:?}"));
        }
        let _ = conn.set_read_timeout(Some(left));
        match conn.read(&mut chunk) {
            Ok(0) => return Err(format!("{target} closed the RPC connection")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("reading from {target}: {e}")),
        }
    }
}

/// Delivers a notify to `target` (to ourselves without a round trip).
pub(crate) fn send_notify(
    engine: &TransferEngine,
    own: &Notifies,
    target: &str,
    name: &str,
    msg: &str,
) -> Result<(), String> {
    if target == engine.local_name() {
        own.push(name.to_string(), msg.to_string());
        return Ok(());
    }
    let body = serde_json::json!({ "name": name, "notify_msg": msg }).to_string();
    let (kind, reply) = call(
        engine,
        target,
        FRAME_NOTIFY,
        body.as_bytes(),
        Duration::from_secs(5),
    )?;
    if kind != FRAME_NOTIFY || reply.windows(5).any(|w| w == b"error") {
        return Err(format!(
            "{target} refused the notify: {}",
            String::from_utf8_lossy(&reply)
        ));
    }
    Ok(())
}

/// 0 if `target`'s RPC port answers a probe.
pub(crate) fn probe(engine: &TransferEngine, target: &str) -> Result<(), String> {
    let (kind, _) = call(engine, target, FRAME_PROBE, b"{}", Duration::from_secs(3))?;
    if kind != FRAME_PROBE {
        return Err(format!("{target} answered a probe with frame type {kind}"));
    }
    Ok(())
}
