//! Verifying a drill volume (docs/POINT-IN-TIME.md, "Verifying a drill's content"): its
//! image at the point, under its overlay, read 64 KiB block by 64 KiB block and compared
//! with the CRC production had there, where a digest record tells it.

use std::sync::{Arc, Mutex};

use blockrep_core::ByteRange;
use blockrep_wire::DIGEST_BLOCK;

use super::DrillVolume;

/// Differing ranges listed at most (all are counted).
const MAX_LISTED: usize = 1000;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CheckState {
    /// Never run on this drill volume since the agent started.
    #[default]
    None,
    Running,
    Done,
    Failed,
}

impl CheckState {
    pub fn name(self) -> &'static str {
        match self {
            CheckState::None => "none",
            CheckState::Running => "running",
            CheckState::Done => "done",
            CheckState::Failed => "failed",
        }
    }
}

/// Blocks found one way, in order: their bytes, and the first of them as ranges (adjacent
/// blocks merged).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Blocks {
    pub bytes: u64,
    pub ranges: Vec<ByteRange>,
}

impl Blocks {
    fn add(&mut self, range: ByteRange) {
        self.bytes += range.len;
        if let Some(last) = self.ranges.last_mut()
            && last.end() == range.offset
        {
            *last = ByteRange::new(last.offset, last.len + range.len);
        } else if self.ranges.len() < MAX_LISTED {
            self.ranges.push(range);
        }
    }
}

/// How a drill volume's verification goes.
#[derive(Clone, Debug, Default)]
pub struct DrillCheck {
    pub state: CheckState,
    pub progress: f64,
    pub compared_bytes: u64,
    pub differing: Blocks,
    /// No record tells the block's content at the point.
    pub not_comparable: Blocks,
    pub error: String,
    /// When it ended (ms since the Unix epoch).
    pub finished_ms: u64,
}

/// Starts verifying `drill` on a thread of its own, unless a verification runs already.
pub fn start(drill: &Arc<DrillVolume>) -> std::io::Result<()> {
    {
        let mut check = drill.check.lock().unwrap_or_else(|e| e.into_inner());
        if check.state == CheckState::Running {
            return Ok(());
        }
        *check = DrillCheck {
            state: CheckState::Running,
            ..DrillCheck::default()
        };
    }
    let running = Arc::clone(drill);
    let spawned = std::thread::Builder::new()
        .name("drill-verify".into())
        .spawn(move || {
            let drill = running;
            let outcome = run(&drill, &drill.check);
            let mut check = drill.check.lock().unwrap_or_else(|e| e.into_inner());
            match outcome {
                Ok(()) => {
                    check.state = CheckState::Done;
                    check.progress = 1.0;
                }
                Err(e) => {
                    check.state = CheckState::Failed;
                    check.error = e.to_string();
                }
            }
            check.finished_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            tracing::info!(
                drill = %drill.record().drill,
                export = %drill.export(),
                state = check.state.name(),
                compared = check.compared_bytes,
                differing = check.differing.bytes,
                not_comparable = check.not_comparable.bytes,
                error = %check.error,
                "drill volume verified"
            );
        });
    if let Err(e) = spawned {
        let mut check = drill.check.lock().unwrap_or_else(|e| e.into_inner());
        check.state = CheckState::Failed;
        check.error = format!("cannot start the verification: {e}");
        return Err(e);
    }
    Ok(())
}

fn run(drill: &DrillVolume, check: &Mutex<DrillCheck>) -> std::io::Result<()> {
    let size = drill.size();
    let blocks = size.div_ceil(DIGEST_BLOCK);
    if let Some(why) = drill.lost() {
        return Err(std::io::Error::other(format!("the drill is lost: {why}")));
    }
    let mut buf = vec![0u8; DIGEST_BLOCK as usize];
    // Taken once: the records of a point do not change while the drill pins it.
    let digests = drill.expected_digests()?;
    for block in 0..blocks {
        let offset = block * DIGEST_BLOCK;
        let range = ByteRange::new(offset, DIGEST_BLOCK.min(size - offset));
        // A partial last block is never digested (its length changes with the volume's).
        let expected = (range.len == DIGEST_BLOCK)
            .then(|| digests.get(&block).copied())
            .flatten();
        if expected.is_some() {
            drill.read_point(range, &mut buf)?;
        }
        let data = &buf[..];
        let mut check = check.lock().unwrap_or_else(|e| e.into_inner());
        match expected {
            None => check.not_comparable.add(range),
            Some(crc) => {
                check.compared_bytes += range.len;
                if crc != crc32fast::hash(data) {
                    check.differing.add(range);
                }
            }
        }
        check.progress = (block + 1) as f64 / blocks as f64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_blocks_are_listed_as_one_range_and_the_list_is_bounded() {
        let mut blocks = Blocks::default();
        blocks.add(ByteRange::new(0, DIGEST_BLOCK));
        blocks.add(ByteRange::new(DIGEST_BLOCK, DIGEST_BLOCK));
        blocks.add(ByteRange::new(5 * DIGEST_BLOCK, 100));
        assert_eq!(
            blocks.ranges,
            vec![
                ByteRange::new(0, 2 * DIGEST_BLOCK),
                ByteRange::new(5 * DIGEST_BLOCK, 100)
            ]
        );
        assert_eq!(blocks.bytes, 2 * DIGEST_BLOCK + 100);
        for i in 0..2 * MAX_LISTED as u64 {
            blocks.add(ByteRange::new((10 + 2 * i) * DIGEST_BLOCK, DIGEST_BLOCK));
        }
        assert_eq!(blocks.ranges.len(), MAX_LISTED);
        assert_eq!(
            blocks.bytes,
            2 * DIGEST_BLOCK + 100 + 2 * MAX_LISTED as u64 * DIGEST_BLOCK
        );
    }
}
