//! Identifiers, each a newtype with `Display`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A volume's UUID, assigned when it is registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VolumeId(uuid::Uuid);

impl VolumeId {
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

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for VolumeId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(Self)
    }
}

/// A volume's operator-given name; it is also the NBD export name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeName(String);

pub const MAX_NAME_BYTES: usize = 255;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is {len} bytes long; the limit is {MAX_NAME_BYTES}")]
    TooLong { len: usize },
    #[error("name {name:?} has {bad:?}; use letters, digits, '.', '_' and '-' only")]
    BadCharacter { name: String, bad: char },
    #[error("name {name:?} must start with a letter or a digit")]
    BadStart { name: String },
    #[error("name {name:?} looks like a UUID; UUIDs are reserved for ids")]
    LooksLikeId { name: String },
}

impl VolumeName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for VolumeName {
    type Error = NameError;
    fn try_from(name: String) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(NameError::TooLong { len: name.len() });
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(NameError::BadCharacter { name, bad });
        }
        if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(NameError::BadStart { name });
        }
        if uuid::Uuid::parse_str(&name).is_ok() {
            return Err(NameError::LooksLikeId { name });
        }
        Ok(Self(name))
    }
}

impl FromStr for VolumeName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::try_from(s.to_owned())
    }
}

impl From<VolumeName> for String {
    fn from(name: VolumeName) -> String {
        name.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!("vol-1.a_b".parse::<VolumeName>().is_ok());
        assert_eq!("".parse::<VolumeName>(), Err(NameError::Empty));
        assert!(matches!(
            "a/b".parse::<VolumeName>(),
            Err(NameError::BadCharacter { bad: '/', .. })
        ));
        assert!(matches!(
            "-x".parse::<VolumeName>(),
            Err(NameError::BadStart { .. })
        ));
        assert!(matches!(
            "x".repeat(256).parse::<VolumeName>(),
            Err(NameError::TooLong { len: 256 })
        ));
        let id = VolumeId::random().to_string();
        assert!(matches!(
            id.parse::<VolumeName>(),
            Err(NameError::LooksLikeId { .. })
        ));
    }

    #[test]
    fn volume_id_round_trips_through_text() {
        let id = VolumeId::random();
        assert_eq!(id.to_string().parse::<VolumeId>().unwrap(), id);
    }
}
