//! Unit tests that need neither root nor a kernel: the Rust mirror of ebpf/tandem.h against
//! the BTF clang emitted, the header's constants, the classic object's lack of CO-RE, and the
//! fallback vmlinux.h still compiling.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use libbpf_rs::btf::types::Struct;
use libbpf_rs::btf::{Btf, HasSize};

use crate::layout::*;
use crate::objects;

/// (size, field name -> byte offset) of a struct in an object's BTF.
fn btf_struct(object: &[u8], name: &str) -> (usize, HashMap<String, usize>) {
    let btf = Btf::from_raw("tandem", object).expect("parse BTF").expect("object has BTF");
    let s: Struct<'_> = btf.type_by_name(name).unwrap_or_else(|| panic!("struct {name} not in the object's BTF"));
    let mut fields = HashMap::new();
    for m in s.iter() {
        let offset = match m.attr {
            libbpf_rs::btf::types::MemberAttr::Normal { offset } => offset,
            libbpf_rs::btf::types::MemberAttr::BitField { .. } => panic!("{name} has a bitfield"),
        };
        fields.insert(m.name.expect("named member").to_string_lossy().into_owned(), offset as usize / 8);
    }
    (s.size(), fields)
}

macro_rules! check_struct {
    ($object:expr, $c:literal, $rust:ty, [$($field:ident),* $(,)?]) => {{
        let (size, fields) = btf_struct($object, $c);
        assert_eq!(size, std::mem::size_of::<$rust>(), "size of struct {} vs {}", $c, stringify!($rust));
        let mut names = vec![$(stringify!($field).to_owned()),*];
        $(
            assert_eq!(
                fields.get(stringify!($field)).copied(),
                Some(std::mem::offset_of!($rust, $field)),
                "offset of {}.{}", $c, stringify!($field)
            );
        )*
        let mut c_names: Vec<String> = fields.keys().cloned().collect();
        c_names.sort();
        names.sort();
        assert_eq!(c_names, names, "fields of struct {} vs {}", $c, stringify!($rust));
    }};
}

#[test]
fn rust_layout_matches_the_btf_of_both_objects() {
    for object in [objects::TP_BTF, objects::CLASSIC] {
        check_struct!(
            object,
            "tandem_params",
            Params,
            [
                magic,
                version,
                dev,
                track_shift,
                start_sector,
                nr_sectors,
                tracks,
                tracks_per_range,
                words_per_range,
                ranges,
                flavor,
                generation,
                cpus,
                counters_per_cpu,
                diskseq
            ]
        );
        check_struct!(object, "tandem_range", RangeEntry, [current, toggles, marked, untracked]);
        check_struct!(
            object,
            "tandem_bio",
            BioEntry,
            [key, first_range, last_range, side, dev, queued_ns, sector, bytes, pad]
        );
    }
    check_struct!(
        objects::CLASSIC,
        "tandem_tp_layout",
        TpLayout,
        [bio_queue_rwbs, split_rwbs, rq_complete_rwbs, bio_complete_rwbs]
    );
    for object in [objects::TP_BTF, objects::CLASSIC] {
        check_struct!(
            object,
            "tandem_consts",
            Consts,
            [
                start_sector,
                nr_sectors,
                tracks,
                diskseq,
                devs,
                track_shift,
                tracks_per_range,
                range_shift,
                words_per_range,
                cpus,
                counters_per_cpu,
                tp
            ]
        );
    }
}

fn ebpf_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ebpf")
}

#[test]
fn rust_constants_match_the_header() {
    let header = std::fs::read_to_string(ebpf_dir().join("tandem.h")).unwrap();
    let define = |name: &str| -> u64 {
        let line = header
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name) && l.starts_with("#define"))
            .unwrap_or_else(|| panic!("#define {name} not in tandem.h"));
        let value = line.split_whitespace().nth(2).unwrap().trim_end_matches('u');
        match value.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
            None => value.parse().unwrap(),
        }
    };
    assert_eq!(define("TANDEM_MAGIC"), u64::from(MAGIC));
    assert_eq!(define("TANDEM_LAYOUT_VERSION"), u64::from(LAYOUT_VERSION));
    assert_eq!(define("TANDEM_MAX_DEVICES"), u64::from(MAX_DEVICES));
    assert_eq!(define("TANDEM_INFLIGHT_BITS"), u64::from(INFLIGHT_BITS));
    assert_eq!(define("TANDEM_INFLIGHT_PROBES"), u64::from(INFLIGHT_PROBES));
    assert_eq!(define("TANDEM_WORD_BITS"), u64::from(WORD_BITS));
    assert_eq!(define("TANDEM_FLAVOR_TP_BTF"), u64::from(FLAVOR_TP_BTF));
    assert_eq!(define("TANDEM_FLAVOR_CLASSIC"), u64::from(FLAVOR_CLASSIC));
    assert_eq!(define("TANDEM_SIDE_BOTH"), u64::from(SIDE_BOTH));
    assert_eq!(define("TANDEM_KEY_FILLING"), KEY_FILLING);
    assert_eq!(define("TANDEM_NO_SHIFT"), u64::from(NO_SHIFT));
    assert_eq!(define("TANDEM_QUEUED"), u64::from(QUEUED));
    assert_eq!(define("TANDEM_COMPLETED"), u64::from(COMPLETED));
    assert_eq!(&MAGIC.to_le_bytes(), b"TNDM");
}

/// Length of the CO-RE relocation table in an object's .BTF.ext section.
fn core_relo_len(object: &[u8]) -> u32 {
    let u16_at = |o: usize| u16::from_le_bytes(object[o..o + 2].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(object[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(object[o..o + 8].try_into().unwrap());
    assert_eq!(&object[..4], b"\x7fELF");
    assert_eq!(object[4], 2, "ELF64");
    let shoff = u64_at(0x28) as usize;
    let (shentsize, shnum, shstrndx) = (u16_at(0x3a) as usize, u16_at(0x3c) as usize, u16_at(0x3e) as usize);
    let section = |i: usize| {
        let h = shoff + i * shentsize;
        (u32_at(h) as usize, u64_at(h + 0x18) as usize, u64_at(h + 0x20) as usize)
    };
    let (_, strtab, _) = section(shstrndx);
    for i in 0..shnum {
        let (name, offset, _size) = section(i);
        let name_bytes = &object[strtab + name..];
        let name = &name_bytes[..name_bytes.iter().position(|&b| b == 0).unwrap()];
        if name == b".BTF.ext" {
            assert_eq!(u16_at(offset), 0xeb9f, ".BTF.ext magic");
            let hdr_len = u32_at(offset + 4);
            return if hdr_len >= 32 { u32_at(offset + 28) } else { 0 };
        }
    }
    0
}

#[test]
fn the_classic_object_has_no_core_relocations() {
    assert!(core_relo_len(objects::TP_BTF) > 0, "the check must see the tp_btf object's CO-RE relocations");
    assert_eq!(
        core_relo_len(objects::CLASSIC),
        0,
        "tandem_classic.bpf.c must load on kernels without BTF: no CO-RE relocations"
    );
}

/// The checked-in ebpf/fallback/vmlinux.h must keep compiling both programs (it is only used on
/// build hosts without BTF, so nothing else would notice it rotting).
#[test]
fn the_fallback_vmlinux_header_compiles_both_programs() {
    let clang = std::env::var("TANDEM_BPF_CLANG").unwrap_or_else(|_| "clang-16".into());
    if Command::new(&clang).arg("--version").output().is_err() {
        eprintln!("SKIPPED: {clang} not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let headers = dir.path().join("include/bpf");
    std::fs::create_dir_all(&headers).unwrap();
    for (name, contents) in libbpf_rs::libbpf_sys::API_HEADERS.iter() {
        std::fs::write(headers.join(name), contents).unwrap();
    }
    for source in ["tandem.bpf.c", "tandem_classic.bpf.c"] {
        let out = Command::new(&clang)
            .args(["-g", "-O2", "-target", "bpf", "-mcpu=v3", "-D__TARGET_ARCH_x86", "-Wall", "-Werror"])
            .arg("-I")
            .arg(ebpf_dir().join("fallback"))
            .arg("-I")
            .arg(ebpf_dir())
            .arg("-I")
            .arg(dir.path().join("include"))
            .arg("-c")
            .arg(ebpf_dir().join(source))
            .arg("-o")
            .arg(dir.path().join(format!("{source}.o")))
            .output()
            .unwrap();
        assert!(out.status.success(), "{source} with the fallback vmlinux.h: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn geometry_is_validated() {
    use crate::device::{DeviceInfo, DeviceRef};
    use crate::volume::{geometry, VolumeConfig};
    use crate::{BpfError, Flavor};
    let device = DeviceInfo {
        device: DeviceRef::Dev { major: 7, minor: 0 },
        major: 7,
        minor: 0,
        kernel_dev: crate::kernel_dev(7, 0),
        disk_dev: None,
        diskseq: Some(42),
        start_sector: 0,
        nr_sectors: 2048 * 64, // 64 MiB
        partition: false,
    };
    let cfg = |ts, tpr, n| VolumeConfig::new("v", Path::new("/dev/null"), ts, tpr, n);
    let p = geometry(&cfg(65536, 100, 1024), &device, Flavor::TpBtf).unwrap();
    assert_eq!((p.ranges, p.words_per_range, p.track_shift, p.dev, p.diskseq), (11, 2, 16, 7 << 20, 42));
    assert_eq!(p.tracks_in_range(10), 24);
    assert_eq!(p.bitmap_words(), 44);
    assert_eq!(p.word_index(3, 1, 1), (3 * 2 + 1) * 2 + 1);
    assert!(matches!(geometry(&cfg(65536, 100, 1025), &device, Flavor::TpBtf), Err(BpfError::Geometry(_))));
    assert!(matches!(geometry(&cfg(3000, 100, 10), &device, Flavor::TpBtf), Err(BpfError::Geometry(_))));
    assert!(matches!(geometry(&cfg(65536, 0, 10), &device, Flavor::TpBtf), Err(BpfError::Geometry(_))));
    assert_eq!(crate::kernel_dev(259, 3), 259 << 20 | 3);
}

#[test]
fn volume_names_are_checked() {
    assert!(crate::pin_dir("vol-0.a_b").is_ok());
    for bad in ["", "..", "a/b", "a b", &"x".repeat(65)] {
        assert!(matches!(crate::pin_dir(bad), Err(crate::BpfError::InvalidName { .. })), "{bad:?}");
    }
}

#[test]
fn inflight_probes_stay_within_one_cache_line_each() {
    // The array is page-aligned (BPF_F_MMAPABLE): slot i spans bytes 48 i .. 48 i + 48.
    assert_eq!(BioEntry::SIZE, 48);
    for home in [0, 1, 2, 3, 4, 77, INFLIGHT_SLOTS - 5, INFLIGHT_SLOTS - 1] {
        let slots: Vec<u32> = (0..INFLIGHT_PROBES).map(|k| probe_slot(home, k)).collect();
        for &s in &slots {
            let start = s as usize * BioEntry::SIZE;
            assert_eq!(start / 64, (start + BioEntry::SIZE - 1) / 64, "slot {s} (home {home}) crosses a cache line");
        }
        let mut distinct = slots.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), slots.len(), "probes of home {home}: {slots:?}");
    }
}
