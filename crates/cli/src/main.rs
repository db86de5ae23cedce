//! `blockrep`: the operator's command line, talking to the local blockrepd over gRPC.

mod coordinator_store;
mod ping;
mod render;
mod stdout;
mod wait;

use std::path::PathBuf;
use std::process::ExitCode;

use blockrep_api::proto::{self, agent_client::AgentClient};
use clap::{Parser, Subcommand, ValueEnum};
use tonic::transport::Channel;

use crate::render::Output;
use crate::stdout::sayln;

#[derive(Parser)]
#[command(
    name = "blockrep",
    version,
    about = "Control the blockrep agent on this host"
)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, env = "BLOCKREP_SOCKET", default_value = blockrep_api::DEFAULT_CONTROL_SOCKET, global = true)]
    socket: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table, global = true)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Volumes on this host.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// One line per volume (state, role, size, dirty bytes, clients), and its pair's state.
    Status,
    /// Certificates for the cluster, and reaching its nodes.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// The cluster's nodes, as the coordinator sees them.
    #[command(subcommand)]
    Node(NodeCommand),
    /// The coordinator's records: moved between stores (redb, etcd).
    #[command(subcommand)]
    Coordinator(CoordinatorCommand),
    /// Replication pairs.
    #[command(subcommand)]
    Pair(PairCommand),
    /// Replication consistency groups: pairs that replicate and fail over together.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Long operations.
    #[command(subcommand)]
    Job(JobCommand),
    /// The REST API (EVS v2, SDRS v1): its tokens.
    #[command(subcommand)]
    Api(ApiCommand),
    /// The most this agent's pairs send to their peers per second, together (streams,
    /// catch-ups and initial syncs): shown, or changed at once with LIMIT (a size per
    /// second such as 100MiB, at least 1MiB; or `off`). A restart goes back to
    /// `replication.max_bytes_per_sec`.
    SendLimit {
        #[arg(value_parser = parse_send_limit)]
        limit: Option<SendLimitArg>,
    },
}

/// A send limit as given on the command line.
#[derive(Clone, Copy)]
enum SendLimitArg {
    Off,
    BytesPerSec(u64),
}

impl SendLimitArg {
    /// As the API takes it: 0 for none.
    fn bytes_per_sec(self) -> u64 {
        match self {
            SendLimitArg::Off => 0,
            // 0 would mean none: refused as below the least.
            SendLimitArg::BytesPerSec(rate) => rate.max(1),
        }
    }
}

fn parse_send_limit(text: &str) -> Result<SendLimitArg, String> {
    if text == "off" {
        return Ok(SendLimitArg::Off);
    }
    blockrep_api::parse_size(text).map(SendLimitArg::BytesPerSec)
}

#[derive(Subcommand)]
enum CoordinatorCommand {
    /// Write every record of a coordinator's store as JSON lines (to --out, or stdout).
    Export {
        #[command(flatten)]
        from: coordinator_store::StoreArgs,
        /// The file to write (stdout if not given).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Read an export into an empty store (from --in, or stdin), while no coordinator runs
    /// on it.
    Import {
        #[command(flatten)]
        to: coordinator_store::StoreArgs,
        /// The export to read (stdin if not given).
        #[arg(long = "in")]
        input: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Create the cluster's CA in DIR (ca.pem, ca.key). Keep ca.key off the nodes.
    InitCa {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a node's certificate, signed by the CA in --ca-dir, into --out-dir
    /// (node.pem, node.key, ca.pem).
    IssueCert {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        node: String,
        #[arg(long)]
        out_dir: PathBuf,
        /// A coordinator's certificate: agents obey role commands and terms only from it.
        /// Only for the nodes that run the coordinator (`coordinator_role = true`).
        #[arg(long)]
        coordinator: bool,
    },
    /// Check that a node's QUIC endpoint accepts this node's certificate and answers.
    Ping {
        /// The node's cluster address (host:port).
        #[arg(long)]
        address: std::net::SocketAddr,
        /// Directory with node.pem, node.key and ca.pem (as issue-cert writes them).
        #[arg(long)]
        tls_dir: PathBuf,
        /// Present no certificate (to check that the node refuses such a peer).
        #[arg(long)]
        danger_no_certificate: bool,
        /// The node's name, as its certificate has it; by default the coordinator's.
        #[arg(long, default_value = blockrep_tls::COORDINATOR_NAME)]
        node: String,
    },
    /// Measure what one replication stream to a node moves (same TLS, framing and CRC as
    /// a pair; no disks).
    LinkTest {
        #[arg(long)]
        address: std::net::SocketAddr,
        /// Directory with node.pem, node.key and ca.pem.
        #[arg(long)]
        tls_dir: PathBuf,
        /// The node's name, as its certificate has it; by default the coordinator's.
        #[arg(long, default_value = blockrep_tls::COORDINATOR_NAME)]
        node: String,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// cubic or bbr, as `cluster.congestion_control` on the agents.
        #[arg(long, default_value = "cubic")]
        congestion_control: blockrep_transport::CongestionControl,
        /// The largest UDP payload to probe for, as `cluster.max_udp_payload` on the agents.
        #[arg(
            long,
            default_value_t = blockrep_transport::MAX_UDP_PAYLOAD,
            value_parser = clap::value_parser!(u16).range(
                i64::from(blockrep_transport::MIN_UDP_PAYLOAD)..=i64::from(blockrep_transport::MAX_UDP_PAYLOAD)
            ),
        )]
        max_udp_payload: u16,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// List the nodes.
    List,
}

#[derive(Subcommand)]
enum PairCommand {
    /// Create a replication pair; answers at once, with the job that follows it.
    Create {
        /// Up to 255 bytes.
        #[arg(long, default_value = "")]
        name: String,
        /// Up to 255 bytes.
        #[arg(long, default_value = "")]
        description: String,
        /// PRODUCTION,DR: volume ids, or names unique in the cluster.
        #[arg(long, value_delimiter = ',')]
        volumes: Vec<String>,
        /// The production volume's availability zone.
        #[arg(long)]
        priority_station: String,
        /// hypermetro (synchronous) or async.
        #[arg(long)]
        model: String,
    },
    /// List the pairs.
    List,
    /// Show one pair.
    Show {
        /// Pair id or name.
        pair: String,
    },
    /// Delete a pair (available or error): both volumes stay, the DR volume becomes writable.
    Delete {
        /// Pair id or name.
        pair: String,
    },
    /// Resolve a pair whose sides diverged (split brain, or a newer or unrelated DR volume):
    /// keep one zone's data; the other side's own changes are discarded by a full copy
    /// from the kept side, which is production afterwards.
    Resolve {
        /// Pair id or name.
        pair: String,
        /// The availability zone whose data is kept.
        #[arg(long)]
        keep: String,
    },
    /// Change a pair's settings while it replicates.
    Update {
        /// Pair id or name.
        pair: String,
        /// The most the pair sends to its DR side per second (stream, catch-ups and initial
        /// sync), beside the agent's own limit: a size per second such as 100MiB, at least
        /// 1MiB; or `off`. Its production agent takes it up within a second, and keeps it
        /// across restarts and a reverse.
        #[arg(long, value_parser = parse_send_limit)]
        max_rate: Option<SendLimitArg>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Compare both sides' checksums while the pair replicates (a job); report the ranges
    /// that differ.
    Verify {
        /// Pair id or name.
        pair: String,
        /// Copy the differing ranges again from production.
        #[arg(long)]
        repair: bool,
    },
}

#[derive(Subcommand)]
enum DrillCommand {
    /// Make a drill: for every DR volume of the group, a drill volume at the point (the
    /// newest if none is given), exported over NBD as NAME-PAIR by the DR agent.
    Create {
        /// Group id or name.
        group: String,
        /// Letters, digits, '-', '_' and '.'; unique in the cluster.
        #[arg(long)]
        name: String,
        /// An epoch of `group points`, or a time (RFC 3339): the newest point cut at or
        /// before it.
        #[arg(long, default_value = "")]
        point: String,
    },
    /// List the drills (of one group, if given).
    List {
        /// Group id or name.
        group: Option<String>,
    },
    /// Show one drill: its point and its drill volumes (node, export).
    Show {
        /// Drill id or name.
        drill: String,
    },
    /// Delete a drill: its drill volumes and what was written to them.
    Delete {
        /// Drill id or name.
        drill: String,
    },
    /// Verify a drill: each drill volume's image at the point (without the drill's own
    /// writes), 64 KiB block by block, against the CRCs production recorded for it. Waits
    /// for the end and fails if a block differs or a volume could not be verified.
    Verify {
        /// Drill id or name.
        drill: String,
        /// Start the verification and return; `drill verify --status` reports it.
        #[arg(long, conflicts_with = "status")]
        no_wait: bool,
        /// Report the last verification without starting one.
        #[arg(long)]
        status: bool,
    },
}

/// How long an async group's DR volumes keep points in time (docs/POINT-IN-TIME.md).
#[derive(clap::Args)]
struct RetentionArgs {
    /// Keep every point this young (`24h`, `7d`, `30m`; 0: no bound by age).
    #[arg(long, value_parser = humantime::parse_duration)]
    retention: Option<std::time::Duration>,
    /// Keep at most this much undo per DR volume (`10GiB`; 0: no bound by size).
    #[arg(long, value_parser = blockrep_api::parse_size)]
    retention_bytes: Option<u64>,
    /// Beyond `--retention`, keep one point per clock hour for this many hours more.
    #[arg(long)]
    keep_hourly: Option<u32>,
}

impl RetentionArgs {
    /// The retention asked for, if any was.
    fn asked(&self) -> Option<proto::Retention> {
        (self.retention.is_some() || self.retention_bytes.is_some() || self.keep_hourly.is_some())
            .then(|| proto::Retention {
                max_age_secs: self.retention.map_or(0, |d| d.as_secs()),
                max_bytes: self.retention_bytes.unwrap_or(0),
                keep_hourly: self.keep_hourly.unwrap_or(0),
            })
    }
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Create a consistency group of available pairs (none in another group), all with the
    /// group's priority station and model.
    Create {
        /// Up to 255 bytes.
        #[arg(long, default_value = "")]
        name: String,
        /// Up to 255 bytes.
        #[arg(long, default_value = "")]
        description: String,
        /// Pair ids, or names unique in the cluster.
        #[arg(long, value_delimiter = ',')]
        pairs: Vec<String>,
        /// The production volumes' availability zone.
        #[arg(long)]
        priority_station: String,
        /// hypermetro (synchronous) or async.
        #[arg(long)]
        model: String,
        #[command(flatten)]
        retention: RetentionArgs,
    },
    /// List the groups.
    List,
    /// Show one group: status, replication, fault level, pairs, consistent point.
    Show {
        /// Group id or name.
        group: String,
    },
    /// Rename, describe, add or remove pairs: only while the group is stopped (or empty).
    Update {
        /// Group id or name.
        group: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Pairs to add (ids or names).
        #[arg(long, value_delimiter = ',')]
        add_pairs: Vec<String>,
        /// Pairs to remove (ids or names).
        #[arg(long, value_delimiter = ',')]
        remove_pairs: Vec<String>,
        /// Replaces the retention of points (at any time; `--retention 0` with no
        /// `--retention-bytes` turns points off).
        #[command(flatten)]
        retention: RetentionArgs,
    },
    /// The group's points in time: every consistent point all its DR volumes still hold
    /// (epoch, cut time, bytes of undo behind it), oldest first.
    Points {
        /// Group id or name.
        group: String,
    },
    /// DR drills: writable images of the group's DR volumes at a point, served over NBD
    /// by the DR agents, while replication goes on.
    Drill {
        #[command(subcommand)]
        command: DrillCommand,
    },
    /// Delete a group with no pairs left (available or error).
    Delete {
        /// Group id or name.
        group: String,
    },
    /// Resume replication of every pair (a job: it ends when all are active).
    Sync {
        /// Group id or name.
        group: String,
    },
    /// Pause replication of every pair: writes go on, tracked in the bitmaps (a job: it
    /// ends when all are active-stopped). Needed before update.
    Stop {
        /// Group id or name.
        group: String,
    },
    /// Unplanned failover: the DR volumes roll to the group's last consistent point and take
    /// writes (works with the production zone down). The job reports the point reached and
    /// the write window lost; a production agent that comes back is fenced.
    Failover {
        /// Group id or name.
        group: String,
        /// Roll back to an earlier retained point instead (async groups with a retention):
        /// an epoch of `group points`, or a time (RFC 3339) for the newest point cut at or
        /// before it. The blocks rolled back are marked dirty for reprotect.
        #[arg(long)]
        point: Option<String>,
    },
    /// Planned switchover: production writes are refused and drained, the DR side catches
    /// up, the roles swap, and replication runs the other way. No data is lost.
    Reverse {
        /// Group id or name.
        group: String,
    },
    /// After a failover, with the old production zone back: its volumes become the DR side
    /// and receive only the blocks that differ; then the group replicates again.
    Reprotect {
        /// Group id or name.
        group: String,
    },
    /// Create an SDRS protection group: empty and unprotected (start it with `group sync`),
    /// its pairs made with `group add-pair`.
    CreateProtection {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        /// The production zone.
        #[arg(long)]
        source_az: String,
        /// The DR zone.
        #[arg(long)]
        target_az: String,
        /// The production site's VPC (kept for the SDRS API).
        #[arg(long, default_value = "default")]
        source_vpc: String,
        /// hypermetro (synchronous) or async.
        #[arg(long, default_value = "hypermetro")]
        model: String,
    },
    /// Make a pair for a protection group: its DR volume in a pool of the other zone, the
    /// pair, then the pair joins the group (a job; the group must be stopped or empty).
    AddPair {
        /// Group id or name.
        group: String,
        /// The production volume (id or name).
        #[arg(long)]
        volume: String,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Take a pair out of its group and delete it (a job; the group must be stopped).
    RemovePair {
        /// Pair id or name.
        pair: String,
        /// Delete its DR volume too (only a volume a pool made).
        #[arg(long)]
        delete_dr_volume: bool,
    },
    /// Grow both volumes of a pair of the group, online (both backings need the room).
    /// Clients see the new size when they connect again.
    Extend {
        /// Group id or name.
        group: String,
        /// Pair id or name.
        #[arg(long)]
        pair: String,
        /// The new size: bytes, or with a unit (8GiB, 512MiB).
        #[arg(long, value_parser = blockrep_api::parse_size)]
        size: u64,
    },
}

#[derive(Subcommand)]
enum ApiCommand {
    /// The tokens the REST API accepts in X-Auth-Token, one project each.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token for a project; it is printed once and only its hash is kept.
    Create {
        #[arg(long)]
        project: String,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List the tokens (never their secrets).
    List,
    /// Revoke a token at once.
    Revoke {
        /// Token id or name.
        token: String,
    },
}

#[derive(Subcommand)]
enum JobCommand {
    /// Show one job.
    Show { job: String },
    /// List the jobs.
    List,
    /// Wait for a job to end, showing its progress; exits non-zero if it fails.
    Wait {
        job: String,
        /// Give up after this many seconds (0: never).
        #[arg(long, default_value_t = 0)]
        timeout: u64,
    },
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Register a block device or file as a volume and export it over NBD.
    Add {
        #[arg(long)]
        name: String,
        /// Absolute path of a block device or regular file.
        #[arg(long)]
        path: PathBuf,
        /// `direct` (O_DIRECT) or `writeback` (host page cache; durable on FLUSH/FUA).
        #[arg(long, default_value = "direct")]
        cache: String,
        /// The project the volume belongs to (what the REST API's tokens see).
        #[arg(long, default_value = "default")]
        project: String,
    },
    /// Make a volume in this agent's storage pool ([pool]): a new file of SIZE, preallocated.
    Create {
        #[arg(long)]
        name: String,
        /// Bytes, or with a unit: 1GiB, 512MiB.
        #[arg(long, value_parser = blockrep_api::parse_size)]
        size: u64,
        #[arg(long, default_value = "default")]
        project: String,
    },
    /// Remove a volume the pool made, and its file (any other volume: `volume remove`).
    Delete {
        /// Volume id or name.
        volume: String,
    },
    /// List the volumes.
    List,
    /// Show one volume.
    Show {
        /// Volume id or name.
        volume: String,
    },
    /// Unregister a volume (refused while an NBD client is connected). Data is untouched.
    Remove {
        /// Volume id or name.
        volume: String,
    },
    /// List a volume's dirty extents.
    Dirty {
        /// Volume id or name.
        volume: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("blockrep: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blockrep: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let out = Output {
        json: cli.output == Format::Json,
    };
    let path = match &cli.command {
        Command::Volume(VolumeCommand::Add { path, .. }) => Some(absolute(path)?),
        _ => None,
    };
    let command = match cli.command {
        Command::Cluster(command) => return cluster_command(command, &out).await,
        Command::Coordinator(command) => return coordinator_command(command, &out),
        other => other,
    };
    let mut client: AgentClient<Channel> = blockrep_api::connect(&cli.socket).await?;
    match command {
        Command::Cluster(_) | Command::Coordinator(_) => unreachable!("handled above"),
        Command::Node(NodeCommand::List) => {
            let nodes = call(client.list_nodes(proto::ListNodesRequest {})).await?;
            out.print(&nodes);
        }
        Command::Pair(command) => match command {
            PairCommand::Create {
                name,
                description,
                volumes,
                priority_station,
                model,
            } => {
                let created = call(client.create_pair(proto::CreatePairRequest {
                    name,
                    description,
                    volumes,
                    priority_station,
                    replication_model: model,
                }))
                .await?;
                out.print(&created);
            }
            PairCommand::List => {
                let pairs = call(client.list_pairs(proto::ListPairsRequest {})).await?;
                out.print(&pairs);
            }
            PairCommand::Show { pair } => {
                let pair = call(client.get_pair(proto::PairRef { pair })).await?;
                out.print(&pair);
            }
            PairCommand::Resolve { pair, keep } => {
                let started =
                    call(client.resolve_pair(proto::ResolvePairRequest { pair, keep })).await?;
                out.print(&started);
            }
            PairCommand::Update {
                pair,
                max_rate,
                name,
                description,
            } => {
                let updated = call(client.update_pair(proto::UpdatePairRequest {
                    pair,
                    max_bytes_per_sec: max_rate.map(SendLimitArg::bytes_per_sec),
                    name,
                    description,
                }))
                .await?;
                out.print(&updated);
            }
            PairCommand::Verify { pair, repair } => {
                let started =
                    call(client.verify_pair(proto::VerifyPairRequest { pair, repair })).await?;
                out.print(&started);
            }
            PairCommand::Delete { pair } => {
                let deleted = call(client.delete_pair(proto::PairRef { pair })).await?;
                out.print(&deleted);
            }
        },
        Command::Group(command) => match command {
            GroupCommand::Create {
                name,
                description,
                pairs,
                priority_station,
                model,
                retention,
            } => {
                let created = call(client.create_group(proto::CreateGroupRequest {
                    name,
                    description,
                    pairs,
                    priority_station,
                    replication_model: model,
                    protection: None,
                    retention: retention.asked(),
                }))
                .await?;
                out.print(&created);
            }
            GroupCommand::List => {
                let groups = call(client.list_groups(proto::ListGroupsRequest {})).await?;
                out.print(&groups);
            }
            GroupCommand::Show { group } => {
                let group = call(client.get_group(proto::GroupRef { group })).await?;
                out.print(&group);
            }
            GroupCommand::Update {
                group,
                name,
                description,
                add_pairs,
                remove_pairs,
                retention,
            } => {
                let updated = call(client.update_group(proto::UpdateGroupRequest {
                    group,
                    name,
                    description,
                    add_pairs,
                    remove_pairs,
                    retention: retention.asked(),
                }))
                .await?;
                out.print(&updated);
            }
            GroupCommand::Drill { command } => match command {
                DrillCommand::Create { group, name, point } => {
                    let drill = call(client.create_drill(proto::CreateDrillRequest {
                        group,
                        name,
                        point,
                        drill_vpc_id: String::new(),
                    }))
                    .await?;
                    out.print(&drill);
                }
                DrillCommand::List { group } => {
                    let drills = call(client.list_drills(proto::ListDrillsRequest {
                        group: group.unwrap_or_default(),
                    }))
                    .await?;
                    out.print(&drills);
                }
                DrillCommand::Show { drill } => {
                    let drill = call(client.get_drill(proto::DrillRef { drill })).await?;
                    out.print(&drill);
                }
                DrillCommand::Delete { drill } => {
                    let drill = call(client.delete_drill(proto::DrillRef { drill })).await?;
                    out.print(&drill);
                }
                DrillCommand::Verify {
                    drill,
                    no_wait,
                    status,
                } => {
                    let ask = |start| proto::VerifyDrillRequest {
                        drill: drill.clone(),
                        start,
                    };
                    let mut verification = call(client.verify_drill(ask(!status))).await?;
                    while !verification.done && !no_wait && !status {
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        verification = call(client.verify_drill(ask(false))).await?;
                    }
                    out.print(&verification);
                    if verification.done && !no_wait {
                        render::check_drill_verification(&verification)?;
                    }
                }
            },
            GroupCommand::Points { group } => {
                let points = call(client.group_points(proto::GroupRef { group })).await?;
                out.print(&points);
            }
            GroupCommand::Delete { group } => {
                let deleted = call(client.delete_group(proto::GroupRef { group })).await?;
                out.print(&deleted);
            }
            GroupCommand::Sync { group } => {
                let started = call(client.sync_group(proto::GroupRef { group })).await?;
                out.print(&started);
            }
            GroupCommand::Stop { group } => {
                let started = call(client.stop_group(proto::GroupRef { group })).await?;
                out.print(&started);
            }
            GroupCommand::Failover { group, point: None } => {
                let started = call(client.failover_group(proto::GroupRef { group })).await?;
                out.print(&started);
            }
            GroupCommand::Failover {
                group,
                point: Some(point),
            } => {
                let started = call(
                    client.failover_group_to_point(proto::FailoverGroupRequest { group, point }),
                )
                .await?;
                out.print(&started);
            }
            GroupCommand::Reverse { group } => {
                let started = call(client.reverse_group(proto::GroupRef { group })).await?;
                out.print(&started);
            }
            GroupCommand::Reprotect { group } => {
                let started = call(client.reprotect_group(proto::GroupRef { group })).await?;
                out.print(&started);
            }
            GroupCommand::CreateProtection {
                name,
                description,
                source_az,
                target_az,
                source_vpc,
                model,
            } => {
                let created = call(client.create_group(proto::CreateGroupRequest {
                    name,
                    description,
                    pairs: Vec::new(),
                    priority_station: String::new(),
                    replication_model: model,
                    protection: Some(proto::ProtectionGroupSpec {
                        domain_id: blockrep_api::domain_id(&source_az, &target_az),
                        source_availability_zone: source_az,
                        target_availability_zone: target_az,
                        source_vpc_id: source_vpc,
                        dr_type: String::new(),
                    }),
                    retention: None,
                }))
                .await?;
                out.print(&created);
            }
            GroupCommand::AddPair {
                group,
                volume,
                name,
            } => {
                let started = call(client.add_group_pair(proto::AddGroupPairRequest {
                    group,
                    volume,
                    name,
                    description: String::new(),
                }))
                .await?;
                out.print(&started);
            }
            GroupCommand::RemovePair {
                pair,
                delete_dr_volume,
            } => {
                let started = call(client.remove_group_pair(proto::RemoveGroupPairRequest {
                    pair,
                    delete_dr_volume,
                }))
                .await?;
                out.print(&started);
            }
            GroupCommand::Extend { group, pair, size } => {
                let started = call(client.extend_group(proto::ExtendGroupRequest {
                    group,
                    pair,
                    size_bytes: size,
                }))
                .await?;
                out.print(&started);
            }
        },
        Command::Api(ApiCommand::Token(command)) => match command {
            TokenCommand::Create { project, name } => {
                let created = call(client.create_api_token(proto::CreateApiTokenRequest {
                    project_id: project,
                    name,
                }))
                .await?;
                out.print(&created);
            }
            TokenCommand::List => {
                let list = call(client.list_api_tokens(proto::ListApiTokensRequest {})).await?;
                out.print(&list);
            }
            TokenCommand::Revoke { token } => {
                let revoked = call(client.revoke_api_token(proto::ApiTokenRef { token })).await?;
                out.print(&revoked);
            }
        },
        Command::Job(command) => match command {
            JobCommand::Show { job } => {
                let job = call(client.get_job(proto::JobRef { job })).await?;
                out.print(&job);
            }
            JobCommand::List => {
                let jobs = call(client.list_jobs(proto::ListJobsRequest {})).await?;
                out.print(&jobs);
            }
            JobCommand::Wait { job, timeout } => {
                wait::wait_for_job(&mut client, &job, timeout, &out).await?;
            }
        },
        Command::Status => {
            let status = call(client.status(proto::StatusRequest {})).await?;
            // The groups this node's pairs are in, as the coordinator sees them, if it
            // answers at once: the local status stands on its own.
            let groups = if status.clustered && !status.pairs.is_empty() {
                let asked = client.list_groups(proto::ListGroupsRequest {});
                match tokio::time::timeout(std::time::Duration::from_secs(1), asked).await {
                    Ok(Ok(groups)) => groups.into_inner().groups,
                    _ => Vec::new(),
                }
            } else {
                Vec::new()
            };
            out.print(&render::NodeStatus::new(status, groups));
        }
        Command::SendLimit { limit } => {
            let shown = match limit {
                None => call(client.get_send_limit(proto::GetSendLimitRequest {})).await?,
                Some(limit) => {
                    let max_bytes_per_sec = limit.bytes_per_sec();
                    call(client.set_send_limit(proto::SendLimit { max_bytes_per_sec })).await?
                }
            };
            out.print(&shown);
        }
        Command::Volume(command) => match command {
            VolumeCommand::Add {
                name,
                cache,
                project,
                ..
            } => {
                let path = path.expect("set above").display().to_string();
                let request = proto::AddVolumeRequest {
                    name,
                    path,
                    cache_mode: cache,
                    project_id: project,
                };
                let volume = call(client.add_volume(request)).await?;
                out.print(&volume);
            }
            VolumeCommand::Create {
                name,
                size,
                project,
            } => {
                let volume = call(client.create_volume(proto::CreateVolumeRequest {
                    name,
                    size_bytes: size,
                    project_id: project,
                }))
                .await?;
                out.print(&volume);
            }
            VolumeCommand::Delete { volume } => {
                let removed = call(client.delete_volume(proto::VolumeRef { volume })).await?;
                out.print(&removed);
            }
            VolumeCommand::List => {
                let list = call(client.list_volumes(proto::ListVolumesRequest {})).await?;
                out.print(&list);
            }
            VolumeCommand::Show { volume } => {
                let volume = call(client.get_volume(proto::VolumeRef { volume })).await?;
                out.print(&volume);
            }
            VolumeCommand::Remove { volume } => {
                let removed = call(client.remove_volume(proto::VolumeRef { volume })).await?;
                out.print(&removed);
            }
            VolumeCommand::Dirty { volume } => {
                let extents = call(client.get_dirty_extents(proto::VolumeRef { volume })).await?;
                out.print(&extents);
            }
        },
    }
    Ok(())
}

/// Paths are sent to the daemon absolute, so they mean what they mean here.
fn absolute(path: &std::path::Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).map_err(|e| anyhow::anyhow!("path {}: {e}", path.display()))
}

/// Runs the commands that need no daemon: certificates, and reaching a node.
fn coordinator_command(command: CoordinatorCommand, out: &Output) -> anyhow::Result<()> {
    let (what, records) = match command {
        CoordinatorCommand::Export { from, out: file } => {
            let to_stdout = file.is_none();
            let records = coordinator_store::export(from, file)?;
            if to_stdout {
                // The records are the output: the count goes to stderr.
                eprintln!("exported {records} records");
                return Ok(());
            }
            ("exported", records)
        }
        CoordinatorCommand::Import { to, input } => {
            ("imported", coordinator_store::import(to, input)?)
        }
    };
    if out.json {
        sayln!("{}", serde_json::json!({ what: records }));
    } else {
        sayln!("{what} {records} records");
    }
    Ok(())
}

async fn cluster_command(command: ClusterCommand, out: &Output) -> anyhow::Result<()> {
    match command {
        ClusterCommand::InitCa { dir } => {
            let cert = blockrep_tls::init_ca(&absolute(&dir)?)?;
            if !out.json {
                sayln!(
                    "cluster CA written: {} (and ca.key beside it: keep it safe)",
                    cert.display()
                );
            } else {
                sayln!("{}", serde_json::json!({ "ca_cert": cert }));
            }
        }
        ClusterCommand::IssueCert {
            ca_dir,
            node,
            out_dir,
            coordinator,
        } => {
            let role = if coordinator {
                blockrep_tls::CertRole::Coordinator
            } else {
                blockrep_tls::CertRole::Agent
            };
            let cert =
                blockrep_tls::issue_cert(&absolute(&ca_dir)?, &node, role, &absolute(&out_dir)?)?;
            let what = if coordinator {
                "coordinator certificate"
            } else {
                "certificate"
            };
            if !out.json {
                sayln!("{what} for node {node} written: {}", cert.display());
            } else {
                sayln!(
                    "{}",
                    serde_json::json!({ "node": node, "cert": cert, "coordinator": coordinator })
                );
            }
        }
        ClusterCommand::Ping {
            address,
            tls_dir,
            danger_no_certificate,
            node,
        } => {
            ping::ping(
                address,
                &node,
                &absolute(&tls_dir)?,
                danger_no_certificate,
                out,
            )
            .await?
        }
        ClusterCommand::LinkTest {
            address,
            tls_dir,
            node,
            seconds,
            congestion_control,
            max_udp_payload,
        } => {
            let settings = blockrep_transport::TransportSettings {
                congestion: congestion_control,
                max_udp_payload,
                ..Default::default()
            };
            ping::link_test(address, &absolute(&tls_dir)?, &node, seconds, settings, out).await?
        }
    }
    Ok(())
}

async fn call<T>(
    request: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    match request.await {
        Ok(response) => Ok(response.into_inner()),
        Err(status) => {
            let code = status
                .metadata()
                .get(blockrep_api::model::CODE_METADATA)
                .and_then(|v| v.to_str().ok())
                .map(|c| format!(" ({c})"))
                .unwrap_or_default();
            Err(anyhow::anyhow!(
                "{}{code}: {}",
                code_name(status.code()),
                status.message()
            ))
        }
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::FailedPrecondition => "refused",
        tonic::Code::Unavailable => "daemon unavailable",
        _ => "error",
    }
}
