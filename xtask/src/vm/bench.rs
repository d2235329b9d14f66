//! `cargo xtask vm-bench`: the bench table of `cargo xtask bench` on the real kernel path, in
//! one boot of the `vm-test` guest: Tandem on ublk (`memory` and `disk` modes, two daemons over
//! loopback) and the kernel's own DRBD 8.4 (protocols C and B, two resources over loopback),
//! each against the raw backing device measured in the same run. The backing of every row is a
//! brd RAM disk of the same size: the guest has no disk of its own, and a RAM disk keeps the
//! emulated storage path out of the comparison, leaving the replication's own cost.
//!
//! Under TCG absolute numbers mean little (a userspace daemon and an in-kernel driver are
//! slowed differently by emulation); the table is ratios within one run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::{fetch, shell_quote, Skip, VmTestArgs};
use crate::cmd::Cmd;
use crate::paths::{target_dir, workspace_root};
use crate::tools::is_root;

#[derive(Args)]
pub struct VmBenchArgs {
    /// Seconds per fio job (3 jobs per row, 7 rows per round)
    #[arg(long, default_value_t = 6)]
    pub runtime: u32,
    /// How many times each row runs, every other round in reverse order (the table shows the
    /// mean and each round's number)
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=9))]
    pub rounds: u32,
    /// Size of each RAM disk and of the Tandem volume, in MiB
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    /// fio's region on each device (`--size`), in MiB; filled once before the first job
    #[arg(long, default_value_t = 128)]
    pub region: u32,
    /// Kill the guest after this many seconds
    #[arg(long, default_value_t = 1200)]
    pub timeout: u64,
    /// Guest CPUs
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Guest memory in MiB (twelve RAM disks' fio regions live in it)
    #[arg(long, default_value_t = 3072)]
    pub memory: u32,
    /// Use the tandem already in target/release instead of building it first
    #[arg(long)]
    pub no_build: bool,
    /// Fetch the kernel, QEMU, busybox and drbd-utils again even if cached
    #[arg(long)]
    pub refresh: bool,
    /// Fail instead of skipping when the VM cannot be had
    #[arg(long)]
    pub require: bool,
    /// Where downloads and unpacked packages are kept (shared with vm-test)
    #[arg(long, default_value_os_t = workspace_root().join("target/vm-cache"))]
    pub cache: PathBuf,
}

/// The jobs of `cargo xtask bench` (xtask/src/bench.rs), as `bench.sh` names them, and the one
/// number each contributes to the table.
const JOBS: &[(&str, &str)] =
    &[("qd1", "4k randwrite QD1 p50 latency µs"), ("qd32", "4k randwrite QD32 IOPS"), ("seq", "1M seq write MiB/s")];

/// The rows `bench.sh` writes, in its order, with their labels.
const RAW: &str = "raw";
const ROWS: &[(&str, &str)] = &[
    ("tandem-alone", "Tandem, no peer (ublk + daemon only)"),
    ("tandem-memory", "Tandem memory"),
    ("tandem-disk", "Tandem disk"),
    ("drbd-B", "DRBD 8.4 protocol B"),
    ("drbd-C", "DRBD 8.4 protocol C"),
    ("drbd-C-crc32c", "DRBD 8.4 protocol C, data-integrity-alg crc32c"),
];

pub fn run(args: &VmBenchArgs) -> Result<()> {
    super::skip_unless_required("vm-bench", args.require, run_inner(args))
}

fn run_inner(args: &VmBenchArgs) -> Result<()> {
    let start = Instant::now();
    if !is_root()? {
        return Err(
            Skip("needs root (the guest reads the host's root over 9p; fio is installed with apt)".into()).into()
        );
    }
    // DRBD keeps its metadata (internal) in the disk's last MiBs, which bench.sh wipes between
    // rounds: fio's region must stay clear of them.
    if args.region + 8 > args.size {
        bail!(
            "--region {} MiB must leave at least 8 MiB of the {} MiB disk (--size) to DRBD's metadata",
            args.region,
            args.size
        );
    }
    // The guest runs the host's fio over 9p.
    crate::apt::ensure(&["fio"])?;
    println!("==> vm-bench: drbd-utils from Debian bookworm (cache {})", args.cache.display());
    let (drbd_utils, downloaded) = fetch::package(&args.cache, "drbd-utils", args.refresh)?;
    for helper in ["sbin/drbdadm", "lib/drbd/drbdadm-84", "lib/drbd/drbdsetup-84", "sbin/drbdmeta"] {
        if !drbd_utils.join(helper).is_file() {
            bail!("drbd-utils unpacked into {} has no {helper} (the guest kernel's DRBD is 8.4)", drbd_utils.display());
        }
    }
    println!("vm-bench: drbd-utils in {} ({:.1} MB downloaded)", drbd_utils.display(), downloaded as f64 / 1e6);

    // A release build: the daemon's CPU cost is what TCG magnifies, a debug build would
    // measure the compiler's settings. Built before booting: the guest and rustc must not
    // share these cores.
    if !args.no_build {
        Cmd::cargo()
            .args(["build", "--release", "-p", "tandem"])
            .run()
            .context("building tandem (release) for the guest")?;
    }
    let built = target_dir().join("release/tandem");
    if !built.is_file() {
        bail!("{} does not exist: build it (or drop --no-build)", built.display());
    }
    let dir = workspace_root().join("target/vm-bench");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    // The guest reads the host's files live: a copy, so a build finishing meanwhile cannot
    // swap the binary under it (vm-test does the same).
    let tandem = bin.join("tandem");
    std::fs::copy(&built, &tandem).with_context(|| format!("copying {} to {}", built.display(), tandem.display()))?;

    let script = workspace_root().join("xtask/src/vm/scenarios/bench.sh");
    let command = format!(
        "export TANDEM={} DRBD_UTILS={} OUT=/tandem-vm/out/results RUNTIME={} SIZE_MIB={} REGION_MIB={} \
         ROUNDS={}\nsh -eu {}",
        shell_quote(&tandem.display().to_string()),
        shell_quote(&drbd_utils.display().to_string()),
        args.runtime,
        args.size,
        args.region,
        args.rounds,
        shell_quote(&script.display().to_string()),
    );
    let load_before = load_average();
    super::run(&VmTestArgs {
        command: Some(command),
        scenario: String::new(),
        timeout: args.timeout,
        cpus: args.cpus,
        memory: args.memory,
        refresh: args.refresh,
        no_build: true,
        require: args.require,
        cache: args.cache.clone(),
        runs: Some(dir.join("boots")),
    })?;
    let load_after = load_average();

    // vm-test printed a SKIP line and returned Ok if the guest could not be had: then no boot
    // left a zero status.
    let Some(results) = passed_boot_results(&dir.join("boots"))? else {
        println!("vm-bench: no guest run finished (see the SKIP line above)");
        return Ok(());
    };
    // The boots' directory is cleared by the next run: keep fio's output beside it.
    let kept = dir.join("results");
    if kept.exists() {
        std::fs::remove_dir_all(&kept).with_context(|| format!("clearing {}", kept.display()))?;
    }
    copy_dir(&results, &kept)?;
    let table = Table::read(&kept, args.rounds)?;
    table.print(args, &kept);
    println!(
        "vm-bench: host load average (1, 5, 15 min) before the boot: {load_before}; after: {load_after}; total {:.0} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `out/results` of the boot that exited 0 (the last attempt: vm-test retries after a crash).
fn passed_boot_results(runs: &Path) -> Result<Option<PathBuf>> {
    for attempt in [2, 1] {
        let out = runs.join(format!("boot-{attempt}/out"));
        if std::fs::read_to_string(out.join("status")).is_ok_and(|status| status.trim() == "0") {
            let results = out.join("results");
            if !results.is_dir() {
                bail!("the guest exited 0 but left no {}", results.display());
            }
            return Ok(Some(results));
        }
    }
    Ok(None)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let path = entry?.path();
        let target = to.join(path.file_name().context("a directory entry has a name")?);
        std::fs::copy(&path, &target).with_context(|| format!("copying {} to {}", path.display(), target.display()))?;
    }
    Ok(())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|error| format!("unknown ({error})"))
}

/// What one fio job measured on one device.
#[derive(Clone, Copy)]
struct Measured {
    p50_us: f64,
    iops: f64,
    mib_s: f64,
}

impl Measured {
    /// The number the table shows for job `job` (an index into [`JOBS`]).
    fn headline(&self, job: usize) -> f64 {
        match job {
            0 => self.p50_us,
            1 => self.iops,
            _ => self.mib_s,
        }
    }
}

/// Every row's three jobs in each round, plus what the guest said about itself.
struct Table {
    /// row → round → job.
    rows: HashMap<&'static str, Vec<[Measured; 3]>>,
    rounds: u32,
    info: String,
}

impl Table {
    fn read(dir: &Path, rounds: u32) -> Result<Table> {
        let mut rows = HashMap::new();
        for row in [RAW].into_iter().chain(ROWS.iter().map(|(row, _)| *row)) {
            let mut per_round = Vec::new();
            for round in 1..=rounds {
                let mut jobs = Vec::new();
                for (job, _) in JOBS {
                    jobs.push(fio_result(&dir.join(format!("{row}-{job}-r{round}.json")))?);
                }
                per_round.push(<[Measured; 3]>::try_from(jobs).map_err(|_| anyhow::anyhow!("three jobs per row"))?);
            }
            rows.insert(row, per_round);
        }
        let info = std::fs::read_to_string(dir.join("info")).unwrap_or_default();
        Ok(Table { rows, rounds, info })
    }

    /// Job `job` on `row`: the mean over the rounds.
    fn mean(&self, row: &str, job: usize) -> f64 {
        let rounds = &self.rows[row];
        rounds.iter().map(|jobs| jobs[job].headline(job)).sum::<f64>() / rounds.len() as f64
    }

    /// The mean, then each round's number when there are several.
    fn cell(&self, row: &str, job: usize) -> String {
        let mean = format!("{:.0}", self.mean(row, job));
        if self.rounds == 1 {
            return mean;
        }
        let each: Vec<String> = self.rows[row].iter().map(|jobs| format!("{:.0}", jobs[job].headline(job))).collect();
        format!("{mean} ({})", each.join(", "))
    }

    fn print(&self, args: &VmBenchArgs, dir: &Path) {
        println!("\n==> vm-bench: {}", self.info.lines().collect::<Vec<_>>().join("; "));
        println!(
            "backing of every row: a brd RAM disk of {} MiB (/dev/ramN, one per device, fio's {} MiB region filled \
             before the first job); fio libaio, O_DIRECT, {} s per job, latency = submission + completion; Tandem on \
             /dev/mapper/tandem-vol0 (dm linear over ublk), DRBD on /dev/drbdN; both replicate over 127.0.0.1 in the \
             same guest; {} round(s), every other one in reverse order",
            args.size, args.region, args.runtime, self.rounds
        );
        println!(
            "\nAbsolute numbers (TCG emulation, no KVM: they mean little; compare the ratios below){}\n",
            if self.rounds > 1 { "; the mean over the rounds, then each round's" } else { "" }
        );
        println!("| device | {} | {} | {} |", JOBS[0].1, JOBS[1].1, JOBS[2].1);
        println!("|---|---|---|---|");
        for (row, label) in [(RAW, "raw RAM disk")].into_iter().chain(ROWS.iter().copied()) {
            let cells: Vec<String> = (0..JOBS.len()).map(|job| self.cell(row, job)).collect();
            println!("| {label} | {} |", cells.join(" | "));
        }
        println!("\nRatios against the raw RAM disk (means over the rounds of one run)\n");
        println!("| device | QD1 p50 latency ratio (lower is better) | QD32 IOPS ratio | 1M seq MiB/s ratio |");
        println!("|---|---|---|---|");
        for (row, label) in ROWS {
            let ratios: Vec<String> =
                (0..JOBS.len()).map(|job| format!("{:.2}", self.mean(row, job) / self.mean(RAW, job))).collect();
            println!("| {label} | {} |", ratios.join(" | "));
        }
        if self.rounds > 1 {
            let raw = &self.rows[RAW];
            let (first, last) = (&raw[0], &raw[raw.len() - 1]);
            let drift: Vec<String> = (0..JOBS.len())
                .map(|job| format!("{:.2}", last[job].headline(job) / first[job].headline(job)))
                .collect();
            println!(
                "\nthe raw RAM disk moved between its first and last measurement (last / first): {} — read \
                 differences of that size between rows as noise",
                drift.join(", ")
            );
        }
        println!(
            "Emulation slows a userspace daemon (context switches, io_uring, TCP through the guest's stack) and an \
             in-kernel driver differently: a ratio against DRBD here is a smoke signal, not a verdict. fio's JSON: {}",
            dir.display()
        );
    }
}

/// The numbers of one fio JSON output; a missing field is an error, never a zero.
fn fio_result(path: &Path) -> Result<Measured> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not fio's JSON", path.display()))?;
    let write = &json["jobs"][0]["write"];
    let field = |value: &serde_json::Value, what: &str| {
        value.as_f64().with_context(|| format!("{} has no {what}", path.display()))
    };
    let measured = Measured {
        // Submission + completion (fio's --lat_percentiles): brd completes inside io_submit.
        p50_us: field(&write["lat_ns"]["percentile"]["50.000000"], "write.lat_ns.percentile.50.000000")? / 1000.0,
        iops: field(&write["iops"], "write.iops")?,
        mib_s: field(&write["bw"], "write.bw")? / 1024.0,
    };
    if measured.iops <= 0.0 {
        bail!("{}: fio wrote nothing (0 IOPS)", path.display());
    }
    Ok(measured)
}
