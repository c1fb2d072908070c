//! Failures with real processes: a storage node killed (SIGKILL) mid-workload, a writer killed
//! between put_start and put_end, a reader past its lease, the master restarted under load.
//! Nothing here asserts on timing; waits are bounded hang guards.

mod common;

use std::io::BufReader;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use mooncake_core::MemorySegment;
use mooncake_store::{
    BufferRange, MasterServer, ReplicateConfig, ServerConfig, StoreClient, StoreConfig,
    StoreErrorCode,
};
use mooncake_testkit::pattern;

/// The entry point of child processes (does nothing in a normal test run).
#[test]
fn child_main() {
    let Ok(role) = std::env::var("MC_STORE_CHILD") else {
        return;
    };
    let master = std::env::var("MC_MASTER").unwrap();
    let md = std::env::var("MC_METADATA").unwrap();
    let mut cfg = StoreConfig::new(master);
    cfg.transfer_deadline = Duration::from_secs(4);
    match role.as_str() {
        "node" => {
            let c =
                StoreClient::connect(cfg.with_segment_size(16 << 20), engine(&md, "child-node"))
                    .unwrap();
            println!("ready {}", c.get_hostname());
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        "writer" => {
            let c = StoreClient::connect(cfg, engine(&md, "child-writer")).unwrap();
            let key = std::env::var("MC_KEY").unwrap();
            let s = c
                .batch_put_session_start(&[key.as_str()], &[64 << 10], &ReplicateConfig::default())
                .unwrap();
            assert!(*s.start_results()[0].as_ref().unwrap());
            println!("started {key}");
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        other => panic!("unknown child role {other}"),
    }
}

fn kill(child: &mut std::process::Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn killed_storage_node_keys_fail_over_leave_and_puts_retry() {
    let m = master(master_cfg());
    let md = m.metadata_url().unwrap();
    let mut child = ChildGuard(spawn_child(
        "node",
        &[
            ("MC_MASTER", m.rpc_addr().to_string()),
            ("MC_METADATA", md.clone()),
        ],
    ));
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let child_seg = read_line_with(&mut out, "ready ");
    let local = client(&m, 16 << 20);
    let c = client(&m, 0);
    let two = ReplicateConfig::default().with_replica_num(2);
    let only_child = ReplicateConfig::default().with_preferred_segments(vec![child_seg.clone()]);
    let len = 32 << 10;
    for i in 0..20 {
        c.put(
            &format!("both{i}"),
            &value(&format!("both{i}"), 1, len),
            &two,
        )
        .unwrap();
        c.put(
            &format!("solo{i}"),
            &value(&format!("solo{i}"), 1, len),
            &only_child,
        )
        .unwrap();
    }
    for i in 0..20 {
        let d = c.batch_get_replica_desc(&[format!("solo{i}").as_str()]);
        assert_eq!(d[0].as_ref().unwrap()[0].segment, child_seg);
        assert_eq!(
            c.batch_get_replica_desc(&[format!("both{i}").as_str()])[0]
                .as_ref()
                .unwrap()
                .len(),
            2
        );
    }
    // A writer keeps putting while the node dies; failures must be retryable.
    let stop = Arc::new(AtomicBool::new(false));
    let failed_then_retried = Arc::new(AtomicU64::new(0));
    let writer = {
        let (c, stop, ftr) = (c.clone(), stop.clone(), failed_then_retried.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < 2000 {
                let k = format!("live{i}");
                let v = value(&k, 7, 8 << 10);
                let mut tries = 0;
                loop {
                    tries += 1;
                    match c.put(&k, &v, &ReplicateConfig::default()) {
                        Ok(()) => break,
                        Err(e) => {
                            assert!(tries < 50, "put {k} never succeeded: {e}");
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
                if tries > 1 {
                    ftr.fetch_add(1, Ordering::Relaxed);
                }
                // Its only replica may be on the node that just died: an error then, but
                // never wrong bytes.
                match c.get(&k) {
                    Ok(v) => assert_eq!(check_value(&k, &v), Ok(7)),
                    Err(e) => assert!(matches!(e.code(), -800 | -704), "get {k}: {e}"),
                }
                i += 1;
            }
            i
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    kill(&mut child.0);
    // Keys with a replica on the living node stay readable: failover inside one get.
    for i in 0..20 {
        let k = format!("both{i}");
        assert_eq!(check_value(&k, &c.get(&k).unwrap()), Ok(1), "{k}");
    }
    // Keys only on the dead node fail (every call returns), then leave the master.
    for i in 0..20 {
        let e = c.get(&format!("solo{i}")).unwrap_err();
        assert!(matches!(e.code(), -800 | -704), "solo{i}: unexpected {e}");
    }
    assert!(
        wait_until(Duration::from_secs(15), || {
            c.segments().unwrap().iter().all(|s| s.name != child_seg)
        }),
        "the dead node's segment never left the master"
    );
    for i in 0..20 {
        assert_eq!(c.get(&format!("solo{i}")).unwrap_err().code(), -704);
        let k = format!("both{i}");
        assert_eq!(check_value(&k, &c.get(&k).unwrap()), Ok(1));
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(written > 0);
    drop(local);
}

#[test]
fn killed_writer_makes_key_writable_with_fresh_space() {
    let m = master(master_cfg());
    let md = m.metadata_url().unwrap();
    let _node = client(&m, 16 << 20);
    let c = client(&m, 0);
    let mut child = ChildGuard(spawn_child(
        "writer",
        &[
            ("MC_MASTER", m.rpc_addr().to_string()),
            ("MC_METADATA", md),
            ("MC_KEY", "zombie".into()),
        ],
    ));
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    read_line_with(&mut out, "started ");
    let info = c.batch_query(&["zombie"]).remove(0).unwrap();
    assert_eq!(info.state, mooncake_store::ObjectState::Processing);
    let dead_addr = info.replicas[0].addr;
    // While the writer lives, the key is taken.
    let v = value("zombie", 2, 64 << 10);
    c.put("zombie", &v, &ReplicateConfig::default()).unwrap(); // "exists": success, no write
    assert_eq!(c.get("zombie").unwrap_err().code(), -703);
    kill(&mut child.0);
    assert!(
        wait_until(Duration::from_secs(10), || c.batch_query(&["zombie"])[0]
            .is_err()),
        "the dead writer's put was never revoked"
    );
    c.put("zombie", &v, &ReplicateConfig::default()).unwrap();
    assert_eq!(check_value("zombie", &c.get("zombie").unwrap()), Ok(2));
    let now = c.batch_get_replica_desc(&["zombie"]).remove(0).unwrap();
    assert_ne!(
        now[0].addr, dead_addr,
        "the dead writer's range was handed out again before its quarantine ended"
    );
}

#[test]
fn reads_past_their_lease_report_lease_expired() {
    // A lease of 0 ms has always ended when the read finishes: every read must say -707,
    // never hand out bytes.
    let m = master(master_cfg().with_lease_ttl_ms(0));
    let _node = client(&m, 16 << 20);
    let c = client(&m, 0);
    let v = pattern(40_000, 3);
    c.put("k", &v, &ReplicateConfig::default()).unwrap();
    assert_eq!(c.get("k").unwrap_err().code(), -707);
    let buf = buffer(&c, 1 << 20);
    assert_eq!(
        c.get_into("k", buf.base(), 1 << 20).unwrap_err().code(),
        -707
    );
    let r = c.batch_get_into(&["k"], &[buf.base()], &[1 << 20]);
    assert_eq!(r[0].as_ref().unwrap_err().code(), -707);
    let s = c.batch_get_session_start(&["k"]).unwrap();
    let r = c.batch_get_into_multi_buffer_ranges(
        &s,
        &["k"],
        &[vec![BufferRange {
            addr: buf.base(),
            len: 100,
            offset: 0,
        }]],
    );
    assert_eq!(
        r[0].as_ref().unwrap_err().error_code(),
        StoreErrorCode::LeaseExpired
    );
    // The same read under a normal lease succeeds: the -707 above is the lease, not the read.
    let m2 = master(master_cfg());
    let _node2 = client(&m2, 16 << 20);
    let c2 = client(&m2, 0);
    c2.put("k", &v, &ReplicateConfig::default()).unwrap();
    assert_eq!(c2.get("k").unwrap(), v);
}

#[test]
fn master_restart_under_load_keeps_resident_values() {
    let md = mooncake_metadata::http::HttpMetadataServer::bind(
        "127.0.0.1:0",
        mooncake_metadata::http::HttpServerConfig::default(),
    )
    .unwrap();
    let url = md.url();
    let start = |addr: std::net::SocketAddr| {
        MasterServer::start(
            ServerConfig::loopback()
                .with_rpc_addr(addr)
                .with_master(master_cfg())
                .with_tick_interval(Duration::from_millis(20)),
        )
        .unwrap()
    };
    let m = start(([127, 0, 0, 1], 0).into());
    let addr = m.rpc_addr();
    let mk = |seg: u64| {
        let mut cfg = StoreConfig::new(addr.to_string()).with_segment_size(seg);
        cfg.transfer_deadline = Duration::from_secs(4);
        StoreClient::connect(cfg, engine(&url, "restart")).unwrap()
    };
    let node = mk(32 << 20);
    let c = mk(0);
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..2)
        .map(|t| {
            let (c, acked, stop) = (c.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) && i < 5000 {
                    let k = format!("t{t}-{i}");
                    if c.put(&k, &value(&k, 3, 4096), &ReplicateConfig::default())
                        .is_ok()
                    {
                        acked.lock().unwrap().push(k);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    assert!(wait_until(Duration::from_secs(10), || acked
        .lock()
        .unwrap()
        .len()
        >= 200));
    // Everything acknowledged before this point has reached the node's journal mirror.
    let before: Vec<String> = acked.lock().unwrap().clone();
    assert!(node.sync_session(Duration::from_secs(10)));
    m.stop();
    let m2 = start(addr);
    // The node re-registers and re-mounts with what it holds.
    assert!(
        wait_until(Duration::from_secs(10), || {
            c.batch_is_exist(&[before[0].as_str()])[0]
                .as_ref()
                .is_ok_and(|b| *b)
        }),
        "resident values never came back"
    );
    assert!(wait_until(Duration::from_secs(10), || acked
        .lock()
        .unwrap()
        .len()
        > before.len() + 50));
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    for k in &before {
        let v = c
            .get(k)
            .unwrap_or_else(|e| panic!("{k} lost across the restart: {e}"));
        assert_eq!(check_value(k, &v), Ok(3), "{k}");
    }
    // Acknowledged later: readable with the right bytes, or gone; never wrong bytes.
    for k in acked.lock().unwrap().iter().skip(before.len()) {
        if let Ok(v) = c.get(k) {
            assert_eq!(check_value(k, &v), Ok(3), "{k}");
        }
    }
    drop(node);
    m2.stop();
}
