//! The control API: generated gRPC code in [`proto`], validated requests in [`model`], and
//! the unix-socket plumbing both ends use.

pub mod model;

pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("blockrep.v1");
}

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

pub use model::ApiError;

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/blockrep/control.sock";

/// The control socket could not be reached: one line naming the socket, the cause once,
/// and what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach blockrepd at {}: {cause}; {hint}", path.display())]
pub struct ConnectError {
    pub path: PathBuf,
    pub cause: String,
    pub hint: &'static str,
}

impl ConnectError {
    fn new(path: &Path, error: &tonic::transport::Error) -> Self {
        // The transport error wraps the socket's error in layers that repeat it: report the
        // innermost cause only.
        let mut innermost: &(dyn std::error::Error + 'static) = error;
        while let Some(source) = innermost.source() {
            innermost = source;
        }
        let kind = innermost
            .downcast_ref::<std::io::Error>()
            .map(std::io::Error::kind);
        let hint = match kind {
            Some(std::io::ErrorKind::PermissionDenied) => {
                "the socket is open to root and the blockrep group: run as root or join the group (usermod -aG blockrep USER)"
            }
            _ => {
                "is blockrepd running? start it with `systemctl start blockrepd`, or give --socket (or BLOCKREP_SOCKET)"
            }
        };
        Self {
            path: path.to_owned(),
            cause: innermost.to_string(),
            hint,
        }
    }
}

/// Connects a client to the daemon's control socket.
pub async fn connect(
    path: &Path,
) -> Result<proto::agent_client::AgentClient<Channel>, ConnectError> {
    let socket = path.to_owned();
    // The URI is required by the API but unused: every connection goes to the socket.
    let channel = Endpoint::from_static("http://blockrepd.local")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(socket)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .map_err(|e| ConnectError::new(path, &e))?;
    Ok(proto::agent_client::AgentClient::new(channel))
}

/// A size given as bytes (`4096`) or with a binary suffix (`4KiB`, `4MiB`, `4GiB`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 4096, \"4KiB\" or \"4MiB\""))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" | "K" => 10,
        "MiB" | "M" => 20,
        "GiB" | "G" => 30,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}; use B, KiB, MiB or GiB"
            ));
        }
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// `1.5 GiB`-style sizes.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// REST API tokens: made by the coordinator, kept only as their SHA-256.
pub mod token {
    use ring::rand::SecureRandom;

    /// What every secret starts with, so a leaked one is recognisable in a scan.
    pub const PREFIX: &str = "brt_";

    /// A new secret: the prefix and 32 random bytes, hex.
    pub fn new_secret() -> Result<String, String> {
        let mut bytes = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| "the system's random source failed".to_owned())?;
        Ok(format!("{PREFIX}{}", hex(&bytes)))
    }

    /// The SHA-256 of a secret as the coordinator keeps it, hex.
    pub fn sha256(secret: &str) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
    }

    fn hex(bytes: &[u8]) -> String {
        use std::fmt::Write;
        bytes.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn secrets_are_new_each_time_and_hash_as_sha256() {
            let (a, b) = (super::new_secret().unwrap(), super::new_secret().unwrap());
            assert_ne!(a, b);
            assert!(a.starts_with(super::PREFIX) && a.len() == 4 + 64, "{a}");
            // SHA-256 of "abc" (FIPS 180-2, appendix B.1).
            assert_eq!(
                super::sha256("abc"),
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
            );
        }
    }
}

/// The active-active domain of two availability zones (SDRS): the same id whichever order
/// the zones are named in, and on every coordinator.
pub fn domain_id(zone_a: &str, zone_b: &str) -> String {
    let (a, b) = if zone_a <= zone_b {
        (zone_a, zone_b)
    } else {
        (zone_b, zone_a)
    };
    let digest = token::sha256(&format!("blockrep-domain\0{a}\0{b}"));
    format!(
        "{}-{}-{}-{}-{}",
        &digest[0..8],
        &digest[8..12],
        &digest[12..16],
        &digest[16..20],
        &digest[20..32]
    )
}

#[cfg(test)]
mod domain_tests {
    #[test]
    fn a_domain_is_the_same_in_either_order_and_differs_between_zones() {
        assert_eq!(
            super::domain_id("az1", "az2"),
            super::domain_id("az2", "az1")
        );
        assert_ne!(
            super::domain_id("az1", "az2"),
            super::domain_id("az1", "az3")
        );
        assert_eq!(super::domain_id("az1", "az2").len(), 36);
    }
}
