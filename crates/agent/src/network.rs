//! The agent's side of sandbox networking: turning API policy into
//! `hearth-net` rules, and the policy endpoints' operations.

use hearth_api::network::{EgressPolicy, PolicyCounter, PolicyStats, SandboxNetwork};
use hearth_net::{Action, Policy, PolicyError, Rule, SandboxNet};

use crate::sandbox::{Agent, AgentError};

/// Parses an API egress policy into rules (validated; limits checked).
pub fn parse_policy(p: &EgressPolicy) -> Result<Policy, AgentError> {
    let bad = |e: PolicyError| AgentError::InvalidArgument(format!("egress policy: {e}"));
    let default: Action = p.default.parse().map_err(bad)?;
    let mut rules = Vec::new();
    for (action, list) in [(Action::Allow, &p.allow), (Action::Deny, &p.deny)] {
        for r in list {
            rules.push(Rule::parse(action, r).map_err(bad)?);
        }
    }
    let policy = Policy { default, rules };
    hearth_net::policy::validate(&policy).map_err(bad)?;
    Ok(policy)
}

/// The API form of a policy.
pub fn policy_to_api(p: &Policy) -> EgressPolicy {
    let mut out = EgressPolicy {
        default: match p.default {
            Action::Allow => "allow".into(),
            Action::Deny => "deny".into(),
        },
        allow: Vec::new(),
        deny: Vec::new(),
    };
    for r in &p.rules {
        // Display is "allow CIDR..." / "deny CIDR..."; the API lists hold the rest.
        let text = r.to_string();
        let body = text
            .split_once(' ')
            .map(|x| x.1)
            .unwrap_or(&text)
            .to_string();
        match r.action {
            Action::Allow => out.allow.push(body),
            Action::Deny => out.deny.push(body),
        }
    }
    out
}

pub fn network_to_api(n: &SandboxNet, token: String) -> SandboxNetwork {
    SandboxNetwork {
        ip: n.ip.to_string(),
        mac: n.mac_string(),
        tap: n.tap.clone(),
        ingress_token: token,
    }
}

impl Agent {
    fn node_net(&self, sandbox: &str) -> Result<std::sync::Arc<hearth_net::NodeNet>, AgentError> {
        self.net()
            .ok_or_else(|| AgentError::Net(hearth_net::NetError::NoNetwork(sandbox.into())))
    }

    /// The sandbox's current egress policy.
    pub fn policy(&self, id_or_name: &str) -> Result<EgressPolicy, AgentError> {
        let id = self.get(id_or_name)?.id;
        let rec = self.node_net(&id)?.get(&id)?;
        Ok(policy_to_api(&rec.policy))
    }

    /// Replaces the sandbox's egress policy; takes effect at once, without a restart.
    pub async fn set_policy(
        &self,
        id_or_name: &str,
        p: &EgressPolicy,
    ) -> Result<EgressPolicy, AgentError> {
        let id = self.get(id_or_name)?.id;
        let policy = parse_policy(p)?;
        let net = self.node_net(&id)?;
        let rec = tokio::task::spawn_blocking(move || net.set_policy(&id, policy))
            .await
            .map_err(|e| AgentError::Config(format!("policy update panicked: {e}")))??;
        Ok(policy_to_api(&rec.policy))
    }

    /// Per-rule counters from the BPF maps.
    pub fn policy_stats(&self, id_or_name: &str) -> Result<PolicyStats, AgentError> {
        let id = self.get(id_or_name)?.id;
        let counters = self
            .node_net(&id)?
            .stats(&id)?
            .into_iter()
            .map(|c| PolicyCounter {
                label: c.label,
                packets: c.packets,
                bytes: c.bytes,
            })
            .collect();
        Ok(PolicyStats {
            sandbox: id,
            counters,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_policy_round_trips() {
        let p = EgressPolicy {
            default: "deny".into(),
            allow: vec!["10.0.0.0/8:80-90".into(), "1.1.1.1/32:53:udp".into()],
            deny: vec!["10.1.0.0/16".into()],
        };
        assert_eq!(policy_to_api(&parse_policy(&p).unwrap()), p);
        let bad = EgressPolicy {
            default: "maybe".into(),
            ..EgressPolicy::default()
        };
        assert!(parse_policy(&bad).is_err());
    }
}
