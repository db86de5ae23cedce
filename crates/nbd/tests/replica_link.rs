//! The write path's replication hooks, with a fake link standing in for the peer: a
//! synchronous write is answered only once the peer's answer is delivered, a FLUSH waits
//! for the peer's flush, and a DR volume refuses writes with EPERM and changes nothing.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockrep_core::ByteRange;
use blockrep_core::replication::{PairId, VolumeRole};
use blockrep_volume::{
    AfterLocal, AnswerToken, Mailbox, ReplicaData, ReplicaLink, ReplicaMode, Replicated, Volume,
};

mod common;
use common::{client, reply, request, volume};

/// Holds every write and flush until the test releases them, like a peer that answers
/// when told to.
#[derive(Default)]
struct HoldingLink {
    pending: Mutex<Vec<(AnswerToken, Arc<Mailbox>)>>,
    sent: Mutex<Vec<(ByteRange, Vec<u8>)>>,
    /// Local writes (and flushes) done, waiting for the peer.
    local_done: Mutex<usize>,
}

impl HoldingLink {
    fn release_all(&self) -> usize {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap());
        let n = pending.len();
        for (token, mailbox) in pending {
            mailbox.deliver(token);
        }
        n
    }

    /// Gives every held answer back failed with `errno` (the volume left its role).
    fn fail_all(&self, errno: i32) -> usize {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap());
        let n = pending.len();
        for (token, mailbox) in pending {
            mailbox.deliver_failed(token, errno);
        }
        n
    }

    fn wait_local_done(&self, n: usize) {
        while *self.local_done.lock().unwrap() < n {
            std::thread::yield_now();
        }
    }
}

impl ReplicaLink for HoldingLink {
    fn admit(&self, writes: &mut [Replicated]) {
        for w in writes {
            w.mode = ReplicaMode::Sync;
        }
    }

    fn start(&self, write: &mut Replicated, mailbox: &Arc<Mailbox>) {
        if let ReplicaData::Data(bytes) = &write.data {
            self.sent
                .lock()
                .unwrap()
                .push((write.range, bytes.to_vec()));
        }
        write.sent = true;
        self.pending
            .lock()
            .unwrap()
            .push((write.token, Arc::clone(mailbox)));
    }

    fn local_done(&self, write: Replicated, mailbox: &Arc<Mailbox>) -> AfterLocal {
        *self.local_done.lock().unwrap() += 1;
        if !write.sent {
            self.pending
                .lock()
                .unwrap()
                .push((write.token, Arc::clone(mailbox)));
        }
        AfterLocal::WaitForPeer
    }

    fn local_failed(&self, write: Replicated, _: &Arc<Mailbox>) -> AfterLocal {
        if write.sent {
            AfterLocal::WaitForPeer
        } else {
            AfterLocal::Answer
        }
    }

    fn flush(&self, token: AnswerToken, mailbox: &Arc<Mailbox>) -> AfterLocal {
        *self.local_done.lock().unwrap() += 1;
        self.pending
            .lock()
            .unwrap()
            .push((token, Arc::clone(mailbox)));
        AfterLocal::WaitForPeer
    }
}

/// A volume whose writes go through a [`HoldingLink`].
fn linked_volume(dir: &std::path::Path) -> (Arc<Volume>, Arc<HoldingLink>) {
    let volume = volume(dir);
    let link = Arc::new(HoldingLink::default());
    volume
        .gate()
        .set_link(Some(Arc::clone(&link) as Arc<dyn ReplicaLink>));
    (volume, link)
}

/// Sends a 4 KiB READ and checks its answer is the next thing on the stream: a held answer
/// would otherwise have come first, since it was due before the read was sent.
fn next_reply_is_a_read(stream: &mut UnixStream, handle: u64) {
    stream.write_all(&request(0, handle, 0, 4096)).unwrap();
    assert_eq!(reply(stream), (0, handle), "a held answer was sent early");
    let mut data = vec![0u8; 4096];
    stream.read_exact(&mut data).unwrap();
}

#[test]
fn a_synchronous_write_and_a_flush_are_answered_once_the_peer_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (volume, link) = linked_volume(dir.path());
    let (mut c, server) = client(&volume);

    let mut frame = request(1, 7, 8192, 4096);
    frame.extend_from_slice(&[0x5a; 4096]);
    c.write_all(&frame).unwrap();
    // The data reaches the peer (sent when the local write started); the local write
    // completes, and still no answer comes until the peer answers.
    link.wait_local_done(1);
    next_reply_is_a_read(&mut c, 100);
    assert_eq!(link.sent.lock().unwrap()[0].0, ByteRange::new(8192, 4096));
    assert_eq!(link.release_all(), 1);
    assert_eq!(reply(&mut c), (0, 7));

    c.write_all(&request(3, 8, 0, 0)).unwrap(); // FLUSH
    link.wait_local_done(2);
    next_reply_is_a_read(&mut c, 101);
    assert_eq!(link.release_all(), 1);
    assert_eq!(reply(&mut c), (0, 8));

    // WRITE_ZEROES takes the slow path: its data goes to the peer after the local write.
    c.write_all(&request(6, 9, 0, 4096)).unwrap();
    link.wait_local_done(3);
    next_reply_is_a_read(&mut c, 102);
    assert_eq!(link.release_all(), 1);
    assert_eq!(reply(&mut c), (0, 9));

    c.write_all(&request(2, 0, 0, 0)).unwrap(); // DISC
    server.join().unwrap();
    assert_eq!(
        volume.tracker().unwrap().dirty_bytes(),
        8192,
        "tracked until cleared"
    );
}

#[test]
fn held_answers_given_back_failed_are_answered_with_the_error_and_the_client_can_leave() {
    let dir = tempfile::tempdir().unwrap();
    let (volume, link) = linked_volume(dir.path());
    let (mut c, server) = client(&volume);
    let mut frame = request(1, 7, 8192, 4096);
    frame.extend_from_slice(&[0x5a; 4096]);
    c.write_all(&frame).unwrap();
    c.write_all(&request(3, 8, 0, 0)).unwrap(); // FLUSH
    link.wait_local_done(2);
    // A demoted side gives its held answers back failed.
    assert_eq!(link.fail_all(libc::EIO), 2);
    let mut replies = [reply(&mut c), reply(&mut c)];
    replies.sort_unstable();
    assert_eq!(replies, [(libc::EIO as u32, 7), (libc::EIO as u32, 8)]);
    // Nothing is held any more: the connection ends when the client leaves.
    c.write_all(&request(2, 0, 0, 0)).unwrap();
    server.join().unwrap();
}

#[test]
fn a_connection_reads_no_more_requests_while_128_answers_wait_for_the_peer() {
    let dir = tempfile::tempdir().unwrap();
    let (volume, link) = linked_volume(dir.path());
    let (c, server) = client(&volume);
    // 200 writes, pipelined: the peer answers none of them for now.
    let mut writer = c.try_clone().unwrap();
    let sending = std::thread::spawn(move || {
        for i in 0..200u64 {
            let mut frame = request(1, i, i * 4096, 4096);
            frame.extend_from_slice(&[0x5a; 4096]);
            writer.write_all(&frame).unwrap();
        }
    });
    link.wait_local_done(128);
    // A held answer holds its write's memory: past 128 the connection takes no more
    // requests (the client is pushed back by its socket) until the peer answers, but for
    // those already in its 256 KiB input buffer (at most 63 writes of 4 KiB).
    let bound = 128 + 63;
    let observed = std::time::Instant::now() + Duration::from_millis(300);
    while std::time::Instant::now() < observed {
        let done = *link.local_done.lock().unwrap();
        assert!(done <= bound, "{done} writes taken while 128 answers wait");
        std::thread::yield_now();
    }
    let mut answered = 0;
    let mut c = c;
    while answered < 200 {
        link.release_all();
        c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut r = [0u8; 16];
        while c.read_exact(&mut r).is_ok() {
            answered += 1;
        }
    }
    sending.join().unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(&request(2, 0, 0, 0)).unwrap();
    server.join().unwrap();
}

#[test]
fn a_dr_volume_refuses_writes_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let volume = volume(dir.path());
    volume
        .gate()
        .set_role(VolumeRole::Secondary {
            pair: PairId::random(),
        })
        .unwrap();
    let (mut c, server) = client(&volume);
    let mut frame = request(1, 1, 0, 4096);
    frame.extend_from_slice(&[1; 4096]);
    c.write_all(&frame).unwrap();
    assert_eq!(reply(&mut c), (libc::EPERM as u32, 1));
    for (command, handle) in [(6u16, 2u64), (4, 3)] {
        c.write_all(&request(command, handle, 0, 4096)).unwrap();
        assert_eq!(reply(&mut c), (libc::EPERM as u32, handle));
    }
    // Reads still work.
    c.write_all(&request(0, 4, 0, 4096)).unwrap();
    assert_eq!(reply(&mut c), (0, 4));
    let mut data = vec![0u8; 4096];
    c.read_exact(&mut data).unwrap();
    c.write_all(&request(2, 0, 0, 0)).unwrap();
    server.join().unwrap();
    assert_eq!(
        volume.tracker().unwrap().dirty_bytes(),
        0,
        "nothing marked dirty"
    );
    assert!(
        std::fs::read(dir.path().join("v.img"))
            .unwrap()
            .iter()
            .all(|&b| b == 0),
        "nothing written"
    );
}
