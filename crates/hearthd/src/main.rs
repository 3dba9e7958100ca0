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

mod ingress;
mod leases;
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
    /// Seconds a running guest may take to answer a ping before it is
    /// reported hung and stopped (0 disables the watchdog).
    #[arg(long, env = "HEARTH_GUEST_WATCHDOG_SECS", default_value_t = 30)]
    guest_watchdog_secs: u64,
    /// Largest output log kept per sandbox, in MiB; later output is discarded.
    /// At most 512: a migration sends the log whole during the pre-copy, and
    /// a target takes at most [`hearth_control::MAX_LOG_BODY`] (a
    /// bigger log refused every move of its sandbox; review20 R20-1).
    #[arg(long, env = "HEARTH_MAX_LOG_MIB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=(hearth_control::MAX_LOG_BODY >> 20) as u64))]
    max_log_mib: u64,
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
    #[command(flatten)]
    net: NetArgs,
    /// Serve the ingress proxy (`<port>-<sandbox>.<domain>` and
    /// `/sandboxes/<sandbox>/ports/<port>/...`) on this address.
    #[arg(long, env = "HEARTH_INGRESS_LISTEN")]
    ingress_listen: Option<SocketAddr>,
    /// Domain of ingress host names.
    #[arg(
        long,
        env = "HEARTH_INGRESS_DOMAIN",
        default_value = "hearth.localhost"
    )]
    ingress_domain: String,
}

/// Sandbox networking of this node.
#[derive(clap::Args)]
pub(crate) struct NetArgs {
    /// This node's slice of the cluster CIDR; sandboxes get /32s from it.
    /// Default: the next free /24 of 10.88.0.0/16, handed out by the control
    /// plane when the node first joins and kept for it afterwards.
    #[arg(long, env = "HEARTH_NET_POOL")]
    net_pool: Option<hearth_net::Cidr>,
    /// Run every sandbox without a network (no taps, NAT or BPF).
    #[arg(long, env = "HEARTH_NO_NETWORK")]
    no_network: bool,
    /// Nameservers for sandboxes (default: the host's non-loopback ones).
    #[arg(long = "dns", env = "HEARTH_DNS", value_delimiter = ',')]
    dns: Vec<std::net::Ipv4Addr>,
}

impl NetArgs {
    pub(crate) fn enabled(&self) -> bool {
        !self.no_network
    }

    /// The slice to ask the control plane for: `--net-pool`, or else the
    /// pool this node's sandboxes still hold addresses of (recorded in
    /// `<data>/net/leases.json`), so a control plane that lost its state
    /// gives the node its old slice back; `None` lets the control plane pick.
    pub(crate) fn want(&self, data_dir: &std::path::Path) -> Option<String> {
        self.net_pool.map(|c| c.to_string()).or_else(|| {
            hearth_net::ipam::recorded_pool(&data_dir.join("net"))
                .filter(|(_, leased)| *leased > 0)
                .map(|(pool, _)| pool.to_string())
        })
    }

    /// The node's networking, with `pool` the slice the control plane granted.
    pub(crate) fn config(
        &self,
        data_dir: &std::path::Path,
        pool: &str,
    ) -> Result<Option<hearth_net::NetConfig>> {
        if self.no_network {
            return Ok(None);
        }
        let pool: hearth_net::Cidr = pool.parse().map_err(|e| {
            anyhow::anyhow!("the control plane granted the address slice {pool}: {e}")
        })?;
        let dns = if self.dns.is_empty() {
            host_nameservers()
        } else {
            self.dns.clone()
        };
        Ok(Some(hearth_net::NetConfig {
            pool,
            state_dir: data_dir.join("net"),
            dns,
        }))
    }
}

/// IPv4 nameservers of the host's /etc/resolv.conf, loopback ones left out
/// (a guest cannot reach the host's 127.0.0.53).
fn host_nameservers() -> Vec<std::net::Ipv4Addr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback())
        .collect()
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
    // why: bind first, so a second daemon on the same port fails before it
    // touches the data dir.
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| {
            format!(
                "binding the API to {}; is another hearthd running?",
                a.listen
            )
        })?;
    let local = listener.local_addr()?;
    create_private_dir(&a.data_dir)?;
    // why: the embedded store opens before the agent takes the data dir's
    // lock; a second daemon on this data dir must still get the agent's answer.
    hearth_agent::ensure_data_dir_free(&a.data_dir)?;
    let token = load_or_create_token(&a.data_dir)?;
    // The embedded control plane comes first: it hands out the node's address
    // slice and leases, which the agent needs from its start.
    let cp = roles::embedded_control_plane(&a.data_dir, local, &token).await?;
    let (net, leases) = if a.net.enabled() {
        let instance = hearth_agent::control_link::instance_id(&a.data_dir)?;
        let auth = leases::StoreLeases {
            store: cp.store().clone(),
            node: a.node.clone(),
            instance,
        };
        let want = a
            .net
            .want(&a.data_dir)
            .map(|w| w.parse::<hearth_store::Cidr>())
            .transpose()
            .map_err(|e| anyhow::anyhow!("--net-pool: {e}"))?;
        let slice = auth.join(want).await?;
        let auth: std::sync::Arc<dyn hearth_agent::leases::LeaseAuthority> =
            std::sync::Arc::new(auth);
        (a.net.config(&a.data_dir, &slice.to_string())?, Some(auth))
    } else {
        (None, None)
    };
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
        net,
        leases,
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
        guest_watchdog: std::time::Duration::from_secs(a.guest_watchdog_secs),
        max_log_bytes: a.max_log_mib.saturating_mul(1024 * 1024),
    };
    let agent = Agent::start(cfg).await.context("starting the node agent")?;
    roles::spawn_link(agent.clone(), roles::dev_link(&agent, local, &token));
    let app = hearth_control::dev_router(agent.clone(), cp.clone(), token.clone())
        .merge(hearth_control::cluster::cluster_routes(cp, token));
    let info = agent.info();
    tracing::info!(
        "hearthd dev: API on http://{} (data {}, backend {}, accel {})",
        listener.local_addr()?,
        a.data_dir.display(),
        info.backend,
        info.accel
    );
    if let Some(addr) = a.ingress_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the ingress proxy to {addr}"))?;
        agent.set_ingress(hearth_api::network::IngressInfo {
            domain: a.ingress_domain.clone(),
            listen: Some(l.local_addr()?.to_string()),
        });
        tracing::info!(
            "ingress on http://{} (<port>-<sandbox>.{})",
            l.local_addr()?,
            a.ingress_domain
        );
        let app = hearth_ingress::router(&a.ingress_domain, ingress::AgentResolver(agent.clone()))
            .into_make_service_with_connect_info::<std::net::SocketAddr>();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(l, app).await {
                tracing::error!("ingress stopped: {e}");
            }
        });
    }
    let served = axum_serve(listener, app).await;
    close_pools(&agent).await;
    served
}

/// How long a shutdown waits for the warm pools to give back their VMs.
const POOL_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// Ends the warm pools' VMs on shutdown so their networks and address leases
/// are given back (a stopped agent must not keep its slice taken), bounded by
/// [`POOL_CLOSE_WAIT`]; what is left then is reaped at the next start.
pub(crate) async fn close_pools(agent: &Agent) {
    if tokio::time::timeout(POOL_CLOSE_WAIT, agent.close_pools())
        .await
        .is_err()
    {
        tracing::warn!(
            "the warm pools did not close within {POOL_CLOSE_WAIT:?} (a pool fill \
             or a pool network release still running); their VMs and networks are \
             reaped at the next start"
        );
    }
}

/// Creates the data dir readable by this user only (the agent also enforces
/// 0700 when it starts; the store and token are written before that).
pub(crate) fn create_private_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// The API token: `HEARTH_TOKEN`, else DATA/api-token, created (0600) on first start.
pub(crate) fn load_or_create_token(data_dir: &std::path::Path) -> Result<hearth_control::ApiToken> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(t) = std::env::var("HEARTH_TOKEN") {
        return hearth_control::ApiToken::new(t).map_err(anyhow::Error::msg);
    }
    let path = data_dir.join("api-token");
    match std::fs::read_to_string(&path) {
        Ok(t) => {
            return hearth_control::ApiToken::new(t.trim().to_string())
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut raw = [0u8; 24];
    getrandom::fill(&mut raw)
        .map_err(|e| anyhow::anyhow!("no randomness for the API token: {e}"))?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = data_dir.join("api-token.tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("creating {}", path.display()))?;
    tracing::info!("created the API token in {}", path.display());
    hearth_control::ApiToken::new(token).map_err(anyhow::Error::msg)
}

/// Serves until SIGINT/SIGTERM, then exits promptly: streaming clients are cut
/// off, and VMs keep running in their own sessions (the next start of hearthd
/// finds them).
pub(crate) async fn axum_serve(listener: tokio::net::TcpListener, app: axum::Router) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        // why: handlers see the peer's address (a migration offer's tunnel
        // favours the connections from it).
        r = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        ) => r.context("serving the API"),
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("SIGINT: shutting down");
            Ok(())
        }
        _ = term.recv() => {
            tracing::info!("SIGTERM: shutting down");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    /// review20 R20-1: a log cap a migration's target would not take is
    /// refused at start, naming the bound.
    #[test]
    fn a_log_cap_over_what_a_migration_takes_is_refused() {
        let e = super::Cli::try_parse_from(["hearthd", "dev", "--max-log-mib", "513"])
            .err()
            .expect("513 MiB let in");
        assert!(e.to_string().contains("1..=512"), "{e}");
        assert!(super::Cli::try_parse_from(["hearthd", "dev", "--max-log-mib", "512"]).is_ok());
    }
}
