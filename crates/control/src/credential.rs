//! The scoped credential a migration source presents to its target when the
//! control plane drives the migration.
//!
//! The control plane never hands the cluster token to a source agent. For each
//! migration it issues a credential that names what it allows: one sandbox
//! (the source agent's id of it), the owner tag the target's copy will carry,
//! the source and target nodes, an expiry (unix seconds) and the purpose. The
//! scope also carries the security-relevant values of the control plane's
//! record (the attempt id, vCPUs, memory and leased address), so a source
//! cannot offer a bigger VM than the target reserved room for, or another
//! sandbox's address. The credential carries the scope in the clear plus an
//! HMAC-SHA256 over its exact bytes keyed with the cluster token; a target
//! agent (which knows the cluster token) checks the HMAC before it parses
//! anything, and refuses a credential that is expired (401), tampered with
//! (401), or issued for another node, sandbox or offer (403).
//!
//! Format: `hmig2.<hex(JSON of the scope)>.<hex(HMAC over those JSON bytes)>`.

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
    /// The control plane's migration attempt id (its record's
    /// `migration.id`): the credential is for this one attempt.
    pub attempt: String,
    /// The sandbox's vCPUs as the control plane recorded (and reserved) them.
    pub cpus: u32,
    /// The sandbox's memory as the control plane recorded (and reserved) it.
    pub memory_mib: u64,
    /// The address the control plane leases the sandbox (none: it leases it
    /// none, and the offer must carry no network).
    #[serde(default)]
    pub ip: Option<String>,
    /// Unix time (seconds) after which the credential is refused.
    pub expires: u64,
    /// Always [`PURPOSE`]; covered by the HMAC so this credential is never
    /// taken for another derived one.
    pub purpose: String,
}

/// The only purpose a migration credential has.
pub const PURPOSE: &str = "migration-target";

const PREFIX: &str = "hmig2.";

/// Why a presented migration credential is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Not a migration credential at all (so it may be a plain API token).
    #[error("not a migration credential")]
    NotACredential,
    /// Not made of a hex scope and a hex HMAC, or (after the HMAC verified)
    /// its scope does not parse. Deliberately without detail: the caller is
    /// not yet known to hold the cluster token.
    #[error("malformed migration credential")]
    Malformed,
    /// The HMAC does not match its bytes (tampered with, or issued by
    /// another cluster). Names nothing of the unverified scope.
    #[error("migration credential does not verify (tampered with, or issued with another cluster token)")]
    BadSignature,
    /// Past its expiry.
    #[error("migration credential for sandbox {sandbox} expired at unix time {expires} (now {now} on this node; check the nodes' clocks if they disagree); start the migration again")]
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

fn mac(cluster_token: &str, body: &[u8]) -> hmac::Hmac<sha2::Sha256> {
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(cluster_token.as_bytes())
        .expect("HMAC takes keys of any length");
    // why: a domain tag, so this HMAC is never taken for another derived one.
    m.update(b"hearth-migration-credential-v2\0");
    m.update(body);
    m
}

/// Issues the credential for `scope` (its `purpose` is set to [`PURPOSE`]).
pub fn issue(cluster_token: &str, scope: &MigrationScope) -> String {
    let scope = MigrationScope {
        purpose: PURPOSE.into(),
        ..scope.clone()
    };
    let body = serde_json::to_vec(&scope).expect("a scope serialises");
    let tag = mac(cluster_token, &body).finalize().into_bytes();
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
    verify_at(cluster_token, presented, here, Some(now))
}

/// [`verify`] without the expiry check: for the abort of an incoming
/// migration, which only removes a VM that was never committed (or answers
/// that it was), so the source can still recover after its credential
/// expired (review m2). The HMAC, purpose and target are still checked.
pub fn verify_ignoring_expiry(
    cluster_token: &str,
    presented: &str,
    here: &str,
) -> Result<MigrationScope, CredentialError> {
    verify_at(cluster_token, presented, here, None)
}

fn verify_at(
    cluster_token: &str,
    presented: &str,
    here: &str,
    now: Option<u64>,
) -> Result<MigrationScope, CredentialError> {
    let rest = presented
        .strip_prefix(PREFIX)
        .ok_or(CredentialError::NotACredential)?;
    let (body, tag) = rest.split_once('.').ok_or(CredentialError::Malformed)?;
    let body = hex::decode(body).map_err(|_| CredentialError::Malformed)?;
    let tag = hex::decode(tag).map_err(|_| CredentialError::Malformed)?;
    // why: the HMAC over the raw bytes first; nothing unverified is parsed.
    // verify_slice compares in constant time.
    mac(cluster_token, &body)
        .verify_slice(&tag)
        .map_err(|_| CredentialError::BadSignature)?;
    let scope: MigrationScope =
        serde_json::from_slice(&body).map_err(|_| CredentialError::Malformed)?;
    if scope.purpose != PURPOSE {
        return Err(CredentialError::WrongPurpose(scope.purpose));
    }
    if let Some(now) = now.filter(|now| *now > scope.expires) {
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
    /// this owner tag, from this source node, with the vCPUs, memory and
    /// address the control plane recorded.
    pub fn check_offer(&self, offer: &OfferFields<'_>) -> Result<(), CredentialError> {
        self.check_sandbox(offer.sandbox)?;
        let field = |field, offered: Option<String>, allowed: String| {
            if offered.as_deref() != Some(allowed.as_str()) {
                return Err(CredentialError::WrongField {
                    sandbox: self.sandbox.clone(),
                    field,
                    allowed,
                    offered: offered.unwrap_or_else(|| "(none)".into()),
                });
            }
            Ok(())
        };
        let none = || "(none)".to_string();
        field(
            "owner tag",
            offer.owner.map(str::to_string),
            self.owner.clone(),
        )?;
        field(
            "source node",
            offer.source_node.map(str::to_string),
            self.from.clone(),
        )?;
        field("vCPUs", Some(offer.cpus.to_string()), self.cpus.to_string())?;
        // why: a restored sandbox's machine may differ from its record, but
        // never beyond the vCPUs the target reserved.
        if let Some(c) = offer.machine_cpus.filter(|c| *c > self.cpus) {
            field("machine vCPUs", Some(c.to_string()), self.cpus.to_string())?;
        }
        field(
            "memory MiB",
            Some(offer.memory_mib.to_string()),
            self.memory_mib.to_string(),
        )?;
        field(
            "address",
            Some(offer.ip.map(str::to_string).unwrap_or_else(none)),
            self.ip.clone().unwrap_or_else(none),
        )
    }
}

/// The fields of an offer a credential's scope covers.
#[derive(Debug, Clone, Copy)]
pub struct OfferFields<'a> {
    pub sandbox: &'a str,
    pub owner: Option<&'a str>,
    pub source_node: Option<&'a str>,
    pub cpus: u32,
    /// The cpus of the machine layout the target rebuilds, when given.
    pub machine_cpus: Option<u32>,
    pub memory_mib: u64,
    /// The sandbox's address, when it has a network.
    pub ip: Option<&'a str>,
}

impl<'a> OfferFields<'a> {
    pub fn of(offer: &'a hearth_api::migration::IncomingOffer) -> OfferFields<'a> {
        let sb = &offer.sandbox;
        OfferFields {
            sandbox: &sb.id,
            owner: offer.owner.as_deref(),
            source_node: offer.source_node.as_deref(),
            cpus: sb.cpus,
            machine_cpus: offer.machine.as_ref().map(|m| m.cpus),
            memory_mib: u64::from(sb.memory_mib),
            ip: sb.network.as_ref().map(|n| n.ip.as_str()),
        }
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
            attempt: "m-1".into(),
            cpus: 2,
            memory_mib: 256,
            ip: Some("10.88.0.5".into()),
            expires: 1_000,
            purpose: PURPOSE.into(),
        }
    }

    fn offer() -> OfferFields<'static> {
        OfferFields {
            sandbox: "sb1",
            owner: Some("c1/sb1@2"),
            source_node: Some("agent1"),
            cpus: 2,
            machine_cpus: Some(2),
            memory_mib: 256,
            ip: Some("10.88.0.5"),
        }
    }

    #[test]
    fn a_credential_verifies_on_its_target_before_its_expiry() {
        let c = issue(TOKEN, &scope());
        assert_eq!(verify(TOKEN, &c, "agent2", 999).unwrap(), scope());
        assert_eq!(verify(TOKEN, &c, "agent2", 1_000).unwrap(), scope());
        let s = verify(TOKEN, &c, "agent2", 5).unwrap();
        s.check_offer(&offer()).unwrap();
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
        assert!(e.to_string().contains("clocks"), "{e}");
        // The abort still takes it; a tampered or misdirected one it does not.
        assert_eq!(
            verify_ignoring_expiry(TOKEN, &c, "agent2").unwrap(),
            scope()
        );
        assert!(matches!(
            verify_ignoring_expiry(TOKEN, &c, "agent3"),
            Err(CredentialError::WrongTarget { .. })
        ));
        assert_eq!(
            verify_ignoring_expiry("another-cluster-token-xyz", &c, "agent2"),
            Err(CredentialError::BadSignature)
        );
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
            .check_offer(&OfferFields {
                sandbox: "sb2",
                ..offer()
            })
            .unwrap_err();
        assert!(matches!(e, CredentialError::WrongSandbox { .. }), "{e}");
        // Same sandbox, another owner tag (an older generation) or source.
        let e = s
            .check_offer(&OfferFields {
                owner: Some("c1/sb1@1"),
                ..offer()
            })
            .unwrap_err();
        assert!(e.to_string().contains("owner tag"), "{e}");
        let e = s
            .check_offer(&OfferFields {
                source_node: None,
                ..offer()
            })
            .unwrap_err();
        assert!(e.to_string().contains("source node"), "{e}");
        let e = s
            .check_offer(&OfferFields {
                source_node: Some("agent3"),
                ..offer()
            })
            .unwrap_err();
        assert!(e.is_forbidden(), "{e}");
    }

    /// Review M5: the offer's resources and address are the record's, not
    /// the source's word.
    #[test]
    fn an_offer_beyond_the_recorded_resources_or_address_is_forbidden() {
        let s = verify(TOKEN, &issue(TOKEN, &scope()), "agent2", 5).unwrap();
        for (bad, what) in [
            (OfferFields { cpus: 8, ..offer() }, "vCPUs"),
            (
                OfferFields {
                    machine_cpus: Some(8),
                    ..offer()
                },
                "machine vCPUs",
            ),
            (
                OfferFields {
                    memory_mib: 65_536,
                    ..offer()
                },
                "memory MiB",
            ),
            (
                OfferFields {
                    ip: Some("10.88.0.9"),
                    ..offer()
                },
                "address",
            ),
            (
                OfferFields {
                    ip: None,
                    ..offer()
                },
                "address",
            ),
        ] {
            let e = s.check_offer(&bad).unwrap_err();
            assert!(e.is_forbidden(), "{e}");
            assert!(e.to_string().contains(&format!("allows {what} ")), "{e}");
        }
        // A scope without an address refuses an offer that brings one.
        let s = MigrationScope {
            ip: None,
            ..scope()
        };
        let e = s.check_offer(&offer()).unwrap_err();
        assert!(e.to_string().contains("allows address '(none)'"), "{e}");
        s.check_offer(&OfferFields {
            ip: None,
            ..offer()
        })
        .unwrap();
    }

    #[test]
    fn a_tampered_credential_does_not_verify() {
        let c = issue(TOKEN, &scope());
        // Another cluster's token.
        let e = verify("another-cluster-token-xyz", &c, "agent2", 5).unwrap_err();
        assert_eq!(e, CredentialError::BadSignature);
        assert!(!e.is_forbidden());
        // Fields changed (sandbox, expiry, target, memory, attempt) with the
        // old signature.
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
            MigrationScope {
                memory_mib: 1 << 20,
                ..scope()
            },
            MigrationScope {
                attempt: "m-2".into(),
                ..scope()
            },
        ] {
            let forged = format!(
                "{PREFIX}{}.{sig}",
                hex::encode(serde_json::to_vec(&changed).unwrap())
            );
            let e = verify(TOKEN, &forged, &changed.to, 5).unwrap_err();
            assert_eq!(e, CredentialError::BadSignature);
        }
        // Review m5: the same fields in other bytes (whitespace) do not
        // verify either: the HMAC is over the bytes, checked before parsing,
        // and the refusal names nothing of the unverified scope.
        let body = hex::decode(c.strip_prefix(PREFIX).unwrap().split_once('.').unwrap().0).unwrap();
        let spaced = format!(" {}", String::from_utf8(body).unwrap());
        let forged = format!("{PREFIX}{}.{sig}", hex::encode(spaced));
        let e = verify(TOKEN, &forged, "agent2", 5).unwrap_err();
        assert_eq!(e, CredentialError::BadSignature);
        assert!(!e.to_string().contains("sb1"), "{e}");
        // Unparsable bytes behind a forged HMAC: refused as unverified, no
        // parser text.
        let junk = format!("{PREFIX}{}.{sig}", hex::encode("{not json"));
        assert_eq!(
            verify(TOKEN, &junk, "agent2", 5),
            Err(CredentialError::BadSignature)
        );
        // A flipped signature byte, a truncated one, garbage.
        let mut flipped = c.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert_eq!(
            verify(TOKEN, &flipped, "agent2", 5),
            Err(CredentialError::BadSignature)
        );
        assert!(verify(TOKEN, &c[..c.len() - 2], "agent2", 5).is_err());
        assert_eq!(
            verify(TOKEN, "hmig2.zz.zz", "agent2", 5),
            Err(CredentialError::Malformed)
        );
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
