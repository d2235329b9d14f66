//! A deterministic simulator for `tandem-core`.
//!
//! From one seed it builds a cluster of nodes with simulated disks (volatile caches lost on
//! a crash, I/O completing in any order, media errors) and simulated links (in-order per
//! connection, variable delay, resets, silent partitions), runs a random host workload with
//! crashes, partitions, failovers and failbacks, heals everything, and checks the
//! invariants of DESIGN.md: 1 (no acknowledged write lost, in runs of single failures),
//! 2 (record covers divergence, checked at every local write of a primary and by the final
//! comparison), 3 (resync ends with identical replicas) and 5 (split brains are detected).

pub mod demo;
mod disk;
pub mod scenarios;
mod truth;
mod world;

use std::fmt;
use tandem_core::node::PlantedBugs;
use tandem_core::Mode;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultClass {
    /// One fault at a time (a node crash, a disk error or a link cut), the next only once
    /// the cluster is healthy again; failover only when the primary is really down. The
    /// runs where invariant 1 must hold.
    Single,
    /// Faults on top of faults, promotions without fencing (split brains). Acknowledged
    /// writes may be lost; divergence must still be recorded, detected and resynced.
    Chaos,
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub nodes: usize,
    pub mode: Mode,
    pub steps: usize,
    pub faults: FaultClass,
    pub bugs: PlantedBugs,
    /// Check invariant 2 at every local write of a primary (white-box). Without it only the
    /// black-box checks remain: lost acknowledged writes and differing replicas at the end.
    pub live_record_check: bool,
    /// Media errors on local writes (scripted scenarios turn them off).
    pub disk_faults: bool,
    pub verbose: bool,
}

impl SimConfig {
    pub fn new(mode: Mode, faults: FaultClass) -> Self {
        SimConfig {
            nodes: 2,
            mode,
            steps: 300,
            faults,
            bugs: PlantedBugs::default(),
            live_record_check: true,
            disk_faults: true,
            verbose: false,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub events: u64,
    pub messages: u64,
    pub host_writes: u64,
    pub acknowledged: u64,
    pub crashes: u64,
    pub resyncs: u64,
    pub split_brains: u64,
    /// Tracks compared by online verifies (their `VerifyReply`s delivered).
    pub verified_tracks: u64,
}

#[derive(Clone, Debug)]
pub struct Failure {
    pub seed: u64,
    pub config: String,
    pub invariant: &'static str,
    pub detail: String,
    pub trace: Vec<String>,
    /// `--nodes` and `--faults` as the failing run had them.
    pub replay_args: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "seed {} ({}) broke invariant {}: {}", self.seed, self.config, self.invariant, self.detail)?;
        writeln!(f, "last events:")?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        write!(f, "replay: cargo xtask sim --seed {} {} --verbose", self.seed, self.replay_args)
    }
}

/// Runs one seeded schedule and checks the invariants.
pub fn run(seed: u64, cfg: &SimConfig) -> Result<Summary, Failure> {
    let mut world = world::World::new(seed, cfg.clone());
    match world.run() {
        Ok(()) => Ok(world.summary.clone()),
        Err((invariant, detail)) => Err(Failure {
            seed,
            config: format!("{:?} mode, {:?} faults, {} nodes", cfg.mode, cfg.faults, cfg.nodes),
            invariant,
            detail,
            trace: world.trace(),
            replay_args: format!(
                "--nodes {} --faults {}",
                cfg.nodes,
                match cfg.faults {
                    FaultClass::Single => "single",
                    FaultClass::Chaos => "chaos",
                }
            ),
        }),
    }
}

/// The configuration a seed runs under when a batch mixes modes and fault classes.
pub fn config_for_seed(seed: u64, nodes: usize, steps: usize) -> SimConfig {
    let mode = if seed.is_multiple_of(2) { Mode::Memory } else { Mode::Disk };
    let faults = if (seed / 2) % 3 == 2 { FaultClass::Chaos } else { FaultClass::Single };
    SimConfig { nodes, steps, ..SimConfig::new(mode, faults) }
}
