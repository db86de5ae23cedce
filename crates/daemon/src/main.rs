//! `blockrepd`: the blockrep agent.

mod agent;
mod cluster;
mod config;
mod connections;
mod metrics;
mod pair_proto;
mod registry;
mod rest_api;
mod service;
mod watchdog;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use blockrep_api::proto::agent_server::AgentServer;
use clap::Parser;
use nix::fcntl::{Flock, FlockArg};
use tokio::signal::unix::{SignalKind, signal};

use crate::agent::{Agent, remove_stale_socket, set_mode};
use crate::config::{Config, DEFAULT_CONFIG_PATH, Scheduling};

/// Replication moves many short-lived buffers of up to a few MiB between threads (NBD
/// readers, the sender, the applier); glibc's malloc kept the freed ones in per-thread
/// arenas, and a replicating agent's resident memory grew well past what it held.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read at its start (`_RJEM_MALLOC_CONF` in the environment overrides
/// them). Buffers are allocated on one thread and freed on another (an NBD reader's write
/// leaves the journal on the sender's; a catch-up's extent is read on its own thread): with
/// an arena per thread, the pages one thread freed sat in its arena while another took
/// fresh ones, and a pair falling back to its bitmap held its old journal and the catch-up's
/// new one at once. One arena, whose freed pages a background thread gives back to the
/// kernel within a second (not the default ten), keeps an agent near what it holds.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 70] =
    b"narenas:1,background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// Gives every arena's freed pages back to the kernel now (`arena.<ALL>.purge`): the
/// replication links ask for it when a journal overflows.
fn purge_freed_pages() {
    const PURGE_ALL_ARENAS: &[u8] = b"arena.4096.purge\0";
    // SAFETY: the name is NUL-terminated, and this control takes no value and gives none,
    // so every pointer is null and the length zero.
    let failed = unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_ALL_ARENAS.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if failed != 0 {
        tracing::warn!(code = failed, "the allocator did not purge its freed pages");
    }
}

#[derive(Parser)]
#[command(
    name = "blockrepd",
    version,
    about = "blockrep agent: serves volumes over NBD and tracks their dirty blocks"
)]
struct Args {
    /// Configuration file.
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("blockrepd: invalid configuration: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("{}: configuration is valid", args.config.display());
        return std::process::ExitCode::SUCCESS;
    }
    init_logging();
    raise_open_files_limit();
    blockrep_replication::memory_release::set_release(purge_freed_pages);
    // Before the runtime: every thread it and the rest of the agent start inherits it.
    set_scheduling(config.scheduling);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(runtime_workers())
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("blockrepd: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("blockrepd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BLOCKREP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

/// The runtime's worker threads: two, or one on a host that lets the agent run on one CPU
/// (a second worker there only adds a thread switch to every hand-over between tasks).
fn runtime_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |cpus| cpus.get().min(2))
}

/// Puts every thread of the agent under the configured policy (see [`Scheduling`]): the
/// threads already running (the allocator's background thread starts before `main`), and
/// the main thread, whose policy every thread started later inherits. A system that refuses
/// it leaves a thread as it was, and says so.
fn set_scheduling(scheduling: Scheduling) {
    let policy = match scheduling {
        Scheduling::Batch => libc::SCHED_BATCH,
        Scheduling::Normal => return,
    };
    let param = libc::sched_param { sched_priority: 0 };
    let mut tids: Vec<libc::pid_t> = std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|t| t.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // The main thread last: whatever starts meanwhile inherits from one already set, or from
    // it. 0 is the calling thread (on Linux, each thread has its own policy).
    tids.push(0);
    let threads = tids.len();
    let mut refused = None;
    for tid in tids {
        // SAFETY: a thread id of this process (or 0, the caller); `param` lives for the call.
        if unsafe { libc::sched_setscheduler(tid, policy, &param) } != 0 {
            refused = Some((tid, std::io::Error::last_os_error()));
        }
    }
    // One warning, not one per thread: a system that refuses one refuses them all.
    if let Some((tid, error)) = refused {
        tracing::warn!(
            tid,
            threads,
            %error,
            "cannot put the agent's threads under SCHED_BATCH"
        );
    }
}

/// Each volume holds a few files open (its backing, bitmap, activity log, NBD socket): the
/// soft limit on open files goes up to the hard one, as far as the system lets it (the
/// unit sets `LimitNOFILE=65536`).
fn raise_open_files_limit() {
    // SAFETY: getrlimit and setrlimit only read and write the struct they are given.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= limit.rlim_max
        {
            return;
        }
        let wanted = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
            tracing::warn!(
                soft = limit.rlim_cur,
                hard = limit.rlim_max,
                "cannot raise the open files limit"
            );
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    // Before anything can announce readiness: a SIGTERM from then on must stop us cleanly.
    let stop_signal = StopSignal::install()?;
    for dir in [
        &config.state_dir,
        &config.runtime_dir,
        &config.runtime_dir.join("nbd"),
    ] {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let _lock = lock_state_dir(&config.state_dir)?;
    if cfg!(feature = "fault-injection") {
        tracing::warn!("built with test-only fault injection: never run this build in production");
    }
    let control_socket = config.control_socket.clone();
    let control_group = config.control_socket_group.clone();
    let tcp = config.nbd_tcp_listen;

    let agent = Agent::start(config, tokio::runtime::Handle::current())
        .context("open registered volumes")?;
    let tcp_listener = match tcp {
        Some(addr) => Some(agent.listen_tcp(addr).await?),
        None => None,
    };
    let cluster = match agent.config.cluster.clone() {
        Some(config) => {
            Some(cluster::Cluster::start(Arc::clone(&agent), config).context("join the cluster")?)
        }
        None => None,
    };
    let metrics_server = match agent.config.metrics_listen {
        Some(addr) => Some(metrics::serve(addr, Arc::clone(&agent), cluster.clone()).await?),
        None => None,
    };
    let rest_server = match &agent.config.api {
        Some(api) => Some(rest_api::serve(api, cluster.clone()).await?),
        None => None,
    };
    let incoming = bind_control_socket(&control_socket, control_group.as_deref())?;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service = AgentServer::new(service::AgentService {
        agent: Arc::clone(&agent),
        cluster: cluster.clone(),
    });
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            }),
    );

    // Logged before the service manager hears of it: whoever waits for READY=1 finds it.
    tracing::info!(node = %agent.config.node_name, az = %agent.config.availability_zone,
        control_socket = %control_socket.display(),
        runtime_workers = tokio::runtime::Handle::current().metrics().num_workers(),
        "blockrepd ready");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let watchdog =
        sd_notify::watchdog_enabled().map(|interval| tokio::spawn(watchdog::ping(interval)));

    stop_signal.wait().await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    tracing::info!("stopping: draining NBD clients and flushing bitmaps");
    if let Some(listener) = tcp_listener {
        listener.abort();
    }
    if let Some(server) = metrics_server {
        server.abort();
    }
    if let Some(server) = rest_server {
        server.abort();
    }
    let _ = stop_tx.send(());
    if let Some(cluster) = &cluster {
        // A leading coordinator candidate gives the leadership up: another leads at once.
        cluster.resign().await;
        cluster.endpoint.close();
    }
    let drained = Arc::clone(&agent);
    tokio::task::spawn_blocking(move || drained.shut_down())
        .await
        .context("shut down volumes")?;
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "control server ended with an error"),
        Err(e) => tracing::warn!(error = %e, "control server task failed"),
    }
    let _ = std::fs::remove_file(&control_socket);
    tracing::info!("stopped");
    Ok(())
}

/// One daemon per state directory.
fn lock_state_dir(state_dir: &Path) -> anyhow::Result<Flock<File>> {
    let path = state_dir.join("lock");
    let file = File::create(&path).with_context(|| format!("open {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        anyhow::anyhow!(
            "{} is locked ({errno}): another blockrepd uses this state_dir",
            path.display()
        )
    })
}

/// The control socket: mode 0660, owned by root and, if configured, the operators' group.
fn bind_control_socket(
    path: &Path,
    group: Option<&str>,
) -> anyhow::Result<tokio_stream::wrappers::UnixListenerStream> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    remove_stale_socket(path).with_context(|| format!("remove stale {}", path.display()))?;
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("listen on {}", path.display()))?;
    set_mode(path, 0o660).with_context(|| format!("chmod {}", path.display()))?;
    if let Some(name) = group {
        let group = nix::unistd::Group::from_name(name)
            .with_context(|| format!("look up group {name}"))?
            .with_context(|| {
                format!("control_socket_group: there is no group named {name} (create it with groupadd --system {name})")
            })?;
        nix::unistd::chown(path, None, Some(group.gid))
            .with_context(|| format!("give {} to group {name}", path.display()))?;
    }
    Ok(tokio_stream::wrappers::UnixListenerStream::new(listener))
}

struct StopSignal {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignal {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("install SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("install SIGINT handler")?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM"),
            _ = self.int.recv() => tracing::info!("SIGINT"),
        }
    }
}
