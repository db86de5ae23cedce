//! How a volume's writes reach its backing device.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The page-cache policy of a volume, as qemu's `cache=none` / `cache=writeback`.
///
/// Either way a write is durable on the device once a FLUSH (or FUA) that covers it has been
/// answered, and the dirty map covers it before it is submitted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// `O_DIRECT`: a write is on the device when it is answered (cached only by the device).
    #[default]
    Direct,
    /// Through the host page cache: writes are answered once in memory, written back by the
    /// kernel and made durable by FLUSH or FUA.
    Writeback,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cache mode {0:?} is not one of: direct, writeback")]
pub struct UnknownCacheMode(pub String);

impl FromStr for CacheMode {
    type Err = UnknownCacheMode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "direct" => Ok(CacheMode::Direct),
            "writeback" => Ok(CacheMode::Writeback),
            other => Err(UnknownCacheMode(other.to_owned())),
        }
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CacheMode::Direct => "direct",
            CacheMode::Writeback => "writeback",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for mode in [CacheMode::Direct, CacheMode::Writeback] {
            assert_eq!(mode.to_string().parse::<CacheMode>(), Ok(mode));
        }
        assert_eq!(
            "none".parse::<CacheMode>(),
            Err(UnknownCacheMode("none".into()))
        );
    }
}
