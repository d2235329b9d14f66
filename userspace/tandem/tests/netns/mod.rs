//! Two test hosts on one machine: network namespaces joined by a veth pair, with addresses
//! of their own (this sandbox only lets tests talk to loopback and namespaces they made).

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

pub struct Pair {
    pub names: [String; 2],
    pub addrs: [String; 2],
    veths: [String; 2],
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Pair {
    /// Creates the namespaces; None (with the reason) where namespaces cannot be made.
    pub fn new() -> Result<Pair, String> {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{}", std::process::id() % 100_000, k);
        let names = [format!("tnd{tag}a"), format!("tnd{tag}b")];
        let veths = [format!("tv{tag}a"), format!("tv{tag}b")];
        // A /30 per pair, from the process id and a counter, in a range no host uses here.
        let net = (std::process::id() as usize * 7 + k as usize) % 250;
        let addrs = [format!("10.231.{net}.1"), format!("10.231.{net}.2")];
        let pair = Pair { names, addrs, veths };
        for n in &pair.names {
            ip(&["netns", "add", n])?;
        }
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

    /// `nsenter --net`: the daemon gets the namespace's network but keeps the host's mounts,
    /// so its FUSE mount and loop device stay visible (FIELD-NOTES).
    pub fn nsenter(&self, i: usize) -> Vec<String> {
        vec!["nsenter".into(), format!("--net=/run/netns/{}", self.names[i])]
    }

    /// Takes node `i`'s end of the link down (sends fail at once) or up again.
    pub fn link(&self, i: usize, up: bool) -> Result<(), String> {
        ip(&["-n", &self.names[i], "link", "set", &self.veths[i], if up { "up" } else { "down" }])
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = ip(&["netns", "del", n]);
        }
    }
}
