//! The store against real files through io_uring.

mod common;

use bytes::Bytes;
use common::{backing, collect, one, open, pattern};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use tandem_core::node::{Action, HardenScope, Payload};
use tandem_core::{Extent, Geometry, GeometryError};
use tandem_store::{Store, StoreError, StoreOp, MAX_IN_FLIGHT};

const MIB: u64 = 1 << 20;

fn geometry(size: u64) -> Geometry {
    Geometry::new(size, 512, 64 * 1024, 4).unwrap()
}

fn write(io: u64, offset: u64, data: Bytes, fua: bool) -> StoreOp {
    StoreOp::Write { io, offset, payload: Payload::Data(data), fua }
}

fn read_local(store: &Store, io: u64, offset: u64, len: u64) -> Bytes {
    store.submit(StoreOp::Read { io, offset, len }).unwrap();
    let (got, r) = one(store);
    assert_eq!(got, io);
    r.unwrap().expect("a read returns data")
}

#[test]
fn the_store_can_be_shared_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Store>();
}

#[test]
fn write_then_read_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = backing(dir.path(), 4 * MIB);
    let Some(store) = open(&path, &geometry(4 * MIB)) else { return };
    let a = pattern(1, 64 * 1024);
    let b = pattern(2, 512);
    store.submit(write(1, 0, a.clone(), false)).unwrap();
    store.submit(write(2, 3 * MIB + 512, b.clone(), false)).unwrap();
    let done = collect(&store, 2);
    assert_eq!(done[&1], Ok(None));
    assert_eq!(done[&2], Ok(None));

    assert_eq!(read_local(&store, 3, 0, a.len() as u64), a);
    assert_eq!(read_local(&store, 4, 3 * MIB + 512, 512), b);
    assert_eq!(store.read_sync(0, a.len() as u64).unwrap(), a);
    assert_eq!(store.read_sync(3 * MIB, 1024).unwrap()[512..], b[..]);
    // Never written: zeroes.
    assert!(store.read_sync(2 * MIB, 4096).unwrap().iter().all(|&x| x == 0));
}

#[test]
fn fua_writes_and_every_harden_scope_complete() {
    let dir = tempfile::tempdir().unwrap();
    let path = backing(dir.path(), 4 * MIB);
    let g = geometry(4 * MIB);
    let Some(store) = open(&path, &g) else { return };
    let data = pattern(3, 8192);
    store.submit(write(1, 4096, data.clone(), true)).unwrap();
    assert_eq!(one(&store), (1, Ok(None)));
    store.submit(write(2, MIB, pattern(4, 4096), false)).unwrap();
    assert_eq!(one(&store), (2, Ok(None)));
    for (io, scope) in [
        (3, HardenScope::All),
        (4, HardenScope::Range(0)),
        (5, HardenScope::Range(g.range_count() - 1)),
        (6, HardenScope::Extent(Extent::new(MIB, 4096))),
    ] {
        store.submit(StoreOp::Harden { io, scope }).unwrap();
    }
    let done = collect(&store, 4);
    assert!(done.values().all(|r| *r == Ok(None)), "{done:?}");
    // What a FUA write and a harden made stable is readable through a fresh descriptor.
    let mut back = vec![0u8; 8192];
    std::fs::File::open(&path).unwrap().read_exact_at(&mut back, 4096).unwrap();
    assert_eq!(back, data);
}

/// Fills the volume with 0xab, then zeroes extents in every way; each must read back as
/// zeroes and leave its neighbours alone.
fn zeroes_read_back_as_zeroes(dir: &Path) {
    let size = 8 * MIB;
    let path = backing(dir, size);
    let Some(store) = open(&path, &geometry(size)) else { return };
    store.submit(write(100, 0, Bytes::from(vec![0xab; size as usize]), false)).unwrap();
    assert_eq!(one(&store), (100, Ok(None)));
    let cases = [
        (1, 4096, 4096, true, false),
        (2, 64 * 1024, 128 * 1024, false, false),
        (3, MIB + 512, 1024, true, true),
        (4, 2 * MIB, 3 * MIB, false, true), // longer than the store's zero buffer
        (5, 6 * MIB + 512, 512, false, false),
    ];
    for &(io, offset, len, discard, fua) in &cases {
        store.submit(StoreOp::Write { io, offset, payload: Payload::Zeroes { len, discard }, fua }).unwrap();
    }
    let done = collect(&store, cases.len());
    assert!(done.values().all(|r| *r == Ok(None)), "{done:?}");
    let all = store.read_sync(0, size).unwrap();
    let mut expect = vec![0xab; size as usize];
    for &(_, offset, len, _, _) in &cases {
        expect[offset as usize..(offset + len) as usize].fill(0);
    }
    assert!(all[..] == expect[..], "contents differ from the expected zeroed extents");
    // Through the ring as well.
    assert!(read_local(&store, 10, 2 * MIB, 3 * MIB).iter().all(|&x| x == 0));
}

#[test]
fn zeroes_and_discards_read_back_as_zeroes() {
    // The temp directory's file system (ext4 here) punches holes and zeroes ranges itself.
    let dir = tempfile::tempdir().unwrap();
    zeroes_read_back_as_zeroes(dir.path());
}

#[test]
fn zeroes_fall_back_where_fallocate_is_refused() {
    // tmpfs refuses FALLOC_FL_ZERO_RANGE: the store must write the zeroes itself.
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("SKIPPED: no /dev/shm to test the write-zeroes fallback on tmpfs");
        return;
    }
    let dir = tempfile::tempdir_in(shm).unwrap();
    zeroes_read_back_as_zeroes(dir.path());
}

#[test]
fn many_concurrent_writes_land_with_the_right_data() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let path = backing(dir.path(), size);
    let Some(store) = open(&path, &geometry(size)) else { return };
    let n = 4 * MAX_IN_FLIGHT as u64;
    let block = 4096;
    // Scattered, non-overlapping blocks: block k goes to slot (k * 37) mod n.
    let at = |k: u64| ((k * 37) % n) * block;
    for k in 0..n {
        store.submit(write(k, at(k), pattern(k, block as usize), k % 3 == 0)).unwrap();
    }
    let done = collect(&store, n as usize);
    assert!(done.values().all(|r| *r == Ok(None)));
    for k in 0..n {
        store.submit(StoreOp::Read { io: n + k, offset: at(k), len: block }).unwrap();
    }
    let reads = collect(&store, n as usize);
    for k in 0..n {
        let got = reads[&(n + k)].clone().unwrap().unwrap();
        assert_eq!(got, pattern(k, block as usize), "block {k}");
        assert_eq!(store.read_sync(at(k), block).unwrap(), got);
    }
}

#[test]
fn large_writes_and_reads_cross_step_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let path = backing(dir.path(), size);
    let Some(store) = open(&path, &geometry(size)) else { return };
    let data = pattern(9, 40 * MIB as usize);
    store.submit(write(1, 512, data.clone(), true)).unwrap();
    assert_eq!(one(&store), (1, Ok(None)));
    assert!(read_local(&store, 2, 512, data.len() as u64) == data);
}

#[test]
fn accepted_operations_finish_when_the_store_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let path = backing(dir.path(), size);
    let g = geometry(size);
    let Some(store) = open(&path, &g) else { return };
    let completions = store.completions().clone();
    for k in 0..500u64 {
        store.submit(write(k, k * 4096, pattern(k, 4096), false)).unwrap();
    }
    drop(store);
    let done: Vec<_> = completions.try_iter().collect();
    assert_eq!(done.len(), 500);
    assert!(done.iter().all(|c| c.result == Ok(None)));
    let Some(store) = open(&path, &g) else { return };
    for k in 0..500u64 {
        assert_eq!(store.read_sync(k * 4096, 4096).unwrap(), pattern(k, 4096));
    }
}

#[test]
fn invalid_operations_are_refused_at_submit() {
    let dir = tempfile::tempdir().unwrap();
    let path = backing(dir.path(), MIB);
    let g = geometry(MIB);
    let Some(store) = open(&path, &g) else { return };
    let e = store.submit(write(1, MIB, pattern(1, 512), false)).unwrap_err();
    assert!(matches!(e, StoreError::InvalidExtent { io: 1, source: GeometryError::OutOfRange { .. }, .. }), "{e}");
    let e = store.submit(write(2, 100, pattern(1, 512), false)).unwrap_err();
    assert!(matches!(e, StoreError::InvalidExtent { source: GeometryError::Misaligned { .. }, .. }), "{e}");
    let e = store.submit(StoreOp::Read { io: 3, offset: 0, len: 0 }).unwrap_err();
    assert!(matches!(e, StoreError::InvalidExtent { source: GeometryError::Empty { .. }, .. }), "{e}");
    let e = store.submit(StoreOp::Harden { io: 4, scope: HardenScope::Range(99) }).unwrap_err();
    assert!(matches!(e, StoreError::InvalidExtent { source: GeometryError::NoSuchRange { .. }, .. }), "{e}");
    let meta = tandem_core::node::Meta::fresh(&g, 1);
    let e = store.submit(StoreOp::PersistMeta { io: 5, meta }).unwrap_err();
    assert!(matches!(e, StoreError::NoMetadata { io: 5 }), "{e}");
    let timer = Action::SetTimer { timer: tandem_core::node::Timer::Destage, at: 0 };
    let e = store.submit_action(timer).unwrap_err();
    assert_eq!(e.to_string(), "not a store operation: SetTimer");
    assert!(store.read_sync(MIB - 512, 1024).is_err());
    // Nothing was queued for any of them.
    assert!(store.completions().try_recv().is_err());
    // Actions the node emits are accepted as they are.
    store
        .submit_action(Action::WriteLocal { io: 6, offset: 0, payload: Payload::Data(pattern(6, 512)), fua: true })
        .unwrap();
    assert_eq!(one(&store), (6, Ok(None)));
}

#[test]
fn a_too_small_backing_file_is_refused_precisely() {
    let dir = tempfile::tempdir().unwrap();
    let path = backing(dir.path(), 3 * MIB);
    let e = Store::open(&path, &geometry(4 * MIB)).err().expect("refused");
    match &e {
        StoreError::BackingTooSmall { path: p, kind, size, volume_size, missing } => {
            assert_eq!(p, &path);
            assert_eq!((*kind, *size, *volume_size, *missing), ("file", 3 * MIB, 4 * MIB, MIB));
        }
        other => panic!("wrong error: {other}"),
    }
    let msg = e.to_string();
    assert!(msg.contains(&path.display().to_string()) && msg.contains("3145728") && msg.contains("4194304"), "{msg}");
    // Nothing was changed: the store never grows a file.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * MIB);
}

#[test]
fn other_kinds_of_paths_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = Store::open(dir.path(), &geometry(MIB)).err().expect("refused");
    assert!(matches!(e, StoreError::NotFileOrBlockDevice { kind: "directory", .. }), "{e}");
    let e = Store::open(Path::new("/dev/null"), &geometry(MIB)).err().expect("refused");
    assert!(matches!(e, StoreError::NotFileOrBlockDevice { kind: "character device", .. }), "{e}");
    let e = Store::open(&dir.path().join("missing"), &geometry(MIB)).err().expect("refused");
    assert!(e.to_string().starts_with("stat "), "{e}");
}

#[test]
fn a_second_store_on_the_same_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = backing(dir.path(), MIB);
    let Some(_first) = open(&path, &geometry(MIB)) else { return };
    let e = Store::open(&path, &geometry(MIB)).err().expect("refused");
    assert!(matches!(e, StoreError::InUse { .. }), "{e}");
}

#[test]
fn io_errors_carry_their_context() {
    let dir = tempfile::tempdir().unwrap();
    let path = backing(dir.path(), 2 * MIB);
    let Some(store) = open(&path, &geometry(2 * MIB)) else { return };
    // Someone truncates the file under the store: a read past the new end fails, naming
    // the operation, the extent and the file.
    OpenOptions::new().write(true).open(&path).unwrap().set_len(MIB).unwrap();
    store.submit(StoreOp::Read { io: 1, offset: MIB + 4096, len: 4096 }).unwrap();
    let (io, r) = one(&store);
    assert_eq!(io, 1);
    let msg = r.unwrap_err().0;
    assert!(msg.contains("read of 4096 bytes at offset 1052672") && msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("unexpected end of file"), "{msg}");
}

/// The same operations on a real block device: a loop device over a file. Needs root and
/// `losetup`; elsewhere it says why it skips (CI runs as root, where it must run).
#[test]
fn block_device_round_trip() {
    use std::process::Command;
    let root = unsafe { libc::geteuid() } == 0;
    let losetup = Command::new("losetup").arg("--version").output().is_ok_and(|o| o.status.success());
    if !root || !losetup || !std::path::Path::new("/dev/loop-control").exists() {
        eprintln!("skipped: needs root, losetup and /dev/loop-control (a loop device)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let file = backing(dir.path(), size);
    let out = Command::new("losetup").args(["--show", "-f"]).arg(&file).output().expect("run losetup");
    assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
    let dev = std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    // Detach our own device whatever happens below.
    struct Detach(std::path::PathBuf);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _detach = Detach(dev.clone());

    let e = Store::open(&dev, &geometry(size + MIB)).err().expect("refused");
    assert!(matches!(e, StoreError::BackingTooSmall { kind: "block device", .. }), "{e}");
    let Some(store) = open(&dev, &geometry(size)) else { return };
    assert!(store.is_block_device());
    assert_eq!(store.backing_size(), size);
    // The exclusive claim keeps a second opener out.
    let e = Store::open(&dev, &geometry(size)).err().expect("refused");
    assert!(matches!(e, StoreError::InUse { .. }), "{e}");

    store.submit(write(1, 0, Bytes::from(vec![0xab; size as usize]), true)).unwrap();
    assert_eq!(one(&store), (1, Ok(None)));
    store
        .submit(StoreOp::Write {
            io: 2,
            offset: 4096,
            payload: Payload::Zeroes { len: 8192, discard: true },
            fua: true,
        })
        .unwrap();
    store
        .submit(StoreOp::Write {
            io: 3,
            offset: MIB + 512,
            payload: Payload::Zeroes { len: 512, discard: false },
            fua: false,
        })
        .unwrap();
    store.submit(write(4, 2 * MIB, pattern(4, 4096), false)).unwrap();
    let done = collect(&store, 3);
    assert!(done.values().all(|r| *r == Ok(None)), "{done:?}");
    store.submit(StoreOp::Harden { io: 5, scope: HardenScope::Range(0) }).unwrap();
    store.submit(StoreOp::Harden { io: 6, scope: HardenScope::All }).unwrap();
    let done = collect(&store, 2);
    assert!(done.values().all(|r| *r == Ok(None)), "{done:?}");
    let all = store.read_sync(0, size).unwrap();
    let mut expect = vec![0xab; size as usize];
    expect[4096..4096 + 8192].fill(0);
    expect[(MIB + 512) as usize..(MIB + 1024) as usize].fill(0);
    expect[(2 * MIB) as usize..(2 * MIB + 4096) as usize].copy_from_slice(&pattern(4, 4096));
    assert!(all[..] == expect[..]);
    drop(store);
    // Hardened through the device: the file under the loop device holds it.
    let mut back = vec![0u8; size as usize];
    std::fs::File::open(&file).unwrap().read_exact_at(&mut back, 0).unwrap();
    assert!(back == expect);
}

#[test]
fn a_sink_gets_every_completion_and_small_writes_complete_inline() {
    use std::sync::{Arc, Mutex};
    use tandem_store::{Completion, INLINE_WRITE_MAX};
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let path = backing(dir.path(), size);
    let got: Arc<Mutex<Vec<Completion>>> = Arc::default();
    let sink = got.clone();
    let store = match Store::open_with_sink(&path, &geometry(size), move |c| sink.lock().unwrap().push(c)) {
        Ok(s) => s,
        Err(e @ (StoreError::IoUringUnavailable { .. } | StoreError::IoUringOpcode { .. })) => {
            return eprintln!("SKIPPED: {e}");
        }
        Err(e) => panic!("{e}"),
    };
    let wait_for = |io: u64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(c) = got.lock().unwrap().iter().find(|c| c.io == io) {
                return c.result.clone();
            }
            assert!(std::time::Instant::now() < deadline, "no completion for {io}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    };
    // A small write is in the page cache, and its completion delivered, when submit returns.
    store.submit(write(1, 4096, pattern(1, 4096), false)).unwrap();
    assert_eq!(got.lock().unwrap().as_slice(), &[Completion { io: 1, result: Ok(None) }]);
    assert_eq!(store.read_sync(4096, 4096).unwrap(), pattern(1, 4096));
    // A small FUA write still waits for its datasync; a large write goes through the ring.
    store.submit(write(2, MIB, pattern(2, 8192), true)).unwrap();
    let large = pattern(3, (INLINE_WRITE_MAX + 4096) as usize);
    store.submit(write(3, 2 * MIB, large.clone(), false)).unwrap();
    assert_eq!(wait_for(2), Ok(None));
    assert_eq!(wait_for(3), Ok(None));
    store.submit(StoreOp::Read { io: 4, offset: 2 * MIB, len: large.len() as u64 }).unwrap();
    assert_eq!(wait_for(4), Ok(Some(large)));
    // Nothing goes to the channel of a store with a sink.
    assert!(store.completions().try_recv().is_err());
    drop(store);
    assert_eq!(got.lock().unwrap().len(), 4);
}

#[test]
fn small_writes_go_through_the_ring_when_inline_writes_are_off() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let path = backing(dir.path(), size);
    let Some(mut store) = open(&path, &geometry(size)) else { return };
    store.set_inline_write_max(0);
    assert_eq!(store.inline_write_max(), 0);
    for k in 0..64u64 {
        store.submit(write(k, k * 4096, pattern(k, 4096), k % 4 == 0)).unwrap();
    }
    let done = collect(&store, 64);
    assert!(done.values().all(|r| *r == Ok(None)));
    for k in 0..64u64 {
        assert_eq!(store.read_sync(k * 4096, 4096).unwrap(), pattern(k, 4096));
    }
}

#[test]
fn inline_write_errors_carry_their_context() {
    // A file system that is full: RLIMIT_FSIZE is per process, so use a tiny tmpfs instead
    // when we can mount one; elsewhere the error path is the same `write_all_at` call.
    use std::process::Command;
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        return eprintln!("skipped: needs root to mount a tiny tmpfs");
    }
    let dir = tempfile::tempdir().unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tandem-store-test"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return eprintln!("skipped: cannot mount a tmpfs");
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(dir.path().to_path_buf());
    // A sparse 8 MiB file on a 1 MiB file system: writes beyond 1 MiB of data fail (ENOSPC).
    let path = backing(dir.path(), 8 * MIB);
    let Some(store) = open(&path, &geometry(8 * MIB)) else { return };
    let mut failed = None;
    for k in 0..32u64 {
        store.submit(write(k, k * 65536, pattern(k, 65536), false)).unwrap();
        let (io, r) = one(&store);
        assert_eq!(io, k);
        if let Err(e) = r {
            failed = Some((k, e.0));
            break;
        }
    }
    let (k, msg) = failed.expect("a 1 MiB tmpfs fills up");
    let at = format!("write of 65536 bytes at offset {}", k * 65536);
    assert!(msg.contains(&at) && msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("No space left on device"), "{msg}");
}
