//! The agent's volumes: registered in the registry, opened with their trackers, exported
//! over NBD.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use blockrep_api::ApiError;
use blockrep_api::model::AddVolume;
use blockrep_core::VolumeId;
use blockrep_core::replication::{GenerationId, VolumeRole};
use blockrep_nbd::{ClientStream, ExportSet};
use blockrep_replication::membership::Membership;
use blockrep_replication::pairs::{Pairs, VolumeHandle};
use blockrep_volume::{Backing, DirtyTracker, LineageFile, Volume};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::connections::Connections;
use crate::registry::{self, VolumeRecord};

mod drills;
mod pool;

pub use drills::drill_protos;

pub struct Agent {
    pub config: Config,
    /// The volumes, held only to look one up or to change the map: every NBD handshake
    /// takes it to find its export.
    volumes: Mutex<BTreeMap<VolumeId, Entry>>,
    /// Serialises the changes of the agent's volumes (add, remove, extend). Their slow
    /// parts (opening a backing, replaying its tracker, saving the registry) run under this,
    /// not under `volumes`; only these changes write the registry, so the records they read
    /// under it stay the registry's.
    changes: Mutex<()>,
    /// Runs when a volume add is about to open its backing (a test holds an add there).
    #[cfg(test)]
    before_open: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    pub connections: Arc<Connections>,
    runtime: tokio::runtime::Handle,
    /// The pairs this agent's volumes are in.
    pairs: Arc<Pairs>,
    /// The sockets drill volumes are served on, by export name.
    drill_sockets: Mutex<std::collections::HashMap<String, JoinHandle<()>>>,
    /// The one thread that writes every volume's dirty bitmap back (with tracking on).
    flusher: Option<blockrep_volume::Flusher>,
    /// Bytes of files in the pool's directory that no volume has (found at start): the
    /// pool counts them as used, and leaves them to the operator.
    pool_stray_bytes: std::sync::atomic::AtomicU64,
}

struct Entry {
    record: VolumeRecord,
    state: Result<Online, String>,
}

/// A volume that is open and exported.
struct Online {
    volume: Arc<Volume>,
    flusher: Option<blockrep_volume::Flushing>,
    listener: JoinHandle<()>,
    socket: PathBuf,
    /// Set while the volume is being removed: new clients are turned away.
    closing: Arc<AtomicBool>,
}

/// What the API reports of a volume.
pub struct VolumeView {
    pub record: VolumeRecord,
    pub online: Option<OnlineView>,
    pub error: Option<String>,
    pub nbd_socket: PathBuf,
}

pub struct OnlineView {
    pub role: VolumeRole,
    pub kind: &'static str,
    pub direct_io: bool,
    pub dirty_bytes: Option<u64>,
    pub active_regions: usize,
    pub connected_clients: usize,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

impl Agent {
    /// Opens every registered volume. A volume whose backing cannot be opened stays
    /// registered, in error, so the operator sees it.
    pub fn start(config: Config, runtime: tokio::runtime::Handle) -> anyhow::Result<Arc<Self>> {
        let records = registry::load(&config.state_dir)?;
        let pairs = Pairs::new(
            config.node_name.clone(),
            config.replication,
            Arc::new(blockrep_replication::clock::SystemClock::new()),
        );
        let flusher = config
            .tracker
            .map(|t| blockrep_volume::Flusher::start(t.flush_interval))
            .transpose()
            .map_err(|e| anyhow::anyhow!("cannot start the bitmap flusher: {e}"))?;
        let agent = Arc::new(Self {
            flusher,
            config,
            volumes: Mutex::new(BTreeMap::new()),
            changes: Mutex::new(()),
            #[cfg(test)]
            before_open: Mutex::new(None),
            connections: Arc::new(Connections::default()),
            runtime,
            pairs,
            drill_sockets: Mutex::new(Default::default()),
            pool_stray_bytes: Default::default(),
        });
        for record in records {
            let state = agent.bring_online(&record).map_err(|e| {
                tracing::error!(volume = %record.name, id = %record.id, error = %e, "volume stays offline");
                e.to_string()
            });
            agent.lock().insert(record.id, Entry { record, state });
        }
        agent.tidy_pool();
        Ok(agent)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<VolumeId, Entry>> {
        self.volumes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Taken by a change of the agent's volumes, for all of it.
    fn lock_changes(&self) -> MutexGuard<'_, ()> {
        self.changes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The registry's records, as the volumes hold them.
    fn records(&self) -> Vec<VolumeRecord> {
        self.lock().values().map(|e| e.record.clone()).collect()
    }

    fn tracker_dir(&self, id: VolumeId) -> PathBuf {
        self.config.state_dir.join("volumes").join(id.to_string())
    }

    fn bring_online(self: &Arc<Self>, record: &VolumeRecord) -> Result<Online, ApiError> {
        let backing = Backing::open(&record.path, record.cache)
            .map_err(|e| ApiError::FailedPrecondition(e.to_string()))?;
        if backing.size() < record.size {
            return Err(ApiError::FailedPrecondition(format!(
                "{} is {} bytes but was registered with {}: it shrank",
                record.path.display(),
                backing.size(),
                record.size
            )));
        }
        // Bigger than registered: an extend that did not finish (or a device grown ahead of
        // one); the volume keeps its registered size until an extend says otherwise.
        backing.limit_to(record.size);
        let tracker = match self.config.tracker {
            Some(tracker_config) => {
                let (tracker, report) = DirtyTracker::open(
                    &self.tracker_dir(record.id),
                    backing.size(),
                    tracker_config,
                )
                .map_err(|e| ApiError::Internal(format!("dirty tracker: {e}")))?;
                tracing::info!(volume = %record.name, replayed_regions = report.replayed_regions,
                    dirty_bytes = report.dirty_bytes, "dirty tracker opened");
                Some(Arc::new(tracker))
            }
            None => None,
        };
        let flusher = tracker
            .as_ref()
            .zip(self.flusher.as_ref())
            .map(|(t, f)| f.add(record.name.to_string(), Arc::clone(t)));
        let volume = Arc::new(Volume::new(record.name.to_string(), backing, tracker));
        // The volume's data generations (rule 5): its first write in each is recorded.
        let lineage = LineageFile::open(&self.tracker_dir(record.id), GenerationId::random())
            .map_err(|e| {
                ApiError::Internal(format!("generations of volume {}: {e}", record.name))
            })?;
        volume.gate().set_lineage(Arc::new(lineage));
        // A volume in a pair keeps its role across restarts: a DR volume stays read-only
        // even before (or without) the cluster endpoint, and a production volume of a group
        // takes no writes until the coordinator confirms it.
        match Membership::load(&self.tracker_dir(record.id)) {
            Ok(Some(membership)) => volume.gate().restore_role(membership.role_at_start()),
            Ok(None) => {}
            Err(e) => {
                return Err(ApiError::Internal(format!(
                    "pair record of volume {}: {e}",
                    record.name
                )));
            }
        }
        let socket = self.config.nbd_socket(record.name.as_str());
        let closing = Arc::new(AtomicBool::new(false));
        let exports: Arc<dyn ExportSet> = Arc::new(SingleExport {
            volume: Arc::clone(&volume),
            closing: Arc::clone(&closing),
        });
        let listener = self.listen_unix(&socket, exports)?;
        Ok(Online {
            volume,
            flusher,
            listener,
            socket,
            closing,
        })
    }

    /// Serves `exports` on a Unix socket at `socket` (a volume's, or a drill's).
    fn listen_unix(
        self: &Arc<Self>,
        socket: &Path,
        exports: Arc<dyn ExportSet>,
    ) -> Result<JoinHandle<()>, ApiError> {
        let bind_err = |e: std::io::Error| {
            ApiError::Internal(format!("cannot listen on {}: {e}", socket.display()))
        };
        remove_stale_socket(socket).map_err(bind_err)?;
        let _guard = self.runtime.enter();
        let listener = tokio::net::UnixListener::bind(socket).map_err(bind_err)?;
        set_mode(socket, 0o660).map_err(bind_err)?;
        let label = socket.display().to_string();
        Ok(self.runtime.spawn(accept_loop(
            Arc::clone(&self.connections),
            exports,
            label.clone(),
            async move || {
                let (stream, _) = listener.accept().await?;
                let stream = stream.into_std()?;
                stream.set_nonblocking(false)?;
                Ok((ClientStream::Unix(stream), label.clone()))
            },
        )))
    }

    /// Serves every online volume, by export name, on a TCP address.
    pub async fn listen_tcp(
        self: &Arc<Self>,
        addr: std::net::SocketAddr,
    ) -> anyhow::Result<JoinHandle<()>> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on nbd.tcp_listen {addr}: {e}"))?;
        let exports: Arc<dyn ExportSet> = Arc::clone(self) as Arc<dyn ExportSet>;
        Ok(tokio::spawn(accept_loop(
            Arc::clone(&self.connections),
            exports,
            addr.to_string(),
            async move || {
                let (stream, peer) = listener.accept().await?;
                let stream = stream.into_std()?;
                stream.set_nonblocking(false)?;
                Ok((ClientStream::Tcp(stream), peer.to_string()))
            },
        )))
    }

    pub fn add_volume(self: &Arc<Self>, req: AddVolume) -> Result<VolumeView, ApiError> {
        let _changing = self.lock_changes();
        self.add_volume_locked(req, false)
    }

    /// Adds a volume, under [`Agent::lock_changes`]; `pool`: the pool made its file.
    fn add_volume_locked(
        self: &Arc<Self>,
        req: AddVolume,
        pool: bool,
    ) -> Result<VolumeView, ApiError> {
        if let Some(e) = self.lock().values().find(|e| e.record.name == req.name) {
            return Err(ApiError::AlreadyExists(format!(
                "a volume named {} already exists (id {})",
                req.name, e.record.id
            )));
        }
        let path = std::fs::canonicalize(&req.path).map_err(|e| {
            ApiError::InvalidArgument(format!("cannot open {}: {e}", req.path.display()))
        })?;
        if let Some(e) = self.lock().values().find(|e| e.record.path == path) {
            return Err(ApiError::AlreadyExists(format!(
                "{} is already volume {} (id {})",
                path.display(),
                e.record.name,
                e.record.id
            )));
        }
        #[cfg(test)]
        if let Some(hook) = self
            .before_open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            hook();
        }
        let size = Backing::open(&path, req.cache)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?
            .size();
        let mut record = VolumeRecord::new(req.name, path, size, req.cache, &req.project);
        record.pool = pool;
        let online = self
            .bring_online(&record)
            .inspect_err(|_| self.remove_tracker_dir(record.id))?;
        let mut records = self.records();
        records.push(record.clone());
        if let Err(e) = registry::save(&self.config.state_dir, &records) {
            self.take_offline(online);
            self.remove_tracker_dir(record.id);
            return Err(ApiError::Internal(e.to_string()));
        }
        tracing::info!(volume = %record.name, id = %record.id, path = %record.path.display(), size, "volume added");
        let entry = Entry {
            record,
            state: Ok(online),
        };
        let view = self.view(&entry);
        self.lock().insert(entry.record.id, entry);
        Ok(view)
    }

    pub fn remove_volume(&self, reference: &str) -> Result<VolumeId, ApiError> {
        let _changing = self.lock_changes();
        self.remove_volume_locked(reference, false).map(|r| r.id)
    }

    /// Unregisters a volume, under [`Agent::lock_changes`]; its record. `pool_only`: only a
    /// volume the pool made (anything else is refused first).
    fn remove_volume_locked(
        &self,
        reference: &str,
        pool_only: bool,
    ) -> Result<VolumeRecord, ApiError> {
        let volumes = self.lock();
        let id = find(&volumes, reference)?;
        let entry = &volumes[&id];
        if pool_only && !entry.record.pool {
            return Err(ApiError::FailedPrecondition(format!(
                "volume {} was added from {}, not made by the pool: only pool volumes are deleted (`volume remove` unregisters it and leaves its data)",
                entry.record.name,
                entry.record.path.display()
            )));
        }
        if entry.state.is_err() {
            // Offline: its pair record says whether it is in a pair; one that cannot be read
            // may say so too.
            match Membership::load(&self.tracker_dir(id)) {
                Ok(None) => {}
                Ok(Some(membership)) => {
                    return Err(ApiError::FailedPrecondition(format!(
                        "volume {} is offline and in pair {} (its record says so); delete the pair first",
                        entry.record.name, membership.pair
                    )));
                }
                Err(e) => {
                    return Err(ApiError::FailedPrecondition(format!(
                        "volume {} is offline and its pair record cannot be read ({e}): it may be in a pair; repair the record first",
                        entry.record.name
                    )));
                }
            }
        }
        if let Ok(online) = &entry.state {
            let role = online.volume.gate().role();
            if let Some(pair) = role.pair() {
                return Err(ApiError::FailedPrecondition(format!(
                    "volume {} is the {} side of pair {pair}; delete the pair first",
                    entry.record.name,
                    role.name()
                )));
            }
            online.closing.store(true, Ordering::SeqCst);
            let clients = online.volume.connected_clients();
            if clients > 0 {
                online.closing.store(false, Ordering::SeqCst);
                return Err(ApiError::FailedPrecondition(format!(
                    "volume {} has {clients} connected NBD client(s); disconnect them first",
                    entry.record.name
                )));
            }
        }
        let records: Vec<VolumeRecord> = volumes
            .values()
            .filter(|e| e.record.id != id)
            .map(|e| e.record.clone())
            .collect();
        // Closing: new clients are turned away while the registry is saved.
        drop(volumes);
        if let Err(e) = registry::save(&self.config.state_dir, &records) {
            if let Some(Ok(online)) = self.lock().get(&id).map(|e| &e.state) {
                online.closing.store(false, Ordering::SeqCst);
            }
            return Err(ApiError::Internal(e.to_string()));
        }
        let Some(entry) = self.lock().remove(&id) else {
            return Err(ApiError::Internal(format!(
                "volume {id} left while it was removed"
            )));
        };
        if let Ok(online) = entry.state {
            self.take_offline(online);
        }
        self.remove_tracker_dir(id);
        tracing::info!(volume = %entry.record.name, %id, "volume removed");
        Ok(entry.record)
    }

    fn take_offline(&self, online: Online) {
        online.listener.abort();
        let _ = std::fs::remove_file(&online.socket);
        // What the volume holds survives a power cut after a clean stop.
        if let Err(e) = online.volume.backing().sync_data() {
            tracing::error!(volume = %online.volume.name(), error = %e, "syncing the volume failed");
        }
        drop(online.flusher);
        if let Some(tracker) = online.volume.tracker()
            && let Err(e) = tracker.close()
        {
            tracing::error!(volume = %online.volume.name(), error = %e, "closing the dirty tracker failed");
        }
    }

    fn remove_tracker_dir(&self, id: VolumeId) {
        let dir = self.tracker_dir(id);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove tracker directory");
        }
    }

    pub fn list(&self) -> Vec<VolumeView> {
        self.lock().values().map(|e| self.view(e)).collect()
    }

    pub fn get(&self, reference: &str) -> Result<VolumeView, ApiError> {
        let volumes = self.lock();
        let id = find(&volumes, reference)?;
        Ok(self.view(&volumes[&id]))
    }

    pub fn dirty_extents(
        &self,
        reference: &str,
    ) -> Result<(VolumeId, u64, Vec<blockrep_core::ByteRange>), ApiError> {
        let volumes = self.lock();
        let id = find(&volumes, reference)?;
        let entry = &volumes[&id];
        let online = entry.state.as_ref().map_err(|e| {
            ApiError::FailedPrecondition(format!("volume {} is offline: {e}", entry.record.name))
        })?;
        let tracker = online.volume.tracker().ok_or_else(|| {
            ApiError::FailedPrecondition(
                "dirty tracking is switched off (bitmap.dirty_tracking = false)".into(),
            )
        })?;
        Ok((
            id,
            tracker.config().granularity.bytes(),
            tracker.dirty_runs(),
        ))
    }

    fn view(&self, entry: &Entry) -> VolumeView {
        let online = entry.state.as_ref().ok().map(|o| OnlineView {
            role: o.volume.gate().role(),
            kind: match o.volume.backing().kind() {
                blockrep_volume::BackingKind::BlockDevice => "block-device",
                blockrep_volume::BackingKind::File => "file",
            },
            direct_io: o.volume.backing().is_direct(),
            dirty_bytes: o.volume.tracker().map(|t| t.dirty_bytes()),
            active_regions: o.volume.tracker().map_or(0, |t| t.active_regions()),
            connected_clients: o.volume.connected_clients(),
            bytes_read: o.volume.counters().bytes_read.load(Ordering::Relaxed),
            bytes_written: o.volume.counters().bytes_written.load(Ordering::Relaxed),
        });
        VolumeView {
            record: entry.record.clone(),
            online,
            error: entry.state.as_ref().err().cloned(),
            nbd_socket: self.config.nbd_socket(entry.record.name.as_str()),
        }
    }

    pub fn pairs(&self) -> &Arc<Pairs> {
        &self.pairs
    }

    /// An online volume, by id or name, as replication needs it.
    pub fn volume_handle(&self, reference: &str) -> Result<VolumeHandle, ApiError> {
        let volumes = self.lock();
        let id = find(&volumes, reference)?;
        let entry = &volumes[&id];
        let online = entry.state.as_ref().map_err(|e| {
            ApiError::FailedPrecondition(format!("volume {} is offline: {e}", entry.record.name))
        })?;
        if online.closing.load(Ordering::SeqCst) {
            return Err(ApiError::FailedPrecondition(format!(
                "volume {} is being removed",
                entry.record.name
            )));
        }
        Ok(VolumeHandle {
            volume: Arc::clone(&online.volume),
            dir: self.tracker_dir(id),
            name: entry.record.name.to_string(),
        })
    }

    /// This node's volume in `pair`.
    pub fn pair_volume_handle(
        &self,
        pair: blockrep_core::replication::PairId,
    ) -> Result<VolumeHandle, ApiError> {
        let (volume, _) = self.pairs.volume_pair_by_id(pair).ok_or_else(|| {
            ApiError::FailedPrecondition(format!(
                "node {} has no volume in pair {pair}",
                self.config.node_name
            ))
        })?;
        self.volume_handle(&volume.to_string())
    }

    /// Grows a volume to `size` bytes, online (an extend of its pair): its tracker and
    /// backing first, then its registered size and its pair's. Growing to the size it has
    /// changes nothing.
    pub fn extend_volume(&self, reference: &str, size: u64) -> Result<(), ApiError> {
        let _changing = self.lock_changes();
        let volumes = self.lock();
        let id = find(&volumes, reference)?;
        let entry = &volumes[&id];
        let online = entry.state.as_ref().map_err(|e| {
            ApiError::FailedPrecondition(format!("volume {} is offline: {e}", entry.record.name))
        })?;
        let name = entry.record.name.to_string();
        let volume = Arc::clone(&online.volume);
        let registered = entry.record.size;
        drop(volumes);
        self.check_pool_room(id, size)?;
        volume.grow(size).map_err(|e| match e {
            blockrep_volume::GrowVolumeError::Backing(
                e @ (blockrep_volume::GrowError::Unaligned { .. }
                | blockrep_volume::GrowError::Shrink { .. }),
            ) => ApiError::InvalidArgument(format!("volume {name}: {e}")),
            e => ApiError::FailedPrecondition(format!("volume {name}: {e}")),
        })?;
        if registered != size {
            let mut records = self.records();
            if let Some(r) = records.iter_mut().find(|r| r.id == id) {
                r.size = size;
            }
            registry::save(&self.config.state_dir, &records)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            if let Some(e) = self.lock().get_mut(&id) {
                e.record.size = size;
            }
        }
        self.pairs
            .set_volume_size(id, &self.tracker_dir(id), size)
            .map_err(|e| ApiError::Internal(format!("record the pair's size: {e}")))?;
        tracing::info!(volume = %name, size, "volume extended");
        Ok(())
    }

    /// Starts replicating every pair the online volumes were in before a restart.
    pub fn restore_pairs(&self) {
        let handles: Vec<VolumeHandle> = {
            let volumes = self.lock();
            volumes
                .iter()
                .filter_map(|(id, e)| {
                    let online = e.state.as_ref().ok()?;
                    Some(VolumeHandle {
                        volume: Arc::clone(&online.volume),
                        dir: self.tracker_dir(*id),
                        name: e.record.name.to_string(),
                    })
                })
                .collect()
        };
        for handle in handles {
            let name = handle.name.clone();
            if let Err(e) = self.pairs.restore(handle) {
                tracing::error!(volume = %name, error = %e, "cannot take up the volume's pair role");
            }
        }
    }

    /// Every volume, as the API shows it.
    pub fn volume_protos(&self) -> Vec<blockrep_api::proto::Volume> {
        self.list()
            .into_iter()
            .map(|v| volume_proto(&self.config, v))
            .collect()
    }

    /// Stops accepting clients, lets the connected ones finish what is in flight, then
    /// writes every tracker's state out.
    pub fn shut_down(&self) {
        // A change of the volumes in progress ends first (it saves the registry from the
        // volumes it sees), and none starts after.
        let _changing = self.lock_changes();
        for entry in self.lock().values() {
            if let Ok(online) = &entry.state {
                online.listener.abort();
            }
        }
        // Replication stops first: answers a group's trip held fail, so the drain does not
        // wait for them (nothing else would release them). Writes go on, tracked.
        self.pairs.stop_all();
        // Not under the lock: a client in the middle of its handshake may still look its
        // export up, and the drain waits for that client.
        self.connections.drain(self.config.shutdown_grace);
        let volumes = std::mem::take(&mut *self.lock());
        for (_, entry) in volumes {
            if let Ok(online) = entry.state {
                self.take_offline(online);
            }
        }
    }
}

/// Accepts clients until aborted; each is served on a thread of its own.
async fn accept_loop(
    connections: Arc<Connections>,
    exports: Arc<dyn ExportSet>,
    listener: String,
    mut accept: impl AsyncFnMut() -> std::io::Result<(ClientStream, String)>,
) {
    loop {
        match accept().await {
            Ok((stream, peer)) => connections.spawn(stream, Arc::clone(&exports), peer),
            Err(e) => {
                tracing::warn!(%listener, error = %e, "accepting a client failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

fn find(volumes: &BTreeMap<VolumeId, Entry>, reference: &str) -> Result<VolumeId, ApiError> {
    if let Ok(id) = reference.parse::<VolumeId>()
        && volumes.contains_key(&id)
    {
        return Ok(id);
    }
    volumes
        .values()
        .find(|e| e.record.name.as_str() == reference)
        .map(|e| e.record.id)
        .ok_or_else(|| ApiError::VolumeNotFound(reference.to_owned()))
}

impl ExportSet for Agent {
    fn find(&self, name: &str) -> Option<Arc<Volume>> {
        self.lock().values().find_map(|e| {
            let online = e.state.as_ref().ok()?;
            (e.record.name.as_str() == name && !online.closing.load(Ordering::SeqCst))
                .then(|| Arc::clone(&online.volume))
        })
    }

    fn find_device(&self, name: &str) -> Option<Arc<dyn blockrep_nbd::BlockDevice>> {
        self.pairs
            .find_drill(name)
            .map(|d| Arc::new(drills::DrillDevice(d)) as Arc<dyn blockrep_nbd::BlockDevice>)
    }

    fn names(&self) -> Vec<String> {
        self.lock()
            .values()
            .filter(|e| {
                e.state
                    .as_ref()
                    .is_ok_and(|online| !online.closing.load(Ordering::SeqCst))
            })
            .map(|e| e.record.name.to_string())
            .collect()
    }
}

/// A volume's own socket: it serves that volume under its name or the empty (default) name.
struct SingleExport {
    volume: Arc<Volume>,
    closing: Arc<AtomicBool>,
}

impl ExportSet for SingleExport {
    fn find(&self, name: &str) -> Option<Arc<Volume>> {
        let matches = name.is_empty() || name == self.volume.name();
        (matches && !self.closing.load(Ordering::SeqCst)).then(|| Arc::clone(&self.volume))
    }

    fn names(&self) -> Vec<String> {
        vec![self.volume.name().to_owned()]
    }
}

/// Removes a socket file left by an earlier run, if there is one.
pub fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

pub fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// The agent's pool as the API shows it; `None` without one.
pub fn pool_proto(agent: &Agent) -> Option<blockrep_api::proto::Pool> {
    agent.pool_usage().map(|p| blockrep_api::proto::Pool {
        capacity_bytes: p.capacity_bytes,
        used_bytes: p.used_bytes,
    })
}

/// A volume as the API shows it.
pub fn volume_proto(config: &Config, v: VolumeView) -> blockrep_api::proto::Volume {
    use blockrep_api::proto;
    let online = v.online.as_ref();
    proto::Volume {
        id: v.record.id.to_string(),
        name: v.record.name.to_string(),
        path: v.record.path.display().to_string(),
        size_bytes: v.record.size,
        availability_zone: config.availability_zone.clone(),
        node_name: config.node_name.clone(),
        backing_kind: online.map_or("", |o| o.kind).to_owned(),
        direct_io: online.is_some_and(|o| o.direct_io),
        state: if online.is_some() {
            proto::VolumeState::Online
        } else {
            proto::VolumeState::Error
        } as i32,
        error: v.error.unwrap_or_default(),
        nbd_socket: if online.is_some() {
            v.nbd_socket.display().to_string()
        } else {
            String::new()
        },
        nbd_tcp: config
            .nbd_tcp_listen
            .map(|a| a.to_string())
            .unwrap_or_default(),
        dirty_tracking: online.is_some_and(|o| o.dirty_bytes.is_some()),
        dirty_bytes: online.and_then(|o| o.dirty_bytes).unwrap_or(0),
        bitmap_granularity: config.tracker.map_or(0, |t| t.granularity.bytes() as u32),
        active_regions: online.map_or(0, |o| o.active_regions as u32),
        connected_clients: online.map_or(0, |o| o.connected_clients as u32),
        created_at: v.record.created_at,
        cache_mode: v.record.cache.to_string(),
        bytes_read: online.map_or(0, |o| o.bytes_read),
        bytes_written: online.map_or(0, |o| o.bytes_written),
        role: online.map_or("", |o| o.role.name()).to_owned(),
        pair_id: online
            .and_then(|o| o.role.pair())
            .map(|p| p.to_string())
            .unwrap_or_default(),
        project_id: v.record.project,
        pool: v.record.pool,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use blockrep_core::{CacheMode, VolumeName};

    use super::*;

    /// An agent whose state and runtime directories are in `dir`.
    fn agent(dir: &Path, runtime: &tokio::runtime::Runtime) -> Arc<Agent> {
        let text = format!(
            "node_name = \"host-a\"\navailability_zone = \"az1\"\nstate_dir = \"{0}/state\"\nruntime_dir = \"{0}/run\"\n",
            dir.display()
        );
        let config = Config::parse(&text, Path::new("test.toml")).unwrap();
        for d in [&config.state_dir, &config.runtime_dir.join("nbd")] {
            std::fs::create_dir_all(d).unwrap();
        }
        Agent::start(config, runtime.handle().clone()).unwrap()
    }

    fn add(agent: &Arc<Agent>, dir: &Path, name: &str) -> Result<VolumeView, ApiError> {
        let path = dir.join(format!("{name}.img"));
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        agent.add_volume(AddVolume {
            name: VolumeName::try_from(name.to_owned()).unwrap(),
            path,
            cache: CacheMode::Writeback,
            project: Default::default(),
        })
    }

    /// An agent holding volume "first", and an add of volume "second" (on another thread)
    /// stopped just before it opens its backing, until `go` says to go on.
    struct HeldAdd {
        agent: Arc<Agent>,
        go: mpsc::Sender<()>,
        adding: std::thread::JoinHandle<Result<(), ApiError>>,
    }

    fn hold_an_add(dir: &Path, runtime: &tokio::runtime::Runtime) -> HeldAdd {
        let agent = agent(dir, runtime);
        add(&agent, dir, "first").unwrap();
        let (reached_tx, reached) = mpsc::channel();
        let (go, go_rx) = mpsc::channel::<()>();
        *agent.before_open.lock().unwrap() = Some(Box::new(move || {
            reached_tx.send(()).unwrap();
            let _ = go_rx.recv();
        }));
        let adding = std::thread::spawn({
            let agent = Arc::clone(&agent);
            let dir = dir.to_owned();
            move || add(&agent, &dir, "second").map(|_| ())
        });
        reached.recv().unwrap();
        HeldAdd { agent, go, adding }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_volume_add_in_progress_does_not_hold_up_finding_an_export() {
        let runtime = runtime();
        let dir = tempfile::tempdir().unwrap();
        let HeldAdd { agent, go, adding } = hold_an_add(dir.path(), &runtime);

        // What an NBD handshake does meanwhile, from another thread: it must not wait for
        // the add (a hold-up shows as no answer within the bound).
        let (found_tx, found) = mpsc::channel();
        std::thread::spawn({
            let agent = Arc::clone(&agent);
            move || {
                let names = ExportSet::names(&*agent);
                let first = ExportSet::find(&*agent, "first").is_some();
                let _ = found_tx.send((names, first));
            }
        });
        let answer = found.recv_timeout(Duration::from_secs(10));
        go.send(()).unwrap();
        adding.join().unwrap().unwrap();
        let (names, first) = answer.expect("finding an export waited for a volume add");
        assert_eq!(names, ["first"]);
        assert!(first);
        assert_eq!(agent.list().len(), 2);
        agent.shut_down();
    }

    #[test]
    fn a_shutdown_waits_for_a_volume_add_and_the_registry_keeps_every_volume() {
        let runtime = runtime();
        let dir = tempfile::tempdir().unwrap();
        let HeldAdd { agent, go, adding } = hold_an_add(dir.path(), &runtime);

        // The daemon is stopped while the add replays its tracker: the shutdown must not
        // empty the volumes under it (the add would then save a registry without "first").
        let (stopped_tx, stopped) = mpsc::channel();
        let stopping = std::thread::spawn({
            let agent = Arc::clone(&agent);
            move || {
                agent.shut_down();
                let _ = stopped_tx.send(());
            }
        });
        // A shutdown that does not wait for the add ends meanwhile; one that waits, not.
        let ended_first = stopped.recv_timeout(Duration::from_secs(1)).is_ok();
        go.send(()).unwrap();
        let added = adding.join().unwrap();
        stopping.join().unwrap();
        let mut names: Vec<String> = registry::load(&agent.config.state_dir)
            .unwrap()
            .into_iter()
            .map(|r| r.name.to_string())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["first", "second"],
            "registry after a shutdown during an add (shutdown ended first: {ended_first}, add: {added:?})"
        );
        assert!(!ended_first, "the shutdown did not wait for the add");
    }
}
