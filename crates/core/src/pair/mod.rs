//! The pair as one machine per side (docs/PAIR-MACHINE.md): [`production::Production`]
//! makes every decision of a pair's production side, and the pieces it is made of.

pub mod atomic_spans;
pub mod dr;
pub mod dr_side;
pub mod hold_times;
pub mod probes;
pub mod production;
pub mod state;
