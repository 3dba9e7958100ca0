//! `hearthd`: the Hearth daemon, one binary with roles.
//!
//! - `hearthd dev`: the embedded default for a laptop or a CI box: the API, a
//!   node agent and a one-member control plane (Raft group) in one process.
//! - `hearthd control --id N --peers ID=ADDR,...`: a control-plane member.
//! - `hearthd agent --control ADDR,...`: a node agent that registers with the
//!   control plane and serves its node-local API.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use hearth_agent::{Agent, AgentConfig};
use hearth_vmm::AccelChoice;

mod roles;

#[derive(Parser)]
#[command(name = "hearthd", version, about = "Hearth daemon")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the API server and a node agent in one process (single-node cluster).
    Dev(DevArgs),
    /// Run a control-plane member: Raft-replicated state, scheduler, public API.
    Control(roles::ControlArgs),
    /// Run a node agent that joins a control plane.
    Agent(roles::AgentArgs),
}

#[derive(clap::Args)]
struct DevArgs {
    /// Where images, sandboxes and logs live.
    #[arg(long, env = "HEARTH_DATA_DIR", default_value = "/var/lib/hearth")]
    data_dir: PathBuf,
    /// Address of the HTTP API.
    #[arg(long, env = "HEARTH_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Guest kernel (default: ~/.cache/hearth/current/vmlinux, built by scripts/setup).
    #[arg(long, env = "HEARTH_KERNEL")]
    kernel: Option<PathBuf>,
    /// Guest initramfs (default: ~/.cache/hearth/current/initramfs.cpio.gz).
    #[arg(long, env = "HEARTH_INITRD")]
    initrd: Option<PathBuf>,
    /// QEMU binary.
    #[arg(long, env = "HEARTH_QEMU", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// qemu-img binary.
    #[arg(long, env = "HEARTH_QEMU_IMG", default_value = "qemu-img")]
    qemu_img: PathBuf,
    /// Accelerator: auto (probe KVM, fall back to TCG), kvm or tcg.
    #[arg(long, env = "HEARTH_ACCEL", default_value = "auto")]
    accel: AccelChoice,
    /// This node's name.
    #[arg(long, env = "HEARTH_NODE", default_value = "local")]
    node: String,
}

fn cache_dir() -> PathBuf {
    std::env::var_os("HEARTH_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/hearth")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache/hearth"))
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Dev(a) => dev(a).await,
        Cmd::Control(a) => roles::control(a).await,
        Cmd::Agent(a) => roles::agent(a).await,
    }
}

async fn dev(a: DevArgs) -> Result<()> {
    let current = cache_dir().join("current");
    let cfg = AgentConfig {
        data_dir: a.data_dir.clone(),
        kernel: a.kernel.unwrap_or_else(|| current.join("vmlinux")),
        initrd: a
            .initrd
            .unwrap_or_else(|| current.join("initramfs.cpio.gz")),
        qemu: a.qemu,
        qemu_img: a.qemu_img,
        accel: a.accel,
        node: a.node,
    };
    let agent = Agent::start(cfg).await.context("starting the node agent")?;
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| {
            format!(
                "binding the API to {}; is another hearthd running?",
                a.listen
            )
        })?;
    let local = listener.local_addr()?;
    let cp = roles::embedded_control_plane(&a.data_dir, local).await?;
    roles::spawn_link(agent.clone(), roles::dev_link(&agent, local));
    let app =
        hearth_control::router(agent.clone()).merge(hearth_control::cluster::cluster_routes(cp));
    let info = agent.info();
    tracing::info!(
        "hearthd dev: API on http://{} (data {}, backend {}, accel {})",
        listener.local_addr()?,
        a.data_dir.display(),
        info.backend,
        info.accel
    );
    axum_serve(listener, app).await
}

pub(crate) async fn axum_serve(listener: tokio::net::TcpListener, app: axum::Router) -> Result<()> {
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        tracing::info!("shutting down");
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving the API")
}
