//! End to end, as an operator would: two daemons on loopback with file-backed volumes,
//! ext4 on the primary's device, `kill -9` of the primary, failover, the old primary back
//! and resynced, failback. Needs root (FUSE, loop devices, mount); elsewhere it says why it
//! skips. (Network namespaces, the link emulator and the bench land in later commits.)

mod link;
mod netns;

use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");
const TRACK: u64 = 64 << 10;

fn can_run() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let ok = root && Path::new("/dev/fuse").exists() && Path::new("/dev/loop-control").exists();
    if !ok {
        eprintln!("skipped: needs root, /dev/fuse and /dev/loop-control");
    }
    ok
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Node {
    id: u8,
    dir: PathBuf,
    config: PathBuf,
    daemon: Option<Child>,
    launcher: Vec<String>,
}

impl Node {
    fn new(dir: &Path, id: u8, ports: [u16; 2]) -> Node {
        Self::with(dir, id, ports, "end-to-end-test-secret", "memory")
    }

    fn with_secret(dir: &Path, id: u8, ports: [u16; 2], secret: &str) -> Node {
        Self::with(dir, id, ports, secret, "memory")
    }

    fn with(dir: &Path, id: u8, ports: [u16; 2], secret: &str, mode: &str) -> Node {
        let peer = 1 - id;
        let listen = format!("127.0.0.1:{}", ports[id as usize]);
        let address = format!("127.0.0.1:{}", ports[peer as usize]);
        Self::at(dir, id, &listen, &address, secret, mode, Vec::new())
    }

    /// A node listening on `listen`, reaching its peer at `peer_address`; its daemon runs
    /// under `launcher` (e.g. `nsenter --net=...`).
    fn at(
        dir: &Path,
        id: u8,
        listen: &str,
        peer_address: &str,
        secret: &str,
        mode: &str,
        launcher: Vec<String>,
    ) -> Node {
        let peer = 1 - id;
        let config = dir.join(format!("n{id}.toml"));
        let text = format!(
            r#"[volume]
name = "e2e"
id = 9
size = "64MiB"
mode = "{mode}"
secret = "{secret}"

[node]
id = {id}
data = "{d}/n{id}.img"
meta = "{d}/n{id}.meta"
listen = "{listen}"
control = "{d}/n{id}.sock"
mountpoint = "{d}/fuse{id}"

[[peer]]
id = {peer}
address = "{peer_address}"
"#,
            d = dir.display(),
        );
        std::fs::write(&config, text).unwrap();
        let node = Node { id, dir: dir.to_owned(), config, daemon: None, launcher };
        node.tandem(&["create-md"]);
        node
    }

    fn tandem(&self, args: &[&str]) -> String {
        let mut all = vec!["-c", self.config.to_str().unwrap()];
        all.extend_from_slice(args);
        sh(TANDEM, &all)
    }

    /// An operator command that may meet a handshake in flight: retried briefly.
    fn tandem_retry(&self, args: &[&str]) {
        let mut all = vec!["-c", self.config.to_str().unwrap()];
        all.extend_from_slice(args);
        wait(&format!("`tandem {}` to succeed", args.join(" ")), || {
            Command::new(TANDEM).args(&all).output().is_ok_and(|o| o.status.success())
        });
    }

    fn start(&mut self) {
        let log = std::fs::File::create(self.dir.join(format!("n{}.log", self.id))).unwrap();
        let mut argv: Vec<String> = self.launcher.clone();
        argv.extend([TANDEM.to_string(), "-c".into(), self.config.to_str().unwrap().into(), "daemon".into()]);
        let child = Command::new(&argv[0]).args(&argv[1..]).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.daemon = Some(child);
        wait("the control socket", || self.status().is_some());
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A killed daemon leaves its FUSE mount behind (the loop device clears itself).
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.join(format!("fuse{}", self.id)))
            .stderr(Stdio::null())
            .status();
    }

    fn status(&self) -> Option<Value> {
        let out = Command::new(TANDEM).args(["-c", self.config.to_str().unwrap(), "status", "--json"]).output().ok()?;
        out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    fn device(&self) -> String {
        self.status().unwrap()["device"].as_str().unwrap().to_owned()
    }

    fn peer(&self) -> Value {
        self.status().unwrap()["peers"][0].clone()
    }

    fn image(&self) -> PathBuf {
        self.dir.join(format!("n{}.img", self.id))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Mounted(PathBuf);

impl Mounted {
    fn new(device: &str, at: PathBuf) -> Mounted {
        std::fs::create_dir_all(&at).unwrap();
        sh("mount", &[device, at.to_str().unwrap()]);
        Mounted(at)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn checksums(dir: &Path) -> Vec<(String, String)> {
    let mut sums: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| {
            let data = std::fs::read(e.path()).unwrap();
            (e.file_name().to_string_lossy().into_owned(), format!("{:x}", md5ish(&data)))
        })
        .collect();
    sums.sort();
    sums
}

/// A content fingerprint (FNV-1a): enough to tell files apart in a test.
fn md5ish(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

fn connected(n: &Node) -> bool {
    n.status().is_some_and(|s| s["peers"][0]["connection"] == "Connected" && s["disk"] == "UpToDate")
}

/// Two started, connected nodes of `mode` on loopback.
fn connected_pair(dir: &Path, mode: &str) -> (Node, Node) {
    let ports = [free_port(), free_port()];
    let secret = "end-to-end-test-secret";
    let mut n0 = Node::with(dir, 0, ports, secret, mode);
    let mut n1 = Node::with(dir, 1, ports, secret, mode);
    n0.start();
    n1.start();
    wait("the nodes to connect", || connected(&n0) && connected(&n1));
    (n0, n1)
}

/// Lets the records clear, stops both nodes in order and compares the replicas byte for byte.
fn down_and_compare(n0: &mut Node, n1: &mut Node) {
    let clear = || n0.peer()["out_of_sync_tracks"] == 0 && n1.peer()["out_of_sync_tracks"] == 0;
    let start = Instant::now();
    while !clear() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the records did not clear:\n{:#}\n{:#}",
            n0.status().unwrap_or_default(),
            n1.status().unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for n in [&*n0, &*n1] {
        if n.status().is_some_and(|s| s["role"] == "Primary") {
            n.tandem(&["secondary"]);
        }
    }
    n0.tandem(&["down"]);
    n1.tandem(&["down"]);
    for n in [&mut *n0, &mut *n1] {
        if let Some(mut child) = n.daemon.take() {
            assert!(child.wait().unwrap().success(), "node {} exits cleanly after down", n.id);
        }
    }
    assert!(std::fs::read(n0.image()).unwrap() == std::fs::read(n1.image()).unwrap(), "replicas are identical");
}

#[test]
fn failover_and_failback_keep_every_file_and_resync_only_recorded_tracks() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut n0, mut n1) = connected_pair(dir.path(), "memory");

    // ext4 on the primary's replicated device.
    n0.tandem(&["primary"]);
    let dev0 = n0.device();
    sh("mkfs.ext4", &["-q", "-F", &dev0]);
    let written = {
        let fs = Mounted::new(&dev0, dir.path().join("fs0"));
        for i in 0..4 {
            let data: Vec<u8> = (0..(1 << 20)).map(|j: u32| (j.wrapping_mul(2_654_435_761) >> (i + 3)) as u8).collect();
            std::fs::write(fs.0.join(format!("file{i}")), data).unwrap();
        }
        sh("sync", &[]);
        checksums(&fs.0)
    };
    assert_eq!(written.len(), 4);
    // mkfs discarded the whole device: destage scans clear those marks within seconds.
    wait("the records to shrink", || n0.peer()["out_of_sync_tracks"].as_u64().unwrap() < 16);

    // The primary's daemon dies mid-life: the secondary takes over with every file.
    n0.kill();
    wait("node 1 to notice", || n1.peer()["connection"] != "Connected");
    n1.tandem(&["primary"]);
    let dev1 = n1.device();
    {
        let fs = Mounted::new(&dev1, dir.path().join("fs1"));
        assert_eq!(checksums(&fs.0), written, "the files survive the failover");
        std::fs::write(fs.0.join("after-failover"), b"written on node 1").unwrap();
        sh("sync", &[]);
    }
    let recorded = n1.peer()["out_of_sync_bytes"].as_u64().unwrap();
    assert!(recorded > 0 && recorded < 64 << 20, "node 1 records what node 0 misses: {recorded} bytes");

    // The old primary comes back as secondary and resyncs only what was recorded.
    n0.start();
    wait("node 0 to resync", || connected(&n0) && connected(&n1));
    let shipped = n1.peer()["last_resync_bytes"].as_u64().unwrap();
    assert!(shipped <= recorded + 4 * TRACK, "shipped {shipped} bytes, {recorded} were recorded");
    assert!(shipped < 64 << 20, "not a full resync");
    n1.tandem(&["secondary"]);
    wait("node 0 to see node 1 step down", || n0.peer()["role"] == "Secondary");
    n0.tandem(&["primary"]);
    {
        let fs = Mounted::new(&dev0, dir.path().join("fs0"));
        let mut expected = written.clone();
        expected.push(("after-failover".into(), format!("{:x}", md5ish(b"written on node 1"))));
        expected.sort();
        assert_eq!(checksums(&fs.0), expected, "failback: every file, including the one written during failover");
    }
    n0.tandem(&["secondary"]);
    // Replicas converge: once the records are clear, the backing files are identical.
    down_and_compare(&mut n0, &mut n1);
}

#[test]
fn bad_config_is_refused_with_file_field_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[volume]\nname = \"v\"\nid = 1\nsize = \"12 parsecs\"\n").unwrap();
    let out = Command::new(TANDEM).args(["-c", config.to_str().unwrap(), "create-md"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(config.to_str().unwrap()), "{err}");
    assert!(!dir.path().join("v.meta").exists(), "nothing was created");
}

fn write_file(n: &Node, dir: &Path, name: &str) {
    let fs = Mounted::new(&n.device(), dir.join(format!("fs{}", n.id)));
    std::fs::write(fs.0.join(name), name.as_bytes()).unwrap();
    sh("sync", &[]);
}

#[test]
fn split_brain_is_detected_refused_and_resolved_by_invalidate() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut n0, mut n1) = connected_pair(dir.path(), "memory");
    n0.tandem(&["primary"]);
    sh("mkfs.ext4", &["-q", "-F", &n0.device()]);
    wait("the records to shrink", || n0.peer()["out_of_sync_tracks"].as_u64().unwrap() < 16);

    // Apart, each side is made primary and writes.
    n1.kill();
    write_file(&n0, dir.path(), "from-node-0");
    n0.kill();
    n1.start();
    n1.tandem(&["primary", "--force"]);
    write_file(&n1, dir.path(), "from-node-1");
    n0.start();
    wait("the split brain to be refused", || {
        n0.peer()["connection"] == "StandAlone" || n1.peer()["connection"] == "StandAlone"
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_ne!(n0.peer()["connection"], "Connected", "never merged");
    // Whichever side decides first refuses and logs it.
    let logs: String =
        ["n0.log", "n1.log"].iter().map(|f| std::fs::read_to_string(dir.path().join(f)).unwrap()).collect();
    assert!(logs.contains("split brain"), "the refusal is logged: {logs}");

    // The operator keeps node 1's data: node 0 discards its own and resyncs all of it.
    n0.tandem_retry(&["invalidate"]);
    n0.tandem(&["connect"]);
    n1.tandem(&["connect"]);
    wait("node 0 to resync from node 1", || connected(&n0) && connected(&n1));
    n1.tandem_retry(&["secondary"]);
    wait("node 0 to see it", || n0.peer()["role"] == "Secondary");
    n0.tandem_retry(&["primary"]);
    let fs = Mounted::new(&n0.device(), dir.path().join("check"));
    assert!(fs.0.join("from-node-1").exists(), "node 1's write is there");
    assert!(!fs.0.join("from-node-0").exists(), "node 0's discarded write is gone, as the operator chose");
}

#[test]
fn a_wrong_secret_and_garbage_on_the_port_are_refused_without_harm() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port()];
    let mut n0 = Node::new(dir.path(), 0, ports);
    let mut n1 = Node::with_secret(dir.path(), 1, ports, "not-the-volume-secret!");
    n0.start();
    n1.start();
    std::thread::sleep(Duration::from_secs(2));
    assert_ne!(n0.peer()["connection"], "Connected");
    let logs: String =
        ["n0.log", "n1.log"].iter().map(|f| std::fs::read_to_string(dir.path().join(f)).unwrap()).collect();
    assert!(logs.to_lowercase().contains("refus"), "one clear log line: {logs}");

    // A stranger writes garbage to the replication port; the daemon does not mind.
    use std::io::Write;
    let mut stranger = std::net::TcpStream::connect(("127.0.0.1", ports[1])).unwrap();
    let _ = stranger.write_all(b"GET / HTTP/1.1\r\nHost: tandem\r\n\r\n\x00\xff garbage");
    drop(stranger);
    assert!(n1.status().is_some(), "node 1 still answers");

    // With the right secret the same nodes connect.
    n1.kill();
    std::fs::remove_file(dir.path().join("n1.meta")).unwrap();
    let mut n1 = Node::new(dir.path(), 1, ports);
    n1.start();
    wait("the nodes to connect", || connected(&n0) && connected(&n1));
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct Aligned(*mut u8);

impl Aligned {
    const LAYOUT: std::alloc::Layout = match std::alloc::Layout::from_size_align(4096, 4096) {
        Ok(l) => l,
        Err(_) => panic!("layout"),
    };
    fn new() -> Aligned {
        Aligned(unsafe { std::alloc::alloc_zeroed(Self::LAYOUT) })
    }
    fn bytes(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.0, 4096) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        unsafe { std::alloc::dealloc(self.0, Self::LAYOUT) }
    }
}

fn open_direct(device: &str) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(device).unwrap()
}

/// Invariant 1 on the real system: every write the device acknowledged before the primary's
/// daemon was killed is on the secondary once it is promoted.
#[test]
fn kill_9_under_write_load_loses_no_acknowledged_write_memory_mode() {
    kill_9_under_write_load("memory");
}

#[test]
fn kill_9_under_write_load_loses_no_acknowledged_write_disk_mode() {
    kill_9_under_write_load("disk");
}

fn kill_9_under_write_load(mode: &str) {
    use std::os::unix::fs::FileExt;
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut n0, n1) = connected_pair(dir.path(), mode);
    n0.tandem(&["primary"]);
    let device = n0.device();
    const BLOCKS: u64 = 2048; // the first 8 MiB: many rewrites of the same blocks
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let file = open_direct(&device);
            let mut buf = Aligned::new();
            // block -> (last acknowledged value, value possibly in flight when it failed)
            let mut acked: std::collections::HashMap<u64, (u64, Option<u64>)> = Default::default();
            let mut state = 0x9E37_79B9_7F4A_7C15u64;
            for value in 1u64.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let block = state % BLOCKS;
                for (i, chunk) in buf.bytes().chunks_mut(8).enumerate() {
                    chunk.copy_from_slice(&(value ^ i as u64).to_le_bytes());
                }
                match file.write_all_at(buf.bytes(), block * 4096) {
                    Ok(()) => {
                        acked.insert(block, (value, None));
                    }
                    Err(_) => {
                        acked.entry(block).and_modify(|e| e.1 = Some(value)).or_insert((0, Some(value)));
                        break;
                    }
                }
            }
            acked
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    n0.kill();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let acked = writer.join().unwrap();
    assert!(acked.len() > 100, "the load ran: {} blocks written", acked.len());
    eprintln!("{} blocks acknowledged before the kill", acked.len());

    wait("node 1 to notice", || n1.peer()["connection"] != "Connected");
    n1.tandem(&["primary"]);
    let file = open_direct(&n1.device());
    let mut buf = Aligned::new();
    let mut lost = Vec::new();
    for (&block, &(value, in_flight)) in &acked {
        file.read_exact_at(buf.bytes(), block * 4096).unwrap();
        let got = u64::from_le_bytes(buf.bytes()[..8].try_into().unwrap());
        if got != value && Some(got) != in_flight {
            lost.push(format!("block {block}: acknowledged {value}, found {got}"));
        }
    }
    assert!(lost.is_empty(), "{} acknowledged writes lost: {:?}", lost.len(), &lost[..lost.len().min(5)]);
}

/// A writer on the primary's device counting acknowledged writes until stopped.
fn write_load(
    device: String,
    stop: std::sync::Arc<AtomicBool>,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> std::thread::JoinHandle<()> {
    use std::os::unix::fs::FileExt;
    std::thread::spawn(move || {
        let file = open_direct(&device);
        let mut buf = Aligned::new();
        let mut block = 0u64;
        while !stop.load(Ordering::Relaxed) {
            buf.bytes()[..8].copy_from_slice(&block.to_le_bytes());
            if file.write_all_at(buf.bytes(), (block % 4096) * 4096).is_err() {
                break;
            }
            count.fetch_add(1, Ordering::Relaxed);
            block = block.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) >> 1;
        }
    })
}

/// A silent partition and a cut link during writes: the primary notices within the
/// keepalive timeout (not after TCP's retransmit backoff), goes on alone, and resyncs the
/// peer when the link heals; the replicas end identical.
#[test]
fn silent_partition_and_link_cut_during_writes_memory_mode() {
    partition_and_cut_during_writes("memory");
}

#[test]
fn silent_partition_and_link_cut_during_writes_disk_mode() {
    partition_and_cut_during_writes("disk");
}

fn partition_and_cut_during_writes(mode: &str) {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port()];
    let link = link::Link::new(ports[1]);
    let secret = "end-to-end-test-secret";
    // Node 0 dials node 1 through the link emulator.
    let mut n0 = Node::with(dir.path(), 0, [ports[0], link.port], secret, mode);
    let mut n1 = Node::with(dir.path(), 1, ports, secret, mode);
    n0.start();
    n1.start();
    wait("the nodes to connect", || connected(&n0) && connected(&n1));
    n0.tandem(&["primary"]);
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = write_load(n0.device(), stop.clone(), count.clone());
    wait("writes to flow", || count.load(Ordering::Relaxed) > 200);

    for (what, cut) in [("silent partition", true), ("link cut", false)] {
        if cut {
            link.blackhole();
        } else {
            link.reset();
        }
        let started = Instant::now();
        wait(&format!("node 0 to notice the {what}"), || n0.peer()["connection"] != "Connected");
        let noticed = started.elapsed();
        assert!(noticed < Duration::from_secs(6), "{what} noticed after {noticed:?}: the keepalive must beat TCP");
        // Alone, the primary keeps serving.
        let before = count.load(Ordering::Relaxed);
        wait(&format!("writes to go on during the {what}"), || count.load(Ordering::Relaxed) > before + 100);
        link.pass();
        wait(&format!("the link to heal after the {what}"), || connected(&n0) && connected(&n1));
        let before = count.load(Ordering::Relaxed);
        wait("writes to go on after healing", || count.load(Ordering::Relaxed) > before + 100);
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    down_and_compare(&mut n0, &mut n1);
}

/// Two hosts in network namespaces joined by veth: replication across them, a link taken
/// down on one side (sends fail at once), and a resync once it is up again.
#[test]
fn two_hosts_in_namespaces_over_veth() {
    if !can_run() {
        return;
    }
    let pair = match netns::Pair::new() {
        Ok(p) => p,
        Err(e) => panic!("as root, network namespaces must work here: {e}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let secret = "end-to-end-test-secret";
    let [a0, a1] = [&pair.addrs[0], &pair.addrs[1]];
    let mut n0 =
        Node::at(dir.path(), 0, &format!("{a0}:7788"), &format!("{a1}:7788"), secret, "memory", pair.nsenter(0));
    let mut n1 =
        Node::at(dir.path(), 1, &format!("{a1}:7788"), &format!("{a0}:7788"), secret, "memory", pair.nsenter(1));
    n0.start();
    n1.start();
    wait("the hosts to connect", || connected(&n0) && connected(&n1));
    n0.tandem(&["primary"]);
    sh("mkfs.ext4", &["-q", "-F", &n0.device()]);
    let fs = Mounted::new(&n0.device(), dir.path().join("fs0"));
    std::fs::write(fs.0.join("before"), b"across veth").unwrap();
    sh("sync", &[]);
    wait("the records to shrink", || n0.peer()["out_of_sync_tracks"].as_u64().unwrap() < 16);

    pair.link(0, false).unwrap();
    wait("node 0 to lose its peer", || n0.peer()["connection"] != "Connected");
    std::fs::write(fs.0.join("during"), b"while the link was down").unwrap();
    sh("sync", &[]);
    assert!(n0.peer()["out_of_sync_tracks"].as_u64().unwrap() > 0, "writes apart are recorded");
    pair.link(0, true).unwrap();
    wait("the link to heal and node 1 to resync", || connected(&n0) && connected(&n1));
    assert!(n1.peer()["last_resync_bytes"].as_u64().unwrap() < 64 << 20, "only recorded tracks shipped");
    drop(fs);
    down_and_compare(&mut n0, &mut n1);
}
