//! `cargo xtask`: what needs more than `cargo test` — system packages, services (etcd,
//! redis), network namespaces and the soft-RoCE VM.
//!
//! - `cargo xtask deps`: installs the system packages the build and the tests need.
//! - `cargo xtask test`: deps, services (etcd, redis), every workspace test (all features), the examples,
//!   every fuzz target for 8 s (when nightly and cargo-fuzz are installed), and the RDMA tests in
//!   the soft-RoCE VM. The README's test command.
//! - `cargo xtask rxe`: only the VM part (see `rxe.rs`).
//! - `cargo xtask fuzz [--seconds N]`: every cargo-fuzz target for a bounded time (see `fuzz.rs`).
//! - `cargo xtask wheel`: the Python wheel (`crates/mooncake-py`, with GPU memory: feature
//!   `cuda`) with the `mooncake` binary bundled, into `target/wheels` (also built and tested
//!   by `cargo xtask test`).

mod apt;
mod fuzz;
mod rxe;
mod services;

use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "mooncake-rs development tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install the system packages needed to build and test everything.
    Deps,
    /// Run every test: workspace tests with real services, examples, and the VM tests.
    Test(TestArgs),
    /// Run the RDMA transport's tests (and benchmarks) in a soft-RoCE VM.
    Rxe(rxe::RxeArgs),
    /// Run every fuzz target for a bounded time (installs cargo-fuzz if missing).
    Fuzz(fuzz::FuzzArgs),
    /// Build the Python wheel (bundling the `mooncake` binary) into `target/wheels`.
    Wheel,
}

#[derive(Debug, clap::Args)]
struct TestArgs {
    /// Skip the soft-RoCE VM (for quick local runs; CI never passes this).
    #[arg(long)]
    no_vm: bool,
    /// Seconds each fuzz target runs after the tests (0: none). Fuzzing runs only when the
    /// nightly toolchain and cargo-fuzz are installed (`cargo xtask fuzz` installs them).
    #[arg(long, default_value_t = 8)]
    fuzz_seconds: u64,
    /// Extra arguments for `cargo test` (after `--`).
    #[arg(last = true)]
    cargo_args: Vec<String>,
}

/// Packages the build needs (protoc and protobuf's well-known `.proto` files for
/// etcd-client: Debian's `protobuf-compiler` ships without them, `libprotobuf-dev` has them;
/// cmake and clang for the RDMA verbs crate) and the tests need (iproute2 for namespaces, a
/// font for the plots).
const BUILD_DEPS: &[(&str, &str)] = &[
    ("protoc", "protobuf-compiler"),
    (
        "/usr/include/google/protobuf/descriptor.proto",
        "libprotobuf-dev",
    ),
    ("cmake", "cmake"),
    ("clang", "clang"),
    ("dpkg:libclang-dev", "libclang-dev"),
    ("pkg-config", "pkg-config"),
    ("ip", "iproute2"),
    (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "fonts-dejavu-core",
    ),
];

/// Integration tests that need root (network namespaces), ignored in a plain `cargo test`.
const ROOT_TESTS: &[(&str, &str)] = &[("mooncake-transport-tcp", "multipath")];

/// Examples that must run to completion.
const EXAMPLES: &[(&str, &str)] = &[
    ("mooncake", "tcp_transfer"),
    ("mooncake-store", "store_put_get"),
];

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn test(args: &TestArgs) -> anyhow::Result<()> {
    apt::ensure(BUILD_DEPS)?;
    // Real etcd and redis on loopback ports, stopped when `services` drops.
    let services = services::start()?;
    let mut cmd = cargo();
    cmd.envs(services.env());
    cmd.args(["test", "--workspace", "--all-features"]);
    cmd.env("MOONCAKE_REQUIRE_SERVICES", "1");
    if !args.cargo_args.is_empty() {
        cmd.arg("--").args(&args.cargo_args);
    }
    run(&mut cmd)?;
    drop(services);
    // Tests that need root (network namespaces) are ignored by default; run them here.
    for (pkg, test) in ROOT_TESTS {
        if is_root() {
            run(cargo().args([
                "test",
                "-p",
                pkg,
                "--all-features",
                "--test",
                test,
                "--",
                "--ignored",
            ]))?;
        } else {
            eprintln!("xtask: not root: {pkg} --test {test} (network namespaces) was NOT run");
        }
    }
    for (pkg, example) in EXAMPLES {
        run(cargo().args(["run", "--quiet", "-p", pkg, "--example", example]))?;
    }
    python_tests()?;
    if args.fuzz_seconds == 0 {
        eprintln!("xtask: --fuzz-seconds 0: the fuzz targets were NOT run");
    } else if fuzz::tools_present() {
        fuzz::run(&fuzz::FuzzArgs::bounded(args.fuzz_seconds))?;
    } else {
        eprintln!(
            "xtask: the nightly toolchain or cargo-fuzz is missing: the fuzz targets were NOT \
             run (`cargo xtask fuzz` installs both)"
        );
    }
    if args.no_vm {
        eprintln!("xtask: --no-vm given: the soft-RoCE VM tests were NOT run");
    } else {
        rxe::run(&rxe::RxeArgs::default())?;
    }
    eprintln!("xtask: all tests passed");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Deps => {
            apt::ensure(BUILD_DEPS)?;
            python_venv().map(drop)
        }
        Cmd::Test(a) => test(&a),
        Cmd::Rxe(a) => rxe::run(&a),
        Cmd::Fuzz(a) => fuzz::run(&a),
        Cmd::Wheel => wheel(&python_venv()?).map(drop),
    }
}

/// Python packages of the Python suite, installed into the cached venv.
const PY_PACKAGES: &[&str] = &["maturin>=1.5,<2", "numpy", "pytest"];

/// The venv the Python suite runs in (outside the repo, reused between runs):
/// `$MOONCAKE_PY_VENV` or `~/.cache/mooncake-rs/venv`, with maturin, numpy and pytest.
fn python_venv() -> anyhow::Result<std::path::PathBuf> {
    let venv = match std::env::var_os("MOONCAKE_PY_VENV") {
        Some(v) => std::path::PathBuf::from(v),
        None => std::path::PathBuf::from(std::env::var("HOME").context("HOME is not set")?)
            .join(".cache/mooncake-rs/venv"),
    };
    let py = venv.join("bin/python");
    if !py.exists() {
        if Command::new("python3")
            .args(["-c", "import venv, ensurepip"])
            .status()
            .map_or(true, |s| !s.success())
        {
            apt::install(&["python3-venv", "python3-pip"])?;
        }
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    let have = Command::new(&py)
        .args(["-c", "import maturin, numpy, pytest"])
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        run(Command::new(&py)
            .args(["-m", "pip", "install", "--quiet", "--upgrade"])
            .args(PY_PACKAGES))?;
    }
    Ok(py)
}

/// The workspace root (xtask's parent folder).
fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

/// The cargo target directory (`CARGO_TARGET_DIR`, else `target` at the root).
fn target_dir() -> std::path::PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => root().join(t),
        None => root().join("target"),
    }
}

/// Cargo features of the bundled `mooncake` binary: those of the extension, which maturin
/// takes from `[tool.maturin] features` in `crates/mooncake-py/pyproject.toml` (GPU memory:
/// CUDA is loaded at run time, so the wheel still imports and runs without a driver).
const WHEEL_FEATURES: &str = "cuda";

/// Builds the `mooncake` binary, bundles it into the package and builds the wheel with
/// maturin; returns the wheel's path.
fn wheel(py: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "mooncake-cli",
        "--features",
        WHEEL_FEATURES,
        "--bin",
        "mooncake",
    ]))?;
    let target = target_dir();
    let bin_dir = root().join("crates/mooncake-py/python/mooncake/_bin");
    std::fs::create_dir_all(&bin_dir)?;
    std::fs::copy(target.join("release/mooncake"), bin_dir.join("mooncake"))
        .context("bundling the mooncake binary")?;
    // The release profile keeps line tables (for profiling); the wheel does not need them.
    // Best effort: without binutils' `strip` the wheel is only larger.
    let _ = Command::new("strip")
        .arg("--strip-debug")
        .arg(bin_dir.join("mooncake"))
        .status();
    let out = target.join("wheels");
    let _ = std::fs::remove_dir_all(&out);
    run(Command::new(py)
        .args(["-m", "maturin", "build", "--release", "-m"])
        .arg(root().join("crates/mooncake-py/Cargo.toml"))
        .arg("--interpreter")
        .arg(py)
        .arg("--out")
        .arg(&out))?;
    let wheel = std::fs::read_dir(&out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("maturin left no wheel")?;
    eprintln!("xtask: wheel {}", wheel.display());
    Ok(wheel)
}

/// Builds the wheel, installs it into the cached venv and runs the Python suite.
fn python_tests() -> anyhow::Result<()> {
    let py = python_venv()?;
    let wheel = wheel(&py)?;
    run(Command::new(&py)
        .args(["-m", "pip", "install", "--quiet"])
        .args(["--force-reinstall", "--no-deps"])
        .arg(&wheel))?;
    // Run from the tests folder so `import mooncake` is the installed wheel, not the source.
    run(Command::new(&py)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "."])
        .current_dir(root().join("crates/mooncake-py/tests")))
}
