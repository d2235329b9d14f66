//! The bounded queue between `Net::send` (any thread, never blocks) and a link's writer
//! thread. Bounded in bytes rather than messages, because one message may be a 4 MiB
//! track and another a 44-byte ack.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tandem_core::wire::{encoded_len, Message};

pub(crate) struct SendQueue {
    state: Mutex<State>,
    ready: Condvar,
    limit: usize,
}

struct State {
    items: VecDeque<(Message, usize)>,
    bytes: usize,
    closed: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PushError {
    Closed,
    Full { queued: usize },
}

#[derive(Debug, PartialEq)]
pub(crate) enum Popped {
    /// One or more messages, in queue order.
    Batch(Vec<Message>),
    /// Nothing arrived within the wait: time for a keepalive ping.
    Idle,
    Closed,
}

impl SendQueue {
    pub fn new(limit: usize) -> SendQueue {
        SendQueue {
            state: Mutex::new(State { items: VecDeque::new(), bytes: 0, closed: false }),
            ready: Condvar::new(),
            limit,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `msg`. A message larger than the whole limit is still taken when the queue
    /// is empty, so that a small limit cannot make a message unsendable.
    pub fn push(&self, msg: Message) -> Result<(), PushError> {
        let size = encoded_len(&msg);
        let mut s = self.lock();
        if s.closed {
            return Err(PushError::Closed);
        }
        if !s.items.is_empty() && s.bytes + size > self.limit {
            return Err(PushError::Full { queued: s.bytes });
        }
        s.bytes += size;
        s.items.push_back((msg, size));
        drop(s);
        self.ready.notify_one();
        Ok(())
    }

    /// Waits up to `wait` for messages and takes those at the head, up to `max_bytes`
    /// (always at least one), so that the writer can send small frames in one syscall.
    pub fn pop_batch(&self, max_bytes: usize, wait: Duration) -> Popped {
        let deadline = Instant::now() + wait;
        let mut s = self.lock();
        loop {
            if s.closed {
                return Popped::Closed;
            }
            if !s.items.is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Popped::Idle;
            }
            s = self.ready.wait_timeout(s, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
        let mut batch = Vec::new();
        let mut taken = 0;
        while let Some((_, size)) = s.items.front() {
            if !batch.is_empty() && taken + size > max_bytes {
                break;
            }
            let (msg, size) = s.items.pop_front().expect("front exists");
            taken += size;
            batch.push(msg);
        }
        s.bytes -= taken;
        Popped::Batch(batch)
    }

    /// Refuses further pushes and wakes the writer; queued messages are discarded (the
    /// link is going down and cannot deliver them).
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        s.items.clear();
        s.bytes = 0;
        drop(s);
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::Arc;

    fn ack(id: u64) -> Message {
        Message::ReceiptAck { id }
    }

    #[test]
    fn batches_keep_order_and_respect_the_byte_cap() {
        let q = SendQueue::new(1 << 20);
        for id in 0..10 {
            q.push(ack(id)).unwrap();
        }
        let one = encoded_len(&ack(0));
        let Popped::Batch(b) = q.pop_batch(3 * one, Duration::ZERO) else { panic!() };
        assert_eq!(b, vec![ack(0), ack(1), ack(2)]);
        let Popped::Batch(b) = q.pop_batch(1 << 20, Duration::ZERO) else { panic!() };
        assert_eq!(b, (3..10).map(ack).collect::<Vec<_>>());
        assert_eq!(q.pop_batch(1 << 20, Duration::from_millis(5)), Popped::Idle);
    }

    #[test]
    fn the_limit_counts_bytes_but_always_admits_one_message() {
        let big = Message::ResyncData { track: 0, payload: Bytes::from(vec![0; 1000]) };
        let q = SendQueue::new(100);
        q.push(big.clone()).unwrap();
        assert_eq!(q.push(ack(1)), Err(PushError::Full { queued: encoded_len(&big) }));
        assert!(matches!(q.pop_batch(10, Duration::ZERO), Popped::Batch(b) if b.len() == 1));
        q.push(ack(1)).unwrap();
    }

    #[test]
    fn close_wakes_a_waiting_writer_and_refuses_pushes() {
        let q = Arc::new(SendQueue::new(100));
        let q2 = q.clone();
        let t = std::thread::spawn(move || q2.pop_batch(100, Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(20));
        q.close();
        assert_eq!(t.join().unwrap(), Popped::Closed);
        assert_eq!(q.push(ack(1)), Err(PushError::Closed));
    }
}
