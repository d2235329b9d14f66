//! `cargo xtask test`: the project's one test command, run by CI on a fresh Debian 12 machine.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

use crate::apt;
use crate::cmd::Cmd;
use crate::sim;
use crate::tools::{ensure_cargo_tool, ensure_component};

/// How the tests are run: with nextest when it could be found or installed.
#[derive(Clone, Copy)]
enum Runner {
    Nextest,
    CargoTest,
}

pub fn run() -> Result<()> {
    let mut timings: Vec<(&str, Duration)> = Vec::new();
    let mut runner = Runner::CargoTest;

    let result = (|| -> Result<()> {
        step(&mut timings, "tools", || {
            runner = ensure_tools()?;
            Ok(())
        })?;
        step(&mut timings, "fmt", fmt_check)?;
        step(&mut timings, "clippy", || {
            Cmd::cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]).run()
        })?;
        step(&mut timings, "test", || run_tests(runner))?;
        step(&mut timings, "sim", sim::run_ci)?;
        step(&mut timings, "vm", vm_test)
    })();

    println!("==> summary");
    for (name, elapsed) in &timings {
        println!("{name:<8} {:>8.1}s", elapsed.as_secs_f64());
    }
    result?;
    println!("xtask test: all steps passed");
    Ok(())
}

/// The guest suite (ublk, device-mapper, LVM on Debian's kernel under QEMU). As root it must
/// run: a machine that cannot boot the guest fails CI instead of skipping it. Without root it
/// says why it skips.
fn vm_test() -> Result<()> {
    use clap::Parser;
    #[derive(Parser)]
    struct Defaults {
        #[command(flatten)]
        args: crate::vm::VmTestArgs,
    }
    let mut argv = vec!["vm-test"];
    if crate::tools::is_root()? {
        argv.push("--require");
    }
    crate::vm::run(&Defaults::parse_from(argv).args)
}

/// Run one named step: header, timing, and an error that says which step failed.
fn step<'a>(timings: &mut Vec<(&'a str, Duration)>, name: &'a str, body: impl FnOnce() -> Result<()>) -> Result<()> {
    println!("==> {name}");
    let start = Instant::now();
    let result = body();
    timings.push((name, start.elapsed()));
    result.map_err(|error| anyhow!("xtask test: step `{name}` failed: {error:#}"))
}

fn fmt_check() -> Result<()> {
    let mut fmt = Cmd::cargo().args(["fmt", "--all", "--", "--check"]);
    // rustfmt colours its diffs even into a log file; CI asks for none.
    if std::env::var("CARGO_TERM_COLOR").is_ok_and(|color| color == "never") {
        fmt = fmt.args(["--color", "never"]);
    }
    fmt.run()
}

fn ensure_tools() -> Result<Runner> {
    apt::ensure_packages()?;
    ensure_component("fmt", "rustfmt")?;
    ensure_component("clippy", "clippy")?;
    match ensure_cargo_tool("nextest", "cargo-nextest") {
        Ok(()) => Ok(Runner::Nextest),
        Err(error) => {
            println!(
                "warning: no cargo-nextest ({error:#}); falling back to `cargo test`, which prints no nextest summary"
            );
            Ok(Runner::CargoTest)
        }
    }
}

fn run_tests(runner: Runner) -> Result<()> {
    match runner {
        Runner::Nextest => {
            // Doc tests first, so the log's last test summary is nextest's, with the count.
            Cmd::cargo().args(["test", "--workspace", "--doc"]).run()?;
            Cmd::cargo().args(["nextest", "run", "--workspace", "--no-fail-fast"]).run()
        }
        Runner::CargoTest => Cmd::cargo().args(["test", "--workspace", "--no-fail-fast"]).run(),
    }
}
