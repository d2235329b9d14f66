//! The external metadata file: creation, loading, persisting through the store, and crash
//! atomicity.

mod common;

use common::{backing, collect, one, open_with_meta};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use tandem_core::node::Meta;
use tandem_core::{DiskState, Generations, Geometry, Role};
use tandem_store::{
    create_md, create_md_with, inspect_md, load_md, DecodeError, MetaFile, MetaHeader, StoreError, StoreOp,
};

const UUID: u128 = 0x5eed_0000_0000_0001_0000_0000_0000_00a1;

fn header() -> MetaHeader {
    MetaHeader::new(UUID, 1, Geometry::new(4 << 20, 512, 4096, 64).unwrap())
}

fn md_path(dir: &Path) -> PathBuf {
    dir.join("volume.md")
}

/// A metadata record that differs from `Meta::fresh` in every field.
fn changed(h: &MetaHeader, n: u64) -> Meta {
    let mut m = Meta::fresh(&h.geometry, h.initial_generation());
    m.generations.rotate(1000 + n);
    m.role = Role::Primary;
    m.disk = DiskState::Inconsistent;
    m.clean = false;
    m.crashed = true;
    m.before_resync = Some(Generations { current: 77, history: vec![76, 75] });
    for t in (n as usize..m.out_of_sync.len()).step_by(7) {
        m.out_of_sync.set(t, true);
    }
    m
}

fn overwrite(path: &Path, offset: u64, bytes: &[u8]) {
    OpenOptions::new().write(true).open(path).unwrap().write_all_at(bytes, offset).unwrap();
}

#[test]
fn create_then_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = md_path(dir.path());
    let h = header();
    create_md(&path, &h, false).unwrap();
    let (got, meta) = load_md(&path).unwrap();
    assert_eq!(got, h);
    assert_eq!(meta, Meta::fresh(&h.geometry, h.initial_generation()));
    // Every block is allocated up front: header block and both slots.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096 + 2 * h.min_slot_size());
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn create_refuses_to_overwrite_valid_metadata_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let path = md_path(dir.path());
    create_md(&path, &header(), false).unwrap();
    let other = MetaHeader::new(0xbeef, 0, Geometry::new(8 << 20, 4096, 65536, 16).unwrap());
    let e = create_md(&path, &other, false).unwrap_err();
    assert!(matches!(e, StoreError::MetaExists { volume_uuid: UUID, node: 1, .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&path.display().to_string()) && msg.contains(&format!("{UUID:032x}")), "{msg}");
    assert_eq!(load_md(&path).unwrap().0, header(), "refused means untouched");

    create_md(&path, &other, true).unwrap();
    assert_eq!(load_md(&path).unwrap().0, other);
}

#[test]
fn create_refuses_foreign_and_damaged_content_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let path = md_path(dir.path());
    std::fs::write(&path, b"an important file").unwrap();
    let e = create_md(&path, &header(), false).unwrap_err();
    assert!(matches!(e, StoreError::ExistingContent { .. }), "{e}");
    assert!(e.to_string().contains("not Tandem metadata"), "{e}");

    create_md(&path, &header(), true).unwrap();
    overwrite(&path, 20, &[0xff]); // inside the header: its checksum fails
    let e = create_md(&path, &header(), false).unwrap_err();
    assert!(e.to_string().contains("damaged Tandem metadata"), "{e}");

    // Zeroes (a fresh, preallocated file) are fair game.
    std::fs::write(&path, vec![0u8; 1 << 16]).unwrap();
    create_md(&path, &header(), false).unwrap();
    assert_eq!(load_md(&path).unwrap().0, header());
}

#[test]
fn create_refuses_metadata_in_use_even_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let path = md_path(dir.path());
    create_md(&path, &header(), false).unwrap();
    let (held, _) = MetaFile::open(&path).unwrap();
    let e = create_md(&path, &header(), true).unwrap_err();
    assert!(matches!(e, StoreError::InUse { .. }), "{e}");
    let e = MetaFile::open(&path).unwrap_err();
    assert!(matches!(e, StoreError::InUse { .. }), "{e}");
    drop(held);
    create_md(&path, &header(), true).unwrap();
}

#[test]
fn create_follows_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("real.md");
    create_md(&target, &header(), false).unwrap();
    let link = dir.path().join("link.md");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    create_md(&link, &header(), true).unwrap();
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(load_md(&target).unwrap().0, header());
}

#[test]
fn create_refuses_a_record_of_another_geometry() {
    let dir = tempfile::tempdir().unwrap();
    let small = Geometry::new(1 << 20, 512, 4096, 64).unwrap();
    let e = create_md_with(&md_path(dir.path()), &header(), &Meta::fresh(&small, 5), false).unwrap_err();
    assert!(matches!(e, StoreError::Mismatch { .. }), "{e}");
}

#[test]
fn load_reports_precise_header_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = md_path(dir.path());
    let check = |mutate: &dyn Fn(&Path), want: &dyn Fn(&DecodeError) -> bool| {
        create_md(&path, &header(), true).unwrap();
        mutate(&path);
        match load_md(&path) {
            Err(StoreError::Meta { path: p, source }) => {
                assert_eq!(p, path);
                assert!(want(&source), "unexpected: {source}");
            }
            other => panic!("expected a metadata error, got {other:?}"),
        }
    };
    check(&|p| overwrite(p, 0, b"NOTMETA!"), &|e| matches!(e, DecodeError::BadMagic { .. }));
    check(&|p| overwrite(p, 8, &[9, 0]), &|e| *e == DecodeError::UnsupportedVersion(9));
    check(&|p| overwrite(p, 33, &[0x42]), &|e| matches!(e, DecodeError::HeaderChecksum { .. }));
    check(&|p| OpenOptions::new().write(true).open(p).unwrap().set_len(5000).unwrap(), &|e| {
        matches!(e, DecodeError::Truncated { have: 5000, .. })
    });
    check(&|p| std::fs::write(p, b"TNDM").unwrap(), &|e| matches!(e, DecodeError::Truncated { have: 4, .. }));
    check(&|p| std::fs::write(p, b"hi").unwrap(), &|e| matches!(e, DecodeError::BadMagic { .. }));
    check(&|p| std::fs::write(p, b"").unwrap(), &|e| matches!(e, DecodeError::Truncated { have: 0, .. }));
}

#[test]
fn persisted_meta_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let md = md_path(dir.path());
    let h = header();
    create_md(&md, &h, false).unwrap();
    let data = backing(dir.path(), h.geometry.volume_size());

    let (mf, meta) = MetaFile::open(&md).unwrap();
    assert_eq!(meta, Meta::fresh(&h.geometry, h.initial_generation()));
    mf.expect(UUID, 1, &h.geometry).unwrap();
    let Some(store) = open_with_meta(&data, mf) else { return };
    let m1 = changed(&h, 1);
    store.submit(StoreOp::PersistMeta { io: 1, meta: m1.clone() }).unwrap();
    assert_eq!(one(&store), (1, Ok(None)));
    drop(store);
    assert_eq!(load_md(&md).unwrap(), (h, m1));

    // Several queued at once are written in order: the last one is what stays.
    let (mf, _) = MetaFile::open(&md).unwrap();
    let Some(store) = open_with_meta(&data, mf) else { return };
    for n in 2..12 {
        store.submit(StoreOp::PersistMeta { io: n, meta: changed(&h, n) }).unwrap();
    }
    let done = collect(&store, 10);
    assert!(done.values().all(|r| *r == Ok(None)), "{done:?}");
    drop(store);
    let l = inspect_md(&md).unwrap();
    assert_eq!(l.meta, changed(&h, 11));
    assert_eq!(l.seq, 12, "created as 1, then 11 writes");
    assert_eq!(l.other, Ok(11));
}

#[test]
fn a_persist_of_the_wrong_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let md = md_path(dir.path());
    let h = header();
    create_md(&md, &h, false).unwrap();
    let data = backing(dir.path(), h.geometry.volume_size());
    let (mf, _) = MetaFile::open(&md).unwrap();
    let Some(store) = open_with_meta(&data, mf) else { return };
    let small = Geometry::new(1 << 20, 512, 4096, 64).unwrap();
    let e = store.submit(StoreOp::PersistMeta { io: 1, meta: Meta::fresh(&small, 3) }).unwrap_err();
    assert!(matches!(e, StoreError::MetaTracks { io: 1, stored: 256, expected: 1024 }), "{e}");
}

#[test]
fn metadata_of_another_volume_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let md = md_path(dir.path());
    let h = header();
    create_md(&md, &h, false).unwrap();
    let (mf, _) = MetaFile::open(&md).unwrap();
    let e = mf.expect(0xabc, 1, &h.geometry).unwrap_err();
    assert!(e.to_string().contains("belongs to volume"), "{e}");
    let e = mf.expect(UUID, 2, &h.geometry).unwrap_err();
    assert!(matches!(e, StoreError::Mismatch { what: "node", .. }), "{e}");
    let g = Geometry::new(4 << 20, 512, 8192, 64).unwrap();
    let e = mf.expect(UUID, 1, &g).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("metadata {} belongs to track size 4096, but this volume has 8192", md.display())
    );
}

/// A crash in the middle of a metadata write tears the slot being written. The reader must
/// then take the previous record, and the next write must go to the torn slot, keeping the
/// previous record as the fallback.
#[test]
fn a_torn_newest_slot_falls_back_to_the_previous_record() {
    let dir = tempfile::tempdir().unwrap();
    let md = md_path(dir.path());
    let h = header();
    create_md(&md, &h, false).unwrap();
    let (mut mf, _) = MetaFile::open(&md).unwrap();
    let (a, b) = (changed(&h, 1), changed(&h, 2));
    mf.write(&a).unwrap(); // seq 2, slot 1
    mf.write(&b).unwrap(); // seq 3, slot 0
    drop(mf);
    let l = inspect_md(&md).unwrap();
    assert_eq!((l.seq, l.slot, l.meta == b), (3, 0, true));

    // Tear slot 0: its second half never reached the media.
    let slot_size = l.slot_size;
    let len = tandem_store_slot_len(&md, 0, slot_size);
    overwrite(&md, 4096 + len / 2, &vec![0u8; (len - len / 2) as usize]);
    let l = inspect_md(&md).unwrap();
    assert_eq!((l.seq, l.slot), (2, 1));
    assert_eq!(l.meta, a);
    assert!(matches!(l.other, Err(DecodeError::SlotChecksum { .. })), "{:?}", l.other);

    // The next write replaces the torn slot, not the good one.
    let (mut mf, loaded) = MetaFile::open(&md).unwrap();
    assert_eq!(loaded, a);
    let c = changed(&h, 3);
    mf.write(&c).unwrap();
    drop(mf);
    let l = inspect_md(&md).unwrap();
    assert_eq!((l.seq, l.slot, l.other), (3, 0, Ok(2)));
    assert_eq!(l.meta, c);
}

#[test]
fn no_valid_slot_names_both_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let md = md_path(dir.path());
    let h = header();
    create_md(&md, &h, false).unwrap();
    let slot_size = h.min_slot_size();
    overwrite(&md, 4096 + 40, &[0x55]); // slot 0: checksum
    let e = load_md(&md).unwrap_err();
    match &e {
        StoreError::NoValidSlot { slot0: DecodeError::SlotChecksum { .. }, slot1: DecodeError::Empty, .. } => {}
        other => panic!("wrong error: {other}"),
    }
    assert!(e.to_string().contains("never written"), "{e}");
    overwrite(&md, 4096 + slot_size, b"garbage!");
    let e = load_md(&md).unwrap_err();
    assert!(matches!(e, StoreError::NoValidSlot { slot1: DecodeError::SlotBadMagic { .. }, .. }), "{e}");
}

/// Length of the record in slot `i` (header, body, checksum), read from its header.
fn tandem_store_slot_len(md: &Path, i: u64, slot_size: u64) -> u64 {
    let mut head = [0u8; 36];
    std::fs::File::open(md).unwrap().read_exact_at(&mut head, 4096 + i * slot_size).unwrap();
    36 + u64::from(u32::from_le_bytes(head[32..36].try_into().unwrap())) + 4
}
