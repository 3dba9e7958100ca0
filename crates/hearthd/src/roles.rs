//! The `control` and `agent` roles, and the control plane embedded in `dev`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hearth_agent::control_link::{self, LinkConfig};
use hearth_agent::leases::{join_network, ControlLeases, LeaseAuthority};
use hearth_agent::{Agent, AgentConfig};
use hearth_control::cluster::{ControlConfig, ControlPlane};
use hearth_control::ApiToken;
use hearth_store::{Store, StoreConfig};
use hearth_vmm::AccelChoice;

use crate::{axum_serve, cache_dir, load_or_create_token};

#[derive(clap::Args)]
pub struct ControlArgs {
    /// This member's Raft id (a positive integer, unique in the group).
    #[arg(long)]
    id: u64,
    /// Initial members including this one: `ID=HOST:PORT,...`. The lowest id
    /// bootstraps the group on first start. Omit to start empty and be added
    /// with `hearth cluster add`.
    #[arg(long, default_value = "")]
    peers: String,
    /// Address of the public API and Raft RPCs (default: this member's peer address).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Where this member's `control.redb` lives.
    #[arg(long, env = "HEARTH_DATA_DIR")]
    data_dir: PathBuf,
    /// A node that sends no heartbeat for this long becomes NotReady.
    #[arg(long, default_value_t = 5000)]
    node_timeout_ms: u64,
    /// Snapshot (and compact the Raft log) every this many entries.
    #[arg(long, default_value_t = 1000)]
    snapshot_every: u64,
    /// How long a node may take to accept a sandbox start. A record still
    /// not started after twice this is marked failed (or, with
    /// `restart=always`, started again).
    #[arg(long, default_value_t = 30_000)]
    start_timeout_ms: u64,
    /// A live migration with neither a new phase nor advancing progress
    /// (bytes sent, iterations) for this long is past its deadline and is
    /// resolved on the nodes' evidence (see docs/migration.md). At least
    /// 30 s, and never less than a migration's own pre-copy bound + 60 s.
    #[arg(long, default_value_t = hearth_store::MIGRATION_STALL_MS)]
    migration_stall_ms: u64,
    /// Serve the cluster ingress (`<port>-<sandbox>.<domain>` and
    /// `/sandboxes/<sandbox>/ports/<port>/...`) on this address: requests are
    /// relayed to the node agent that runs the sandbox.
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

#[derive(clap::Args)]
pub struct AgentArgs {
    /// Control-plane members to register with: `HOST:PORT,...`.
    #[arg(long, value_delimiter = ',', required = true)]
    control: Vec<String>,
    /// This node's id in the cluster.
    #[arg(long, env = "HEARTH_NODE")]
    node: String,
    /// Address of the node-local API.
    #[arg(long, default_value = "127.0.0.1:7071")]
    listen: SocketAddr,
    /// URL the control plane uses to reach this agent (default: http://LISTEN).
    #[arg(long)]
    advertise: Option<String>,
    /// Node labels: `key=value,...`.
    #[arg(long, default_value = "")]
    labels: String,
    /// vCPUs offered (default: the host's).
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory offered in MiB (default: the host's).
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Disk offered in MiB (default: free space of the data dir).
    #[arg(long)]
    disk_mib: Option<u64>,
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    #[arg(long, env = "HEARTH_DATA_DIR", default_value = "/var/lib/hearth")]
    data_dir: PathBuf,
    #[arg(long, env = "HEARTH_KERNEL")]
    kernel: Option<PathBuf>,
    #[arg(long, env = "HEARTH_INITRD")]
    initrd: Option<PathBuf>,
    #[arg(long, env = "HEARTH_QEMU", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    #[arg(long, env = "HEARTH_QEMU_IMG", default_value = "qemu-img")]
    qemu_img: PathBuf,
    #[arg(long, env = "HEARTH_ACCEL", default_value = "auto")]
    accel: AccelChoice,
    #[command(flatten)]
    net: crate::NetArgs,
}

fn parse_peers(s: &str) -> Result<BTreeMap<u64, String>> {
    let mut m = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .with_context(|| format!("peer {part} is not ID=HOST:PORT"))?;
        let id: u64 = id
            .parse()
            .with_context(|| format!("peer id {id} is not a number"))?;
        if m.insert(id, addr.to_string()).is_some() {
            bail!("peer id {id} appears twice in --peers");
        }
    }
    Ok(m)
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("label {kv} is not key=value"))
        })
        .collect()
}

pub async fn control(a: ControlArgs) -> Result<()> {
    let peers = parse_peers(&a.peers)?;
    let listen = match (a.listen, peers.get(&a.id)) {
        (Some(l), _) => l,
        (None, Some(addr)) => addr.parse().with_context(|| {
            format!(
                "--peers gives member {} the address {addr}; pass --listen",
                a.id
            )
        })?,
        (None, None) => bail!(
            "pass --listen, or list this member (id {}) in --peers",
            a.id
        ),
    };
    if !peers.is_empty() && !peers.contains_key(&a.id) {
        bail!("--peers must include this member (id {})", a.id);
    }
    // why: bind before opening the store, so peers reach us as soon as Raft starts.
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the control API to {listen}"))?;
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("creating {}", a.data_dir.display()))?;
    // why: every member and agent of a cluster shares one token (HEARTH_TOKEN).
    let token = load_or_create_token(&a.data_dir)?;
    let mut cfg = StoreConfig::new(a.id, a.data_dir.clone(), peers);
    cfg.snapshot_every = a.snapshot_every;
    cfg.token = Some(token.secret().to_string());
    let store = Store::open(cfg)
        .await
        .with_context(|| format!("starting control-plane member {}", a.id))?;
    let cp = ControlPlane::new(
        store,
        ControlConfig {
            node_timeout: Duration::from_millis(a.node_timeout_ms),
            start_timeout: Duration::from_millis(a.start_timeout_ms.max(100)),
            migration_stall: Duration::from_millis(a.migration_stall_ms.max(30_000)),
            ingress: a
                .ingress_listen
                .map(|addr| hearth_api::network::IngressInfo {
                    domain: a.ingress_domain.clone(),
                    listen: Some(addr.to_string()),
                }),
            ..Default::default()
        },
        &token,
    );
    cp.spawn_background();
    if let Some(addr) = a.ingress_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the ingress proxy to {addr}"))?;
        tracing::info!(
            "cluster ingress on http://{} (<port>-<sandbox>.{})",
            l.local_addr()?,
            a.ingress_domain
        );
        let app = hearth_ingress::router(
            &a.ingress_domain,
            crate::ingress::ClusterResolver {
                cp: cp.clone(),
                credential: hearth_ingress::relay_credential(token.secret()),
            },
        );
        tokio::spawn(async move {
            let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
            if let Err(e) = axum::serve(l, app).await {
                tracing::error!("ingress stopped: {e}");
            }
        });
    }
    tracing::info!(
        "hearthd control: member {} serving on http://{} (data {})",
        a.id,
        listener.local_addr()?,
        a.data_dir.display()
    );
    axum_serve(listener, hearth_control::cluster::router(cp, token)).await
}

pub async fn agent(a: AgentArgs) -> Result<()> {
    let current = cache_dir().join("current");
    let labels = parse_labels(&a.labels)?;
    crate::create_private_dir(&a.data_dir)?;
    hearth_agent::ensure_data_dir_free(&a.data_dir)?;
    let token = load_or_create_token(&a.data_dir)?;
    // The node's address slice comes from the control plane before anything
    // runs here; every sandbox address is then leased through it.
    let (net, leases) = if a.net.enabled() {
        let instance = control_link::instance_id(&a.data_dir)?;
        let leases = ControlLeases::new(
            a.control.clone(),
            a.node.clone(),
            instance,
            Some(token.secret()),
        );
        let slice = join_network(&leases, a.net.want(&a.data_dir), Duration::from_secs(120))
            .await
            .with_context(|| format!("node {} joining the cluster network", a.node))?;
        tracing::info!("node {}: sandbox addresses from {slice}", a.node);
        let leases: Arc<dyn LeaseAuthority> = Arc::new(leases);
        (a.net.config(&a.data_dir, &slice)?, Some(leases))
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
        node: a.node.clone(),
        image_limits: hearth_image::Limits::default(),
        insecure_registries: Vec::new(),
        registry_timeout: Duration::from_secs(30),
        guest_watchdog: Duration::from_secs(30),
        max_log_bytes: 256 * 1024 * 1024,
        net,
        leases,
    };
    let agent = Agent::start(cfg).await.context("starting the node agent")?;
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding the node API to {}", a.listen))?;
    let local = listener.local_addr()?;
    let link = LinkConfig {
        controls: a.control,
        node: a.node.clone(),
        advertise: a.advertise.unwrap_or_else(|| format!("http://{local}")),
        labels,
        cpus: a.cpus,
        memory_mib: a.memory_mib,
        disk_mib: a.disk_mib,
        heartbeat: Duration::from_millis(a.heartbeat_ms),
        token: Some(token.secret().to_string()),
    };
    tracing::info!("hearthd agent: node {} API on http://{local}", a.node);
    // why: a cluster ingress relays requests for this node's sandboxes here.
    let node_ingress =
        hearth_ingress::node_router(crate::ingress::AgentResolver(agent.clone()), token.secret());
    let serve = axum_serve(
        listener,
        hearth_control::router(agent.clone(), token).merge(node_ingress),
    );
    let closing = agent.clone();
    let r = tokio::select! {
        r = serve => r,
        r = control_link::run(agent, link) => {
            r.context("node agent left the cluster")
                .and_then(|_| Err(anyhow::anyhow!("control link ended")))
        }
    };
    crate::close_pools(&closing).await;
    r
}

/// The one-member control plane of `hearthd dev`, under `DATA/control`.
pub async fn embedded_control_plane(
    data_dir: &Path,
    local: SocketAddr,
    token: &ApiToken,
) -> Result<ControlPlane> {
    let mut cfg = StoreConfig::new(1, data_dir.join("control"), [(1, local.to_string())].into());
    cfg.token = Some(token.secret().to_string());
    let store = Store::open(cfg)
        .await
        .context("starting the embedded control plane")?;
    let cp = ControlPlane::new(store, ControlConfig::default(), token);
    cp.spawn_background();
    Ok(cp)
}

/// The dev agent registers with its own process's control plane.
pub fn dev_link(agent: &Agent, local: SocketAddr, token: &ApiToken) -> LinkConfig {
    LinkConfig {
        controls: vec![local.to_string()],
        node: agent.info().node,
        advertise: format!("http://{local}"),
        labels: BTreeMap::new(),
        cpus: None,
        memory_mib: None,
        disk_mib: None,
        heartbeat: Duration::from_secs(1),
        token: Some(token.secret().to_string()),
    }
}

pub fn spawn_link(agent: Agent, link: LinkConfig) {
    tokio::spawn(async move {
        if let Err(e) = control_link::run(agent, link).await {
            tracing::error!("node agent link to the embedded control plane ended: {e}");
        }
    });
}
