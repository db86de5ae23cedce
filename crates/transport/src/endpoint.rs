//! The agent's QUIC endpoint: one UDP socket for every connection to and from other hosts,
//! mutual TLS under the cluster CA, ALPN `blockrep/1`.
//!
//! A peer opens a bidirectional stream per exchange. The first frame says what the stream
//! is for: a `Request` (a control call, answered by one `Response`) or a `Hello` (a pair's
//! replication stream, which stays open). The endpoint only moves frames, each with the
//! [`Peer`] that sent it as its certificate names it; what they mean, and whether that peer
//! may send them, is the [`Inbound`] handler's business.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockrep_api::proto::{ClusterRequest, ClusterResponse};
use blockrep_tls::{NodeTls, PeerIdentity};
use blockrep_wire::{ALPN, Frame, Hello};
use bytes::BytesMut;
use prost::Message;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, RecvStream, SendStream, TransportConfig, VarInt};

use crate::framed::{FrameReader, FrameWriter, StreamError};

/// How long a control call may take, connection included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A peer that sends nothing (not even keep-alives) for this long is gone, unless the
/// endpoint is given another timeout (`cluster.peer_timeout_ms`).
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest control message accepted.
const MAX_CONTROL_BYTES: usize = 16 << 20;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Who sent a stream: where from, and who its certificate says it is.
#[derive(Clone, Debug)]
pub struct Peer {
    pub address: SocketAddr,
    pub identity: PeerIdentity,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at {}", self.identity, self.address)
    }
}

/// What the endpoint hands the rest of the agent.
pub trait Inbound: Send + Sync + 'static {
    /// A control call from `peer`.
    fn request(&self, request: ClusterRequest, peer: Peer) -> BoxFuture<'_, ClusterResponse>;
    /// A replication stream opened by `peer` with `hello`.
    fn replication(&self, hello: Hello, peer: Peer, stream: ReplicationStream)
    -> BoxFuture<'_, ()>;
}

/// Why a peer's request or stream was refused, for the log and `requests_refused{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A role command or a term from a peer whose certificate is not a coordinator's.
    NotCoordinator,
    /// A report naming another node than the sender's certificate.
    WrongNode,
    /// A replication stream from another node than the pair's recorded peer.
    WrongPeer,
    /// A range or size that does not fit the volume.
    BadRange,
    /// A command of a coordinator term older than the highest the node has seen: from a
    /// coordinator that no longer leads.
    StaleTerm,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::NotCoordinator,
        Refusal::WrongNode,
        Refusal::WrongPeer,
        Refusal::BadRange,
        Refusal::StaleTerm,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotCoordinator => "not_coordinator",
            Refusal::WrongNode => "wrong_node",
            Refusal::WrongPeer => "wrong_peer",
            Refusal::BadRange => "bad_range",
            Refusal::StaleTerm => "stale_term",
        }
    }
}

/// A replication stream: frames both ways.
pub struct ReplicationStream {
    pub reader: FrameReader,
    pub writer: FrameWriter,
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] blockrep_tls::TlsError),
    #[error("QUIC configuration: {0}")]
    Config(String),
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("{addr} did not answer within {CALL_TIMEOUT:?}")]
    Timeout { addr: SocketAddr },
    #[error("talking to {addr}: {source}")]
    Stream {
        addr: SocketAddr,
        source: StreamError,
    },
    #[error("{addr} answered with something that is not a response")]
    BadResponse { addr: SocketAddr },
}

/// Counts what the endpoint refused.
#[derive(Debug, Default)]
pub struct EndpointCounters {
    /// Incoming connections whose TLS handshake failed (no certificate, or one another CA
    /// signed), and outgoing ones to peers whose certificate failed.
    pub peers_refused: AtomicU64,
    /// Streams whose first frame was malformed or unexpected.
    pub streams_refused: AtomicU64,
    /// Requests and streams of authenticated peers refused for what they asked, by reason.
    requests_refused: [AtomicU64; Refusal::ALL.len()],
}

impl EndpointCounters {
    /// Counts and logs a refusal of what `peer` asked.
    pub fn refuse(&self, peer: &Peer, reason: Refusal, what: &str) {
        self.requests_refused[reason as usize].fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = %peer, reason = reason.as_str(), "refused: {what}");
    }

    /// How many of `reason` were refused.
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.requests_refused[reason as usize].load(Ordering::Relaxed)
    }

    /// Every refusal, whatever the reason.
    pub fn refused_total(&self) -> u64 {
        Refusal::ALL.iter().map(|r| self.refused(*r)).sum()
    }
}

pub struct ClusterEndpoint {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    connections: Mutex<HashMap<(SocketAddr, String), Connection>>,
    pub counters: Arc<EndpointCounters>,
}

/// Socket buffers big enough for a fast stream's bursts. (Datagrams stay at quinn's
/// Ethernet-sized default: with segmentation offload that moved more than the 64 KiB
/// datagrams loopback allows, in this machine's measurements.)
const SOCKET_BUFFER: usize = 8 << 20;

/// How the endpoint's connections pace themselves (`cluster.congestion_control`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CongestionControl {
    /// quinn's default, loss-based: the fastest on a clean link.
    #[default]
    Cubic,
    /// Model-based (quinn's implementation is marked experimental): keeps its rate through
    /// random loss that makes Cubic back off.
    Bbr,
}

impl std::str::FromStr for CongestionControl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cubic" => Ok(Self::Cubic),
            "bbr" => Ok(Self::Bbr),
            other => Err(format!("{other:?} is not cubic or bbr")),
        }
    }
}

/// What an endpoint's connections are configured with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportSettings {
    /// A peer that sends nothing for this long is gone.
    pub peer_timeout: Duration,
    pub congestion: CongestionControl,
    /// The largest UDP payload path MTU discovery searches for, and that this endpoint
    /// accepts (see [`MAX_UDP_PAYLOAD`]).
    pub max_udp_payload: u16,
}

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            congestion: CongestionControl::default(),
            max_udp_payload: MAX_UDP_PAYLOAD,
        }
    }
}

/// The smallest UDP payload every QUIC path must carry.
pub const MIN_UDP_PAYLOAD: u16 = 1200;
/// The largest UDP payload path MTU discovery searches for, by default and at most. Each
/// connection starts at 1200 bytes and probes upwards (RFC 8899): on a 1500-byte Ethernet
/// path it settles near 1472, on a jumbo-frame path (9000 bytes) or loopback at this bound.
/// Much of a connection's cost is per packet (header protection, quinn's per-packet work,
/// the kernel's per-datagram work), so larger packets carry a byte for less CPU. The bound
/// is not 8952 (a 9000-byte frame over IPv6) because quinn sends up to ten packets in one
/// segmented UDP send, and the kernel takes at most 64 KiB in one: ten of 6500 fit.
pub const MAX_UDP_PAYLOAD: u16 = 6500;

/// What one stream may have in flight to the reader: a pair's replication stream is
/// read only as fast as its applier takes frames, so this is memory the DR agent holds for
/// a pair that falls behind. 16 MiB keeps a 10 Gbit/s link full up to 13 ms of round trip,
/// as the production side's send window does; more only held memory behind a slow applier.
const STREAM_RECEIVE_WINDOW: u32 = 16 << 20;
/// Data sent and not yet acknowledged, for the whole connection: memory the production
/// agent holds beside the journal (large payloads are shared with the journal, small ones
/// are copied into batches whose buffers hold at most twice their bytes; besides, each
/// stream's writer keeps the buffer it gathers in and up to four idle ones, 256 KiB each:
/// `framed`). 16 MiB keeps a 10 Gbit/s link full up to 13 ms of round trip,
/// and the agent within its journal bound plus 64 MiB.
const SEND_WINDOW: u64 = 16 << 20;

fn transport(settings: TransportSettings) -> TransportConfig {
    let peer_timeout = settings.peer_timeout;
    let mut t = TransportConfig::default();
    // Windows large enough to fill a fast link with one stream (quinn's perf tool does
    // the same).
    t.stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW));
    t.receive_window(VarInt::from_u32(64 << 20));
    t.send_window(SEND_WINDOW);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(settings.max_udp_payload);
    t.mtu_discovery_config(Some(mtu));
    if settings.congestion == CongestionControl::Bbr {
        t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    }
    t.max_concurrent_bidi_streams(VarInt::from_u32(1024));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    // Keep-alives often enough that a healthy but idle peer never looks gone.
    t.keep_alive_interval(Some(peer_timeout / 5));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(peer_timeout).expect("timeout checked by the config"),
    ));
    t
}

impl ClusterEndpoint {
    /// Binds `listen` and starts accepting: every connection's streams go to `inbound`.
    pub fn bind(
        listen: SocketAddr,
        tls: &NodeTls,
        inbound: Arc<dyn Inbound>,
        settings: TransportSettings,
    ) -> Result<Arc<Self>, EndpointError> {
        let transport = Arc::new(transport(settings));
        let server_tls = QuicServerConfig::try_from(tls.server_config(ALPN)?)
            .map_err(|e| EndpointError::Config(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_tls));
        server.transport_config(Arc::clone(&transport));
        let client = Self::client_config(tls, transport)?;
        let endpoint = new_endpoint(
            listen,
            Some(server),
            tls.stateless_reset_secret(),
            settings.max_udp_payload,
        )?;
        let this = Arc::new(Self {
            endpoint,
            client,
            connections: Mutex::new(HashMap::new()),
            counters: Arc::new(EndpointCounters::default()),
        });
        tokio::spawn(accept_loop(
            this.endpoint.clone(),
            Arc::clone(&this.counters),
            inbound,
        ));
        Ok(this)
    }

    /// An endpoint that only dials out (no listening), for tools.
    pub fn client_only(
        tls: &NodeTls,
        settings: TransportSettings,
    ) -> Result<Arc<Self>, EndpointError> {
        let client = Self::client_config(tls, Arc::new(transport(settings)))?;
        let any: SocketAddr = "0.0.0.0:0".parse().expect("valid address");
        let endpoint = new_endpoint(any, None, None, settings.max_udp_payload)?;
        Ok(Arc::new(Self {
            endpoint,
            client,
            connections: Mutex::new(HashMap::new()),
            counters: Arc::new(EndpointCounters::default()),
        }))
    }

    fn client_config(
        tls: &NodeTls,
        transport: Arc<TransportConfig>,
    ) -> Result<quinn::ClientConfig, EndpointError> {
        let client_tls = QuicClientConfig::try_from(tls.client_config(ALPN)?)
            .map_err(|e| EndpointError::Config(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_tls));
        client.transport_config(transport);
        Ok(client)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// A connection to `addr` whose certificate names `server_name`: the cached one while it
    /// lives, else a new one.
    pub async fn connection(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<Connection, CallError> {
        let key = (addr, server_name.to_owned());
        if let Some(c) = self.lock().get(&key)
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let connect_err = |reason: String| CallError::Connect { addr, reason };
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), addr, server_name)
            .map_err(|e| connect_err(e.to_string()))?;
        let connection = match tokio::time::timeout(CALL_TIMEOUT, connecting).await {
            Err(_) => return Err(CallError::Timeout { addr }),
            Ok(Err(e)) => {
                if is_tls_refusal(&e) {
                    self.counters.peers_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%addr, error = %e, "peer refused: TLS handshake failed");
                }
                return Err(connect_err(e.to_string()));
            }
            Ok(Ok(c)) => c,
        };
        self.lock().insert(key, connection.clone());
        Ok(connection)
    }

    /// Sends one control request and waits for its response.
    pub async fn call(
        &self,
        addr: SocketAddr,
        server_name: &str,
        request: &ClusterRequest,
    ) -> Result<ClusterResponse, CallError> {
        let exchange = async {
            let connection = self.connection(addr, server_name).await?;
            let stream_err = |source| CallError::Stream { addr, source };
            let (send, recv) = connection
                .open_bi()
                .await
                .map_err(|e| stream_err(StreamError::Connection(e.to_string())))?;
            let mut writer = FrameWriter::new(send);
            let mut reader = FrameReader::new(recv);
            writer
                .send(&Frame::Request(request.encode_to_vec().into()))
                .await
                .map_err(stream_err)?;
            writer.finish();
            match reader.next().await.map_err(stream_err)? {
                Some(Frame::Response(body)) if body.len() <= MAX_CONTROL_BYTES => {
                    ClusterResponse::decode(body).map_err(|_| CallError::BadResponse { addr })
                }
                _ => Err(CallError::BadResponse { addr }),
            }
        };
        match tokio::time::timeout(CALL_TIMEOUT, exchange).await {
            Ok(result) => {
                if result.is_err() {
                    self.forget(addr);
                }
                result
            }
            Err(_) => {
                self.forget(addr);
                Err(CallError::Timeout { addr })
            }
        }
    }

    /// Opens a replication stream to `addr` and sends `hello` on it.
    pub async fn open_replication(
        &self,
        addr: SocketAddr,
        server_name: &str,
        hello: Hello,
    ) -> Result<ReplicationStream, CallError> {
        let connection = self.connection(addr, server_name).await?;
        let stream_err = |source| CallError::Stream { addr, source };
        let (send, recv) = connection
            .open_bi()
            .await
            .map_err(|e| stream_err(StreamError::Connection(e.to_string())))?;
        let mut writer = FrameWriter::new(send);
        writer
            .send(&Frame::Hello(hello))
            .await
            .map_err(stream_err)?;
        Ok(ReplicationStream {
            reader: FrameReader::new(recv),
            writer,
        })
    }

    /// Drops the cached connections to `addr` (after a failed call, the next makes a new one).
    pub fn forget(&self, addr: SocketAddr) {
        self.lock().retain(|(a, _), _| *a != addr);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(SocketAddr, String), Connection>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes every connection and stops accepting.
    pub fn close(&self) {
        self.endpoint.close(VarInt::from_u32(0), b"shutting down");
    }
}

/// A quinn endpoint on its own UDP socket, with big socket buffers (forced past the system
/// limit where the process may), and stateless resets keyed by `reset_secret` if given (the
/// same after a restart: peers of the previous process are reset at once).
fn new_endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    reset_secret: Option<[u8; 32]>,
    max_udp_payload: u16,
) -> Result<quinn::Endpoint, EndpointError> {
    let bind_err = |source| EndpointError::Bind { addr, source };
    let socket = std::net::UdpSocket::bind(addr).map_err(bind_err)?;
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(&socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        // Not privileged: as much as the system allows.
        let _ = setsockopt(&socket, sockopt::RcvBuf, &SOCKET_BUFFER);
    }
    if setsockopt(&socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(&socket, sockopt::SndBuf, &SOCKET_BUFFER);
    }
    let mut config = match reset_secret {
        Some(secret) => restart_aware_config(&secret),
        None => quinn::EndpointConfig::default(),
    };
    config
        .max_udp_payload_size(max_udp_payload)
        .map_err(|e| EndpointError::Config(e.to_string()))?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| EndpointError::Config("no async runtime".into()))?;
    quinn::Endpoint::new(config, server, socket, runtime).map_err(bind_err)
}

/// An endpoint whose connection ids and stateless-reset tokens are derived from `secret`, so
/// a process restarted on the same address recognises its predecessor's connection ids and
/// resets them: a peer's next packet on such a connection (a call, a keep-alive) ends it at
/// once, instead of after the idle timeout.
fn restart_aware_config(secret: &[u8; 32]) -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        secret,
    )));
    let cid_key = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
        b"connection ids",
    );
    let cid_key = u64::from_le_bytes(cid_key.as_ref()[..8].try_into().expect("8 bytes"));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

/// Whether a connection failed because TLS refused the peer (not because it was away): its
/// transport error is one of the crypto range (0x100-0x1ff, a TLS alert), whichever side
/// raised it.
fn is_tls_refusal(e: &quinn::ConnectionError) -> bool {
    let crypto = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    match e {
        quinn::ConnectionError::TransportError(t) => crypto(t.code),
        quinn::ConnectionError::ConnectionClosed(c) => crypto(c.error_code),
        _ => false,
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    counters: Arc<EndpointCounters>,
    inbound: Arc<dyn Inbound>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let counters = Arc::clone(&counters);
        let inbound = Arc::clone(&inbound);
        tokio::spawn(async move {
            let address = incoming.remote_address();
            let connection = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    counters.peers_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = %address, error = %e, "refused a peer: TLS handshake failed");
                    return;
                }
            };
            // Who the peer is comes from the certificate the handshake verified, once.
            let identity = match identity_of(&connection) {
                Ok(identity) => identity,
                Err(e) => {
                    counters.peers_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = %address, error = %e, "refused a peer: its certificate names no node");
                    connection.close(VarInt::from_u32(1), b"certificate names no node");
                    return;
                }
            };
            let peer = Peer { address, identity };
            serve_connection(connection, peer, counters, inbound).await;
        });
    }
}

/// The identity in the certificate chain the peer of `connection` presented.
fn identity_of(connection: &Connection) -> Result<PeerIdentity, String> {
    let chain = connection
        .peer_identity()
        .ok_or("no certificate")?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| "not an X.509 certificate chain")?;
    PeerIdentity::of(&chain).map_err(|e| e.to_string())
}

async fn serve_connection(
    connection: Connection,
    peer: Peer,
    counters: Arc<EndpointCounters>,
    inbound: Arc<dyn Inbound>,
) {
    loop {
        let (send, recv) = match connection.accept_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "connection ended");
                return;
            }
        };
        let counters = Arc::clone(&counters);
        let inbound = Arc::clone(&inbound);
        let peer = peer.clone();
        tokio::spawn(async move {
            serve_stream(send, recv, peer, counters, inbound).await;
        });
    }
}

async fn serve_stream(
    send: SendStream,
    recv: RecvStream,
    peer: Peer,
    counters: Arc<EndpointCounters>,
    inbound: Arc<dyn Inbound>,
) {
    let mut reader = FrameReader::new(recv);
    let mut writer = FrameWriter::new(send);
    match reader.next().await {
        Ok(Some(Frame::Request(body))) => {
            let response = match ClusterRequest::decode(body) {
                Ok(request) => inbound.request(request, peer.clone()).await,
                Err(e) => {
                    counters.streams_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, error = %e, "malformed control request");
                    error_response(400, format!("malformed request: {e}"))
                }
            };
            let mut out = BytesMut::new();
            Frame::Response(response.encode_to_vec().into()).encode(&mut out);
            if let Err(e) = writer.send_bytes(out.freeze()).await {
                tracing::debug!(%peer, error = %e, "could not send a response");
            }
            writer.finish();
        }
        Ok(Some(Frame::Hello(hello))) => {
            inbound
                .replication(hello, peer, ReplicationStream { reader, writer })
                .await;
        }
        Ok(Some(other)) => {
            counters.streams_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, frame = ?frame_name(&other), "stream opened with an unexpected frame");
        }
        Ok(None) => {}
        Err(e) => {
            counters.streams_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, error = %e, "refused a stream");
        }
    }
}

fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Write(..) => "Write",
        Frame::Response(_) => "Response",
        _ => "other",
    }
}

/// A `ClusterResponse` carrying an error.
pub fn error_response(code: u32, message: String) -> ClusterResponse {
    ClusterResponse {
        response: Some(blockrep_api::proto::cluster_response::Response::Error(
            blockrep_api::proto::ClusterError { code, message },
        )),
        answered_for_project: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use blockrep_tls::TlsFiles;

    use super::*;

    /// Answers every call with an empty response.
    struct Quiet;

    impl Inbound for Quiet {
        fn request(&self, _: ClusterRequest, _: Peer) -> BoxFuture<'_, ClusterResponse> {
            Box::pin(async { ClusterResponse::default() })
        }

        fn replication(&self, _: Hello, _: Peer, _: ReplicationStream) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    /// Records who sent each call and stream, as the endpoint names them.
    #[derive(Default)]
    struct Recorder {
        seen: Mutex<Vec<(&'static str, PeerIdentity)>>,
    }

    impl Inbound for Recorder {
        fn request(&self, _: ClusterRequest, peer: Peer) -> BoxFuture<'_, ClusterResponse> {
            self.seen.lock().unwrap().push(("request", peer.identity));
            Box::pin(async { ClusterResponse::default() })
        }

        fn replication(&self, _: Hello, peer: Peer, _: ReplicationStream) -> BoxFuture<'_, ()> {
            self.seen
                .lock()
                .unwrap()
                .push(("replication", peer.identity));
            Box::pin(async {})
        }
    }

    /// A cluster CA in `dir`, and an agent's TLS identity signed by it for each node.
    fn agents<const N: usize>(dir: &std::path::Path, nodes: [&str; N]) -> [NodeTls; N] {
        let ca = dir.join("ca");
        blockrep_tls::init_ca(&ca).unwrap();
        nodes.map(|node| {
            let out = dir.join(node);
            blockrep_tls::issue_cert(&ca, node, blockrep_tls::CertRole::Agent, &out).unwrap();
            NodeTls::load(&TlsFiles::in_dir(&out)).unwrap()
        })
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    /// Takes link-test streams: checks their frames and drops the data.
    struct Sink;

    impl Inbound for Sink {
        fn request(&self, _: ClusterRequest, _: Peer) -> BoxFuture<'_, ClusterResponse> {
            Box::pin(async { ClusterResponse::default() })
        }

        fn replication(&self, _: Hello, _: Peer, stream: ReplicationStream) -> BoxFuture<'_, ()> {
            Box::pin(crate::link_test::sink(stream))
        }
    }

    /// Path MTU discovery takes a connection over loopback (MTU 65536) past Ethernet's
    /// 1472-byte payloads, up to the bound, and bulk data then goes in packets that large
    /// with none lost to an oversized send (quinn sends ten packets in one segmented UDP
    /// send, which the kernel refuses past 64 KiB). A peer that accepts at most 1472 bytes
    /// keeps the connection's packets within that.
    #[test]
    fn connections_carry_packets_as_large_as_both_sides_accept() {
        let dir = tempfile::tempdir().unwrap();
        let [server_tls, client_tls] = agents(dir.path(), ["node-x", "node-y"]);
        let rt = runtime();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let settings = |max_udp_payload| TransportSettings {
            max_udp_payload,
            ..Default::default()
        };
        // A server accepting at most `server_max`, and a client's connection to it once
        // discovery has taken it to at least `floor`.
        let connect = |server_max: u16, floor: u16| {
            let server = rt
                .block_on(async {
                    ClusterEndpoint::bind(any, &server_tls, Arc::new(Sink), settings(server_max))
                })
                .unwrap();
            let at = server.local_addr().unwrap();
            let client = rt
                .block_on(async { ClusterEndpoint::client_only(&client_tls, Default::default()) })
                .unwrap();
            let connection = rt.block_on(client.connection(at, "node-x")).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while connection.stats().path.current_mtu < floor {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the MTU stayed at {}, below {floor}",
                    connection.stats().path.current_mtu
                );
                rt.block_on(async { tokio::time::sleep(Duration::from_millis(10)).await });
            }
            (server, client, at, connection)
        };

        let (_server, client, at, connection) = connect(MAX_UDP_PAYLOAD, 1473);
        // The link test sends rounds of eight 1 MiB writes until its time is up: at least
        // one round, some 1300 packets in full sends of ten, whatever the machine's load.
        rt.block_on(crate::link_test::run(
            &client,
            at,
            "node-x",
            Duration::from_millis(300),
        ))
        .unwrap();
        let path = connection.stats().path;
        assert_eq!(path.black_holes_detected, 0);
        assert!(
            (1473..=MAX_UDP_PAYLOAD).contains(&path.current_mtu),
            "{}",
            path.current_mtu
        );

        // Discovery stops within 20 bytes of the bound (quinn's minimum change).
        let (_server, _client, _, connection) = connect(1472, 1452);
        let mtu = connection.stats().path.current_mtu;
        assert!(mtu <= 1472, "{mtu}");
    }

    /// Reads a stream's frames with large writes placed in memory of their own, and hands
    /// on each frame (or the error that ended the stream) with whether it was placed.
    struct Placing {
        frames: tokio::sync::mpsc::UnboundedSender<Result<(Frame, bool), String>>,
    }

    impl Inbound for Placing {
        fn request(&self, _: ClusterRequest, _: Peer) -> BoxFuture<'_, ClusterResponse> {
            Box::pin(async { ClusterResponse::default() })
        }

        fn replication(
            &self,
            _: Hello,
            _: Peer,
            mut stream: ReplicationStream,
        ) -> BoxFuture<'_, ()> {
            Box::pin(async move {
                loop {
                    let mut memory_at = None;
                    let next = stream
                        .reader
                        .next_placing(|header| {
                            (header.len >= 64 << 10).then(|| {
                                let memory = vec![0u8; header.len as usize];
                                memory_at = Some(memory.as_ptr().addr());
                                memory
                            })
                        })
                        .await;
                    // The frame's payload is the memory placed, not a copy of it.
                    let placed = matches!(&next, Ok(Some(Frame::Write(_, payload)))
                        if Some(payload.as_ptr().addr()) == memory_at);
                    match next {
                        Ok(Some(frame)) => {
                            let _ = self.frames.send(Ok((frame, placed)));
                        }
                        Ok(None) => return,
                        Err(e) => {
                            let _ = self.frames.send(Err(e.to_string()));
                            return;
                        }
                    }
                }
            })
        }
    }

    /// Writes received into memory the reader's caller placed arrive as they were sent,
    /// among other frames and small writes: those too large to arrive with their header
    /// are placed. A stream that ends inside a placed payload is an error.
    #[test]
    fn large_payloads_are_received_into_placed_memory_as_they_were_sent() {
        use blockrep_core::VolumeId;
        use blockrep_core::replication::{
            Epoch, GenerationId, Lineage, ReplicationModel, WriteSeq,
        };
        use blockrep_wire::{HelloFlags, ProtocolVersion, WriteFlags, WriteHeader};
        use bytes::Bytes;

        let dir = tempfile::tempdir().unwrap();
        let [server_tls, client_tls] = agents(dir.path(), ["node-x", "node-y"]);
        let rt = runtime();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (frames, mut received) = tokio::sync::mpsc::unbounded_channel();
        let server = rt
            .block_on(async {
                ClusterEndpoint::bind(
                    any,
                    &server_tls,
                    Arc::new(Placing { frames }),
                    Default::default(),
                )
            })
            .unwrap();
        let at = server.local_addr().unwrap();
        let client = rt
            .block_on(async { ClusterEndpoint::client_only(&client_tls, Default::default()) })
            .unwrap();
        let hello = Hello {
            version: ProtocolVersion::CURRENT,
            pair: crate::link_test::link_test_pair(),
            volume: VolumeId::from_bytes([0; 16]),
            size: 0,
            model: ReplicationModel::Hypermetro,
            node: "node-y".into(),
            lineage: Lineage::new(GenerationId(1)),
            flags: HelloFlags::default(),
        };
        let write = |seq: u64, len: usize| {
            let payload: Bytes = (0..len).map(|i| (i as u64 * 7 + seq) as u8).collect();
            let header = WriteHeader {
                flags: WriteFlags(WriteFlags::DIRECT),
                epoch: Epoch(1),
                seq: WriteSeq(seq),
                offset: seq << 24,
                len: len as u32,
                crc: blockrep_wire::payload_crc(&payload),
            };
            Frame::Write(header, payload)
        };
        let sent = vec![
            write(1, 4096),
            write(2, 1 << 20),
            Frame::Flush { seq: WriteSeq(3) },
            write(4, 100 << 10),
            write(5, 8192),
            write(6, 2 << 20),
            write(7, (1 << 20) + 13),
        ];
        let mut stream = rt
            .block_on(client.open_replication(at, "node-x", hello.clone()))
            .unwrap();
        let mut chunks = Vec::new();
        for frame in &sent {
            match frame {
                Frame::Write(header, payload) => {
                    stream
                        .writer
                        .push_write(header, payload.clone(), &mut chunks)
                }
                other => stream.writer.push_frame(other, &mut chunks),
            }
        }
        rt.block_on(stream.writer.send_chunks(&mut chunks)).unwrap();
        stream.writer.finish();
        let mut got = Vec::new();
        for _ in &sent {
            got.push(rt.block_on(received.recv()).unwrap().unwrap());
        }
        let (frames, placed): (Vec<Frame>, Vec<bool>) = got.into_iter().unzip();
        assert_eq!(frames, sent);
        // Larger than all the reader buffers behind a header: placed whatever the timing.
        assert!(placed[1] && placed[5] && placed[6], "{placed:?}");
        assert!(!placed[0] && !placed[2] && !placed[4], "{placed:?}");

        // A stream that ends halfway through a placed payload.
        let mut stream = rt
            .block_on(client.open_replication(at, "node-x", hello))
            .unwrap();
        let mut whole = BytesMut::new();
        write(8, 1 << 20).encode(&mut whole);
        rt.block_on(stream.writer.send_bytes(whole.freeze().slice(..600 << 10)))
            .unwrap();
        stream.writer.finish();
        let err = rt.block_on(received.recv()).unwrap().unwrap_err();
        assert!(err.contains("in the middle of a frame"), "{err}");
    }

    #[test]
    fn a_peer_restarted_on_its_address_resets_the_old_connection_at_the_next_call() {
        let dir = tempfile::tempdir().unwrap();
        let [peer_tls, caller_tls] = agents(dir.path(), ["node-x", "node-y"]);
        // A peer that stops answering is not given up on during the test: only a reset ends
        // the old connection.
        let settings = TransportSettings {
            peer_timeout: Duration::from_secs(60),
            ..TransportSettings::default()
        };
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let bind = |rt: &tokio::runtime::Runtime, tls: &NodeTls, at: SocketAddr| {
            rt.block_on(async { ClusterEndpoint::bind(at, tls, Arc::new(Quiet), settings) })
                .unwrap()
        };
        let caller_rt = runtime();
        let caller = bind(&caller_rt, &caller_tls, any);
        let peer_rt = runtime();
        let peer = bind(&peer_rt, &peer_tls, any);
        let addr = peer.local_addr().unwrap();
        let call = || caller_rt.block_on(caller.call(addr, "node-x", &ClusterRequest::default()));
        call().expect("the peer answers");

        // The peer's process dies (its tasks and socket are gone, no goodbye sent) and a new
        // one starts on the same address with the same identity.
        peer_rt.shutdown_timeout(Duration::from_secs(10));
        drop(peer);
        let restarted_rt = runtime();
        let _restarted = bind(&restarted_rt, &peer_tls, addr);

        let err = call().expect_err("the old connection is gone");
        assert!(err.to_string().contains("reset"), "{err}");
        call().expect("the next call connects to the new process");
    }

    #[test]
    fn a_peer_is_known_by_its_certificate_and_only_a_coordinators_answers_to_the_coordinators_name()
    {
        use blockrep_core::VolumeId;
        use blockrep_core::replication::{GenerationId, Lineage, ReplicationModel};
        use blockrep_tls::{COORDINATOR_NAME, CertRole};
        use blockrep_wire::{HelloFlags, ProtocolVersion};

        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        blockrep_tls::init_ca(&ca).unwrap();
        let identity = |node: &str, role| {
            let out = dir.path().join(node);
            blockrep_tls::issue_cert(&ca, node, role, &out).unwrap();
            NodeTls::load(&TlsFiles::in_dir(&out)).unwrap()
        };
        let agent = identity("node-a", CertRole::Agent);
        let coordinator = identity("node-co", CertRole::Coordinator);
        let rt = runtime();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let recorder = Arc::new(Recorder::default());
        let bind = |tls: &NodeTls, inbound: Arc<dyn Inbound>| {
            rt.block_on(async { ClusterEndpoint::bind(any, tls, inbound, Default::default()) })
                .unwrap()
        };
        let server = bind(&identity("node-x", CertRole::Agent), recorder.clone());
        let at = server.local_addr().unwrap();

        // Calls and streams whose messages name another node are known by the certificate.
        let lying_report = ClusterRequest {
            request: Some(blockrep_api::proto::cluster_request::Request::Report(
                blockrep_api::proto::NodeReport {
                    node: "node-co".into(),
                    ..Default::default()
                },
            )),
            scope: None,
            leader_term: 0,
        };
        let lying_hello = Hello {
            version: ProtocolVersion::CURRENT,
            pair: crate::link_test::link_test_pair(),
            volume: VolumeId::from_bytes([0; 16]),
            size: 0,
            model: ReplicationModel::Async,
            node: "node-co".into(),
            lineage: Lineage::new(GenerationId(1)),
            flags: HelloFlags::default(),
        };
        let caller = rt
            .block_on(async { ClusterEndpoint::client_only(&agent, Default::default()) })
            .unwrap();
        rt.block_on(caller.call(at, "node-x", &lying_report))
            .unwrap();
        // The stream ends once the server has taken it (the recorder drops it at once).
        let mut stream = rt
            .block_on(caller.open_replication(at, "node-x", lying_hello))
            .unwrap();
        let _ = rt.block_on(stream.reader.next());
        let coordinator_caller = rt
            .block_on(async { ClusterEndpoint::client_only(&coordinator, Default::default()) })
            .unwrap();
        rt.block_on(coordinator_caller.call(at, "node-x", &lying_report))
            .unwrap();
        let node = |name: &str, role| PeerIdentity {
            node: name.into(),
            role,
        };
        assert_eq!(
            *recorder.seen.lock().unwrap(),
            vec![
                ("request", node("node-a", CertRole::Agent)),
                ("replication", node("node-a", CertRole::Agent)),
                ("request", node("node-co", CertRole::Coordinator)),
            ]
        );

        // Dialled by the coordinator's name, only a coordinator's certificate answers.
        let err = rt
            .block_on(caller.call(at, COORDINATOR_NAME, &ClusterRequest::default()))
            .expect_err("an agent posing as the coordinator");
        assert!(matches!(err, CallError::Connect { .. }), "{err}");
        assert_eq!(
            caller.counters.peers_refused.load(Ordering::Relaxed),
            1,
            "counted: {err}"
        );
        let real = bind(&coordinator, Arc::new(Quiet));
        rt.block_on(caller.call(
            real.local_addr().unwrap(),
            COORDINATOR_NAME,
            &ClusterRequest::default(),
        ))
        .expect("the coordinator answers to its name");
    }
}
