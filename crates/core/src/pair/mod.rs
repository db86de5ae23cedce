//! The pair as one machine per side, built piece by piece (docs/PAIR-MACHINE.md): the parts
//! of a production link's state that do no I/O.

pub mod atomic_spans;
pub mod hold_times;
pub mod probes;
