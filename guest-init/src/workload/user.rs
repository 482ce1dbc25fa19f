//! Resolving the spec's `user` ("user", "uid", "user:group", "uid:gid") against the image's
//! `/etc/passwd` and `/etc/group`.
//!
//! The files come from the image, so the parser takes any bytes: malformed lines are skipped,
//! never an error or a panic.

/// Who the workload runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids (including `gid`), sorted, without duplicates.
    pub groups: Vec<u32>,
    /// Home directory from `/etc/passwd` (for `HOME`), `/` when unknown.
    pub home: String,
}

impl Identity {
    /// Root with no supplementary groups beyond its own.
    pub fn root() -> Self {
        Self {
            uid: 0,
            gid: 0,
            groups: vec![0],
            home: "/root".into(),
        }
    }
}

/// Why the user cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    /// A user name not in the image's `/etc/passwd`.
    #[error("User {0:?} does not exist in the image's /etc/passwd")]
    UnknownUser(String),
    /// A group name not in the image's `/etc/group`.
    #[error("Group {0:?} does not exist in the image's /etc/group")]
    UnknownGroup(String),
    /// The `user` field is malformed.
    #[error("User {0:?} is not of the form user, uid, user:group or uid:gid")]
    Malformed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        let mut f = line.split(':');
        let name = f.next()?;
        let _pw = f.next()?;
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        let _gecos = f.next();
        let home = f.next().unwrap_or("");
        (!name.is_empty()).then_some(PasswdEntry {
            name,
            uid,
            gid,
            home,
        })
    })
}

fn group_entries(group: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    group.lines().filter_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        let mut f = line.split(':');
        let name = f.next()?;
        let _pw = f.next()?;
        let gid = f.next()?.parse().ok()?;
        let members = f
            .next()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .collect();
        (!name.is_empty()).then_some(GroupEntry { name, gid, members })
    })
}

fn is_numeric(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Resolves `user` (empty = root) against the contents of `/etc/passwd` and `/etc/group`.
///
/// Follows what container runtimes do: a name must exist; a numeric uid need not (then gid 0
/// and home `/`); supplementary groups are those that list the user by name, unless a group is
/// given explicitly.
pub fn resolve(user: &str, passwd: &str, group: &str) -> Result<Identity, UserError> {
    let user = user.trim();
    if user.is_empty() {
        return resolve("0", passwd, group);
    }
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    if user_part.is_empty() || group_part.is_some_and(|g| g.is_empty() || g.contains(':')) {
        return Err(UserError::Malformed(user.to_owned()));
    }
    let entry = if is_numeric(user_part) {
        let uid: u32 = user_part
            .parse()
            .map_err(|_| UserError::Malformed(user.to_owned()))?;
        passwd_entries(passwd)
            .find(|e| e.uid == uid)
            .unwrap_or(PasswdEntry {
                name: "",
                uid,
                gid: 0,
                home: "/",
            })
    } else {
        passwd_entries(passwd)
            .find(|e| e.name == user_part)
            .ok_or_else(|| UserError::UnknownUser(user_part.to_owned()))?
    };
    let home = if entry.home.is_empty() {
        "/".to_owned()
    } else {
        entry.home.to_owned()
    };
    let mut groups;
    let gid = match group_part {
        Some(g) if is_numeric(g) => {
            groups = Vec::new();
            g.parse()
                .map_err(|_| UserError::Malformed(user.to_owned()))?
        }
        Some(g) => {
            groups = Vec::new();
            group_entries(group)
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| UserError::UnknownGroup(g.to_owned()))?
        }
        None => {
            groups = if entry.name.is_empty() {
                Vec::new()
            } else {
                group_entries(group)
                    .filter(|e| e.members.contains(&entry.name))
                    .map(|e| e.gid)
                    .collect()
            };
            entry.gid
        }
    };
    groups.push(gid);
    groups.sort_unstable();
    groups.dedup();
    Ok(Identity {
        uid: entry.uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # a comment\n\
        broken line\n\
        app:x:1000:1000:App:/home/app:/bin/sh\n\
        nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n\
        nohome:x:1001:1001\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nextra:x:2000:app,other\nweb:x:3000:\nbad\n";

    #[test]
    fn names_and_numbers() {
        assert_eq!(resolve("", PASSWD, GROUP).unwrap(), Identity::root());
        assert_eq!(
            resolve("app", PASSWD, GROUP).unwrap(),
            Identity {
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 2000],
                home: "/home/app".into()
            }
        );
        assert_eq!(
            resolve("app:web", PASSWD, GROUP).unwrap(),
            Identity {
                uid: 1000,
                gid: 3000,
                groups: vec![3000],
                home: "/home/app".into()
            }
        );
        assert_eq!(
            resolve("1000", PASSWD, GROUP).unwrap().groups,
            vec![1000, 2000]
        );
        // A uid the image does not know: gid 0, home /.
        assert_eq!(
            resolve("4242:99", PASSWD, GROUP).unwrap(),
            Identity {
                uid: 4242,
                gid: 99,
                groups: vec![99],
                home: "/".into()
            }
        );
        assert_eq!(resolve("4242", PASSWD, GROUP).unwrap().gid, 0);
        assert_eq!(resolve("nohome", PASSWD, GROUP).unwrap().home, "/");
    }

    #[test]
    fn unknown_and_malformed() {
        assert_eq!(
            resolve("ghost", PASSWD, GROUP).unwrap_err(),
            UserError::UnknownUser("ghost".into())
        );
        assert_eq!(
            resolve("app:ghosts", PASSWD, GROUP).unwrap_err(),
            UserError::UnknownGroup("ghosts".into())
        );
        for bad in [":", "app:", ":1", "a:b:c", "99999999999"] {
            assert!(
                matches!(
                    resolve(bad, PASSWD, GROUP),
                    Err(UserError::Malformed(_)) | Err(UserError::UnknownUser(_))
                ),
                "{bad}"
            );
        }
    }

    proptest! {
        #[test]
        fn any_files_never_panic(user in ".{0,20}", passwd in ".{0,400}", group in ".{0,400}") {
            let _ = resolve(&user, &passwd, &group);
        }
    }
}
