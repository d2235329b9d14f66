//! Helpers shared by the store's integration tests.
#![allow(dead_code)]

use bytes::Bytes;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tandem_core::node::{IoError, IoId};
use tandem_core::Geometry;
use tandem_store::{MetaFile, Store, StoreError};

/// A regular file of `size` bytes (sparse) in `dir`.
pub fn backing(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join("backing");
    File::create(&path).unwrap().set_len(size).unwrap();
    path
}

/// Whether a failed open only says io_uring is missing. Then the test prints why it skips,
/// unless TANDEM_REQUIRE_IO_URING is set (CI on a kernel known to have it), where it fails.
fn skip(e: &StoreError) -> bool {
    if !matches!(e, StoreError::IoUringUnavailable { .. } | StoreError::IoUringOpcode { .. }) {
        return false;
    }
    if std::env::var_os("TANDEM_REQUIRE_IO_URING").is_some() {
        panic!("io_uring required but unavailable: {e}");
    }
    eprintln!("SKIPPED: {e}");
    true
}

pub fn open(path: &Path, geometry: &Geometry) -> Option<Store> {
    match Store::open(path, geometry) {
        Ok(s) => Some(s),
        Err(e) if skip(&e) => None,
        Err(e) => panic!("open {}: {e}", path.display()),
    }
}

pub fn open_with_meta(path: &Path, meta: MetaFile) -> Option<Store> {
    match Store::open_with_meta(path, meta) {
        Ok(s) => Some(s),
        Err(e) if skip(&e) => None,
        Err(e) => panic!("open {}: {e}", path.display()),
    }
}

pub type Results = HashMap<IoId, Result<Option<Bytes>, IoError>>;

/// Waits for `n` completions; every I/O id must complete once.
pub fn collect(store: &Store, n: usize) -> Results {
    let mut out = HashMap::new();
    while out.len() < n {
        let c = store.completions().recv_timeout(Duration::from_secs(60)).expect("a completion within 60 s");
        assert!(out.insert(c.io, c.result).is_none(), "I/O {} completed twice", c.io);
    }
    out
}

/// Waits for one completion and returns its result.
pub fn one(store: &Store) -> (IoId, Result<Option<Bytes>, IoError>) {
    let c = store.completions().recv_timeout(Duration::from_secs(60)).expect("a completion within 60 s");
    (c.io, c.result)
}

/// A block of `len` bytes whose contents depend on `seed`.
pub fn pattern(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
