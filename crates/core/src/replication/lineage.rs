//! Data generations (rule 5 of the design brief): which history a volume's data belongs
//! to, and what two sides of a pair may do about each other when they connect.
//!
//! A volume's data lives in a *generation* until its role changes. A production volume
//! begins a new one when it takes the role; a DR volume *adopts* its production volume's
//! generation when it accepts that side's data; a volume that leaves a pair or is promoted
//! begins a new one. Each generation records, durably and before the first write is
//! submitted, whether the application wrote the volume in it. The older generations are
//! kept as history, newest last.
//!
//! When the production side connects, both sides compare lineages with [`plan`]:
//!
//! - the DR volume at the production volume's generation, consistent: catch up from the
//!   bitmap (it covers every block that may differ);
//! - the DR volume at an older generation of the same history, not written since: copy the
//!   whole volume (the bitmap does not reach back that far), in the safe direction;
//! - both sides written since their last common generation: **split brain**, refused;
//! - only the DR side written since: it is **newer**, refused (copying production over it
//!   would lose its data);
//! - nothing in common, on a pair that already synced once: **unrelated** data, refused.
//!
//! A refused pair waits for the operator: `pair resolve --keep AZ` discards the other
//! side's changes with a full sync from the kept side. Nothing is discarded silently.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One generation of a volume's data. Random, never zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GenerationId(pub u64);

impl GenerationId {
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4().as_u64_pair().0.max(1))
    }
}

impl fmt::Display for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A generation and whether the volume received data in it: the application's writes, or,
/// for a generation adopted from production, production's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub id: GenerationId,
    pub written: bool,
}

/// How many earlier generations a volume remembers: far more role changes than two sides
/// of a pair go through apart (beyond it, a common generation may be forgotten, and two
/// diverged sides would look unrelated).
pub const HISTORY_LEN: usize = 1024;

/// A volume's generations: the current one and its history (oldest first).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    pub current: Generation,
    pub history: Vec<Generation>,
}

impl Lineage {
    /// A volume whose data belongs to no earlier history.
    pub fn new(id: GenerationId) -> Self {
        Self {
            current: Generation { id, written: false },
            history: Vec::new(),
        }
    }

    /// Begins a new generation (a role change or a promotion).
    pub fn begin(&mut self, id: GenerationId) {
        self.push_current();
        self.current = Generation { id, written: false };
    }

    /// Takes the production side's generation: the volume is about to receive its data,
    /// so the generation counts as written here. A production side that later shows up at
    /// an earlier generation of this history (a stale copy of it) lacks that data: [`plan`]
    /// then finds this volume written since their common generation and refuses.
    pub fn adopt(&mut self, id: GenerationId) {
        if self.current.id != id {
            self.push_current();
            self.current = Generation { id, written: true };
        }
    }

    /// The application wrote the volume. Returns whether that is news (to be recorded).
    pub fn mark_written(&mut self) -> bool {
        !std::mem::replace(&mut self.current.written, true)
    }

    fn push_current(&mut self) {
        self.history.retain(|g| g.id != self.current.id);
        self.history.push(self.current);
        if self.history.len() > HISTORY_LEN {
            self.history.remove(0);
        }
    }

    /// Where `id` is in this lineage: the current generation, or an index into the history.
    fn find(&self, id: GenerationId) -> Option<Found> {
        if self.current.id == id {
            return Some(Found::Current);
        }
        self.history
            .iter()
            .rposition(|g| g.id == id)
            .map(Found::History)
    }

    /// Whether the application wrote the volume in any generation after the one found.
    fn written_after(&self, found: Found) -> bool {
        match found {
            Found::Current => false,
            Found::History(i) => {
                self.history[i + 1..].iter().any(|g| g.written) || self.current.written
            }
        }
    }

    /// The newest generation both lineages went through.
    fn newest_common(&self, other: &Lineage) -> Option<(Found, Found)> {
        let mine = self.history.iter().map(|g| g.id).chain([self.current.id]);
        let mut best = None;
        for id in mine {
            if let Some(theirs) = other.find(id) {
                best = Some((self.find(id).expect("own generation"), theirs));
            }
        }
        best
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Found {
    Current,
    History(usize),
}

/// What the production side brings to a connection.
#[derive(Clone, Copy, Debug)]
pub struct ProductionView<'a> {
    pub lineage: &'a Lineage,
    /// Its bitmap has dirty blocks: it holds data the DR side may lack.
    pub dirty: bool,
    /// This pair's first full copy completed, so the bitmap is relative to the DR volume.
    pub full_sync_done: bool,
    /// The operator resolved a divergence keeping this side: the DR side's own changes are
    /// to be discarded.
    pub discard_peer: bool,
}

/// What the DR side brings to a connection.
#[derive(Clone, Copy, Debug)]
pub struct DrView<'a> {
    pub lineage: &'a Lineage,
    /// The DR volume holds a consistent image of the generation it is at.
    pub consistent: bool,
}

/// What a connection does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Send what the bitmap says changed, staged: the DR side keeps its consistent image
    /// until the catch-up is applied whole.
    CatchUp,
    /// The first sync copied everything but did not end: send the dirty blocks, in place.
    FinishSync,
    /// Copy the whole volume, in place.
    FullSync(FullSyncReason),
    /// Refuse: the operator decides.
    Diverged(Divergence),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FullSyncReason {
    /// A new pair: the DR volume's data is replaced.
    Initial,
    /// The DR volume holds an older generation of this history, unwritten since; the bitmap
    /// does not reach back to it.
    OlderGeneration(GenerationId),
    /// The operator kept the production side.
    Resolved,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Divergence {
    /// Both sides were written since `common`, their last common generation.
    SplitBrain {
        common: GenerationId,
        production: GenerationId,
        dr: GenerationId,
    },
    /// The DR side was written since `common` and the production side was not.
    DrNewer {
        common: GenerationId,
        dr: GenerationId,
    },
    /// The DR volume's history and the production volume's have nothing in common, on a
    /// pair that already synced.
    Unrelated {
        production: GenerationId,
        dr: GenerationId,
    },
}

impl fmt::Display for FullSyncReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FullSyncReason::Initial => write!(f, "initial sync"),
            FullSyncReason::OlderGeneration(g) => write!(
                f,
                "the DR volume holds an older generation ({g}) the bitmap does not cover"
            ),
            FullSyncReason::Resolved => {
                write!(f, "resolved: the DR side's own changes are discarded")
            }
        }
    }
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Divergence::SplitBrain {
                common,
                production,
                dr,
            } => write!(
                f,
                "split brain: both sides were written since generation {common} (production at {production}, DR at {dr})"
            ),
            Divergence::DrNewer { common, dr } => write!(
                f,
                "the DR volume is newer: it was written since generation {common} (now {dr}) and production was not; copying production over it would lose that data"
            ),
            Divergence::Unrelated { production, dr } => write!(
                f,
                "unrelated data: the DR volume's generation {dr} shares no history with production's {production}"
            ),
        }
    }
}

/// What a connection between `production` and `dr` does. Both sides compute it: the DR
/// side refuses a divergence, the production side picks its resync from the rest.
pub fn plan(production: ProductionView<'_>, dr: DrView<'_>) -> Plan {
    if production.discard_peer {
        return Plan::FullSync(FullSyncReason::Resolved);
    }
    let p = production.lineage;
    let d = dr.lineage;
    let same_history = |consistent: bool| {
        if consistent {
            Plan::CatchUp
        } else if production.full_sync_done {
            Plan::FinishSync
        } else {
            Plan::FullSync(FullSyncReason::Initial)
        }
    };
    // The DR volume is at production's generation, or went on from it.
    if let Some(at) = d.find(p.current.id) {
        if !d.written_after(at) {
            return same_history(dr.consistent);
        }
        return Plan::Diverged(if production.dirty {
            Divergence::SplitBrain {
                common: p.current.id,
                production: p.current.id,
                dr: d.current.id,
            }
        } else {
            Divergence::DrNewer {
                common: p.current.id,
                dr: d.current.id,
            }
        });
    }
    match p.newest_common(d) {
        Some((in_p, in_d)) => {
            let common = match in_p {
                Found::Current => p.current.id,
                Found::History(i) => p.history[i].id,
            };
            let dr_written = d.written_after(in_d);
            let production_written = p.written_after(in_p) || production.dirty;
            match (dr_written, production_written) {
                (true, true) => Plan::Diverged(Divergence::SplitBrain {
                    common,
                    production: p.current.id,
                    dr: d.current.id,
                }),
                (true, false) => Plan::Diverged(Divergence::DrNewer {
                    common,
                    dr: d.current.id,
                }),
                (false, _) => Plan::FullSync(FullSyncReason::OlderGeneration(d.current.id)),
            }
        }
        None if !production.full_sync_done => Plan::FullSync(FullSyncReason::Initial),
        None => Plan::Diverged(Divergence::Unrelated {
            production: p.current.id,
            dr: d.current.id,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(n: u64) -> GenerationId {
        GenerationId(n)
    }

    fn prod(lineage: &Lineage, dirty: bool, synced: bool) -> ProductionView<'_> {
        ProductionView {
            lineage,
            dirty,
            full_sync_done: synced,
            discard_peer: false,
        }
    }

    fn dr(lineage: &Lineage, consistent: bool) -> DrView<'_> {
        DrView {
            lineage,
            consistent,
        }
    }

    /// Production at generation 2 (written), its DR side adopted it and is consistent.
    fn replicating() -> (Lineage, Lineage) {
        let mut p = Lineage::new(g(1));
        p.begin(g(2));
        p.mark_written();
        let mut d = Lineage::new(g(10));
        d.adopt(g(2));
        (p, d)
    }

    #[test]
    fn a_new_pair_copies_everything() {
        let mut p = Lineage::new(g(1));
        p.begin(g(2));
        let d = Lineage::new(g(10));
        assert_eq!(
            plan(prod(&p, true, false), dr(&d, false)),
            Plan::FullSync(FullSyncReason::Initial)
        );
    }

    #[test]
    fn a_reconnect_catches_up_from_the_bitmap() {
        let (p, d) = replicating();
        assert_eq!(plan(prod(&p, true, true), dr(&d, true)), Plan::CatchUp);
        assert_eq!(plan(prod(&p, false, true), dr(&d, true)), Plan::CatchUp);
    }

    #[test]
    fn an_unfinished_first_sync_is_finished_or_restarted() {
        let (p, d) = replicating();
        assert_eq!(plan(prod(&p, true, true), dr(&d, false)), Plan::FinishSync);
        assert_eq!(
            plan(prod(&p, true, false), dr(&d, false)),
            Plan::FullSync(FullSyncReason::Initial)
        );
    }

    #[test]
    fn a_promoted_dr_side_that_was_written_is_split_brain_or_newer() {
        let (p, mut d) = replicating();
        d.begin(g(11));
        d.mark_written();
        assert!(matches!(
            plan(prod(&p, true, true), dr(&d, true)),
            Plan::Diverged(Divergence::SplitBrain { common, .. }) if common == g(2)
        ));
        assert!(matches!(
            plan(prod(&p, false, true), dr(&d, true)),
            Plan::Diverged(Divergence::DrNewer { .. })
        ));
    }

    #[test]
    fn a_promoted_dr_side_never_written_catches_up_again() {
        let (p, mut d) = replicating();
        d.begin(g(11));
        assert_eq!(plan(prod(&p, true, true), dr(&d, true)), Plan::CatchUp);
    }

    #[test]
    fn a_deleted_and_recreated_pair_written_on_both_sides_is_split_brain() {
        let (mut p, mut d) = replicating();
        // Delete: both leave the pair and are written standalone.
        p.begin(g(3));
        p.mark_written();
        d.begin(g(11));
        d.mark_written();
        // Re-create: production takes the role again.
        p.begin(g(4));
        assert!(matches!(
            plan(prod(&p, false, false), dr(&d, false)),
            Plan::Diverged(Divergence::SplitBrain { common, .. }) if common == g(2)
        ));
    }

    #[test]
    fn a_recreated_pair_whose_dr_side_was_not_written_copies_everything() {
        let (mut p, mut d) = replicating();
        p.begin(g(3));
        p.mark_written();
        d.begin(g(11));
        p.begin(g(4));
        assert_eq!(
            plan(prod(&p, false, false), dr(&d, false)),
            Plan::FullSync(FullSyncReason::OlderGeneration(g(11)))
        );
    }

    #[test]
    fn a_dr_side_at_an_older_generation_of_production_copies_everything() {
        let (mut p, d) = replicating();
        p.begin(g(3));
        assert_eq!(
            plan(prod(&p, true, false), dr(&d, true)),
            Plan::FullSync(FullSyncReason::OlderGeneration(g(2)))
        );
    }

    #[test]
    fn a_production_side_older_than_the_dr_side_is_refused() {
        let (mut p, mut d) = replicating();
        let stale = p.clone();
        p.begin(g(3));
        p.mark_written();
        d.adopt(g(3));
        assert!(matches!(
            plan(prod(&stale, false, true), dr(&d, true)),
            Plan::Diverged(Divergence::DrNewer { common, .. }) if common == g(2)
        ));
        assert!(matches!(
            plan(prod(&stale, true, true), dr(&d, true)),
            Plan::Diverged(Divergence::SplitBrain { .. })
        ));
        // The production side it came from is welcome.
        assert_eq!(plan(prod(&p, true, true), dr(&d, true)), Plan::CatchUp);
    }

    #[test]
    fn unrelated_data_after_a_sync_is_refused() {
        let (p, _) = replicating();
        let stranger = Lineage::new(g(99));
        assert!(matches!(
            plan(prod(&p, false, true), dr(&stranger, true)),
            Plan::Diverged(Divergence::Unrelated { .. })
        ));
    }

    #[test]
    fn resolving_for_production_discards_the_dr_side() {
        let (p, mut d) = replicating();
        d.begin(g(11));
        d.mark_written();
        let view = ProductionView {
            discard_peer: true,
            ..prod(&p, true, true)
        };
        assert_eq!(
            plan(view, dr(&d, true)),
            Plan::FullSync(FullSyncReason::Resolved)
        );
    }

    #[test]
    fn history_is_bounded_and_marks_are_news_once() {
        let mut l = Lineage::new(g(1));
        for i in 2..2000 {
            l.begin(g(i));
        }
        assert_eq!(l.history.len(), HISTORY_LEN);
        assert!(l.mark_written());
        assert!(!l.mark_written());
    }
}
