//! `tandem-demo [memory|disk]`: the narrated failover/failback of `cargo xtask demo`.

use std::process::ExitCode;
use tandem_core::Mode;

fn main() -> ExitCode {
    let mode = match std::env::args().nth(1).as_deref() {
        None | Some("memory") => Mode::Memory,
        Some("disk") => Mode::Disk,
        Some(other) => {
            eprintln!("tandem-demo: unknown mode '{other}' (memory or disk)");
            return ExitCode::from(2);
        }
    };
    match tandem_sim::demo::run(mode) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
