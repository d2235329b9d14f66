//! For `cargo xtask bench ebpf`: alternates, within one running workload, phases with one
//! volume's programs attached and phases with nothing attached, and prints each phase's write
//! IOPS on a block device. Switching takes microseconds (the programs stay loaded; only their
//! attachments are made and dropped), so phases can be short and neighbours see the same
//! background load: on a shared, noisy machine that is what makes an IOPS ratio of a few
//! percent measurable.
//!
//! ```text
//! attach_ab [--fresh] <device> <phase-ms> <settle-ms> <rounds> <volume>...
//! ```
//!
//! `--fresh`: before each phase with a volume attached, its record is cleared (toggle and clear
//! of every range), so that the phase's writes set new bits (the case of random writes over a
//! device much larger than what is written between two destages) rather than finding their
//! tracks marked already.
//!
//! The volumes must be loaded (`bpfctl load`) on `device`. Their link pins are removed at once
//! (this process then holds the attachments), so the volumes stay detached when it exits;
//! `bpfctl unpin` removes the rest. Output, one line per phase: `phase <n> <volume|none> <iops>`,
//! in the order N V1 N V2 N ... with the volumes' order reversed every other round.
//!
//! In-flight accounting is not kept across the switches (completions of bios queued while
//! attached can come while detached): after every detach, the volume's in-flight entries are
//! all released (`reap_stale(0)`), else they would pile up, fill the table and make every later
//! claim probe all its slots and fail (an untracked write, marked on both sides) — a cost the
//! programs do not have in use. The volumes are for measuring, not for destaging.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use libbpf_rs::libbpf_sys;
use tandem_bpf::{layout::pins, Flavor, Volume};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("attach_ab: {e}");
            ExitCode::FAILURE
        }
    }
}

fn os_err(what: String) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// A volume's programs, loaded, and how to attach them as its loader did.
struct Programs {
    name: String,
    volume: Volume,
    flavor: Flavor,
    /// (program fd, tracepoint name), completions first: the loader's order.
    progs: Vec<(OwnedFd, &'static str)>,
}

/// The tracepoint of each link pin.
const EVENTS: [(&str, &str); 4] = [
    (pins::LINK_RQ_COMPLETE, "block_rq_complete"),
    (pins::LINK_BIO_COMPLETE, "block_bio_complete"),
    (pins::LINK_SPLIT, "block_split"),
    (pins::LINK_QUEUE, "block_bio_queue"),
];

impl Programs {
    /// Takes the programs behind a volume's pinned links and removes the pins: attached until
    /// the returned attachments are dropped.
    fn take(name: &str) -> Result<(Programs, Vec<OwnedFd>), String> {
        let volume = Volume::open(name).map_err(|e| e.to_string())?;
        let flavor = volume.flavor().ok_or_else(|| format!("{name}: unknown flavour"))?;
        let mut progs = Vec::new();
        let mut links = Vec::new();
        for (pin, event) in EVENTS {
            let path = volume.pin_dir().join(pin);
            let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
            // SAFETY: a valid C string; the fd returned is ours.
            let fd = unsafe { libbpf_sys::bpf_obj_get(c.as_ptr()) };
            if fd < 0 {
                return Err(format!("opening {}: error {fd}", path.display()));
            }
            // SAFETY: a fresh fd nobody else owns.
            let link = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: zeroed is a valid bpf_link_info; the kernel fills it.
            let mut info: libbpf_sys::bpf_link_info = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libbpf_sys::bpf_link_info>() as u32;
            // SAFETY: valid fd and out pointers of the right size.
            let rc = unsafe { libbpf_sys::bpf_link_get_info_by_fd(link.as_raw_fd(), &mut info, &mut len) };
            if rc != 0 {
                return Err(format!("link info of {}: error {rc}", path.display()));
            }
            // SAFETY: no pointers.
            let pfd = unsafe { libbpf_sys::bpf_prog_get_fd_by_id(info.prog_id) };
            if pfd < 0 {
                return Err(format!("program {} of {}: error {pfd}", info.prog_id, path.display()));
            }
            // SAFETY: a fresh fd nobody else owns.
            progs.push((unsafe { OwnedFd::from_raw_fd(pfd) }, event));
            links.push(link);
        }
        for (pin, _) in EVENTS {
            let path = volume.pin_dir().join(pin);
            fs::remove_file(&path).map_err(|e| format!("removing {}: {e}", path.display()))?;
        }
        Ok((Programs { name: name.to_owned(), volume, flavor, progs }, links))
    }

    /// Empties both sides of every range. Detached, so nothing is in flight on the sides: a
    /// toggle finds the old side cleared by the previous call and has nothing to move.
    fn clear(&self) -> Result<(), String> {
        for r in 0..self.volume.range_count() {
            self.volume.toggle(r).map_err(|e| e.to_string())?;
            self.volume.clear_old(r).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Attaches every program; dropping the fds detaches them.
    fn attach(&self) -> Result<Vec<OwnedFd>, String> {
        self.progs.iter().map(|(prog, event)| attach_one(self.flavor, prog, event)).collect()
    }
}

fn attach_one(flavor: Flavor, prog: &OwnedFd, event: &str) -> Result<OwnedFd, String> {
    match flavor {
        Flavor::TpBtf => {
            // SAFETY: a program fd; NULL name: the tracepoint is the program's attach target.
            let fd = unsafe { libbpf_sys::bpf_raw_tracepoint_open(std::ptr::null(), prog.as_raw_fd()) };
            if fd < 0 {
                return Err(format!("attaching to {event}: error {fd}"));
            }
            // SAFETY: a fresh fd nobody else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        }
        Flavor::Classic => {
            let id = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
                .iter()
                .find_map(|t| fs::read_to_string(Path::new(t).join("events/block").join(event).join("id")).ok())
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| format!("no tracepoint id for block/{event}"))?;
            // SAFETY: zeroed is a valid perf_event_attr.
            let mut attr: libbpf_sys::perf_event_attr = unsafe { std::mem::zeroed() };
            attr.type_ = libbpf_sys::PERF_TYPE_TRACEPOINT;
            attr.size = std::mem::size_of::<libbpf_sys::perf_event_attr>() as u32;
            attr.config = id;
            attr.__bindgen_anon_1.sample_period = 1;
            const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
            // pid -1, cpu 0: a tracepoint's BPF program runs on every CPU (as libbpf attaches it).
            // SAFETY: a valid attr pointer.
            let fd =
                unsafe { libc::syscall(libc::SYS_perf_event_open, &attr as *const _, -1, 0, -1, PERF_FLAG_FD_CLOEXEC) }
                    as i32;
            if fd < 0 {
                return Err(os_err(format!("perf_event_open of block/{event}")));
            }
            // SAFETY: a fresh fd nobody else owns.
            let pfd = unsafe { OwnedFd::from_raw_fd(fd) };
            const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
            const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
            // SAFETY: ioctls on our perf event fd with an int argument.
            if unsafe { libc::ioctl(pfd.as_raw_fd(), PERF_EVENT_IOC_SET_BPF as _, prog.as_raw_fd()) } != 0 {
                return Err(os_err(format!("attaching to block/{event}")));
            }
            // SAFETY: as above.
            if unsafe { libc::ioctl(pfd.as_raw_fd(), PERF_EVENT_IOC_ENABLE as _, 0) } != 0 {
                return Err(os_err(format!("enabling block/{event}")));
            }
            Ok(pfd)
        }
    }
}

/// Writes the device has completed (`/sys/block/<dev>/stat`, field 5).
fn writes(stat: &Path) -> Result<u64, String> {
    let text = fs::read_to_string(stat).map_err(|e| format!("reading {}: {e}", stat.display()))?;
    text.split_whitespace().nth(4).and_then(|n| n.parse().ok()).ok_or_else(|| format!("{}: {text:?}", stat.display()))
}

fn run(args: &[String]) -> Result<(), String> {
    let (fresh, args) = match args {
        [flag, rest @ ..] if flag == "--fresh" => (true, rest),
        _ => (false, args),
    };
    let [device, phase, settle, rounds, volumes @ ..] = args else {
        return Err("usage: attach_ab [--fresh] <device> <phase-ms> <settle-ms> <rounds> <volume>...".into());
    };
    let number = |s: &str, what: &str| s.parse::<u64>().map_err(|_| format!("{what}: {s:?} is not a number"));
    let phase = Duration::from_millis(number(phase, "phase")?);
    let settle = Duration::from_millis(number(settle, "settle")?);
    let rounds = number(rounds, "rounds")?;
    if volumes.is_empty() {
        return Err("no volume".into());
    }
    let dev = Path::new(device).file_name().ok_or("bad device path")?.to_string_lossy().into_owned();
    let stat = Path::new("/sys/block").join(&dev).join("stat");

    let mut all = Vec::new();
    for name in volumes {
        let (programs, links) = Programs::take(name)?;
        drop(links); // detached from here on
        all.push(programs);
    }
    let mut plan: Vec<Option<usize>> = vec![None];
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..all.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for v in order {
            plan.push(Some(v));
            plan.push(None);
        }
    }
    for (n, step) in plan.iter().enumerate() {
        let attached = match step {
            Some(v) => {
                if fresh {
                    all[*v].clear()?;
                }
                all[*v].attach()?
            }
            None => Vec::new(),
        };
        std::thread::sleep(settle);
        let (w0, t0) = (writes(&stat)?, Instant::now());
        std::thread::sleep(phase);
        let (w1, t1) = (writes(&stat)?, Instant::now());
        // The queue program first, as the loader's unpin does.
        let was_attached = !attached.is_empty();
        for fd in attached.into_iter().rev() {
            drop(fd);
        }
        if let Some(v) = step.filter(|_| was_attached) {
            all[v].volume.reap_stale(Duration::ZERO).map_err(|e| e.to_string())?;
        }
        let iops = w1.saturating_sub(w0) as f64 / (t1 - t0).as_secs_f64();
        println!("phase {} {} {iops:.0}", n + 1, step.map(|v| all[v].name.as_str()).unwrap_or("none"));
    }
    Ok(())
}
