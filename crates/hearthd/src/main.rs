//! `hearthd`: the Hearth daemon. `hearthd dev` is the embedded default: the API
//! server and a node agent in one process, for a laptop or a CI box.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use hearth_agent::{Agent, AgentConfig};
use hearth_vmm::AccelChoice;

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
    /// A registry (HOST[:PORT]) to pull from over plain HTTP (repeatable). Loopback
    /// registries always are; every other one must speak HTTPS unless listed here.
    #[arg(
        long = "insecure-registry",
        env = "HEARTH_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    insecure_registries: Vec<String>,
    /// Seconds to wait for a registry's answer (or the next bytes of a blob) before failing.
    #[arg(long, env = "HEARTH_REGISTRY_TIMEOUT", default_value_t = 30)]
    registry_timeout: u64,
    /// Largest uncompressed layer an image may have, in bytes.
    #[arg(long, env = "HEARTH_MAX_LAYER_BYTES")]
    max_layer_bytes: Option<u64>,
    /// Most tar entries an image may have across its layers.
    #[arg(long, env = "HEARTH_MAX_IMAGE_ENTRIES")]
    max_image_entries: Option<u64>,
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
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Dev(a) => dev(a).await,
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
        image_limits: {
            let mut l = hearth_image::Limits::default();
            if let Some(b) = a.max_layer_bytes {
                l.max_layer_bytes = b;
            }
            if let Some(n) = a.max_image_entries {
                l.max_entries = n;
            }
            l
        },
        insecure_registries: a.insecure_registries,
        registry_timeout: std::time::Duration::from_secs(a.registry_timeout.max(1)),
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
    let info = agent.info();
    tracing::info!(
        "hearthd dev: API on http://{} (data {}, backend {}, accel {})",
        listener.local_addr()?,
        a.data_dir.display(),
        info.backend,
        info.accel
    );
    axum_serve(listener, hearth_control::router(agent)).await
}

async fn axum_serve(listener: tokio::net::TcpListener, app: axum::Router) -> Result<()> {
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
