//! Compiles the eBPF programs in `ebpf/` with Debian's clang-16 and generates their libbpf-rs
//! skeletons. `vmlinux.h` comes from the build host's kernel BTF through bpftool, or from the
//! checked-in `ebpf/fallback/vmlinux.h` when the host has no BTF.
//!
//! Environment:
//! - `TANDEM_BPF_CLANG`: the clang to use (default `clang-16`);
//! - `TANDEM_BPF_BPFTOOL`: the bpftool to use (default `bpftool`);
//! - `TANDEM_BPF_VMLINUX`: `fallback` to force the checked-in header, or a path to a vmlinux.h.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use libbpf_cargo::SkeletonBuilder;

const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";
const OBJECTS: &[&str] = &["tandem", "tandem_classic"];

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let ebpf = manifest.join("../../ebpf").canonicalize().unwrap_or_else(|e| {
        fail(&format!("the eBPF sources are missing: {}: {e}", manifest.join("../../ebpf").display()))
    });
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));

    for var in ["TANDEM_BPF_CLANG", "TANDEM_BPF_BPFTOOL", "TANDEM_BPF_VMLINUX"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    for entry in fs::read_dir(&ebpf).expect("read ebpf/") {
        let path = entry.expect("read ebpf/").path();
        if path.is_file() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    println!("cargo:rerun-if-changed={}", ebpf.join("fallback/vmlinux.h").display());

    let clang = env::var("TANDEM_BPF_CLANG").unwrap_or_else(|_| "clang-16".to_owned());
    check_tool(
        &clang,
        &["--version"],
        "it compiles ebpf/*.bpf.c to BPF objects (`-target bpf`); install it with \
         `apt-get install clang-16` (Debian 12) or point TANDEM_BPF_CLANG at a clang >= 14",
    );

    let include = out.join("vmlinux");
    fs::create_dir_all(&include).expect("create OUT_DIR/vmlinux");
    let header = include.join("vmlinux.h");
    match vmlinux_source() {
        VmlinuxSource::Kernel => {
            let bpftool = env::var("TANDEM_BPF_BPFTOOL").unwrap_or_else(|_| "bpftool".to_owned());
            check_tool(
                &bpftool,
                &["version"],
                "it generates vmlinux.h from the kernel's BTF (`bpftool btf dump file \
                 /sys/kernel/btf/vmlinux format c`); install it with `apt-get install bpftool`, \
                 or build with TANDEM_BPF_VMLINUX=fallback to use ebpf/fallback/vmlinux.h",
            );
            let output = Command::new(&bpftool)
                .args(["btf", "dump", "file", KERNEL_BTF, "format", "c"])
                .output()
                .unwrap_or_else(|e| fail(&format!("running `{bpftool} btf dump file {KERNEL_BTF} format c`: {e}")));
            if !output.status.success() {
                fail(&format!(
                    "`{bpftool} btf dump file {KERNEL_BTF} format c` failed ({}): {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ));
            }
            write_if_changed(&header, &output.stdout);
        }
        VmlinuxSource::File(path) => {
            println!("cargo:rerun-if-changed={}", path.display());
            if path.starts_with(&ebpf) {
                println!(
                    "cargo:warning=tandem-bpf: no kernel BTF at {KERNEL_BTF} (or TANDEM_BPF_VMLINUX=fallback): \
                     compiling against the checked-in {}",
                    path.display()
                );
            }
            let bytes = fs::read(&path).unwrap_or_else(|e| fail(&format!("reading {}: {e}", path.display())));
            write_if_changed(&header, &bytes);
        }
    }

    for name in OBJECTS {
        let source = ebpf.join(format!("{name}.bpf.c"));
        let skel = out.join(format!("{name}.skel.rs"));
        let obj = out.join(format!("{name}.bpf.o"));
        let mut builder = SkeletonBuilder::new();
        builder.source(&source).obj(&obj).clang(&clang).clang_args([
            "-I".as_ref(),
            include.as_os_str(),
            "-I".as_ref(),
            ebpf.as_os_str(),
            // BPF atomics (fetch_or on the bitmap words) need the v3 instruction set.
            "-mcpu=v3".as_ref(),
            "-Wall".as_ref(),
            "-Werror".as_ref(),
        ]);
        if let Err(e) = builder.build_and_generate(&skel) {
            fail(&format!(
                "compiling {} with {clang} failed: {e:#}\n(re-run the compiler by hand for its diagnostics: \
                 {clang} -g -O2 -target bpf -mcpu=v3 -D__TARGET_ARCH_x86 -I {} -I {} -c {})",
                source.display(),
                include.display(),
                ebpf.display(),
                source.display()
            ));
        }
    }
}

enum VmlinuxSource {
    Kernel,
    File(PathBuf),
}

fn vmlinux_source() -> VmlinuxSource {
    let fallback = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap()).join("../../ebpf/fallback/vmlinux.h");
    let fallback = fallback.canonicalize().unwrap_or(fallback);
    match env::var("TANDEM_BPF_VMLINUX") {
        Ok(v) if v == "fallback" => VmlinuxSource::File(fallback),
        Ok(v) if !v.is_empty() => VmlinuxSource::File(PathBuf::from(v)),
        _ if Path::new(KERNEL_BTF).exists() => VmlinuxSource::Kernel,
        _ => VmlinuxSource::File(fallback),
    }
}

fn check_tool(tool: &str, args: &[&str], why: &str) {
    match Command::new(tool).args(args).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => fail(&format!("`{tool} {}` failed ({}): {why}", args.join(" "), o.status)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fail(&format!("`{tool}` not found: {why}")),
        Err(e) => fail(&format!("cannot run `{tool}`: {e}: {why}")),
    }
}

fn write_if_changed(path: &Path, bytes: &[u8]) {
    if fs::read(path).map(|old| old == bytes).unwrap_or(false) {
        return;
    }
    fs::write(path, bytes).unwrap_or_else(|e| fail(&format!("writing {}: {e}", path.display())));
}

fn fail(message: &str) -> ! {
    eprintln!("error: tandem-bpf build: {message}");
    panic!("tandem-bpf build: {message}");
}
