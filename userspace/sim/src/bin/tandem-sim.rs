//! `tandem-sim --seeds N [--seed S] [--nodes 2|3] [--steps K] [--verbose]`: runs seeded
//! schedules of the simulator and reports failures with a replayable seed.

use std::process::ExitCode;
use std::time::Instant;
use tandem_sim::{config_for_seed, run, FaultClass};

struct Args {
    seeds: u64,
    seed: Option<u64>,
    first: u64,
    nodes: usize,
    steps: usize,
    class: Option<FaultClass>,
    verbose: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args { seeds: 200, seed: None, first: 1, nodes: 2, steps: 300, class: None, verbose: false };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            let v = it.next().ok_or(format!("{name} needs a value"))?;
            v.parse().map_err(|_| format!("{name}: '{v}' is not a number"))
        };
        match arg.as_str() {
            "--seeds" => a.seeds = value("--seeds")?,
            "--seed" => a.seed = Some(value("--seed")?),
            "--first" => a.first = value("--first")?,
            "--nodes" => a.nodes = value("--nodes")? as usize,
            "--steps" => a.steps = value("--steps")? as usize,
            "--verbose" => a.verbose = true,
            "--faults" => {
                a.class = match it.next().as_deref() {
                    Some("single") => Some(FaultClass::Single),
                    Some("chaos") => Some(FaultClass::Chaos),
                    Some("mixed") => None,
                    other => return Err(format!("--faults: expected single, chaos or mixed, got {other:?}")),
                }
            }
            "-h" | "--help" => {
                return Err(
                    "usage: tandem-sim [--seeds N] [--first S] [--seed S] [--nodes 2|3] [--faults single|chaos|mixed] [--steps K] [--verbose]".into()
                )
            }
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    if !(2..=3).contains(&a.nodes) {
        return Err(format!("--nodes {}: the simulator drives 2 or 3 nodes", a.nodes));
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tandem-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let seeds: Vec<u64> = match args.seed {
        Some(s) => vec![s],
        None => (args.first..args.first + args.seeds).collect(),
    };
    let started = Instant::now();
    let (mut failed, mut events, mut acked, mut crashes, mut splits, mut verified) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    for &seed in &seeds {
        let mut cfg = config_for_seed(seed, args.nodes, args.steps);
        cfg.verbose = args.verbose;
        if let Some(class) = args.class {
            cfg.faults = class;
        }
        match run(seed, &cfg) {
            Ok(s) => {
                events += s.events;
                acked += s.acknowledged;
                crashes += s.crashes;
                splits += s.split_brains;
                verified += s.verified_tracks;
            }
            Err(f) => {
                failed += 1;
                eprintln!("{f}\n");
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "sim: {} runs, {} failed, {} events, {} acknowledged writes, {} crashes, {} split brains refused, {} tracks verified, {:.0} runs/s",
        seeds.len(),
        failed,
        events,
        acked,
        crashes,
        splits,
        verified,
        seeds.len() as f64 / secs.max(1e-9)
    );
    println!("sim: {} passed, {} failed", seeds.len() as u64 - failed, failed);
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
