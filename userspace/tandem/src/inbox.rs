//! The node's inbox: the state machine runs on whichever thread brings it an input.
//!
//! # Why no node thread
//!
//! The protocol logic is single-threaded: one [`Daemon`](crate::daemon::Daemon) owns the
//! core, and only one thread at a time may drive it. A dedicated node thread fed by a channel
//! makes every input a thread wake-up: a replicated write on the primary went frontend →
//! node, node → link (the peer's reader) → peer's node, and back the same way, and each
//! wake-up costs tens of microseconds on a virtual machine — most of a replicated write's
//! latency (`cargo xtask vm-bench`). So the thread that has an input (a ublk queue thread with
//! a write, a link's reader with a message, the store's ring thread with a completion) queues
//! it and, if nobody is driving the node, drives it itself: it takes the node's lock, runs the
//! queued inputs, the due timers and the resulting actions, and leaves. A replicated write then
//! costs the wake-ups the network itself imposes, as in a kernel driver.
//!
//! Nobody ever waits for the lock: a thread that finds it taken leaves its input in the queue,
//! where the holder finds it before it lets go (it runs until the queue is empty, up to
//! [`ROUNDS`] rounds). What is left after that, and every timer, is the home thread's: it
//! sleeps until an input is left over or the next timer is due, then takes its turn like any
//! other thread. It is also the only thread that waits for the lock, and the one that ends
//! the daemon: whatever thread saw `down` complete, the daemon (with the store, the links and
//! their threads) is dropped on the home thread, never on a thread it would join.
//!
//! # What must not run on the node
//!
//! The actions run on whatever thread drives the node, so none may wait for another thread
//! that could itself be waiting to deliver an input. Sends never block (the links queue, see
//! `tandem_net::queue`), local writes go to the page cache, and a host reply is a callback.
//! Dropping a link does wait, for the link's reader to deliver its `Lost`, and that reader
//! may be the thread driving the node: it goes to [`Inbox::off_node`], which the home thread
//! runs outside the lock, in order. And the network delivers `Connected` and `Lost` under its
//! own lock, which the node's sends take: those are [`Inbox::post`]ed, never run in place.

use crate::daemon::Input;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

/// Inputs one round takes off the queue before the timers and the actions run.
const BATCH: usize = 256;
/// Rounds a thread drives the node for before it leaves the rest to the home thread: a
/// queue thread driving the node is not serving its own tags.
const ROUNDS: usize = 4;

/// What drives the node: the daemon, seen from its inbox.
pub trait Runner: Send {
    /// Starts the node; called once, on the home thread, before any input.
    fn start(&mut self) -> Next;
    /// Runs `inputs`, the due timers and what they make the node do.
    fn turn(&mut self, inputs: Vec<Input>) -> Next;
}

/// When the node wants to run again without an input, or that it is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    At(Instant),
    Stop,
}

/// The inbox is closed: the daemon stopped (or is stopping), and the input was dropped.
#[derive(Debug)]
pub struct Stopped;

/// Work for the home thread, run outside the node's lock.
pub type Chore = Box<dyn FnOnce() + Send>;

/// A handle on the node's inbox; clones share it.
#[derive(Clone)]
pub struct Inbox {
    shared: Arc<Shared>,
}

struct Shared {
    queue: Mutex<Queue>,
    /// The home thread sleeps here.
    home: Condvar,
    /// The daemon; `None` before it starts and once it has stopped.
    runner: Mutex<Option<Box<dyn Runner>>>,
}

struct Queue {
    inputs: VecDeque<Input>,
    chores: VecDeque<Chore>,
    /// The next timer, as the last turn left it.
    due: Instant,
    /// The daemon is done (or a turn panicked): no input is taken any more.
    closed: bool,
    /// A turn panicked: the home thread reports it.
    panicked: bool,
}

impl Inbox {
    /// An inbox nobody drives yet: inputs wait until [`Inbox::start`].
    pub fn new() -> Inbox {
        let queue = Queue {
            inputs: VecDeque::new(),
            chores: VecDeque::new(),
            due: Instant::now() + Duration::from_secs(3600),
            closed: false,
            panicked: false,
        };
        Inbox { shared: Arc::new(Shared { queue: Mutex::new(queue), home: Condvar::new(), runner: Mutex::new(None) }) }
    }

    /// Queues `input` and, unless another thread is driving the node, drives it here.
    pub fn send(&self, input: Input) -> Result<(), Stopped> {
        self.push(input)?;
        self.drive_here();
        Ok(())
    }

    /// Queues `input` without driving the node: for a caller with more inputs right behind
    /// it (a link's reader with a burst of messages), which calls [`Inbox::drive`] after the
    /// last, so that the burst is one turn and its answers leave together.
    pub fn queue(&self, input: Input) -> Result<(), Stopped> {
        self.push(input)
    }

    /// Drives the node here over what is queued, unless another thread is driving it.
    pub fn drive(&self) {
        self.drive_here();
    }

    /// Queues `input` for the home thread. For callers that hold a lock the node's actions
    /// may take (the network's table, while it delivers `Connected` and `Lost`).
    pub fn post(&self, input: Input) -> Result<(), Stopped> {
        self.push(input)?;
        self.shared.home.notify_one();
        Ok(())
    }

    /// Runs `chore` on the home thread, outside the node's lock, after the chores queued
    /// before it: for calls that wait for threads that may be waiting for the node.
    pub fn off_node(&self, chore: Chore) {
        let mut q = self.lock_queue();
        if q.closed {
            return;
        }
        q.chores.push_back(chore);
        drop(q);
        self.shared.home.notify_one();
    }

    /// Starts driving `runner` from a new home thread; the thread returns once the daemon
    /// stopped, with an error if a turn panicked.
    pub fn start(&self, runner: Box<dyn Runner>) -> std::io::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
        let inbox = self.clone();
        std::thread::Builder::new().name("node".into()).spawn(move || inbox.home(runner))
    }

    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        self.shared.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, input: Input) -> Result<(), Stopped> {
        let mut q = self.lock_queue();
        if q.closed {
            return Err(Stopped);
        }
        q.inputs.push_back(input);
        Ok(())
    }

    /// Drives the node on this thread if nobody else does. A thread that finds the lock taken
    /// leaves: the holder looks at the queue again before it lets go, and what is left then
    /// goes to the home thread.
    fn drive_here(&self) {
        let mut runner = match self.shared.runner.try_lock() {
            Ok(runner) => runner,
            Err(TryLockError::WouldBlock) => return,
            // A turn panicked: the home thread reports it.
            Err(TryLockError::Poisoned(_)) => return,
        };
        if let Some(r) = runner.as_mut() {
            self.rounds(r.as_mut());
        }
        drop(runner);
        self.hand_over_leftovers();
    }

    /// Up to [`ROUNDS`] turns, while inputs are queued; then publishes when the node wants
    /// to run next (under the node's lock, so that a later turn's answer always wins).
    fn rounds(&self, runner: &mut dyn Runner) {
        let mut next = Next::Stop;
        for _ in 0..ROUNDS {
            let batch: Vec<Input> = {
                let mut q = self.lock_queue();
                if q.closed {
                    return;
                }
                let n = q.inputs.len().min(BATCH);
                q.inputs.drain(..n).collect()
            };
            next = match catch_unwind(AssertUnwindSafe(|| runner.turn(batch))) {
                Ok(next) => next,
                Err(_) => {
                    // The panic hook has printed it; the node's state cannot be trusted.
                    let mut q = self.lock_queue();
                    q.panicked = true;
                    self.close(&mut q);
                    return;
                }
            };
            if next == Next::Stop || self.lock_queue().inputs.is_empty() {
                break;
            }
        }
        self.publish(next);
    }

    fn publish(&self, next: Next) {
        let mut q = self.lock_queue();
        match next {
            Next::Stop => self.close(&mut q),
            Next::At(at) => {
                let sooner = at < q.due;
                q.due = at;
                if sooner {
                    self.shared.home.notify_one();
                }
            }
        }
    }

    /// Refuses further inputs and drops the queued ones (their replies see the daemon gone).
    fn close(&self, q: &mut Queue) {
        q.closed = true;
        q.inputs.clear();
        self.shared.home.notify_one();
    }

    fn hand_over_leftovers(&self) {
        let q = self.lock_queue();
        if !q.inputs.is_empty() {
            self.shared.home.notify_one();
        }
    }

    /// The home thread: timers, leftovers, chores, and the end.
    fn home(&self, mut runner: Box<dyn Runner>) -> anyhow::Result<()> {
        let next = runner.start();
        *self.shared.runner.lock().unwrap_or_else(PoisonError::into_inner) = Some(runner);
        self.publish(next);
        loop {
            let chores: Vec<Chore> = {
                let mut q = self.lock_queue();
                loop {
                    if q.closed || !q.inputs.is_empty() || !q.chores.is_empty() || Instant::now() >= q.due {
                        break;
                    }
                    let wait = q.due.saturating_duration_since(Instant::now());
                    q = self.shared.home.wait_timeout(q, wait).unwrap_or_else(PoisonError::into_inner).0;
                }
                if q.closed {
                    break;
                }
                q.chores.drain(..).collect()
            };
            for chore in chores {
                chore();
            }
            let mut guard = self.shared.runner.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(r) = guard.as_mut() {
                self.rounds(r.as_mut());
            }
            drop(guard);
        }
        // Dropped here, on the home thread: the daemon joins threads that may have run the
        // last turn.
        let runner = self.shared.runner.lock().unwrap_or_else(PoisonError::into_inner).take();
        drop(runner);
        let q = self.lock_queue();
        if q.panicked {
            anyhow::bail!("the node's state machine panicked (see the message above); the daemon stops");
        }
        Ok(())
    }
}

impl Default for Inbox {
    fn default() -> Self {
        Inbox::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts inputs; `Control`-free: uses `Run` closures as its inputs.
    struct Counting {
        seen: Arc<AtomicUsize>,
        stop_after: usize,
        driving: Arc<AtomicUsize>,
        /// The thread that ran each input.
        threads: Arc<Mutex<Vec<std::thread::ThreadId>>>,
    }

    impl Runner for Counting {
        fn start(&mut self) -> Next {
            Next::At(Instant::now() + Duration::from_secs(60))
        }
        fn turn(&mut self, inputs: Vec<Input>) -> Next {
            assert_eq!(self.driving.fetch_add(1, Ordering::SeqCst), 0, "two threads drive the node at once");
            for input in inputs {
                if let Input::Run(work) = input {
                    work();
                }
                self.seen.fetch_add(1, Ordering::SeqCst);
                self.threads.lock().unwrap().push(std::thread::current().id());
            }
            self.driving.fetch_sub(1, Ordering::SeqCst);
            if self.seen.load(Ordering::SeqCst) >= self.stop_after {
                Next::Stop
            } else {
                Next::At(Instant::now() + Duration::from_secs(60))
            }
        }
    }

    #[test]
    fn every_input_is_run_once_and_by_one_thread_at_a_time() {
        let inbox = Inbox::new();
        let seen = Arc::new(AtomicUsize::new(0));
        let threads = 8;
        let each = 2_000;
        let runner = Counting {
            seen: seen.clone(),
            stop_after: threads * each,
            driving: Arc::new(AtomicUsize::new(0)),
            threads: Arc::default(),
        };
        let home = inbox.start(Box::new(runner)).unwrap();
        let senders: Vec<_> = (0..threads)
            .map(|_| {
                let inbox = inbox.clone();
                std::thread::spawn(move || {
                    for i in 0..each {
                        let input = Input::Run(Box::new(|| {}));
                        if i % 7 == 0 {
                            inbox.post(input).unwrap();
                        } else {
                            inbox.send(input).unwrap();
                        }
                    }
                })
            })
            .collect();
        for s in senders {
            s.join().unwrap();
        }
        home.join().unwrap().unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), threads * each);
        assert!(matches!(inbox.send(Input::Run(Box::new(|| {}))), Err(Stopped)), "a stopped inbox refuses");
    }

    #[test]
    fn an_input_sent_while_driving_is_run_in_the_same_turn() {
        // The store delivers an inline write's completion from inside the turn that wrote it.
        let inbox = Inbox::new();
        let seen = Arc::new(AtomicUsize::new(0));
        let ran_on = Arc::new(Mutex::new(Vec::new()));
        let runner = Counting {
            seen: seen.clone(),
            stop_after: 2,
            driving: Arc::new(AtomicUsize::new(0)),
            threads: ran_on.clone(),
        };
        let home = inbox.start(Box::new(runner)).unwrap();
        let again = inbox.clone();
        inbox
            .send(Input::Run(Box::new(move || {
                again.send(Input::Run(Box::new(|| {}))).unwrap();
            })))
            .unwrap();
        home.join().unwrap().unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 2);
        // Not left to the home thread: the thread driving the node ran both.
        let ran_on = ran_on.lock().unwrap();
        assert_eq!(ran_on[0], ran_on[1], "the input sent from inside a turn was run by another thread");
    }

    struct Timed {
        fired: Arc<AtomicUsize>,
        at: Instant,
    }

    impl Runner for Timed {
        fn start(&mut self) -> Next {
            Next::At(self.at)
        }
        fn turn(&mut self, _inputs: Vec<Input>) -> Next {
            if Instant::now() >= self.at {
                self.fired.fetch_add(1, Ordering::SeqCst);
                return Next::Stop;
            }
            Next::At(self.at)
        }
    }

    #[test]
    fn the_home_thread_runs_due_timers_and_chores() {
        let inbox = Inbox::new();
        let fired = Arc::new(AtomicUsize::new(0));
        let chore_ran = Arc::new(AtomicUsize::new(0));
        let c = chore_ran.clone();
        inbox.off_node(Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        }));
        let home = inbox
            .start(Box::new(Timed { fired: fired.clone(), at: Instant::now() + Duration::from_millis(50) }))
            .unwrap();
        home.join().unwrap().unwrap();
        assert_eq!(fired.load(Ordering::SeqCst), 1);
        assert_eq!(chore_ran.load(Ordering::SeqCst), 1);
    }

    struct Panicking;

    impl Runner for Panicking {
        fn start(&mut self) -> Next {
            Next::At(Instant::now() + Duration::from_secs(60))
        }
        fn turn(&mut self, inputs: Vec<Input>) -> Next {
            if !inputs.is_empty() {
                panic!("a bug in the node");
            }
            Next::At(Instant::now() + Duration::from_secs(60))
        }
    }

    #[test]
    fn a_panicking_turn_stops_the_daemon_with_an_error() {
        let inbox = Inbox::new();
        let home = inbox.start(Box::new(Panicking)).unwrap();
        inbox.send(Input::Run(Box::new(|| {}))).unwrap();
        let err = home.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        assert!(inbox.send(Input::Run(Box::new(|| {}))).is_err());
    }
}
