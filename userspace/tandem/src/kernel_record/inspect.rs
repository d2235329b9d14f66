//! `tandem dirty`: the pinned maps read directly, with no daemon.

use std::collections::BTreeMap;

use tandem_bpf::Volume;

use super::tracks::runs;
use super::KernelRecordError;
use crate::control::{MapDirtyView, MapRangeView};

fn dev_name(dev: u32) -> String {
    format!("{}:{}", dev >> 20, dev & 0xf_ffff)
}

/// `tandem dirty`: the pinned maps of `pin`, read directly (no daemon needed). `Ok(None)`
/// when nothing is pinned.
pub fn inspect(pin: &str) -> Result<Option<MapDirtyView>, KernelRecordError> {
    let dir = tandem_bpf::pin_dir(pin).map_err(KernelRecordError::bpf("the record's pin name"))?;
    if !dir.join(tandem_bpf::layout::pins::PARAMS).exists() {
        return Ok(None);
    }
    let v = Volume::open(pin).map_err(KernelRecordError::bpf(format!("opening {}", dir.display())))?;
    let p = *v.params();
    let mut ranges = Vec::new();
    let mut all = BTreeMap::new();
    for r in 0..v.range_count() {
        let tracks = v.range_tracks(r).map_err(KernelRecordError::bpf(format!("reading range {r}")))?;
        let state = v.range_state(r).map_err(KernelRecordError::bpf(format!("reading range {r}")))?;
        for &t in tracks.current.iter().chain(&tracks.old) {
            all.insert(t, ());
        }
        ranges.push(MapRangeView {
            range: r,
            current_side: tracks.current_side,
            current: runs(tracks.current.iter().copied()),
            old: runs(tracks.old.iter().copied()),
            inflight: state.inflight,
            toggles: state.toggles,
            untracked: state.untracked,
        });
    }
    Ok(Some(MapDirtyView {
        pin_dir: dir.display().to_string(),
        flavor: v.flavor().map(|f| f.to_string()),
        attached: v.is_attached(),
        device: dev_name(p.dev),
        track_size: p.track_size() as u32,
        tracks: p.tracks,
        tracks_per_range: p.tracks_per_range,
        generation: format!("{:#018x}", p.generation),
        marked_tracks: all.len() as u64,
        runs: runs(all.into_keys()),
        ranges,
    }))
}
