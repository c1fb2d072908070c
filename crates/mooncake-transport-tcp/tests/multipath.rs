//! Multi-path: two engines in their own network namespaces, joined by two veth pairs.
//! Traffic uses both paths; taking one link down mid-run moves its traffic to the other and
//! every request completes.
//!
//! Needs root and iproute2 (`ip netns`), so it is `#[ignore]`d by default; `cargo xtask test`
//! runs it with `--ignored` as root, where failing to make the namespaces fails the test.

mod common;

use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use common::{buffer, engine_with_transport, pattern, store};
use mooncake_core::{MemorySegment, Opcode, TransferRequest};
use mooncake_transport_tcp::TcpConfig;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two namespaces joined by two veth pairs; deleted on drop.
struct Net {
    a: String,
    b: String,
}

impl Net {
    fn create() -> Result<Self, String> {
        let id = std::process::id() % 100_000;
        let net = Self {
            a: format!("mcA{id}"),
            b: format!("mcB{id}"),
        };
        ip(&["netns", "add", &net.a])?;
        ip(&["netns", "add", &net.b])?;
        for p in 1..=2 {
            let (va, vb) = (format!("mca{id}p{p}"), format!("mcb{id}p{p}"));
            ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
            ip(&["link", "set", &va, "netns", &net.a])?;
            ip(&["link", "set", &vb, "netns", &net.b])?;
            ip(&[
                "-n",
                &net.a,
                "addr",
                "add",
                &format!("10.201.{p}.1/24"),
                "dev",
                &va,
            ])?;
            ip(&[
                "-n",
                &net.b,
                "addr",
                "add",
                &format!("10.201.{p}.2/24"),
                "dev",
                &vb,
            ])?;
            ip(&["-n", &net.a, "link", "set", &va, "up"])?;
            ip(&["-n", &net.b, "link", "set", &vb, "up"])?;
        }
        ip(&["-n", &net.a, "link", "set", "lo", "up"])?;
        ip(&["-n", &net.b, "link", "set", "lo", "up"])?;
        Ok(net)
    }

    fn link_down(&self, path: u32) -> Result<(), String> {
        let id = std::process::id() % 100_000;
        ip(&[
            "-n",
            &self.a,
            "link",
            "set",
            &format!("mca{id}p{path}"),
            "down",
        ])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

/// Moves the calling thread into namespace `name`; threads it spawns afterwards inherit it.
fn enter(name: &str) {
    let f = std::fs::File::open(format!("/var/run/netns/{name}")).expect("namespace file");
    // SAFETY: setns on a valid namespace fd affects only the calling thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns({name}): {}", std::io::Error::last_os_error());
}

#[test]
#[ignore = "needs root and iproute2 (network namespaces): `cargo xtask test` runs it as root"]
fn traffic_uses_both_paths_and_survives_a_link_down() {
    let net = Net::create().unwrap_or_else(|e| panic!("cannot create network namespaces: {e}"));
    const LEN: usize = 16 << 20;
    let md = store();
    let timeout = Duration::from_secs(2);
    let cfg = TcpConfig::new()
        .with_conns_per_path(2)
        .with_path_pause(Duration::from_secs(60));

    // The target listens on both of its addresses, inside namespace A.
    let (md2, cfg2, a) = (md.clone(), cfg.clone(), net.a.clone());
    let (target, tbuf) = std::thread::spawn(move || {
        enter(&a);
        let cfg = cfg2.with_listen(["10.201.1.1".parse().unwrap(), "10.201.2.1".parse().unwrap()]);
        let (t, _) = engine_with_transport("mp-target", &md2, cfg, timeout);
        let b = buffer(&t, LEN, 11);
        (t, b)
    })
    .join()
    .unwrap();
    assert_eq!(target.local_descriptor().tcp_data_addrs.len(), 2);

    // The initiator runs (and submits) inside namespace B.
    let (to_main, from_init) = mpsc::channel::<&str>();
    let (to_init, from_main) = mpsc::channel::<()>();
    let (b, tb) = (net.b.clone(), tbuf.clone());
    let worker = std::thread::spawn(move || {
        enter(&b);
        let (init, tcp) = engine_with_transport(
            "mp-init",
            &md,
            cfg.with_listen(["10.201.1.2".parse().unwrap()]),
            timeout,
        );
        let lbuf = buffer(&init, LEN, 12);
        let seg = init.open_segment_blocking("mp-target").unwrap();
        let mut model_t = pattern(LEN, 11);
        let model_l = pattern(LEN, 12);
        let blk = 256 << 10;
        let mut round = 0usize;
        let mut run_round = |round: usize| {
            // Write 16 blocks, read 16 blocks back, on ranges that move every round.
            let mut reqs = Vec::new();
            for i in 0..16 {
                let off = ((round * 16 + i) * blk) % (LEN / 2);
                reqs.push(TransferRequest {
                    opcode: Opcode::Write,
                    source: lbuf.base() + off as u64,
                    target_id: seg,
                    target_offset: tb.base() + off as u64,
                    length: blk as u64,
                });
                model_t[off..off + blk].copy_from_slice(&model_l[off..off + blk]);
            }
            init.submit_batch(&reqs)
                .unwrap()
                .wait_blocking(None)
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            let reads: Vec<_> = (0..16)
                .map(|i| {
                    let off = LEN / 2 + i * blk;
                    TransferRequest {
                        opcode: Opcode::Read,
                        source: lbuf.base() + off as u64,
                        target_id: seg,
                        target_offset: tb.base() + (off - LEN / 2) as u64,
                        length: blk as u64,
                    }
                })
                .collect();
            init.submit_batch(&reads)
                .unwrap()
                .wait_blocking(None)
                .unwrap_or_else(|e| panic!("round {round} reads: {e}"));
            assert!(
                lbuf.to_vec()[LEN / 2..LEN / 2 + 16 * blk] == model_t[..16 * blk],
                "round {round}: read-back differs"
            );
        };
        for _ in 0..8 {
            run_round(round);
            round += 1;
        }
        let before = tcp.stats().bytes_per_path.clone();
        to_main.send("both paths exercised").unwrap();
        from_main.recv().unwrap();
        // Path 1 is down now: every request must still complete, over path 2.
        for _ in 0..8 {
            run_round(round);
            round += 1;
        }
        let after = tcp.stats();
        assert!(
            tb.to_vec() == model_t,
            "the target's memory differs from the model"
        );
        (before, after)
    });
    assert_eq!(from_init.recv().unwrap(), "both paths exercised");
    net.link_down(1).unwrap();
    to_init.send(()).unwrap();
    let (before, after) = worker.join().unwrap();
    assert!(
        before.len() == 2 && before[0] > 0 && before[1] > 0,
        "both paths carry traffic: {before:?}"
    );
    assert!(
        after.bytes_per_path[1] > before[1],
        "path 2 took over: {after:?}"
    );
    assert!(
        after.conn_failures > 0 && after.retries > 0,
        "the dead path's slices were retried: {after:?}"
    );
    // Drop the engines before the namespaces go away.
    drop(target);
    drop(tbuf);
}
