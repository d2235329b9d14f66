//! A small operator tool over `tandem-bpf`, until `tandem dirty` exists (issue 4, part 5):
//!
//! ```text
//! bpfctl probe
//! bpfctl load <volume> <device> <track-size> <tracks-per-range> <tracks> [auto|tp_btf|classic]
//! bpfctl dirty <volume>          # runs of marked tracks per range, read through mmap
//! bpfctl toggle <volume> <range>   # the old side keeps its bits until a destage clears them
//! bpfctl destage <volume> <range>  # toggle, drain, clear (forgets the old side!)
//! bpfctl unpin <volume>
//! ```

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use tandem_bpf::{FlavorChoice, Volume, VolumeConfig};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bpfctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn number<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("{what}: {s:?} is not a number"))
}

fn run(args: &[&str]) -> Result<(), String> {
    match args {
        ["probe"] => {
            println!("{}", tandem_bpf::probe().summary());
            Ok(())
        }
        ["load", name, device, track_size, tpr, tracks, rest @ ..] => {
            let mut config = VolumeConfig::new(
                *name,
                Path::new(device),
                number(track_size, "track size")?,
                number(tpr, "tracks per range")?,
                number(tracks, "tracks")?,
            );
            config.flavor = match rest {
                [] | ["auto"] => FlavorChoice::Auto,
                ["tp_btf"] => FlavorChoice::TpBtf,
                ["classic"] => FlavorChoice::Classic,
                other => return Err(format!("unknown flavour {other:?} (auto, tp_btf, classic)")),
            };
            let v = Volume::load(&config).map_err(|e| e.to_string())?;
            println!(
                "loaded {} ({}) at {}",
                v.name(),
                v.flavor().map(|f| f.to_string()).unwrap_or_default(),
                v.pin_dir().display()
            );
            if let Some(why) = v.fallback_reason() {
                println!("fell back from tp_btf: {why}");
            }
            Ok(())
        }
        ["dirty", name] => {
            let v = Volume::open(name).map_err(|e| e.to_string())?;
            let p = v.params();
            println!(
                "{}: {} of {} tracks of {} bytes marked; {} ranges of {} tracks",
                v.name(),
                v.dirty_count(),
                p.tracks,
                p.track_size(),
                p.ranges,
                p.tracks_per_range
            );
            for r in 0..v.range_count() {
                let t = v.range_tracks(r).map_err(|e| e.to_string())?;
                let s = v.range_state(r).map_err(|e| e.to_string())?;
                if t.current.is_empty() && t.old.is_empty() && s.inflight == [0, 0] {
                    continue;
                }
                println!(
                    "range {r}: current side {} {:?}, old {:?}, in flight {:?}, toggles {}",
                    t.current_side,
                    runs(&t.current),
                    runs(&t.old),
                    s.inflight,
                    s.toggles
                );
            }
            Ok(())
        }
        ["toggle", name, range] => {
            let v = Volume::open(name).map_err(|e| e.to_string())?;
            v.toggle(number(range, "range")?).map_err(|e| e.to_string())
        }
        ["destage", name, range] => {
            let v = Volume::open(name).map_err(|e| e.to_string())?;
            let range = number(range, "range")?;
            v.destage_range(range, Duration::from_secs(60), |old| {
                println!("range {range}: forgetting {:?}", runs(old));
                Ok(())
            })
            .map_err(|e| e.to_string())
        }
        ["unpin", name] => {
            let found = tandem_bpf::unpin(name).map_err(|e| e.to_string())?;
            println!("{}", if found { "unpinned" } else { "nothing pinned" });
            Ok(())
        }
        _ => Err("usage: bpfctl probe | load <volume> <device> <track-size> <tracks-per-range> <tracks> \
                  [auto|tp_btf|classic] | dirty <volume> | toggle <volume> <range> | destage <volume> <range> | \
                  unpin <volume>"
            .into()),
    }
}

/// Consecutive tracks as "a-b" runs.
fn runs(tracks: &[u64]) -> Vec<String> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &t in tracks {
        match out.last_mut() {
            Some((_, end)) if *end + 1 == t => *end = t,
            _ => out.push((t, t)),
        }
    }
    out.into_iter().map(|(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect()
}
