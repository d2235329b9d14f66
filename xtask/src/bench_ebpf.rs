//! `cargo xtask bench ebpf`: what the eBPF write recording (issue 4) costs in IOPS.
//!
//! fio writes 4 KiB random O_DIRECT blocks (libaio, QD1 and QD32) to a loop device with and
//! without the programs of one volume attached, for each flavour (tp_btf, classic), and prints
//! the IOPS with programs as a ratio to the IOPS without, measured in the same run.
//!
//! The device: a loop device with direct I/O over a preallocated file on a private tmpfs. The
//! disk of this machine is shared with other builds and its latency would be most of the noise;
//! a memory-backed device is also the fastest one, so the programs' cost per write is the
//! largest fraction of each I/O it will ever be (a real disk hides it). The brd ramdisk needs a
//! module this kernel cannot load, and zram would add a compression pass to every write.
//!
//! The machine is shared and noisy (other builds come and go within seconds), so the
//! comparison is interleaved finely: per queue depth, both flavours are loaded once, one fio
//! run writes all along, and the `attach_ab` example of tandem-bpf alternates short phases with
//! nothing attached (N) and with one flavour's programs attached (N tp_btf N classic N classic N
//! tp_btf ...; attaching and detaching loaded programs takes microseconds). A phase's IOPS are
//! the writes the loop device completed in it (`/sys/block/<loop>/stat`) after a short settling
//! time. Each phase with programs gives one ratio against the mean of the two phases without
//! around it (which cancels drift), and the table gives the median ratio over the rounds and
//! its spread. The same ratio for a phase without programs against its neighbours without
//! ("A/A") shows how much of the spread is noise.
//!
//! By default the tracks are 64 KiB and stay marked once written (a hot working set: the
//! programs find the bits set and write nothing but their counters and in-flight slots);
//! `--fresh` clears the record before every phase with programs and `--track-kib 4` makes the
//! tracks many, so that most writes set new bits (random writes over a device much larger than
//! what is written between two destages).
//!
//! Then, unless `--profile-secs 0`, one more fio run per flavour and queue depth with
//! `kernel.bpf_stats_enabled=1` prints each program's cost per invocation (run_time_ns /
//! run_cnt); those runs are not in the ratios (the statistics cost two clock reads per run).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, ValueEnum};

use crate::cmd::Cmd;
use crate::paths::target_dir;
use crate::tools::is_root;

/// 1 GiB of 64 KiB tracks per range: the daemon's default range.
const RANGE_BYTES: u64 = 1 << 30;
/// Prefix of the volumes the bench loads (one per flavour; removed when the bench ends).
const VOLUME: &str = "xtask-bench-ebpf";
const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FlavorArg {
    TpBtf,
    Classic,
    Both,
}

#[derive(Args, Debug)]
pub struct EbpfArgs {
    /// Rounds per queue depth: each round has one phase per flavour, each between two phases without programs
    #[arg(long, default_value_t = 300)]
    rounds: u32,
    /// Length of a measured phase, in milliseconds
    #[arg(long, default_value_t = 100)]
    phase_ms: u64,
    /// Time after attaching or detaching before a phase is measured, in milliseconds
    #[arg(long, default_value_t = 20)]
    settle_ms: u64,
    /// Which programs to compare against no programs
    #[arg(long, value_enum, default_value_t = FlavorArg::Both)]
    flavor: FlavorArg,
    /// Queue depths to run (4 KiB random writes at each)
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 32])]
    qd: Vec<u32>,
    /// Size of the loop device (and of its tmpfs file) in MiB
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Track size in KiB (a power of two from 4 to 4096)
    #[arg(long, default_value_t = 64)]
    track_kib: u64,
    /// Clear the record before every phase with programs, so that writes set new bits
    #[arg(long)]
    fresh: bool,
    /// Seconds of each per-program cost run (kernel.bpf_stats_enabled); 0 skips them
    #[arg(long, default_value_t = 3)]
    profile_secs: u32,
    /// Use the `bpfctl` and `attach_ab` examples in this directory instead of building the
    /// workspace's (to compare builds)
    #[arg(long)]
    examples: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavor {
    TpBtf,
    Classic,
}

impl Flavor {
    /// The name `bpfctl load` takes.
    fn arg(self) -> &'static str {
        match self {
            Flavor::TpBtf => "tp_btf",
            Flavor::Classic => "classic",
        }
    }

    /// What `bpfctl load` prints for it (tandem_bpf::Flavor's Display).
    fn loaded_as(self) -> &'static str {
        match self {
            Flavor::TpBtf => "(tp_btf)",
            Flavor::Classic => "(classic tracepoint)",
        }
    }

    fn volume(self) -> String {
        format!("{VOLUME}-{}", self.arg())
    }
}

/// The geometry every loaded volume gets.
#[derive(Clone, Copy)]
struct Geometry {
    track_size: u64,
    tracks: u64,
    tracks_per_range: u64,
}

/// The bench's scratch: a tmpfs, a file on it, a loop device over the file, the volumes'
/// pins, the bpf_stats setting. Dropping it undoes them all (also after an error).
struct Rig {
    dir: PathBuf,
    mounted: bool,
    device: Option<String>,
    bpfctl: PathBuf,
    stats_before: Option<String>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for flavor in [Flavor::TpBtf, Flavor::Classic] {
            let _ = Command::new(&self.bpfctl).args(["unpin", &flavor.volume()]).output();
        }
        if let Some(before) = &self.stats_before {
            let _ = fs::write(STATS_SYSCTL, before);
        }
        if let Some(device) = &self.device {
            let _ = Command::new("losetup").args(["-d", device]).status();
        }
        if self.mounted {
            let _ = Command::new("umount").arg(&self.dir).status();
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Runs a command quietly; fails with its stderr.
fn output(program: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("could not start {} (is it installed?)", program.display()))?;
    if !out.status.success() {
        bail!(
            "`{} {}` failed ({}): {}",
            program.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{} printed non-UTF-8", program.display()))
}

fn tool(name: &str) -> &Path {
    Path::new(name)
}

pub fn run(args: &EbpfArgs) -> Result<()> {
    ensure!(is_root()?, "the eBPF bench needs root (loop devices, tmpfs, loading BPF programs)");
    ensure!(args.rounds >= 1 && args.phase_ms >= 50, "--rounds must be at least 1 and --phase-ms at least 50");
    ensure!(!args.qd.is_empty(), "--qd needs at least one queue depth");
    ensure!(
        args.track_kib.is_power_of_two() && (4..=4096).contains(&args.track_kib),
        "--track-kib must be a power of two from 4 to 4096"
    );
    crate::apt::ensure(&["fio", "bpftool", "util-linux"])?;
    let examples = match &args.examples {
        Some(dir) => dir.clone(),
        None => {
            Cmd::cargo()
                .args(["build", "--release", "-p", "tandem-bpf", "--example", "bpfctl", "--example", "attach_ab"])
                .run()?;
            target_dir().join("release/examples")
        }
    };
    let bpfctl = examples.join("bpfctl");
    let attach_ab = examples.join("attach_ab");
    let flavors: Vec<Flavor> = match args.flavor {
        FlavorArg::TpBtf => vec![Flavor::TpBtf],
        FlavorArg::Classic => vec![Flavor::Classic],
        FlavorArg::Both => vec![Flavor::TpBtf, Flavor::Classic],
    };

    let dir = std::env::temp_dir().join(format!("tandem-bench-ebpf-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Also unpins leftovers of an interrupted bench when dropped, and now:
    let mut rig = Rig { dir: dir.clone(), mounted: false, device: None, bpfctl: bpfctl.clone(), stats_before: None };
    for flavor in [Flavor::TpBtf, Flavor::Classic] {
        let _ = Command::new(&bpfctl).args(["unpin", &flavor.volume()]).output();
    }
    let size = args.size_mib * 1024 * 1024;
    output(tool("mount"), &["-t", "tmpfs", "-o", &format!("size={}", size + (64 << 20)), "tandem-bench", path(&dir)?])?;
    rig.mounted = true;
    let file = dir.join("backing");
    // Preallocated: a write to a hole of a tmpfs file allocates a page, an overwrite does not.
    output(tool("fallocate"), &["-l", &size.to_string(), path(&file)?])?;
    let device = output(tool("losetup"), &["--show", "-f", "--direct-io=on", path(&file)?])?.trim().to_owned();
    ensure!(device.starts_with("/dev/loop"), "losetup printed {device:?}");
    rig.device = Some(device.clone());
    let dio =
        fs::read_to_string(format!("/sys/block/{}/loop/dio", device.trim_start_matches("/dev/"))).unwrap_or_default();
    let track_size = args.track_kib * 1024;
    let geometry = Geometry { track_size, tracks: size / track_size, tracks_per_range: RANGE_BYTES / track_size };

    let kernel = output(tool("uname"), &["-r"])?.trim().to_owned();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mut header = String::new();
    writeln!(header, "kernel {kernel}, {cpus} CPUs; load average at start: {}", loadavg())?;
    writeln!(header, "programs: built by {}", bpfctl.display())?;
    writeln!(
        header,
        "device: {device} (loop, direct I/O {}) over a preallocated {} MiB file on a private tmpfs",
        if dio.trim() == "1" { "on" } else { "OFF" },
        args.size_mib
    )?;
    writeln!(
        header,
        "volume: {} tracks of {} KiB, ranges of {} tracks; record {}",
        geometry.tracks,
        args.track_kib,
        geometry.tracks_per_range,
        if args.fresh {
            "cleared before every phase with programs (writes set new bits)"
        } else {
            "kept (after the first seconds, writes find their tracks marked)"
        }
    )?;
    writeln!(
        header,
        "fio job (one per queue depth, running through all its phases): fio {}",
        fio_args(&device, None, None).join(" ")
    )?;
    writeln!(
        header,
        "phases per queue depth: {} rounds of N {} N, each measured for {} ms after {} ms of settling \
         (N: nothing attached; the flavours' order reversed every other round)",
        args.rounds,
        flavors.iter().map(|f| f.arg()).collect::<Vec<_>>().join(" N "),
        args.phase_ms,
        args.settle_ms
    )?;
    print!("{header}");

    let mut table = Vec::new();
    for &qd in &args.qd {
        table.push(bench_job(&bpfctl, &attach_ab, &device, geometry, qd, args, &flavors)?);
    }

    let mut profiles = Vec::new();
    if args.profile_secs > 0 {
        rig.stats_before = Some(fs::read_to_string(STATS_SYSCTL).context("reading kernel.bpf_stats_enabled")?);
        fs::write(STATS_SYSCTL, "1").context("setting kernel.bpf_stats_enabled=1")?;
        for &flavor in &flavors {
            for &qd in &args.qd {
                profiles.push((flavor, qd, profile(&bpfctl, &device, geometry, qd, args.profile_secs, flavor)?));
            }
        }
        if let Some(before) = rig.stats_before.take() {
            fs::write(STATS_SYSCTL, before).context("restoring kernel.bpf_stats_enabled")?;
        }
    }

    println!("\n{header}load average at end: {}\n", loadavg());
    println!(
        "| job | programs | IOPS without (median) | IOPS with (median) | ratio: median | middle half | \
         min | max | fewer IOPS (median) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for job in &table {
        for row in &job.rows {
            let r = stats(&row.ratios);
            println!(
                "| 4k randwrite QD{} | {} | {:.0} | {:.0} | {:.3} | {:.3}-{:.3} | {:.3} | {:.3} | {:.1} % |",
                job.qd,
                row.label,
                median(&job.without),
                median(&row.iops),
                r.median,
                r.q1,
                r.q3,
                r.min,
                r.max,
                (1.0 - r.median) * 100.0
            );
        }
    }
    println!(
        "\n(ratio: IOPS of a phase / mean IOPS of the two phases without programs around it, one ratio per round; \
         middle half: the quartiles of the ratios; \"none (A/A)\": a phase without programs against the phases \
         without two steps away, i.e. the noise)"
    );
    for job in &table {
        for row in &job.rows {
            let list: Vec<String> = row.ratios.iter().map(|r| format!("{r:.3}")).collect();
            println!("QD{} {}: {}", job.qd, row.label, list.join(" "));
        }
    }
    if !profiles.is_empty() {
        println!(
            "\nper program (kernel.bpf_stats_enabled=1, one {}-second fio run each with the record kept, not in the \
             ratios; the programs also run for other devices' bios, hence runs per write > 1 on a busy machine):",
            args.profile_secs
        );
        println!("| programs | job | program | runs per write | ns per run |");
        println!("|---|---|---|---|---|");
        for (flavor, qd, (writes, progs)) in &profiles {
            for p in progs {
                println!(
                    "| {} | QD{qd} | {} | {:.2} | {:.0} |",
                    flavor.arg(),
                    p.name,
                    if *writes > 0 { p.run_cnt as f64 / *writes as f64 } else { 0.0 },
                    if p.run_cnt > 0 { p.run_time_ns as f64 / p.run_cnt as f64 } else { 0.0 },
                );
            }
        }
    }
    if flavors.contains(&Flavor::TpBtf) {
        for job in &table {
            if let Some(row) = job.rows.iter().find(|r| r.flavor == Some(Flavor::TpBtf)) {
                let r = stats(&row.ratios);
                println!(
                    "target (tp_btf at most 2 % fewer IOPS) at QD{}: {} (median ratio {:.3}, middle half {:.3}-{:.3})",
                    job.qd,
                    if r.median >= 0.98 { "met" } else { "NOT met" },
                    r.median,
                    r.q1,
                    r.q3
                );
            }
        }
    }
    drop(rig);
    Ok(())
}

fn path(p: &Path) -> Result<&str> {
    p.to_str().with_context(|| format!("{} is not UTF-8", p.display()))
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

struct Row {
    label: String,
    flavor: Option<Flavor>,
    iops: Vec<f64>,
    ratios: Vec<f64>,
}

struct Job {
    qd: u32,
    without: Vec<f64>,
    rows: Vec<Row>,
}

/// fio in the background for the length of a job; stopped when dropped.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: fio runs each job in a process of its own, which a killed
        // parent would leave writing (and holding the loop device).
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Loads a flavour's programs for the loop device as the volume `flavor.volume()`.
fn load(bpfctl: &Path, device: &str, g: Geometry, flavor: Flavor) -> Result<()> {
    let name = flavor.volume();
    let loaded = output(
        bpfctl,
        &[
            "load",
            &name,
            device,
            &g.track_size.to_string(),
            &g.tracks_per_range.to_string(),
            &g.tracks.to_string(),
            flavor.arg(),
        ],
    )?;
    ensure!(loaded.contains(flavor.loaded_as()), "bpfctl loaded other programs than {}: {loaded}", flavor.arg());
    Ok(())
}

/// Tracks marked in a volume ("<volume>: N of M tracks ..." from `bpfctl dirty`).
fn marked(bpfctl: &Path, flavor: Flavor) -> Result<u64> {
    let dirty = output(bpfctl, &["dirty", &flavor.volume()])?;
    dirty
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("bpfctl dirty printed {dirty:?}"))
}

/// One queue depth: both flavours loaded, fio running throughout, `attach_ab` alternating the
/// phases.
fn bench_job(
    bpfctl: &Path,
    attach_ab: &Path,
    device: &str,
    g: Geometry,
    qd: u32,
    args: &EbpfArgs,
    flavors: &[Flavor],
) -> Result<Job> {
    for &flavor in flavors {
        load(bpfctl, device, g, flavor)?;
    }
    let phases = 1 + 2 * u64::from(args.rounds) * flavors.len() as u64;
    // A day: stopped after the last phase (a phase on a loaded machine takes twice its length
    // or more: attaching, detaching, starting attach_ab's reads).
    let runtime = 24 * 3600;
    let mut child = Command::new("fio")
        .args(fio_args(device, Some(qd), Some(runtime)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("could not start fio (is it installed?)")?;
    let started = child.try_wait()?;
    ensure!(started.is_none(), "fio exited at once ({started:?})");
    let fio = Background(child);
    // Warm-up, not measured: fio's start, tmpfs pages, the loop worker.
    std::thread::sleep(Duration::from_secs(2));
    let mut ab_args = Vec::new();
    if args.fresh {
        ab_args.push("--fresh".to_owned());
    }
    ab_args.extend([device.to_owned(), args.phase_ms.to_string(), args.settle_ms.to_string(), args.rounds.to_string()]);
    ab_args.extend(flavors.iter().map(|f| f.volume()));
    println!("bench ebpf: QD{qd}: {} phases of {} ms", phases, args.phase_ms);
    let ab_args: Vec<&str> = ab_args.iter().map(String::as_str).collect();
    let out = output(attach_ab, &ab_args)?;
    drop(fio);
    // A run whose programs marked nothing measured nothing.
    for &flavor in flavors {
        let n = marked(bpfctl, flavor)?;
        ensure!(n > 0, "the {} programs marked no track during the phases", flavor.arg());
        output(bpfctl, &["unpin", &flavor.volume()])?;
    }

    let mut plan = Vec::new();
    let mut measured = Vec::new();
    for line in out.lines() {
        // "phase <n> <volume|none> <iops>"
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, _, label, iops] = fields[..] else { bail!("attach_ab printed {line:?}") };
        let step = flavors.iter().copied().find(|f| f.volume() == label);
        ensure!(step.is_some() || label == "none", "attach_ab printed {line:?}");
        plan.push(step);
        measured.push(iops.parse::<f64>().with_context(|| format!("attach_ab printed {line:?}"))?);
    }
    ensure!(plan.len() as u64 == phases, "attach_ab printed {} phases, not {phases}", plan.len());
    ensure!(measured.iter().all(|&m| m > 0.0), "a phase completed no write: did fio stop?");

    let around = |i: usize| (measured[i - 1] + measured[i + 1]) / 2.0;
    let mut rows: Vec<Row> = flavors
        .iter()
        .map(|f| Row { label: f.arg().into(), flavor: Some(*f), iops: Vec::new(), ratios: Vec::new() })
        .collect();
    let mut control = Row { label: "none (A/A)".into(), flavor: None, iops: Vec::new(), ratios: Vec::new() };
    let mut without = Vec::new();
    for (i, step) in plan.iter().enumerate() {
        match step {
            Some(f) => {
                let row = rows.iter_mut().find(|r| r.flavor == Some(*f)).expect("a row per flavour");
                row.iops.push(measured[i]);
                row.ratios.push(measured[i] / around(i));
            }
            None => {
                without.push(measured[i]);
                // Its neighbours without programs are two steps away.
                if i >= 2 && i + 2 < plan.len() {
                    control.iops.push(measured[i]);
                    control.ratios.push(measured[i] / ((measured[i - 2] + measured[i + 2]) / 2.0));
                }
            }
        }
    }
    if !control.ratios.is_empty() {
        rows.push(control);
    }
    for row in &rows {
        let r = stats(&row.ratios);
        println!(
            "bench ebpf: QD{qd} {}: median ratio {:.3} (middle half {:.3}-{:.3})",
            row.label, r.median, r.q1, r.q3
        );
    }
    Ok(Job { qd, without, rows })
}

/// fio's arguments: 4 KiB random O_DIRECT writes with libaio at queue depth `qd` for
/// `runtime` seconds (`None`: placeholders, for printing the job).
fn fio_args(device: &str, qd: Option<u32>, runtime: Option<u64>) -> Vec<String> {
    let or_placeholder = |v: Option<String>, p: &str| v.unwrap_or_else(|| p.to_owned());
    vec![
        "--name=ebpf".to_owned(),
        format!("--filename={device}"),
        "--ioengine=libaio".to_owned(),
        "--direct=1".to_owned(),
        "--rw=randwrite".to_owned(),
        "--bs=4k".to_owned(),
        format!("--iodepth={}", or_placeholder(qd.map(|q| q.to_string()), "<QD>")),
        format!("--runtime={}", or_placeholder(runtime.map(|r| r.to_string()), "<until the last phase>")),
        "--time_based".to_owned(),
        "--norandommap".to_owned(),
        "--randrepeat=0".to_owned(),
    ]
}

struct ProgStats {
    name: String,
    run_cnt: u64,
    run_time_ns: u64,
}

/// One fio run with one flavour attached and kernel.bpf_stats_enabled=1: the writes fio
/// issued and each attached program's counters.
fn profile(
    bpfctl: &Path,
    device: &str,
    g: Geometry,
    qd: u32,
    runtime: u32,
    flavor: Flavor,
) -> Result<(u64, Vec<ProgStats>)> {
    let pins = PathBuf::from("/sys/fs/bpf/tandem").join(flavor.volume());
    load(bpfctl, device, g, flavor)?;
    let result = (|| {
        let mut fio = fio_args(device, Some(qd), Some(u64::from(runtime)));
        fio.push("--output-format=json".into());
        let fio: Vec<&str> = fio.iter().map(String::as_str).collect();
        let v: serde_json::Value = serde_json::from_str(&output(tool("fio"), &fio)?).context("fio's JSON")?;
        let writes = v["jobs"][0]["write"]["total_ios"].as_u64().context("no write count in fio's JSON")?;
        let mut progs = Vec::new();
        for link in ["link_queue", "link_split", "link_rq_complete", "link_bio_complete"] {
            let show = output(tool("bpftool"), &["-j", "link", "show", "pinned", path(&pins.join(link))?])?;
            let l: serde_json::Value = serde_json::from_str(&show).context("bpftool link show")?;
            let id = l["prog_id"].as_u64().with_context(|| format!("no prog_id for {link}: {l}"))?;
            let show = output(tool("bpftool"), &["-j", "prog", "show", "id", &id.to_string()])?;
            let p: serde_json::Value = serde_json::from_str(&show).context("bpftool prog show")?;
            progs.push(ProgStats {
                name: p["name"].as_str().unwrap_or(link).to_owned(),
                run_cnt: p["run_cnt"].as_u64().unwrap_or(0),
                run_time_ns: p["run_time_ns"].as_u64().unwrap_or(0),
            });
        }
        Ok((writes, progs))
    })();
    output(bpfctl, &["unpin", &flavor.volume()])?;
    println!("bench ebpf: profiled {} QD{qd}", flavor.arg());
    result
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

struct Spread {
    median: f64,
    min: f64,
    max: f64,
    q1: f64,
    q3: f64,
}

fn stats(v: &[f64]) -> Spread {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let half = s.len() / 2;
    // Quartiles as the medians of the lower and upper halves (the middle value in neither).
    let (lower, upper) = (&s[..half], &s[s.len() - half..]);
    Spread {
        median: median(&s),
        min: s.first().copied().unwrap_or(f64::NAN),
        max: s.last().copied().unwrap_or(f64::NAN),
        q1: if lower.is_empty() { median(&s) } else { median(lower) },
        q3: if upper.is_empty() { median(&s) } else { median(upper) },
    }
}
