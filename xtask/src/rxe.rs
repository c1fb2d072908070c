//! `cargo xtask rxe`: runs the RDMA transport's device tests (and, with `--bench`, its
//! bandwidth against perftest) inside a soft-RoCE VM.
//!
//! 1. Installs host tools with apt when missing (debootstrap, qemu, e2fsprogs, cmake, clang).
//! 2. Builds (once; cached under `~/.cache/mooncake-rs/vm/image-<recipe hash>`) a Debian
//!    bookworm root file system with the generic kernel, rdma-core and perftest, as an ext4
//!    image made with `mkfs.ext4 -d`.
//! 3. Builds the test binaries (and, for `--bench`, the `mooncake` CLI with `rdma`) on the host with
//!    `MOONCAKE_TEST_RDMA=1`, and puts them, with a generated `run.sh`, on a second disk.
//! 4. Boots qemu (TCG; a nested KVM guest hangs here) with the kernel and initrd of the
//!    image, `init=/sbin/mooncake-init`; the guest loads `rdma_rxe`, creates two dummy
//!    netdevs with an rxe device each, runs the tests and benchmarks, prints
//!    `MOONCAKE-RXE-EXIT=<status>` on the serial console and powers off.
//!
//! Any failure to build or boot the VM is an error: this never skips.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

/// Options of `cargo xtask rxe`.
#[derive(Debug, Clone, clap::Args)]
pub struct RxeArgs {
    /// Also compare the transport's bandwidth with ib_write_bw / ib_read_bw in the VM.
    #[arg(long)]
    pub bench: bool,
    /// Run only the benchmarks, not the tests.
    #[arg(long)]
    pub bench_only: bool,
    /// Only run tests whose name contains this (passed to the test binaries).
    #[arg(long)]
    pub filter: Option<String>,
    /// `RUST_LOG` for the guest (default `warn`); also shows test output (`--nocapture`).
    #[arg(long)]
    pub log: Option<String>,
    /// Extra `KEY=VALUE` settings for the benchmark's transport (e.g. `MC_SLICE_SIZE=262144`).
    #[arg(long)]
    pub bench_env: Vec<String>,
    /// Rebuild the VM image even when a cached one matches the recipe.
    #[arg(long)]
    pub rebuild_image: bool,
    /// Seconds the VM may run before it is killed (the run then fails).
    #[arg(long, default_value_t = 1200)]
    pub vm_timeout: u64,
    /// Virtual CPUs of the VM.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Memory of the VM in MiB.
    #[arg(long, default_value_t = 3072)]
    pub memory_mib: u32,
}

impl Default for RxeArgs {
    fn default() -> Self {
        Self {
            bench: false,
            bench_only: false,
            filter: None,
            log: None,
            bench_env: Vec::new(),
            rebuild_image: false,
            vm_timeout: 1200,
            cpus: 2,
            memory_mib: 3072,
        }
    }
}

const SUITE: &str = "bookworm";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const PACKAGES: &[&str] = &[
    "linux-image-amd64",
    "kmod",
    "iproute2",
    "rdma-core",
    "ibverbs-utils",
    "ibverbs-providers",
    "perftest",
    "procps",
];
/// Bump to force a rebuild of cached images.
const IMAGE_VERSION: u32 = 1;
const GUEST_INIT: &str = r#"#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp 2>/dev/null
mount -t tmpfs tmpfs /run 2>/dev/null
echo 1 > /proc/sys/kernel/sysrq
mkdir -p /work
if mount -t ext4 /dev/vdb /work; then
  echo MOONCAKE-RXE-BOOTED
  sh /work/run.sh
  code=$?
else
  echo "MOONCAKE-RXE-ERROR cannot mount the payload disk"
  code=99
fi
echo "MOONCAKE-RXE-EXIT=$code"
sync
umount /work 2>/dev/null
echo o > /proc/sysrq-trigger
sleep 30
"#;

const RUN_SH: &str = r#"#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root RUST_BACKTRACE=1 MOONCAKE_TEST_RDMA=1 RUST_LOG=${RUST_LOG:-warn}
# The slow-connection tests open 1,000 connections (two descriptors each).
ulimit -n 65536 2>/dev/null || ulimit -n 8192 2>/dev/null || true
fail=0
echo "MOONCAKE-RXE-STEP kernel $(uname -r), $(nproc) cpus"
modprobe rdma_rxe || { echo "MOONCAKE-RXE-ERROR cannot load rdma_rxe"; exit 90; }
ip link set lo up
# The minbase image has no /etc/hosts: name lookups of localhost must work.
[ -s /etc/hosts ] || printf '127.0.0.1 localhost\n::1 localhost\n' > /etc/hosts
i=0
for dev in mc0 mc1; do
  ip link add $dev type dummy || exit 91
  ip addr add 10.77.$i.1/24 dev $dev || exit 91
  ip link set $dev up || exit 91
  rdma link add rxe$i type rxe netdev $dev || { echo "MOONCAKE-RXE-ERROR rdma link add rxe$i"; exit 92; }
  i=$((i+1))
done
export MOONCAKE_RXE_NETDEVS=rxe0=mc0,rxe1=mc1
sleep 1
rdma link show
ibv_devices
if [ "$RUN_TESTS" = 1 ]; then
  for t in /work/bin/test-*; do
    echo "MOONCAKE-RXE-STEP test $t"
    start=$(date +%s)
    if ! timeout -k 10 600 "$t" --test-threads=1 --color never $NOCAPTURE $FILTER; then
      echo "MOONCAKE-RXE-FAILED $t"
      fail=1
    fi
    echo "MOONCAKE-RXE-STEP $t took $(( $(date +%s) - start )) s"
  done
fi
if [ "$RUN_BENCH" = 1 ]; then
  idx=0
  for f in /sys/class/infiniband/rxe0/ports/1/gids/*; do
    if grep -q '^0000:0000:0000:0000:0000:ffff' "$f"; then idx=$(basename "$f"); break; fi
  done
  for op in write read; do
    for size in 65536 1048576; do
      for rep in 1 2; do
        echo "MOONCAKE-RXE-STEP bench $op $size run $rep (gid index $idx)"
        # The bench measures the transport, then runs ib_${op}_bw on the same device as its
        # --baseline, in the same process run.
        if env MC_RDMA_NICS=rxe0 $BENCH_ENV /work/bin/mooncake bench transfer --protocol rdma --rdma-device rxe0 \
            --op $op --block-size $size --batch-size 128 --duration 5 --baseline --json > /tmp/mc.txt 2>&1; then
          line=$(tail -1 /tmp/mc.txt)
          ours=$(echo "$line" | sed -n 's/.*"gb_per_s":\([0-9.eE+-]*\).*/\1/p')
          base=$(echo "$line" | sed -n 's/.*"baseline_gb_per_s":\([0-9.eE+-]*\).*/\1/p')
          echo "MOONCAKE-RXE-BENCH perftest op=$op size=$size gbps=$(awk -v v="${base:-0}" 'BEGIN{print v*8}')"
          echo "MOONCAKE-RXE-BENCH mooncake op=$op size=$size gbps=$(awk -v v="${ours:-0}" 'BEGIN{print v*8}')"
        else
          cat /tmp/mc.txt
          echo "MOONCAKE-RXE-FAILED mooncake bench transfer $op $size"
          fail=1
        fi
      done
    done
  done
fi
exit $fail
"#;

fn workspace_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf();
    if root.join("crates/mooncake-transport-rdma").is_dir() {
        root
    } else {
        std::env::current_dir().unwrap_or(root)
    }
}

fn cache_dir() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache/mooncake-rs/vm"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn have(cmd: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin"])
        .any(|d| Path::new(d).join(cmd).is_file())
}

fn sudo(cmd: &str) -> Command {
    if is_root() {
        Command::new(cmd)
    } else {
        let mut c = Command::new("sudo");
        c.arg(cmd);
        c
    }
}

fn run_cmd(c: &mut Command) -> anyhow::Result<()> {
    let desc = format!("{c:?}");
    let st = c.status().with_context(|| format!("cannot run {desc}"))?;
    ensure!(st.success(), "{desc} failed with {st}");
    Ok(())
}

fn ensure_host_tools() -> anyhow::Result<()> {
    let tools = [
        ("debootstrap", "debootstrap"),
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("mkfs.ext4", "e2fsprogs"),
        ("cmake", "cmake"),
        ("clang", "clang"),
    ];
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(c, _)| !have(c))
        .map(|(_, p)| *p)
        .collect();
    if !Path::new("/usr/lib/x86_64-linux-gnu/libclang-14.so.1").exists() && !have("llvm-config") {
        missing.push("libclang-dev");
    }
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("rxe: installing host packages {missing:?}");
    run_cmd(sudo("apt-get").arg("update").arg("-qq"))?;
    run_cmd(
        sudo("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )
}

fn fnv64(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

struct Image {
    rootfs: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
}

fn du_mib(p: &Path) -> anyhow::Result<u64> {
    let o = Command::new("du")
        .arg("-sm")
        .arg(p)
        .output()
        .context("du")?;
    let s = String::from_utf8_lossy(&o.stdout);
    s.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du output")
}

fn find_boot_file(boot: &Path, prefix: &str) -> anyhow::Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(boot)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .collect();
    found.sort();
    found
        .pop()
        .with_context(|| format!("no {prefix}* in {}", boot.display()))
}

fn ensure_image(force: bool) -> anyhow::Result<Image> {
    let mirror = std::env::var("MOONCAKE_VM_MIRROR").unwrap_or_else(|_| DEFAULT_MIRROR.to_string());
    let recipe = format!(
        "v{IMAGE_VERSION}\n{SUITE}\n{mirror}\n{}\n{GUEST_INIT}",
        PACKAGES.join(",")
    );
    let hash = fnv64(&recipe);
    let cache = cache_dir()?;
    let dir = cache.join(format!("image-{hash:016x}"));
    let image = Image {
        rootfs: dir.join("rootfs.img"),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
    };
    if !force && dir.join("ok").exists() {
        eprintln!("rxe: using cached VM image {}", dir.display());
        return Ok(image);
    }
    let t0 = Instant::now();
    eprintln!(
        "rxe: building VM image {} (debootstrap {SUITE})",
        dir.display()
    );
    let work = cache.join(format!("build-{hash:016x}"));
    let _ = std::fs::remove_dir_all(&work);
    let rootfs = work.join("rootfs");
    let debs = cache.join("debs");
    std::fs::create_dir_all(&rootfs)?;
    std::fs::create_dir_all(&debs)?;
    run_cmd(
        sudo("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", PACKAGES.join(",")))
            .arg(format!("--cache-dir={}", debs.display()))
            .arg(SUITE)
            .arg(&rootfs)
            .arg(&mirror),
    )
    .context("debootstrap failed (network? set MOONCAKE_VM_MIRROR)")?;
    let init = rootfs.join("sbin/mooncake-init");
    std::fs::write(&init, GUEST_INIT)?;
    run_cmd(Command::new("chmod").arg("0755").arg(&init))?;
    std::fs::write(rootfs.join("etc/hostname"), "mooncake-rxe\n")?;
    std::fs::copy(
        find_boot_file(&rootfs.join("boot"), "vmlinuz-")?,
        work.join("vmlinuz"),
    )?;
    std::fs::copy(
        find_boot_file(&rootfs.join("boot"), "initrd.img-")?,
        work.join("initrd.img"),
    )?;
    for junk in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("rm -rf {}/{junk}/*", rootfs.display()))
            .status();
    }
    let size = du_mib(&rootfs)? * 13 / 10 + 256;
    run_cmd(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "mcroot", "-d"])
            .arg(&rootfs)
            .arg(work.join("rootfs.img"))
            .arg(format!("{size}M")),
    )?;
    run_cmd(sudo("rm").arg("-rf").arg(&rootfs))?;
    std::fs::write(work.join("ok"), recipe)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&work, &dir)?;
    eprintln!("rxe: VM image built in {:.0} s", t0.elapsed().as_secs_f64());
    Ok(image)
}

/// Executables from `cargo … --message-format=json` output.
fn executables(json: &str, tests_only: bool) -> Vec<PathBuf> {
    json.lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\""))
        .filter(|l| !tests_only || l.contains("\"test\":true"))
        .filter_map(|l| {
            let start = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = l[start..].find('"')? + start;
            Some(PathBuf::from(&l[start..end]))
        })
        .collect()
}

fn cargo_json(args: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace_root())
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .env("MOONCAKE_TEST_RDMA", "1")
        .stderr(Stdio::inherit())
        .output()
        .context("run cargo")?;
    ensure!(out.status.success(), "cargo {} failed", args.join(" "));
    Ok(executables(
        &String::from_utf8_lossy(&out.stdout),
        args[0] == "test",
    ))
}

fn build_payload(args: &RxeArgs, dir: &Path) -> anyhow::Result<PathBuf> {
    let stage = dir.join("payload");
    let bin = stage.join("bin");
    std::fs::create_dir_all(&bin)?;
    let run_tests = !args.bench_only;
    let run_bench = args.bench || args.bench_only;
    if run_tests {
        let tests = cargo_json(&[
            "test",
            "--release",
            "--no-run",
            "-p",
            "mooncake-transport-rdma",
        ])?;
        ensure!(!tests.is_empty(), "cargo built no test executables");
        for t in tests {
            let name = t
                .file_name()
                .context("test name")?
                .to_string_lossy()
                .to_string();
            std::fs::copy(&t, bin.join(format!("test-{name}")))?;
        }
    }
    if run_bench {
        let ex = cargo_json(&[
            "build",
            "--release",
            "-p",
            "mooncake-cli",
            "--features",
            "rdma",
            "--bin",
            "mooncake",
        ])?;
        let exe = ex
            .into_iter()
            .find(|p| p.file_name().is_some_and(|n| n == "mooncake"))
            .context("the mooncake CLI was not built")?;
        std::fs::copy(exe, bin.join("mooncake"))?;
    }
    let filter = args.filter.as_deref().unwrap_or("");
    let log = args.log.as_deref().unwrap_or("warn");
    let bench_env = args.bench_env.join(" ");
    for v in [filter, log, bench_env.as_str()] {
        ensure!(
            !v.contains(['\'', '"', '$', '`', '\\']),
            "--filter, --log and --bench-env must be plain words"
        );
    }
    ensure!(
        args.bench_env
            .iter()
            .all(|kv| kv.contains('=') && !kv.contains(' ')),
        "--bench-env takes KEY=VALUE"
    );
    let nocapture = if args.log.is_some() {
        "--nocapture"
    } else {
        ""
    };
    let script = format!(
        "RUN_TESTS={}\nRUN_BENCH={}\nFILTER='{filter}'\nRUST_LOG='{log}'\nNOCAPTURE='{nocapture}'\nBENCH_ENV='{bench_env}'\n{RUN_SH}",
        u8::from(run_tests),
        u8::from(run_bench)
    );
    std::fs::write(stage.join("run.sh"), script)?;
    let img = dir.join("payload.img");
    let size = du_mib(&stage)? * 12 / 10 + 64;
    run_cmd(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "payload", "-d"])
            .arg(&stage)
            .arg(&img)
            .arg(format!("{size}M")),
    )?;
    Ok(img)
}

struct VmOutput {
    exit: Option<i32>,
    lines: Vec<String>,
}

fn boot(args: &RxeArgs, image: &Image, payload: &Path) -> anyhow::Result<VmOutput> {
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
        ])
        .args(["-serial", "stdio", "-monitor", "none"])
        .args([
            "-smp",
            &args.cpus.to_string(),
            "-m",
            &args.memory_mib.to_string(),
        ])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args([
            "-append",
            "root=/dev/vda rw console=ttyS0 init=/sbin/mooncake-init panic=-1 quiet loglevel=3",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,snapshot=on",
            image.rootfs.display()
        ))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", payload.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_string();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(args.vm_timeout);
    let mut out = VmOutput {
        exit: None,
        lines: Vec::new(),
    };
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => {
                println!("vm| {line}");
                if let Some(code) = line.strip_prefix("MOONCAKE-RXE-EXIT=") {
                    out.exit = code.trim().parse().ok();
                }
                out.lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() > deadline {
                    eprintln!("rxe: VM ran past {} s; killing it", args.vm_timeout);
                    let _ = child.kill();
                    break;
                }
            }
        }
    }
    let st = child.wait()?;
    let _ = reader.join();
    if out.exit.is_none() {
        bail!(
            "the VM exited ({st}) without reporting a result: boot or guest setup failed (see the vm| lines)"
        );
    }
    Ok(out)
}

fn bench_report(lines: &[String]) -> Vec<String> {
    let field = |l: &str, k: &str| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(k).map(str::to_string))
            .unwrap_or_default()
    };
    // Best of the repeated runs of each side, per (op, size), in the order first seen.
    let mut keys: Vec<(String, String)> = Vec::new();
    let mut best = std::collections::HashMap::<(String, String, bool), f64>::new();
    for l in lines
        .iter()
        .filter(|l| l.starts_with("MOONCAKE-RXE-BENCH "))
    {
        let ours = l.starts_with("MOONCAKE-RXE-BENCH mooncake");
        let key = (field(l, "op="), field(l, "size="));
        let v: f64 = field(l, "gbps=").parse().unwrap_or(0.0);
        if !keys.contains(&key) {
            keys.push(key.clone());
        }
        let e = best.entry((key.0, key.1, ours)).or_insert(0.0);
        *e = e.max(v);
    }
    keys.into_iter()
        .map(|(op, size)| {
            let base = best.get(&(op.clone(), size.clone(), false)).copied().unwrap_or(0.0);
            let ours = best.get(&(op.clone(), size.clone(), true)).copied().unwrap_or(0.0);
            let ratio = if base > 0.0 { ours / base } else { 0.0 };
            let target = if op == "write" { 0.90 } else { 0.85 };
            format!(
                "{op:>5} {size:>8} B: mooncake {ours:8.3} Gb/s, ib_{op}_bw {base:8.3} Gb/s, ratio {ratio:5.2} (target {target:.2}){}",
                if ratio >= target { "" } else { "  BELOW TARGET" }
            )
        })
        .collect()
}

/// What the guest's libtest output says about the test binaries it ran.
#[derive(Debug, Default, PartialEq, Eq)]
struct TestReport {
    /// Binaries started (`MOONCAKE-RXE-STEP test …`).
    binaries: usize,
    /// Binaries that printed a `test result:` summary.
    summaries: usize,
    /// Tests passed in the device-test binaries (`tests/*.rs`: conformance, rxe).
    device_passed: usize,
    /// Tests passed in the other binaries (the crate's unit tests).
    other_passed: usize,
    failed: usize,
    /// Tests reported as ignored because they need RDMA devices: compiled without
    /// `MOONCAKE_TEST_RDMA=1`, they never ran.
    compiled_out: Vec<String>,
}

/// Removes ANSI colour escapes (`ESC [ … m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' && it.peek() == Some(&'[') {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn count_before(s: &str, word: &str) -> usize {
    s.split(';')
        .find_map(|part| {
            let part = part.trim().trim_start_matches("test result:").trim();
            let part = part.split_once('.').map_or(part, |(_, rest)| rest).trim();
            part.strip_suffix(word).and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Parses the libtest output of every test binary run in the guest.
fn test_report(lines: &[String]) -> TestReport {
    let mut r = TestReport::default();
    let mut device_binary = false;
    for raw in lines {
        let l = strip_ansi(raw);
        let l = l.trim();
        if let Some(path) = l.strip_prefix("MOONCAKE-RXE-STEP test ") {
            r.binaries += 1;
            let name = path.rsplit('/').next().unwrap_or(path);
            device_binary = name.starts_with("test-conformance") || name.starts_with("test-rxe");
        } else if l.starts_with("test result:") {
            r.summaries += 1;
            let passed = count_before(l, "passed");
            if device_binary {
                r.device_passed += passed;
            } else {
                r.other_passed += passed;
            }
            r.failed += count_before(l, "failed");
        } else if let Some(rest) = l.strip_prefix("test ")
            && let Some((name, verdict)) = rest.split_once(" ... ")
            && verdict.starts_with("ignored, needs RDMA devices")
        {
            r.compiled_out.push(name.to_string());
        }
    }
    r
}

/// Fails unless device tests really ran: at least one passed, none was compiled out.
fn check_tests_ran(r: &TestReport) -> anyhow::Result<()> {
    ensure!(
        r.compiled_out.is_empty(),
        "device tests were ignored in the VM (built without MOONCAKE_TEST_RDMA=1?): {:?}",
        r.compiled_out
    );
    ensure!(
        r.summaries == r.binaries,
        "{} test binaries started but {} reported a result",
        r.binaries,
        r.summaries
    );
    ensure!(
        r.device_passed > 0,
        "no device test passed in the VM (filter matched none, or none was built)"
    );
    Ok(())
}

/// Runs the soft-RoCE VM: builds the image if needed, builds and runs the RDMA tests (and the
/// benchmarks with `--bench`), and fails unless the guest reports success.
pub fn run(args: &RxeArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    ensure_host_tools()?;
    let image = ensure_image(args.rebuild_image)?;
    let t_image = t0.elapsed();
    let dir = cache_dir()?.join(format!("run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result =
        (|| {
            let payload = build_payload(args, &dir)?;
            let t_build = t0.elapsed();
            let out = boot(args, &image, &payload)?;
            eprintln!(
                "rxe: image {:.0} s, host build {:.0} s, VM {:.0} s",
                t_image.as_secs_f64(),
                (t_build - t_image).as_secs_f64(),
                (t0.elapsed() - t_build).as_secs_f64()
            );
            for l in out.lines.iter().filter(|l| {
                l.starts_with("MOONCAKE-RXE-FAILED") || l.starts_with("MOONCAKE-RXE-ERROR")
            }) {
                eprintln!("rxe: {l}");
            }
            let tests = if args.bench_only {
                None
            } else {
                let r = test_report(&out.lines);
                eprintln!(
                    "rxe: {} device tests passed, {} unit tests passed, {} failed ({} binaries)",
                    r.device_passed, r.other_passed, r.failed, r.binaries
                );
                Some(r)
            };
            let rows = bench_report(&out.lines);
            if !rows.is_empty() {
                println!("rxe: bandwidth over soft-RoCE (same VM, same device rxe0):");
                for r in rows {
                    println!("  {r}");
                }
            }
            match out.exit {
                Some(0) => tests.as_ref().map_or(Ok(()), check_tests_ran),
                Some(c) => bail!("RDMA tests failed in the VM (guest exit status {c})"),
                None => bail!("the VM reported no result"),
            }
        })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.lines().map(str::to_string).collect()
    }

    #[test]
    fn a_run_where_device_tests_passed_is_accepted() {
        let out = lines(
            "MOONCAKE-RXE-STEP test /work/bin/test-conformance-abc
test rdma::child_peer ... ignored, helper process of the conformance suite
test rdma::random_batches ... ok
test result: \u{1b}[32mok\u{1b}[m. 7 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1s
MOONCAKE-RXE-STEP test /work/bin/test-mooncake_transport_rdma-abc
test result: ok. 18 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s",
        );
        let r = test_report(&out);
        assert_eq!(r.device_passed, 7);
        assert_eq!(r.other_passed, 18);
        assert_eq!((r.binaries, r.summaries, r.failed), (2, 2, 0));
        check_tests_ran(&r).unwrap();
    }

    #[test]
    fn a_run_without_device_tests_is_refused() {
        // Built without the cfg: every device test is ignored, the run "passes".
        let out = lines(
            "MOONCAKE-RXE-STEP test /work/bin/test-rxe-abc
test random_batches_round_trip ... ignored, needs RDMA devices: run `cargo xtask rxe`
test result: ok. 0 passed; 0 failed; 6 ignored; 0 measured; 0 filtered out; finished in 0s",
        );
        let r = test_report(&out);
        assert_eq!(
            r.compiled_out,
            vec!["random_batches_round_trip".to_string()]
        );
        assert!(check_tests_ran(&r).is_err());
        // A filter that matches nothing.
        let out = lines(
            "MOONCAKE-RXE-STEP test /work/bin/test-rxe-abc
test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 6 filtered out; finished in 0s",
        );
        assert!(check_tests_ran(&test_report(&out)).is_err());
        // A binary that died without a summary.
        let out = lines(
            "MOONCAKE-RXE-STEP test /work/bin/test-rxe-abc
test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0s
MOONCAKE-RXE-STEP test /work/bin/test-conformance-abc",
        );
        assert!(check_tests_ran(&test_report(&out)).is_err());
    }
}
