//! The session thread: registration, heartbeats on the session's own connection, the journal
//! mirror of this client's segment, and re-registration (with a remount that re-reports what
//! the segment holds) after the master restarted or expired this client.

use std::io::BufReader;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use super::conn::call_on;
use super::{Inner, SessionState, session_socket};
use crate::master::{ClientStatus, JournalDrain, JournalEntry, MountRequest};
use crate::rpc::{self, FrameKind, Request, Response};
use crate::types::{StoreError, StoreErrorCode, StoreResult};

/// The session connection.
pub(super) struct SessionConn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    buf: Vec<u8>,
    payload: Vec<u8>,
    next_id: u64,
}

impl SessionConn {
    fn open(inner: &Inner) -> StoreResult<Self> {
        let stream = session_socket(inner).map_err(|e| super::conn::rpc_err(&e))?;
        let reader = BufReader::new(stream.try_clone().map_err(|e| super::conn::rpc_err(&e))?);
        let mut c = Self {
            stream,
            reader,
            buf: Vec::new(),
            payload: Vec::new(),
            next_id: 1,
        };
        if let Some(secret) = inner.conns.secret() {
            let mut call = |req: &Request| {
                c.next_id += 1;
                call_on(
                    &mut c.stream,
                    &mut c.reader,
                    &mut c.buf,
                    &mut c.payload,
                    c.next_id,
                    req,
                )
            };
            let prove = super::conn::authenticate(secret, &mut call).map_err(|e| {
                StoreError::new(StoreErrorCode::IllegalClient, format!("master: {e}"))
            })?;
            c.next_id += 1;
            rpc::write_frame(
                &mut c.stream,
                &mut c.buf,
                FrameKind::Request,
                c.next_id,
                &prove,
            )
            .map_err(|e| super::conn::rpc_err(&e))?;
        }
        Ok(c)
    }

    fn call(&mut self, req: &Request) -> StoreResult<Response> {
        self.next_id += 1;
        let r = call_on(
            &mut self.stream,
            &mut self.reader,
            &mut self.buf,
            &mut self.payload,
            self.next_id,
            req,
        )
        .map_err(|e| super::conn::rpc_err(&e))?;
        match r {
            Response::Error(e) => Err(e),
            r => Ok(r),
        }
    }
}

fn unexpected(r: &Response) -> StoreError {
    StoreError::new(
        StoreErrorCode::RpcFail,
        format!("unexpected reply from the master: {r:?}"),
    )
}

/// Registers on `conn` and (re)mounts the segment, re-reporting what it holds.
fn register(inner: &Inner, conn: &mut SessionConn) -> StoreResult<()> {
    let name = inner.engine.local_name().to_string();
    let info = match conn.call(&Request::RegisterClient {
        host: inner.host.clone(),
        name,
    })? {
        Response::Registered(info) => info,
        r => return Err(unexpected(&r)),
    };
    let old_epoch = inner.session().master_epoch;
    let mut segment = None;
    if let Some(seg) = &inner.segment {
        let held: Vec<_> = seg
            .mirror
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let n = held.len();
        let mount = MountRequest {
            name: seg.name.clone(),
            base: seg.mem.addr(),
            size: seg.mem.size() as u64,
            host: inner.host.clone(),
            held,
        };
        match conn.call(&Request::MountSegment {
            client: info.client,
            mount,
        })? {
            Response::Mounted(id) => segment = Some(id),
            r => return Err(unexpected(&r)),
        }
        if n > 0 {
            tracing::info!(
                segment = seg.name,
                objects = n,
                "re-mounted with held objects"
            );
        }
    }
    *inner.session.write().unwrap_or_else(|p| p.into_inner()) = SessionState {
        client: info.client,
        lease_ttl_ms: info.lease_ttl_ms,
        master_epoch: info.master_epoch,
        segment,
    };
    if old_epoch != 0 && old_epoch != info.master_epoch {
        inner.conns.clear();
    }
    Ok(())
}

/// The first session, opened synchronously by `connect`.
pub(super) fn open_session(inner: &Arc<Inner>) -> StoreResult<SessionConn> {
    let mut conn = SessionConn::open(inner)?;
    register(inner, &mut conn)?;
    Ok(conn)
}

fn apply_journal(inner: &Inner, journal: Vec<(crate::master::SegmentId, JournalDrain)>) {
    let Some(seg) = &inner.segment else { return };
    let mut mirror = seg.mirror.lock().unwrap_or_else(|p| p.into_inner());
    for (_, drain) in journal {
        match drain {
            JournalDrain::Entries(v) => {
                for e in v {
                    match e {
                        JournalEntry::Committed(h) => {
                            mirror.insert(h.offset, h);
                        }
                        JournalEntry::Freed { offset } => {
                            mirror.remove(&offset);
                        }
                    }
                }
            }
            JournalDrain::Resync(all) => {
                mirror.clear();
                for h in all {
                    mirror.insert(h.offset, h);
                }
            }
        }
    }
}

/// One heartbeat, or a reconnect. Returns the connection to keep.
fn step(inner: &Inner, conn: Option<SessionConn>) -> Option<SessionConn> {
    let mut conn = match conn {
        Some(c) => c,
        None => {
            let mut c = SessionConn::open(inner).ok()?;
            if let Err(e) = register(inner, &mut c) {
                tracing::warn!("re-registering with the master failed: {e}");
                return None;
            }
            tracing::info!(
                client = inner.session().client.0,
                "re-registered with the master"
            );
            return Some(c);
        }
    };
    let client = inner.session().client;
    match conn.call(&Request::Heartbeat { client }) {
        Ok(Response::Heartbeat { status, journal }) => {
            apply_journal(inner, journal);
            if status == ClientStatus::NeedRemount {
                tracing::info!("the master does not know this client; re-registering");
                if let Err(e) = register(inner, &mut conn) {
                    tracing::warn!("re-registering failed: {e}");
                    return None;
                }
            }
            Some(conn)
        }
        Ok(_) | Err(_) => None,
    }
}

pub(super) fn spawn(inner: &Arc<Inner>, first: SessionConn) -> StoreResult<JoinHandle<()>> {
    let weak: Weak<Inner> = Arc::downgrade(inner);
    let signal = inner.signal.clone();
    let interval = inner.cfg.heartbeat_interval;
    std::thread::Builder::new()
        .name("mooncake-store-session".into())
        .spawn(move || {
            let mut conn = Some(first);
            let mut seen_poke = 0;
            loop {
                {
                    let g = signal.state.lock().unwrap_or_else(|p| p.into_inner());
                    let wait = if conn.is_some() {
                        interval
                    } else {
                        interval.min(Duration::from_millis(100))
                    };
                    let (g, _) = signal
                        .cv
                        .wait_timeout_while(g, wait, |s| !s.0 && s.1 == seen_poke)
                        .unwrap_or_else(|p| p.into_inner());
                    if g.0 {
                        return;
                    }
                    seen_poke = g.1;
                }
                let Some(inner) = weak.upgrade() else { return };
                conn = step(&inner, conn.take());
                inner.steps.fetch_add(1, Ordering::AcqRel);
                let (lock, cv) = &inner.steps_cv;
                let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
                cv.notify_all();
            }
        })
        .map_err(|e| StoreError::new(StoreErrorCode::InternalError, e.to_string()))
}
