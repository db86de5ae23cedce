//! A production host's hold on its writes' answers, for its consistency group
//! (docs/GROUPS.md).
//!
//! A group cut holds the answers of the writes that complete while it is in progress, until
//! its release — or a timeout: the coordinator never commits a cut it did not release, so
//! giving them late is safe. A *trip* hold (a synchronous pair of a hypermetro group lost its
//! link, or its agent started) holds every answer until the release of a trip cut that
//! reached it after it tripped and that every host switched at; it never times out, since
//! until then another pair of the group may still be writing its DR side directly. An agent
//! that starts with its pair in a group starts with a cut hold for the last cut it recorded
//! (the round may still be running).
//!
//! ```text
//!  none ──cut (switched)──► cut hold ──release ≥ to, or timeout──► none (answers given)
//!   │    agent start ──────────►│
//!   │                          │
//!   └──────trip────────────────┴──► trip hold ──trip cut reaches it──► trip hold, cut seen
//!                                                   └──release of a completed trip ≥ it──► none
//! ```

use super::Epoch;
use super::group_cut::{CutMode, RoundOutcome};

/// The answers held, if any, and whether the pair waits for its group's trip.
#[derive(Debug)]
pub struct AnswerHold<T> {
    held: Option<Held<T>>,
    trip_wanted: bool,
}

#[derive(Debug)]
struct Held<T> {
    /// The cut whose release gives them (for a cut hold).
    to: Epoch,
    since_ms: u64,
    trip: bool,
    /// For a trip hold: the last trip cut that reached it since it tripped.
    trip_cut: Option<Epoch>,
    answers: Vec<T>,
}

impl<T> Default for AnswerHold<T> {
    fn default() -> Self {
        Self {
            held: None,
            trip_wanted: false,
        }
    }
}

impl<T> AnswerHold<T> {
    /// The hold of a pair whose agent (re)started in its group, admitting in `to`, the last
    /// cut it recorded: it may have switched at that cut just before it died, in a round
    /// still running, while another host admits in the epoch before. Its answers are held
    /// as for that cut, until a release at or past it or the timeout (counted from the
    /// start, after the round began).
    pub fn restarted(to: Epoch, now_ms: u64) -> Self {
        Self {
            held: Some(Held {
                to,
                since_ms: now_ms,
                trip: false,
                trip_cut: None,
                answers: Vec::new(),
            }),
            trip_wanted: false,
        }
    }

    /// The pair tripped and waits for its group's trip.
    pub fn trip_wanted(&self) -> bool {
        self.trip_wanted
    }

    /// Whether answers are held now.
    pub fn holding(&self) -> bool {
        self.held.is_some()
    }

    /// Holds `answer` if answers are held; else gives it back, to be given now.
    pub fn hold_or_give(&mut self, answer: T) -> Option<T> {
        match self.held.as_mut() {
            Some(held) => {
                held.answers.push(answer);
                None
            }
            None => Some(answer),
        }
    }

    /// The pair trips: `answers` (of the writes that were waiting for the DR side) and every
    /// later one are held until its group's trip.
    pub fn trip(&mut self, now_ms: u64, answers: impl IntoIterator<Item = T>) {
        self.trip_wanted = true;
        let held = self.held.get_or_insert_with(|| Held {
            to: Epoch::ZERO,
            since_ms: now_ms,
            trip: true,
            trip_cut: None,
            answers: Vec::new(),
        });
        if !held.trip {
            held.since_ms = now_ms;
        }
        held.trip = true;
        held.trip_cut = None;
        held.answers.extend(answers);
    }

    /// The group's cut to `to` in `mode` reached the host; it `switched` epochs at it (or was
    /// at `to` already, and the cut's release has not come: the production machine counts
    /// that as switching). A trip hold stays one (noting a trip cut); otherwise answers are
    /// held for this cut.
    pub fn on_cut(&mut self, to: Epoch, mode: CutMode, switched: bool, now_ms: u64) {
        if let Some(held) = self.held.as_mut().filter(|h| h.trip) {
            held.to = held.to.max(to);
            if mode == CutMode::Trip {
                held.trip_cut = Some(to);
            }
        } else if switched {
            let answers = self.held.take().map(|h| h.answers).unwrap_or_default();
            self.held = Some(Held {
                to,
                since_ms: now_ms,
                trip: false,
                trip_cut: None,
                answers,
            });
        }
    }

    /// The release of the cut to `to`, which ended as `outcome`: the answers it frees.
    pub fn on_release(&mut self, to: Epoch, outcome: RoundOutcome) -> Vec<T> {
        let released = |h: &mut Held<T>| match h.trip {
            true => outcome.tripped && h.trip_cut.is_some_and(|c| c <= to),
            false => h.to <= to,
        };
        match self.held.take_if(released) {
            Some(held) => {
                self.trip_wanted &= !held.trip;
                held.answers
            }
            None => Vec::new(),
        }
    }

    /// The answers of a cut hold older than `timeout_ms` (the coordinator is away).
    pub fn expire(&mut self, now_ms: u64, timeout_ms: u64) -> Vec<T> {
        let expired = |h: &mut Held<T>| !h.trip && now_ms.saturating_sub(h.since_ms) >= timeout_ms;
        self.held
            .take_if(expired)
            .map(|h| h.answers)
            .unwrap_or_default()
    }

    /// Every answer held (the pair left its group, or its host crashed): nothing is held
    /// after.
    pub fn give_all(&mut self) -> Vec<T> {
        self.trip_wanted = false;
        self.held.take().map(|h| h.answers).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRIPPED: RoundOutcome = RoundOutcome {
        tripped: true,
        synchronous: false,
    };

    #[test]
    fn a_cut_hold_goes_at_its_release_or_its_timeout() {
        let mut hold = AnswerHold::default();
        assert_eq!(hold.hold_or_give(1), Some(1), "nothing is held");
        hold.on_cut(Epoch(5), CutMode::Keep, false, 0);
        assert_eq!(
            hold.hold_or_give(2),
            Some(2),
            "a cut that did not switch holds nothing"
        );
        hold.on_cut(Epoch(6), CutMode::Keep, true, 10);
        assert_eq!(hold.hold_or_give(3), None);
        assert!(
            hold.on_release(Epoch(5), RoundOutcome::default())
                .is_empty()
        );
        assert_eq!(hold.on_release(Epoch(6), RoundOutcome::default()), vec![3]);
        hold.on_cut(Epoch(7), CutMode::Keep, true, 20);
        assert_eq!(hold.hold_or_give(4), None);
        assert!(hold.expire(99, 80).is_empty());
        assert_eq!(hold.expire(100, 80), vec![4]);
    }

    #[test]
    fn a_trip_hold_goes_only_at_a_completed_trip_that_reached_it() {
        let mut hold = AnswerHold::default();
        hold.on_cut(Epoch(5), CutMode::Keep, true, 0);
        assert_eq!(hold.hold_or_give(1), None);
        hold.trip(5, [2]);
        assert!(hold.trip_wanted());
        assert_eq!(hold.hold_or_give(3), None);
        // Not at the cut's release, nor a timeout, nor an epoch cut.
        assert!(
            hold.on_release(Epoch(5), RoundOutcome::default())
                .is_empty()
        );
        assert!(hold.expire(u64::MAX, 0).is_empty());
        hold.on_cut(Epoch(6), CutMode::Keep, true, 10);
        assert!(
            hold.on_release(Epoch(6), TRIPPED).is_empty(),
            "a trip it did not see"
        );
        // Not at an abandoned trip round.
        hold.on_cut(Epoch(7), CutMode::Trip, true, 20);
        assert!(
            hold.on_release(Epoch(7), RoundOutcome::default())
                .is_empty()
        );
        assert!(hold.trip_wanted());
        hold.on_cut(Epoch(8), CutMode::Trip, true, 30);
        assert_eq!(hold.on_release(Epoch(8), TRIPPED), vec![1, 2, 3]);
        assert!(!hold.trip_wanted());
        assert_eq!(hold.hold_or_give(4), Some(4));
    }

    #[test]
    fn tripping_again_forgets_the_trip_cut_seen() {
        let mut hold = AnswerHold::default();
        hold.trip(0, [1]);
        hold.on_cut(Epoch(3), CutMode::Trip, true, 0);
        hold.trip(1, [2]);
        assert!(hold.on_release(Epoch(3), TRIPPED).is_empty());
        hold.on_cut(Epoch(4), CutMode::Trip, true, 2);
        assert_eq!(hold.on_release(Epoch(4), TRIPPED), vec![1, 2]);
        hold.trip(3, [5]);
        assert_eq!(hold.give_all(), vec![5]);
        assert!(!hold.trip_wanted());
    }
}
