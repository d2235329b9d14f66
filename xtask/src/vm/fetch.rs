//! The guest kernel, QEMU and busybox, fetched from Debian with a private apt configuration.
//!
//! Nothing here touches the host's apt state: the sources list, preferences, package lists,
//! archive cache, locks and the dpkg status file apt resolves against are all under the cache
//! directory (`-o Dir::...`). The status file is a copy of the host's, so apt downloads only
//! the QEMU dependencies the host lacks; the packages are unpacked with `dpkg -x`, never
//! installed. Each unpacked tree gets a stamp file once complete, so a second run reuses it
//! without touching the network.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::Skip;

/// Where Debian's packages come from. bookworm-backports carries the 6.12 kernel (bookworm's own
/// 6.1 is built without ublk) and QEMU 10 (2-3× faster than bookworm's 7.2 on fork-heavy guests).
const MIRROR: &str = "http://deb.debian.org/debian";
const SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const BACKPORTS: &str = "bookworm-backports";

/// The file written into an unpacked tree once it is complete; it holds what was unpacked.
const STAMP: &str = ".tandem-complete";

/// Everything the guest needs, unpacked under the cache directory.
pub struct Guest {
    /// `vmlinuz` of the guest kernel.
    pub vmlinuz: PathBuf,
    /// Its release (`uname -r` in the guest), e.g. `6.12.95+deb12-amd64`.
    pub release: String,
    /// `lib/modules/<release>` with a `modules.dep` made by the host's depmod.
    pub modules: PathBuf,
    pub qemu: Qemu,
    /// A statically linked busybox for the initramfs.
    pub busybox: PathBuf,
    /// Time spent fetching and unpacking (zero when everything came from the cache).
    pub fetch_time: Duration,
    /// Of which in apt (package lists and downloads).
    pub download_time: Duration,
    /// Bytes downloaded in this run.
    pub downloaded: u64,
}

/// How to run QEMU.
pub struct Qemu {
    pub binary: PathBuf,
    /// `LD_LIBRARY_PATH` for the libraries unpacked beside it (empty for a host-installed QEMU).
    pub library_path: Option<String>,
    /// Firmware directories (`-L`): SeaBIOS and QEMU's option ROMs.
    pub firmware: Vec<PathBuf>,
    /// `qemu-system-x86_64 --version`, first line.
    pub version: String,
    /// Where it came from, for the report.
    pub origin: String,
}

/// Fetches (or finds in `cache`) the guest kernel, QEMU and busybox.
pub fn guest(cache: &Path, refresh: bool) -> Result<Guest> {
    fs::create_dir_all(cache).with_context(|| format!("creating the VM cache {}", cache.display()))?;
    let start = Instant::now();
    let mut apt = PrivateApt::new(cache.join("apt"));
    let mut downloaded = 0;

    let kernel_dir = cache.join("kernel");
    if refresh || stamp(&kernel_dir).is_none() {
        downloaded += fetch_kernel(&mut apt, &kernel_dir)?;
    }
    let release = stamp(&kernel_dir).context("the kernel tree has no stamp after unpacking")?;
    let release = release.trim().to_string();

    let busybox_dir = cache.join("busybox");
    if refresh || stamp(&busybox_dir).is_none() {
        downloaded += fetch_package(&mut apt, "busybox-static", None, &busybox_dir)?;
    }
    let busybox = busybox_dir.join("bin/busybox");
    if !busybox.is_file() {
        bail!("busybox-static unpacked into {} has no bin/busybox", busybox_dir.display());
    }

    let qemu_dir = cache.join("qemu");
    let qemu = match (refresh, stamp(&qemu_dir)) {
        (false, Some(_)) => unpacked_qemu(&qemu_dir),
        _ => {
            downloaded += fetch_qemu(&mut apt, &qemu_dir)?;
            unpacked_qemu(&qemu_dir)
        }
    };
    let qemu = match qemu {
        Ok(qemu) => qemu,
        Err(error) => {
            // A backports QEMU whose libraries do not load unpacked (a host library older than
            // what it was built against) is replaced by bookworm's own, installed with the
            // host's apt: slower on fork-heavy guests, but it runs.
            println!("vm-test: the unpacked bookworm-backports QEMU does not run ({error:#}); using bookworm's qemu-system-x86 from the host's apt");
            host_qemu()?
        }
    };

    let modules = kernel_dir.join("lib/modules").join(&release);
    let vmlinuz = kernel_dir.join("boot").join(format!("vmlinuz-{release}"));
    Ok(Guest {
        vmlinuz,
        release,
        modules,
        qemu,
        busybox,
        fetch_time: start.elapsed(),
        download_time: apt.spent,
        downloaded,
    })
}

/// A bookworm package (e.g. `drbd-utils` for `cargo xtask vm-bench`) fetched with the same
/// private apt configuration and unpacked with `dpkg -x` into `cache/<package>`, reused once
/// stamped. Returns that directory and the bytes downloaded (0 when it came from the cache).
pub fn package(cache: &Path, package: &str, refresh: bool) -> Result<(PathBuf, u64)> {
    fs::create_dir_all(cache).with_context(|| format!("creating the VM cache {}", cache.display()))?;
    let dir = cache.join(package);
    let mut downloaded = 0;
    if refresh || stamp(&dir).is_none() {
        let mut apt = PrivateApt::new(cache.join("apt"));
        downloaded = fetch_package(&mut apt, package, None, &dir)?;
    }
    Ok((dir, downloaded))
}

/// The content of `dir`'s stamp file, if the tree is complete.
fn stamp(dir: &Path) -> Option<String> {
    fs::read_to_string(dir.join(STAMP)).ok()
}

/// apt-get and apt-cache with every piece of state under `root`.
struct PrivateApt {
    root: PathBuf,
    updated: bool,
    /// Time spent in apt-get and apt-cache.
    spent: Duration,
}

impl PrivateApt {
    fn new(root: PathBuf) -> Self {
        Self { root, updated: false, spent: Duration::ZERO }
    }

    fn options(&self) -> Vec<String> {
        let r = self.root.display();
        [
            format!("Dir::Etc::SourceList={r}/etc/sources.list"),
            format!("Dir::Etc::SourceParts={r}/etc/sources.list.d"),
            // The host's pins must not steer what we fetch.
            format!("Dir::Etc::Preferences={r}/etc/preferences"),
            format!("Dir::Etc::PreferencesParts={r}/etc/preferences.d"),
            format!("Dir::State={r}/state"),
            format!("Dir::State::Lists={r}/lists"),
            // Also where apt takes its dpkg locks: this directory, not /var/lib/dpkg.
            format!("Dir::State::status={r}/state/status"),
            format!("Dir::Cache={r}/cache"),
            format!("Dir::Log={r}/log"),
            "APT::Default-Release=".to_string(),
            // The downloads land in root-owned directories the `_apt` user cannot write.
            "APT::Sandbox::User=root".to_string(),
            "Acquire::Retries=3".to_string(),
        ]
        .into_iter()
        .flat_map(|option| ["-o".to_string(), option])
        .collect()
    }

    /// Runs an apt command built by [`Self::command`], timing it.
    fn run(&mut self, command: &mut Command) -> Result<Captured> {
        let start = Instant::now();
        let output = run_captured(command);
        self.spent += start.elapsed();
        output
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.args(self.options()).env("DEBIAN_FRONTEND", "noninteractive");
        command
    }

    /// Writes the private configuration and downloads the package lists (once per run).
    fn update(&mut self) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        if !Path::new(KEYRING).is_file() {
            return Err(Skip(format!(
                "{KEYRING} is missing (package debian-archive-keyring): cannot verify Debian's archive"
            ))
            .into());
        }
        for dir in
            ["etc/sources.list.d", "etc/preferences.d", "state", "lists/partial", "cache/archives/partial", "log"]
        {
            fs::create_dir_all(self.root.join(dir))?;
        }
        let sources: String = [
            (MIRROR, "bookworm"),
            (MIRROR, "bookworm-updates"),
            (MIRROR, BACKPORTS),
            (SECURITY_MIRROR, "bookworm-security"),
        ]
        .iter()
        .map(|(mirror, suite)| format!("deb [signed-by={KEYRING}] {mirror} {suite} main\n"))
        .collect();
        fs::write(self.root.join("etc/sources.list"), sources)?;
        fs::write(self.root.join("etc/preferences"), "")?;
        // apt resolves dependencies against this copy of the host's dpkg status, so it fetches
        // only what the host lacks; apt's dpkg locks are taken beside it, not in /var/lib/dpkg.
        fs::copy("/var/lib/dpkg/status", self.root.join("state/status")).context("copying the host's dpkg status")?;
        let mut command = self.command("apt-get");
        command.arg("update");
        let output = self.run(&mut command)?;
        // apt-get update exits 0 even when a source could not be fetched: look for the lists.
        let lists = fs::read_dir(self.root.join("lists"))?
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect::<Vec<_>>();
        let has =
            |suite: &str| lists.iter().any(|name| name.contains(&format!("_dists_{suite}_main_binary-amd64_Packages")));
        if !output.success || !has("bookworm") || !has(BACKPORTS) {
            return Err(Skip(format!(
                "cannot fetch Debian's package lists from {MIRROR} (bookworm, {BACKPORTS}): {}",
                last_lines(&output.text, 4)
            ))
            .into());
        }
        self.updated = true;
        Ok(())
    }

    /// `apt-cache show PACKAGE/SUITE`'s first stanza field `field`.
    fn field(&mut self, package: &str, field: &str) -> Result<String> {
        self.update()?;
        let mut command = self.command("apt-cache");
        command.args(["show", package]);
        let output = self.run(&mut command)?;
        if !output.success {
            bail!("apt-cache show {package}: {}", last_lines(&output.text, 4));
        }
        let prefix = format!("{field}: ");
        output
            .text
            .lines()
            .find_map(|line| line.strip_prefix(&prefix).map(str::to_string))
            .with_context(|| format!("apt-cache show {package} has no {field} field"))
    }

    /// Downloads `package` (`name` or `name/suite`) into `dir`; returns the .deb's path.
    fn download(&mut self, package: &str, dir: &Path) -> Result<PathBuf> {
        self.update()?;
        fs::create_dir_all(dir)?;
        clear_debs(dir)?;
        let mut command = self.command("apt-get");
        command.arg("download").arg(package).current_dir(dir);
        let output = self.run(&mut command)?;
        if !output.success {
            return Err(Skip(format!("cannot download {package}: {}", last_lines(&output.text, 4))).into());
        }
        debs(dir)?
            .into_iter()
            .next()
            .with_context(|| format!("apt-get download {package} left no .deb in {}", dir.display()))
    }
}

/// The kernel: `linux-image-amd64` from backports names the versioned image package.
fn fetch_kernel(apt: &mut PrivateApt, dir: &Path) -> Result<u64> {
    let meta = format!("linux-image-amd64/{BACKPORTS}");
    let depends = apt.field(&meta, "Depends")?;
    // "linux-image-6.12.95+deb12-amd64 (= 6.12.95-1~bpo12+1)"
    let image = depends
        .split([',', ' '])
        .find(|word| word.starts_with("linux-image-"))
        .with_context(|| format!("{meta} depends on no linux-image package: {depends}"))?
        .to_string();
    let release = image.trim_start_matches("linux-image-").to_string();
    let bytes = fetch_package(apt, &format!("{image}/{BACKPORTS}"), Some(&release), dir)?;
    let modules = dir.join("lib/modules").join(&release);
    if !modules.is_dir() || !dir.join("boot").join(format!("vmlinuz-{release}")).is_file() {
        bail!("{image} unpacked into {} has no vmlinuz-{release} or lib/modules/{release}", dir.display());
    }
    // Debian's package ships no modules.dep (its postinst runs depmod): make it, so the
    // initramfs can order its modules and modprobe works in the guest.
    let mut depmod = Command::new("depmod");
    depmod.arg("-b").arg(dir).arg(&release);
    let output = run_captured(&mut depmod)?;
    if !output.success {
        bail!("depmod -b {} {release}: {}", dir.display(), last_lines(&output.text, 4));
    }
    Ok(bytes)
}

/// Downloads `package` and unpacks it into `dir` (replacing it); stamps it with `stamp_text`
/// (default: the package name). Returns the bytes downloaded.
fn fetch_package(apt: &mut PrivateApt, package: &str, stamp_text: Option<&str>, dir: &Path) -> Result<u64> {
    let debs_dir = dir.with_extension("debs");
    let deb = apt.download(package, &debs_dir)?;
    let bytes = fs::metadata(&deb)?.len();
    unpack(&[deb], dir)?;
    fs::write(dir.join(STAMP), stamp_text.unwrap_or(package))?;
    // The unpacked tree is the cache; the package itself (106 MB for the kernel) is not needed.
    fs::remove_dir_all(&debs_dir).with_context(|| format!("removing {}", debs_dir.display()))?;
    Ok(bytes)
}

/// QEMU from backports with the dependencies the host lacks, resolved by apt against a copy of
/// the host's dpkg status and downloaded (never installed) into the private archive cache.
fn fetch_qemu(apt: &mut PrivateApt, dir: &Path) -> Result<u64> {
    apt.update()?;
    let archives = apt.root.join("cache/archives");
    clear_debs(&archives)?;
    let mut command = apt.command("apt-get");
    command.args(["install", "--download-only", "--no-install-recommends", "-y", "-t", BACKPORTS, "qemu-system-x86"]);
    let output = apt.run(&mut command)?;
    if !output.success {
        return Err(
            Skip(format!("cannot download qemu-system-x86 from {BACKPORTS}: {}", last_lines(&output.text, 6))).into()
        );
    }
    let debs = debs(&archives)?;
    if !debs.iter().any(|deb| file_name(deb).starts_with("qemu-system-x86_")) {
        bail!("apt downloaded no qemu-system-x86 into {}", archives.display());
    }
    let bytes = debs.iter().map(|deb| fs::metadata(deb).map(|m| m.len()).unwrap_or(0)).sum();
    unpack(&debs, dir)?;
    let names: Vec<String> = debs.iter().map(|deb| file_name(deb)).collect();
    fs::write(dir.join(STAMP), names.join("\n"))?;
    Ok(bytes)
}

/// The unpacked QEMU, if it runs.
fn unpacked_qemu(dir: &Path) -> Result<Qemu> {
    let binary = dir.join("usr/bin/qemu-system-x86_64");
    let library_path = [dir.join("usr/lib/x86_64-linux-gnu"), dir.join("lib/x86_64-linux-gnu")]
        .iter()
        .filter(|path| path.is_dir())
        .map(|path| path.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let firmware = ["usr/share/qemu", "usr/share/seabios", "usr/lib/ipxe/qemu"]
        .iter()
        .map(|sub| dir.join(sub))
        .filter(|path| path.is_dir())
        .collect();
    let version = qemu_version(&binary, Some(&library_path))?;
    Ok(Qemu {
        binary,
        library_path: Some(library_path),
        firmware,
        version,
        origin: format!("Debian {BACKPORTS}, unpacked with dpkg -x into {}", dir.display()),
    })
}

/// bookworm's QEMU, installed by the host's apt (the fallback when the unpacked one cannot run).
fn host_qemu() -> Result<Qemu> {
    crate::apt::ensure(&["qemu-system-x86"])?;
    let binary = PathBuf::from("/usr/bin/qemu-system-x86_64");
    let version = qemu_version(&binary, None)?;
    Ok(Qemu { binary, library_path: None, firmware: Vec::new(), version, origin: "the host's apt (bookworm)".into() })
}

fn qemu_version(binary: &Path, library_path: Option<&str>) -> Result<String> {
    let mut command = Command::new(binary);
    command.arg("--version");
    if let Some(path) = library_path {
        command.env("LD_LIBRARY_PATH", path);
    }
    let output = run_captured(&mut command)?;
    if !output.success {
        bail!("{} --version: {}", binary.display(), last_lines(&output.text, 4));
    }
    Ok(output.text.lines().next().unwrap_or_default().to_string())
}

/// `dpkg -x` each package into a fresh `dir` (built beside it, then renamed into place, so an
/// interrupted unpack never looks complete).
fn unpack(debs: &[PathBuf], dir: &Path) -> Result<()> {
    let partial = dir.with_extension("partial");
    if partial.exists() {
        fs::remove_dir_all(&partial)?;
    }
    fs::create_dir_all(&partial)?;
    for deb in debs {
        let mut command = Command::new("dpkg");
        command.arg("-x").arg(deb).arg(&partial);
        let output = run_captured(&mut command)?;
        if !output.success {
            bail!("dpkg -x {} {}: {}", deb.display(), partial.display(), last_lines(&output.text, 4));
        }
    }
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing the old {}", dir.display()))?;
    }
    fs::rename(&partial, dir)?;
    Ok(())
}

fn debs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut debs: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .collect();
    debs.sort();
    Ok(debs)
}

fn clear_debs(dir: &Path) -> Result<()> {
    for deb in debs(dir)? {
        fs::remove_file(&deb)?;
    }
    Ok(())
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default()
}

/// A finished command's exit and its stdout + stderr.
struct Captured {
    success: bool,
    text: String,
}

/// Runs `command` (echoed first) with its output captured, so a failure can be quoted in one line.
fn run_captured(command: &mut Command) -> Result<Captured> {
    let shown = format!("{} {}", command.get_program().to_string_lossy(), {
        // The private apt's dozen `-o Dir::...` options would drown the line.
        let args: Vec<String> = command.get_args().map(|arg| arg.to_string_lossy().into_owned()).collect();
        let mut shown = Vec::new();
        let mut skip = false;
        for arg in &args {
            if skip {
                skip = false;
                continue;
            }
            if arg == "-o" {
                skip = true;
                continue;
            }
            shown.push(arg.clone());
        }
        shown.join(" ")
    });
    println!("$ {shown}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", command.get_program().to_string_lossy()))?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Ok(Captured { success: output.status.success(), text })
}

fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|line| !line.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(count)..].join(" | ")
}
