//! `hearthd dev`'s sandboxes through its embedded one-member store: a create
//! commits a record placed on the local node (pinned: the node is this
//! process) before the in-process agent starts it, tagged with the record;
//! the agent's heartbeats carry what it observes into the record, exactly as
//! a cluster agent's do; a removal deletes the record. The node-local API
//! answers as before (agent ids, the agent's full view), so `hearth` works
//! unchanged against it.

use std::time::Duration;

use hearth_agent::Agent;
use hearth_api::{ApiError, CreateSandbox, ErrorCode};
use hearth_sched::{Request, Resources};
use hearth_store::{parse_owner, Command, Observed, Reply, RestartPolicy, SandboxRecord};

use super::{now_ms, ControlPlane};
use crate::HttpError;

/// How long a create waits for the local agent's first registration (the
/// link registers within a heartbeat of the daemon starting).
const REGISTER_WAIT: Duration = Duration::from_secs(10);

fn record_id() -> String {
    let mut b = [0u8; 6];
    if getrandom::fill(&mut b).is_err() {
        b.copy_from_slice(&now_ms().to_le_bytes()[..6]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl ControlPlane {
    /// Records the sandbox, then starts it on `agent`. A create the agent
    /// refuses (bad image, bad argument) leaves no record.
    pub(crate) async fn dev_create(
        &self,
        agent: &Agent,
        req: CreateSandbox,
    ) -> Result<hearth_api::Sandbox, HttpError> {
        let node = agent.info().node;
        let registered = self
            .store
            .wait_local(REGISTER_WAIT, |st| st.nodes.contains_key(&node))
            .await;
        if !registered {
            return Err(HttpError(ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "node {node} has not registered with the embedded control plane yet; \
                     retry, and see the daemon's log if it persists"
                ),
            )));
        }
        // why: the record and the agent's copy are made together or not at
        // all; a cancelled request (client gone) must not stop halfway and
        // leave a record without a copy, so the rest runs in its own task.
        let (cp, agent) = (self.clone(), agent.clone());
        tokio::spawn(async move { cp.dev_record_and_start(&agent, req, node).await })
            .await
            .map_err(|e| {
                HttpError(ApiError::new(
                    ErrorCode::Internal,
                    format!("creating the sandbox: its task failed: {e}"),
                ))
            })?
    }

    async fn dev_record_and_start(
        &self,
        agent: &Agent,
        mut req: CreateSandbox,
        node: String,
    ) -> Result<hearth_api::Sandbox, HttpError> {
        let rec = SandboxRecord {
            id: record_id(),
            name: req.name.clone(),
            spec: serde_json::to_value(&req)
                .map_err(|e| HttpError(ApiError::new(ErrorCode::Internal, e.to_string())))?,
            request: Request {
                resources: Resources::new(
                    req.cpus.unwrap_or(hearth_api::DEFAULT_CPUS),
                    u64::from(req.memory_mib.unwrap_or(hearth_api::DEFAULT_MEMORY_MIB)),
                    0,
                ),
                ..Default::default()
            },
            node: node.clone(),
            restart: RestartPolicy::Never,
            record_only: false,
            idempotency_key: None,
            ip: None,
            created_ms: now_ms(),
            reschedules: 0,
            policy_version: 0,
            pinned: true,
            observed: None,
            migration: None,
        };
        let rec = match self
            .store
            .write(Command::CreateSandbox { sandbox: rec })
            .await?
        {
            Reply::Sandbox { sandbox } => sandbox,
            Reply::Conflict { .. } => {
                let n = req.name.clone().unwrap_or_default();
                return Err(HttpError(ApiError::new(
                    ErrorCode::Conflict,
                    format!(
                        "a sandbox named '{n}' already exists; remove it with `hearth rm {n}` or choose another name"
                    ),
                )));
            }
            other => {
                return Err(HttpError(ApiError::new(
                    ErrorCode::Internal,
                    format!(
                        "recording the sandbox on node {node}: unexpected store reply {other:?}"
                    ),
                )))
            }
        };
        req.owner = Some(self.store.read_local(|st| st.owner_of(&rec)));
        let sb = match agent.create(req).await {
            Ok(sb) => sb,
            Err(e) => {
                if let Err(w) = self
                    .store
                    .write(Command::DeleteSandbox { id: rec.id.clone() })
                    .await
                {
                    tracing::warn!(sandbox = %rec.id, "removing the record of a refused create: {w}");
                }
                return Err(e.into());
            }
        };
        let observed = Observed {
            status: super::nodes::status_name(sb.status),
            agent_id: Some(sb.id.clone()),
            error: sb.error.clone(),
            updated_ms: now_ms(),
        };
        // why: if this write fails the next heartbeat still matches the copy
        // to its record by the owner tag; the sandbox itself is running.
        if let Err(e) = self
            .store
            .write(Command::SetObserved {
                id: rec.id.clone(),
                observed,
                node: Some(rec.node.clone()),
                generation: Some(rec.reschedules),
            })
            .await
        {
            tracing::warn!(sandbox = %rec.id, "recording the started sandbox: {e}");
        }
        Ok(sb)
    }

    /// Records a `policy set` of the agent's sandbox `id_or_name` in its
    /// record (before the agent applies it, so the record is never older
    /// than what the copy enforces). A copy without a record (made on the
    /// node-local API without a tag) has nothing to record; a record that
    /// refuses the change (no network) leaves the answer to the agent, which
    /// refuses it too.
    pub(crate) async fn dev_record_policy(
        &self,
        agent: &Agent,
        id_or_name: &str,
        p: &hearth_api::network::NetworkPolicy,
    ) -> Result<Option<(SandboxRecord, serde_json::Value)>, HttpError> {
        let policy = hearth_agent::canonical_policy(p)?;
        let Ok(sb) = agent.get(id_or_name) else {
            return Ok(None);
        };
        let Some((id, _)) = sb.owner.as_deref().and_then(parse_owner) else {
            return Ok(None);
        };
        let policy = serde_json::to_value(&policy)
            .map_err(|e| HttpError(ApiError::new(ErrorCode::Internal, e.to_string())))?;
        match super::policy::record_policy(self, id, policy).await {
            Ok(r) => Ok(Some(r)),
            // why: a record that refuses the change (no network) leaves the
            // answer to the agent, which refuses it too.
            Err(e) => {
                tracing::debug!(sandbox = %id, "policy not recorded: {}", e.0.message);
                if matches!(e.0.code, ErrorCode::InvalidArgument | ErrorCode::NotFound) {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// After the agent refused the policy `rec` holds: the record goes back
    /// to `previous` (see [`super::policy::revert_policy`]).
    pub(crate) async fn dev_revert_policy(
        &self,
        rec: &SandboxRecord,
        previous: serde_json::Value,
    ) -> String {
        super::policy::revert_policy(self, rec, previous).await
    }

    /// Removes the sandbox from `agent`, then its record. A record whose
    /// copy the agent does not have (its create was interrupted, the copy
    /// vanished) is removed by its record id or name.
    pub(crate) async fn dev_remove(
        &self,
        agent: &Agent,
        id_or_name: &str,
        force: bool,
    ) -> Result<(), HttpError> {
        let owner = match agent.get(id_or_name) {
            Ok(sb) => sb.owner,
            Err(e) => {
                let rec = self
                    .store
                    .read(|st| {
                        st.sandbox(id_or_name).map(|s| {
                            let copy = s.observed.as_ref().and_then(|o| o.agent_id.clone());
                            (s.id.clone(), copy)
                        })
                    })
                    .await?;
                let Some((id, copy)) = rec else {
                    return Err(e.into());
                };
                // why: a record still naming a copy the agent has goes the
                // normal way (stop, remove, then the record).
                if let Some(copy) = copy.filter(|c| agent.get(c).is_ok()) {
                    agent.remove(&copy, force).await?;
                }
                self.store.write(Command::DeleteSandbox { id }).await?;
                return Ok(());
            }
        };
        agent.remove(id_or_name, force).await?;
        if let Some((id, _)) = owner.as_deref().and_then(parse_owner) {
            self.store
                .write(Command::DeleteSandbox { id: id.to_string() })
                .await?;
        }
        Ok(())
    }
}
