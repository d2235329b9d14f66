//! A simulated device with a volatile cache: completed writes sit in the cache until a
//! harden (or the device's own write-back) moves them to stable media; a crash loses the
//! cache, tears writes in flight and may or may not land a metadata write in flight.

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::Rng;
use std::collections::BTreeMap;
use tandem_core::node::{HardenScope, Meta, Payload};
use tandem_core::Geometry;

pub const BLOCK: u64 = 512;

/// What a block holds: the id of the host write that wrote it (0: zeroes).
pub type Value = u64;

pub struct Disk {
    pub stable: Vec<Value>,
    /// Completed writes not yet hardened: block → value.
    pub cache: BTreeMap<u64, Value>,
    pub meta: Meta,
    geometry: Geometry,
}

/// Blocks a harden will move to stable media, snapshotted when it was issued: a harden
/// covers only writes that had completed by then.
pub type HardenSet = Vec<(u64, Value)>;

impl Disk {
    pub fn new(geometry: Geometry, meta: Meta) -> Self {
        let blocks = geometry.volume_size() / BLOCK;
        Disk { stable: vec![0; blocks as usize], cache: BTreeMap::new(), meta, geometry }
    }

    /// What a read sees now.
    pub fn read_block(&self, block: u64) -> Value {
        self.cache.get(&block).copied().unwrap_or(self.stable[block as usize])
    }

    pub fn image(&self) -> Vec<Value> {
        (0..self.stable.len() as u64).map(|b| self.read_block(b)).collect()
    }

    pub fn read(&self, offset: u64, len: u64) -> Bytes {
        let mut out = vec![0u8; len as usize];
        for (i, chunk) in out.chunks_mut(BLOCK as usize).enumerate() {
            let v = self.read_block(offset / BLOCK + i as u64);
            chunk[..8].copy_from_slice(&v.to_le_bytes());
        }
        Bytes::from(out)
    }

    /// Applies a completed write to the cache (or stable media, for FUA).
    pub fn complete_write(&mut self, offset: u64, payload: &Payload, fua: bool) {
        for (block, value) in blocks_of(offset, payload) {
            if fua {
                self.stable[block as usize] = value;
                self.cache.remove(&block);
            } else {
                self.cache.insert(block, value);
            }
        }
    }

    pub fn harden_set(&self, scope: HardenScope) -> HardenSet {
        let (start, end) = match scope {
            HardenScope::All => (0, u64::MAX),
            HardenScope::Range(r) => {
                let t = self.geometry.tracks_in_range(r);
                let ts = u64::from(self.geometry.track_size());
                (t.start * ts / BLOCK, t.end * ts / BLOCK)
            }
            HardenScope::Extent(e) => (e.offset / BLOCK, e.end() / BLOCK),
        };
        self.cache.range(start..end).map(|(b, v)| (*b, *v)).collect()
    }

    /// After a harden, each covered block holds its snapshotted value or a newer one, also
    /// across a crash.
    pub fn complete_harden(&mut self, set: &HardenSet) {
        for &(block, value) in set {
            match self.cache.get(&block) {
                Some(v) if *v == value => {
                    self.cache.remove(&block);
                    self.stable[block as usize] = value;
                }
                // A newer write completed since: the snapshot is what became durable.
                Some(_) => self.stable[block as usize] = value,
                // Left the cache by write-back or a FUA overwrite: stable is already newer.
                None => {}
            }
        }
    }

    /// The device writing back part of its cache on its own.
    pub fn writeback_some(&mut self, rng: &mut SmallRng) {
        let blocks: Vec<u64> = self.cache.keys().copied().filter(|_| rng.gen_bool(0.3)).collect();
        for b in blocks {
            let v = self.cache.remove(&b).expect("cached");
            self.stable[b as usize] = v;
        }
    }

    /// Power loss: part of the cache made it out, the rest is gone; each block of a write in
    /// flight either landed or did not.
    pub fn crash(&mut self, rng: &mut SmallRng, in_flight: &[(u64, Payload)]) {
        self.writeback_some(rng);
        self.cache.clear();
        for (offset, payload) in in_flight {
            for (block, value) in blocks_of(*offset, payload) {
                if rng.gen_bool(0.5) {
                    self.stable[block as usize] = value;
                }
            }
        }
    }
}

/// The (block, value) pairs of a write.
pub fn blocks_of(offset: u64, payload: &Payload) -> Vec<(u64, Value)> {
    match payload {
        Payload::Data(data) => data
            .chunks(BLOCK as usize)
            .enumerate()
            .map(|(i, c)| (offset / BLOCK + i as u64, u64::from_le_bytes(c[..8].try_into().expect("8 bytes"))))
            .collect(),
        Payload::Zeroes { len, .. } => (0..len / BLOCK).map(|i| (offset / BLOCK + i, 0)).collect(),
    }
}

/// A host write's data: every block carries the write's id.
pub fn payload_for(value: Value, blocks: u64) -> Bytes {
    let mut out = vec![0u8; (blocks * BLOCK) as usize];
    for chunk in out.chunks_mut(BLOCK as usize) {
        chunk[..8].copy_from_slice(&value.to_le_bytes());
    }
    Bytes::from(out)
}
