//! The journal's queue of frames for the DR side, in the order they must be sent, with the
//! one reordering rule 3 allows: a staged write is dropped when a later staged write of the
//! same epoch covers exactly its range before either was sent (within an epoch the later
//! write wins, and the DR side applies an epoch only whole).
//!
//! Only staged writes with nothing else queued between them are coalesced: any other frame
//! (a seal, a direct write, a flush, a verify request, a discard) is a fence, for the DR side
//! acts on it in stream order and must find what was queued before it.

use std::collections::{HashMap, VecDeque};

use crate::extent::ByteRange;
use crate::replication::journal::{Outgoing, Payload, PayloadLen};

#[derive(Debug)]
pub(crate) struct SendQueue<P> {
    /// Frames in order; `None` where a staged write was coalesced away. The front is never
    /// `None`.
    frames: VecDeque<Option<Outgoing<P>>>,
    /// The position of `frames[0]` since the queue began.
    head: u64,
    /// Staged writes queued since the last fence, by range: their position (those sent
    /// since stay until the next fence, which clears them all).
    staged_since_fence: HashMap<ByteRange, u64>,
    /// Frames queued that are not staged writes.
    fences: usize,
}

impl<P: PayloadLen> SendQueue<P> {
    pub fn new() -> Self {
        Self {
            frames: VecDeque::new(),
            head: 0,
            staged_since_fence: HashMap::new(),
            fences: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn front(&self) -> Option<&Outgoing<P>> {
        self.frames.front().and_then(Option::as_ref)
    }

    /// Whether a frame other than a staged write is queued.
    pub fn has_fence(&self) -> bool {
        self.fences > 0
    }

    pub fn push(&mut self, frame: Outgoing<P>) {
        let at = self.head + self.frames.len() as u64;
        match &frame {
            Outgoing::Write(w) if !w.direct => {
                self.staged_since_fence.insert(w.range, at);
            }
            _ => {
                self.fences += 1;
                self.staged_since_fence.clear();
            }
        }
        self.frames.push_back(Some(frame));
    }

    /// Queues a staged write, dropping the one of the same epoch and range queued since the
    /// last fence, if any: returns the payload bytes dropped.
    pub fn push_coalescing(&mut self, frame: Outgoing<P>) -> u64 {
        let mut dropped = 0;
        if let Outgoing::Write(new) = &frame
            && !new.direct
            && let Some(&at) = self.staged_since_fence.get(&new.range)
            && at >= self.head
        {
            let slot = &mut self.frames[(at - self.head) as usize];
            if let Some(Outgoing::Write(old)) = slot
                && old.epoch == new.epoch
            {
                dropped = payload_bytes(&old.payload);
                *slot = None;
            }
        }
        self.push(frame);
        self.skip_dropped();
        dropped
    }

    pub fn pop(&mut self) -> Option<Outgoing<P>> {
        let frame = self
            .frames
            .pop_front()?
            .expect("the front is never a dropped write");
        self.head += 1;
        if !matches!(&frame, Outgoing::Write(w) if !w.direct) {
            self.fences -= 1;
        }
        self.skip_dropped();
        Some(frame)
    }

    pub fn clear(&mut self) {
        self.head += self.frames.len() as u64;
        self.frames.clear();
        self.staged_since_fence.clear();
        self.fences = 0;
    }

    fn skip_dropped(&mut self) {
        while let Some(None) = self.frames.front() {
            self.frames.pop_front();
            self.head += 1;
        }
    }
}

pub(crate) fn payload_bytes<P: PayloadLen>(payload: &Payload<P>) -> u64 {
    match payload {
        Payload::Data(p) => p.payload_len(),
        Payload::Zeroes => 0,
    }
}
