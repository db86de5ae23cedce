//! The spans of epochs a pair's DR side can only take whole: a catch-up's unit, from the
//! last epoch the DR side staged when live writes left the journal to the epoch the
//! catch-up ended at. The production side reports them with every group cut ack, and its
//! group never commits an epoch strictly inside one (docs/GROUPS.md, "Catch-up units are
//! atomic").

use crate::replication::Epoch;

/// Epochs strictly between `from` and `to` are inside a unit the DR side applies whole;
/// `to` is `None` while the unit is still being made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AtomicSpan {
    pub from: Epoch,
    pub to: Option<Epoch>,
}

/// How many spans a link remembers (reported with every cut until they age out).
const KEPT: usize = 8;

/// A link's spans, newest last; at most the newest is open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AtomicSpans {
    spans: Vec<AtomicSpan>,
}

impl AtomicSpans {
    /// Live writes leave the journal: what the DR side gets next is a unit from `staged`,
    /// the last epoch it staged. An open span goes on (its start is earlier).
    pub fn open(&mut self, staged: Epoch) {
        if self.in_progress().is_some() {
            return;
        }
        self.spans.push(AtomicSpan {
            from: staged,
            to: None,
        });
        if self.spans.len() > KEPT {
            self.spans.remove(0);
        }
    }

    /// The unit being made ends with the seal of `end` (a catch-up's end, or going live:
    /// the current epoch).
    pub fn close(&mut self, end: Epoch) {
        if let Some(span) = self.spans.last_mut().filter(|s| s.to.is_none()) {
            span.to = Some(end);
        }
    }

    /// Where the unit being made began, if one is.
    pub fn in_progress(&self) -> Option<Epoch> {
        self.spans.last().filter(|s| s.to.is_none()).map(|s| s.from)
    }

    /// The spans, oldest first.
    pub fn list(&self) -> Vec<AtomicSpan> {
        self.spans.clone()
    }
}

/// Where the catch-up unit a production agent records begins (its pair record's
/// `catch_up_from`), for a new unit starting after `new_from`: no later than the unit
/// recorded before, whose span the coordinator may never have heard of (an ack can come
/// too late and be dropped), and no earlier than what the DR side `applied` (no commit goes
/// back there, and a unit it applied is whole).
pub fn unit_to_record(recorded: Option<Epoch>, new_from: Epoch, applied: Epoch) -> Epoch {
    recorded
        .map_or(new_from, |old| old.min(new_from))
        .max(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_the_newest_span_is_open_and_old_ones_age_out() {
        let mut spans = AtomicSpans::default();
        spans.open(Epoch(3));
        spans.open(Epoch(5));
        assert_eq!(spans.in_progress(), Some(Epoch(3)), "an open span goes on");
        spans.close(Epoch(7));
        spans.close(Epoch(9));
        assert_eq!(
            spans.list(),
            vec![AtomicSpan {
                from: Epoch(3),
                to: Some(Epoch(7))
            }]
        );
        for e in 10..20 {
            spans.open(Epoch(e));
            spans.close(Epoch(e + 1));
        }
        let list = spans.list();
        assert_eq!(list.len(), KEPT);
        assert_eq!(list[0].from, Epoch(12));
    }

    /// A unit whose span no ack reported (the one ack came late) and whose end is staged,
    /// then a second unit, then a restart: the record must still cover the first.
    #[test]
    fn the_recorded_unit_start_covers_every_unit_the_dr_side_has_not_applied() {
        assert_eq!(unit_to_record(None, Epoch(90), Epoch(85)), Epoch(90));
        assert_eq!(
            unit_to_record(Some(Epoch(87)), Epoch(90), Epoch(85)),
            Epoch(87),
            "the unit after 87 is not applied"
        );
        assert_eq!(
            unit_to_record(Some(Epoch(87)), Epoch(95), Epoch(90)),
            Epoch(90),
            "the DR side applied the unit after 87"
        );
        assert_eq!(
            unit_to_record(Some(Epoch(95)), Epoch(90), Epoch(85)),
            Epoch(90)
        );
    }
}
