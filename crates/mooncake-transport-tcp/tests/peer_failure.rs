//! A target that dies or stops answering mid-batch fails every outstanding request within
//! the deadline; the initiator keeps working with other peers and with the restarted target.
//!
//! The target runs in a child process (this test binary re-executed), so it can really be
//! killed (SIGKILL) or frozen (SIGSTOP).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{buffer, engine, pattern, store};
use mooncake_core::{
    EmbeddedMetadataStore, ErrorKind, LocalBuffer, MemorySegment, MetadataKeys, MetadataStore,
    Opcode, SegmentDescriptor, TransferEngine, TransferRequest, TransferStatus, block_on,
};
use mooncake_transport_tcp::TcpConfig;

const CHILD_ENV: &str = "MOONCAKE_TCP_TEST_CHILD";
const LEN: usize = 64 << 20;
const TIMEOUT: Duration = Duration::from_secs(1);

/// Entry point of the child process: a target that serves until it is killed.
#[test]
#[ignore = "helper process of the peer-failure tests, started by them"]
fn child_target() {
    let Ok(name) = std::env::var(CHILD_ENV) else {
        return;
    };
    let md: Arc<dyn MetadataStore> = Arc::new(EmbeddedMetadataStore::new());
    let e = engine(&name, &md, TcpConfig::new());
    let _buf = buffer(&e, LEN, 1);
    println!(
        "DESC {}",
        String::from_utf8(e.local_descriptor().to_json()).unwrap()
    );
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

struct ChildTarget {
    child: Child,
    descriptor: SegmentDescriptor,
}

impl ChildTarget {
    fn spawn(name: &str) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_target",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, name)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        for line in out.lines() {
            let line = line.unwrap();
            // libtest prints "test child_target ... " before the test's own output.
            if let Some(json) = line.split_once("DESC ").map(|(_, j)| j) {
                let descriptor = SegmentDescriptor::from_json(json.as_bytes(), "child").unwrap();
                return Self { child, descriptor };
            }
        }
        let _ = child.kill();
        let status = child.wait();
        panic!("the child target exited before publishing: {status:?}");
    }

    fn publish(&self, md: &Arc<dyn MetadataStore>) {
        let key = MetadataKeys::new(None).segment(&self.descriptor.name);
        block_on(md.put(&key, self.descriptor.to_json())).unwrap();
    }

    fn base(&self) -> u64 {
        self.descriptor.buffers[0].addr
    }

    fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }
}

impl Drop for ChildTarget {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn big_batch(
    h: mooncake_core::SegmentHandle,
    local: &LocalBuffer,
    remote: u64,
) -> Vec<TransferRequest> {
    (0..64)
        .map(|i| TransferRequest {
            opcode: if i % 2 == 0 {
                Opcode::Write
            } else {
                Opcode::Read
            },
            source: local.base() + i * (1 << 20),
            target_id: h,
            target_offset: remote + i * (1 << 20),
            length: 1 << 20,
        })
        .collect()
}

fn initiator(md: &Arc<dyn MetadataStore>) -> (TransferEngine, Arc<LocalBuffer>) {
    let init = TransferEngine::builder(format!("pf-init-{}", std::process::id()))
        .with_metadata(md.clone())
        .with_timeout(TIMEOUT)
        .with_transport(TcpConfig::new())
        .build()
        .unwrap();
    let local = buffer(&init, LEN, 2);
    (init, local)
}

/// Runs batches until one is caught in flight, then applies `sig` to the target and checks
/// that the batch finishes (with failures) within `limit`.
fn interrupt_mid_batch(sig: i32, expect: &[ErrorKind], limit: Duration) {
    let md = store();
    let target = ChildTarget::spawn(&format!("pf-target-{sig}"));
    target.publish(&md);
    let (init, local) = initiator(&md);
    let h = init.open_segment_blocking(&target.descriptor.name).unwrap();
    // A healthy round first: the peer works and connections are warm.
    init.submit_batch(&big_batch(h, &local, target.base()))
        .unwrap()
        .wait_blocking(None)
        .unwrap();

    let batch = init
        .submit_batch(&big_batch(h, &local, target.base()))
        .unwrap();
    target.signal(sig);
    let t0 = Instant::now();
    let r = batch.wait_blocking(Some(t0 + limit + Duration::from_secs(5)));
    let took = t0.elapsed();
    assert!(
        batch.is_done(),
        "the batch still had pending tasks after {took:?}"
    );
    assert!(
        took <= limit,
        "outstanding requests took {took:?} to fail (limit {limit:?})"
    );
    if let Err(e) = r {
        assert!(expect.contains(&e.kind()), "unexpected error kind: {e}");
        let failed = (0..64)
            .filter(|&i| batch.status(i) != TransferStatus::Completed)
            .count();
        assert!(failed > 0);
    }
    // A request submitted after the failure fails fast too.
    let t1 = Instant::now();
    let e = init.transfer_sync_write(&target.descriptor.name, local.base(), target.base(), 4096);
    assert!(e.is_err());
    assert!(
        t1.elapsed() <= limit,
        "a new request to the dead peer took {:?}",
        t1.elapsed()
    );

    // The engine keeps working with another peer.
    let other = engine(&format!("pf-other-{sig}"), &md, TcpConfig::new());
    let obuf = buffer(&other, 1 << 20, 3);
    init.transfer_sync_read(other.local_name(), local.base(), obuf.base(), 1 << 20)
        .unwrap();
    assert_eq!(local.to_vec()[..1 << 20], pattern(1 << 20, 3)[..]);
}

#[test]
fn killed_target_fails_outstanding_requests() {
    // A dead process: its sockets reset at once, so failures come well within the timeout.
    interrupt_mid_batch(
        libc::SIGKILL,
        &[ErrorKind::PeerUnreachable, ErrorKind::Timeout],
        TIMEOUT * 3,
    );
}

#[test]
fn frozen_target_fails_within_the_deadline() {
    // A frozen process keeps its sockets open but moves no byte: the progress timeout fires.
    interrupt_mid_batch(
        libc::SIGSTOP,
        &[ErrorKind::Timeout, ErrorKind::PeerUnreachable],
        TIMEOUT * 3,
    );
}

#[test]
fn restarted_target_is_reached_again() {
    let md = store();
    let name = "pf-restart";
    let first = ChildTarget::spawn(name);
    first.publish(&md);
    let (init, local) = initiator(&md);
    init.transfer_sync_write(name, local.base(), first.base(), 4096)
        .unwrap();
    drop(first);
    assert!(
        init.transfer_sync_write(name, local.base(), 0x1000, 4096)
            .is_err()
    );
    // Same name, new process, new generation and port: after it publishes, the next call
    // reads the new descriptor and succeeds.
    let second = ChildTarget::spawn(name);
    second.publish(&md);
    init.transfer_sync_write(name, local.base(), second.base(), 4096)
        .unwrap();
}
