//! `cargo xtask bench`: fio on the replicated device against the same frontend and store
//! without a peer (the volume unreplicated), in `memory` and `disk` modes; printed as ratios
//! measured in the same run. Needs root (FUSE, loop devices) and fio (installed with apt).
//! Not yet: the 1 ms RTT rows (the link emulator has no delay yet).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cmd::Cmd;
use crate::paths::workspace_root;
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

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run() -> Result<()> {
    if !is_root()? || !Path::new("/dev/fuse").exists() {
        bail!("the bench needs root and /dev/fuse (it exposes real devices through FUSE and loop)");
    }
    crate::apt::ensure(&["fio"])?;
    Cmd::cargo().args(["build", "--release", "-p", "tandem"]).run()?;
    let tandem = workspace_root().join("target/release/tandem");
    let dir = std::env::temp_dir().join(format!("tandem-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = bench_all(&tandem, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn bench_all(tandem: &Path, dir: &Path) -> Result<()> {
    let mut rows = Vec::new();
    for mode in ["memory", "disk"] {
        let alone = bench_volume(tandem, &dir.join(format!("{mode}-alone")), mode, false)?;
        let replicated = bench_volume(tandem, &dir.join(format!("{mode}-replicated")), mode, true)?;
        rows.push((mode, alone, replicated));
    }
    println!("\n| mode | job | unreplicated | replicated | ratio |");
    println!("|---|---|---|---|---|");
    for (mode, alone, replicated) in &rows {
        for (i, job) in JOBS.iter().enumerate() {
            let (a, r) = (alone[i], replicated[i]);
            let (unit, va, vr, ratio) = match i {
                0 => ("p50 µs", a.p50_us, r.p50_us, r.p50_us / a.p50_us),
                1 => ("IOPS", a.iops, r.iops, r.iops / a.iops),
                _ => ("MiB/s", a.bw_mib, r.bw_mib, r.bw_mib / a.bw_mib),
            };
            println!("| {mode} | {} ({unit}) | {va:.0} | {vr:.0} | {ratio:.2} |", job.name);
        }
    }
    println!("\n(latency ratio: replicated / unreplicated, lower is better; IOPS and MiB/s: higher is better)");
    Ok(())
}

fn config(dir: &Path, id: u8, mode: &str, ports: [u16; 2], replicated: bool) -> Result<PathBuf> {
    let path = dir.join(format!("node{id}.toml"));
    let peer = if replicated {
        format!("\n[[peer]]\nid = {}\naddress = \"127.0.0.1:{}\"\n", 1 - id, ports[1 - id as usize])
    } else {
        String::new()
    };
    std::fs::write(
        &path,
        format!(
            "[volume]\nname = \"bench\"\nid = 3\nsize = \"{SIZE}\"\nmode = \"{mode}\"\nsecret = \"bench-secret-0123456789\"\n\n\
             [node]\nid = {id}\ndata = \"{d}/node{id}.img\"\nmeta = \"{d}/node{id}.meta\"\nlisten = \"127.0.0.1:{me}\"\n\
             control = \"{d}/node{id}.sock\"\nmountpoint = \"{d}/fuse{id}\"\n{peer}",
            d = dir.display(),
            me = ports[id as usize],
        ),
    )?;
    Ok(path)
}

fn tandem_cmd(tandem: &Path, config: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(tandem).arg("-c").arg(config).args(args).output()?;
    if !out.status.success() {
        bail!("tandem {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn status(tandem: &Path, config: &Path) -> Option<serde_json::Value> {
    tandem_cmd(tandem, config, &["status", "--json"]).ok().and_then(|s| serde_json::from_str(&s).ok())
}

fn wait(what: &str, done: impl Fn() -> bool) -> Result<()> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn bench_volume(tandem: &Path, dir: &Path, mode: &str, replicated: bool) -> Result<Vec<Result1>> {
    std::fs::create_dir_all(dir)?;
    let ports = [
        std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
        std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
    ];
    let nodes: Vec<u8> = if replicated { vec![0, 1] } else { vec![0] };
    let mut daemons = Vec::new();
    let mut configs = Vec::new();
    for &id in &nodes {
        let config = config(dir, id, mode, ports, replicated)?;
        tandem_cmd(tandem, &config, &["create-md"])?;
        let log = std::fs::File::create(dir.join(format!("node{id}.log")))?;
        let child =
            Command::new(tandem).arg("-c").arg(&config).arg("daemon").stdout(Stdio::null()).stderr(log).spawn()?;
        daemons.push(Daemon(child));
        wait("the daemon", || status(tandem, &config).is_some())?;
        configs.push(config);
    }
    if replicated {
        wait("the nodes to connect", || {
            configs.iter().all(|c| status(tandem, c).is_some_and(|s| s["peers"][0]["connection"] == "Connected"))
        })?;
    }
    tandem_cmd(tandem, &configs[0], &["primary"])?;
    let device = status(tandem, &configs[0]).and_then(|s| s["device"].as_str().map(str::to_owned)).context("device")?;
    let mut results = Vec::new();
    for job in JOBS {
        println!("bench: {mode} {} {}", if replicated { "replicated" } else { "unreplicated" }, job.name);
        results.push(fio(&device, job)?);
    }
    tandem_cmd(tandem, &configs[0], &["secondary"])?;
    for c in configs.iter().rev() {
        let _ = tandem_cmd(tandem, c, &["down"]);
    }
    for mut d in daemons {
        let _ = d.0.wait();
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
