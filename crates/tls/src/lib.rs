//! The cluster's certificates and the TLS configurations built from them.
//!
//! One cluster CA signs a certificate per node. Every connection between hosts is mutual
//! TLS 1.3 under that CA: a server accepts only clients presenting a certificate the CA
//! signed, and a client accepts only servers presenting one for the name it dialled (the
//! peer's node name, or [`COORDINATOR_NAME`] when dialling the coordinator by address).
//!
//! A certificate says who its holder is, and whether it may act as the coordinator: its
//! node name is its one DNS name other than [`COORDINATOR_NAME`]; a coordinator's
//! certificate (`issue-cert --coordinator`) carries [`COORDINATOR_NAME`] too. A peer is
//! known by its certificate ([`PeerIdentity::of`]), never by what its messages say.
//!
//! Files, as `blockrep cluster init-ca` and `issue-cert` write them:
//!
//! - CA directory: `ca.pem`, `ca.key` (mode 0600).
//! - Node directory: `node.pem`, `node.key` (mode 0600), `ca.pem`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// The name only a coordinator's certificate carries besides its node's own: what a client
/// dials when it knows only the coordinator's address, and the mark of the one peer whose
/// role commands and terms agents obey.
pub const COORDINATOR_NAME: &str = "blockrep.coordinator";

/// What a certificate may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertRole {
    /// A node of the cluster: it replicates, reports itself, and forwards its operator's
    /// calls to the coordinator.
    Agent,
    /// A node that may also run the coordinator: agents obey its role commands and terms.
    Coordinator,
}

/// Who a peer is, from its certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    pub node: String,
    pub role: CertRole,
}

impl PeerIdentity {
    /// The identity a peer's certificate chain (as the TLS handshake verified it) shows.
    pub fn of(chain: &[CertificateDer<'_>]) -> Result<Self, TlsError> {
        let leaf = chain
            .first()
            .ok_or_else(|| TlsError::Identity("the peer presented no certificate".into()))?;
        let cert = webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| TlsError::Identity(format!("the peer's certificate: {e}")))?;
        let names: Vec<&str> = cert.valid_dns_names().collect();
        let coordinator = names.contains(&COORDINATOR_NAME);
        let mut nodes = names.iter().filter(|n| **n != COORDINATOR_NAME);
        let node = match (nodes.next(), nodes.next()) {
            (Some(node), None) => (*node).to_owned(),
            _ => {
                return Err(TlsError::Identity(format!(
                    "the peer's certificate names {names:?}, not exactly one node"
                )));
            }
        };
        Ok(Self {
            node,
            role: if coordinator {
                CertRole::Coordinator
            } else {
                CertRole::Agent
            },
        })
    }

    pub fn is_coordinator(&self) -> bool {
        self.role == CertRole::Coordinator
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.role {
            CertRole::Agent => write!(f, "{}", self.node),
            CertRole::Coordinator => write!(f, "{} (coordinator)", self.node),
        }
    }
}

const CA_COMMON_NAME: &str = "blockrep cluster CA";
const CA_VALID_DAYS: i64 = 3650;
const NODE_VALID_DAYS: i64 = 825;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists; remove it first or use another directory")]
    Exists { path: PathBuf },
    #[error("{path}: not a PEM {what}: {reason}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("node name {0:?} must be 1 to 63 letters, digits, '.', '_' or '-'")]
    BadNodeName(String),
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("peer identity: {0}")]
    Identity(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates a new cluster CA in `dir`: `ca.pem` and `ca.key`. Refuses to overwrite.
pub fn init_ca(dir: &Path) -> Result<PathBuf, TlsError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(TlsError::Exists { path: path.clone() });
        }
    }
    let key = KeyPair::generate()?;
    let cert = ca_params()?.self_signed(&key)?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_public(&cert_path, cert.pem().as_bytes())?;
    Ok(cert_path)
}

/// Issues a certificate for `node` with `role`, signed by the CA in `ca_dir`, into
/// `out_dir`: `node.pem`, `node.key` and a copy of `ca.pem`.
pub fn issue_cert(
    ca_dir: &Path,
    node: &str,
    role: CertRole,
    out_dir: &Path,
) -> Result<PathBuf, TlsError> {
    if node == COORDINATOR_NAME {
        return Err(TlsError::BadNodeName(node.to_owned()));
    }
    if node.is_empty()
        || node.len() > 63
        || !node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(TlsError::BadNodeName(node.to_owned()));
    }
    let ca_key_path = ca_dir.join("ca.key");
    let ca_cert_path = ca_dir.join("ca.pem");
    let ca_key_pem = fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| TlsError::Pem {
        path: ca_key_path.clone(),
        what: "private key",
        reason: e.to_string(),
    })?;
    let ca_pem = fs::read(&ca_cert_path).map_err(io_err(&ca_cert_path))?;
    // The issuer as rcgen needs it: the CA's subject and key (rebuilt; only those sign).
    let issuer = ca_params()?.self_signed(&ca_key)?;

    let mut names = vec![node.to_owned()];
    if role == CertRole::Coordinator {
        names.push(COORDINATOR_NAME.to_owned());
    }
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name.push(DnType::CommonName, node);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "blockrep");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(NODE_VALID_DAYS);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer, &ca_key)?;

    fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let cert_path = out_dir.join("node.pem");
    write_private(&out_dir.join("node.key"), key.serialize_pem().as_bytes())?;
    write_public(&cert_path, cert.pem().as_bytes())?;
    write_public(&out_dir.join("ca.pem"), &ca_pem)?;
    Ok(cert_path)
}

fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "blockrep");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(CA_VALID_DAYS);
    Ok(params)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => TlsError::Exists {
                path: path.to_owned(),
            },
            _ => TlsError::Io {
                path: path.to_owned(),
                source: e,
            },
        })?;
    file.write_all(bytes).map_err(io_err(path))
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    fs::write(path, bytes).map_err(io_err(path))
}

/// Where a node's TLS files are (the `[cluster]` keys `ca_cert`, `cert`, `key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files `issue-cert` writes into `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join("ca.pem"),
            cert: dir.join("node.pem"),
            key: dir.join("node.key"),
        }
    }
}

/// A node's identity and trust, loaded: ready to build server and client configurations.
#[derive(Clone, Debug)]
pub struct NodeTls {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    /// `None` only for [`NodeTls::danger_without_certificate`].
    key: Option<Arc<PrivateKeyDer<'static>>>,
}

impl NodeTls {
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let roots = load_roots(&files.ca_cert)?;
        let chain = load_certs(&files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Pem {
            path: files.key.clone(),
            what: "private key",
            reason: e.to_string(),
        })?;
        Ok(Self {
            roots: Arc::new(roots),
            chain,
            key: Some(Arc::new(key)),
        })
    }

    /// Trust without an identity: a client that presents no certificate. Servers refuse it;
    /// it exists to check that they do.
    pub fn danger_without_certificate(ca_cert: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            roots: Arc::new(load_roots(ca_cert)?),
            chain: Vec::new(),
            key: None,
        })
    }

    /// Who this node's certificate says it is.
    pub fn identity(&self) -> Result<PeerIdentity, TlsError> {
        PeerIdentity::of(&self.chain)
    }

    /// A secret only this node's key holder has, the same after every restart: the key of
    /// its QUIC endpoint's stateless resets, so that a peer still holding a connection to the
    /// node's previous process learns at its next packet that the connection is gone, instead
    /// of waiting out its idle timeout. `None` without a key.
    pub fn stateless_reset_secret(&self) -> Option<[u8; 32]> {
        let key = self.key.as_deref()?;
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(b"blockrep quic stateless reset v1\0");
        context.update(key.secret_der());
        context.finish().as_ref().try_into().ok()
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        self.key
            .as_deref()
            .map(|k| k.clone_key())
            .ok_or_else(|| TlsError::Config("this identity has no certificate".into()))
    }

    /// A TLS 1.3 server that requires a client certificate signed by the cluster CA.
    pub fn server_config(&self, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&self.roots), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key()?)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }

    /// A TLS 1.3 client that trusts only the cluster CA and presents the node's certificate.
    pub fn client_config(&self, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(Arc::clone(&self.roots));
        let mut config = match &self.key {
            Some(_) => builder
                .with_client_auth_cert(self.chain.clone(), self.key()?)
                .map_err(|e| TlsError::Config(e.to_string()))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |reason: String| TlsError::Pem {
        path: path.to_owned(),
        what: "certificate",
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no certificate in the file".into()));
    }
    Ok(certs)
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            what: "CA certificate",
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_issues_node_certificates_that_load() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca).unwrap();
        assert!(
            matches!(init_ca(&ca), Err(TlsError::Exists { .. })),
            "no overwrite"
        );
        let node = dir.path().join("node-a");
        issue_cert(&ca, "node-a", CertRole::Agent, &node).unwrap();
        let tls = NodeTls::load(&TlsFiles::in_dir(&node)).unwrap();
        tls.server_config(b"blockrep/1").unwrap();
        tls.client_config(b"blockrep/1").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(node.join("node.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            issue_cert(&ca, "bad name", CertRole::Agent, &dir.path().join("x")),
            Err(TlsError::BadNodeName(_))
        ));
        assert!(matches!(
            issue_cert(
                &ca,
                COORDINATOR_NAME,
                CertRole::Agent,
                &dir.path().join("x")
            ),
            Err(TlsError::BadNodeName(_))
        ));
        assert!(matches!(
            NodeTls::load(&TlsFiles::in_dir(&dir.path().join("missing"))),
            Err(TlsError::Pem { .. })
        ));
    }

    #[test]
    fn a_certificate_names_its_node_and_only_a_coordinators_has_the_role() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca).unwrap();
        let identity = |node: &str, role| {
            let out = dir.path().join(node);
            issue_cert(&ca, node, role, &out).unwrap();
            let chain = load_certs(&out.join("node.pem")).unwrap();
            PeerIdentity::of(&chain).unwrap()
        };
        assert_eq!(
            identity("node-a", CertRole::Agent),
            PeerIdentity {
                node: "node-a".into(),
                role: CertRole::Agent
            }
        );
        let co = identity("node-co", CertRole::Coordinator);
        assert_eq!(co.node, "node-co");
        assert!(co.is_coordinator());
        assert!(matches!(PeerIdentity::of(&[]), Err(TlsError::Identity(_))));
    }
}
