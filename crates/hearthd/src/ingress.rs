//! The ingress role: the proxy of `hearth-ingress`, resolving sandboxes
//! through the in-process agent (`hearthd dev`, and an agent's node ingress)
//! or through the control plane's state (`hearthd control --ingress-listen`),
//! which relays each request to the node agent that runs the sandbox.

use hearth_agent::Agent;
use hearth_api::SandboxStatus;
use hearth_control::cluster::ControlPlane;
use hearth_ingress::{Backend, NodeRelay, Resolver, Target, Unavailable};

pub struct AgentResolver(pub Agent);

fn status_name(s: SandboxStatus) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{s:?}"))
}

impl Resolver for AgentResolver {
    fn resolve(&self, sandbox: &str) -> Result<Target, Unavailable> {
        let sb = self
            .0
            .get(sandbox)
            .map_err(|_| Unavailable::NotFound(sandbox.into()))?;
        if sb.status != SandboxStatus::Running {
            return Err(Unavailable::NotRunning {
                sandbox: sandbox.into(),
                status: status_name(sb.status),
            });
        }
        let net = sb
            .network
            .ok_or_else(|| Unavailable::NoNetwork(sandbox.into()))?;
        let ip = net
            .ip
            .parse()
            .map_err(|_| Unavailable::NoNetwork(sandbox.into()))?;
        Ok(Target::Sandbox(Backend {
            ip,
            token: net.ingress_token,
        }))
    }
}

/// Finds the sandbox in the control plane's state (this member's copy) and
/// the node that runs it.
pub struct ClusterResolver {
    pub cp: ControlPlane,
    /// The relay credential node ingresses require
    /// ([`hearth_ingress::relay_credential`] of the cluster token).
    pub credential: String,
}

impl Resolver for ClusterResolver {
    fn resolve(&self, sandbox: &str) -> Result<Target, Unavailable> {
        let found = self.cp.store().read_local(|st| {
            st.sandbox(sandbox).map(|s| {
                let node = st.nodes.get(&s.node).map(|n| (n.address.clone(), n.ready));
                (s.clone(), node)
            })
        });
        let (rec, node) = found.ok_or_else(|| Unavailable::Gone(sandbox.into()))?;
        let down = |why: String| Unavailable::NodeUnavailable {
            sandbox: sandbox.into(),
            why,
        };
        let obs = rec
            .observed
            .as_ref()
            .ok_or_else(|| down(format!("not started yet on node {}", rec.node)))?;
        if obs.status != "running" {
            return Err(Unavailable::NotRunning {
                sandbox: sandbox.into(),
                status: obs.status.clone(),
            });
        }
        let agent_id = obs
            .agent_id
            .clone()
            .ok_or_else(|| down(format!("node {} has not reported it", rec.node)))?;
        let (address, ready) =
            node.ok_or_else(|| down(format!("its node {} is not registered", rec.node)))?;
        if !ready {
            return Err(down(format!("its node {} is not ready", rec.node)));
        }
        let addr = address
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .map_err(|_| {
                down(format!(
                    "node {} advertises {address}, not http://IP:PORT",
                    rec.node
                ))
            })?;
        Ok(Target::Node(NodeRelay {
            addr,
            sandbox: agent_id,
            credential: self.credential.clone(),
        }))
    }

    fn moving(&self, sandbox: &str) -> bool {
        self.cp
            .store()
            .read_local(|st| st.sandbox(sandbox).is_some_and(|s| s.migrating().is_some()))
    }
}
