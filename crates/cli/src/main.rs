//! `blockrep`: the operator's command line, talking to the local blockrepd over gRPC.

mod render;

use std::path::PathBuf;
use std::process::ExitCode;

use blockrep_api::proto::{self, agent_client::AgentClient};
use clap::{Parser, Subcommand, ValueEnum};
use tonic::transport::Channel;

use crate::render::Output;

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
    /// One line per volume: state, size, dirty bytes, clients.
    Status,
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
    let mut client: AgentClient<Channel> = blockrep_api::connect(&cli.socket).await?;
    match cli.command {
        Command::Status => {
            let status = call(client.status(proto::StatusRequest {})).await?;
            out.print(&status);
        }
        Command::Volume(command) => match command {
            VolumeCommand::Add { name, cache, .. } => {
                let path = path.expect("set above").display().to_string();
                let request = proto::AddVolumeRequest {
                    name,
                    path,
                    cache_mode: cache,
                };
                let volume = call(client.add_volume(request)).await?;
                out.print(&volume);
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

async fn call<T>(
    request: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    match request.await {
        Ok(response) => Ok(response.into_inner()),
        Err(status) => Err(anyhow::anyhow!(
            "{}: {}",
            code_name(status.code()),
            status.message()
        )),
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
