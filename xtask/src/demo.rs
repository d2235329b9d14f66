//! `cargo xtask demo`: the README's first command. As root (FUSE and loop devices needed)
//! it runs two real file-backed nodes on loopback through ext4, a `kill -9` of the primary,
//! failover, resync and failback, narrating with the operator's own commands. Elsewhere it
//! says why and runs the simulated demo (`tandem-demo`) instead.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cmd::Cmd;
use crate::paths::workspace_root;
use crate::tools::is_root;

#[derive(Args, Default)]
pub struct DemoArgs {
    /// Replication mode
    #[arg(long, default_value = "memory", value_parser = ["memory", "disk"])]
    pub mode: String,
    /// Run the simulated demo even where the real one could run
    #[arg(long)]
    pub simulated: bool,
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let real = is_root()? && Path::new("/dev/fuse").exists() && Path::new("/dev/loop-control").exists();
    if args.simulated || !real {
        if !args.simulated {
            println!("(the real demo needs root, /dev/fuse and /dev/loop-control: running the simulated one)\n");
        }
        return Cmd::cargo()
            .args(["run", "--release", "-p", "tandem-sim", "--bin", "tandem-demo", "--", &args.mode])
            .run();
    }
    crate::apt::ensure_packages()?;
    Cmd::cargo().args(["build", "--release", "-p", "tandem"]).run()?;
    let tandem = workspace_root().join("target/release/tandem");
    let dir = std::env::temp_dir().join(format!("tandem-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = Demo::new(&tandem, &dir, &args.mode).and_then(|mut d| d.run());
    let _ = std::fs::remove_dir_all(&dir);
    result
}

struct Node {
    id: u8,
    config: PathBuf,
    fuse: PathBuf,
    daemon: Option<Child>,
}

struct Demo {
    tandem: PathBuf,
    dir: PathBuf,
    nodes: [Node; 2],
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn step(n: u32, text: &str) {
    println!("\n== {n}. {text}");
}

fn sh(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Demo {
    fn new(tandem: &Path, dir: &Path, mode: &str) -> Result<Demo> {
        let ports = [free_port()?, free_port()?];
        let node = |id: u8| -> Result<Node> {
            let config = dir.join(format!("node{id}.toml"));
            let fuse = dir.join(format!("fuse{id}"));
            std::fs::write(
                &config,
                format!(
                    "[volume]\nname = \"demo\"\nid = 1\nsize = \"128MiB\"\nmode = \"{mode}\"\nsecret = \"demo-secret-0123456789\"\n\n\
                     [node]\nid = {id}\ndata = \"{d}/node{id}.img\"\nmeta = \"{d}/node{id}.meta\"\n\
                     listen = \"127.0.0.1:{me}\"\ncontrol = \"{d}/node{id}.sock\"\nmountpoint = \"{f}\"\n\n\
                     [[peer]]\nid = {p}\naddress = \"127.0.0.1:{other}\"\n",
                    d = dir.display(),
                    f = fuse.display(),
                    me = ports[id as usize],
                    p = 1 - id,
                    other = ports[1 - id as usize],
                ),
            )?;
            Ok(Node { id, config, fuse, daemon: None })
        };
        Ok(Demo { tandem: tandem.to_owned(), dir: dir.to_owned(), nodes: [node(0)?, node(1)?] })
    }

    fn tandem(&self, node: usize, args: &[&str]) -> Result<String> {
        let mut all = vec!["-c", self.nodes[node].config.to_str().expect("utf-8 path")];
        all.extend_from_slice(args);
        sh(self.tandem.to_str().expect("utf-8 path"), &all)
    }

    /// Runs an operator command and shows it with its output.
    fn show(&self, node: usize, args: &[&str]) -> Result<String> {
        println!("$ tandem -c node{node}.toml {}", args.join(" "));
        let out = self.tandem(node, args)?;
        for line in out.lines() {
            println!("  {line}");
        }
        Ok(out)
    }

    fn status(&self, node: usize) -> Option<serde_json::Value> {
        self.tandem(node, &["status", "--json"]).ok().and_then(|s| serde_json::from_str(&s).ok())
    }

    fn wait(&self, what: &str, done: impl Fn(&Demo) -> bool) -> Result<()> {
        let start = Instant::now();
        while !done(self) {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("timed out waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn start(&mut self, node: usize) -> Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("node{node}.log")))?;
        let child = Command::new(&self.tandem)
            .args(["-c", self.nodes[node].config.to_str().expect("utf-8 path"), "daemon"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.nodes[node].daemon = Some(child);
        self.wait("the daemon's control socket", |d| d.status(node).is_some())
    }

    fn kill(&mut self, node: usize) {
        if let Some(mut child) = self.nodes[node].daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.nodes[node].fuse).stderr(Stdio::null()).status();
    }

    fn connected(&self, node: usize) -> bool {
        self.status(node).is_some_and(|s| s["peers"][0]["connection"] == "Connected" && s["disk"] == "UpToDate")
    }

    fn mount(&self, node: usize) -> Result<PathBuf> {
        let device = self.status(node).and_then(|s| s["device"].as_str().map(str::to_owned)).context("no device")?;
        let at = self.dir.join(format!("ext4-{node}"));
        std::fs::create_dir_all(&at)?;
        println!("$ mount {device} {}", at.display());
        sh("mount", &[&device, at.to_str().expect("utf-8 path")])?;
        Ok(at)
    }

    fn run(&mut self) -> Result<()> {
        let outcome = self.scenario();
        for node in 0..2 {
            let _ = Command::new("umount").arg(self.dir.join(format!("ext4-{node}"))).stderr(Stdio::null()).status();
            self.kill(node);
        }
        outcome
    }

    fn scenario(&mut self) -> Result<()> {
        println!("Tandem demo: one 128 MiB volume replicated between two nodes on this machine (file-backed,");
        println!("loopback TCP), exposed on the primary as a real block device (FUSE file + loop device).");
        println!("Working directory: {}", self.dir.display());

        step(1, "Create the metadata on both nodes and start the daemons");
        self.show(0, &["create-md"])?;
        self.show(1, &["create-md"])?;
        self.start(0)?;
        self.start(1)?;
        self.wait("the nodes to connect", |d| d.connected(0) && d.connected(1))?;
        self.show(0, &["status"])?;

        step(2, "Node 0 becomes primary; ext4 goes on its device; files are written");
        self.show(0, &["primary"])?;
        let device0 = self.status(0).and_then(|s| s["device"].as_str().map(str::to_owned)).context("no device")?;
        println!("$ mkfs.ext4 -q {device0}");
        sh("mkfs.ext4", &["-q", "-F", &device0])?;
        let fs = self.mount(0)?;
        let files = ["/etc/os-release", "/etc/services", "/etc/passwd"];
        for f in files {
            std::fs::copy(f, fs.join(Path::new(f).file_name().expect("file name")))?;
        }
        sh("sync", &[])?;
        let names: Vec<String> =
            files.iter().map(|f| Path::new(f).file_name().expect("name").to_string_lossy().into()).collect();
        let sums = String::from_utf8(
            Command::new("sha256sum").args(&names).current_dir(&fs).output().context("sha256sum")?.stdout,
        )?;
        print!("{sums}");
        self.wait("the destage scans to clear the records", |d| {
            d.status(0).is_some_and(|s| s["peers"][0]["out_of_sync_tracks"].as_u64().unwrap_or(u64::MAX) < 16)
        })?;
        self.show(0, &["status"])?;

        step(3, "kill -9 of node 0's daemon: the primary is gone");
        sh("umount", &["-l", fs.to_str().unwrap()])?;
        self.kill(0);
        self.wait("node 1 to notice", |d| d.status(1).is_some_and(|s| s["peers"][0]["connection"] != "Connected"))?;
        self.show(1, &["status"])?;

        step(4, "Failover: node 1 is promoted; the files are intact; it keeps recording what node 0 misses");
        self.show(1, &["primary"])?;
        let fs1 = self.mount(1)?;
        let mut check = Command::new("sha256sum")
            .arg("-c")
            .current_dir(&fs1)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        use std::io::Write;
        check.stdin.take().expect("stdin").write_all(sums.as_bytes())?;
        let out = check.wait_with_output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            bail!("the files did not survive the failover");
        }
        std::fs::write(fs1.join("written-during-failover"), "node 0 was down\n")?;
        sh("sync", &[])?;
        sh("umount", &[fs1.to_str().unwrap()])?;
        self.show(1, &["status"])?;
        self.show(1, &["dirty"])?;

        step(5, "Node 0 comes back as secondary and resyncs only the recorded tracks");
        self.start(0)?;
        self.wait("node 0 to resync", |d| d.connected(0) && d.connected(1))?;
        self.show(1, &["status"])?;

        step(6, "Failback: node 1 steps down, node 0 is primary again, with every file");
        self.show(1, &["secondary"])?;
        self.wait("node 0 to see it", |d| d.status(0).is_some_and(|s| s["peers"][0]["role"] == "Secondary"))?;
        self.show(0, &["primary"])?;
        let fs0 = self.mount(0)?;
        print!("{}", sh("ls", &["-l", fs0.to_str().unwrap()])?);
        sh("umount", &[fs0.to_str().unwrap()])?;
        self.show(0, &["secondary"])?;
        self.wait("the records to clear", |d| {
            (0..2).all(|n| d.status(n).is_some_and(|s| s["peers"][0]["out_of_sync_tracks"] == 0))
        })?;
        let same = std::fs::read(self.dir.join("node0.img"))? == std::fs::read(self.dir.join("node1.img"))?;
        println!("backing files of the two nodes identical: {same}");
        if !same {
            bail!("the replicas differ");
        }

        step(7, "Orderly shutdown");
        self.show(0, &["down"])?;
        self.show(1, &["down"])?;
        for n in 0..2 {
            if let Some(mut child) = self.nodes[n].daemon.take() {
                if !child.wait()?.success() {
                    bail!("node {} did not stop cleanly", self.nodes[n].id);
                }
            }
        }
        println!("\nDone.");
        Ok(())
    }
}
