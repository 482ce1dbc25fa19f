//! Resource limits from the spec (`"nofile"`, `"nproc"`, ...), resolved to `RLIMIT_*` numbers
//! before the fork so the child only calls `setrlimit`.

use hearth_proto::init as proto;
use nix::sys::resource::Resource;

use crate::spec::SpecError;

/// One resolved limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    /// The `RLIMIT_*` resource number.
    pub resource: Resource,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

const NAMES: &[(&str, Resource)] = &[
    ("as", Resource::RLIMIT_AS),
    ("core", Resource::RLIMIT_CORE),
    ("cpu", Resource::RLIMIT_CPU),
    ("data", Resource::RLIMIT_DATA),
    ("fsize", Resource::RLIMIT_FSIZE),
    ("locks", Resource::RLIMIT_LOCKS),
    ("memlock", Resource::RLIMIT_MEMLOCK),
    ("msgqueue", Resource::RLIMIT_MSGQUEUE),
    ("nice", Resource::RLIMIT_NICE),
    ("nofile", Resource::RLIMIT_NOFILE),
    ("nproc", Resource::RLIMIT_NPROC),
    ("rss", Resource::RLIMIT_RSS),
    ("rtprio", Resource::RLIMIT_RTPRIO),
    ("rttime", Resource::RLIMIT_RTTIME),
    ("sigpending", Resource::RLIMIT_SIGPENDING),
    ("stack", Resource::RLIMIT_STACK),
];

impl Rlimit {
    /// Resolves a spec entry: a known name (lower case, with or without `RLIMIT_`), soft <= hard.
    pub fn from_spec(r: &proto::Rlimit) -> Result<Self, SpecError> {
        let name = r.resource.to_ascii_lowercase();
        let name = name.strip_prefix("rlimit_").unwrap_or(&name);
        let resource = NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .ok_or_else(|| SpecError::BadRlimit(format!("unknown resource {:?}", r.resource)))?;
        if r.soft > r.hard {
            return Err(SpecError::BadRlimit(format!(
                "{}: soft limit {} exceeds hard limit {}",
                r.resource, r.soft, r.hard
            )));
        }
        Ok(Self {
            resource,
            soft: r.soft,
            hard: r.hard,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let r = Rlimit::from_spec(&proto::Rlimit {
            resource: "RLIMIT_NOFILE".into(),
            soft: 1024,
            hard: 4096,
        })
        .unwrap();
        assert_eq!(r.resource, Resource::RLIMIT_NOFILE);
        assert!(
            Rlimit::from_spec(&proto::Rlimit {
                resource: "nofile".into(),
                soft: 2,
                hard: 1
            })
            .is_err()
        );
    }
}
