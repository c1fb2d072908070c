//! The master server: malformed RPC input gets an error or a closed connection and never a
//! crash; the admin HTTP port; the same-host shared-memory path; eviction end to end.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use mooncake_core::MemorySegment;
use mooncake_store::rpc::{self, FrameKind, Request, Response, RpcClient};
use mooncake_store::{LocalNodeServer, MasterServer, ReplicateConfig, ServerConfig, StoreConfig};
use mooncake_testkit::pattern;

fn ping(m: &MasterServer) {
    let mut c = RpcClient::connect(m.rpc_addr(), Duration::from_secs(5)).unwrap();
    assert_eq!(c.call(&Request::Ping).unwrap(), Response::Pong);
}

fn closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 64];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn malformed_requests_get_an_error_or_a_closed_connection() {
    let m = master(master_cfg());
    // Bad header (version): closed.
    let mut s = TcpStream::connect(m.rpc_addr()).unwrap();
    s.write_all(&[4, 0, 0, 0, 99, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4])
        .unwrap();
    assert!(closed(&mut s));
    // Oversized length: closed without reading 4 GiB.
    let mut s = TcpStream::connect(m.rpc_addr()).unwrap();
    let mut h = vec![0xff, 0xff, 0xff, 0xff, rpc::VERSION, 1, 0, 0];
    h.extend_from_slice(&7u64.to_le_bytes());
    s.write_all(&h).unwrap();
    assert!(closed(&mut s));
    // Good header, garbage payload: an INVALID_PARAMS error, and the connection stays usable.
    let mut c = RpcClient::connect(m.rpc_addr(), Duration::from_secs(5)).unwrap();
    let mut f = Vec::new();
    f.extend_from_slice(&5u32.to_le_bytes());
    f.extend_from_slice(&[rpc::VERSION, FrameKind::Request as u8, 0, 0]);
    f.extend_from_slice(&42u64.to_le_bytes());
    f.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff]);
    c.send_raw(&f).unwrap();
    let (h, r) = c.read_response().unwrap();
    assert_eq!(h.request_id, 42);
    assert_eq!(r.into_error().unwrap().code(), -600);
    assert_eq!(c.call(&Request::Ping).unwrap(), Response::Pong);
    // A response frame sent as a request: closed.
    let mut s = TcpStream::connect(m.rpc_addr()).unwrap();
    let mut buf = Vec::new();
    rpc::encode(&mut buf, FrameKind::Response, 1, &Response::Pong).unwrap();
    s.write_all(&buf).unwrap();
    assert!(closed(&mut s));
    // Truncated frame then EOF: nothing breaks.
    let mut s = TcpStream::connect(m.rpc_addr()).unwrap();
    s.write_all(&buf[..7]).unwrap();
    drop(s);
    // Unknown clients: per-request errors.
    let r = c
        .call(&Request::BatchPutStart {
            client: mooncake_store::ClientId(12345),
            tenant: "t".into(),
            items: vec![rpc::PutItem {
                key: "k".into(),
                size: 1,
                group: None,
            }],
            config: ReplicateConfig::default(),
            upsert: false,
        })
        .unwrap();
    match r {
        Response::PutStarted(v) => assert_eq!(v[0].as_ref().unwrap_err().code(), -103),
        r => panic!("{r:?}"),
    }
    // Random byte soup on many connections; the server keeps serving.
    let mut x = 0x1234_5678u64;
    for _ in 0..50 {
        let mut s = TcpStream::connect(m.rpc_addr()).unwrap();
        let junk: Vec<u8> = (0..200)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = s.write_all(&junk);
    }
    ping(&m);
}

fn http(addr: std::net::SocketAddr, req: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

#[test]
fn admin_http_port() {
    let m = MasterServer::start(
        ServerConfig::loopback()
            .with_master(master_cfg())
            .with_admin_addr(Some(([127, 0, 0, 1], 0).into()))
            .with_http_metadata_addr(Some(([127, 0, 0, 1], 0).into())),
    )
    .unwrap();
    let a = m.admin_addr().unwrap();
    assert_eq!(
        http(a, "GET /health HTTP/1.1\r\n\r\n"),
        (200, "OK\n".into())
    );
    let (s, body) = http(a, "GET /get_all_segments HTTP/1.1\r\n\r\n");
    assert_eq!((s, body.as_str()), (200, ""));
    let node = client(&m, 4 << 20);
    let (_, body) = http(a, "GET /get_all_segments HTTP/1.1\r\n\r\n");
    assert_eq!(body.trim(), node.get_hostname());
    node.put("a key", b"v", &ReplicateConfig::default())
        .unwrap();
    let (s, body) = http(a, "GET /query_key?key=a%20key HTTP/1.1\r\n\r\n");
    assert_eq!(s, 200);
    assert!(body.contains("\"Complete\""), "{body}");
    assert_eq!(http(a, "GET /query_key?key=nope HTTP/1.1\r\n\r\n").0, 404);
    let (s, body) = http(a, "GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(s, 200);
    assert!(body.contains("mooncake_master_objects 1"), "{body}");
    assert!(body.contains("mooncake_master_rpc_calls_total{rpc=\"batch_put_start\"} 1"));
    assert_eq!(http(a, "GET /remove_all HTTP/1.1\r\n\r\n").0, 405);
    let (s, body) = http(
        a,
        "POST /remove_all?force=true HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!((s, body.as_str()), (200, "{\"removed\":1}"));
    // The KV event stream saw the put end and the removal, in order.
    let (s, body) = http(a, "GET /kv_events?since=0 HTTP/1.1\r\n\r\n");
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let kinds: Vec<(&str, &str)> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["kind"].as_str().unwrap(), e["keys"][0].as_str().unwrap()))
        .collect();
    assert_eq!(kinds, [("stored", "a key"), ("removed", "a key")], "{body}");
    assert_eq!(v["next"], 2);
    // A cursor this master never handed out: a re-listing (now empty).
    let (_, body) = http(a, "GET /kv_events?since=99 HTTP/1.1\r\n\r\n");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["resync"].as_bool(), v["next"].as_u64()),
        (Some(true), Some(2))
    );
    assert_eq!(v["keys"], serde_json::json!({}));
    assert_eq!(http(a, "BLAH\r\n\r\n").0, 400);
    assert_eq!(http(a, "GET /nope HTTP/1.1\r\n\r\n").0, 404);
}

#[test]
fn same_host_clients_use_the_nodes_shared_memory() {
    let m = master(master_cfg());
    let node = client(&m, 16 << 20);
    let sock = std::env::temp_dir().join(format!("mc-store-test-{}.sock", std::process::id()));
    let local = LocalNodeServer::start(&node, &sock).unwrap();
    let c = client_with(&m, StoreConfig::default().with_local_node(local.path()));
    let v = pattern(300_000, 9);
    c.put("shm", &v, &ReplicateConfig::default()).unwrap();
    let buf = buffer(&c, 1 << 20);
    // Cut the node off the network: only the shared mapping can still serve it.
    node.engine().transports()[0].shutdown();
    assert_eq!(c.get("shm").unwrap(), v);
    assert_eq!(c.get_into("shm", buf.base(), 1 << 20).unwrap(), 300_000);
    assert_eq!(buf.to_vec()[..300_000], v[..]);
    c.put("shm2", &v, &ReplicateConfig::default()).unwrap();
    assert_eq!(c.get("shm2").unwrap(), v);
    // A clear error when there is no node to attach to.
    let e = mooncake_store::StoreClient::connect(
        StoreConfig::new(m.rpc_addr().to_string()).with_local_node("/nonexistent/mc.sock"),
        engine(&m.metadata_url().unwrap(), "x"),
    )
    .unwrap_err();
    assert!(e.message().contains("store-node"), "{e}");
}

#[test]
fn eviction_under_pressure_end_to_end() {
    let m = MasterServer::start(
        ServerConfig::loopback()
            .with_master(master_cfg())
            .with_tick_interval(Duration::from_millis(20))
            .with_admin_addr(Some(([127, 0, 0, 1], 0).into()))
            .with_http_metadata_addr(Some(([127, 0, 0, 1], 0).into())),
    )
    .unwrap();
    let _node = client(&m, 4 << 20);
    let c = client(&m, 0);
    let len = 256 << 10;
    let rc = ReplicateConfig::default();
    c.put("hot", &value("hot", 1, len), &rc).unwrap();
    c.put("probed", &value("probed", 1, len), &rc).unwrap();
    let pinned = rc.clone().with_hard_pin(true);
    c.put("pinned", &value("pinned", 1, len), &pinned).unwrap();
    let mut s = c
        .batch_put_session_start(&["inflight"], &[len as u64], &rc)
        .unwrap();
    let src = buffer(&c, len);
    src.write_at(0, &value("inflight", 1, len)).unwrap();
    c.batch_put_from_multi_buffer_ranges(
        &mut s,
        &["inflight"],
        &[vec![mooncake_store::BufferRange {
            addr: src.base(),
            len: len as u64,
            offset: 0,
        }]],
    )
    .into_iter()
    .for_each(|r| r.unwrap());
    // 40 puts of 256 KiB into a 4 MiB pool: every one must succeed by eviction.
    for i in 0..40 {
        let k = format!("fill{i}");
        c.put(&k, &value(&k, 1, len), &rc).unwrap();
        // The leased key is read (its lease renewed), the probed key only probed.
        assert_eq!(c.get("hot").unwrap().len(), len);
        let _ = c.is_exist("probed").unwrap();
    }
    assert!(c.is_exist("hot").unwrap(), "a leased object was evicted");
    assert!(
        c.is_exist("pinned").unwrap(),
        "a hard-pinned object was evicted"
    );
    assert!(
        !c.is_exist("probed").unwrap(),
        "exists kept an object alive"
    );
    c.batch_put_session_end(s)
        .into_iter()
        .for_each(|r| r.unwrap());
    assert_eq!(check_value("inflight", &c.get("inflight").unwrap()), Ok(1));
    assert!(m.with_master(|mm| mm.stats().evicted_objects) > 0);
    // Evictions reach the KV event stream as removals (a scheduler stops counting them as
    // hits); the leased and pinned keys were never announced gone. The fills gone are counted
    // first: the master's watermark pass may evict more at any time, and whatever was gone
    // before the events were read must be among them.
    let gone: Vec<String> = (0..40)
        .map(|i| format!("fill{i}"))
        .filter(|k| !c.is_exist(k).unwrap())
        .collect();
    let (s, body) = http(
        m.admin_addr().unwrap(),
        "GET /kv_events?since=0&max=100000 HTTP/1.1\r\n\r\n",
    );
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let removed: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "removed")
        .flat_map(|e| e["keys"].as_array().unwrap())
        .map(|k| k.as_str().unwrap())
        .collect();
    assert!(removed.contains(&"probed"), "{body}");
    assert!(
        !removed.contains(&"hot") && !removed.contains(&"pinned"),
        "{body}"
    );
    assert!(!gone.is_empty(), "no fill was evicted");
    for k in &gone {
        assert!(
            removed.contains(&k.as_str()),
            "{k} is gone, not announced: {body}"
        );
    }
}
