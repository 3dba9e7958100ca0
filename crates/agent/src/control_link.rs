//! The agent's side of the cluster: register with the control plane, then
//! heartbeat with the observed state of every sandbox on this node.
//!
//! Any control-plane member accepts these calls (followers forward to the
//! leader), so the link walks the list of control addresses until one
//! answers. A node id already held by another agent is fatal: two agents
//! must never share an identity; any other refusal re-registers.
//!
//! The heartbeat's answer fences this node: copies the control plane no
//! longer assigns here (moved elsewhere while this node was cut off,
//! deleted, superseded) are stopped, and once ended, removed.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use hearth_api::cluster::{Capacity, Desired, Heartbeat, ObservedSandbox, RegisterNode};
use hearth_api::{ApiError, ErrorCode};

use crate::Agent;

/// How this node joins the cluster.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Control-plane members, `host:port` or `http://host:port`.
    pub controls: Vec<String>,
    pub node: String,
    /// URL where the control plane reaches this agent's node-local API.
    pub advertise: String,
    pub labels: BTreeMap<String, String>,
    /// Offered capacity; `None` fields default to what the host has.
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub disk_mib: Option<u64>,
    pub heartbeat: Duration,
    /// The cluster's API token, presented to the control plane.
    pub token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the control plane refused node {node}: {message}")]
    Refused { node: String, message: String },
    #[error("node identity file {path}: {source}")]
    Identity {
        path: String,
        source: std::io::Error,
    },
}

fn url(base: &str) -> String {
    let b = base.trim_end_matches('/');
    if b.starts_with("http://") || b.starts_with("https://") {
        b.to_string()
    } else {
        format!("http://{b}")
    }
}

/// The random identity of this agent's data dir, made on first start.
pub fn instance_id(data_dir: &Path) -> Result<String, LinkError> {
    let path = data_dir.join("node-instance");
    let err = |source| LinkError::Identity {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| err(std::io::Error::other(e.to_string())))?;
    let id: String = b.iter().map(|x| format!("{x:02x}")).collect();
    std::fs::create_dir_all(data_dir).map_err(err)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &id).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(id)
}

fn disk_free_mib(p: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a zeroed out-parameter.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return 0;
        }
        (st.f_bavail as u64).saturating_mul(st.f_frsize as u64) / (1024 * 1024)
    }
}

enum Outcome<T> {
    Ok(T),
    /// 404: the control plane does not know this node (re-register).
    Unknown,
    /// Another agent instance holds the id.
    Refused(String),
    /// Any other refusal (e.g. a 409 that is not about identity): register again.
    Reregister(String),
    /// Unreachable or unavailable: try the next member.
    Retry(String),
}

async fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    body: &B,
) -> Outcome<T> {
    let r = match http
        .post(format!("{}{path}", url(base)))
        .json(body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return Outcome::Retry(e.to_string()),
    };
    let status = r.status().as_u16();
    if r.status().is_success() {
        return match r.json().await {
            Ok(v) => Outcome::Ok(v),
            Err(e) => Outcome::Retry(e.to_string()),
        };
    }
    let text = r.text().await.unwrap_or_default();
    let (code, msg) = match serde_json::from_str::<ApiError>(&text) {
        Ok(e) => (Some(e.code), e.message),
        Err(_) => (None, text),
    };
    match (status, code) {
        (404, _) => Outcome::Unknown,
        (409, Some(ErrorCode::NodeIdentityConflict)) => Outcome::Refused(msg),
        (409, _) => Outcome::Reregister(msg),
        _ => Outcome::Retry(format!("{status}: {msg}")),
    }
}

/// Registers, then heartbeats until a fatal refusal. Never returns `Ok`.
pub async fn run(agent: Agent, cfg: LinkConfig) -> Result<(), LinkError> {
    let info = agent.info();
    let data_dir = std::path::PathBuf::from(&info.data_dir);
    let instance = instance_id(&data_dir)?;
    let reg = RegisterNode {
        id: cfg.node.clone(),
        instance: instance.clone(),
        address: cfg.advertise.clone(),
        capacity: Capacity {
            cpus: cfg.cpus.unwrap_or(info.host_cpus),
            memory_mib: cfg.memory_mib.unwrap_or(info.host_memory_mib),
            disk_mib: cfg.disk_mib.unwrap_or_else(|| disk_free_mib(&data_dir)),
        },
        accel: info.accel.clone(),
        labels: cfg.labels.clone(),
    };
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(v) = cfg
        .token
        .as_ref()
        .and_then(|t| reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")).ok())
    {
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_default();
    let n = cfg.controls.len().max(1);
    let mut at = 0usize;
    let mut registered = false;
    let fencing = Fencing::default();
    let mut tick = tokio::time::interval(cfg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(base) = cfg.controls.get(at % n) else {
            return Err(LinkError::Refused {
                node: cfg.node.clone(),
                message: "no control-plane address given".into(),
            });
        };
        if !registered {
            match post::<_, serde_json::Value>(&http, base, "/v1/agents/register", &reg).await {
                Outcome::Ok(_) => {
                    tracing::info!(node = %cfg.node, control = %base, "registered with the control plane");
                    registered = true;
                }
                Outcome::Refused(message) => {
                    return Err(LinkError::Refused {
                        node: cfg.node.clone(),
                        message,
                    })
                }
                Outcome::Reregister(e) | Outcome::Retry(e) => {
                    tracing::debug!(control = %base, "registering failed: {e}");
                    at += 1;
                }
                Outcome::Unknown => at += 1,
            }
            continue;
        }
        let hb = Heartbeat {
            instance: instance.clone(),
            sandboxes: agent
                .list()
                .into_iter()
                .map(|s| ObservedSandbox {
                    paused: agent.migration_paused(&s.id),
                    migrating: agent.migrating_out(&s.id),
                    agent_id: s.id,
                    status: s.status,
                    error: s.error,
                    owner: s.owner,
                })
                .collect(),
        };
        let path = format!("/v1/agents/{}/heartbeat", cfg.node);
        match post::<_, Desired>(&http, base, &path, &hb).await {
            Outcome::Ok(desired) => {
                agent.note_desired(&desired);
                fence(&agent, desired, &fencing)
            }
            Outcome::Unknown => registered = false,
            Outcome::Reregister(e) => {
                tracing::warn!(node = %cfg.node, control = %base, "heartbeat refused ({e}); registering again");
                registered = false;
            }
            Outcome::Refused(message) => {
                return Err(LinkError::Refused {
                    node: cfg.node.clone(),
                    message,
                })
            }
            Outcome::Retry(e) => {
                tracing::debug!(control = %base, "heartbeat failed: {e}");
                at += 1;
            }
        }
    }
}

/// Agent ids being stopped or removed right now (heartbeats keep asking
/// until the copy is gone; one task per copy is enough).
type Fencing = std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>;

/// Marks `id` as being fenced; false if it already is.
fn claim(fencing: &Fencing, id: &str) -> bool {
    fencing.lock().is_ok_and(|mut s| s.insert(id.to_string()))
}

fn release(fencing: &Fencing, id: &str) {
    if let Ok(mut s) = fencing.lock() {
        s.remove(id);
    }
}

/// Stops the copies the control plane no longer assigns to this node (the
/// next heartbeat reports them stopped), and removes the ended ones.
fn fence(agent: &Agent, desired: Desired, fencing: &Fencing) {
    for f in desired.stop {
        if !claim(fencing, &f.agent_id) {
            continue;
        }
        let (agent, fencing) = (agent.clone(), fencing.clone());
        tokio::spawn(async move {
            tracing::warn!(sandbox = %f.agent_id, "stopping a copy the control plane no longer assigns here: {}", f.reason);
            match agent.stop(&f.agent_id, Duration::ZERO).await {
                Ok(_) => {
                    if let Ok(e) = agent.entry(&f.agent_id) {
                        // why: the sandbox ended; a note that cannot be saved is logged by `update`.
                        let _ = e.update(|r| {
                            r.error = Some(format!("stopped by the control plane: {}", f.reason))
                        });
                    }
                }
                Err(e) => tracing::warn!(sandbox = %f.agent_id, "stopping a fenced copy: {e}"),
            }
            release(&fencing, &f.agent_id);
        });
    }
    for id in desired.remove {
        if !claim(fencing, &id) {
            continue;
        }
        let (agent, fencing) = (agent.clone(), fencing.clone());
        tokio::spawn(async move {
            tracing::info!(sandbox = %id, "removing an ended copy the control plane no longer assigns here");
            if let Err(e) = agent.remove(&id, true).await {
                tracing::warn!(sandbox = %id, "removing a fenced copy: {e}");
            }
            release(&fencing, &id);
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A control plane that answers every request with `status` and an API error of `code`.
    async fn control_answering(status: u16, code: &str) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let body = format!(r#"{{"code":"{code}","message":"refused"}}"#);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    // Read the head and the body the head announces, then answer.
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let Ok(n) = s.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        req.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&req).to_lowercase();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let len = text
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            if req.len() >= end + 4 + len {
                                break;
                            }
                        }
                    }
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        format!("127.0.0.1:{}", addr.port())
    }

    async fn heartbeat_to(base: &str) -> Outcome<Desired> {
        let hb = Heartbeat {
            instance: "i".into(),
            sandboxes: Vec::new(),
        };
        post(
            &reqwest::Client::new(),
            base,
            "/v1/agents/n1/heartbeat",
            &hb,
        )
        .await
    }

    #[tokio::test]
    async fn only_an_identity_conflict_is_fatal_other_refusals_register_again() {
        let base = control_answering(409, "node_identity_conflict").await;
        assert!(matches!(heartbeat_to(&base).await, Outcome::Refused(_)));
        let base = control_answering(409, "conflict").await;
        assert!(matches!(heartbeat_to(&base).await, Outcome::Reregister(_)));
        let base = control_answering(404, "not_found").await;
        assert!(matches!(heartbeat_to(&base).await, Outcome::Unknown));
        let base = control_answering(503, "unavailable").await;
        assert!(matches!(heartbeat_to(&base).await, Outcome::Retry(_)));
    }
}
