//! The replication side of a production volume, as the write path sees it.
//!
//! A production volume carries a [`ReplicaLink`] (the replication crate implements it). The
//! connection loop calls it at three points of a write's path through the gate:
//!
//! ```text
//!  admitted (blocks locked, bits set) ─► link.admit(batch)      epoch, ticket, sync or not
//!  local write may start (admission durable) ─► link.start(w)   synchronous: data sent now
//!  local write done ─► link.local_done(w) ─► Answer | WaitForPeer   async: data journaled
//! ```
//!
//! A write that waits for the peer is answered when the link delivers its token to the
//! connection's [`Mailbox`], which wakes the connection. The link delivers every token it
//! accepted exactly once: when the peer has the data, or when the pair stops replicating
//! (the write's blocks then stay dirty, so rule 1 still holds).

use std::sync::{Arc, Mutex};

use blockrep_core::ByteRange;
use blockrep_core::replication::{AnswerToken, Ticket, WriteSeq};
use bytes::Bytes;

use crate::waker::Waker;

/// How the link replicates a write, and what happens to its answer after the local write:
/// the pair machine's.
pub use blockrep_core::pair::production::{AfterLocal, ReplicaMode};

/// Where the peer's answers to a connection's held writes and flushes go.
#[derive(Debug)]
pub struct Mailbox {
    tokens: Mutex<Vec<Delivery>>,
    waker: Arc<Waker>,
}

/// A held answer given back: the token, and the error to answer with instead of the local
/// result, if the write must fail after all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub token: AnswerToken,
    pub failed: Option<i32>,
}

impl Mailbox {
    pub fn new(waker: Arc<Waker>) -> Self {
        Self {
            tokens: Mutex::new(Vec::new()),
            waker,
        }
    }

    /// The peer answered the write or flush sent under `token`.
    pub fn deliver(&self, token: AnswerToken) {
        self.push(Delivery {
            token,
            failed: None,
        });
    }

    /// The write or flush held under `token` is answered with `errno`, whatever its local
    /// result (its volume left the role it was written in).
    pub fn deliver_failed(&self, token: AnswerToken, errno: i32) {
        self.push(Delivery {
            token,
            failed: Some(errno),
        });
    }

    fn push(&self, delivery: Delivery) {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(delivery);
        self.waker.wake();
    }

    /// Moves the delivered answers into `out`.
    pub fn take(&self, out: &mut Vec<Delivery>) {
        out.append(&mut self.tokens.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// What a replicated write puts on the volume.
#[derive(Clone, Debug)]
pub enum ReplicaData {
    Data(Bytes),
    /// The range reads as zeroes afterwards (WRITE_ZEROES, or a TRIM that punched a hole).
    Zeroes,
    /// Nothing changed (a TRIM the device could not do): nothing to send.
    Unchanged,
}

impl ReplicaData {
    pub fn len(&self) -> u64 {
        match self {
            ReplicaData::Data(b) => b.len() as u64,
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A write on its way through the link.
#[derive(Debug)]
pub struct Replicated {
    pub range: ByteRange,
    pub data: ReplicaData,
    pub fua: bool,
    /// The connection's key for the peer's answer.
    pub token: AnswerToken,
    pub mode: ReplicaMode,
    pub ticket: Option<Ticket>,
    /// The data was sent when the local write started.
    pub sent: bool,
    /// The link's key for the frame it sent, if any.
    pub seq: Option<WriteSeq>,
}

impl Replicated {
    pub fn new(range: ByteRange, data: ReplicaData, fua: bool, token: AnswerToken) -> Self {
        Self {
            range,
            data,
            fua,
            token,
            mode: ReplicaMode::Tracked,
            ticket: None,
            sent: false,
            seq: None,
        }
    }
}

pub trait ReplicaLink: Send + Sync {
    /// A batch of writes was admitted (blocks locked, bits set), in admission order: set
    /// each one's mode and ticket.
    fn admit(&self, writes: &mut [Replicated]);

    /// The write's admission is durable and its local write starts now: a synchronous link
    /// sends its data at once, so both sides write in parallel.
    fn start(&self, write: &mut Replicated, mailbox: &Arc<Mailbox>);

    /// The local write succeeded. `data` may have changed since admission (a TRIM that
    /// could not punch reports `Unchanged`).
    fn local_done(&self, write: Replicated, mailbox: &Arc<Mailbox>) -> AfterLocal;

    /// The local write failed: nothing goes to the peer, the blocks stay dirty. If the
    /// data was already sent, or a consistency group holds answers, the link delivers the
    /// token later; the caller waits for it.
    fn local_failed(&self, write: Replicated, mailbox: &Arc<Mailbox>) -> AfterLocal;

    /// A FLUSH: whether its answer must also wait for the peer's flush (the token is then
    /// delivered to the mailbox).
    fn flush(&self, token: AnswerToken, mailbox: &Arc<Mailbox>) -> AfterLocal;
}
