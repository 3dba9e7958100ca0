//! Resolves the `user` of an exec request (`name`, `uid`, `name:group`, `uid:gid`)
//! against the root filesystem's `/etc/passwd` and `/etc/group`, as Docker does.

/// The credentials a process runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (includes `gid`).
    pub groups: Vec<u32>,
}

/// Why a `user` spec cannot be resolved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    /// The user name is not in /etc/passwd.
    #[error("unable to find user {0}: no matching entries in /etc/passwd")]
    UnknownUser(String),
    /// The group name is not in /etc/group.
    #[error("unable to find group {0}: no matching entries in /etc/group")]
    UnknownGroup(String),
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        Some(PasswdEntry { name, uid, gid })
    })
}

/// (name, gid, members) of each well-formed /etc/group line.
fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    group.lines().filter_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        let gid = f.next()?.parse().ok()?;
        let members = f
            .next()
            .unwrap_or("")
            .split(',')
            .filter(|m| !m.is_empty())
            .collect();
        Some((name, gid, members))
    })
}

/// Resolves `spec`; an empty spec is root. `passwd`/`group` are the file contents
/// (empty when the image has none).
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Identity, UserError> {
    let spec = if spec.is_empty() { "0" } else { spec };
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };

    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd).find(|e| e.uid == uid),
        Err(_) => Some(
            passwd_entries(passwd)
                .find(|e| e.name == user_part)
                .ok_or_else(|| UserError::UnknownUser(user_part.to_string()))?,
        ),
    };
    let uid = match &entry {
        Some(e) => e.uid,
        // why: a numeric uid needs no passwd entry (Docker runs it with gid 0).
        None => user_part.parse().unwrap_or(0),
    };

    let gid = match group_part {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries(group)
                .find(|(name, _, _)| *name == g)
                .map(|(_, gid, _)| gid)
                .ok_or_else(|| UserError::UnknownGroup(g.to_string()))?,
        },
        None => entry.as_ref().map(|e| e.gid).unwrap_or(0),
    };

    let mut groups = vec![gid];
    if let Some(e) = &entry {
        for (_, g, members) in group_entries(group) {
            if members.contains(&e.name) && !groups.contains(&g) {
                groups.push(g);
            }
        }
    }
    Ok(Identity { uid, gid, groups })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          app:x:1000:1000::/home/app:/bin/sh\n\
                          nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:app,other\napp:x:1000:\nnogroup:x:65534:\n";

    fn id(uid: u32, gid: u32, groups: &[u32]) -> Identity {
        Identity {
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn empty_user_is_root() {
        assert_eq!(resolve("", PASSWD, GROUP), Ok(id(0, 0, &[0])));
    }

    #[test]
    fn name_takes_primary_and_supplementary_groups() {
        assert_eq!(
            resolve("app", PASSWD, GROUP),
            Ok(id(1000, 1000, &[1000, 10]))
        );
        assert_eq!(
            resolve("nobody", PASSWD, GROUP),
            Ok(id(65534, 65534, &[65534]))
        );
    }

    #[test]
    fn numeric_uid_works_with_or_without_passwd_entry() {
        assert_eq!(
            resolve("1000", PASSWD, GROUP),
            Ok(id(1000, 1000, &[1000, 10]))
        );
        assert_eq!(resolve("4242", PASSWD, GROUP), Ok(id(4242, 0, &[0])));
        assert_eq!(resolve("4242", "", ""), Ok(id(4242, 0, &[0])));
    }

    #[test]
    fn explicit_group_by_name_or_number() {
        assert_eq!(resolve("app:wheel", PASSWD, GROUP), Ok(id(1000, 10, &[10])));
        assert_eq!(
            resolve("1000:77", PASSWD, GROUP),
            Ok(id(1000, 77, &[77, 10]))
        );
    }

    #[test]
    fn unknown_names_are_errors() {
        assert_eq!(
            resolve("ghost", PASSWD, GROUP),
            Err(UserError::UnknownUser("ghost".into()))
        );
        assert_eq!(
            resolve("app:ghosts", PASSWD, GROUP),
            Err(UserError::UnknownGroup("ghosts".into()))
        );
    }
}
