//! The master's admin HTTP port (`--metrics_port`, default 9003).
//!
//! | route | what |
//! | --- | --- |
//! | `GET /metrics` | Prometheus text: pool, objects, leases, evictions, RPC counters |
//! | `GET /health` | `OK` |
//! | `GET /get_all_segments` | mounted segment names, one per line (`?format=json`: full status) |
//! | `GET /query_key?key=K[&tenant=T]` | JSON of what the master knows about a key (no lease) |
//! | `POST /remove_all?force=true[&tenant=T]` (also `/api/v1/remove_all`) | `{"removed":N}` |
//! | `GET /kv_events?since=N[&timeout_ms=T][&max=M]` | KV events (puts, removes, evictions) from sequence `N`, long-polled ([`super::events`]) |
//!
//! Requests are parsed with `httparse`; one short-lived thread per connection, at most 64 (at
//! the cap the oldest connection is closed to make room); the whole head must arrive within
//! the server's request timeout (10 s by default). With a cluster secret, every route but `/health`
//! and `/metrics` requires `Authorization: Bearer <ClusterSecret::token("store-admin")>`.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use mooncake_metadata::http::wire::percent_decode;

use super::Shared;
use crate::DEFAULT_TENANT;
use crate::rpc::Request;

const MAX_CONNS: usize = 64;
const MAX_HEAD: usize = 16 << 10;

pub(crate) struct AdminServer {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AdminServer {
    pub(crate) fn start(addr: SocketAddr, shared: Arc<Shared>) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let st = stopping.clone();
        let thread = std::thread::Builder::new()
            .name("mooncake-master-admin".into())
            .spawn(move || {
                // Open connections by id (ids grow: the smallest is the oldest).
                let open: Arc<Mutex<BTreeMap<u64, TcpStream>>> = Arc::default();
                let mut next = 0u64;
                for conn in listener.incoming() {
                    if st.load(Ordering::Acquire) {
                        return;
                    }
                    let conn = match conn {
                        Ok(c) => c,
                        Err(_) => {
                            // EMFILE and friends: back off rather than spin.
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                    };
                    let Ok(clone) = conn.try_clone() else {
                        continue;
                    };
                    {
                        let mut o = open.lock().unwrap_or_else(|p| p.into_inner());
                        if o.len() >= MAX_CONNS {
                            // Every request is short: at the cap the oldest connection (a
                            // slow one, if any is) makes room for the new one.
                            if let Some((_, old)) = o.pop_first() {
                                let _ = old.shutdown(Shutdown::Both);
                            }
                        }
                        next += 1;
                        o.insert(next, clone);
                    }
                    let (s, o, id) = (shared.clone(), open.clone(), next);
                    let spawned = std::thread::Builder::new()
                        .name("mooncake-admin-conn".into())
                        .spawn(move || {
                            let _ = serve(conn, &s);
                            o.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                        });
                    if spawned.is_err() {
                        open.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                    }
                }
            })?;
        Ok(Self {
            addr,
            stopping,
            thread: Some(thread),
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn stop(mut self) {
        self.stopping.store(true, Ordering::Release);
        let _ = TcpStream::connect_timeout(&super::wake_addr(self.addr), Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
}

impl Reply {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    fn json(body: String) -> Self {
        Self {
            status: 200,
            content_type: "application/json",
            body,
        }
    }
}

fn serve(mut conn: TcpStream, s: &Shared) -> io::Result<()> {
    // The whole request head must arrive within the request timeout (trickled bytes do not
    // extend it).
    let deadline = std::time::Instant::now() + s.request_timeout;
    conn.set_write_timeout(Some(s.request_timeout))?;
    let mut buf = vec![0u8; 4096];
    let mut used = 0;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return respond(&mut conn, Reply::text(408, "request head took too long\n"));
        }
        conn.set_read_timeout(Some(left))?;
        if used == buf.len() {
            if buf.len() >= MAX_HEAD {
                return respond(&mut conn, Reply::text(431, "request head too large\n"));
            }
            buf.resize(buf.len() * 2, 0);
        }
        let n = conn.read(&mut buf[used..])?;
        if n == 0 {
            return Ok(());
        }
        used += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..used]) {
            Ok(httparse::Status::Complete(_)) => {
                let method = req.method.unwrap_or("GET").to_string();
                let path = req.path.unwrap_or("/").to_string();
                let authorized = s.admin_token().is_none_or(|want| {
                    req.headers.iter().any(|h| {
                        h.name.eq_ignore_ascii_case("authorization")
                            && std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.strip_prefix("Bearer "))
                                .is_some_and(|t| {
                                    constant_time_eq(t.trim().as_bytes(), want.as_bytes())
                                })
                    })
                });
                let reply = route(s, &method, &path, authorized);
                return respond(&mut conn, reply);
            }
            Ok(httparse::Status::Partial) => continue,
            Err(e) => return respond(&mut conn, Reply::text(400, format!("bad request: {e}\n"))),
        }
    }
}

fn respond(conn: &mut TcpStream, r: Reply) -> io::Result<()> {
    let reason = mooncake_metadata::http::wire::reason(r.status);
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        reason,
        r.content_type,
        r.body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(r.body.as_bytes())?;
    conn.flush()
}

fn query(path: &str) -> Vec<(String, String)> {
    let Some((_, q)) = path.split_once('?') else {
        return Vec::new();
    };
    q.split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((percent_decode(k, true).ok()?, percent_decode(v, true).ok()?))
        })
        .collect()
}

fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn truthy(v: Option<&str>) -> bool {
    matches!(v, Some("1" | "true" | "True" | "TRUE" | "yes" | ""))
}

/// Byte-wise comparison whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `authorized`: the request carried the admin token (or none is required). With a cluster
/// secret, everything but `/health` and `/metrics` needs `Authorization: Bearer <token>`,
/// the token being `ClusterSecret::token("store-admin")`.
fn route(s: &Shared, method: &str, path: &str, authorized: bool) -> Reply {
    let route = path.split('?').next().unwrap_or("/");
    let q = query(path);
    if !authorized && !matches!((method, route), ("GET", "/health" | "/metrics")) {
        return Reply::text(
            401,
            "this master requires its admin token (Authorization: Bearer …)\n",
        );
    }
    match (method, route) {
        ("GET", "/health") => Reply::text(200, "OK\n"),
        ("GET", "/metrics") => Reply {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: metrics(s),
        },
        ("GET", "/get_all_segments") => {
            let segs = s.lock().segments(s.now());
            if param(&q, "format") == Some("json") {
                Reply::json(serde_json::to_string(&segs).unwrap_or_default())
            } else {
                let mut body = String::new();
                for seg in segs {
                    let _ = writeln!(body, "{}", seg.name);
                }
                Reply::text(200, body)
            }
        }
        ("GET", "/query_key") => {
            let Some(key) = param(&q, "key") else {
                return Reply::text(400, "missing ?key=\n");
            };
            let tenant = param(&q, "tenant").unwrap_or(DEFAULT_TENANT);
            match s.lock().query_key(tenant, key) {
                Some(info) => Reply::json(serde_json::to_string(&info).unwrap_or_default()),
                None => Reply::text(404, "OBJECT_NOT_FOUND\n"),
            }
        }
        ("POST", "/remove_all" | "/api/v1/remove_all") => {
            let force = truthy(param(&q, "force"));
            let tenant = param(&q, "tenant").unwrap_or(DEFAULT_TENANT);
            let mut m = s.lock();
            let n = m.remove_all(tenant, force, s.now());
            s.kv_events.reconcile(&m, true);
            drop(m);
            Reply::json(format!("{{\"removed\":{n}}}"))
        }
        ("GET", "/kv_events") => {
            let num = |name: &str, default: u64| {
                param(&q, name)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(default)
            };
            let poll = s.kv_events.poll(
                num("since", 0),
                Duration::from_millis(num("timeout_ms", 0)),
                num("max", 10_000) as usize,
                || s.stopping(),
            );
            Reply::json(serde_json::to_string(&poll).unwrap_or_default())
        }
        (_, "/remove_all" | "/api/v1/remove_all") => {
            Reply::text(405, "use POST /remove_all?force=true\n")
        }
        _ => Reply::text(404, "not found\n"),
    }
}

fn metrics(s: &Shared) -> String {
    let st = s.lock().stats();
    let mut o = String::new();
    let mut g = |name: &str, help: &str, kind: &str, v: f64| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    g(
        "mooncake_master_clients",
        "Registered clients.",
        "gauge",
        st.clients as f64,
    );
    g(
        "mooncake_master_segments",
        "Mounted segments.",
        "gauge",
        st.segments as f64,
    );
    g(
        "mooncake_master_objects",
        "Objects in any state.",
        "gauge",
        st.objects as f64,
    );
    g(
        "mooncake_master_inflight_puts",
        "Puts between start and end.",
        "gauge",
        st.inflight_puts as f64,
    );
    g(
        "mooncake_master_capacity_bytes",
        "Pool capacity.",
        "gauge",
        st.capacity_bytes as f64,
    );
    g(
        "mooncake_master_used_bytes",
        "Bytes allocated.",
        "gauge",
        st.used_bytes as f64,
    );
    g(
        "mooncake_master_lease_grants_total",
        "Read leases granted or extended.",
        "counter",
        st.lease_grants as f64,
    );
    g(
        "mooncake_master_evicted_objects_total",
        "Objects evicted.",
        "counter",
        st.evicted_objects as f64,
    );
    g(
        "mooncake_master_evicted_bytes_total",
        "Bytes evicted.",
        "counter",
        st.evicted_bytes as f64,
    );
    g(
        "mooncake_master_revoked_puts_total",
        "Puts revoked.",
        "counter",
        st.revoked_puts as f64,
    );
    g(
        "mooncake_master_expired_clients_total",
        "Clients expired.",
        "counter",
        st.expired_clients as f64,
    );
    g(
        "mooncake_master_quarantined_ranges",
        "Ranges waiting for a lease or a quarantine to end.",
        "gauge",
        st.deferred_frees as f64,
    );
    g(
        "mooncake_master_rpc_connections",
        "Open RPC connections.",
        "gauge",
        s.connections.load(Ordering::Relaxed) as f64,
    );
    g(
        "mooncake_master_uptime_seconds",
        "Seconds since start.",
        "gauge",
        s.started.elapsed().as_secs_f64(),
    );
    g(
        "mooncake_master_rss_bytes",
        "Resident set size.",
        "gauge",
        crate::sys::rss_bytes() as f64,
    );
    for (metric, help) in [
        ("mooncake_master_rpc_calls_total", "RPCs served."),
        (
            "mooncake_master_rpc_errors_total",
            "RPCs that failed as a whole.",
        ),
        ("mooncake_master_rpc_keys_total", "Keys carried by RPCs."),
        (
            "mooncake_master_rpc_seconds_total",
            "Time spent serving RPCs.",
        ),
    ] {
        let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} counter");
        for (name, c) in Request::NAMES.iter().zip(&s.counters) {
            let v = match metric {
                "mooncake_master_rpc_calls_total" => c.calls.load(Ordering::Relaxed) as f64,
                "mooncake_master_rpc_errors_total" => c.errors.load(Ordering::Relaxed) as f64,
                "mooncake_master_rpc_keys_total" => c.keys.load(Ordering::Relaxed) as f64,
                _ => c.micros.load(Ordering::Relaxed) as f64 / 1e6,
            };
            let _ = writeln!(o, "{metric}{{rpc=\"{name}\"}} {v}");
        }
    }
    o
}
