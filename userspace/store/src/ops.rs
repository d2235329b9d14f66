//! One store operation as a small state machine over io_uring steps. Each operation has at
//! most one submission in flight; the ring thread asks it for the next SQE and feeds it the
//! result until it reports done. Multi-step operations:
//!
//! - a write loops over short writes, then (FUA) hardens the range it wrote;
//! - a zeroing write tries `fallocate` and falls back to writing zeroes when the file or
//!   device refuses it, then (FUA) hardens;
//! - a read loops over short reads;
//! - a metadata write is a FUA write to the metadata file.

use bytes::Bytes;
use io_uring::{opcode, squeue::Entry, types};
use std::io;
use std::os::fd::RawFd;
use tandem_core::node::{IoError, IoId};

/// Longest single read or write step (Linux caps one at just under 2 GiB anyway).
const MAX_STEP: u64 = 1 << 30;
/// Zeroes written per step when the store has to write them itself.
const ZERO_CHUNK: usize = 1 << 20;
/// The source of every written zero: a static, so its address is stable for the kernel and
/// it costs no memory until touched (it lives in .bss).
static ZEROES: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

/// The two files an operation can address, with the names errors quote.
pub(crate) struct Files {
    pub data: (RawFd, String),
    pub meta: Option<(RawFd, String)>,
}

/// What the ring learned about the backing store, so later zeroing skips what it refused.
#[derive(Default)]
pub(crate) struct Hints {
    pub no_punch: bool,
    pub no_zero_range: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    Data,
    Meta,
}

pub(crate) enum Progress {
    /// Submit `sqe()` again: the operation moved to its next step.
    Again,
    Done(Result<Option<Bytes>, IoError>),
}

enum Src {
    Bytes(Bytes),
    Zeroes,
}

enum Step {
    Write {
        src: Src,
        done: u64,
    },
    Read {
        buf: Vec<u8>,
        done: u64,
    },
    Fallocate {
        discard: bool,
    },
    /// fdatasync of `offset..offset + len` (`len == 0`: the whole file).
    Sync,
}

pub(crate) struct Op {
    pub io: IoId,
    /// For a metadata write: the slot and sequence number it makes durable.
    pub commit: Option<(usize, u64)>,
    what: &'static str,
    target: Target,
    offset: u64,
    len: u64,
    /// Harden the range once it is written.
    fua: bool,
    step: Step,
}

impl Op {
    pub(crate) fn write(io: IoId, offset: u64, data: Bytes, fua: bool) -> Op {
        let what = if fua { "FUA write" } else { "write" };
        let len = data.len() as u64;
        Op::new(io, what, Target::Data, offset, len, fua, Step::Write { src: Src::Bytes(data), done: 0 })
    }

    /// Zeroes that must read back as zeroes. A discard punches a hole and a write-zeroes
    /// allocates zeroed extents where the file or device supports it (both are exact: a hole
    /// and an unwritten extent read as zeroes, and a block device honours them only when it
    /// guarantees zeroes, `BLKDEV_ZERO_NOFALLBACK`); otherwise the store writes zeroes.
    pub(crate) fn zeroes(io: IoId, offset: u64, len: u64, discard: bool, fua: bool, hints: &Hints) -> Op {
        let what = match (discard, fua) {
            (true, false) => "discard",
            (true, true) => "FUA discard",
            (false, false) => "write-zeroes",
            (false, true) => "FUA write-zeroes",
        };
        let refused = if discard { hints.no_punch } else { hints.no_zero_range };
        let step = if refused { Step::Write { src: Src::Zeroes, done: 0 } } else { Step::Fallocate { discard } };
        Op::new(io, what, Target::Data, offset, len, fua, step)
    }

    pub(crate) fn read(io: IoId, offset: u64, len: u64) -> Op {
        // Zeroed rather than uninitialised: a short read then never exposes stale memory,
        // and calloc makes large zeroed buffers cheap.
        let buf = vec![0u8; len as usize];
        Op::new(io, "read", Target::Data, offset, len, false, Step::Read { buf, done: 0 })
    }

    /// A harden of `offset..offset + len`; `len == 0` hardens the whole file.
    pub(crate) fn harden(io: IoId, offset: u64, len: u64) -> Op {
        Op::new(io, "harden", Target::Data, offset, len, false, Step::Sync)
    }

    /// The harden step of a FUA write whose data was written outside the ring.
    pub(crate) fn fua_sync(io: IoId, offset: u64, len: u64) -> Op {
        Op::new(io, "FUA write", Target::Data, offset, len, false, Step::Sync)
    }

    pub(crate) fn meta_write(io: IoId, offset: u64, bytes: Vec<u8>, slot: usize, seq: u64) -> Op {
        let len = bytes.len() as u64;
        let mut op = Op::new(
            io,
            "metadata write",
            Target::Meta,
            offset,
            len,
            true,
            Step::Write { src: Src::Bytes(Bytes::from(bytes)), done: 0 },
        );
        op.commit = Some((slot, seq));
        op
    }

    fn new(io: IoId, what: &'static str, target: Target, offset: u64, len: u64, fua: bool, step: Step) -> Op {
        Op { io, commit: None, what, target, offset, len, fua, step }
    }

    pub(crate) fn target(&self) -> Target {
        self.target
    }

    /// The submission for the current step. The buffers it points into are owned by `self`
    /// (or static), and `self` stays in the ring thread's table until its completion.
    pub(crate) fn sqe(&mut self, fd: RawFd) -> Entry {
        let fd = types::Fd(fd);
        let (offset, len) = (self.offset, self.len);
        match &mut self.step {
            Step::Write { src, done } => {
                let left = len - *done;
                let (ptr, n) = match src {
                    // SAFETY (pointer arithmetic): `done < len == data.len()`.
                    Src::Bytes(b) => (unsafe { b.as_ptr().add(*done as usize) }, left.min(MAX_STEP)),
                    Src::Zeroes => (ZEROES.as_ptr(), left.min(ZERO_CHUNK as u64)),
                };
                opcode::Write::new(fd, ptr, n as u32).offset(offset + *done).build()
            }
            Step::Read { buf, done } => {
                let n = (len - *done).min(MAX_STEP);
                // SAFETY (pointer arithmetic): `done < len == buf.len()`.
                let ptr = unsafe { buf.as_mut_ptr().add(*done as usize) };
                opcode::Read::new(fd, ptr, n as u32).offset(offset + *done).build()
            }
            Step::Fallocate { discard } => {
                let mode = libc::FALLOC_FL_KEEP_SIZE
                    | if *discard { libc::FALLOC_FL_PUNCH_HOLE } else { libc::FALLOC_FL_ZERO_RANGE };
                opcode::Fallocate::new(fd, len).offset(offset).mode(mode).build()
            }
            Step::Sync => {
                let sync = opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC);
                // The SQE's length is 32 bits: a longer range hardens the whole file, which
                // covers it.
                match u32::try_from(len) {
                    Ok(n) if n > 0 => sync.offset(offset).len(n).build(),
                    _ => sync.build(),
                }
            }
        }
    }

    /// Feeds the result of the current step; `files` names the files for error messages.
    pub(crate) fn advance(&mut self, res: i32, hints: &mut Hints, files: &Files) -> Progress {
        if res < 0 {
            let errno = -res;
            if let Step::Fallocate { discard } = self.step {
                // EOPNOTSUPP: this file system or device cannot do it at all (tmpfs refuses
                // ZERO_RANGE, a device without guaranteed-zero discard refuses PUNCH_HOLE).
                // EINVAL: it cannot for this extent (e.g. a 512-byte extent on a 4 KiB-sector
                // device). Writing zeroes is always correct, so fall back in both cases, and
                // remember only the first, which holds for every later extent too.
                if errno == libc::EOPNOTSUPP || errno == libc::EINVAL {
                    if errno == libc::EOPNOTSUPP {
                        if discard {
                            hints.no_punch = true;
                        } else {
                            hints.no_zero_range = true;
                        }
                    }
                    self.step = Step::Write { src: Src::Zeroes, done: 0 };
                    return Progress::Again;
                }
            }
            return Progress::Done(Err(self.error(files, &io::Error::from_raw_os_error(errno).to_string())));
        }
        let n = res as u64;
        match &mut self.step {
            Step::Write { done, .. } => {
                if n == 0 {
                    return Progress::Done(Err(self.error(files, "the kernel wrote 0 bytes")));
                }
                *done += n;
                if *done < self.len {
                    Progress::Again
                } else {
                    self.written()
                }
            }
            Step::Read { buf, done } => {
                if n == 0 {
                    let at = self.offset + *done;
                    return Progress::Done(Err(self.error(files, &format!("unexpected end of file at offset {at}"))));
                }
                *done += n;
                if *done < self.len {
                    Progress::Again
                } else {
                    Progress::Done(Ok(Some(Bytes::from(std::mem::take(buf)))))
                }
            }
            Step::Fallocate { .. } => self.written(),
            Step::Sync => Progress::Done(Ok(None)),
        }
    }

    /// The data is written (into the page cache, or the device for a block device's
    /// fallocate); a FUA operation still hardens it.
    fn written(&mut self) -> Progress {
        if self.fua {
            self.step = Step::Sync;
            Progress::Again
        } else {
            Progress::Done(Ok(None))
        }
    }

    fn step_name(&self) -> &'static str {
        match self.step {
            Step::Write { src: Src::Bytes(_), .. } => "write",
            Step::Write { src: Src::Zeroes, .. } => "writing zeroes",
            Step::Read { .. } => "read",
            Step::Fallocate { discard: true } => "fallocate(PUNCH_HOLE)",
            Step::Fallocate { discard: false } => "fallocate(ZERO_RANGE)",
            Step::Sync => "fdatasync",
        }
    }

    fn error(&self, files: &Files, why: &str) -> IoError {
        let path = match (self.target, &files.meta) {
            (Target::Meta, Some((_, name))) => name.as_str(),
            _ => files.data.1.as_str(),
        };
        let extent = if self.len == 0 {
            "of everything written".to_string()
        } else {
            format!("of {} bytes at offset {}", self.len, self.offset)
        };
        IoError(format!("{} {extent} on {path}: {} failed: {why}", self.what, self.step_name()))
    }
}
