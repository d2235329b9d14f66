//! System packages the tests need, installed with apt on Debian.

use anyhow::{bail, Result};

use crate::cmd::Cmd;
use crate::tools::is_root;

/// Debian packages `cargo xtask test` needs. The one place to add clang, bpftool, fuse3, qemu...
pub const APT_PACKAGES: &[&str] = &[
    // The end-to-end tests: ext4 on the replicated device, mount, loop devices, nsenter,
    // network namespaces and veth; nftables for the tests' packet loss and silent partitions.
    "e2fsprogs",
    "iproute2",
    "mount",
    "nftables",
    "util-linux",
    // Building `tandem-bpf`: the eBPF programs (clang, bpftool for vmlinux.h and the
    // map dumps the tests parse) and libbpf, which libbpf-sys compiles from source.
    "bpftool",
    "clang-16",
    "gcc",
    "libelf-dev",
    "make",
    "pkg-config",
    "zlib1g-dev",
    // Building `tandem-frontend`'s ublk frontend: libublk-rs-sys runs bindgen over the ublk
    // UAPI header, which needs libclang and the kernel's UAPI headers (<linux/...>).
    "libclang1-16",
    "linux-libc-dev",
];

/// Install the missing packages of [`APT_PACKAGES`] when root; otherwise fail naming them.
pub fn ensure_packages() -> Result<()> {
    ensure(APT_PACKAGES)
}

pub fn ensure(packages: &[&str]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    if !Cmd::new("dpkg").arg("--version").succeeds() {
        println!(
            "warning: no dpkg here, cannot check for the Debian packages {}; install their equivalents yourself",
            packages.join(" ")
        );
        return Ok(());
    }
    let missing: Vec<&str> =
        packages.iter().copied().filter(|package| !Cmd::new("dpkg").args(["-s", package]).succeeds()).collect();
    if missing.is_empty() {
        println!("apt packages present: {}", packages.join(" "));
        return Ok(());
    }
    if !is_root()? {
        bail!(
            "missing Debian packages: {0}; install them with `sudo apt-get install {0}` or run as root",
            missing.join(" ")
        );
    }
    Cmd::new("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive").run()?;
    Cmd::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run()
}
