//! NBD client connections: one thread each, tracked so shutdown can drain them.

use std::collections::HashMap;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use blockrep_nbd::{ClientStream, ExportSet};

/// A duplicate of a client's socket, kept to end its input at shutdown.
enum SocketHandle {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl SocketHandle {
    fn of(stream: &ClientStream) -> std::io::Result<Self> {
        Ok(match stream {
            ClientStream::Unix(s) => SocketHandle::Unix(s.try_clone()?),
            ClientStream::Tcp(s) => SocketHandle::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) {
        // The client may be gone already; nothing to do then.
        let _ = match self {
            SocketHandle::Unix(s) => s.shutdown(how),
            SocketHandle::Tcp(s) => s.shutdown(how),
        };
    }
}

#[derive(Default)]
pub struct Connections {
    next_id: AtomicU64,
    /// Live connections by id; a thread removes its own entry when it ends.
    live: Mutex<HashMap<u64, SocketHandle>>,
    ended: Condvar,
}

impl Connections {
    /// Serves `stream` on a thread of its own.
    pub fn spawn(
        self: &Arc<Self>,
        stream: ClientStream,
        exports: Arc<dyn ExportSet>,
        peer: String,
    ) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let socket = match SocketHandle::of(&stream) {
            Ok(socket) => socket,
            Err(e) => {
                tracing::error!(%peer, error = %e, "cannot track connection; dropping it");
                return;
            }
        };
        self.lock().insert(id, socket);
        let registry = Arc::clone(self);
        let thread_peer = peer.clone();
        let spawned = std::thread::Builder::new().name(format!("nbd-conn-{id}")).spawn(move || {
            let span = tracing::info_span!("nbd", conn = id, peer = %thread_peer);
            let _enter = span.enter();
            match blockrep_nbd::serve(stream, exports.as_ref()) {
                Ok(served) => {
                    if let Some(export) = served.export {
                        let s = served.stats;
                        tracing::info!(%export, requests = s.requests, rejected = s.rejected,
                            bytes_read = s.bytes_read, bytes_written = s.bytes_written,
                            protocol_error = s.protocol_error.unwrap_or("none"), "client disconnected");
                    }
                }
                Err(e) => tracing::info!(error = %e, "connection ended"),
            }
            registry.lock().remove(&id);
            registry.ended.notify_all();
        });
        if let Err(e) = spawned {
            tracing::error!(%peer, error = %e, "cannot start connection thread");
            self.lock().remove(&id);
        }
    }

    /// Ends every client's input and waits until each has finished its requests in flight
    /// and sent their replies. A client that does not take its replies within `grace` is cut
    /// off (its writes in flight still complete). Call once nothing accepts new connections.
    pub fn drain(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        let mut live = self.lock();
        for socket in live.values() {
            socket.shutdown(Shutdown::Read);
        }
        let mut cut_off = false;
        while !live.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() && !cut_off {
                tracing::warn!(
                    clients = live.len(),
                    "clients not taking their replies; disconnecting them"
                );
                for socket in live.values() {
                    socket.shutdown(Shutdown::Both);
                }
                cut_off = true;
            }
            let wait = if cut_off {
                Duration::from_secs(1)
            } else {
                left
            };
            live = self
                .ended
                .wait_timeout(live, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, SocketHandle>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}
