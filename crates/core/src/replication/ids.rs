//! Identifiers of replication, each a newtype with `Display`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(uuid::Uuid);

        impl $name {
            pub fn random() -> Self {
                Self(uuid::Uuid::new_v4())
            }

            pub const fn from_uuid(id: uuid::Uuid) -> Self {
                Self(id)
            }

            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }

            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(uuid::Uuid::from_bytes(bytes))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                uuid::Uuid::parse_str(s).map(Self)
            }
        }

        const _: &str = $prefix;
    };
}

uuid_id!(
    /// A replication pair.
    PairId,
    "pair"
);
uuid_id!(
    /// A replication consistency group.
    GroupId,
    "group"
);
uuid_id!(
    /// A long operation (create, sync, delete, ...) kept in the coordinator's store.
    JobId,
    "job"
);

/// An async epoch: the writes admitted between two cuts. Epoch 0 is "before any".
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    pub const ZERO: Epoch = Epoch(0);

    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "epoch {}", self.0)
    }
}

/// A number that keys one thing, shown with `$noun` before it.
macro_rules! number_id {
    ($(#[$doc:meta])* $name:ident, $noun:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($noun, " {}"), self.0)
            }
        }
    };
}

number_id!(
    /// The order in which a volume admitted its writes (overlapping writes are admitted one
    /// after the other, so for every block this orders its writes).
    WriteSeq,
    "write"
);
number_id!(
    /// A connection's key for a write or flush whose answer may wait for the DR side: the
    /// link gives it back to the connection when the answer may go.
    AnswerToken,
    "answer"
);
number_id!(
    /// An online verify probe, from its production side's point of view: the key of its
    /// `Verified` answer.
    ProbeId,
    "probe"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text_and_bytes() {
        let id = PairId::random();
        assert_eq!(id.to_string().parse::<PairId>().unwrap(), id);
        assert_eq!(PairId::from_bytes(*id.as_bytes()), id);
        assert_eq!(Epoch(3).next(), Epoch(4));
        assert_eq!(Epoch(7).to_string(), "epoch 7");
        assert_eq!(WriteSeq(3).to_string(), "write 3");
        assert_eq!(ProbeId(4).to_string(), "probe 4");
        assert_eq!(AnswerToken(5).to_string(), "answer 5");
    }
}
