//! Sandbox addresses come from the control plane: the node's slice of the
//! cluster CIDR is handed out when the agent joins, and every sandbox address
//! is leased through Raft before the tap is built and released after its
//! teardown. The node's local IPAM (`hearth-net`) records what the control
//! plane granted, so it follows the replicated state and never picks on its own.
//!
//! [`LeaseAuthority`] is the seam: [`ControlLeases`] asks control-plane
//! members over HTTP (`hearthd agent`); `hearthd dev` writes to its embedded
//! store directly.

use std::future::Future;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use hearth_api::cluster::{JoinNetwork, Lease, LeaseRequest, NodeSlice, Released, RetainLeases};
use hearth_api::{ApiError, ErrorCode};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Leasing or releasing an address failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LeaseError {
    /// The node's slice has no free address left.
    #[error("{0}")]
    Exhausted(String),
    /// The control plane answered with a refusal (wrong instance, bad slice...).
    #[error("the control plane refused the address lease: {0}")]
    Refused(String),
    /// The control plane has no (usable) slice for this node, e.g. after
    /// `hearth node rm`: the agent must join the cluster network again.
    #[error("the control plane has no address slice for this node: {0}")]
    NotJoined(String),
    /// No control-plane member answered.
    #[error("no control-plane member answered the address lease request ({0}); sandboxes with a network cannot start until one does")]
    Unavailable(String),
}

/// Where sandbox addresses are leased.
pub trait LeaseAuthority: Send + Sync + std::fmt::Debug {
    /// The sandbox's address (the same one when asked again); `want`: the
    /// address this node already uses for it, refused if another holds it.
    fn acquire<'a>(
        &'a self,
        sandbox: &'a str,
        want: Option<Ipv4Addr>,
    ) -> BoxFuture<'a, Result<Ipv4Addr, LeaseError>>;
    /// Frees the sandbox's address; no-op when it holds none.
    fn release<'a>(&'a self, sandbox: &'a str) -> BoxFuture<'a, Result<(), LeaseError>>;
    /// Frees every address of this node except those of `keep`; the freed ids.
    fn retain(&self, keep: Vec<String>) -> BoxFuture<'_, Result<Vec<String>, LeaseError>>;
    /// The slice this node leases from, as `(node, agent instance)`, for a
    /// sandbox migrating away with its address (`None`: leases are not
    /// tied to a node slice another node can name).
    fn holder(&self) -> Option<(String, String)> {
        None
    }
    /// Frees the address of a sandbox that migrated here: it is leased from
    /// the slice of `node` (agent `instance`), the node it was started on.
    fn release_held<'a>(
        &'a self,
        sandbox: &'a str,
        node: &'a str,
        instance: &'a str,
    ) -> BoxFuture<'a, Result<(), LeaseError>> {
        let _ = (node, instance);
        self.release(sandbox)
    }
    /// The address the slice of `node` (agent `instance`) leases to
    /// `sandbox`; `None` when it leases it none. Authorities that cannot ask
    /// about another node's slice refuse.
    fn held_by<'a>(
        &'a self,
        sandbox: &'a str,
        node: &'a str,
        instance: &'a str,
    ) -> BoxFuture<'a, Result<Option<Ipv4Addr>, LeaseError>> {
        let _ = (sandbox, node, instance);
        Box::pin(async {
            Err(LeaseError::Refused(
                "this node's leases are not kept by a cluster control plane, so it cannot check a lease of another node".into(),
            ))
        })
    }
}

fn base_url(base: &str) -> String {
    let b = base.trim_end_matches('/');
    if b.starts_with("http://") || b.starts_with("https://") {
        b.to_string()
    } else {
        format!("http://{b}")
    }
}

fn client(token: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(v) =
        token.and_then(|t| reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")).ok())
    {
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap_or_default()
}

/// Leases through the control plane's agent protocol.
#[derive(Debug, Clone)]
pub struct ControlLeases {
    http: reqwest::Client,
    controls: Vec<String>,
    node: String,
    instance: String,
    /// The slice this agent joined with, asked for again on a re-join.
    pool: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl ControlLeases {
    pub fn new(
        controls: Vec<String>,
        node: String,
        instance: String,
        token: Option<&str>,
    ) -> ControlLeases {
        ControlLeases {
            http: client(token),
            controls,
            node,
            instance,
            pool: Default::default(),
        }
    }

    fn joined_pool(&self) -> Option<String> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn lease_once(&self, req: &LeaseRequest) -> Result<Lease, LeaseError> {
        self.call(|b| {
            self.http
                .post(format!("{b}/v1/agents/{}/leases", self.node))
                .json(req)
        })
        .await
    }

    /// Sends the request to each member in turn until one gives an answer
    /// (success or refusal); unreachable or leaderless members are skipped.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        make: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<T, LeaseError> {
        let mut last = String::from("no control-plane address given");
        // why: an election takes a few seconds; go round the members a few times.
        for round in 0..3 {
            if round > 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            for c in &self.controls {
                let r = match make(&base_url(c)).send().await {
                    Ok(r) => r,
                    Err(e) => {
                        last = format!("{c}: {e}");
                        continue;
                    }
                };
                if r.status().is_success() {
                    return r
                        .json()
                        .await
                        .map_err(|e| LeaseError::Unavailable(format!("{c}: {e}")));
                }
                let status = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                let err = serde_json::from_str::<ApiError>(&text)
                    .unwrap_or_else(|_| ApiError::new(ErrorCode::Internal, text));
                match err.code {
                    ErrorCode::Exhausted => return Err(LeaseError::Exhausted(err.message)),
                    ErrorCode::NotFound => return Err(LeaseError::NotJoined(err.message)),
                    ErrorCode::Unavailable => last = format!("{c}: {}", err.message),
                    _ if status >= 500 => last = format!("{c}: {status} {}", err.message),
                    _ => return Err(LeaseError::Refused(err.message)),
                }
            }
        }
        Err(LeaseError::Unavailable(last))
    }
}

impl LeaseAuthority for ControlLeases {
    fn acquire<'a>(
        &'a self,
        sandbox: &'a str,
        want: Option<Ipv4Addr>,
    ) -> BoxFuture<'a, Result<Ipv4Addr, LeaseError>> {
        Box::pin(async move {
            let req = LeaseRequest {
                instance: self.instance.clone(),
                sandbox: sandbox.to_string(),
                want: want.map(|w| w.to_string()),
            };
            let l = match self.lease_once(&req).await {
                // why: the node was removed (`hearth node rm`) while this agent
                // ran; joining again with the same slice keeps its leases.
                Err(LeaseError::NotJoined(why)) => {
                    tracing::warn!("{why}; joining the cluster network again");
                    join_network(self, self.joined_pool(), Duration::ZERO).await?;
                    self.lease_once(&req).await?
                }
                r => r?,
            };
            l.ip.parse().map_err(|_| {
                LeaseError::Refused(format!(
                    "the control plane leased '{}', not an IPv4 address",
                    l.ip
                ))
            })
        })
    }

    fn release<'a>(&'a self, sandbox: &'a str) -> BoxFuture<'a, Result<(), LeaseError>> {
        self.release_held(sandbox, &self.node, &self.instance)
    }

    fn holder(&self) -> Option<(String, String)> {
        Some((self.node.clone(), self.instance.clone()))
    }

    fn release_held<'a>(
        &'a self,
        sandbox: &'a str,
        node: &'a str,
        instance: &'a str,
    ) -> BoxFuture<'a, Result<(), LeaseError>> {
        Box::pin(async move {
            let r: Result<Released, _> = self
                .call(|b| {
                    self.http
                        .delete(format!("{b}/v1/agents/{node}/leases/{sandbox}"))
                        .query(&[("instance", instance)])
                })
                .await;
            match r {
                // why: no slice, no lease to free (a removed node's slice is
                // dropped with its last lease).
                Ok(_) | Err(LeaseError::NotJoined(_)) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    fn held_by<'a>(
        &'a self,
        sandbox: &'a str,
        node: &'a str,
        instance: &'a str,
    ) -> BoxFuture<'a, Result<Option<Ipv4Addr>, LeaseError>> {
        Box::pin(async move {
            let r: Result<Lease, _> = self
                .call(|b| {
                    self.http
                        .get(format!("{b}/v1/agents/{node}/leases/{sandbox}"))
                        .query(&[("instance", instance)])
                })
                .await;
            match r {
                Ok(l) => l.ip.parse().map(Some).map_err(|_| {
                    LeaseError::Refused(format!(
                        "the control plane named '{}' as the lease, not an IPv4 address",
                        l.ip
                    ))
                }),
                Err(LeaseError::NotJoined(_)) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    fn retain(&self, keep: Vec<String>) -> BoxFuture<'_, Result<Vec<String>, LeaseError>> {
        Box::pin(async move {
            let req = RetainLeases {
                instance: self.instance.clone(),
                keep,
            };
            let r: Result<Released, _> = self
                .call(|b| {
                    self.http
                        .post(format!("{b}/v1/agents/{}/leases/retain", self.node))
                        .json(&req)
                })
                .await;
            match r {
                Ok(r) => Ok(r.released),
                Err(LeaseError::NotJoined(_)) => Ok(Vec::new()),
                Err(e) => Err(e),
            }
        })
    }
}

/// Joins the cluster network: this node's slice of the cluster CIDR (`want`,
/// or the one the control plane picks; the same on every restart of this
/// agent instance). Waits up to `wait` for a control-plane member to answer.
pub async fn join_network(
    leases: &ControlLeases,
    want: Option<String>,
    wait: Duration,
) -> Result<String, LeaseError> {
    let req = JoinNetwork {
        instance: leases.instance.clone(),
        want,
    };
    let start = Instant::now();
    loop {
        let r: Result<NodeSlice, _> = leases
            .call(|b| {
                leases
                    .http
                    .post(format!("{b}/v1/agents/{}/slice", leases.node))
                    .json(&req)
            })
            .await;
        match r {
            Ok(s) => {
                *leases.pool.lock().unwrap_or_else(|e| e.into_inner()) = Some(s.cidr.clone());
                return Ok(s.cidr);
            }
            Err(LeaseError::Unavailable(e)) if start.elapsed() < wait => {
                tracing::info!(
                    "waiting for the control plane to hand out this node's address slice: {e}"
                );
            }
            Err(e) => return Err(e),
        }
    }
}
