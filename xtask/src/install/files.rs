//! Writing files so that a second install changes nothing: each file is compared with what is
//! there (bytes and mode) and written only when it differs, through a temporary file and a
//! rename (a running binary is replaced, never truncated). Every action is reported.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

/// What happened to one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It did not exist.
    Created,
    /// It existed with other bytes or another mode.
    Updated,
    /// It was already as wanted.
    Unchanged,
    /// It was removed.
    Removed,
    /// It was kept on purpose (an edited config, state).
    Kept,
    /// There was nothing to remove.
    Absent,
}

impl Outcome {
    fn word(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Updated => "updated",
            Outcome::Unchanged => "unchanged",
            Outcome::Removed => "removed",
            Outcome::Kept => "kept",
            Outcome::Absent => "absent",
        }
    }

    /// Whether the file system changed.
    pub fn changed(self) -> bool {
        matches!(self, Outcome::Created | Outcome::Updated | Outcome::Removed)
    }
}

/// Writes below an optional DESTDIR and reports each path by its final (installed) name.
pub struct Tree {
    destdir: Option<PathBuf>,
    /// Every path touched, with its outcome.
    pub log: Vec<(PathBuf, Outcome)>,
}

impl Tree {
    /// A tree rooted at `/`, or at `destdir`.
    pub fn new(destdir: Option<PathBuf>) -> Self {
        Self {
            destdir,
            log: Vec::new(),
        }
    }

    /// Where `path` (absolute, as installed) is on this machine.
    pub fn staged(&self, path: &Path) -> PathBuf {
        match &self.destdir {
            Some(d) => d.join(path.strip_prefix("/").unwrap_or(path)),
            None => path.to_owned(),
        }
    }

    fn record(&mut self, path: &Path, outcome: Outcome, note: &str) -> Outcome {
        println!("  {:<9} {}{note}", outcome.word(), path.display());
        self.log.push((path.to_owned(), outcome));
        outcome
    }

    /// How many paths changed.
    pub fn changes(&self) -> usize {
        self.log.iter().filter(|(_, o)| o.changed()).count()
    }

    /// Makes a directory (and its parents); sets `mode` on it when `own` (a directory that is
    /// Hearth's, not a shared one like `/usr/local/bin`).
    pub fn dir(&mut self, path: &Path, mode: u32, own: bool) -> anyhow::Result<Outcome> {
        let staged = self.staged(path);
        let outcome = match fs::metadata(&staged) {
            Ok(m) if m.is_dir() => {
                if own && m.permissions().mode() & 0o7777 != mode {
                    set_mode(&staged, mode)?;
                    Outcome::Updated
                } else {
                    Outcome::Unchanged
                }
            }
            Ok(_) => anyhow::bail!("{} exists and is not a directory", staged.display()),
            Err(_) => {
                fs::create_dir_all(&staged)
                    .with_context(|| format!("Cannot create {}", staged.display()))?;
                set_mode(&staged, mode)?;
                Outcome::Created
            }
        };
        if own || outcome != Outcome::Unchanged {
            self.record(path, outcome, &format!("/ ({mode:04o})"));
        }
        Ok(outcome)
    }

    /// Puts `bytes` at `path` with `mode`, unless it is already so.
    pub fn file(&mut self, path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<Outcome> {
        let staged = self.staged(path);
        let outcome = match fs::symlink_metadata(&staged) {
            Ok(m) if m.is_file() => {
                let same = m.len() == bytes.len() as u64
                    && fs::read(&staged)
                        .with_context(|| format!("Cannot read {}", staged.display()))?
                        == bytes;
                if same && m.permissions().mode() & 0o7777 == mode {
                    Outcome::Unchanged
                } else if same {
                    set_mode(&staged, mode)?;
                    Outcome::Updated
                } else {
                    replace(&staged, bytes, mode)?;
                    Outcome::Updated
                }
            }
            Ok(m) if m.is_dir() => anyhow::bail!("{} is a directory", staged.display()),
            Ok(_) => {
                replace(&staged, bytes, mode)?;
                Outcome::Updated
            }
            Err(_) => {
                replace(&staged, bytes, mode)?;
                Outcome::Created
            }
        };
        Ok(self.record(path, outcome, &format!(" ({mode:04o})")))
    }

    /// Records that `path` was left as it is, with why.
    pub fn keep(&mut self, path: &Path, why: &str) -> Outcome {
        self.record(path, Outcome::Kept, &format!(" ({why})"))
    }

    /// Removes a file (or symlink).
    pub fn remove_file(&mut self, path: &Path) -> anyhow::Result<Outcome> {
        let staged = self.staged(path);
        let outcome = match fs::remove_file(&staged) {
            Ok(()) => Outcome::Removed,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Outcome::Absent,
            Err(e) => return Err(e).with_context(|| format!("Cannot remove {}", staged.display())),
        };
        Ok(self.record(path, outcome, ""))
    }

    /// Removes a directory if it is empty (Hearth's own directories after their files went).
    pub fn remove_empty_dir(&mut self, path: &Path) -> anyhow::Result<Outcome> {
        let staged = self.staged(path);
        let Ok(mut entries) = fs::read_dir(&staged) else {
            return Ok(Outcome::Absent);
        };
        if entries.next().is_some() {
            return Ok(self.keep(path, "not empty"));
        }
        fs::remove_dir(&staged).with_context(|| format!("Cannot remove {}", staged.display()))?;
        Ok(self.record(path, Outcome::Removed, "/"))
    }

    /// Removes a directory and everything in it.
    pub fn remove_tree(&mut self, path: &Path) -> anyhow::Result<Outcome> {
        let staged = self.staged(path);
        let outcome = match fs::remove_dir_all(&staged) {
            Ok(()) => Outcome::Removed,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Outcome::Absent,
            Err(e) => return Err(e).with_context(|| format!("Cannot remove {}", staged.display())),
        };
        Ok(self.record(path, outcome, "/ (and everything in it)"))
    }
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("Cannot set the mode of {}", path.display()))
}

/// Writes a sibling temporary file, syncs it and renames it over `path`.
fn replace(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .context("A file to install has no directory")?;
    fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    let name = path.file_name().context("A file to install has no name")?;
    let tmp = dir.join(format!(".{}.xtask-install", name.to_string_lossy()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("Cannot write {}", path.display()))
}

/// A unified diff of two texts (`-` lines only in `old`, `+` only in `new`, 3 lines of
/// context), or `None` when they are equal.
pub fn unified_diff(old_name: &str, old: &str, new_name: &str, new: &str) -> Option<String> {
    if old == new {
        return None;
    }
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    // Longest common subsequence table; configs are a few hundred lines.
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    // The edit script: (tag, old index, new index).
    let mut ops = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            ops.push((' ', i, j));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            // Deletions first, as GNU diff prints a changed line.
            ops.push(('-', i, j));
            i += 1;
        } else {
            ops.push(('+', i, j));
            j += 1;
        }
    }
    const CONTEXT: usize = 3;
    let mut out = format!("--- {old_name}\n+++ {new_name}\n");
    let mut k = 0;
    while k < ops.len() {
        if ops[k].0 == ' ' {
            k += 1;
            continue;
        }
        // A hunk: from CONTEXT before this change to CONTEXT after the last change that is
        // at most 2 * CONTEXT equal lines away.
        let start = k.saturating_sub(CONTEXT);
        let mut end = k;
        let mut last_change = k;
        while end < ops.len() {
            if ops[end].0 != ' ' {
                last_change = end;
            } else if end - last_change > 2 * CONTEXT {
                break;
            }
            end += 1;
        }
        let end = (last_change + CONTEXT + 1).min(ops.len());
        let hunk = &ops[start..end];
        let old_count = hunk.iter().filter(|o| o.0 != '+').count();
        let new_count = hunk.iter().filter(|o| o.0 != '-').count();
        let (_, oi, nj) = hunk[0];
        // GNU's form: `start,count`, just `start` for one line, and the line before for none.
        let range = |first: usize, count: usize| match count {
            1 => format!("{}", first + 1),
            0 => format!("{first},0"),
            n => format!("{},{n}", first + 1),
        };
        out.push_str(&format!(
            "@@ -{} +{} @@\n",
            range(oi, old_count),
            range(nj, new_count)
        ));
        for &(tag, oi, nj) in hunk {
            let line = if tag == '+' { b[nj] } else { a[oi] };
            out.push(tag);
            out.push_str(line);
            out.push('\n');
        }
        k = end;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::MetadataExt as _, process::Command};

    use super::*;

    #[test]
    fn a_second_write_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tree::new(Some(dir.path().to_owned()));
        let p = Path::new("/a/b/file");
        assert_eq!(t.file(p, b"one", 0o644).unwrap(), Outcome::Created);
        let ino = fs::metadata(dir.path().join("a/b/file")).unwrap().ino();
        assert_eq!(t.file(p, b"one", 0o644).unwrap(), Outcome::Unchanged);
        assert_eq!(
            fs::metadata(dir.path().join("a/b/file")).unwrap().ino(),
            ino
        );
        assert_eq!(t.file(p, b"one", 0o600).unwrap(), Outcome::Updated);
        assert_eq!(t.file(p, b"two", 0o600).unwrap(), Outcome::Updated);
        assert_eq!(fs::read(dir.path().join("a/b/file")).unwrap(), b"two");
        assert_eq!(t.changes(), 3);
        assert_eq!(t.remove_file(p).unwrap(), Outcome::Removed);
        assert_eq!(t.remove_file(p).unwrap(), Outcome::Absent);
        assert_eq!(
            t.remove_empty_dir(Path::new("/a/b")).unwrap(),
            Outcome::Removed
        );
        // No temporary file was left behind.
        assert_eq!(fs::read_dir(dir.path().join("a")).unwrap().count(), 0);
    }

    #[test]
    fn diff_matches_gnu_diff() {
        let old: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        let new = old
            .replace("line 2\n", "line two\n")
            .replace("line 20\n", "")
            .replace("line 30\n", "line 30\nline 31\n");
        let ours = unified_diff("a", &old, "b", &new).unwrap();
        assert!(unified_diff("a", &old, "b", &old).is_none());
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), &old).unwrap();
        fs::write(dir.path().join("b"), &new).unwrap();
        let gnu = Command::new("diff")
            .current_dir(dir.path())
            .args(["-u", "--label", "a", "--label", "b", "a", "b"])
            .output()
            .unwrap();
        assert_eq!(ours, String::from_utf8_lossy(&gnu.stdout));
    }
}
