//! `cargo xtask fuzz [--seconds N] [--target NAME]…`: runs every cargo-fuzz target in `fuzz/`
//! for a bounded time each, installing cargo-fuzz (from crates.io) and the nightly toolchain
//! when they are missing, and prints what each run did (executions, corpus, findings).
//!
//! A target that finds a crash fails the command; the reproducer is left in
//! `fuzz/artifacts/<target>/` (`cargo +nightly fuzz run <target> <file>` replays it). Corpora
//! grow in `fuzz/corpus/<target>/` and are reused by later runs. Builds go to
//! `$CARGO_TARGET_DIR/fuzz` when `CARGO_TARGET_DIR` is set, else to `fuzz/target`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};

/// Arguments of `cargo xtask fuzz`.
#[derive(Debug, clap::Args)]
pub(crate) struct FuzzArgs {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Run only these targets (repeatable; default: every target `cargo fuzz list` shows).
    #[arg(long = "target")]
    targets: Vec<String>,
}

impl FuzzArgs {
    /// Every target for `seconds` each.
    pub(crate) fn bounded(seconds: u64) -> Self {
        Self {
            seconds,
            targets: Vec::new(),
        }
    }
}

/// Whether the nightly toolchain and cargo-fuzz are installed (nothing is installed).
pub(crate) fn tools_present() -> bool {
    has_nightly() && has_cargo_fuzz()
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

/// A `cargo +nightly fuzz …` command in the workspace root.
fn cargo_fuzz() -> Command {
    let mut c = Command::new("cargo");
    c.arg("+nightly").arg("fuzz").current_dir(root());
    // The toolchain override above must win over a `RUSTUP_TOOLCHAIN` inherited from the
    // `cargo xtask` invocation.
    c.env_remove("RUSTUP_TOOLCHAIN");
    c.env_remove("CARGO");
    c
}

fn target_dir_args() -> Vec<String> {
    match std::env::var("CARGO_TARGET_DIR") {
        Ok(d) if !d.is_empty() => vec!["--target-dir".into(), format!("{d}/fuzz")],
        _ => Vec::new(),
    }
}

/// Where `cargo fuzz build` puts its output (see [`target_dir_args`]).
fn fuzz_target_dir() -> PathBuf {
    match std::env::var("CARGO_TARGET_DIR") {
        Ok(d) if !d.is_empty() => PathBuf::from(d).join("fuzz"),
        _ => root().join("fuzz").join("target"),
    }
}

fn has_nightly() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn has_cargo_fuzz() -> bool {
    cargo_fuzz()
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs what fuzzing needs when it is missing.
fn ensure_tools() -> anyhow::Result<()> {
    if !has_nightly() {
        eprintln!("xtask: installing the nightly toolchain (cargo-fuzz needs it)");
        crate::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    if !has_cargo_fuzz() {
        eprintln!("xtask: installing cargo-fuzz from crates.io");
        crate::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

/// What one libFuzzer run reported.
#[derive(Debug, Default)]
struct Outcome {
    execs: Option<u64>,
    corpus: Option<u64>,
    coverage: Option<u64>,
}

/// Reads the `-print_final_stats=1` lines and the last status line.
fn parse(log: &str) -> Outcome {
    let mut o = Outcome::default();
    let num = |s: &str| s.trim().parse::<u64>().ok();
    for line in log.lines() {
        if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
            o.execs = num(v);
        }
        // "#12345  DONE   cov: 321 ft: 654 corp: 87/2345b …" or a pulse/NEW line.
        let mut words = line.split_whitespace();
        while let Some(w) = words.next() {
            match w {
                "cov:" => o.coverage = words.next().and_then(num).or(o.coverage),
                "corp:" => {
                    o.corpus = words
                        .next()
                        .and_then(|c| c.split('/').next())
                        .and_then(num)
                        .or(o.corpus)
                }
                _ => {}
            }
        }
    }
    o
}

/// Runs `cargo xtask fuzz`.
pub(crate) fn run(args: &FuzzArgs) -> anyhow::Result<()> {
    ensure_tools()?;
    let targets = if args.targets.is_empty() {
        let out = cargo_fuzz()
            .arg("list")
            .output()
            .context("cargo fuzz list")?;
        if !out.status.success() {
            bail!(
                "cargo fuzz list failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    } else {
        args.targets.clone()
    };
    // One build for every target (release with debug assertions, sanitizer on).
    let mut build = cargo_fuzz();
    build.arg("build").args(target_dir_args());
    crate::run(&mut build)?;
    let logs = root().join("fuzz").join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for t in &targets {
        let log_path = logs.join(format!("{t}.log"));
        let log = std::fs::File::create(&log_path)?;
        eprintln!("xtask: fuzzing {t} for {} s", args.seconds);
        let started = Instant::now();
        let flags = [
            format!("-max_total_time={}", args.seconds),
            "-print_final_stats=1".to_string(),
            // Small inputs: every decoder here takes bytes from one read or one frame.
            "-max_len=16384".to_string(),
        ];
        // The binary `cargo fuzz build` made, run directly with what `cargo fuzz run` would
        // pass (saves a build check per target); `cargo fuzz run` where it is not found.
        let bin = fuzz_target_dir()
            .join("x86_64-unknown-linux-gnu")
            .join("release")
            .join(t);
        let mut cmd = if bin.is_file() {
            let corpus = root().join("fuzz").join("corpus").join(t);
            let artifacts = root().join("fuzz").join("artifacts").join(t);
            std::fs::create_dir_all(&corpus)?;
            std::fs::create_dir_all(&artifacts)?;
            let mut c = Command::new(&bin);
            c.current_dir(root())
                .arg(format!("-artifact_prefix={}/", artifacts.display()))
                .args(&flags)
                .arg(&corpus);
            c
        } else {
            let mut c = cargo_fuzz();
            c.args(["run", t.as_str()])
                .args(target_dir_args())
                .arg("--")
                .args(&flags);
            c
        };
        let status = cmd
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .with_context(|| format!("cannot run the fuzz target {t}"))?;
        let secs = started.elapsed().as_secs_f64();
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let o = parse(&text);
        let verdict = if status.success() {
            "ok".to_string()
        } else {
            failed.push(t.clone());
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            eprintln!(
                "xtask: {t} FAILED ({status}); log {}:\n{}",
                log_path.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            format!("FAILED ({status}); artifacts in fuzz/artifacts/{t}/")
        };
        rows.push((t.clone(), secs, o, verdict));
    }
    eprintln!("\nxtask: fuzz summary ({} s per target)", args.seconds);
    eprintln!(
        "{:<28} {:>7} {:>14} {:>10} {:>8} {:>8}  result",
        "target", "wall s", "execs", "execs/s", "cov", "corpus"
    );
    for (t, secs, o, verdict) in &rows {
        let show = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
        let rate = o.execs.map_or("?".to_string(), |e| {
            format!("{:.0}", e as f64 / args.seconds.max(1) as f64)
        });
        eprintln!(
            "{t:<28} {secs:>7.1} {:>14} {rate:>10} {:>8} {:>8}  {verdict}",
            show(o.execs),
            show(o.coverage),
            show(o.corpus),
        );
    }
    if !failed.is_empty() {
        bail!("fuzz targets found crashes: {}", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libfuzzer_output() {
        let log = "#2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                   #4096\tpulse  cov: 120 ft: 300 corp: 44/900b lim: 43 exec/s: 2048 rss: 40Mb\n\
                   Done 123456 runs in 15 second(s)\n\
                   stat::number_of_executed_units: 123456\n";
        let o = parse(log);
        assert_eq!(
            (o.execs, o.coverage, o.corpus),
            (Some(123456), Some(120), Some(44))
        );
    }
}
