//! The restart path: what a dead daemon's pinned maps held ([`recover_pinned`]), and keeping
//! them for a device that survived it ([`Recovered::keep_for`]).

use std::path::{Path, PathBuf};

use tandem_bpf::{Flavor, Volume};
use tandem_core::Geometry;

use super::pin::{lock_pin_dir, PinLock};
use super::{KernelRecord, KernelRecordError};

/// What the pinned maps of a dead (or restarted) daemon held.
#[derive(Debug)]
pub struct Recovered {
    pub pin_dir: PathBuf,
    /// Every track marked (current ∪ old of every range).
    pub tracks: Vec<u64>,
    /// The maps could not be trusted (geometry or layout differ): every track counts as
    /// written, and this says why.
    pub untrusted: Option<String>,
    pub flavor: Option<Flavor>,
    _lock: PinLock,
}

impl Recovered {
    /// Removes the pins (which detaches the programs): only once `tracks` are durable.
    pub fn unpin(self) -> Result<(), KernelRecordError> {
        let name = self.pin_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        tandem_bpf::unpin(&name).map(|_| ()).map_err(KernelRecordError::bpf(format!("unpinning {name}")))
    }

    /// Keeps the pinned programs and maps as this daemon's record, when they still record
    /// `device` itself: the maps are trusted, the programs attached, and `device` has the
    /// dev_t and the diskseq they were loaded for (a device that survived the daemon, as a
    /// ublk device under user recovery does). Otherwise gives `self` back with why not, to be
    /// unpinned. Call it only once `tracks` are durable: the record's clearing cycles may then
    /// clear them from the map.
    pub fn keep_for(self, device: &Path) -> Result<KernelRecord, (Recovered, String)> {
        if let Some(why) = &self.untrusted {
            let why = why.clone();
            return Err((self, why));
        }
        let name = self.pin_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let volume = match Volume::open(&name) {
            Ok(v) => v,
            Err(e) => return Err((self, format!("the pinned maps cannot be opened: {e}"))),
        };
        if !volume.is_attached() {
            return Err((self, "its programs are detached: writes since then were not recorded".into()));
        }
        let info = match tandem_bpf::DeviceInfo::resolve(&tandem_bpf::DeviceRef::Path(device.to_owned())) {
            Ok(info) => info,
            Err(e) => return Err((self, format!("cannot identify {}: {e}", device.display()))),
        };
        if let Some(why) = volume.device_mismatch(&info) {
            return Err((self, why));
        }
        Ok(KernelRecord::with_volume(volume, self._lock))
    }
}

/// At daemon start: if maps are pinned for `pin` (a daemon died without `down`), what they
/// hold. `None` when nothing is pinned. Fails when a live process holds the record.
pub fn recover_pinned(pin: &str, geometry: &Geometry) -> Result<Option<Recovered>, KernelRecordError> {
    let dir = tandem_bpf::pin_dir(pin).map_err(KernelRecordError::bpf("the record's pin name"))?;
    if !dir.is_dir() {
        return Ok(None);
    }
    let lock = lock_pin_dir(&dir)?;
    let empty = std::fs::read_dir(&dir).map(|mut d| d.next().is_none()).unwrap_or(false);
    if empty {
        let _ = std::fs::remove_dir(&dir);
        return Ok(None);
    }
    let all = || (0..geometry.track_count()).collect::<Vec<u64>>();
    let (tracks, untrusted, flavor) = match Volume::open(pin) {
        Ok(v) => {
            let p = v.params();
            let mismatch = [
                ("tracks", p.tracks, geometry.track_count()),
                ("track size", 1u64 << p.track_shift, u64::from(geometry.track_size())),
                ("tracks per range", u64::from(p.tracks_per_range), u64::from(geometry.tracks_per_range())),
            ]
            .into_iter()
            .find(|(_, pinned, configured)| pinned != configured);
            match mismatch {
                None => (v.dirty_tracks(), None, v.flavor()),
                Some((what, pinned, configured)) => (
                    all(),
                    Some(format!("the pinned maps have {what} {pinned}, the configuration {configured}")),
                    v.flavor(),
                ),
            }
        }
        Err(e) => (all(), Some(format!("the pinned maps cannot be read: {e}")), None),
    };
    Ok(Some(Recovered { pin_dir: dir, tracks, untrusted, flavor, _lock: lock }))
}
