//! `cargo xtask demo`: the README's first command. Until the daemon exists it runs the
//! narrated failover/failback of one volume on two nodes through the replication core
//! (`tandem-demo`, simulated disks and link); the daemon issue replaces it with real
//! file-backed nodes.

use anyhow::Result;
use clap::Args;

use crate::cmd::Cmd;

#[derive(Args, Default)]
pub struct DemoArgs {
    /// Replication mode
    #[arg(long, default_value = "memory", value_parser = ["memory", "disk"])]
    pub mode: String,
}

pub fn run(args: &DemoArgs) -> Result<()> {
    Cmd::cargo().args(["run", "--release", "-p", "tandem-sim", "--bin", "tandem-demo", "--", &args.mode]).run()
}
