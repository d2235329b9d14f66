//! The ring thread: it owns the io_uring and every operation in flight.
//!
//! Callers queue jobs on a channel and poke an eventfd. The ring keeps a poll on that
//! eventfd among its submissions, so one `io_uring_enter` waits for "an I/O finished" and
//! "new work arrived" alike: new work never waits behind a slow harden. At most
//! [`MAX_IN_FLIGHT`] operations run at once; further jobs stay in the channel until a
//! table entry frees up. Completions leave in the order the device finishes them.
//!
//! Metadata writes run one at a time, in submission order, because each one's slot and
//! sequence number depend on whether the previous one became durable.

use crate::meta_file::MetaFile;
use crate::ops::{Files, Hints, Op, Progress, Target};
use crate::store::{Completion, Sink};
use crate::sys::EventFd;
use bytes::Bytes;
use crossbeam_channel::{Receiver, TryRecvError};
use io_uring::{opcode, squeue::Entry, types, IoUring};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;
use tandem_core::node::{IoError, IoId, Meta, Payload};

/// Operations in flight at once (each has at most one submission queued in the kernel).
pub const MAX_IN_FLIGHT: usize = 256;
/// Submission queue entries: the operations plus the wakeup poll, with room to spare.
pub(crate) const RING_ENTRIES: u32 = 512;
/// `user_data` of the eventfd poll; operations use their table index.
const WAKE: u64 = u64::MAX;

/// A validated request, as the ring thread takes it.
pub(crate) enum Job {
    Write {
        io: IoId,
        offset: u64,
        payload: Payload,
        fua: bool,
    },
    Read {
        io: IoId,
        offset: u64,
        len: u64,
    },
    /// `len == 0`: everything. `fua_write`: the second step of a FUA write whose data the
    /// submitting thread already wrote (errors then name the FUA write).
    Harden {
        io: IoId,
        offset: u64,
        len: u64,
        fua_write: bool,
    },
    Persist {
        io: IoId,
        meta: Box<Meta>,
    },
}

pub(crate) struct Engine {
    pub ring: IoUring,
    pub jobs: Receiver<Job>,
    pub wake: Arc<EventFd>,
    pub done: Sink,
    /// Kept open for as long as operations may name it.
    pub data: Arc<File>,
    pub data_name: String,
    pub meta: Option<MetaFile>,
}

struct State {
    files: Files,
    table: Vec<Option<Op>>,
    free: Vec<usize>,
    /// Metadata writes waiting for the one in flight.
    persists: VecDeque<(IoId, Box<Meta>)>,
    persist_busy: bool,
    wake_armed: bool,
    /// The store was dropped: finish what was accepted, then exit.
    closing: bool,
    hints: Hints,
    cqes: Vec<(u64, i32)>,
}

impl Engine {
    pub(crate) fn run(mut self) {
        let meta = self.meta.as_ref().map(|m| (m.file().as_raw_fd(), m.path().display().to_string()));
        let mut st = State {
            files: Files { data: (self.data.as_raw_fd(), self.data_name.clone()), meta },
            table: (0..MAX_IN_FLIGHT).map(|_| None).collect(),
            free: (0..MAX_IN_FLIGHT).rev().collect(),
            persists: VecDeque::new(),
            persist_busy: false,
            wake_armed: false,
            closing: false,
            hints: Hints::default(),
            cqes: Vec::with_capacity(RING_ENTRIES as usize),
        };
        loop {
            self.take_jobs(&mut st);
            let idle = st.free.len() == MAX_IN_FLIGHT && st.persists.is_empty();
            if st.closing && idle {
                break;
            }
            if !st.wake_armed && !st.closing {
                let poll = opcode::PollAdd::new(types::Fd(self.wake.raw()), libc::POLLIN as u32).build();
                push(&mut self.ring, &poll.user_data(WAKE));
                st.wake_armed = true;
            }
            if let Err(e) = self.ring.submit_and_wait(1) {
                match e.raw_os_error() {
                    // Interrupted, or the completion queue is full (reaping below frees it).
                    Some(libc::EINTR) | Some(libc::EBUSY) => {}
                    // The kernel is short of memory for the request: retry shortly.
                    Some(libc::EAGAIN) => std::thread::sleep(Duration::from_millis(1)),
                    _ => return self.fail_forever(st, &e),
                }
            }
            self.reap(&mut st);
        }
    }

    /// Starts queued jobs while the table has room.
    fn take_jobs(&mut self, st: &mut State) {
        while !st.free.is_empty() {
            match self.jobs.try_recv() {
                Ok(job) => self.start(st, job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    st.closing = true;
                    break;
                }
            }
        }
    }

    fn start(&mut self, st: &mut State, job: Job) {
        let op = match job {
            Job::Write { io, offset, payload: Payload::Data(data), fua } => Op::write(io, offset, data, fua),
            Job::Write { io, offset, payload: Payload::Zeroes { len, discard }, fua } => {
                Op::zeroes(io, offset, len, discard, fua, &st.hints)
            }
            Job::Read { io, offset, len } => Op::read(io, offset, len),
            Job::Harden { io, offset, len, fua_write: false } => Op::harden(io, offset, len),
            Job::Harden { io, offset, len, fua_write: true } => Op::fua_sync(io, offset, len),
            Job::Persist { io, meta } => {
                st.persists.push_back((io, meta));
                return self.next_persist(st);
            }
        };
        self.issue(st, op);
    }

    /// Starts the oldest waiting metadata write unless one is in flight.
    fn next_persist(&mut self, st: &mut State) {
        if st.persist_busy || st.free.is_empty() {
            return;
        }
        let Some((io, meta)) = st.persists.pop_front() else { return };
        let Some(mf) = self.meta.as_ref() else {
            // `Store::submit` refuses metadata writes without a metadata file.
            return self.complete(io, Err(IoError("no metadata file".into())));
        };
        let w = mf.prepare(&meta);
        st.persist_busy = true;
        self.issue(st, Op::meta_write(io, w.offset, w.bytes, w.slot, w.seq));
    }

    fn issue(&mut self, st: &mut State, mut op: Op) {
        let Some(i) = st.free.pop() else { unreachable!("callers check for a free entry") };
        let sqe = op.sqe(fd_of(&st.files, op.target())).user_data(i as u64);
        st.table[i] = Some(op);
        push(&mut self.ring, &sqe);
    }

    fn reap(&mut self, st: &mut State) {
        st.cqes.clear();
        st.cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for k in 0..st.cqes.len() {
            let (ud, res) = st.cqes[k];
            if ud == WAKE {
                // Reset the counter before looking at the channel (next loop turn), so a
                // job sent after this point always leaves the eventfd readable.
                st.wake_armed = false;
                self.wake.drain();
                continue;
            }
            let i = ud as usize;
            let Some(op) = st.table.get_mut(i).and_then(Option::as_mut) else { continue };
            match op.advance(res, &mut st.hints, &st.files) {
                Progress::Again => {
                    let sqe = op.sqe(fd_of(&st.files, op.target())).user_data(ud);
                    push(&mut self.ring, &sqe);
                }
                Progress::Done(result) => {
                    let op = st.table[i].take().expect("entry checked above");
                    st.free.push(i);
                    if let Some((slot, seq)) = op.commit {
                        if result.is_ok() {
                            if let Some(mf) = self.meta.as_mut() {
                                mf.committed(slot, seq);
                            }
                        }
                        st.persist_busy = false;
                        self.complete(op.io, result);
                        self.next_persist(st);
                    } else {
                        self.complete(op.io, result);
                    }
                }
            }
        }
    }

    fn complete(&self, io: IoId, result: Result<Option<Bytes>, IoError>) {
        (self.done)(Completion { io, result });
    }

    /// `io_uring_enter` failed in a way that retrying cannot fix. Every operation in flight
    /// and every later job fails with that error. The buffers of operations in flight are
    /// leaked, and so is the ring, because the kernel may still be using them.
    fn fail_forever(self, mut st: State, e: &io::Error) {
        let err = |io| Completion { io, result: Err(IoError(format!("io_uring_enter failed: {e}"))) };
        for op in st.table.iter_mut().filter_map(Option::take) {
            (self.done)(err(op.io));
            std::mem::forget(op);
        }
        for (io, _) in st.persists.drain(..) {
            (self.done)(err(io));
        }
        let Engine { ring, jobs, done, .. } = self;
        std::mem::forget(ring);
        for job in jobs.iter() {
            let io = match job {
                Job::Write { io, .. } | Job::Read { io, .. } | Job::Harden { io, .. } | Job::Persist { io, .. } => io,
            };
            done(err(io));
        }
    }
}

fn fd_of(files: &Files, target: Target) -> i32 {
    match (target, &files.meta) {
        (Target::Meta, Some((fd, _))) => *fd,
        _ => files.data.0,
    }
}

/// Queues one SQE, making room by submitting what is queued if the queue is full.
fn push(ring: &mut IoUring, sqe: &Entry) {
    loop {
        // SAFETY: every buffer an SQE points at is owned by its operation in the thread's
        // table (or is static), and stays there until the operation's last completion.
        if unsafe { ring.submission().push(sqe) }.is_ok() {
            return;
        }
        // Cannot happen with RING_ENTRIES > MAX_IN_FLIGHT + 1, but a full queue only needs
        // a submit to drain it.
        if let Err(e) = ring.submit() {
            if e.raw_os_error() != Some(libc::EINTR) && e.raw_os_error() != Some(libc::EBUSY) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}
