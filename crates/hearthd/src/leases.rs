//! `hearthd dev`'s address leases: the embedded one-member Raft group holds
//! them, written directly (the same commands `hearthd agent` sends over HTTP).

use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use hearth_agent::leases::{BoxFuture, LeaseAuthority, LeaseError};
use hearth_store::{Cidr, Command, Reply, Store};

#[derive(Clone)]
pub struct StoreLeases {
    pub store: Store,
    pub node: String,
    pub instance: String,
}

impl std::fmt::Debug for StoreLeases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreLeases")
            .field("node", &self.node)
            .finish()
    }
}

fn refused(r: Reply) -> LeaseError {
    match r {
        Reply::Exhausted { message } => LeaseError::Exhausted(message),
        Reply::NotFound { what } => LeaseError::Refused(format!("no {what}")),
        Reply::DuplicateNode { id } => {
            LeaseError::Refused(format!("node id {id} is held by another agent instance"))
        }
        Reply::Invalid { message } => LeaseError::Refused(message),
        Reply::Conflict { message } => LeaseError::Refused(message),
        other => LeaseError::Refused(format!("unexpected store reply {other:?}")),
    }
}

impl StoreLeases {
    async fn write(&self, cmd: Command) -> Result<Reply, LeaseError> {
        self.store
            .write(cmd)
            .await
            .map_err(|e| LeaseError::Unavailable(e.to_string()))
    }

    /// This node's slice: `want`, or the next free one of the cluster range.
    pub async fn join(&self, want: Option<Cidr>) -> Result<Cidr> {
        let r = self
            .store
            .write(Command::AllocateSlice {
                node: self.node.clone(),
                instance: self.instance.clone(),
                want,
            })
            .await
            .context("asking the embedded control plane for this node's address slice")?;
        match r {
            Reply::Slice { slice } => Ok(slice.cidr),
            other => bail!(
                "the embedded control plane refused an address slice: {}",
                refused(other)
            ),
        }
    }
}

impl LeaseAuthority for StoreLeases {
    fn acquire<'a>(
        &'a self,
        sandbox: &'a str,
        want: Option<Ipv4Addr>,
    ) -> BoxFuture<'a, Result<Ipv4Addr, LeaseError>> {
        Box::pin(async move {
            match self
                .write(Command::Lease {
                    node: self.node.clone(),
                    instance: self.instance.clone(),
                    sandbox: sandbox.to_string(),
                    want,
                })
                .await?
            {
                Reply::Lease { ip, .. } => Ok(ip),
                other => Err(refused(other)),
            }
        })
    }

    fn release<'a>(&'a self, sandbox: &'a str) -> BoxFuture<'a, Result<(), LeaseError>> {
        Box::pin(async move {
            match self
                .write(Command::Release {
                    node: self.node.clone(),
                    instance: self.instance.clone(),
                    sandbox: sandbox.to_string(),
                })
                .await?
            {
                Reply::Released { .. } => Ok(()),
                other => Err(refused(other)),
            }
        })
    }

    fn retain(&self, keep: Vec<String>) -> BoxFuture<'_, Result<Vec<String>, LeaseError>> {
        Box::pin(async move {
            match self
                .write(Command::RetainLeases {
                    node: self.node.clone(),
                    instance: self.instance.clone(),
                    keep: keep.into_iter().collect(),
                })
                .await?
            {
                Reply::Released { released } => Ok(released),
                other => Err(refused(other)),
            }
        })
    }
}
