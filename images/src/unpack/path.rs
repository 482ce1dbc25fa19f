//! Turning tar entry names into paths inside the root, safely.
//!
//! Names are split into components; `..` and absolute names are rejected outright. Parent
//! directories are then walked from the root one component at a time, following symlinks the
//! way a chroot would (an absolute target starts again at the root); a walk that would climb
//! above the root is an error. The returned path has no symlink in any parent component, and
//! the unpacker is the only writer of the tree, so plain path operations on it stay inside.

use std::{
    collections::VecDeque,
    ffi::{OsStr, OsString},
    fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use super::UnpackError;

/// Symlinks followed in one walk before it counts as a loop (Linux's limit).
const MAX_HOPS: u32 = 40;

/// Splits a tar entry name into its components. `./` and empty components are dropped.
pub fn components(name: &[u8]) -> Result<Vec<OsString>, UnpackError> {
    let shown = || String::from_utf8_lossy(name).into_owned();
    if name.first() == Some(&b'/') {
        return Err(UnpackError::Absolute(shown()));
    }
    let mut out = Vec::new();
    for c in name.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(UnpackError::Traversal(shown())),
            c => out.push(OsStr::from_bytes(c).to_owned()),
        }
    }
    Ok(out)
}

/// Resolves the directory made of `dirs` under `root`, following symlinks inside the root.
/// Missing directories are created (mode 0755) when `create` is set, else the result is `None`.
pub fn resolve_dir(
    root: &Path,
    dirs: &[OsString],
    create: bool,
    shown: &str,
) -> Result<Option<PathBuf>, UnpackError> {
    let mut stack: Vec<OsString> = Vec::new();
    let mut pending: VecDeque<OsString> = dirs.iter().cloned().collect();
    let mut hops = 0;
    while let Some(c) = pending.pop_front() {
        if c.is_empty() || c == "." {
            continue;
        }
        if c == ".." {
            if stack.pop().is_none() {
                return Err(UnpackError::SymlinkEscape(shown.to_owned()));
            }
            continue;
        }
        let mut path = root.to_path_buf();
        path.extend(&stack);
        path.push(&c);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_HOPS {
                    return Err(UnpackError::SymlinkLoop(shown.to_owned()));
                }
                let target = fs::read_link(&path).map_err(|source| UnpackError::Io {
                    what: "read symlink",
                    path: path.clone(),
                    source,
                })?;
                let bytes = target.as_os_str().as_bytes();
                if bytes.first() == Some(&b'/') {
                    stack.clear();
                }
                for (i, part) in bytes
                    .split(|b| *b == b'/')
                    .filter(|p| !p.is_empty())
                    .enumerate()
                {
                    pending.insert(i, OsStr::from_bytes(part).to_owned());
                }
            }
            Ok(m) if m.is_dir() => stack.push(c),
            Ok(_) => return Err(UnpackError::NotADirectory(shown.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !create {
                    return Ok(None);
                }
                fs::create_dir(&path).map_err(|source| UnpackError::Io {
                    what: "create directory",
                    path: path.clone(),
                    source,
                })?;
                stack.push(c);
            }
            Err(source) => {
                return Err(UnpackError::Io {
                    what: "inspect",
                    path,
                    source,
                });
            }
        }
    }
    let mut path = root.to_path_buf();
    path.extend(&stack);
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn comps(s: &str) -> Vec<OsString> {
        components(s.as_bytes()).unwrap()
    }

    #[test]
    fn splits_and_rejects() {
        assert_eq!(comps("./a//b/./c/"), ["a", "b", "c"]);
        assert!(matches!(
            components(b"/etc/passwd"),
            Err(UnpackError::Absolute(_))
        ));
        assert!(matches!(
            components(b"a/../../x"),
            Err(UnpackError::Traversal(_))
        ));
    }

    #[test]
    fn follows_symlinks_inside_and_stops_escapes() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("usr/lib")).unwrap();
        symlink("usr/lib", r.join("lib")).unwrap();
        symlink("/usr", r.join("abs")).unwrap();
        symlink("../../..", r.join("usr/up")).unwrap();
        symlink("loop", r.join("loop")).unwrap();
        assert_eq!(
            resolve_dir(r, &comps("lib/x"), true, "").unwrap().unwrap(),
            r.join("usr/lib/x")
        );
        assert_eq!(
            resolve_dir(r, &comps("abs/lib"), false, "")
                .unwrap()
                .unwrap(),
            r.join("usr/lib")
        );
        assert!(matches!(
            resolve_dir(r, &comps("usr/up"), true, ""),
            Err(UnpackError::SymlinkEscape(_))
        ));
        assert!(matches!(
            resolve_dir(r, &comps("loop"), true, ""),
            Err(UnpackError::SymlinkLoop(_))
        ));
        assert_eq!(resolve_dir(r, &comps("nope/x"), false, "").unwrap(), None);
    }
}
