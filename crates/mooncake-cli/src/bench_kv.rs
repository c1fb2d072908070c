//! `mooncake bench kv`: a realistic KV cache from a prefill process to a decode process.
//!
//! Default shape: 32 layers, 8 KV heads, head dim 128, bf16, 8192 tokens in 16-token blocks
//! (1 GiB; K and V of each layer are separate `[blocks, 16, 8, 128]` tensors, as vLLM lays
//! them out). The prefill side holds the blocks at shuffled ids, the decode side (a child
//! process) receives them at other shuffled ids: ONE `batch_transfer_sync_write` with a
//! descriptor per (layer, K/V, block) run, verified block by block. The same bytes then go
//! over a raw socket pump (as many TCP connections as the engine uses) in the same run.
//! `torch.distributed` gloo is measured by `python -m mooncake.bench_kv` (it needs torch).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use mooncake::{LocalBuffer, MemorySegment};

/// TCP connections per peer of the engine (the pump uses as many).
const CONNS: usize = 4;

/// Arguments of `mooncake bench kv`.
#[derive(Debug, Clone, Args)]
pub(crate) struct KvArgs {
    /// Layers.
    #[arg(long, default_value_t = 32)]
    layers: usize,
    /// KV heads.
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    /// Head dimension.
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// Prompt tokens.
    #[arg(long, default_value_t = 8192)]
    tokens: usize,
    /// Tokens per block.
    #[arg(long, default_value_t = 16)]
    block: usize,
    /// Runs of each method (the best is reported).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
    /// Internal: run as the decode process.
    #[arg(long, hide = true)]
    decode: bool,
}

impl KvArgs {
    fn blocks(&self) -> usize {
        self.tokens.div_ceil(self.block)
    }
    /// Bytes of one block of one layer's K (or V), bf16.
    fn block_bytes(&self) -> usize {
        self.block * self.kv_heads * self.head_dim * 2
    }
    fn tensors(&self) -> usize {
        self.layers * 2
    }
    fn total(&self) -> usize {
        self.tensors() * self.blocks() * self.block_bytes()
    }
}

/// A fixed permutation of `0..n` (xorshift Fisher–Yates).
fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

/// A digest of every block in logical order: catches wrong, missing and misplaced blocks.
fn digest(mem: &[u8], a: &KvArgs, ids: &[usize]) -> u64 {
    let bb = a.block_bytes();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for t in 0..a.tensors() {
        for &b in ids {
            let off = (t * a.blocks() + b) * bb;
            let x = mem[off..off + bb].chunks_exact(8).fold(0u64, |acc, w| {
                acc.rotate_left(5) ^ u64::from_le_bytes(w.try_into().expect("8 bytes"))
            });
            h = (h ^ x).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn pattern(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, w) in v.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes());
    }
    v
}

/// The decode process: a registered pool and a pump listener; commands on stdin.
fn run_decode(a: &KvArgs) -> anyhow::Result<()> {
    let engine = crate::store::build_engine("P2PHANDSHAKE", "tcp", "127.0.0.1", CONNS, "bench-kv")?;
    let pool = std::sync::Arc::new(LocalBuffer::new(a.total())?);
    pool.fill(0, a.total(), 1)?;
    engine.register(pool.clone())?;
    let ids = permutation(a.blocks(), 2);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let mut sink = vec![1u8; a.total()];
    println!(
        "ready {} {} {}",
        engine.local_name(),
        pool.base(),
        listener.local_addr()?.port()
    );
    std::io::stdout().flush()?;
    for line in std::io::stdin().lock().lines() {
        match line?.trim() {
            "digest" => println!("{}", digest(&pool.to_vec(), a, &ids)),
            "pump" => {
                let part = a.total() / CONNS;
                let mut conns: Vec<(usize, TcpStream)> = Vec::new();
                for _ in 0..CONNS {
                    let (mut c, _) = listener.accept()?;
                    let mut i = [0u8];
                    c.read_exact(&mut i)?;
                    conns.push((i[0] as usize, c));
                }
                conns.sort_by_key(|c| c.0);
                std::thread::scope(|s| -> anyhow::Result<()> {
                    let mut rest: &mut [u8] = &mut sink;
                    let mut hs = Vec::new();
                    for (i, mut c) in conns {
                        let n = if i == CONNS - 1 { rest.len() } else { part };
                        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(n);
                        rest = tail;
                        hs.push(s.spawn(move || -> std::io::Result<()> {
                            c.read_exact(mine)?;
                            c.write_all(b"k")
                        }));
                    }
                    for h in hs {
                        h.join()
                            .map_err(|_| anyhow::anyhow!("pump thread panicked"))??;
                    }
                    Ok(())
                })?;
                println!("{}", digest(&sink, a, &(0..a.blocks()).collect::<Vec<_>>()));
            }
            "exit" => break,
            other => bail!("unknown command {other:?}"),
        }
        std::io::stdout().flush()?;
    }
    Ok(())
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// The decode child process, driven over its stdin/stdout.
struct Decode {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Decode {
    fn start(a: &KvArgs) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["bench", "kv", "--decode"])
            .args([
                "--layers",
                &a.layers.to_string(),
                "--kv-heads",
                &a.kv_heads.to_string(),
            ])
            .args([
                "--head-dim",
                &a.head_dim.to_string(),
                "--tokens",
                &a.tokens.to_string(),
            ])
            .args(["--block", &a.block.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the decode process")?;
        let stdin = child.stdin.take().context("the decode process's stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("the decode process's stdout")?);
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    fn send(&mut self, cmd: &str) -> anyhow::Result<()> {
        writeln!(self.stdin, "{cmd}")?;
        Ok(self.stdin.flush()?)
    }

    fn line(&mut self) -> anyhow::Result<String> {
        let mut l = String::new();
        if self.stdout.read_line(&mut l)? == 0 {
            bail!("the decode process exited");
        }
        Ok(l.trim().to_string())
    }
}

impl Drop for Decode {
    fn drop(&mut self) {
        let _ = self.send("exit");
        let _ = self.child.wait();
    }
}

/// One pump run: `CONNS` connections each send a contiguous part; done when every part is
/// acknowledged by the decode process.
fn pump_once(d: &mut Decode, data: &[u8], port: u16) -> anyhow::Result<f64> {
    d.send("pump")?;
    let mut conns = Vec::new();
    for i in 0..CONNS {
        let mut c = TcpStream::connect(("127.0.0.1", port))?;
        c.set_nodelay(true)?;
        c.write_all(&[i as u8])?;
        conns.push(c);
    }
    let part = data.len() / CONNS;
    let t = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let hs: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| {
                let end = if i == CONNS - 1 {
                    data.len()
                } else {
                    (i + 1) * part
                };
                let mine = &data[i * part..end];
                s.spawn(move || -> std::io::Result<()> {
                    c.write_all(mine)?;
                    let mut k = [0u8];
                    c.read_exact(&mut k)
                })
            })
            .collect();
        for h in hs {
            h.join()
                .map_err(|_| anyhow::anyhow!("pump thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(t.elapsed().as_secs_f64())
}

pub(crate) fn run(a: KvArgs) -> anyhow::Result<()> {
    if a.decode {
        return run_decode(&a);
    }
    let mut d = Decode::start(&a)?;
    let ready = d.line()?;
    let f: Vec<&str> = ready.split_whitespace().collect();
    if f.len() != 4 || f[0] != "ready" {
        bail!("unexpected first line from the decode process: {ready:?}");
    }
    let (session, dst_base, pump_port): (String, u64, u16) =
        (f[1].to_string(), f[2].parse()?, f[3].parse()?);

    let engine = crate::store::build_engine("P2PHANDSHAKE", "tcp", "127.0.0.1", CONNS, "bench-kv")?;
    let total = a.total();
    let src_bytes = pattern(total);
    let pool = std::sync::Arc::new(LocalBuffer::new(total)?);
    pool.write_at(0, &src_bytes)?;
    engine.register(pool.clone())?;
    let (src_ids, dst_ids) = (permutation(a.blocks(), 1), permutation(a.blocks(), 2));
    let bb = a.block_bytes() as u64;
    let (mut src, mut dst, mut lens) = (Vec::new(), Vec::new(), Vec::<u64>::new());
    for t in 0..a.tensors() {
        for (&s, &dd) in src_ids.iter().zip(&dst_ids) {
            let s = pool.base() + ((t * a.blocks() + s) as u64) * bb;
            let dd = dst_base + ((t * a.blocks() + dd) as u64) * bb;
            match (src.last(), dst.last(), lens.last_mut()) {
                (Some(&ls), Some(&ld), Some(l)) if ls + *l == s && ld + *l == dd => *l += bb,
                _ => {
                    src.push(s);
                    dst.push(dd);
                    lens.push(bb);
                }
            }
        }
    }
    let want = digest(&src_bytes, &a, &src_ids);
    let mut ours = Vec::new();
    for i in 0..a.iters.max(1) {
        let t = Instant::now();
        engine.batch_transfer_sync_write(&session, &src, &dst, &lens)?;
        ours.push(t.elapsed().as_secs_f64());
        if i == 0 {
            d.send("digest")?;
            if d.line()?.parse::<u64>()? != want {
                bail!("the decode process received different KV bytes");
            }
        }
    }
    // The pump: the same bytes in logical block order, into the decode process's memory.
    let mut logical = Vec::with_capacity(total);
    for t in 0..a.tensors() {
        for &b in &src_ids {
            let off = (t * a.blocks() + b) * bb as usize;
            logical.extend_from_slice(&src_bytes[off..off + bb as usize]);
        }
    }
    let mut pump = Vec::new();
    for _ in 0..a.iters.max(1) {
        pump.push(pump_once(&mut d, &logical, pump_port)?);
        if d.line()?.parse::<u64>()? != want {
            bail!("the pump delivered different bytes");
        }
    }
    drop(d);
    let (o, p) = (best(&ours), best(&pump));
    let gb = total as f64 / 1e9;
    println!(
        "KV cache: {} layers x {} KV heads x {} dim, bf16, {} tokens in {}-token blocks = {:.2} GiB, {} descriptors (shuffled blocks)",
        a.layers,
        a.kv_heads,
        a.head_dim,
        a.tokens,
        a.block,
        total as f64 / f64::from(1u32 << 30),
        src.len()
    );
    println!(
        "  ours (batch_transfer_sync_write, TCP): {:8.1} ms {:6.2} GB/s  verified",
        o * 1e3,
        gb / o
    );
    println!(
        "  pump (raw sockets, {CONNS} conns):        {:8.1} ms {:6.2} GB/s  verified -> ours/pump {:.2}x",
        p * 1e3,
        gb / p,
        p / o
    );
    println!("  gloo: measured by `python -m mooncake.bench_kv` (it needs torch)");
    if a.json {
        println!(
            "{}",
            serde_json::json!({"bytes": total, "descriptors": src.len(), "ours_s": o, "pump_s": p,
                "ours_gbps": gb / o, "pump_gbps": gb / p, "ours_vs_pump": p / o})
        );
    }
    Ok(())
}
