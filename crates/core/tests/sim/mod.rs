//! What the seeded simulations share: events on a virtual clock, and the hosts' names.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use blockrep_core::replication::group_cut::CutMessage;

/// Events due at virtual times (ms); events due at the same time come in the order they
/// were scheduled.
pub struct Clock<E> {
    now: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: Vec<Option<E>>,
}

impl<E> Clock<E> {
    pub fn new() -> Self {
        Self {
            now: 0,
            queue: BinaryHeap::new(),
            events: Vec::new(),
        }
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    pub fn at(&mut self, when: u64, event: E) {
        self.events.push(Some(event));
        self.queue
            .push(Reverse((when, self.events.len() as u64 - 1)));
    }

    pub fn after(&mut self, delay: u64, event: E) {
        self.at(self.now + delay, event);
    }

    /// The next event due no later than `end`; the clock moves to it.
    pub fn next(&mut self, end: u64) -> Option<E> {
        let Reverse((when, index)) = self.queue.pop()?;
        if when > end {
            return None;
        }
        self.now = when;
        self.events[index as usize].take()
    }
}

/// The simulated hosts are named `host-<index>`.
pub fn host_name(index: usize) -> String {
    format!("host-{index}")
}

/// The index of the host a coordinator message is for.
pub fn host_of(message: &CutMessage) -> usize {
    let (CutMessage::Cut { host, .. } | CutMessage::Release { host, .. }) = message;
    host.strip_prefix("host-")
        .and_then(|n| n.parse().ok())
        .expect("a host name")
}
