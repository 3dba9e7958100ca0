//! The scoped credential a migration source presents to its target when the
//! control plane drives the migration.
//!
//! The control plane never hands the cluster token to a source agent. For each
//! migration it issues a credential that names what it allows: one sandbox
//! (the source agent's id of it), the owner tag the target's copy will carry,
//! the source and target nodes, an expiry (unix seconds) and the purpose. The
//! credential carries those fields in the clear plus an HMAC-SHA256 over them
//! keyed with the cluster token; a target agent (which knows the cluster
//! token) recomputes the HMAC, and refuses a credential that is expired
//! (401), tampered with (401), or issued for another node or sandbox (403).
//!
//! Format: `hmig1.<hex(JSON of the scope)>.<hex(HMAC)>`.

use hmac::Mac;
use serde::{Deserialize, Serialize};

/// What one migration credential allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationScope {
    /// The sandbox's id on the source agent (the id in the offer and in the
    /// `/v1/migrations/incoming/{id}` paths).
    pub sandbox: String,
    /// The owner tag the target's copy carries (`CLUSTER/ID@GEN`).
    pub owner: String,
    /// Node id of the source.
    pub from: String,
    /// Node id of the target: only that node accepts the credential.
    pub to: String,
    /// Unix time (seconds) after which the credential is refused.
    pub expires: u64,
    /// Always [`PURPOSE`]; covered by the HMAC so this credential is never
    /// taken for another derived one.
    pub purpose: String,
}

/// The only purpose a migration credential has.
pub const PURPOSE: &str = "migration-target";

const PREFIX: &str = "hmig1.";

/// Why a presented migration credential is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Not a migration credential at all (so it may be a plain API token).
    #[error("not a migration credential")]
    NotACredential,
    /// Its fields do not parse.
    #[error("malformed migration credential: {0}")]
    Malformed(String),
    /// The HMAC does not match its fields (tampered with, or issued by
    /// another cluster).
    #[error("migration credential for sandbox {sandbox} does not verify (tampered with, or issued with another cluster token)")]
    BadSignature { sandbox: String },
    /// Past its expiry.
    #[error("migration credential for sandbox {sandbox} expired at unix time {expires} (now {now}); start the migration again")]
    Expired {
        sandbox: String,
        expires: u64,
        now: u64,
    },
    /// Issued for another purpose.
    #[error("credential is for '{0}', not for a migration target")]
    WrongPurpose(String),
    /// Issued for another target node.
    #[error("migration credential is for target node {want}, this is node {here}")]
    WrongTarget { want: String, here: String },
    /// Issued for another sandbox.
    #[error("migration credential is for sandbox {allowed}, not for sandbox {asked}")]
    WrongSandbox { allowed: String, asked: String },
    /// The offer does not match the credential in another field.
    #[error("migration credential for sandbox {sandbox} allows {field} '{allowed}', the offer says '{offered}'")]
    WrongField {
        sandbox: String,
        field: &'static str,
        allowed: String,
        offered: String,
    },
}

impl CredentialError {
    /// True for a credential that verified but does not allow this request
    /// (403); false for one that is not valid at all (401).
    pub fn is_forbidden(&self) -> bool {
        matches!(
            self,
            CredentialError::WrongTarget { .. }
                | CredentialError::WrongSandbox { .. }
                | CredentialError::WrongField { .. }
                | CredentialError::WrongPurpose(_)
        )
    }
}

fn mac(cluster_token: &str, s: &MigrationScope) -> hmac::Hmac<sha2::Sha256> {
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(cluster_token.as_bytes())
        .expect("HMAC takes keys of any length");
    // why: length-prefixed fields, so no two scopes feed the same bytes.
    m.update(b"hearth-migration-credential-v1");
    for f in [
        s.purpose.as_bytes(),
        s.sandbox.as_bytes(),
        s.owner.as_bytes(),
        s.from.as_bytes(),
        s.to.as_bytes(),
        &s.expires.to_be_bytes(),
    ] {
        m.update(&(f.len() as u64).to_be_bytes());
        m.update(f);
    }
    m
}

/// Issues the credential for `scope` (its `purpose` is set to [`PURPOSE`]).
pub fn issue(cluster_token: &str, scope: &MigrationScope) -> String {
    let scope = MigrationScope {
        purpose: PURPOSE.into(),
        ..scope.clone()
    };
    let body = serde_json::to_vec(&scope).expect("a scope serialises");
    let tag = mac(cluster_token, &scope).finalize().into_bytes();
    format!("{PREFIX}{}.{}", hex::encode(body), hex::encode(tag))
}

/// Verifies a presented credential: its HMAC under the cluster token, its
/// purpose, its expiry (against `now`, unix seconds) and that it is for node
/// `here`. The caller checks the sandbox and the offer with [`check_offer`]
/// and [`MigrationScope::check_sandbox`].
pub fn verify(
    cluster_token: &str,
    presented: &str,
    here: &str,
    now: u64,
) -> Result<MigrationScope, CredentialError> {
    let rest = presented
        .strip_prefix(PREFIX)
        .ok_or(CredentialError::NotACredential)?;
    let (body, tag) = rest
        .split_once('.')
        .ok_or_else(|| CredentialError::Malformed("no signature".into()))?;
    let body = hex::decode(body).map_err(|e| CredentialError::Malformed(e.to_string()))?;
    let tag = hex::decode(tag).map_err(|e| CredentialError::Malformed(e.to_string()))?;
    let scope: MigrationScope =
        serde_json::from_slice(&body).map_err(|e| CredentialError::Malformed(e.to_string()))?;
    // verify_slice compares in constant time.
    mac(cluster_token, &scope)
        .verify_slice(&tag)
        .map_err(|_| CredentialError::BadSignature {
            sandbox: scope.sandbox.clone(),
        })?;
    if scope.purpose != PURPOSE {
        return Err(CredentialError::WrongPurpose(scope.purpose));
    }
    if now > scope.expires {
        return Err(CredentialError::Expired {
            sandbox: scope.sandbox,
            expires: scope.expires,
            now,
        });
    }
    if scope.to != here {
        return Err(CredentialError::WrongTarget {
            want: scope.to,
            here: here.to_string(),
        });
    }
    Ok(scope)
}

impl MigrationScope {
    /// The request names sandbox `asked` (a path's id).
    pub fn check_sandbox(&self, asked: &str) -> Result<(), CredentialError> {
        if asked != self.sandbox {
            return Err(CredentialError::WrongSandbox {
                allowed: self.sandbox.clone(),
                asked: asked.to_string(),
            });
        }
        Ok(())
    }

    /// An offer (`POST /v1/migrations/incoming`) must be for this sandbox,
    /// this owner tag and from this source node.
    pub fn check_offer(
        &self,
        sandbox: &str,
        owner: Option<&str>,
        source_node: Option<&str>,
    ) -> Result<(), CredentialError> {
        self.check_sandbox(sandbox)?;
        let field = |field, offered: Option<&str>, allowed: &str| {
            if offered != Some(allowed) {
                return Err(CredentialError::WrongField {
                    sandbox: self.sandbox.clone(),
                    field,
                    allowed: allowed.to_string(),
                    offered: offered.unwrap_or("(none)").to_string(),
                });
            }
            Ok(())
        };
        field("owner tag", owner, &self.owner)?;
        field("source node", source_node, &self.from)
    }
}

/// Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "cluster-token-0123456789";

    fn scope() -> MigrationScope {
        MigrationScope {
            sandbox: "sb1".into(),
            owner: "c1/sb1@2".into(),
            from: "agent1".into(),
            to: "agent2".into(),
            expires: 1_000,
            purpose: PURPOSE.into(),
        }
    }

    #[test]
    fn a_credential_verifies_on_its_target_before_its_expiry() {
        let c = issue(TOKEN, &scope());
        assert_eq!(verify(TOKEN, &c, "agent2", 999).unwrap(), scope());
        assert_eq!(verify(TOKEN, &c, "agent2", 1_000).unwrap(), scope());
        let s = verify(TOKEN, &c, "agent2", 5).unwrap();
        s.check_offer("sb1", Some("c1/sb1@2"), Some("agent1"))
            .unwrap();
        s.check_sandbox("sb1").unwrap();
    }

    #[test]
    fn an_expired_credential_is_refused_as_unauthorized() {
        let c = issue(TOKEN, &scope());
        let e = verify(TOKEN, &c, "agent2", 1_001).unwrap_err();
        assert!(
            matches!(
                e,
                CredentialError::Expired {
                    expires: 1_000,
                    now: 1_001,
                    ..
                }
            ),
            "{e}"
        );
        assert!(!e.is_forbidden());
        assert!(e.to_string().contains("expired"), "{e}");
    }

    #[test]
    fn a_credential_for_another_target_is_forbidden() {
        let c = issue(TOKEN, &scope());
        let e = verify(TOKEN, &c, "agent3", 5).unwrap_err();
        assert_eq!(
            e,
            CredentialError::WrongTarget {
                want: "agent2".into(),
                here: "agent3".into()
            }
        );
        assert!(e.is_forbidden());
        assert!(e.to_string().contains("target node agent2"), "{e}");
    }

    #[test]
    fn a_credential_for_another_sandbox_is_forbidden() {
        let s = verify(TOKEN, &issue(TOKEN, &scope()), "agent2", 5).unwrap();
        let e = s.check_sandbox("sb2").unwrap_err();
        assert!(e.is_forbidden());
        assert!(
            e.to_string()
                .contains("for sandbox sb1, not for sandbox sb2"),
            "{e}"
        );
        let e = s
            .check_offer("sb2", Some("c1/sb1@2"), Some("agent1"))
            .unwrap_err();
        assert!(matches!(e, CredentialError::WrongSandbox { .. }), "{e}");
        // Same sandbox, another owner tag (an older generation) or source.
        let e = s
            .check_offer("sb1", Some("c1/sb1@1"), Some("agent1"))
            .unwrap_err();
        assert!(e.to_string().contains("owner tag"), "{e}");
        let e = s.check_offer("sb1", Some("c1/sb1@2"), None).unwrap_err();
        assert!(e.to_string().contains("source node"), "{e}");
        let e = s
            .check_offer("sb1", Some("c1/sb1@2"), Some("agent3"))
            .unwrap_err();
        assert!(e.is_forbidden(), "{e}");
    }

    #[test]
    fn a_tampered_credential_does_not_verify() {
        let c = issue(TOKEN, &scope());
        // Another cluster's token.
        let e = verify("another-cluster-token-xyz", &c, "agent2", 5).unwrap_err();
        assert!(matches!(e, CredentialError::BadSignature { .. }), "{e}");
        assert!(!e.is_forbidden());
        // Fields changed (sandbox, expiry, target) with the old signature.
        let sig = c.rsplit_once('.').unwrap().1;
        for changed in [
            MigrationScope {
                sandbox: "sb2".into(),
                ..scope()
            },
            MigrationScope {
                expires: u64::MAX,
                ..scope()
            },
            MigrationScope {
                to: "agent3".into(),
                ..scope()
            },
        ] {
            let forged = format!(
                "{PREFIX}{}.{sig}",
                hex::encode(serde_json::to_vec(&changed).unwrap())
            );
            let e = verify(TOKEN, &forged, &changed.to, 5).unwrap_err();
            assert!(matches!(e, CredentialError::BadSignature { .. }), "{e}");
        }
        // A flipped signature byte, a truncated one, garbage.
        let mut flipped = c.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert!(matches!(
            verify(TOKEN, &flipped, "agent2", 5),
            Err(CredentialError::BadSignature { .. })
        ));
        assert!(verify(TOKEN, &c[..c.len() - 2], "agent2", 5).is_err());
        assert!(matches!(
            verify(TOKEN, "hmig1.zz.zz", "agent2", 5),
            Err(CredentialError::Malformed(_))
        ));
        assert_eq!(
            verify(TOKEN, TOKEN, "agent2", 5),
            Err(CredentialError::NotACredential)
        );
    }

    #[test]
    fn the_old_unscoped_credential_is_not_accepted() {
        // HMAC("agent-migration") keyed with the cluster token, the credential
        // before scoping.
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(TOKEN.as_bytes()).unwrap();
        m.update(b"agent-migration");
        let old = hex::encode(m.finalize().into_bytes());
        assert_eq!(
            verify(TOKEN, &old, "agent2", 5),
            Err(CredentialError::NotACredential)
        );
    }
}
