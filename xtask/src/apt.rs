//! Installing Debian packages when the commands they provide are missing.

use std::process::Command;

use anyhow::{Context, bail};

/// True if `binary` is on the PATH (or, for a path with a `/`, if that file exists; for
/// `dpkg:NAME`, if that package is installed).
pub(crate) fn has(binary: &str) -> bool {
    if let Some(pkg) = binary.strip_prefix("dpkg:") {
        return Command::new("dpkg")
            .args(["-s", pkg])
            .output()
            .is_ok_and(|o| {
                o.status.success()
                    && String::from_utf8_lossy(&o.stdout).contains("Status: install ok installed")
            });
    }
    if binary.contains('/') {
        return std::path::Path::new(binary).exists();
    }
    Command::new("sh")
        .args(["-c", &format!("command -v {binary}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs the package of every `(binary, package)` pair whose binary is missing.
pub(crate) fn ensure(pairs: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = pairs
        .iter()
        .filter(|(b, _)| !has(b))
        .map(|(_, p)| *p)
        .collect();
    install(&missing)
}

/// `apt-get update` once, then `apt-get install -y` the packages (no-op when empty).
pub(crate) fn install(packages: &[&str]) -> anyhow::Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", packages.join(" "));
    let update = Command::new("apt-get")
        .arg("update")
        .status()
        .context("cannot run apt-get (is this Debian?)")?;
    if !update.success() {
        bail!("apt-get update failed ({update}); are you root?");
    }
    let st = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("cannot run apt-get")?;
    if !st.success() {
        bail!("apt-get install {} failed ({st})", packages.join(" "));
    }
    Ok(())
}
