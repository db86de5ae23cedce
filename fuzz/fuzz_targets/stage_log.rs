//! The stage log's record reader, as an agent runs it at start-up over what a crash left:
//! any bytes give records, a torn tail or a corruption error, never a panic, and never a
//! range that wraps.
#![no_main]

use blockrep_core::replication::Epoch;
use blockrep_replication::stage_log;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((ranges, _seals)) = stage_log::parse(data, Epoch::ZERO) {
        for range in ranges {
            assert!(range.offset.checked_add(range.len).is_some());
        }
    }
});
