//! The cluster secret on the TCP data port: peers that cannot prove it are refused before
//! any state changes — no byte of memory, no connection of another initiator (a spoofed
//! hello with a victim's name and a higher epoch would otherwise fence the victim's
//! connections).

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::{buffer, pattern, read_header, store};
use mooncake_core::{ClusterSecret, ErrorKind, MemorySegment, MetadataStore};
use mooncake_engine::TransferEngine;
use mooncake_transport_tcp::TcpConfig;
use mooncake_transport_tcp::wire::{FrameKind, Header, Hello};

fn secret(s: &str) -> Option<ClusterSecret> {
    Some(ClusterSecret::from_bytes(s.as_bytes()).unwrap())
}

fn engine(name: &str, md: &Arc<dyn MetadataStore>, s: Option<ClusterSecret>) -> TransferEngine {
    TransferEngine::builder(name)
        .with_metadata(md.clone())
        .with_timeout(Duration::from_secs(2))
        .with_cluster_secret(s)
        .with_transport(TcpConfig::new())
        .build()
        .unwrap()
}

#[test]
fn only_initiators_with_the_secret_reach_memory() {
    let md = store();
    let target = engine("auth-target", &md, secret("the right secret!"));
    let tbuf = buffer(&target, 1 << 20, 1);
    let before = tbuf.to_vec();
    for (name, s, why) in [
        ("auth-none", None, "requires the cluster secret"),
        (
            "auth-wrong",
            secret("the wrong secret"),
            "did not prove the cluster secret",
        ),
    ] {
        let init = engine(name, &md, s);
        let lbuf = buffer(&init, 1 << 20, 2);
        let e = init
            .transfer_sync_write("auth-target", lbuf.base(), tbuf.base(), 4096)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PeerUnreachable, "{name}: {e}");
        assert!(e.to_string().contains(why), "{name}: {e}");
        assert!(tbuf.to_vec() == before, "{name}: memory changed");
    }
    let good = engine("auth-good", &md, secret("the right secret!"));
    let gbuf = buffer(&good, 1 << 20, 3);
    good.transfer_sync_write("auth-target", gbuf.base(), tbuf.base(), 4096)
        .unwrap();
    assert_eq!(tbuf.to_vec()[..4096], pattern(1 << 20, 3)[..4096]);
}

#[test]
fn an_initiator_with_the_secret_refuses_a_target_without_it() {
    let md = store();
    let target = engine("open-target", &md, None);
    let tbuf = buffer(&target, 1 << 20, 1);
    let init = engine("strict-init", &md, secret("the right secret!"));
    let lbuf = buffer(&init, 1 << 20, 2);
    let e = init
        .transfer_sync_write("open-target", lbuf.base(), tbuf.base(), 4096)
        .unwrap_err();
    assert!(
        e.to_string().contains("without proving the cluster secret"),
        "{e}"
    );
    assert_eq!(tbuf.to_vec()[..4096], pattern(1 << 20, 1)[..4096]);
}

#[test]
fn a_spoofed_hello_cannot_fence_a_victim() {
    let md = store();
    let target = engine("fence-auth-target", &md, secret("the right secret!"));
    let tbuf = buffer(&target, 1 << 20, 1);
    let slot = Arc::new(std::sync::Mutex::new(None));
    let s2 = slot.clone();
    let victim = TransferEngine::builder("victim")
        .with_metadata(md.clone())
        .with_cluster_secret(secret("the right secret!"))
        .with_transport(
            move |ctx: &mooncake_core::EngineContext| -> mooncake_core::Result<Arc<dyn mooncake_core::Transport>> {
                let t = Arc::new(mooncake_transport_tcp::TcpTransport::start(TcpConfig::new(), ctx)?);
                *s2.lock().unwrap() = Some(t.clone());
                Ok(t)
            },
        )
        .build()
        .unwrap();
    let vtcp = slot.lock().unwrap().take().unwrap();
    let vbuf = buffer(&victim, 1 << 20, 2);
    victim
        .transfer_sync_write("fence-auth-target", vbuf.base(), tbuf.base(), 4096)
        .unwrap();
    // An attacker names the victim (and its generation) with a huge epoch, but cannot prove
    // the secret.
    let addr = target.local_descriptor().tcp_data_addrs[0].clone();
    let mut s = TcpStream::connect(&addr).unwrap();
    let hello = Hello {
        target: "fence-auth-target".into(),
        initiator: "victim".into(),
        initiator_generation: victim.generation(),
        epoch: 1_000_000,
        nonce: [1; 16],
    }
    .encode();
    s.write_all(&Header::new(FrameKind::Hello, 0, 0, hello.len() as u64).encode())
        .unwrap();
    s.write_all(&hello).unwrap();
    assert_eq!(read_header(&mut s).kind, FrameKind::Challenge);
    let mut challenge = [0u8; 48];
    std::io::Read::read_exact(&mut s, &mut challenge).unwrap();
    s.write_all(&Header::new(FrameKind::Proof, 0, 0, 32).encode())
        .unwrap();
    s.write_all(&[0u8; 32]).unwrap();
    let h = read_header(&mut s);
    assert_eq!(h.kind, FrameKind::Error);
    // The victim's connection was not fenced: its next write goes over it.
    let connects = vtcp.stats().connects;
    victim
        .transfer_sync_write("fence-auth-target", vbuf.base(), tbuf.base() + 8192, 4096)
        .unwrap();
    assert_eq!(
        tbuf.to_vec()[8192..8192 + 4096],
        pattern(1 << 20, 2)[..4096]
    );
    assert_eq!(
        vtcp.stats().connects,
        connects,
        "the victim had to reconnect"
    );
    assert_eq!(vtcp.stats().conn_failures, 0);
}
