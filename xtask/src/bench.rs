//! `cargo xtask bench`: fio on the replicated device against the same frontend and store
//! without a peer (the volume unreplicated), in `memory` and `disk` modes, with the nodes on
//! loopback (≈ 0 RTT) and with a 1 ms round trip between them (a forwarder delaying each
//! direction by 0.5 ms, `tandem_testnet::link::Link`); printed as ratios measured in the
//! same run. Needs root (FUSE, loop devices) and fio (installed with apt).

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tandem_testnet::link::Link;

use crate::cluster::{free_port, wait, Node, Volume};
use crate::cmd::Cmd;
use crate::paths::target_dir;
use crate::tools::is_root;

const SIZE: &str = "512MiB";
const RUNTIME_S: u32 = 8;

struct Job {
    name: &'static str,
    args: &'static [&'static str],
}

const JOBS: &[Job] = &[
    Job { name: "4k randwrite QD1", args: &["--rw=randwrite", "--bs=4k", "--iodepth=1"] },
    Job { name: "4k randwrite QD32", args: &["--rw=randwrite", "--bs=4k", "--iodepth=32"] },
    Job { name: "1M seq write", args: &["--rw=write", "--bs=1M", "--iodepth=4"] },
];

/// What one fio job measured.
#[derive(Clone, Copy, Debug)]
struct Result1 {
    iops: f64,
    bw_mib: f64,
    p50_us: f64,
}

/// How a benched volume is replicated.
#[derive(Clone, Copy)]
enum Setup {
    /// No peer: the same frontend and store as a plain local disk.
    Alone,
    /// Two nodes on loopback.
    Replicated,
    /// Two nodes on loopback, node 0 dialing node 1 through a forwarder that delays every
    /// chunk by this much each way.
    Delayed(Duration),
}

impl Setup {
    fn label(self) -> String {
        match self {
            Setup::Alone => "unreplicated".into(),
            Setup::Replicated => "replicated, 0 RTT".into(),
            Setup::Delayed(d) => format!("replicated, {:?} RTT", d * 2),
        }
    }
}

/// Half of the emulated round trip.
const ONE_WAY: Duration = Duration::from_micros(500);

pub fn run() -> Result<()> {
    if !is_root()? || !Path::new("/dev/fuse").exists() {
        bail!("the bench needs root and /dev/fuse (it exposes real devices through FUSE and loop)");
    }
    crate::apt::ensure(&["fio"])?;
    Cmd::cargo().args(["build", "--release", "-p", "tandem"]).run()?;
    let tandem = target_dir().join("release/tandem");
    let dir = std::env::temp_dir().join(format!("tandem-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = bench_all(&tandem, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn bench_all(tandem: &Path, dir: &Path) -> Result<()> {
    let mut rows = Vec::new();
    for mode in ["memory", "disk"] {
        let mut results = Vec::new();
        for (k, setup) in [Setup::Alone, Setup::Replicated, Setup::Delayed(ONE_WAY)].into_iter().enumerate() {
            results.push(bench_volume(tandem, &dir.join(format!("{mode}-{k}")), mode, setup)?);
        }
        rows.push((mode, results));
    }
    println!("\n| mode | job | unreplicated | replicated, 0 RTT | ratio | replicated, 1 ms RTT | ratio |");
    println!("|---|---|---|---|---|---|---|");
    for (mode, results) in &rows {
        for (i, job) in JOBS.iter().enumerate() {
            let (unit, value): (&str, fn(&Result1) -> f64) = match i {
                0 => ("p50 µs", |r| r.p50_us),
                1 => ("IOPS", |r| r.iops),
                _ => ("MiB/s", |r| r.bw_mib),
            };
            let alone = value(&results[0][i]);
            let (near, far) = (value(&results[1][i]), value(&results[2][i]));
            println!(
                "| {mode} | {} ({unit}) | {alone:.0} | {near:.0} | {:.2} | {far:.0} | {:.2} |",
                job.name,
                near / alone,
                far / alone
            );
        }
    }
    println!(
        "\n(ratio: replicated / unreplicated; latency: lower is better; IOPS and MiB/s: higher is better. \
         1 ms RTT: a forwarder delays each direction by {ONE_WAY:?})"
    );
    Ok(())
}

fn bench_volume(tandem: &Path, dir: &Path, mode: &str, setup: Setup) -> Result<Vec<Result1>> {
    std::fs::create_dir_all(dir)?;
    let volume = Volume { name: "bench", id: 3, size: SIZE, mode, secret: "bench-secret-0123456789" };
    let ports = [free_port()?, free_port()?];
    let listen = |id: usize| format!("127.0.0.1:{}", ports[id]);
    // Node 0 dials node 1 (the lower id dials): through the forwarder when there is one.
    let link = match setup {
        Setup::Delayed(one_way) => Some(Link::loopback(ports[1])?.with_delay(one_way)),
        _ => None,
    };
    let mut nodes = match setup {
        Setup::Alone => vec![Node::new(tandem, dir, 0, &volume, &listen(0), None, Vec::new())?],
        _ => {
            let to_node1 = match &link {
                Some(link) => format!("127.0.0.1:{}", link.port()),
                None => listen(1),
            };
            vec![
                Node::new(tandem, dir, 0, &volume, &listen(0), Some(&to_node1), Vec::new())?,
                Node::new(tandem, dir, 1, &volume, &listen(1), Some(&listen(0)), Vec::new())?,
            ]
        }
    };
    for node in &mut nodes {
        node.tandem(&["create-md"])?;
        node.start()?;
    }
    if nodes.len() == 2 {
        wait("the nodes to connect", || nodes.iter().all(Node::connected))?;
    }
    nodes[0].tandem(&["primary"])?;
    let device = nodes[0].device()?;
    let mut results = Vec::new();
    for job in JOBS {
        println!("bench: {mode} {} {}", setup.label(), job.name);
        results.push(fio(&device, job)?);
    }
    nodes[0].tandem(&["secondary"])?;
    for node in nodes.iter().rev() {
        let _ = node.tandem(&["down"]);
    }
    for node in &mut nodes {
        let _ = node.wait_exit();
    }
    Ok(results)
}

fn fio(device: &str, job: &Job) -> Result<Result1> {
    let out = Command::new("fio")
        .args(["--name=bench", "--ioengine=libaio", "--direct=1", "--time_based", "--output-format=json"])
        .arg(format!("--filename={device}"))
        .arg(format!("--runtime={RUNTIME_S}"))
        .arg("--size=256M")
        .args(job.args)
        .output()
        .context("running fio")?;
    if !out.status.success() {
        bail!("fio: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio's JSON")?;
    let w = &v["jobs"][0]["write"];
    Ok(Result1 {
        iops: w["iops"].as_f64().unwrap_or(0.0),
        bw_mib: w["bw"].as_f64().unwrap_or(0.0) / 1024.0,
        p50_us: w["clat_ns"]["percentile"]["50.000000"].as_f64().unwrap_or(0.0) / 1000.0,
    })
}
