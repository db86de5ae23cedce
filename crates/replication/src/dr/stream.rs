//! The DR side's stream, once accepted: the production side's frames go to the applier in
//! order, its answers go back; the one conversion each way between the wire's frames and
//! the applier's commands and events.

use blockrep_core::replication::ReplicationStatus;
use blockrep_wire::{Frame, RefuseKind};

use crate::applier::{ApplyCmd, ApplyEvent, VerifyCmd};
use crate::framed::{FrameReader, FrameWriter};

use super::DrPair;
use super::handshake::Accepted;
use super::received::PayloadMemory;

/// Answers sent in one write at most, so a busy applier's answers still leave steadily.
const MAX_BATCHED_ANSWERS: usize = 1024;

impl DrPair {
    /// Serves the stream until it ends, a newer one replaces it, or the applier fails;
    /// then stops the applier.
    pub(super) async fn stream(
        &self,
        accepted: Accepted,
        reader: &mut FrameReader,
        writer: &mut FrameWriter,
    ) {
        let Accepted {
            session,
            applier,
            mut events,
        } = accepted;
        let answers = async {
            let mut chunks = Vec::new();
            while let Some(first) = events.recv().await {
                // What the applier answered meanwhile goes out in the same write: a sync's
                // acknowledgements share a packet and one wake-up of the production side.
                let mut next = Some(first);
                let mut batched = 0;
                while let Some(event) = next {
                    let frame = match event {
                        ApplyEvent::WriteAck(seq) => Frame::WriteAck { seq },
                        ApplyEvent::FlushAck(seq) => Frame::FlushAck { seq },
                        ApplyEvent::SyncDoneAck(epoch) => Frame::SyncDoneAck { epoch },
                        ApplyEvent::Staged(epoch) => Frame::Staged { epoch },
                        ApplyEvent::Applied { epoch, cut_ms } => {
                            self.applied(epoch, cut_ms);
                            Frame::Applied { epoch, cut_ms }
                        }
                        ApplyEvent::Reject { seq, reason } => Frame::Reject { seq, reason },
                        ApplyEvent::Verified { id, differing } => Frame::Verified { id, differing },
                        ApplyEvent::Failed(reason) => {
                            // The answers before it still go, then the refusal.
                            let _ = writer.send_chunks(&mut chunks).await;
                            writer.refuse(RefuseKind::Failed, reason.clone()).await;
                            return Err(reason);
                        }
                    };
                    writer.push_frame(&frame, &mut chunks);
                    batched += 1;
                    next = if batched < MAX_BATCHED_ANSWERS {
                        events.try_recv().ok()
                    } else {
                        None
                    };
                }
                if let Err(e) = writer.send_chunks(&mut chunks).await {
                    return Err(e.to_string());
                }
            }
            Ok(())
        };
        let memory = PayloadMemory::new();
        let frames = async {
            loop {
                let mut placed = false;
                let next = reader.next_placing(|header| {
                    let memory = memory.place(header);
                    placed = memory.is_some();
                    memory
                });
                match next.await {
                    Ok(Some(frame)) => {
                        let cmd = command_of(frame, placed)
                            .ok_or_else(|| "unexpected frame on a replication stream".to_owned())?;
                        applier.submit(cmd).await;
                    }
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        let mut newest = self.newest.subscribe();
        // A newer stream (or a close) may have come before this subscription: look first.
        let superseded = async {
            while *newest.borrow_and_update() == session {
                if newest.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        let ended = tokio::select! {
            r = answers => r,
            r = frames => r,
            () = superseded => Err("a newer stream replaced it".to_owned()),
        };
        match &ended {
            Ok(()) => tracing::info!(pair = %self.membership.pair, "replication stream closed"),
            Err(e) => {
                tracing::warn!(pair = %self.membership.pair, error = %e, "replication stream ended")
            }
        }
        self.set_status(
            ReplicationStatus::Inactive,
            "the production agent disconnected",
        );
        self.stop_applier(applier).await;
    }
}

/// The applier's command a frame of the production side stands for (`None`: a frame the
/// production side never sends on a replication stream); `placed`: a write's payload was
/// received into memory of its own.
fn command_of(frame: Frame, placed: bool) -> Option<ApplyCmd> {
    Some(match frame {
        Frame::Write(header, payload) => ApplyCmd::Write {
            header,
            payload,
            budget: 0,
            placed,
        },
        Frame::Flush { seq } => ApplyCmd::Flush { seq },
        Frame::Seal { epoch, cut_ms } => ApplyCmd::Seal { epoch, cut_ms },
        Frame::Discard { after } => ApplyCmd::Discard { after },
        Frame::SyncDone { epoch } => ApplyCmd::SyncDone { epoch },
        Frame::Ungate { epoch } => ApplyCmd::Ungate { epoch },
        Frame::Digest {
            offset,
            after,
            crcs,
        } => ApplyCmd::Digest {
            offset,
            after,
            crcs,
        },
        Frame::Verify {
            id,
            offset,
            block,
            after,
            crcs,
        } => ApplyCmd::Verify(VerifyCmd {
            id,
            offset,
            block,
            after,
            crcs,
        }),
        _ => return None,
    })
}
