//! `blockrep coordinator export` and `import`: every record of a coordinator's store, as
//! JSON lines, out of one store and into another (redb to etcd when a cluster grows into an
//! HA coordinator). The store is opened directly, not through a daemon: export from redb
//! while its coordinator is stopped (redb allows one process), import while no coordinator
//! runs on the target.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use blockrep_coordinator::store::transfer;
use blockrep_coordinator::{EtcdSettings, EtcdStore, EtcdTls, RedbStore, Store};
use clap::Args;

/// Which store: a redb file, or etcd.
#[derive(Args)]
pub struct StoreArgs {
    /// The redb file of a coordinator with the embedded store
    /// (`STATE_DIR/coordinator.redb`).
    #[arg(long, conflicts_with = "etcd_endpoints")]
    redb: Option<PathBuf>,
    /// etcd's client URLs, comma-separated.
    #[arg(long, value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// The prefix of the coordinator's keys in etcd (`coordinator.etcd_prefix`).
    #[arg(long, default_value = EtcdSettings::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// Mutual TLS to etcd: the CA of its members' certificates (with --etcd-cert and
    /// --etcd-key).
    #[arg(long, requires_all = ["etcd_cert", "etcd_key"])]
    etcd_ca: Option<PathBuf>,
    /// This client's certificate, for etcd.
    #[arg(long, requires = "etcd_ca")]
    etcd_cert: Option<PathBuf>,
    /// This client's key, for etcd.
    #[arg(long, requires = "etcd_ca")]
    etcd_key: Option<PathBuf>,
}

enum Opened {
    Redb(RedbStore),
    Etcd(Box<EtcdStore>),
}

impl Opened {
    fn store(&self) -> &dyn Store {
        match self {
            Opened::Redb(s) => s,
            Opened::Etcd(s) => s.as_ref(),
        }
    }
}

/// Opens the store `args` names; a redb file to export from must exist (opening one
/// creates it).
fn open(args: StoreArgs, exporting: bool) -> anyhow::Result<Opened> {
    if args.redb.is_none() && args.etcd_endpoints.is_empty() {
        anyhow::bail!("which store? give --redb FILE or --etcd-endpoints URL[,URL...]");
    }
    if let Some(path) = args.redb {
        if exporting && !path.exists() {
            anyhow::bail!("no coordinator store at {}", path.display());
        }
        let store = RedbStore::open(&path).map_err(|e| {
            anyhow::anyhow!(
                "open {}: {e} (is its coordinator still running? stop it first)",
                path.display()
            )
        })?;
        return Ok(Opened::Redb(store));
    }
    let tls = match (args.etcd_ca, args.etcd_cert, args.etcd_key) {
        (Some(ca), Some(cert), Some(key)) => Some(EtcdTls { ca, cert, key }),
        _ => None,
    };
    let settings = EtcdSettings {
        prefix: args.etcd_prefix,
        tls,
        ..EtcdSettings::new(args.etcd_endpoints)
    };
    Ok(Opened::Etcd(Box::new(EtcdStore::connect(settings)?)))
}

/// Writes every record to `out` (a file, or stdout); answers how many.
pub fn export(args: StoreArgs, out: Option<PathBuf>) -> anyhow::Result<usize> {
    let store = open(args, true)?;
    let mut sink: Box<dyn Write> = match &out {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .map_err(|e| anyhow::anyhow!("create {}: {e}", path.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let records = transfer::export(store.store(), &mut sink)?;
    sink.flush()?;
    Ok(records)
}

/// Reads an export (a file, or stdin) into an empty store; answers how many records.
pub fn import(args: StoreArgs, input: Option<PathBuf>) -> anyhow::Result<usize> {
    let store = open(args, false)?;
    let per_commit = match &store {
        Opened::Etcd(etcd) => {
            // Checked once: the candidates must stay stopped until the import is done.
            if etcd.has_leader()? {
                anyhow::bail!(
                    "a coordinator leads on this etcd prefix: stop every coordinator candidate before an import"
                );
            }
            blockrep_coordinator::store::MAX_TXN_OPS
        }
        Opened::Redb(_) => usize::MAX,
    };
    let mut source: Box<dyn BufRead> = match &input {
        Some(path) => Box::new(std::io::BufReader::new(
            std::fs::File::open(path)
                .map_err(|e| anyhow::anyhow!("open {}: {e}", path.display()))?,
        )),
        None => Box::new(std::io::stdin().lock()),
    };
    Ok(transfer::import(store.store(), &mut source, per_commit)?)
}
