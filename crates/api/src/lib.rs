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

#[derive(Debug, thiserror::Error)]
#[error("cannot reach blockrepd at {path}: {source}")]
pub struct ConnectError {
    pub path: PathBuf,
    pub source: tonic::transport::Error,
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
        .map_err(|source| ConnectError {
            path: path.to_owned(),
            source,
        })?;
    Ok(proto::agent_client::AgentClient::new(channel))
}
