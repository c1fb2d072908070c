//! Same-host sharing of a storage node's segment (the reference's real client + dummy client,
//! with clear errors).
//!
//! A storage node ([`StoreClient`] with a segment, e.g. `mooncake store-node`) runs a
//! [`LocalNodeServer`] on a Unix socket. A client on the same host configured with
//! [`StoreConfig::local_node_socket`](crate::StoreConfig::local_node_socket) connects, receives
//! the segment's memfd (`SCM_RIGHTS`) and a small JSON description, and maps it: replicas on that
//! segment are then read and written with a memcpy instead of the network. The client keeps
//! the socket open; everything else (metadata, leases, other segments) goes as usual through
//! the master and the engine.
//!
//! The socket file is made owner-only (0600) and a connecting process of another user id
//! (`SO_PEERCRED`) is refused: the memfd gives read-write access to the whole segment.

#![forbid(unsafe_code)]

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::client::{LocalMap, StoreClient};
use crate::sys::{self, SharedMemory};
use crate::types::{StoreError, StoreErrorCode, StoreResult};

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    version: u32,
    segment: String,
    base: u64,
    size: u64,
}

fn err(msg: impl Into<String>) -> StoreError {
    StoreError::new(StoreErrorCode::InvalidParams, msg)
}

/// Serves a storage node's segment to same-host clients over a Unix socket.
#[derive(Debug)]
pub struct LocalNodeServer {
    path: PathBuf,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LocalNodeServer {
    /// Listens on `path` (an existing socket file is replaced) and hands `client`'s segment to
    /// whoever connects. `INVALID_PARAMS` if the client mounts no segment.
    pub fn start(client: &StoreClient, path: impl AsRef<Path>) -> StoreResult<Self> {
        let (name, mem) = client
            .segment_memory()
            .ok_or_else(|| err("this client mounts no segment to share"))?;
        let path = path.as_ref().to_path_buf();
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| err(format!("cannot listen on {}: {e}", path.display())))?;
        // Whoever connects gets read-write access to the whole segment: owner only.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| err(format!("cannot restrict {}: {e}", path.display())))?;
        }
        let me = sys::own_uid();
        let hello = serde_json::to_vec(&Hello {
            version: 1,
            segment: name,
            base: mem.addr(),
            size: mem.size() as u64,
        })
        .map_err(|e| err(e.to_string()))?;
        let stopping = Arc::new(AtomicBool::new(false));
        let st = stopping.clone();
        let thread = std::thread::Builder::new()
            .name("mooncake-node-local".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.load(Ordering::Acquire) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    match sys::peer_uid(&conn) {
                        Ok(uid) if uid == me => {}
                        Ok(uid) => {
                            tracing::warn!(uid, "refusing a local client of another user");
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!("cannot identify a local client: {e}");
                            continue;
                        }
                    }
                    if let Err(e) = sys::send_with_fd(&conn, &hello, mem.fd()) {
                        tracing::warn!("handing the segment to a local client failed: {e}");
                        continue;
                    }
                    // Hold the connection until the client goes away.
                    let _ = std::thread::Builder::new()
                        .name("mooncake-node-local-conn".into())
                        .spawn(move || {
                            let mut c = conn;
                            let mut b = [0u8; 64];
                            while matches!(c.read(&mut b), Ok(n) if n > 0) {}
                        });
                }
            })
            .map_err(|e| err(e.to_string()))?;
        Ok(Self {
            path,
            stopping,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LocalNodeServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Connects to a store-node's socket and maps its segment.
pub(crate) fn attach(path: &Path, populate: bool) -> StoreResult<(UnixStream, String, LocalMap)> {
    let link = UnixStream::connect(path).map_err(|e| {
        err(format!(
            "cannot attach to the store-node at {}: {e} (is `mooncake store-node --socket {}` \
             running on this host?)",
            path.display(),
            path.display()
        ))
    })?;
    let mut buf = vec![0u8; 4096];
    let (n, fd) = sys::recv_with_fd(&link, &mut buf)
        .map_err(|e| err(format!("reading the store-node's hello: {e}")))?;
    let hello: Hello = serde_json::from_slice(&buf[..n]).map_err(|e| {
        err(format!(
            "the store-node at {} sent a malformed hello: {e}",
            path.display()
        ))
    })?;
    if hello.version != 1 {
        return Err(err(format!(
            "the store-node speaks local protocol {}, this client 1",
            hello.version
        )));
    }
    let fd = fd.ok_or_else(|| {
        err(format!(
            "the store-node at {} sent no segment descriptor",
            path.display()
        ))
    })?;
    let mem = SharedMemory::map_fd(fd, hello.size as usize, populate).map_err(|e| {
        err(format!(
            "cannot map the store-node's segment {}: {e}",
            hello.segment
        ))
    })?;
    Ok((
        link,
        hello.segment,
        LocalMap::new(hello.base, Arc::new(mem)),
    ))
}
