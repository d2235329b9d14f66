//! Developer tools: rustup components, cargo-installed binaries, the nightly toolchain.

use anyhow::{bail, Context, Result};

use crate::cmd::Cmd;

/// Add the rustup component `component` unless `cargo <subcommand> --version` already works.
pub fn ensure_component(subcommand: &str, component: &str) -> Result<()> {
    if Cmd::cargo().args([subcommand, "--version"]).succeeds() {
        return Ok(());
    }
    Cmd::new("rustup")
        .args(["component", "add", component])
        .run()
        .with_context(|| format!("`cargo {subcommand}` is missing and rustup could not add it"))
}

/// Whether `cargo <subcommand>` works, installing `crate_name` with `cargo install` if not.
pub fn ensure_cargo_tool(subcommand: &str, crate_name: &str) -> Result<()> {
    if Cmd::cargo().args([subcommand, "--version"]).succeeds() {
        return Ok(());
    }
    Cmd::cargo()
        .args(["install", crate_name, "--locked"])
        .run()
        .with_context(|| format!("could not install {crate_name}"))?;
    if !Cmd::cargo().args([subcommand, "--version"]).succeeds() {
        bail!("installed {crate_name}, but `cargo {subcommand}` still does not run (is ~/.cargo/bin on PATH?)");
    }
    Ok(())
}

/// Fail unless rustup already has a nightly toolchain; never downloads one.
pub fn ensure_nightly() -> Result<()> {
    let list = Cmd::new("rustup").args(["toolchain", "list"]).stdout()?;
    if list.lines().any(|line| line.trim_start().starts_with("nightly")) {
        return Ok(());
    }
    bail!("no nightly toolchain installed (cargo-fuzz needs one); install it with `rustup toolchain install nightly`")
}

/// Whether we run as root (effective uid 0).
pub fn is_root() -> Result<bool> {
    Ok(Cmd::new("id").arg("-u").stdout()?.trim() == "0")
}
