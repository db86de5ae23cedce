//! The DR side's handshake of a replication stream: is it this pair's, may its data be
//! taken (the generations, rule 5), and the applier started for it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use blockrep_core::replication::ReplicationStatus;
use blockrep_core::replication::lineage::{self, DrView, Plan, ProductionView};
use blockrep_volume::LineageFile;
use blockrep_wire::{Frame, Hello, ProtocolVersion, RefuseKind};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::applier::{Applier, ApplierSetup, ApplyEvent};
use crate::dr_state::{self, DrState};
use crate::framed::FrameWriter;
use crate::stage_log::StageLog;

use super::DrPair;

/// A stream the DR side took: its number, its applier, and the applier's answers.
pub(super) struct Accepted {
    pub session: u64,
    pub applier: Applier,
    pub events: UnboundedReceiver<ApplyEvent>,
}

impl DrPair {
    /// Why a stream's `Hello` does not fit this pair, if it does not.
    fn check(&self, hello: &Hello) -> Option<String> {
        let m = &self.membership;
        if hello.version != ProtocolVersion::CURRENT {
            return Some(format!(
                "protocol version {} is not spoken here",
                hello.version.number()
            ));
        }
        if hello.volume != m.local_volume {
            return Some(format!(
                "pair {} has DR volume {} here, not {}",
                m.pair, m.local_volume, hello.volume
            ));
        }
        if hello.size != self.volume.size() {
            return Some(format!(
                "the DR volume is {} bytes, the production volume {}",
                self.volume.size(),
                hello.size
            ));
        }
        if hello.model != m.model {
            return Some(format!(
                "pair {} is {}, not {}",
                m.pair, m.model, hello.model
            ));
        }
        None
    }

    /// The handshake of a stream: refuses one that is not this pair's, comes after a newer
    /// one, or whose data may not be taken (rule 5: the generations decide); otherwise
    /// starts the applier and welcomes the production side. `None`: the stream ends here.
    pub(super) async fn handshake(
        &self,
        hello: &Hello,
        writer: &mut FrameWriter,
    ) -> Option<Accepted> {
        if let Some(reason) = self.fault() {
            self.streams_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(pair = %self.membership.pair, %reason, "refused a replication stream");
            writer.refuse(RefuseKind::Failed, reason).await;
            return None;
        }
        if let Some(reason) = self.check(hello) {
            self.streams_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(pair = %self.membership.pair, %reason, "refused a replication stream");
            writer.refuse(RefuseKind::Mismatch, reason).await;
            return None;
        }
        let session = self.session.fetch_add(1, Ordering::SeqCst) + 1;
        self.newest.send_replace(session);
        // An older stream's applier must be gone before the stage log is opened again.
        loop {
            let stopped = self.applier_stopped.notified();
            if !self.applier_running() {
                break;
            }
            stopped.await;
        }
        if *self.newest.borrow() != session {
            return None;
        }
        let state_path = self.volume_dir.join("dr.json");
        let opened = tokio::task::spawn_blocking({
            let log_path = self.volume_dir.join("stage-log");
            let state_path = state_path.clone();
            move || -> std::io::Result<_> {
                let state = dr_state::load(&state_path)?;
                let recovered = StageLog::open(&log_path, state.applied)?;
                Ok((state, recovered))
            }
        })
        .await;
        let (state, recovered) = match opened {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                // Refused, counted and shown: a corrupt log keeps the DR volume where it is
                // until the operator acts, and every stream says why.
                let reason = format!("cannot open the stage log: {e}");
                tracing::error!(pair = %self.membership.pair, %reason);
                self.streams_refused.fetch_add(1, Ordering::Relaxed);
                self.set_status(ReplicationStatus::Error, reason.clone());
                writer.refuse(RefuseKind::Failed, reason).await;
                return None;
            }
            Err(e) => {
                tracing::error!(error = %e, "stage log task failed");
                return None;
            }
        };
        let staged = recovered
            .seals
            .last()
            .map_or(state.applied, |s| s.epoch)
            .max(state.applied);
        // Generations first (rule 5): never take data that would overwrite newer data.
        let Some(lineage_file) = self.volume.gate().lineage() else {
            tracing::error!(pair = %self.membership.pair, "the DR volume has no lineage");
            return None;
        };
        let lineage = lineage_file.get();
        let plan = lineage::plan(
            ProductionView {
                lineage: &hello.lineage,
                dirty: hello.flags.dirty,
                full_sync_done: hello.flags.full_sync_done,
                discard_peer: hello.flags.discard_peer,
            },
            DrView {
                lineage: &lineage,
                consistent: state.consistent,
            },
        );
        let welcome = Frame::Welcome {
            applied: state.applied,
            staged,
            consistent: state.consistent,
            lineage: lineage.clone(),
        };
        let mut state = state;
        let accepted = match plan {
            Plan::Diverged(divergence) => Err((RefuseKind::Diverged, divergence.to_string())),
            plan => self
                .accept_generation(&lineage_file, hello, plan, &mut state, &state_path)
                .await
                .map_err(|e| {
                    (
                        RefuseKind::Failed,
                        format!("cannot record the DR volume's generation: {e}"),
                    )
                }),
        };
        if let Err((kind, reason)) = accepted {
            self.streams_refused.fetch_add(1, Ordering::Relaxed);
            tracing::error!(pair = %self.membership.pair, %reason, "refused a replication stream");
            self.diverged
                .store(kind == RefuseKind::Diverged, Ordering::SeqCst);
            self.set_status(ReplicationStatus::Error, reason.clone());
            writer.refuse(kind, reason).await;
            return None;
        }
        self.diverged.store(false, Ordering::SeqCst);
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let setup = ApplierSetup {
            label: self.membership.pair.to_string()[..8].to_owned(),
            volume: Arc::clone(&self.volume),
            log: recovered.log,
            replay: recovered.seals,
            state: state.clone(),
            state_path: state_path.clone(),
            allowed: Arc::clone(&self.allowed),
            queue_bytes: self.limits.queue_bytes,
            stage_log_max_bytes: self.limits.stage_log_max_bytes,
            compact_after_bytes: crate::applier::COMPACT_BYTES,
            points: Arc::clone(&self.points),
        };
        let applier = match Applier::start(setup, events_tx, Arc::clone(&self.counters)) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the applier");
                return None;
            }
        };
        {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if running.shut_down {
                drop(running);
                tokio::task::spawn_blocking(move || applier.stop());
                return None;
            }
            running.applier = true;
        }
        *self.nudge.lock().unwrap_or_else(|e| e.into_inner()) = Some(applier.nudge());
        if writer.send(&welcome).await.is_err() {
            self.stop_applier(applier).await;
            return None;
        }
        tracing::info!(pair = %self.membership.pair, peer = %hello.node, applied = %state.applied, "replication stream accepted");
        self.set_status(
            if state.consistent {
                ReplicationStatus::Active
            } else {
                ReplicationStatus::Copying
            },
            "receiving from the production agent",
        );
        {
            let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
            status.state = state;
        }
        Some(Accepted {
            session,
            applier,
            events,
        })
    }

    /// Takes the production side's generation before any of its data is written; a full
    /// copy also forgets that the volume held a consistent image.
    async fn accept_generation(
        &self,
        lineage: &Arc<LineageFile>,
        hello: &Hello,
        plan: Plan,
        state: &mut DrState,
        state_path: &std::path::Path,
    ) -> std::io::Result<()> {
        if let Plan::FullSync(reason) = plan {
            tracing::info!(pair = %self.membership.pair, %reason, "the production side copies the whole volume");
            if state.consistent || state.sync_done_at.is_some() {
                state.consistent = false;
                state.sync_done_at = None;
                let (to_save, path) = (state.clone(), state_path.to_owned());
                tokio::task::spawn_blocking(move || dr_state::save(&to_save, &path))
                    .await
                    .map_err(std::io::Error::other)??;
            }
        }
        let (lineage, id) = (Arc::clone(lineage), hello.lineage.current.id);
        tokio::task::spawn_blocking(move || lineage.adopt(id))
            .await
            .map_err(std::io::Error::other)?
    }
}
