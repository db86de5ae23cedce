//! Seeded simulation of a hypermetro consistency group's trip and way back (docs/GROUPS.md,
//! "Hypermetro: the group trip and the way back"), driving the machines the agents and the
//! coordinator run; the harness is `sim::group` (what it drives, the faults, the checks).
//! Each mutation check switches on one deliberate bug (`Broken`) and must be caught.
//! A failure prints its seed; `BLOCKREP_SEED=n` replays one, `BLOCKREP_SIM_SEEDS` sets how
//! many run, `BLOCKREP_TRACE` prints the events.

use blockrep_core::replication::ReplicationModel;
use sim::group::{Broken, Sim};

mod sim;

#[test]
fn a_hypermetro_group_stays_a_crash_image_through_trips_and_goes_synchronous_again() {
    let (mut answered, mut abandoned, mut mid_unit) = (0, 0, 0);
    for seed in sim::seeds(300) {
        let mut sim = Sim::new(seed, ReplicationModel::Hypermetro, Broken::Nothing);
        if let Err(e) = sim.run() {
            panic!("seed {seed} (replay with BLOCKREP_SEED={seed}): {e}");
        }
        answered += sim.answered();
        abandoned += sim.abandoned_cuts();
        mid_unit += sim.cuts_mid_unit();
    }
    eprintln!(
        "{answered} records answered; {abandoned} cuts abandoned; {mid_unit} DR power cuts mid-unit"
    );
}

/// Runs seeds with `broken` until one fails: the seed and what caught it.
fn caught(broken: Broken) -> (u64, String) {
    for seed in 0..300 {
        if let Err(e) = Sim::new(seed, ReplicationModel::Hypermetro, broken).run() {
            eprintln!("{broken:?} caught by BLOCKREP_SEED={seed}: {e}");
            return (seed, e);
        }
    }
    panic!("300 seeds did not catch {broken:?}");
}

/// A DR side that writes gated direct writes at once (before the group committed what came
/// before them) lets a failover hold a write whose predecessor it lacks.
#[test]
fn writing_gated_writes_at_once_is_caught() {
    let (_, e) = caught(Broken::IgnoreGate);
    assert!(e.contains("would hold chain"), "{e}");
}

/// A production host that restarts and journals while its group's other pairs still write
/// their DR sides directly.
#[test]
fn a_restart_that_does_not_trip_is_caught() {
    let (_, e) = caught(Broken::StartUntripped);
    assert!(e.contains("would hold chain"), "{e}");
}

/// A trip hold given at the release of an abandoned trip round: a host that missed the trip
/// cut may still write its DR side directly.
#[test]
fn giving_a_trip_hold_at_an_abandoned_round_is_caught() {
    let (_, e) = caught(Broken::TripOnAnyRelease);
    assert!(e.contains("would hold chain"), "{e}");
}

/// A DR side that writes a direct write after an `Ungate` before the epochs it names are
/// applied.
#[test]
fn writing_after_an_ungate_at_once_is_caught() {
    let (_, e) = caught(Broken::WriteAfterUngateAtOnce);
    assert!(e.contains("would hold chain"), "{e}");
}

/// A restarted coordinator that does not cut a synchronous group until its first commit
/// leaves DR sides holding gated direct writes until the peer timeout ends their streams.
#[test]
fn a_coordinator_restart_that_forgets_the_direct_cut_is_caught() {
    let (_, e) = caught(Broken::RestartForgetsDirect);
    assert!(e.contains("while the group was synchronous"), "{e}");
}

/// A DR side that answers a direct write before a sync covers it: the block is clean at
/// production, and a power cut takes it from the DR side.
#[test]
fn an_answer_before_the_sync_is_caught() {
    let (_, e) = caught(Broken::AckBeforeSync);
    assert!(e.contains("is clean at production"), "{e}");
}
