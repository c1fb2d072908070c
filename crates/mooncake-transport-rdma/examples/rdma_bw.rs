//! Bandwidth of the RDMA transport between two engines in this process, printed as one JSON
//! line (compare with `ib_write_bw`/`ib_read_bw` on the same device; `cargo xtask rxe --bench`
//! does).
//!
//! ```text
//! rdma_bw [--op write|read] [--size BYTES] [--seconds S] [--batch N] [--inflight N]
//! ```
//! Defaults: 64 KiB blocks, 5 s, 8 batches of 16 requests in flight (128 requests: the
//! queue depth of perftest's default `--tx-depth`).
//!
//! Transport settings come from the `MC_*` variables of `RdmaConfig::from_env`
//! (e.g. `MC_RDMA_NICS=rxe0`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_core::{LocalBuffer, MemorySegment, Opcode, TransferRequest};
use mooncake_engine::TransferEngine;
use mooncake_transport_rdma::RdmaConfig;

struct Args {
    op: Opcode,
    size: u64,
    seconds: f64,
    batch: usize,
    inflight: usize,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        op: Opcode::Write,
        size: 64 << 10,
        seconds: 5.0,
        batch: 16,
        inflight: 8,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{k} needs a value"))
        };
        match k.as_str() {
            "--op" => {
                a.op = match v()?.as_str() {
                    "write" => Opcode::Write,
                    "read" => Opcode::Read,
                    o => anyhow::bail!("--op {o}: expected write or read"),
                }
            }
            "--size" => a.size = v()?.parse()?,
            "--seconds" => a.seconds = v()?.parse()?,
            "--batch" => a.batch = v()?.parse()?,
            "--inflight" => a.inflight = v()?.parse()?,
            _ => anyhow::bail!("unknown argument {k}"),
        }
    }
    anyhow::ensure!(
        a.size > 0 && a.batch > 0 && a.inflight > 0,
        "sizes and counts must be positive"
    );
    Ok(a)
}

fn main() -> anyhow::Result<()> {
    let args = parse()?;
    let a = TransferEngine::builder("bw-a")
        .with_transport(RdmaConfig::from_env()?)
        .build()?;
    let b = TransferEngine::builder("bw-b")
        .with_transport(RdmaConfig::from_env()?)
        .build()?;
    let per = args.size as usize * args.batch;
    let len = per * args.inflight;
    let src = Arc::new(LocalBuffer::new(len)?);
    let dst = Arc::new(LocalBuffer::new(len)?);
    src.fill(0, len, 0xab)?;
    a.register(src.clone())?;
    b.register(dst.clone())?;
    let h = a.open_segment_blocking("bw-b")?;
    let reqs = |slot: usize| -> Vec<TransferRequest> {
        (0..args.batch)
            .map(|i| {
                let off = (slot * per + i * args.size as usize) as u64;
                TransferRequest {
                    opcode: args.op,
                    source: src.base() + off,
                    target_id: h,
                    target_offset: dst.base() + off,
                    length: args.size,
                }
            })
            .collect()
    };
    // Warm up: connect every endpoint.
    for slot in 0..args.inflight {
        a.submit_batch(&reqs(slot))?.wait_blocking(None)?;
    }
    let mut q = VecDeque::new();
    for slot in 0..args.inflight {
        q.push_back((slot, a.submit_batch(&reqs(slot))?));
    }
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.seconds);
    let mut bytes = 0u64;
    while let Some((slot, batch)) = q.pop_front() {
        batch.wait_blocking(None)?;
        bytes += per as u64;
        if Instant::now() < end {
            q.push_back((slot, a.submit_batch(&reqs(slot))?));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if args.op == Opcode::Write {
        anyhow::ensure!(
            dst.to_vec().iter().all(|&x| x == 0xab),
            "written bytes differ"
        );
    }
    println!(
        "{{\"transport\":\"mooncake-rdma\",\"op\":\"{}\",\"block_size\":{},\"bytes\":{bytes},\"seconds\":{secs:.3},\"gbps\":{:.4}}}",
        if args.op == Opcode::Write {
            "write"
        } else {
            "read"
        },
        args.size,
        bytes as f64 * 8.0 / secs / 1e9
    );
    Ok(())
}
