//! One boot of the guest under QEMU (TCG: KVM is not usable on the machines this runs on), its
//! console followed live, and what the run came to.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::fetch::Guest;

/// Written by stage 2 just before the command runs, and after it.
const COMMAND_STARTS: &str = "tandem-vm: command starts";
const COMMAND_EXITS: &str = "tandem-vm: command exit status";

/// Console lines that mean the guest kernel itself failed. With `oops=panic` any of these ends
/// the boot at once.
const CRASH_MARKERS: &[&str] = &[
    "Kernel panic - not syncing",
    "Oops:",
    "BUG: ",
    "kernel BUG at",
    "general protection fault",
    "Unable to handle kernel",
    "watchdog: BUG: soft lockup",
    "rcu: INFO: rcu_preempt detected stalls",
    "rcu: INFO: rcu_sched detected stalls",
];

/// init exiting panics the kernel too, but that is our init script failing, not the kernel.
const INIT_DIED: &str = "Attempted to kill init";

pub struct Boot<'a> {
    pub guest: &'a Guest,
    pub initramfs: &'a Path,
    /// This attempt's directory: console log, QEMU's own log, the output share.
    pub dir: PathBuf,
    /// The shell script the guest runs (`/tandem-vm/out/command`).
    pub command: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub timeout: Duration,
}

/// How a boot ended.
pub enum Ending {
    /// The command ran and exited with this status.
    Exited(i32),
    /// The guest kernel crashed; the console lines that say so.
    Crashed(String),
    /// The guest stopped without running the command to its end, and not by a kernel crash
    /// (our init failed, QEMU failed to start...): what the console or QEMU said.
    NoStatus(String),
    /// Still running after the timeout: killed.
    TimedOut,
}

pub struct Report {
    pub ending: Ending,
    /// From QEMU's start to the command's start (None if it never started).
    pub boot_to_command: Option<Duration>,
    /// The command's run time, as seen on the host (None if it did not finish).
    pub command_time: Option<Duration>,
    /// QEMU's start to its exit.
    pub total: Duration,
    pub console: PathBuf,
}

impl Boot<'_> {
    pub fn run(&self) -> Result<Report> {
        if self.dir.exists() {
            fs::remove_dir_all(&self.dir).with_context(|| format!("clearing {}", self.dir.display()))?;
        }
        let out = self.dir.join("out");
        fs::create_dir_all(&out)?;
        fs::write(out.join("command"), &self.command)?;
        let console = self.dir.join("console.log");
        let qemu_log = self.dir.join("qemu.log");
        fs::write(&console, "")?;

        let mut command = self.command_line(&console, &out);
        println!("$ {}", shown(&command));
        let log = fs::File::create(&qemu_log)?;
        let start = Instant::now();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("could not start {}", self.guest.qemu.binary.display()))?;

        let mut follower = Follower::new(&console)?;
        let mut command_start = None;
        let mut command_end = None;
        let status = loop {
            let exited = child.try_wait()?;
            for line in follower.lines()? {
                if command_start.is_none() && line.contains(COMMAND_STARTS) {
                    command_start = Some(start.elapsed());
                }
                if line.contains(COMMAND_EXITS) {
                    command_end = Some(start.elapsed());
                }
                // Boot chatter stays in the log; the command's output and our own lines are shown.
                if command_start.is_some() || line.contains("tandem-vm:") || is_crash(&line) {
                    println!("guest| {line}");
                }
            }
            if let Some(status) = exited {
                break Some(status);
            }
            if start.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let total = start.elapsed();
        let text = fs::read_to_string(&console).unwrap_or_default();
        let crash: Vec<&str> = text.lines().filter(|line| is_crash(line)).collect();
        let ending = if !crash.is_empty() && !text.contains(INIT_DIED) {
            Ending::Crashed(crash.iter().take(8).copied().collect::<Vec<_>>().join("\n"))
        } else if status.is_none() {
            Ending::TimedOut
        } else {
            match fs::read_to_string(out.join("status")) {
                Ok(code) => Ending::Exited(
                    code.trim().parse().with_context(|| format!("the guest's status file says {code:?}"))?,
                ),
                Err(_) => {
                    let qemu_said = fs::read_to_string(&qemu_log).unwrap_or_default();
                    let said: Vec<&str> = text
                        .lines()
                        .filter(|line| line.contains("tandem-vm:") || line.contains(INIT_DIED))
                        .chain(qemu_said.lines())
                        .collect();
                    Ending::NoStatus(if said.is_empty() {
                        format!(
                            "QEMU exited ({}) with nothing on the console",
                            status.map(|s| s.to_string()).unwrap_or_default()
                        )
                    } else {
                        said.join("\n")
                    })
                }
            }
        };
        Ok(Report {
            ending,
            boot_to_command: command_start,
            command_time: command_start.zip(command_end).map(|(a, b)| b.saturating_sub(a)),
            total,
            console,
        })
    }

    fn command_line(&self, console: &Path, out: &Path) -> Command {
        let qemu = &self.guest.qemu;
        let mut command = Command::new(&qemu.binary);
        if let Some(path) = &qemu.library_path {
            command.env("LD_LIBRARY_PATH", path);
        }
        for dir in &qemu.firmware {
            command.arg("-L").arg(dir);
        }
        command
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
            .args(["-machine", "pc", "-accel", "tcg", "-cpu", "max"])
            .args(["-smp", &self.cpus.to_string(), "-m", &format!("{}M", self.memory_mib)])
            .arg("-kernel")
            .arg(&self.guest.vmlinuz)
            .arg("-initrd")
            .arg(self.initramfs)
            // hvc0 (virtio-console) is far faster than an emulated UART under TCG. oops=panic and
            // panic=-1 with -no-reboot turn any kernel crash into QEMU's exit, not a hang.
            .args(["-append", "console=hvc0 oops=panic panic=-1 panic_on_warn=0 loglevel=6"])
            .args(["-device", "virtio-serial-pci"])
            .arg("-chardev")
            .arg(format!("file,id=console,path={}", console.display()))
            .args(["-device", "virtconsole,chardev=console"])
            .args(["-virtfs", "local,path=/,mount_tag=hostroot,readonly=on,security_model=none,multidevs=remap"])
            .arg("-virtfs")
            .arg(format!("local,path={},mount_tag=out,security_model=none,multidevs=remap", out.display()));
        command
    }
}

fn is_crash(line: &str) -> bool {
    CRASH_MARKERS.iter().any(|marker| line.contains(marker))
}

fn shown(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(command.get_args().map(|arg| {
        let arg = arg.to_string_lossy();
        if arg.contains(' ') {
            format!("'{arg}'")
        } else {
            arg.into_owned()
        }
    }));
    words.join(" ")
}

/// Reads a growing file line by line.
struct Follower {
    file: fs::File,
    offset: u64,
    pending: String,
}

impl Follower {
    fn new(path: &Path) -> Result<Self> {
        Ok(Self { file: fs::File::open(path)?, offset: 0, pending: String::new() })
    }

    /// The complete lines written since the last call (without their newline or a trailing CR).
    fn lines(&mut self) -> Result<Vec<String>> {
        self.file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        self.file.read_to_end(&mut bytes)?;
        self.offset += bytes.len() as u64;
        self.pending.push_str(&String::from_utf8_lossy(&bytes));
        let mut lines = Vec::new();
        while let Some(end) = self.pending.find('\n') {
            let line: String = self.pending.drain(..=end).collect();
            lines.push(line.trim_end_matches(['\n', '\r']).to_string());
        }
        Ok(lines)
    }
}
