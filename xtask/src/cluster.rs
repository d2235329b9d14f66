//! Real nodes on this machine for `cargo xtask demo` and `cargo xtask bench`: their config
//! files, their daemons (optionally under a launcher such as `nsenter --net`), operator
//! commands, status, and waiting for a state.

use anyhow::{bail, Context, Result};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tandem_testnet::netns::Pair;

/// What both nodes' configs say about the volume.
pub struct Volume<'a> {
    pub name: &'a str,
    pub id: u32,
    pub size: &'a str,
    pub mode: &'a str,
    pub secret: &'a str,
}

/// One node: `node{id}.toml`, `.img`, `.meta`, `.sock`, `.log` and `fuse{id}` in its directory.
pub struct Node {
    pub id: u8,
    pub config: PathBuf,
    pub fuse: PathBuf,
    tandem: PathBuf,
    dir: PathBuf,
    launcher: Vec<String>,
    daemon: Option<Child>,
}

impl Node {
    /// Writes node `id`'s config: listening on `listen`, with one peer (id `1 - id`) at
    /// `peer`, or none (an unreplicated volume: a plain local disk through the same frontend
    /// and store). Its daemon will run under `launcher` (empty: directly).
    pub fn new(
        tandem: &Path,
        dir: &Path,
        id: u8,
        volume: &Volume,
        listen: &str,
        peer: Option<&str>,
        launcher: Vec<String>,
    ) -> Result<Node> {
        let config = dir.join(format!("node{id}.toml"));
        let fuse = dir.join(format!("fuse{id}"));
        let peer = match peer {
            Some(address) => format!("\n[[peer]]\nid = {}\naddress = \"{address}\"\n", 1 - id),
            None => String::new(),
        };
        std::fs::write(
            &config,
            format!(
                "[volume]\nname = \"{name}\"\nid = {vid}\nsize = \"{size}\"\nmode = \"{mode}\"\nsecret = \"{secret}\"\n\n\
                 [node]\nid = {id}\ndata = \"{d}/node{id}.img\"\nmeta = \"{d}/node{id}.meta\"\nlisten = \"{listen}\"\n\
                 control = \"{d}/node{id}.sock\"\nmountpoint = \"{f}\"\n\
                 # both nodes share this host's BPF filesystem: one pin directory each\n\
                 record_pin = \"{name}-n{id}\"\n{peer}",
                name = volume.name,
                vid = volume.id,
                size = volume.size,
                mode = volume.mode,
                secret = volume.secret,
                d = dir.display(),
                f = fuse.display(),
            ),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        Ok(Node { id, config, fuse, tandem: tandem.to_owned(), dir: dir.to_owned(), launcher, daemon: None })
    }

    /// Runs `tandem -c <config> args...`; its stdout.
    pub fn tandem(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.tandem)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()
            .with_context(|| format!("running {}", self.tandem.display()))?;
        if !out.status.success() {
            bail!("tandem {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        self.tandem(&["status", "--json"]).ok().and_then(|s| serde_json::from_str(&s).ok())
    }

    /// The status of the (one) peer as this node sees it.
    pub fn peer(&self) -> Option<serde_json::Value> {
        self.status().map(|s| s["peers"][0].clone())
    }

    /// Connected to its peer, with an up-to-date disk.
    pub fn connected(&self) -> bool {
        self.status().is_some_and(|s| s["peers"][0]["connection"] == "Connected" && s["disk"] == "UpToDate")
    }

    /// The block device the primary exposes.
    pub fn device(&self) -> Result<String> {
        self.status().and_then(|s| s["device"].as_str().map(str::to_owned)).context("the node shows no device")
    }

    pub fn image(&self) -> PathBuf {
        self.dir.join(format!("node{}.img", self.id))
    }

    /// The command line that starts the daemon, as an operator would type it.
    pub fn daemon_command(&self) -> String {
        let mut words = self.launcher.clone();
        words.extend(["tandem".into(), "-c".into(), format!("node{}.toml", self.id), "daemon".into()]);
        words.join(" ")
    }

    /// Starts the daemon (stderr to `node{id}.log`) and waits for its control socket.
    pub fn start(&mut self) -> Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("node{}.log", self.id)))?;
        let mut argv = self.launcher.clone();
        argv.extend([
            self.tandem.to_string_lossy().into_owned(),
            "-c".into(),
            self.config.to_string_lossy().into_owned(),
            "daemon".into(),
        ]);
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", argv.join(" ")))?;
        self.daemon = Some(child);
        wait("the daemon's control socket", || self.status().is_some())
    }

    /// `kill -9` of the daemon, and the lazy unmount of the FUSE mount it leaves behind.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.fuse).stderr(Stdio::null()).status();
    }

    /// Waits for the daemon to exit (after `down`); whether it exited cleanly.
    pub fn wait_exit(&mut self) -> Result<bool> {
        match self.daemon.take() {
            Some(mut child) => Ok(child.wait()?.success()),
            None => Ok(true),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where two nodes run and how they reach each other.
pub enum Network {
    /// Both on this host's loopback, each on its own port.
    Loopback { ports: [u16; 2] },
    /// Each in a network namespace of its own, joined by veth, both on port 7788.
    Namespaces(Pair),
}

impl Network {
    pub fn loopback() -> Result<Network> {
        Ok(Network::Loopback { ports: [free_port()?, free_port()?] })
    }

    /// Two namespaces when they can be made here; otherwise loopback and the reason.
    pub fn namespaces_or_loopback() -> Result<(Network, Option<String>)> {
        let why = match tandem_testnet::netns::unavailable() {
            Some(why) => why,
            None => match Pair::new() {
                Ok(pair) => return Ok((Network::Namespaces(pair), None)),
                Err(e) => e.to_string(),
            },
        };
        Ok((Network::loopback()?, Some(why)))
    }

    /// The address node `id` listens on.
    pub fn listen(&self, id: u8) -> String {
        match self {
            Network::Loopback { ports } => format!("127.0.0.1:{}", ports[id as usize]),
            Network::Namespaces(pair) => format!("{}:7788", pair.addrs[id as usize]),
        }
    }

    /// Where node `id` reaches its peer.
    pub fn peer_address(&self, id: u8) -> String {
        self.listen(1 - id)
    }

    /// What node `id`'s daemon runs under.
    pub fn launcher(&self, id: u8) -> Vec<String> {
        match self {
            Network::Loopback { .. } => Vec::new(),
            Network::Namespaces(pair) => pair.nsenter(id as usize),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Network::Loopback { ports } => format!("loopback TCP, ports {} and {}", ports[0], ports[1]),
            Network::Namespaces(pair) => format!(
                "two network namespaces joined by veth: {} at {}, {} at {}",
                pair.names[0], pair.addrs[0], pair.names[1], pair.addrs[1]
            ),
        }
    }
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs a command; its stdout, or an error with its stderr.
pub fn sh(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `done` every 100 ms for up to a minute.
pub fn wait(what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
