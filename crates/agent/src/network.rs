//! The agent's side of sandbox networking: turning API policy into
//! `hearth-net` rules, and the policy endpoints' operations.

use hearth_api::network::{
    EgressPolicy, IngressPolicy, NetworkPolicy, NetworkSpec, PolicyCounter, PolicyStats,
    SandboxNetwork,
};
use hearth_net::{Action, Direction, Policy, PolicyError, Rule, RuleSet, SandboxNet};

use crate::sandbox::{Agent, AgentError};

fn parse_set(
    dir: Direction,
    default: &str,
    allow: &[String],
    deny: &[String],
) -> Result<RuleSet, AgentError> {
    let bad = |e: PolicyError| AgentError::InvalidArgument(format!("{} policy: {e}", dir.name()));
    let default: Action = default.parse().map_err(bad)?;
    let mut rules = Vec::new();
    for (action, list) in [(Action::Allow, allow), (Action::Deny, deny)] {
        for r in list {
            rules.push(Rule::parse(action, r).map_err(bad)?);
        }
    }
    hearth_net::policy::validate_rules(&rules).map_err(bad)?;
    Ok(RuleSet { default, rules })
}

/// Parses an API policy into rules (validated; limits checked).
pub fn parse_policy(p: &NetworkPolicy) -> Result<Policy, AgentError> {
    let e = &p.egress;
    let i = &p.ingress;
    Ok(Policy {
        egress: parse_set(Direction::Egress, &e.default, &e.allow, &e.deny)?,
        ingress: parse_set(Direction::Ingress, &i.default, &i.allow, &i.deny)?,
    })
}

/// `p` validated (limits checked) in its canonical API form, the form the
/// policy endpoints answer with.
pub fn canonical_policy(p: &NetworkPolicy) -> Result<NetworkPolicy, AgentError> {
    Ok(policy_to_api(&parse_policy(p)?))
}

/// The policy a create request asks for.
pub fn spec_policy(n: &NetworkSpec) -> Result<Policy, AgentError> {
    parse_policy(&NetworkPolicy {
        egress: n.egress.clone(),
        ingress: n.ingress.clone(),
    })
}

/// `(default, allow, deny)` of one direction, in the API's text form.
fn set_to_api(s: &RuleSet) -> (String, Vec<String>, Vec<String>) {
    let default = match s.default {
        Action::Allow => "allow".to_string(),
        Action::Deny => "deny".to_string(),
    };
    let (mut allow, mut deny) = (Vec::new(), Vec::new());
    for r in &s.rules {
        // Display is "allow CIDR..." / "deny CIDR..."; the API lists hold the rest.
        let text = r.to_string();
        let body = text
            .split_once(' ')
            .map(|x| x.1)
            .unwrap_or(&text)
            .to_string();
        match r.action {
            Action::Allow => allow.push(body),
            Action::Deny => deny.push(body),
        }
    }
    (default, allow, deny)
}

/// The API form of a policy.
pub fn policy_to_api(p: &Policy) -> NetworkPolicy {
    let (default, allow, deny) = set_to_api(&p.egress);
    let egress = EgressPolicy {
        default,
        allow,
        deny,
    };
    let (default, allow, deny) = set_to_api(&p.ingress);
    let ingress = IngressPolicy {
        default,
        allow,
        deny,
    };
    NetworkPolicy { egress, ingress }
}

pub fn network_to_api(n: &SandboxNet, token: String) -> SandboxNetwork {
    SandboxNetwork {
        ip: n.ip.to_string(),
        mac: n.mac_string(),
        tap: n.tap.clone(),
        ingress_token: token,
        ingress: None,
    }
}

impl Agent {
    /// The node's network, for sandbox `sb`, which must have one.
    ///
    /// why: by its record, not the node's state: a `--network none` sandbox
    /// that took a pool VM gives that VM's prepared network back in the
    /// background, under the same id.
    fn node_net(
        &self,
        sb: &hearth_api::Sandbox,
    ) -> Result<std::sync::Arc<hearth_net::NodeNet>, AgentError> {
        let none = || AgentError::Net(hearth_net::NetError::NoNetwork(sb.id.clone()));
        if sb.network.is_none() {
            return Err(none());
        }
        self.net().ok_or_else(none)
    }

    /// The sandbox's current policy, both directions.
    pub fn policy(&self, id_or_name: &str) -> Result<NetworkPolicy, AgentError> {
        let sb = self.get(id_or_name)?;
        let id = sb.id.clone();
        let rec = self.node_net(&sb)?.get(&id)?;
        Ok(policy_to_api(&rec.policy))
    }

    /// Replaces the sandbox's policy (both directions, atomically); takes
    /// effect at once, without a restart. `version` is the control plane's
    /// (its record's count of policy sets): an older one than the copy
    /// enforces is refused (409), so two sets that reach the node in the
    /// other order than recorded leave the newer one.
    pub async fn set_policy(
        &self,
        id_or_name: &str,
        p: &NetworkPolicy,
        version: Option<u64>,
    ) -> Result<NetworkPolicy, AgentError> {
        let sb = self.get(id_or_name)?;
        let id = sb.id.clone();
        // why: the offer carried the policy when the migration started; a
        // change here now would be lost when the target takes over.
        if crate::sandbox::lock(&self.inner.migrations.active).contains(&id) {
            return Err(AgentError::Conflict(format!(
                "sandbox {id} is being migrated; set the policy after it finished (see `hearth migrate --status {id}`)"
            )));
        }
        let policy = parse_policy(p)?;
        let net = self.node_net(&sb)?;
        let rec = tokio::task::spawn_blocking(move || net.set_policy(&id, policy, version))
            .await
            .map_err(|e| AgentError::Config(format!("policy update panicked: {e}")))??;
        Ok(policy_to_api(&rec.policy))
    }

    /// Per-rule counters from the BPF maps.
    pub fn policy_stats(&self, id_or_name: &str) -> Result<PolicyStats, AgentError> {
        let sb = self.get(id_or_name)?;
        let id = sb.id.clone();
        let counters = self
            .node_net(&sb)?
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
        let p = NetworkPolicy {
            egress: EgressPolicy {
                default: "deny".into(),
                allow: vec!["10.0.0.0/8:80-90".into(), "1.1.1.1/32:53:udp".into()],
                deny: vec!["10.1.0.0/16".into()],
            },
            ingress: IngressPolicy {
                default: "deny".into(),
                allow: vec!["192.168.0.0/16:8080".into()],
                deny: vec!["192.168.1.0/24".into()],
            },
        };
        assert_eq!(policy_to_api(&parse_policy(&p).unwrap()), p);
        let bad = NetworkPolicy {
            ingress: IngressPolicy {
                default: "maybe".into(),
                ..IngressPolicy::default()
            },
            ..NetworkPolicy::default()
        };
        let e = parse_policy(&bad).unwrap_err().to_string();
        assert!(e.contains("ingress policy") && e.contains("maybe"), "{e}");
    }

    #[test]
    fn bad_ingress_rules_are_rejected_with_the_direction_named() {
        for (allow, deny, want) in [
            (vec!["10.0.0.1/8"], vec![], "host bits"),
            (vec!["10.0.0.0/8:0"], vec![], "port range"),
            (vec!["10.0.0.0/8:70000"], vec![], "port range"),
            (vec!["10.0.0.0/8:80-90"], vec!["10.0.0.0/8:85"], "overlap"),
        ] {
            let p = NetworkPolicy {
                ingress: IngressPolicy {
                    default: "allow".into(),
                    allow: allow.iter().map(|s| s.to_string()).collect(),
                    deny: deny.iter().map(|s| s.to_string()).collect(),
                },
                ..NetworkPolicy::default()
            };
            let e = parse_policy(&p).unwrap_err().to_string();
            assert!(e.contains("ingress policy") && e.contains(want), "{e}");
        }
    }
}
