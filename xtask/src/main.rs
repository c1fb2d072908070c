//! `cargo xtask`: what needs more than `cargo test` — system packages, services (etcd,
//! redis), network namespaces and the soft-RoCE VM.
//!
//! - `cargo xtask deps`: installs the system packages the build and the tests need.
//! - `cargo xtask test`: deps, services (etcd, redis), every workspace test (all features), the examples,
//!   and the RDMA tests in the soft-RoCE VM. The README's test command.
//! - `cargo xtask rxe`: only the VM part (see `rxe.rs`).

mod apt;
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
}

#[derive(Debug, clap::Args)]
struct TestArgs {
    /// Skip the soft-RoCE VM (for quick local runs; CI never passes this).
    #[arg(long)]
    no_vm: bool,
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
const EXAMPLES: &[(&str, &str)] = &[("mooncake", "tcp_transfer")];

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
            run(cargo().args(["test", "-p", pkg, "--all-features", "--test", test, "--", "--ignored"]))?;
        } else {
            eprintln!("xtask: not root: {pkg} --test {test} (network namespaces) was NOT run");
        }
    }
    for (pkg, example) in EXAMPLES {
        run(cargo().args(["run", "--quiet", "-p", pkg, "--example", example]))?;
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
        Cmd::Deps => apt::ensure(BUILD_DEPS),
        Cmd::Test(a) => test(&a),
        Cmd::Rxe(a) => rxe::run(&a),
    }
}
