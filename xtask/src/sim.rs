//! `cargo xtask sim`: run the deterministic simulator.

use anyhow::Result;
use clap::Args;

use crate::cmd::Cmd;

/// Seeds `cargo xtask test` runs on every CI build: two nodes through single and
/// overlapping failures (mixed by seed), then three nodes through single failures.
/// Three nodes under overlapping failures still fail about 2 seeds in 1,000 (see
/// docs/protocol.md, section 9), so that class is not in the CI budget yet.
pub const SIM_CI_SEEDS: u64 = 2000;
pub const SIM_CI_SEEDS_THREE_NODES: u64 = 500;

#[derive(Args, Default)]
pub struct SimArgs {
    /// Number of seeded runs
    #[arg(long)]
    pub seeds: Option<u64>,
    /// Replay one seed
    #[arg(long)]
    pub seed: Option<u64>,
    /// Nodes per simulated volume
    #[arg(long, value_parser = clap::value_parser!(u8).range(2..=3))]
    pub nodes: Option<u8>,
    /// Fault schedules: single (one failure at a time), chaos, or mixed by seed
    #[arg(long, value_parser = ["single", "chaos", "mixed"])]
    pub faults: Option<String>,
    /// Print every event
    #[arg(long)]
    pub verbose: bool,
}

impl SimArgs {
    fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(seeds) = self.seeds {
            args.extend(["--seeds".to_string(), seeds.to_string()]);
        }
        if let Some(seed) = self.seed {
            args.extend(["--seed".to_string(), seed.to_string()]);
        }
        if let Some(nodes) = self.nodes {
            args.extend(["--nodes".to_string(), nodes.to_string()]);
        }
        if let Some(faults) = &self.faults {
            args.extend(["--faults".to_string(), faults.clone()]);
        }
        if self.verbose {
            args.push("--verbose".to_string());
        }
        args
    }
}

pub fn run(args: &SimArgs) -> Result<()> {
    Cmd::cargo().args(["run", "--release", "-p", "tandem-sim", "--bin", "tandem-sim", "--"]).args(args.to_args()).run()
}

/// The simulator budget of `cargo xtask test`.
pub fn run_ci() -> Result<()> {
    run(&SimArgs { seeds: Some(SIM_CI_SEEDS), ..SimArgs::default() })?;
    run(&SimArgs {
        seeds: Some(SIM_CI_SEEDS_THREE_NODES),
        nodes: Some(3),
        faults: Some("single".into()),
        ..SimArgs::default()
    })
}
