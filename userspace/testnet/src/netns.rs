//! Two test hosts on one machine: network namespaces joined by a veth pair, with addresses
//! of their own (only loopback and namespaces we make may receive traffic here), and the
//! impairments this kernel offers without netem: a `tbf` rate limit on a node's egress,
//! random loss and a total drop (a silent partition) on a node's ingress through nftables
//! `netdev` tables, and the link taken down.
//!
//! Loss is applied where packets are *received*: FIELD-NOTES measured that the egress hook
//! counts its drops but still delivers them.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{Error, Result};

/// The nftables table that drops a share of a node's incoming packets.
const LOSS_TABLE: &str = "tandem_loss";
/// The nftables table that drops all of them (a silent partition).
const BLACKHOLE_TABLE: &str = "tandem_blackhole";

/// Runs `program args`, feeding `stdin` when given; its stdout, or the command and its
/// stderr as the error.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let command = format!("{program} {}", args.join(" "));
    let failed = |stderr: String| Error::Command { command: command.clone(), stderr };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("could not start {program}: {e}")))?;
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(text.as_bytes()).map_err(|e| failed(format!("writing its stdin: {e}")))?;
    }
    let out = child.wait_with_output().map_err(|e| failed(format!("waiting for it: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        Err(failed(if stderr.is_empty() { out.status.to_string() } else { stderr }))
    }
}

fn ip(args: &[&str]) -> Result<()> {
    run("ip", args, None).map(drop)
}

/// The bind mount `ip netns add NAME` makes, which `setns` and `nsenter` open.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Runs `f` on a thread that has entered the network namespace `name` (made by
/// `ip netns add`). A socket keeps the namespace it was created in, so a listener bound or
/// a connection made in `f` lives in that namespace whichever thread uses it later.
pub fn in_netns<T, F>(name: &str, f: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce() -> io::Result<T> + Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let path = netns_path(name);
                let ns = File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
                // SAFETY: a valid namespace fd; setns only changes this (scoped, soon ended)
                // thread's network namespace.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let e = io::Error::last_os_error();
                    return Err(io::Error::new(e.kind(), format!("setns({}): {e}", path.display())));
                }
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other(format!("a thread in network namespace {name} panicked"))))
    })
}

/// [`in_netns`] when `name` is given, else `f` right here (the host's namespace).
pub fn maybe_in_netns<T, F>(name: Option<&str>, f: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce() -> io::Result<T> + Send,
{
    match name {
        Some(name) => in_netns(name, f),
        None => f(),
    }
}

/// Why network namespaces cannot be made here, if they cannot: for tests that skip.
pub fn unavailable() -> Option<String> {
    if !crate::is_root() {
        return Some("needs root (network namespaces, veth, tc, nftables)".into());
    }
    for tool in ["ip", "tc", "nft", "nsenter"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()));
        if !found {
            return Some(format!("`{tool}` is not installed (cargo xtask test installs iproute2 and nftables)"));
        }
    }
    None
}

/// Two network namespaces joined by a veth pair: node 0 at `addrs[0]`, node 1 at
/// `addrs[1]`, on a /30 of their own. Both namespaces are deleted on drop.
pub struct Pair {
    pub names: [String; 2],
    pub addrs: [String; 2],
    veths: [String; 2],
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Pair {
    /// Creates the namespaces, the veth pair, the addresses, and brings everything up.
    pub fn new() -> Result<Pair> {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        // Interface names have at most 15 characters: "tv" + 5 + the counter + 1.
        let tag = format!("{}{k}", std::process::id() % 100_000);
        let names = [format!("tnd{tag}a"), format!("tnd{tag}b")];
        let veths = [format!("tv{tag}a"), format!("tv{tag}b")];
        // The namespaces see only each other, so every pair may use the same addresses.
        let addrs = ["10.231.0.1".to_owned(), "10.231.0.2".to_owned()];
        for n in &names {
            // Left behind by an earlier process with our pid (it is gone: pids are unique).
            let _ = ip(&["netns", "del", n]);
        }
        ip(&["netns", "add", &names[0]])?;
        // From here on, Drop cleans up whatever was made.
        let pair = Pair { names, addrs, veths };
        ip(&["netns", "add", &pair.names[1]])?;
        ip(&[
            "link",
            "add",
            &pair.veths[0],
            "netns",
            &pair.names[0],
            "type",
            "veth",
            "peer",
            "name",
            &pair.veths[1],
            "netns",
            &pair.names[1],
        ])?;
        for i in 0..2 {
            let ns = &pair.names[i];
            ip(&["-n", ns, "addr", "add", &format!("{}/30", pair.addrs[i]), "dev", &pair.veths[i]])?;
            ip(&["-n", ns, "link", "set", &pair.veths[i], "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    /// Node `i`'s address.
    pub fn addr(&self, i: usize) -> std::net::IpAddr {
        self.addrs[i].parse().expect("an IPv4 address")
    }

    /// Node `i`'s end of the veth pair.
    pub fn veth(&self, i: usize) -> &str {
        &self.veths[i]
    }

    /// The launcher prefix of a process that should run in node `i`'s namespace:
    /// `nsenter --net=...` gives it the namespace's network but keeps the host's mounts, so
    /// a daemon's FUSE mount and loop device stay visible (FIELD-NOTES: `ip netns exec` would
    /// give it a mount namespace of its own). Without `--fork` nsenter execs the program, so
    /// the child's pid is the program's (`kill -9` reaches it).
    pub fn nsenter(&self, i: usize) -> Vec<String> {
        vec!["nsenter".into(), format!("--net={}", netns_path(&self.names[i]).display())]
    }

    /// Runs `f` in node `i`'s namespace (see [`in_netns`]).
    pub fn in_node<T, F>(&self, i: usize, f: F) -> io::Result<T>
    where
        T: Send,
        F: FnOnce() -> io::Result<T> + Send,
    {
        in_netns(&self.names[i], f)
    }

    /// Runs a command in node `i`'s namespace; its stdout.
    pub fn exec(&self, i: usize, program: &str, args: &[&str]) -> Result<String> {
        self.exec_with_stdin(i, program, args, None)
    }

    fn exec_with_stdin(&self, i: usize, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let net = format!("--net={}", netns_path(&self.names[i]).display());
        let mut all = vec![net.as_str(), program];
        all.extend_from_slice(args);
        run("nsenter", &all, stdin)
    }

    /// Takes node `i`'s end of the link down (sends fail at once) or up again.
    pub fn link(&self, i: usize, up: bool) -> Result<()> {
        ip(&["-n", &self.names[i], "link", "set", &self.veths[i], if up { "up" } else { "down" }])
    }

    /// Limits what node `i` sends to `bits_per_s` with a token bucket (`tc tbf`) on its
    /// veth's egress; replaces an earlier limit.
    pub fn rate(&self, i: usize, bits_per_s: u64) -> Result<()> {
        assert!(bits_per_s >= 8_000, "a rate below 1 kB/s is not a link");
        // 10 ms worth of tokens, and never less than a few full-size frames.
        let burst = (bits_per_s / 8 / 100).max(32 << 10);
        run(
            "tc",
            &[
                "-n",
                &self.names[i],
                "qdisc",
                "replace",
                "dev",
                &self.veths[i],
                "root",
                "tbf",
                "rate",
                &format!("{bits_per_s}bit"),
                "burst",
                &burst.to_string(),
                "latency",
                "100ms",
            ],
            None,
        )
        .map(drop)
    }

    /// Removes node `i`'s rate limit (nothing to do if there is none).
    pub fn rate_off(&self, i: usize) -> Result<()> {
        let shown = run("tc", &["-n", &self.names[i], "qdisc", "show", "dev", &self.veths[i], "root"], None)?;
        if !shown.contains("tbf") {
            return Ok(());
        }
        run("tc", &["-n", &self.names[i], "qdisc", "del", "dev", &self.veths[i], "root"], None).map(drop)
    }

    /// Drops `permille`/1000 of the packets node `i` receives, at random (nftables `netdev`
    /// table on its veth's ingress hook, `numgen random mod 1000 < N drop`); replaces an
    /// earlier loss. 0 removes it.
    pub fn loss(&self, i: usize, permille: u32) -> Result<()> {
        assert!(permille <= 1000, "loss is in permille: {permille}");
        if permille == 0 {
            return self.loss_off(i);
        }
        self.nft_table(i, LOSS_TABLE, &format!("numgen random mod 1000 < {permille} counter drop"))
    }

    /// Removes node `i`'s ingress loss (nothing to do if there is none).
    pub fn loss_off(&self, i: usize) -> Result<()> {
        self.nft_delete(i, LOSS_TABLE)
    }

    /// A silent partition: every packet either node receives is dropped. Nothing is refused
    /// and nothing fails, so TCP notices nothing and retransmits with backoff; only the
    /// protocol's own keepalive can tell.
    pub fn blackhole(&self) -> Result<()> {
        for i in 0..2 {
            self.nft_table(i, BLACKHOLE_TABLE, "counter drop")?;
        }
        Ok(())
    }

    /// Packets node `i`'s ingress loss has dropped so far (0 without a loss table).
    pub fn loss_dropped(&self, i: usize) -> Result<u64> {
        let listed = match self.exec(i, "nft", &["list", "table", "netdev", LOSS_TABLE]) {
            Ok(listed) => listed,
            Err(Error::Command { stderr, .. }) if stderr.contains("No such file") => return Ok(0),
            Err(e) => return Err(e),
        };
        // "... counter packets 12 bytes 3456 drop"
        let packets =
            listed.split_whitespace().skip_while(|w| *w != "packets").nth(1).and_then(|n| n.parse().ok()).ok_or_else(
                || Error::Command { command: "nft list table".into(), stderr: format!("no counter in {listed}") },
            )?;
        Ok(packets)
    }

    /// Ends the silent partition.
    pub fn blackhole_off(&self) -> Result<()> {
        for i in 0..2 {
            self.nft_delete(i, BLACKHOLE_TABLE)?;
        }
        Ok(())
    }

    /// (Re)creates `table` on node `i`'s veth ingress hook with one rule, in one transaction.
    fn nft_table(&self, i: usize, table: &str, rule: &str) -> Result<()> {
        let script = format!(
            "add table netdev {table}\n\
             delete table netdev {table}\n\
             table netdev {table} {{\n\
             \tchain ingress {{\n\
             \t\ttype filter hook ingress device \"{dev}\" priority -500; policy accept;\n\
             \t\t{rule}\n\
             \t}}\n\
             }}\n",
            dev = self.veths[i],
        );
        self.exec_with_stdin(i, "nft", &["-f", "-"], Some(&script)).map(drop)
    }

    fn nft_delete(&self, i: usize, table: &str) -> Result<()> {
        let script = format!("add table netdev {table}\ndelete table netdev {table}\n");
        self.exec_with_stdin(i, "nft", &["-f", "-"], Some(&script)).map(drop)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // The veth pair goes with its namespaces.
        for n in &self.names {
            let _ = ip(&["netns", "del", n]);
        }
    }
}
