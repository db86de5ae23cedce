//! The NBD server of blockrep: the fixed-newstyle handshake and an io_uring transmission loop.
//!
//! [`serve`] runs one client connection to completion on the calling thread.

mod device;
mod handshake;
mod merge;
pub mod proto;
mod transmission;

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

pub use device::{BlockDevice, Export, serve_device};
pub use handshake::{
    BLOCK_SIZES, ExportSet, HandshakeError, Negotiated, Outcome, TRANSMISSION_FLAGS, negotiate,
};
pub use transmission::{Connection, ConnectionStats};

/// How long a client may take over each step of the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// A client's socket.
pub enum ClientStream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("transmission: {0}")]
    Io(#[from] io::Error),
}

/// What a finished connection served.
pub struct Served {
    pub export: Option<String>,
    pub stats: ConnectionStats,
}

/// Runs a client connection: handshake, then transmission until it disconnects.
pub fn serve(stream: ClientStream, exports: &dyn ExportSet) -> Result<Served, ServeError> {
    let outcome = match &stream {
        ClientStream::Unix(s) => {
            s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
            s.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
            negotiate(&mut &*s, exports)?
        }
        ClientStream::Tcp(s) => {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
            s.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
            negotiate(&mut &*s, exports)?
        }
    };
    let Outcome::Transmit(export, negotiated) = outcome else {
        return Ok(Served {
            export: None,
            stats: ConnectionStats::default(),
        });
    };
    let fd = match &stream {
        ClientStream::Unix(s) => s.as_raw_fd(),
        ClientStream::Tcp(s) => s.as_raw_fd(),
    };
    match &stream {
        ClientStream::Unix(s) => {
            s.set_read_timeout(None)?;
            s.set_write_timeout(None)?;
        }
        ClientStream::Tcp(s) => {
            s.set_read_timeout(None)?;
            s.set_write_timeout(None)?;
        }
    }
    let volume = match export {
        Export::Volume(volume) => volume,
        Export::Device(device) => {
            let served = match &stream {
                ClientStream::Unix(s) => {
                    serve_device(&mut &*s, s.try_clone()?, &*device, negotiated)?
                }
                ClientStream::Tcp(s) => {
                    serve_device(&mut &*s, s.try_clone()?, &*device, negotiated)?
                }
            };
            return Ok(Served {
                export: Some(device.name().to_owned()),
                stats: ConnectionStats {
                    requests: served,
                    ..ConnectionStats::default()
                },
            });
        }
    };
    let client = volume.connect_client();
    let export = Some(volume.name().to_owned());
    let stats = Connection::new(fd, volume, negotiated)?.run()?;
    drop(client);
    drop(stream);
    Ok(Served { export, stats })
}
