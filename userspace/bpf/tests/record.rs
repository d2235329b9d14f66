//! Root-only: the programs record exactly the written tracks of a loop device, through mmap and
//! through bpftool; ext4 on top; a partition; a daemon restart (drop + re-open); unpin.
//! Each test prints why it skips when it cannot run (not root, no BTF); set
//! TANDEM_BPF_TESTS=require to make that a failure instead.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use tandem_bpf::{BpfError, Flavor, Volume, VolumeConfig};

const TRACK: u64 = 64 * 1024;

fn tracks(range: std::ops::RangeInclusive<u64>) -> BTreeSet<u64> {
    range.collect()
}

/// Toggles, drains and clears every range, twice: afterwards nothing is marked (if nothing
/// writes meanwhile).
fn forget_everything(v: &Volume) {
    for _ in 0..2 {
        for r in 0..v.range_count() {
            v.destage_range(r, Duration::from_secs(10), |_| Ok(())).unwrap();
        }
    }
}

fn assert_recorded(v: &Volume, expected: &BTreeSet<u64>, what: &str) {
    let mmap: BTreeSet<u64> = v.dirty_tracks().into_iter().collect();
    assert_eq!(&mmap, expected, "{what}: tracks marked (mmap) vs tracks written");
    let bpftool: BTreeSet<u64> = dirty_tracks_via_bpftool(v).into_iter().collect();
    assert_eq!(&bpftool, expected, "{what}: tracks marked (bpftool map dump) vs tracks written");
    for (r, state) in v.range_states().iter().enumerate() {
        assert_eq!(state.inflight, [0, 0], "{what}: range {r} still counts writes in flight: {state:?}");
        assert_eq!(state.untracked, 0, "{what}: range {r}: {state:?}");
    }
    assert!(v.inflight_bios().is_empty(), "{what}: inflight table not empty");
}

/// O_DIRECT writes, a discard, a write-zeroes, a flush and reads at known offsets of a loop
/// device (64 KiB tracks, ranges of 100 tracks: range and word boundaries do not coincide):
/// exactly the written tracks are marked, nothing else.
fn raw_device_writes(flavor: Flavor) {
    let dev = LoopDevice::new(1024 * TRACK, true);
    let name = volume_name("raw");
    let _pinned = Pinned(name.clone());
    let v = Volume::load(&config(&name, &dev.path, TRACK as u32, 100, 1024, flavor)).unwrap();
    assert_eq!(v.flavor(), Some(flavor));
    assert_eq!(v.range_count(), 11);
    assert_recorded(&v, &BTreeSet::new(), "before any write");

    let f = dev.open_direct();
    let mut expected = BTreeSet::new();
    write_direct(&f, 0, 4096, 1); // first block
    expected.insert(0);
    write_direct(&f, 6 * TRACK - 4096, 8192, 2); // straddles tracks 5 and 6
    expected.extend([5, 6]);
    write_direct(&f, 63 * TRACK, 2 * TRACK as usize, 3); // straddles bitmap words 0 and 1
    expected.extend([63, 64]);
    write_direct(&f, 95 * TRACK, 1 << 20, 4); // 16 tracks across the range 0 / range 1 boundary
    expected.extend(tracks(95..=110));
    write_direct(&f, 700 * TRACK + 512, 512, 5); // one sector
    expected.insert(700);
    write_direct(&f, 1024 * TRACK - 4096, 4096, 6); // last block of the device
    expected.insert(1023);
    discard(&f, 300 * TRACK, 20 * TRACK);
    expected.extend(tracks(300..=319));
    zero_out(&f, 500 * TRACK, 2 * TRACK);
    expected.extend([500, 501]);
    f.sync_all().unwrap(); // an empty flush: marks nothing
    let mut buf = AlignedBuf::new(65536);
    std::os::unix::fs::FileExt::read_exact_at(&f, buf.as_mut_slice(), 800 * TRACK).unwrap(); // a read
    assert_recorded(&v, &expected, "after the writes");

    // The destage cycle: toggle moves the marks to the old side, clear forgets them.
    let r1 = v.range_tracks(1).unwrap();
    assert_eq!(r1.current, (100..=110).collect::<Vec<_>>());
    assert!(r1.old.is_empty());
    v.toggle(1).unwrap();
    let r1 = v.range_tracks(1).unwrap();
    assert_eq!((r1.current_side, r1.current.is_empty(), r1.old.len()), (1, true, 11));
    assert_recorded(&v, &expected, "after toggling range 1");
    v.wait_old_drained(1, Duration::from_secs(5)).unwrap();
    v.clear_old(1).unwrap();
    for t in 100..=110 {
        expected.remove(&t);
    }
    assert_recorded(&v, &expected, "after clearing range 1's old side");
    write_direct(&f, 105 * TRACK, 4096, 7);
    expected.insert(105);
    assert_eq!(v.range_tracks(1).unwrap().current, vec![105], "new marks go to the new current side");
    assert_recorded(&v, &expected, "after a write to range 1");

    forget_everything(&v);
    assert_recorded(&v, &BTreeSet::new(), "after destaging every range");
    let states = v.range_states();
    assert!(states.iter().all(|s| s.toggles == 2 || (s.toggles == 3)), "{states:?}");
    v.unpin().unwrap();
}

#[test]
fn raw_device_writes_mark_exactly_their_tracks_tp_btf() {
    if skip("raw_device_writes_mark_exactly_their_tracks_tp_btf") {
        return;
    }
    raw_device_writes(Flavor::TpBtf);
}

#[test]
fn raw_device_writes_mark_exactly_their_tracks_classic() {
    if skip("raw_device_writes_mark_exactly_their_tracks_classic") {
        return;
    }
    raw_device_writes(Flavor::Classic);
}

/// Physical byte extents of a file, from `filefrag -v` (in filesystem blocks).
fn file_extents(path: &Path) -> Vec<(u64, u64)> {
    let out = run("filefrag", &["-v", path.to_str().unwrap()]);
    let block: u64 = out
        .lines()
        .find_map(|l| l.split(" blocks of ").nth(1)?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no block size in filefrag output:\n{out}"));
    let mut extents = Vec::new();
    for line in out.lines() {
        let fields: Vec<&str> = line.split(':').map(str::trim).collect();
        if fields.len() < 4 || fields[0].parse::<u64>().is_err() {
            continue;
        }
        let (start, end) = fields[2].split_once("..").expect("physical range");
        let (start, end): (u64, u64) = (start.trim().parse().unwrap(), end.trim().parse().unwrap());
        extents.push((start * block, (end + 1) * block));
    }
    assert!(!extents.is_empty(), "no extents in filefrag output:\n{out}");
    extents
}

/// ext4 on the loop device: mkfs's whole-device discard marks every track; after a destage of
/// everything, a file written and synced has all its tracks marked (ext4's own metadata and
/// journal writes mark more, which is fine: the record may over-approximate).
#[test]
fn ext4_file_tracks_are_marked() {
    if skip("ext4_file_tracks_are_marked") {
        return;
    }
    for tool in ["mkfs.ext4", "filefrag", "mount"] {
        assert!(tool_exists(tool), "{tool} missing (e2fsprogs, util-linux)");
    }
    let tracks_total = 2048;
    let dev = LoopDevice::new(tracks_total * TRACK, true);
    let name = volume_name("ext4");
    let _pinned = Pinned(name.clone());
    let v = Volume::load(&config(&name, &dev.path, TRACK as u32, 512, tracks_total, Flavor::TpBtf)).unwrap();

    run("mkfs.ext4", &["-q", "-F", "-E", "discard", dev.path.to_str().unwrap()]);
    assert_eq!(v.dirty_count(), tracks_total, "mkfs's whole-device discard marks every track");
    forget_everything(&v);
    assert_eq!(v.dirty_count(), 0);

    let mnt = tempfile::tempdir().unwrap();
    run("mount", &["-t", "ext4", dev.path.to_str().unwrap(), mnt.path().to_str().unwrap()]);
    struct Umount<'a>(&'a Path);
    impl Drop for Umount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let umount = Umount(mnt.path());
    let file = mnt.path().join("data");
    let content: Vec<u8> = (0..(3 << 20) + 12345).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &content).unwrap();
    std::fs::File::open(&file).unwrap().sync_all().unwrap();
    run("sync", &[]);

    let mut expected = BTreeSet::new();
    for (start, end) in file_extents(&file) {
        expected.extend(start / TRACK..end.div_ceil(TRACK));
    }
    let marked: BTreeSet<u64> = v.dirty_tracks().into_iter().collect();
    let missing: Vec<_> = expected.difference(&marked).collect();
    assert!(missing.is_empty(), "tracks of the file not marked: {missing:?} (file tracks {expected:?})");
    let via_bpftool: BTreeSet<u64> = dirty_tracks_via_bpftool(&v).into_iter().collect();
    assert_eq!(via_bpftool, marked, "bpftool and mmap disagree");
    assert!((marked.len() as u64) < tracks_total / 2, "a 3 MiB file marked {} of {tracks_total} tracks", marked.len());
    eprintln!(
        "ext4: the file covers {} tracks, {} tracks marked in all (metadata, journal)",
        expected.len(),
        marked.len()
    );
    drop(umount);
    v.unpin().unwrap();
}

/// A volume on a partition: its bios reach the queue tracepoint with absolute sectors (the
/// partition start added) and the partition's dev_t; writes through the whole disk carry the
/// disk's. The programs mark the partition's own tracks for both, and nothing for writes to the
/// disk outside the partition.
#[test]
fn partition_writes_mark_partition_relative_tracks() {
    if skip("partition_writes_mark_partition_relative_tracks") {
        return;
    }
    // One partition starting at 4 MiB (sector 8192), 32 MiB long.
    let disk = LoopDevice::with_partitions(64 << 20, true, &[(8192, 65536)]);
    let part = std::path::PathBuf::from(format!("{}p1", disk.path.display()));
    for _ in 0..100 {
        if part.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(part.exists(), "{} did not appear", part.display());
    let info = tandem_bpf::DeviceInfo::resolve(&tandem_bpf::DeviceRef::Path(part.clone())).unwrap();
    assert!(info.partition);
    assert_eq!((info.start_sector, info.nr_sectors), (8192, 65536));

    let name = volume_name("part");
    let _pinned = Pinned(name.clone());
    let v = Volume::load(&config(&name, &part, TRACK as u32, 64, 512, Flavor::TpBtf)).unwrap();
    assert_eq!(v.params().dev, info.kernel_dev);
    let rdev = std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(&disk.path).unwrap());
    assert_eq!(info.disk_dev, Some(tandem_bpf::kernel_dev(libc::major(rdev), libc::minor(rdev))));
    assert_eq!(v.params().start_sector, 8192);
    let whole = tandem_bpf::DeviceInfo::resolve(&tandem_bpf::DeviceRef::Path(disk.path.clone())).unwrap();
    assert!(whole.diskseq.is_some());
    assert_eq!((info.diskseq, v.params().diskseq), (whole.diskseq, whole.diskseq.unwrap()), "the whole disk's");

    let p = {
        let mut o = std::fs::OpenOptions::new();
        std::os::unix::fs::OpenOptionsExt::custom_flags(o.read(true).write(true), libc::O_DIRECT);
        o.open(&part).unwrap()
    };
    write_direct(&p, 0, 4096, 1);
    write_direct(&p, 100 * TRACK, 4096, 1);
    write_direct(&p, 511 * TRACK, 4096, 1);
    let whole = disk.open_direct();
    write_direct(&whole, 0, 4096, 2); // before the partition
    write_direct(&whole, (4 << 20) + 200 * TRACK, 4096, 2); // inside it: track 200
    write_direct(&whole, 60 << 20, 4096, 2); // after it
    assert_recorded(&v, &BTreeSet::from([0, 100, 200, 511]), "partition");
    drop(p);
    v.unpin().unwrap();
}

fn link_ids(v: &Volume) -> Vec<u64> {
    tandem_bpf::layout::pins::LINKS
        .iter()
        .map(|l| {
            let out = run("bpftool", &["-j", "link", "show", "pinned", v.pin_dir().join(l).to_str().unwrap()]);
            let json: serde_json::Value = serde_json::from_str(&out).unwrap();
            json["id"].as_u64().unwrap_or_else(|| panic!("no link id in {out}"))
        })
        .collect()
}

/// A daemon restart: the Rust handles go away, the pinned links keep the programs recording,
/// the pinned maps keep the bits; re-opening finds them all. Unpinning detaches the programs
/// and removes the directory.
#[test]
fn restart_keeps_the_bits_and_unpin_cleans_up() {
    if skip("restart_keeps_the_bits_and_unpin_cleans_up") {
        return;
    }
    let dev = LoopDevice::new(256 * TRACK, true);
    let name = volume_name("restart");
    let _pinned = Pinned(name.clone());
    let cfg = config(&name, &dev.path, TRACK as u32, 64, 256, Flavor::TpBtf);
    let v = Volume::load(&cfg).unwrap();
    let dir = v.pin_dir().to_owned();
    let f = dev.open_direct();
    write_direct(&f, 3 * TRACK, 4096, 1);
    write_direct(&f, 150 * TRACK, 4096, 1);
    v.toggle(2).unwrap(); // track 150 is now on range 2's old side
    drop(v); // the "daemon" dies

    write_direct(&f, 7 * TRACK, 4096, 1); // nobody holds a handle: still recorded
    write_direct(&f, 160 * TRACK, 4096, 1);

    let v = Volume::open(&name).unwrap();
    assert!(v.is_attached());
    assert_eq!(v.flavor(), Some(Flavor::TpBtf));
    assert_recorded(&v, &BTreeSet::from([3, 7, 150, 160]), "after re-opening");
    let r2 = v.range_tracks(2).unwrap();
    assert_eq!((r2.old, r2.current), (vec![150], vec![160]), "the toggle survived too");

    match Volume::load(&cfg) {
        Err(BpfError::AlreadyLoaded { dir: d, .. }) => assert_eq!(d, dir),
        other => panic!("loading a loaded volume again: {other:?}"),
    }

    let ids = link_ids(&v);
    v.unpin().unwrap();
    assert!(!dir.exists(), "{} still exists after unpin", dir.display());
    for id in ids {
        let gone =
            !Command::new("bpftool").args(["link", "show", "id", &id.to_string()]).output().unwrap().status.success();
        assert!(gone, "link {id} still exists after unpin");
    }
    assert!(matches!(Volume::open(&name), Err(BpfError::NotLoaded { .. })));
    assert!(!tandem_bpf::unpin(&name).unwrap(), "a second unpin finds nothing");

    // Loading again starts from empty maps.
    let v = Volume::load(&cfg).unwrap();
    assert_recorded(&v, &BTreeSet::new(), "fresh load");
    v.unpin().unwrap();
}

/// Auto picks tp_btf here; probe agrees; both flavours load.
#[test]
fn probe_and_auto_pick_tp_btf() {
    if skip("probe_and_auto_pick_tp_btf") {
        return;
    }
    let a = tandem_bpf::probe();
    assert_eq!(a.flavor, Some(Flavor::TpBtf), "{}", a.summary());
    assert!(a.problems.is_empty(), "{}", a.summary());
    eprintln!("{}", a.summary());
    let dev = LoopDevice::new(64 * TRACK, false);
    let name = volume_name("auto");
    let _pinned = Pinned(name.clone());
    let v = Volume::load(&VolumeConfig::new(name.as_str(), dev.path.as_path(), TRACK as u32, 16, 64)).unwrap();
    assert_eq!((v.flavor(), v.fallback_reason()), (Some(Flavor::TpBtf), None));
    v.unpin().unwrap();
}

/// Precise errors for the mistakes an operator makes.
#[test]
fn errors_say_what_is_wrong() {
    if skip("errors_say_what_is_wrong") {
        return;
    }
    let dev = LoopDevice::new(64 * TRACK, false);
    let not_block = VolumeConfig::new("x", Path::new("/dev/null"), TRACK as u32, 16, 64);
    let e = Volume::load(&not_block).unwrap_err();
    assert!(matches!(e, BpfError::Device { .. }) && e.to_string().contains("not a block device"), "{e}");
    let too_big = VolumeConfig::new("x", dev.path.as_path(), TRACK as u32, 16, 65);
    let e = Volume::load(&too_big).unwrap_err();
    assert!(matches!(e, BpfError::Geometry(_)), "{e}");
    assert!(matches!(Volume::open("no-such-volume-here"), Err(BpfError::NotLoaded { .. })));
    let name = volume_name("err");
    let _pinned = Pinned(name.clone());
    let v = Volume::load(&config(&name, &dev.path, TRACK as u32, 16, 64, Flavor::TpBtf)).unwrap();
    assert!(matches!(v.toggle(4), Err(BpfError::NoSuchRange { range: 4, ranges: 4 })));
    assert!(matches!(v.is_marked(64), Err(BpfError::NoSuchTrack { track: 64, tracks: 64 })));
    // A leftover old side with writes still counted on it: toggling again is refused.
    v.mark(1).unwrap();
    v.toggle(0).unwrap(); // track 1 -> old
    assert!(v.is_marked(1).unwrap());
    v.toggle(0).unwrap(); // leftover old (no writes in flight): merged into the new old side
    assert_eq!(v.range_tracks(0).unwrap().old, vec![1]);
    v.unpin().unwrap();
}

/// The tp_btf object compiled against the checked-in fallback vmlinux.h (not the generated one)
/// loads here: its CO-RE relocations resolve against this kernel by name.
#[test]
fn fallback_header_object_loads() {
    if skip("fallback_header_object_loads") {
        return;
    }
    let clang = std::env::var("TANDEM_BPF_CLANG").unwrap_or_else(|_| "clang-16".into());
    let ebpf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ebpf");
    let dir = tempfile::tempdir().unwrap();
    let headers = dir.path().join("include/bpf");
    std::fs::create_dir_all(&headers).unwrap();
    for (name, contents) in libbpf_rs::libbpf_sys::API_HEADERS.iter() {
        std::fs::write(headers.join(name), contents).unwrap();
    }
    let obj = dir.path().join("tandem.bpf.o");
    let out = Command::new(&clang)
        .args(["-g", "-O2", "-target", "bpf", "-mcpu=v3", "-D__TARGET_ARCH_x86"])
        .arg("-I")
        .arg(ebpf.join("fallback"))
        .arg("-I")
        .arg(&ebpf)
        .arg("-I")
        .arg(dir.path().join("include"))
        .arg("-c")
        .arg(ebpf.join("tandem.bpf.c"))
        .arg("-o")
        .arg(&obj)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut open = libbpf_rs::ObjectBuilder::default().open_file(&obj).unwrap();
    for mut map in open.maps_mut() {
        if map.name() == "bitmap" || map.name() == "ranges" {
            map.set_max_entries(2).unwrap();
        }
    }
    open.load().expect("the fallback-header object loads");
}

/// `stat`'s device number of a block device node.
fn rdev(path: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// A device number reused while the programs stay pinned: the daemon (killed) took its loop
/// device with it, and the next `losetup` got the freed minor, i.e. the same dev_t, for an
/// unrelated file. The writes to that device must not enter the record. The tp_btf programs
/// tell the two apart by the disk's diskseq (a per-boot counter the kernel never reuses, which
/// a loop device's re-attach advances).
#[test]
fn a_reused_device_number_is_not_recorded_tp_btf() {
    if skip("a_reused_device_number_is_not_recorded_tp_btf") {
        return;
    }
    let dev = LoopDevice::new(64 * TRACK, true);
    let path = dev.path.to_str().unwrap().to_owned();
    let name = volume_name("reuse");
    let _pinned = Pinned(name.clone());
    let v = Volume::load(&config(&name, &dev.path, TRACK as u32, 16, 64, Flavor::TpBtf)).unwrap();
    let f = dev.open_direct();
    write_direct(&f, 5 * TRACK, 4096, 1);
    drop(f);
    assert_recorded(&v, &BTreeSet::from([5]), "the volume's own write");
    let before = rdev(&dev.path);
    let first = tandem_bpf::DeviceInfo::resolve(&tandem_bpf::DeviceRef::Path(dev.path.clone())).unwrap();
    let seq = first.diskseq.expect("this kernel (>= 5.15) numbers its disks: /sys/block/*/diskseq");
    assert_eq!(v.params().diskseq, seq, "params.diskseq is the device's");
    assert_eq!(v.device_mismatch(&first), None);

    // The volume's device goes away, the programs stay attached (nobody unpins them).
    run("losetup", &["-d", &path]);
    // Another "test" attaches an unrelated file to the very same minor (a concurrent
    // `losetup -f` may hold it for a moment, and the detach completes at the last close).
    let other = tempfile::Builder::new().prefix("tandem-bpf-reuse").tempdir().unwrap();
    let backing = other.path().join("backing");
    std::fs::File::create(&backing).and_then(|f| f.set_len(64 * TRACK)).unwrap();
    let mut attached = false;
    let mut last = String::new();
    for _ in 0..100 {
        let out = Command::new("losetup")
            .args(["--direct-io=on", &path, backing.to_str().unwrap()])
            .output()
            .expect("running losetup");
        if out.status.success() {
            attached = true;
            break;
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(attached, "cannot attach a new file to {path} (someone else took it?): {last}");
    let listed = run("losetup", &["-n", "-O", "BACK-FILE", &path]);
    assert_eq!(listed.trim(), backing.to_str().unwrap(), "{path} is not the new device");
    assert_eq!(rdev(&dev.path), before, "the new device must have the same dev_t, else this proves nothing");
    let second = tandem_bpf::DeviceInfo::resolve(&tandem_bpf::DeviceRef::Path(dev.path.clone())).unwrap();
    assert_eq!(second.kernel_dev, first.kernel_dev);
    assert!(second.diskseq.is_some_and(|s| s > seq), "a re-attach advances the diskseq: {second:?}");
    let why = v.device_mismatch(&second).expect("the new device is not the recorded one");
    assert!(why.contains("diskseq"), "{why}");

    let g = dev.open_direct();
    write_direct(&g, 9 * TRACK, 4096, 2);
    write_direct(&g, 10 * TRACK, 2 * TRACK as usize, 2);
    write_direct(&g, 63 * TRACK, 4096, 2);
    discard(&g, 30 * TRACK, 4 * TRACK);
    zero_out(&g, 40 * TRACK, TRACK);
    g.sync_all().unwrap();
    drop(g);
    assert_recorded(&v, &BTreeSet::from([5]), "after the writes to the device that reused the number");
    v.unpin().unwrap();
}
