//! Failover to a point (docs/POINT-IN-TIME.md): the DR volume is rolled back to a
//! retained point by writing back, from its undo journal, every byte a later unit changed.
//!
//! - The point must be held; nothing changes otherwise.
//! - `rollback.json` is recorded first: until the promotion that follows removes it, the
//!   pair's DR side takes no replication (the volume may be between two images), and a
//!   repeated promotion rolls back again. Writing the same old contents again is harmless,
//!   and the journal is only read, so a crash at any step is repaired by repeating it.
//! - The blocks written back are marked dirty, durably, before any is written: production
//!   holds them at a later state, and reprotect copies only what differs.

use std::path::Path;

use blockrep_core::ByteRange;
use blockrep_core::replication::Epoch;
use blockrep_core::replication::undo::Piece;
use blockrep_volume::{AlignedBuf, DIRECT_IO_ALIGN, Volume};

use crate::undo_journal::{PIECE_BYTES, Point, Points};

/// The file that says a rollback is under way.
pub const ROLLBACK_FILE: &str = "rollback.json";

/// Why a rollback did not happen or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error("{0}")]
    NotHeld(String),
    #[error("{0}")]
    Io(String),
}

/// Rolls `volume` (whose directory is `volume_dir`) back to `point`, from `points`; returns
/// the point reached (with its cut time) and the bytes written back.
pub fn roll_back(
    volume: &Volume,
    volume_dir: &Path,
    points: &Points,
    point: Epoch,
) -> Result<(Point, u64), RollbackError> {
    let io = |what: &str, e: &dyn std::fmt::Display| RollbackError::Io(format!("{what}: {e}"));
    let mut guard = points
        .journal()
        .map_err(|e| io("open the undo journal", &e))?;
    let journal = guard
        .as_mut()
        .ok_or_else(|| RollbackError::Io("the undo journal is not open".into()))?;
    let Some(reached) = journal
        .points()
        .into_iter()
        .map(|p| p.point)
        .find(|p| p.epoch == point)
    else {
        let held: Vec<String> = journal
            .points()
            .iter()
            .map(|p| p.point.epoch.0.to_string())
            .collect();
        return Err(RollbackError::NotHeld(format!(
            "the DR volume does not hold point {point} (it holds {})",
            if held.is_empty() {
                "none".to_owned()
            } else {
                format!("{} to {}", held[0], held[held.len() - 1])
            }
        )));
    };
    blockrep_volume::write_file_durably(
        &volume_dir.join(ROLLBACK_FILE),
        &serde_json::to_vec(&reached).expect("serialisable"),
    )
    .map_err(|e| io("record the rollback", &e))?;
    let view = journal
        .view(point)
        .map_err(|e| io("read the undo index", &e))?;
    let ranges: Vec<ByteRange> = view.ranges().map(|r| r.range).collect();
    let tracker = volume
        .tracker()
        .ok_or_else(|| RollbackError::Io("the volume has no dirty tracker".into()))?;
    tracker
        .mark_durably(&ranges)
        .map_err(|e| io("mark the rolled-back blocks dirty", &e))?;
    let mut bytes = 0;
    let mut buf = AlignedBuf::new(PIECE_BYTES as usize);
    let total = ranges.len();
    for (done, undo) in view.ranges().enumerate() {
        let mut at = 0;
        while at < undo.range.len {
            let len = (undo.range.len - at).min(PIECE_BYTES);
            let piece = ByteRange::new(undo.range.offset + at, len);
            let [Piece::Undo { at: record, .. }] = view.pieces(piece)[..] else {
                return Err(RollbackError::Io(format!(
                    "the undo index does not cover {piece} whole"
                )));
            };
            buf.set_len(len as usize);
            journal
                .read_piece(
                    Piece::Undo {
                        range: piece,
                        at: record,
                    },
                    &mut buf[..len as usize],
                )
                .map_err(|e| io("read the undo journal", &e))?;
            if piece.is_aligned(DIRECT_IO_ALIGN) {
                volume
                    .backing()
                    .write_all_at(&buf[..len as usize], piece.offset)
            } else {
                volume
                    .read_modify_write(piece, Some(&buf[..len as usize]), false)
                    .map(|_| ())
            }
            .map_err(|e| io(&format!("write {piece} back to the volume"), &e))?;
            bytes += len;
            at += len;
        }
        fault::die_halfway(done + 1, total);
    }
    volume
        .backing()
        .sync_data()
        .map_err(|e| io("sync the volume", &e))?;
    Ok((reached, bytes))
}

/// Test-only faults, compiled in only with the `fault-injection` feature.
mod fault {
    /// With `BLOCKREP_FAULT_ROLLBACK_DIES=1`, the agent dies (as `kill -9` would end it)
    /// halfway through a rollback: half its ranges written back (at least one), the rest
    /// not, nothing synced.
    #[cfg(feature = "fault-injection")]
    pub fn die_halfway(done: usize, of: usize) {
        if done * 2 >= of && std::env::var("BLOCKREP_FAULT_ROLLBACK_DIES").is_ok_and(|v| v == "1") {
            tracing::error!(
                done,
                of,
                "fault injection: the agent dies halfway through a rollback"
            );
            std::process::abort();
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    #[inline]
    pub fn die_halfway(_done: usize, _of: usize) {}
}
