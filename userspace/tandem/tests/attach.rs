//! Attach mode (docs/attach.md): node 0 replicates a loop device it does not sit in front of,
//! carrying a mounted ext4 under a write load; node 1 is an ordinary file-backed secondary in
//! the other network namespace. Snapshot points taken during and after the load must leave a
//! secondary that `verify` finds identical, whose copy passes `e2fsck -fn` and holds every
//! file with its last content. Bad attach configurations are refused with the field and the
//! reason, and change nothing. The end-to-end test needs root; elsewhere it says why it skips.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A loop device over a file, detached when dropped.
struct LoopDevice(String);

impl LoopDevice {
    fn new(file: &Path, read_only: bool) -> LoopDevice {
        let mut args = vec!["--show", "-f"];
        if read_only {
            args.push("-r");
        }
        args.push(file.to_str().unwrap());
        LoopDevice(sh("losetup", &args).trim().to_owned())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Rewrites node `n`'s configuration for attach mode: `attach = device` instead of its
/// backing file, and no FUSE mount point (the harness gives it a kernel record pin of its own).
fn attach_config(n: &Node, device: &str) {
    let text = std::fs::read_to_string(&n.config).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("data = ") {
            out += &format!("attach = \"{device}\"\n");
        } else if !line.starts_with("mountpoint = ") {
            out += line;
            out += "\n";
        }
    }
    std::fs::write(&n.config, out).unwrap();
}

fn tandem_out(n: &Node, args: &[&str]) -> std::process::Output {
    Command::new(TANDEM).args(["-c", n.config.to_str().unwrap()]).args(args).output().unwrap()
}

fn snapshot_point(n: &Node, more: &[&str]) -> String {
    let mut args = vec!["snapshot-point", "--timeout", "60s"];
    args.extend_from_slice(more);
    let out = tandem_out(n, &args);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "snapshot-point failed: {stdout}{stderr}\n{:#}", n.status().unwrap_or_default());
    assert!(stdout.contains("snapshot point") && stdout.contains("thawed"), "{stdout}");
    stdout.into_owned()
}

fn attach_view(n: &Node) -> Value {
    n.status().map(|s| s["attach"].clone()).unwrap_or_default()
}

/// Node 0 attached, shipping done: connected, in sync, nothing dirty in the kernel map.
fn current(n0: &Node, n1: &Node) -> bool {
    connected(n0) && connected(n1) && attach_view(n0)["state"] == "current" && attach_view(n0)["dirty_tracks"] == 0
}

/// Writes files of 1 MiB into `dir` until stopped: overwrites in place, replacements by
/// rename, and now and then an fsync. Keeps the fingerprint of each file's last content.
fn file_load(
    dir: PathBuf,
    stop: Arc<AtomicBool>,
    files: Arc<Mutex<BTreeMap<String, String>>>,
) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        let mut seed = 1u32;
        while !stop.load(Ordering::Relaxed) {
            let name = format!("f{:02}", seed.wrapping_mul(7) % 24);
            let data = file_content(seed);
            let path = dir.join(&name);
            if seed.is_multiple_of(3) {
                let tmp = dir.join(format!("{name}.tmp"));
                std::fs::write(&tmp, &data).unwrap();
                std::fs::rename(&tmp, &path).unwrap();
            } else {
                std::fs::write(&path, &data).unwrap();
            }
            if seed.is_multiple_of(5) {
                std::fs::File::open(&path).unwrap().sync_all().unwrap();
            }
            files.lock().unwrap().insert(name, format!("{:x}", fingerprint(&data)));
            seed += 1;
        }
        seed - 1
    })
}

#[test]
fn attach_mode_replicates_ext4_under_load_and_verify_finds_no_difference_after_a_snapshot_point() {
    attach_scenario("memory");
}

#[test]
fn attach_mode_in_disk_mode_replicates_ext4_under_load_and_verify_finds_no_difference() {
    attach_scenario("disk");
}

fn attach_scenario(mode: &str) {
    if !can_run() {
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The application's device: ext4 on a loop device, with its inode tables and journal
    // initialised at mkfs time (no lazy init writing behind the test's back later).
    let image = d.join("app.img");
    std::fs::File::create(&image).unwrap().set_len(64 << 20).unwrap();
    sh("mkfs.ext4", &["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", image.to_str().unwrap()]);
    let device = LoopDevice::new(&image, false);
    let app = Mounted::new(&device.0, d.join("app"));
    std::fs::write(app.0.join("before"), b"written before the daemon started").unwrap();
    sh("sync", &[]);

    let net = network();
    let mut n0 = Node::with(d, 0, &net, SECRET, mode);
    let mut n1 = Node::with(d, 1, &net, SECRET, mode);
    attach_config(&n0, &device.0);
    n1.start();
    n0.start();
    let s = n0.status().unwrap();
    assert_eq!((&s["role"], &s["device"]), (&json!("Primary"), &json!(device.0)), "{s:#}");
    wait("the first full copy", || current(&n0, &n1));
    let first = attach_view(&n0);
    assert!(first["shipped_tracks"].as_u64().unwrap() >= 1024, "every track was shipped once: {first:#}");

    // A write load on the mounted filesystem, and a snapshot point in the middle of it.
    let stop = Arc::new(AtomicBool::new(false));
    let files = Arc::new(Mutex::new(BTreeMap::new()));
    let load = file_load(app.0.clone(), stop.clone(), files.clone());
    std::thread::sleep(Duration::from_secs(2));
    let during = snapshot_point(&n0, &[]);
    eprintln!("during the load: {during}");
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let written = load.join().unwrap();
    assert!(written > 20, "the load wrote only {written} files");
    // The last one copies the secondary's image while the filesystem is frozen and the
    // secondary holds everything: the copy is the snapshot point's image.
    let copy = d.join("secondary-copy.img");
    let cp = format!("cp {} {}", n1.image().display(), copy.display());
    let last = snapshot_point(&n0, &["--exec", &cp]);
    assert!(last.contains(&format!("`{cp}` ran")), "{last}");
    eprintln!("after the load: {last}");
    let view = attach_view(&n0);
    assert!(view["cycles"].as_u64().unwrap() > 1 && view["last_snapshot_point"] == json!(last.trim()), "{view:#}");

    // Thawing writes the superblock: let that be shipped before comparing.
    wait("the shipping to settle", || current(&n0, &n1));

    // The replicas are identical, track by track.
    let out = tandem_out(&n0, &["verify", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("verify printed no report ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{report:#}\n{:#}", n0.status().unwrap());
    assert_eq!((&report["compared"], &report["differing_tracks"]), (&json!(1024), &json!(0)), "{report:#}");

    // The secondary's image is a consistent ext4 holding every file's last content.
    let expected: Vec<(String, String)> = {
        let mut v: Vec<_> = files.lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.push(("before".into(), format!("{:x}", fingerprint(b"written before the daemon started"))));
        v.sort();
        v
    };
    assert_eq!(checksums(&app.0), expected, "the primary's files");
    let copy_device = LoopDevice::new(&copy, true);
    let fsck = Command::new("e2fsck").args(["-fn", &copy_device.0]).output().unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn of the secondary's copy: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let at = d.join("copy");
    std::fs::create_dir_all(&at).unwrap();
    sh("mount", &["-o", "ro", &copy_device.0, at.to_str().unwrap()]);
    let sums = checksums(&at);
    let _ = Command::new("umount").arg(&at).status();
    assert_eq!(sums, expected, "the secondary's copy holds every file's last content");

    // Attached, the node refuses what would write under the application.
    let out = tandem_out(&n0, &["secondary"]);
    assert!(!out.status.success(), "an attached node stays primary");
    assert!(String::from_utf8_lossy(&out.stderr).contains("attached device"), "{out:?}");

    // A snapshot point that cannot be reached in time still thaws, and says so.
    let out = tandem_out(&n0, &["snapshot-point", "--timeout", "1s", "--exec", "sleep 30"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("did not finish in time") && stderr.contains("was thawed"), "{stderr}");
    assert_writable(&app.0);
    // Without a peer to ship to, nothing is frozen.
    n1.kill();
    wait("node 0 to lose node 1", || n0.peer()["connection"] != "Connected");
    let out = tandem_out(&n0, &["snapshot-point"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("no peer takes writes now"), "{stderr}");
    assert_writable(&app.0);
    n1.start();
    wait("node 1 to come back", || current(&n0, &n1));

    // Killed (`kill -9`), then stopped with `down`: each time the application writes on
    // while no daemon runs, the pinned programs record it, and the restarted node (a new
    // generation ahead of the secondary's) ships just that. The replicas end identical.
    n0.kill();
    restart_and_compare(&mut n0, &n1, &app.0, "after-kill");
    n0.tandem(&["down"]);
    let status = n0.daemon.take().unwrap().wait().unwrap();
    assert!(status.success(), "the attached node (always primary) exits cleanly after down");
    assert!(n0.pin_dir().exists(), "down leaves the programs recording the device");
    restart_and_compare(&mut n0, &n1, &app.0, "after-down");

    drop(app);
    n1.kill();
    eprintln!("attach end-to-end test ({mode} mode) took {:.1?}", started.elapsed());
}

/// With node 0's daemon not running: writes a file on the attached filesystem, starts node 0,
/// and checks that it ships what was written meanwhile and no more than that, and that a
/// snapshot point leaves the replicas identical.
fn restart_and_compare(n0: &mut Node, n1: &Node, fs: &Path, name: &str) {
    let content = file_content(name.len() as u32 * 977);
    std::fs::write(fs.join(name), &content).unwrap();
    sh("sync", &[]);
    n0.start();
    wait("the restarted node to ship what was written", || current(n0, n1));
    let shipped = attach_view(n0)["shipped_tracks"].as_u64().unwrap();
    assert!(
        (16..1024).contains(&shipped),
        "the 1 MiB written while no daemon ran, and not the whole device: {:#}",
        n0.status().unwrap()
    );
    snapshot_point(n0, &[]);
    wait("the shipping to settle", || current(n0, n1));
    let out = tandem_out(n0, &["verify", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((out.status.code(), &report["differing_tracks"]), (Some(0), &json!(0)), "{report:#}");
    assert_eq!(std::fs::read(fs.join(name)).unwrap(), content);
}

/// The filesystem at `dir` takes a write (it is not left frozen): tried on a thread, since a
/// write to a frozen filesystem blocks until it is thawed.
fn assert_writable(dir: &Path) {
    let path = dir.join("probe");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        std::fs::write(&path, b"thawed").unwrap();
        let _ = tx.send(());
    });
    if rx.recv_timeout(Duration::from_secs(10)).is_err() {
        let _ = Command::new("fsfreeze").arg("--unfreeze").arg(dir).status();
        panic!("{} was left frozen", dir.display());
    }
}

/// A node directory with a config whose `[node]` section is `node` (no daemon, no root).
fn config_with(dir: &Path, node: &str) -> PathBuf {
    let path = dir.join("bad.toml");
    let text = format!(
        r#"[volume]
name = "e2e-bad"
id = 9
size = "64MiB"
secret = "{SECRET}"

[node]
id = 0
meta = "{d}/bad.meta"
listen = "127.0.0.1:7788"
control = "{d}/bad.sock"
{node}

[[peer]]
id = 1
address = "127.0.0.1:7789"
"#,
        d = dir.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn refused(config: &Path, command: &str) -> String {
    let out = Command::new(TANDEM).args(["-c", config.to_str().unwrap(), command]).output().unwrap();
    assert!(!out.status.success(), "`tandem {command}` must refuse {}", config.display());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_attach_configurations_are_refused_precisely_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let both = config_with(d, &format!("data = \"{}/bad.img\"\nattach = \"/dev/loop0\"", d.display()));
    for command in ["create-md", "daemon", "status"] {
        let e = refused(&both, command);
        assert!(e.contains("bad.toml: node.attach: give `data`") && e.contains("not both"), "{command}: {e}");
    }
    let missing = config_with(d, "attach = \"/dev/tandem-no-such-device\"");
    for command in ["create-md", "daemon"] {
        let e = refused(&missing, command);
        assert!(e.contains("bad.toml: node.attach: /dev/tandem-no-such-device: no such device"), "{command}: {e}");
    }
    let file = d.join("plain-file");
    std::fs::write(&file, vec![0u8; 4096]).unwrap();
    let not_block = config_with(d, &format!("attach = \"{}\"", file.display()));
    let e = refused(&not_block, "create-md");
    assert!(e.contains("node.attach:") && e.contains("not a block device"), "{e}");
    let with_mount = config_with(d, "attach = \"/dev/loop0\"\nmountpoint = \"/mnt/x\"");
    let e = refused(&with_mount, "create-md");
    assert!(e.contains("node.mountpoint:") && e.contains("no frontend"), "{e}");
    let names: Vec<String> =
        std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(!names.iter().any(|n| n.starts_with("bad.meta") || n == "bad.img" || n == "bad.sock"), "{names:?}");
}
