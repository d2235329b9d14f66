//! `cargo xtask demo`: the README's first command. As root (FUSE and loop devices needed)
//! it runs two real file-backed nodes, each in a network namespace of its own joined by veth
//! (on loopback where namespaces cannot be made, saying why), through ext4, a `kill -9` of
//! the primary, failover, resync and failback, narrating with the operator's own commands.
//! Elsewhere it says why and runs the simulated demo (`tandem-demo`) instead.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cluster::{sh, wait, Network, Node, Volume};
use crate::cmd::Cmd;
use crate::paths::target_dir;
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
    let tandem = target_dir().join("release/tandem");
    let dir = std::env::temp_dir().join(format!("tandem-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = Demo::new(&tandem, &dir, &args.mode).and_then(|mut d| d.run());
    let _ = std::fs::remove_dir_all(&dir);
    result
}

struct Demo {
    dir: PathBuf,
    // Before `network`: fields drop in order, the daemons go before their namespaces.
    nodes: [Node; 2],
    network: Network,
}

fn step(n: u32, text: &str) {
    println!("\n== {n}. {text}");
}

impl Demo {
    fn new(tandem: &Path, dir: &Path, mode: &str) -> Result<Demo> {
        let (network, why) = Network::namespaces_or_loopback()?;
        if let Some(why) = why {
            println!("(no network namespaces here: {why}; the nodes talk over loopback instead)");
        }
        let volume = Volume { name: "demo", id: 1, size: "128MiB", mode, secret: "demo-secret-0123456789" };
        let node = |id: u8| {
            let peer = network.peer_address(id);
            Node::new(tandem, dir, id, &volume, &network.listen(id), Some(&peer), network.launcher(id))
        };
        let nodes = [node(0)?, node(1)?];
        Ok(Demo { dir: dir.to_owned(), nodes, network })
    }

    /// Runs an operator command and shows it with its output.
    fn show(&self, node: usize, args: &[&str]) -> Result<String> {
        println!("$ tandem -c node{node}.toml {}", args.join(" "));
        let out = self.nodes[node].tandem(args)?;
        for line in out.lines() {
            println!("  {line}");
        }
        Ok(out)
    }

    /// Node `node`'s view of its peer.
    fn peer(&self, node: usize) -> Option<serde_json::Value> {
        self.nodes[node].peer()
    }

    fn wait(&self, what: &str, done: impl Fn(&Demo) -> bool) -> Result<()> {
        wait(what, || done(self))
    }

    fn start(&mut self, node: usize) -> Result<()> {
        println!("$ {} &", self.nodes[node].daemon_command());
        self.nodes[node].start()
    }

    fn kill(&mut self, node: usize) {
        self.nodes[node].kill();
    }

    fn connected(&self, node: usize) -> bool {
        self.nodes[node].connected()
    }

    fn mount(&self, node: usize) -> Result<PathBuf> {
        let device = self.nodes[node].device()?;
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
        println!("Tandem demo: one 128 MiB volume replicated between two file-backed nodes on this machine,");
        println!("exposed on the primary as a real block device (FUSE file + loop device).");
        println!("Network: {}", self.network.describe());
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
        let device0 = self.nodes[0].device()?;
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
        // mkfs discarded the whole device: the destage scans clear the core's records, and the
        // kernel record's clearing cycles follow them (what it still holds at a crash is
        // resynced; without BPF there is no kernel record to wait for).
        self.wait("the destage scans to clear the records", |d| {
            d.nodes[0].status().is_some_and(|s| {
                s["peers"][0]["out_of_sync_tracks"].as_u64().unwrap_or(u64::MAX) < 16
                    && s["record"]["marked_tracks"].as_u64().is_none_or(|marked| marked < 16)
            })
        })?;
        self.show(0, &["status"])?;

        step(3, "kill -9 of node 0's daemon: the primary is gone");
        sh("umount", &["-l", fs.to_str().unwrap()])?;
        self.kill(0);
        self.wait("node 1 to notice", |d| d.peer(1).is_some_and(|p| p["connection"] != "Connected"))?;
        self.show(1, &["status"])?;
        // The dead daemon's record outlives it in the kernel (`record_pin` in cluster.rs).
        if Path::new("/sys/fs/bpf/tandem/demo-n0/params").exists() {
            println!("(node 0's daemon is dead; its record of written tracks is still pinned in the kernel)");
            self.show(0, &["dirty"])?;
        } else {
            println!("(no BPF write record here: node 0's record died with its daemon; node 1's covers it)");
        }

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
        self.wait("node 0 to see it", |d| d.peer(0).is_some_and(|p| p["role"] == "Secondary"))?;
        self.show(0, &["primary"])?;
        let fs0 = self.mount(0)?;
        print!("{}", sh("ls", &["-l", fs0.to_str().unwrap()])?);
        sh("umount", &[fs0.to_str().unwrap()])?;
        self.show(0, &["secondary"])?;
        self.wait("the records to clear", |d| (0..2).all(|n| d.peer(n).is_some_and(|p| p["out_of_sync_tracks"] == 0)))?;
        let same = std::fs::read(self.nodes[0].image())? == std::fs::read(self.nodes[1].image())?;
        println!("backing files of the two nodes identical: {same}");
        if !same {
            bail!("the replicas differ");
        }

        step(7, "Orderly shutdown");
        self.show(0, &["down"])?;
        self.show(1, &["down"])?;
        for node in &mut self.nodes {
            if !node.wait_exit()? {
                bail!("node {} did not stop cleanly", node.id);
            }
        }
        println!("\nDone.");
        Ok(())
    }
}
