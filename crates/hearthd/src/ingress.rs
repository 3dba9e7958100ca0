//! The ingress role in `hearthd dev`: the proxy of `hearth-ingress`, resolving
//! sandboxes through the in-process agent.

use hearth_agent::Agent;
use hearth_api::SandboxStatus;
use hearth_ingress::{Backend, Resolver, Unavailable};

pub struct AgentResolver(pub Agent);

impl Resolver for AgentResolver {
    fn resolve(&self, sandbox: &str) -> Result<Backend, Unavailable> {
        let sb = self
            .0
            .get(sandbox)
            .map_err(|_| Unavailable::NotFound(sandbox.into()))?;
        if sb.status != SandboxStatus::Running {
            let status = serde_json::to_value(sb.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| format!("{:?}", sb.status));
            return Err(Unavailable::NotRunning {
                sandbox: sandbox.into(),
                status,
            });
        }
        let net = sb
            .network
            .ok_or_else(|| Unavailable::NoNetwork(sandbox.into()))?;
        let ip = net
            .ip
            .parse()
            .map_err(|_| Unavailable::NoNetwork(sandbox.into()))?;
        Ok(Backend {
            ip,
            token: net.ingress_token,
        })
    }
}
