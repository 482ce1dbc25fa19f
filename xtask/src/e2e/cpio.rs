//! A writer for the `newc` cpio format the kernel unpacks as an initramfs.
//!
//! Written here rather than by running `cpio` on a directory so that the archive can hold a
//! device node without `mknod` and is the same bytes on every run (fixed owners and times).

/// Builds an archive in memory.
#[derive(Default)]
pub struct Archive {
    bytes: Vec<u8>,
    next_ino: u32,
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self {
            bytes: Vec::new(),
            next_ino: 1,
        }
    }

    /// Adds a directory (`path` without a leading `/`).
    pub fn dir(&mut self, path: &str, perm: u32) -> &mut Self {
        self.entry(path, S_IFDIR | perm, (0, 0), &[])
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> &mut Self {
        self.entry(path, S_IFREG | perm, (0, 0), data)
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> &mut Self {
        self.entry(path, S_IFCHR | perm, (major, minor), &[])
    }

    fn entry(&mut self, path: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> &mut Self {
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        self.header(ino, mode, nlink, data.len(), rdev, path);
        self.bytes.extend_from_slice(data);
        self.pad();
        self
    }

    fn header(
        &mut self,
        ino: u32,
        mode: u32,
        nlink: u32,
        size: usize,
        rdev: (u32, u32),
        name: &str,
    ) {
        let size = u32::try_from(size).expect("initramfs members are far below 4 GiB");
        let namesize = u32::try_from(name.len() + 1).expect("short names");
        // magic, then ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor
        // rdevminor namesize check, each 8 hex digits.
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for f in fields {
            self.bytes.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    /// Ends the archive with the trailer and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.header(0, 0, 1, 0, (0, 0), "TRAILER!!!");
        while !self.bytes.len().is_multiple_of(512) {
            self.bytes.push(0);
        }
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Write as _, process::Command};

    use super::*;

    #[test]
    fn layout_matches_the_newc_format() {
        let mut a = Archive::new();
        a.file("init", 0o755, b"abc");
        let bytes = a.finish();
        // 110-byte header + "init\0" padded to 116, then 3 bytes of data padded to 4.
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(&bytes[110..115], b"init\0");
        assert_eq!(&bytes[116..119], b"abc");
        assert_eq!(&bytes[120..126], b"070701");
        assert_eq!(bytes.len() % 512, 0);
    }

    /// GNU cpio, an independent reader, lists what we wrote.
    #[test]
    fn gnu_cpio_reads_it() {
        if let Some(why) = hearth_testkit::skip::program("cpio") {
            hearth_testkit::skip::skipped(&why);
            return;
        }
        let mut a = Archive::new();
        a.dir("dev", 0o755)
            .char_dev("dev/console", 0o600, 5, 1)
            .file("init", 0o755, b"#!/bin/sh\n")
            .dir("etc", 0o755)
            .file("etc/spec.json", 0o644, b"{}");
        let bytes = a.finish();
        let mut child = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let listing = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 5, "{listing}");
        assert!(lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" dev"));
        assert!(lines[1].starts_with("crw-------") && lines[1].contains("5,"));
        assert!(lines[2].starts_with("-rwxr-xr-x") && lines[2].ends_with(" init"));
        assert!(lines[4].starts_with("-rw-r--r--") && lines[4].ends_with(" etc/spec.json"));
    }
}
