//! Sets and runs of tracks.

use std::ops::Range;

use crate::control::TrackRun;

/// A bitset over the volume's tracks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrackSet(pub(super) Vec<u64>);

impl TrackSet {
    pub fn new(tracks: u64) -> TrackSet {
        TrackSet(vec![0; tracks.div_ceil(64) as usize])
    }
    pub fn insert(&mut self, t: u64) {
        if let Some(w) = self.0.get_mut((t / 64) as usize) {
            *w |= 1 << (t % 64);
        }
    }
    pub fn contains(&self, t: u64) -> bool {
        self.0.get((t / 64) as usize).is_some_and(|w| w >> (t % 64) & 1 == 1)
    }
    pub fn clear(&mut self) {
        self.0.fill(0);
    }
    #[allow(dead_code)] // for attach mode and tests
    pub fn len(&self) -> u64 {
        self.0.iter().map(|w| u64::from(w.count_ones())).sum()
    }
    #[allow(dead_code)] // for attach mode and tests
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }
    /// Tracks in `self` and not in `other`.
    #[allow(dead_code)] // for attach mode and tests
    pub fn minus<'a>(&'a self, other: &'a TrackSet) -> impl Iterator<Item = u64> + 'a {
        self.0.iter().enumerate().flat_map(move |(i, &w)| {
            let mut bits = w & !other.0.get(i).copied().unwrap_or(0);
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let b = bits.trailing_zeros();
                    bits &= bits - 1;
                    i as u64 * 64 + u64::from(b)
                })
            })
        })
    }
}

pub(super) fn runs(tracks: impl IntoIterator<Item = u64>) -> Vec<TrackRun> {
    let mut out: Vec<TrackRun> = Vec::new();
    for t in tracks {
        match out.last_mut() {
            Some(r) if r.first_track + r.tracks == t => r.tracks += 1,
            _ => out.push(TrackRun { first_track: t, tracks: 1 }),
        }
    }
    out
}

/// Runs of consecutive tracks (for logs).
pub fn track_runs(tracks: &[u64]) -> Vec<Range<u64>> {
    runs(tracks.iter().copied()).into_iter().map(|r| r.first_track..r.first_track + r.tracks).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn track_sets_diff_word_by_word() {
        let mut a = TrackSet::new(200);
        let mut b = TrackSet::new(200);
        for t in [0, 1, 63, 64, 130, 199] {
            a.insert(t);
        }
        for t in [1, 64, 150] {
            b.insert(t);
        }
        assert_eq!(a.minus(&b).collect::<Vec<_>>(), vec![0, 63, 130, 199]);
        assert_eq!(b.minus(&a).collect::<Vec<_>>(), vec![150]);
        assert_eq!(a.len(), 6);
        assert!(a.contains(199) && !a.contains(198));
        a.insert(500); // beyond the volume: ignored
        assert_eq!(a.len(), 6);
        a.clear();
        assert!(a.is_empty());
        assert_eq!(track_runs(&[1, 2, 3, 7, 9, 10]), vec![1..4, 7..8, 9..11]);
    }
}
