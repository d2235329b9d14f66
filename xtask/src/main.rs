//! `cargo xtask`: the project's developer and CI commands.
//!
//! `cargo xtask test` is the one test command (CI runs it through `.ci/run`).

mod apt;
mod bench;
mod bench_ebpf;
mod cluster;
mod cmd;
mod demo;
mod fuzz;
mod paths;
mod sim;
mod test;
mod tools;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", about = "Tandem's developer and CI tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// The main job: a narrated failover and failback of one replicated volume on two nodes
    Demo(demo::DemoArgs),
    /// fio on the replicated device (0 and 1 ms RTT) vs the same device unreplicated, both modes (root);
    /// `bench ebpf`: the cost of the eBPF write recording
    Bench(BenchArgs),
    /// Install missing tools, then run fmt, clippy, all tests and the simulator budget (CI runs this)
    Test,
    /// Run the deterministic simulator (`tandem-sim`, release build)
    Sim(sim::SimArgs),
    /// Fuzz the wire decoder with cargo-fuzz on the nightly toolchain
    Fuzz(fuzz::FuzzArgs),
    /// Boot Debian's 6.12 kernel under QEMU with the host's root visible and run a guest scenario (root)
    VmTest(vm::VmTestArgs),
    /// The bench table in the guest: Tandem (memory, disk) on ublk and DRBD (B, C), as ratios against the raw device (root)
    VmBench(vm::bench::VmBenchArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(subcommand)]
    what: Option<BenchWhat>,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// 4 KiB random direct writes on a loop device with and without the eBPF programs (each
    /// flavour), as IOPS ratios measured in the same interleaved run (root)
    Ebpf(bench_ebpf::EbpfArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Demo(args) => demo::run(&args),
        Task::Bench(BenchArgs { what: None }) => bench::run(),
        Task::Bench(BenchArgs { what: Some(BenchWhat::Ebpf(args)) }) => bench_ebpf::run(&args),
        Task::Test => test::run(),
        Task::Sim(args) => sim::run(&args),
        Task::Fuzz(args) => fuzz::run(&args),
        Task::VmTest(args) => vm::run(&args),
        Task::VmBench(args) => vm::bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
