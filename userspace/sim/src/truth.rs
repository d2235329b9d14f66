//! Ground truth the invariants are checked against: every value each block was ever sent,
//! in issue order, and which were acknowledged to the host.

use crate::disk::{Value, BLOCK};
use std::collections::HashMap;
use tandem_core::Extent;

pub struct Truth {
    /// Per block: the values host writes put there, in issue order (0 first: zeroes).
    history: Vec<Vec<Value>>,
    /// Per block: index in `history` of the newest acknowledged value.
    acked: Vec<usize>,
    writes: HashMap<u64, (Value, Extent)>,
    pub issued: u64,
    pub acknowledged: u64,
}

impl Truth {
    pub fn new(blocks: usize) -> Self {
        Truth {
            history: vec![vec![0]; blocks],
            acked: vec![0; blocks],
            writes: HashMap::new(),
            issued: 0,
            acknowledged: 0,
        }
    }

    pub fn issue(&mut self, host_id: u64, value: Value, extent: Extent) {
        for b in extent.offset / BLOCK..extent.end() / BLOCK {
            self.history[b as usize].push(value);
        }
        self.writes.insert(host_id, (value, extent));
        self.issued += 1;
    }

    pub fn ack(&mut self, host_id: u64) {
        let Some((value, extent)) = self.writes.remove(&host_id) else { return };
        self.acknowledged += 1;
        for b in extent.offset / BLOCK..extent.end() / BLOCK {
            let h = &self.history[b as usize];
            let idx = h.iter().rposition(|v| *v == value).expect("issued value");
            let a = &mut self.acked[b as usize];
            *a = (*a).max(idx);
        }
    }

    pub fn fail(&mut self, host_id: u64) {
        self.writes.remove(&host_id);
    }

    /// Blocks whose final value is older than their newest acknowledged one.
    pub fn lost_blocks(&self, image: &[Value]) -> Vec<String> {
        let mut lost = Vec::new();
        for (b, v) in image.iter().enumerate() {
            let h = &self.history[b];
            let ok = h[self.acked[b]..].contains(v);
            if !ok {
                lost.push(format!(
                    "block {b}: holds {v}, acknowledged {} (history {:?})",
                    h[self.acked[b]],
                    &h[h.len().saturating_sub(6)..]
                ));
            }
        }
        lost
    }
}
