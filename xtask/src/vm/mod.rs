//! `cargo xtask vm-test`: a real Debian kernel (bookworm-backports' 6.12, which has ublk and
//! device-mapper) booted under QEMU with the host's root filesystem visible read-only in the
//! guest (virtio-9p, under a tmpfs overlay), so the binaries built here run there at the same
//! paths. It runs one scenario command in the guest and reports its exit status. A guest kernel
//! crash is reported as such and the boot retried once. Where the kernel or QEMU cannot be had
//! (not root, not Debian, no network to deb.debian.org) it says why and skips.
//!
//! The kernel, QEMU and busybox come from Debian's packages through a private apt
//! configuration and are unpacked under `target/vm-cache` (see [`fetch`]); nothing is
//! installed on the host but the few tools the guest borrows from it (kmod, dmsetup, ...).

pub mod bench;
mod fetch;
mod initramfs;
mod qemu;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::cmd::Cmd;
use crate::paths::{target_dir, workspace_root};
use crate::tools::is_root;

use qemu::{Boot, Ending};

/// Host packages whose tools the guest uses from the host's root: modprobe and depmod (kmod),
/// dmsetup, LVM, mkfs.ext4, losetup, and xz to unpack the initramfs's modules.
const HOST_PACKAGES: &[&str] = &["kmod", "dmsetup", "lvm2", "e2fsprogs", "util-linux", "xz-utils", "dpkg"];

/// The guest's modprobe (the host's kmod, seen through 9p).
const MODPROBE: &str = "/sbin/modprobe";

#[derive(Args)]
pub struct VmTestArgs {
    /// Run this shell command in the guest instead of the scenario (from the workspace root)
    #[arg(long)]
    pub command: Option<String>,
    /// The guest scenarios to run in one boot, in order (scripts in xtask/src/vm/scenarios)
    #[arg(long, default_value = "smoke,ublk,lvm,kernel")]
    pub scenario: String,
    /// Kill the guest after this many seconds (two boots, if the first crashes, must fit in CI's
    /// 20 minutes; a passing run takes 1-2 minutes)
    #[arg(long, default_value_t = 480)]
    pub timeout: u64,
    /// Guest CPUs
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Guest memory in MiB (the overlay's upper layer, /tmp and /run live in it)
    #[arg(long, default_value_t = 2048)]
    pub memory: u32,
    /// Fetch and unpack the kernel, QEMU and busybox again even if cached
    #[arg(long)]
    pub refresh: bool,
    /// Use the tandem binary already in target/debug instead of building it first
    #[arg(long)]
    pub no_build: bool,
    /// Fail instead of skipping when the VM cannot be had (for CI)
    #[arg(long)]
    pub require: bool,
    /// Where downloads and unpacked packages are kept
    #[arg(long, default_value_os_t = workspace_root().join("target/vm-cache"))]
    pub cache: PathBuf,
    /// Where the boots' directories go (cleared first); `target/vm-test` when None. `vm-bench`
    /// uses its own, so that a vm-test run beside it cannot clear or overwrite its results.
    #[arg(skip)]
    pub runs: Option<PathBuf>,
}

/// Why the VM test cannot run here: printed as a SKIP line, exit 0 (unless `--require`).
#[derive(Debug)]
pub struct Skip(pub String);

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Skip {}

pub fn run(args: &VmTestArgs) -> Result<()> {
    skip_unless_required("vm-test", args.require, run_inner(args))
}

/// A [`Skip`] becomes a `SKIP <what>: ...` line, or an error with `--require`.
pub(crate) fn skip_unless_required(what: &str, require: bool, result: Result<()>) -> Result<()> {
    match result {
        Err(error) => match error.downcast_ref::<Skip>() {
            Some(skip) if !require => {
                println!("SKIP {what}: {skip}");
                Ok(())
            }
            Some(skip) => bail!("{what} cannot run (and --require was given): {skip}"),
            None => Err(error),
        },
        ok => ok,
    }
}

fn run_inner(args: &VmTestArgs) -> Result<()> {
    let total = Instant::now();
    preconditions()?;
    crate::apt::ensure(HOST_PACKAGES)?;

    println!("==> vm-test: guest kernel, QEMU and busybox (cache {})", args.cache.display());
    let guest = fetch::guest(&args.cache, args.refresh)?;
    println!(
        "vm-test: kernel {}, {} ({}); fetch {:.1} s (download {:.1} s, {:.1} MB; unpack + depmod {:.1} s)",
        guest.release,
        guest.qemu.version,
        guest.qemu.origin,
        guest.fetch_time.as_secs_f64(),
        guest.download_time.as_secs_f64(),
        guest.downloaded as f64 / 1e6,
        guest.fetch_time.saturating_sub(guest.download_time).as_secs_f64()
    );

    let initramfs = args.cache.join(format!("initramfs-{}.cpio", guest.release));
    initramfs::build(
        &initramfs,
        &guest.busybox,
        &initramfs::Settings { release: &guest.release, modules: &guest.modules, modprobe: MODPROBE },
    )?;

    let runs = args.runs.clone().unwrap_or_else(|| workspace_root().join("target/vm-test"));
    if runs.exists() {
        // A previous run's boot-2 must not be mistaken for this run's.
        std::fs::remove_dir_all(&runs).with_context(|| format!("clearing {}", runs.display()))?;
    }
    // The guest and a compiler must not share these cores: everything is built before booting.
    let command = match &args.command {
        Some(command) => command.clone(),
        None => scenario_command(&args.scenario, !args.no_build, &runs.join("bin"))?,
    };
    let script = guest_script(&command);

    let mut crashes = Vec::new();
    for attempt in 1..=2 {
        println!("==> vm-test: boot {attempt} ({} CPUs, {} MiB, timeout {} s)", args.cpus, args.memory, args.timeout);
        let boot = Boot {
            guest: &guest,
            initramfs: &initramfs,
            dir: runs.join(format!("boot-{attempt}")),
            command: script.clone(),
            cpus: args.cpus,
            memory_mib: args.memory,
            timeout: Duration::from_secs(args.timeout),
        };
        let report = boot.run()?;
        let timings = format!(
            "download {:.1} s, fetch with unpack {:.1} s, boot to command {}, command {}, this boot {:.1} s, total {:.1} s",
            guest.download_time.as_secs_f64(),
            guest.fetch_time.as_secs_f64(),
            seconds(report.boot_to_command),
            seconds(report.command_time),
            report.total.as_secs_f64(),
            total.elapsed().as_secs_f64()
        );
        match report.ending {
            Ending::Exited(0) => {
                println!("vm-test: PASSED ({timings})");
                return Ok(());
            }
            Ending::Exited(code) => {
                print_tail(&report.console);
                bail!(
                    "vm-test: the guest command FAILED with exit status {code} ({timings}); console: {}",
                    report.console.display()
                );
            }
            Ending::Crashed(lines) => {
                print_tail(&report.console);
                println!("vm-test: GUEST KERNEL CRASH on boot {attempt} ({timings}):\n{lines}");
                crashes.push(format!(
                    "boot {attempt}: {} ({})",
                    lines.lines().next().unwrap_or_default(),
                    report.console.display()
                ));
            }
            Ending::NoStatus(said) => {
                print_tail(&report.console);
                bail!(
                    "vm-test: the guest stopped without the command's exit status ({timings}):\n{said}\nconsole: {}",
                    report.console.display()
                );
            }
            Ending::TimedOut => {
                print_tail(&report.console);
                bail!(
                    "vm-test: the guest was still running after {} s and was killed ({timings}); console: {}",
                    args.timeout,
                    report.console.display()
                );
            }
        }
    }
    bail!("vm-test: the guest kernel crashed on both boots (not a test failure):\n{}", crashes.join("\n"))
}

/// What must hold before anything is fetched; each miss is a skip that says why.
fn preconditions() -> Result<()> {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return Err(Skip(
            "the guest is an x86_64 Debian kernel booted by qemu-system-x86_64: needs an x86_64 Linux host".into(),
        )
        .into());
    }
    if !is_root()? {
        return Err(Skip("needs root (the guest reads the host's whole root filesystem over 9p, and host tools are installed with apt)".into()).into());
    }
    for tool in ["apt-get", "apt-cache", "dpkg"] {
        if !Cmd::new("sh").args(["-c", &format!("command -v {tool}")]).succeeds() {
            return Err(Skip(format!(
                "no `{tool}` here: the kernel and QEMU are fetched from Debian's archive with apt (Debian 12 host)"
            ))
            .into());
        }
    }
    Ok(())
}

/// The guest command for the scenarios (comma-separated, run in order in one boot): build
/// what they run first, then their scripts, each with `sh -eu`.
fn scenario_command(names: &str, build: bool, bin: &Path) -> Result<String> {
    let dir = workspace_root().join("xtask/src/vm/scenarios");
    let mut scripts = Vec::new();
    for name in names.split(',').map(str::trim).filter(|name| !name.is_empty()) {
        let script = dir.join(format!("{name}.sh"));
        if !script.is_file() {
            bail!("no scenario {name}: {} does not exist", script.display());
        }
        scripts.push(script);
    }
    if scripts.is_empty() {
        bail!("no scenario given");
    }
    if build {
        Cmd::cargo().args(["build", "-p", "tandem"]).run().context("building tandem for the guest")?;
        Cmd::cargo()
            .args(["build", "-p", "tandem-frontend", "--example", "ublk_file"])
            .run()
            .context("building the ublk_file example for the guest")?;
    }
    let binaries = [("TANDEM", "debug/tandem"), ("UBLK_FILE", "debug/examples/ublk_file")];
    let mut command = String::new();
    std::fs::create_dir_all(bin).with_context(|| format!("creating {}", bin.display()))?;
    for (variable, built) in binaries {
        let built = target_dir().join(built);
        if !built.is_file() {
            bail!("{} does not exist: build it (or drop --no-build)", built.display());
        }
        // The guest reads the host's files live over 9p: a copy, so that a build finishing
        // while the guest runs cannot swap a binary under it.
        let path = bin.join(built.file_name().context("a binary path has a file name")?);
        std::fs::copy(&built, &path).with_context(|| format!("copying {} to {}", built.display(), path.display()))?;
        command.push_str(&format!("export {variable}={}\n", shell_quote(&path.display().to_string())));
    }
    command.push_str(&format!(
        "export DM_SETUP={}\n",
        shell_quote(&workspace_root().join("dm-setup").display().to_string())
    ));
    let runs: Vec<String> =
        scripts.iter().map(|script| format!("sh -eu {}", shell_quote(&script.display().to_string()))).collect();
    command.push_str(&runs.join(" && "));
    Ok(command)
}

/// The script stage 2 runs: environment for a guest without udev, then the command.
fn guest_script(command: &str) -> String {
    let mut script = String::from("# written by cargo xtask vm-test\n");
    // No udev in the guest: dmsetup and LVM must not wait for it.
    script.push_str("export DM_DISABLE_UDEV=1 RUST_BACKTRACE=1 TANDEM_VM=1\n");
    if let Ok(filter) = std::env::var("RUST_LOG") {
        script.push_str(&format!("export RUST_LOG={}\n", shell_quote(&filter)));
    }
    script.push_str(&format!("cd {}\n", shell_quote(&workspace_root().display().to_string())));
    script.push_str(command);
    script.push('\n');
    script
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn seconds(duration: Option<Duration>) -> String {
    duration.map(|d| format!("{:.1} s", d.as_secs_f64())).unwrap_or_else(|| "-".into())
}

/// The end of the guest's console, for a failure's context.
fn print_tail(console: &Path) {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    println!("--- last lines of {} ---", console.display());
    for line in &lines[lines.len().saturating_sub(60)..] {
        println!("{line}");
    }
    println!("---");
}
