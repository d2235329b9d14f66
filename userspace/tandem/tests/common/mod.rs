//! What the end-to-end tests share: two nodes, each a real `tandem` daemon in a network
//! namespace of its own (a veth pair between them, `tandem_testnet::netns::Pair`), with
//! file-backed volumes; operator commands; waiting; ext4 mounts; content checksums; write
//! loads; the final byte-for-byte comparison of the replicas.
//!
//! Each test file that says `mod common;` compiles its own copy, and not every file uses
//! every helper.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use tandem_testnet::netns::{self, Pair};

pub const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");
pub const TRACK: u64 = 64 << 10;
pub const SECRET: &str = "end-to-end-test-secret";
/// Every node listens on this port of its own namespace's address.
pub const PORT: u16 = 7788;

/// Whether the end-to-end tests can run: root, FUSE and loop devices. Elsewhere they print
/// why and pass. As root the namespaces must work (`cargo xtask test` installs iproute2 and
/// nftables), so a missing tool is a failure, not a skip.
pub fn can_run() -> bool {
    let root = tandem_testnet::is_root();
    let ok = root && Path::new("/dev/fuse").exists() && Path::new("/dev/loop-control").exists();
    if !ok {
        eprintln!("skipped: needs root, /dev/fuse and /dev/loop-control");
        return false;
    }
    if let Some(why) = netns::unavailable() {
        panic!("as root, network namespaces must work here: {why}");
    }
    true
}

/// Two network namespaces joined by veth, shared by the nodes that live in them.
pub fn network() -> Arc<Pair> {
    Arc::new(Pair::new().unwrap_or_else(|e| panic!("as root, network namespaces must work here: {e}")))
}

pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub struct Node {
    pub id: u8,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub daemon: Option<Child>,
    launcher: Vec<String>,
    net: Option<Arc<Pair>>,
}

impl Node {
    /// Node `id` of a `memory` volume in namespace `id` of `net`.
    pub fn new(dir: &Path, id: u8, net: &Arc<Pair>) -> Node {
        Self::with(dir, id, net, SECRET, "memory")
    }

    pub fn with_secret(dir: &Path, id: u8, net: &Arc<Pair>, secret: &str) -> Node {
        Self::with(dir, id, net, secret, "memory")
    }

    /// Node `id` in namespace `id` of `net`, listening on its address there, dialing its
    /// peer's; the daemon runs under `nsenter --net` (host mounts, so FUSE and loop stay
    /// visible).
    pub fn with(dir: &Path, id: u8, net: &Arc<Pair>, secret: &str, mode: &str) -> Node {
        let peer = 1 - id as usize;
        let listen = format!("{}:{PORT}", net.addrs[id as usize]);
        let address = format!("{}:{PORT}", net.addrs[peer]);
        let mut node = Self::at(dir, id, &listen, &address, secret, mode, net.nsenter(id as usize));
        node.net = Some(net.clone());
        node
    }

    /// A node listening on `listen`, reaching its peer at `peer_address`; its daemon runs
    /// under `launcher` (e.g. `nsenter --net=...`, or nothing for the host's network).
    pub fn at(
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
record_pin = "{pin}"

[[peer]]
id = {peer}
address = "{peer_address}"
"#,
            d = dir.display(),
            pin = record_pin(dir, id),
        );
        std::fs::write(&config, text).unwrap();
        let node = Node { id, dir: dir.to_owned(), config, daemon: None, launcher, net: None };
        node.tandem(&["create-md"]);
        node
    }

    /// `/sys/fs/bpf/tandem/<this>/`: the node's kernel record.
    pub fn pin_dir(&self) -> PathBuf {
        Path::new("/sys/fs/bpf/tandem").join(record_pin(&self.dir, self.id))
    }

    /// The namespaces this node lives in.
    pub fn net(&self) -> &Arc<Pair> {
        self.net.as_ref().expect("a node in a namespace")
    }

    pub fn tandem(&self, args: &[&str]) -> String {
        let mut all = vec!["-c", self.config.to_str().unwrap()];
        all.extend_from_slice(args);
        sh(TANDEM, &all)
    }

    /// An operator command that may meet a handshake in flight: retried briefly.
    pub fn tandem_retry(&self, args: &[&str]) {
        let mut all = vec!["-c", self.config.to_str().unwrap()];
        all.extend_from_slice(args);
        wait(&format!("`tandem {}` to succeed", args.join(" ")), || {
            Command::new(TANDEM).args(&all).output().is_ok_and(|o| o.status.success())
        });
    }

    pub fn start(&mut self) {
        let log = std::fs::File::create(self.log()).unwrap();
        let mut argv: Vec<String> = self.launcher.clone();
        argv.extend([TANDEM.to_string(), "-c".into(), self.config.to_str().unwrap().into(), "daemon".into()]);
        let child = Command::new(&argv[0]).args(&argv[1..]).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.daemon = Some(child);
        wait("the control socket", || self.status().is_some());
    }

    /// `kill -9` of the daemon.
    pub fn kill(&mut self) {
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

    pub fn status(&self) -> Option<Value> {
        let out = Command::new(TANDEM).args(["-c", self.config.to_str().unwrap(), "status", "--json"]).output().ok()?;
        out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    pub fn device(&self) -> String {
        self.status().unwrap()["device"].as_str().unwrap().to_owned()
    }

    pub fn peer(&self) -> Value {
        self.status().unwrap()["peers"][0].clone()
    }

    pub fn image(&self) -> PathBuf {
        self.dir.join(format!("n{}.img", self.id))
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join(format!("n{}.log", self.id))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        // A killed daemon's programs stay attached (that is the point of pinning them): a
        // test must not leave them recording on this host.
        let _ = tandem_bpf::unpin(&record_pin(&self.dir, self.id));
    }
}

/// Tracks marked in `n`'s kernel record (0 when its record is the in-process one).
pub fn kernel_marked_tracks(n: &Node) -> u64 {
    n.status().and_then(|s| s["record"]["marked_tracks"].as_u64()).unwrap_or(0)
}

/// The kernel record's pin name of node `id` of the test in `dir`: two nodes of one volume
/// share this host, and tests run in parallel, so it names both.
pub fn record_pin(dir: &Path, id: u8) -> String {
    let test = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    format!("e2e-n{id}-{}", test.trim_start_matches('.'))
}

pub fn wait(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A filesystem mounted for the duration of a scope.
pub struct Mounted(pub PathBuf);

impl Mounted {
    pub fn new(device: &str, at: PathBuf) -> Mounted {
        std::fs::create_dir_all(&at).unwrap();
        sh("mount", &[device, at.to_str().unwrap()]);
        Mounted(at)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // A mount left behind keeps writing (journal commits, lazy inode-table init) under
        // whatever the test does next: retry a busy unmount, and say so if it never goes.
        for _ in 0..50 {
            match Command::new("umount").arg(&self.0).output() {
                Ok(o) if o.status.success() => return,
                Ok(o) if !is_mounted(&self.0) => return eprintln!("umount {}: {}", self.0.display(), lossy(&o.stderr)),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        eprintln!("umount {}: still mounted after 5 s", self.0.display());
    }
}

fn is_mounted(at: &Path) -> bool {
    let at = at.canonicalize().unwrap_or_else(|_| at.to_owned());
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(at.to_string_lossy().as_ref()))
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_owned()
}

/// (name, content fingerprint) of every file in `dir`, sorted.
pub fn checksums(dir: &Path) -> Vec<(String, String)> {
    let mut sums: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| {
            let data = std::fs::read(e.path()).unwrap();
            (e.file_name().to_string_lossy().into_owned(), format!("{:x}", fingerprint(&data)))
        })
        .collect();
    sums.sort();
    sums
}

/// A content fingerprint (FNV-1a): enough to tell files apart in a test.
pub fn fingerprint(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// 1 MiB of content that differs with `seed`.
pub fn file_content(seed: u32) -> Vec<u8> {
    (0..(1 << 20)).map(|j: u32| (j.wrapping_mul(2_654_435_761) >> (seed % 24 + 3)) as u8 ^ (seed >> 5) as u8).collect()
}

pub fn connected(n: &Node) -> bool {
    n.status().is_some_and(|s| s["peers"][0]["connection"] == "Connected" && s["disk"] == "UpToDate")
}

/// Two started, connected nodes of `mode`, each in its own network namespace.
pub fn connected_pair(dir: &Path, mode: &str) -> (Node, Node) {
    let net = network();
    let mut n0 = Node::with(dir, 0, &net, SECRET, mode);
    let mut n1 = Node::with(dir, 1, &net, SECRET, mode);
    n0.start();
    n1.start();
    wait("the nodes to connect", || connected(&n0) && connected(&n1));
    (n0, n1)
}

/// Lets the records clear, stops both nodes in order and compares the replicas byte for byte.
pub fn down_and_compare(n0: &mut Node, n1: &mut Node) {
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

/// Mounts `n`'s device, writes a file named and filled with `name`, syncs, unmounts.
pub fn write_file(n: &Node, dir: &Path, name: &str) {
    let fs = Mounted::new(&n.device(), dir.join(format!("fs{}", n.id)));
    std::fs::write(fs.0.join(name), name.as_bytes()).unwrap();
    sh("sync", &[]);
}

/// Both nodes' logs, concatenated.
pub fn logs(dir: &Path) -> String {
    ["n0.log", "n1.log"].iter().map(|f| std::fs::read_to_string(dir.join(f)).unwrap_or_default()).collect()
}

/// A 4 KiB-aligned buffer for O_DIRECT.
pub struct Aligned(*mut u8);

impl Aligned {
    const LAYOUT: std::alloc::Layout = match std::alloc::Layout::from_size_align(4096, 4096) {
        Ok(l) => l,
        Err(_) => panic!("layout"),
    };
    pub fn new() -> Aligned {
        // SAFETY: a non-zero-sized layout.
        let p = unsafe { std::alloc::alloc_zeroed(Self::LAYOUT) };
        assert!(!p.is_null(), "out of memory");
        Aligned(p)
    }
    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: 4096 bytes owned by self, borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(self.0, 4096) }
    }
}

impl Default for Aligned {
    fn default() -> Aligned {
        Aligned::new()
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { std::alloc::dealloc(self.0, Self::LAYOUT) }
    }
}

pub fn open_direct(device: &str) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(device).unwrap()
}

/// A writer on the primary's device counting acknowledged writes until stopped.
pub fn write_load(device: String, stop: Arc<AtomicBool>, count: Arc<AtomicU64>) -> std::thread::JoinHandle<()> {
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
