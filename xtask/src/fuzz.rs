//! `cargo xtask fuzz`: fuzz the wire decoder (not part of `cargo xtask test`).

use anyhow::Result;
use clap::Args;

use crate::cmd::Cmd;
use crate::tools::{ensure_cargo_tool, ensure_nightly};

const TARGET: &str = "wire_decode";

#[derive(Args)]
pub struct FuzzArgs {
    /// How long to fuzz
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
}

pub fn run(args: &FuzzArgs) -> Result<()> {
    ensure_nightly()?;
    ensure_cargo_tool("fuzz", "cargo-fuzz")?;
    Cmd::cargo()
        .args(["+nightly", "fuzz", "run", TARGET, "--fuzz-dir", "fuzz", "--"])
        .arg(format!("-max_total_time={}", args.seconds))
        .env("RUSTUP_AUTO_INSTALL", "0")
        .run()
}
