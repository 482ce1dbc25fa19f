//! The control socket: a Unix stream socket; each request is one line, each answer one line of
//! JSON (`{"ok":true,…}` or `{"ok":false,"error":"…"}`).
//!
//! | request    | answer / effect |
//! |------------|-----------------|
//! | `status`   | `state`, `pid`, `uptime_ms`, `boot_time_us`, `vcpus`, `memory_mib` |
//! | `metrics`  | `metrics`: vCPU exits by reason, boot time, per-device counters |
//! | `serial`   | `serial`: the serial ring's contents (only with `serial = "ring"`) |
//! | `shutdown` | injects Ctrl-Alt-Del through the i8042: the guest is asked to stop |
//! | `kill`     | answers, then the VMM exits at once with the "killed" code |

use std::{
    collections::HashMap,
    io::{Read, Write},
    os::{
        fd::{AsRawFd, RawFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
};

/// Longest request line.
const MAX_LINE: usize = 256;
/// Most concurrent control connections.
const MAX_CONNS: usize = 16;

/// Why the control socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another process is listening there.
    #[error("Socket path {0} is in use by another process")]
    InUse(String),
    /// Something that is not a socket is there.
    #[error("Socket path {0} exists and is not a stale socket")]
    Exists(String),
    /// bind/listen failed.
    #[error("Cannot listen on {0}")]
    Bind(String, #[source] std::io::Error),
}

/// Binds a listening Unix socket at `path`, refusing a path another process listens on or
/// a non-socket file, and replacing a stale socket nobody listens on.
pub fn bind_unix(path: &Path) -> Result<UnixListener, ControlError> {
    use std::os::unix::fs::FileTypeExt as _;
    let shown = path.display().to_string();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ControlError::Exists(shown));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse(shown));
        }
        // A stale socket left by a process that died: nobody will ever answer on it.
        std::fs::remove_file(path).map_err(|e| ControlError::Bind(shown.clone(), e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| ControlError::Bind(shown.clone(), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| ControlError::Bind(shown, e))?;
    Ok(listener)
}

/// A request the main loop must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `status`.
    Status,
    /// `metrics`.
    Metrics,
    /// `serial`.
    Serial,
    /// `shutdown`.
    Shutdown,
    /// `kill`.
    Kill,
}

impl Command {
    /// Parses one request line.
    pub fn parse(line: &str) -> Result<Self, String> {
        match line.trim() {
            "status" => Ok(Self::Status),
            "metrics" => Ok(Self::Metrics),
            "serial" => Ok(Self::Serial),
            "shutdown" => Ok(Self::Shutdown),
            "kill" => Ok(Self::Kill),
            other => Err(format!(
                "Unknown command {other:?} (status, metrics, serial, shutdown, kill)"
            )),
        }
    }
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// The listener and its connections.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    conns: HashMap<RawFd, Conn>,
}

/// What happened on a control fd.
pub enum ControlEvent {
    /// A new connection to watch.
    Accepted(RawFd),
    /// A connection ended; stop watching it.
    Closed(RawFd),
    /// A request: answer it with [`ControlServer::reply`].
    Request(RawFd, Result<Command, String>),
}

impl ControlServer {
    /// Serves `listener`, bound at `path`.
    pub fn new(listener: UnixListener, path: PathBuf) -> Self {
        Self {
            listener,
            path,
            conns: HashMap::new(),
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listener's fd.
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// True when `fd` is one of ours.
    pub fn owns(&self, fd: RawFd) -> bool {
        fd == self.listener_fd() || self.conns.contains_key(&fd)
    }

    /// Handles readiness of `fd`.
    pub fn ready(&mut self, fd: RawFd) -> Vec<ControlEvent> {
        let mut out = Vec::new();
        if fd == self.listener_fd() {
            while let Ok((stream, _)) = self.listener.accept() {
                if self.conns.len() >= MAX_CONNS || stream.set_nonblocking(true).is_err() {
                    continue;
                }
                let fd = stream.as_raw_fd();
                self.conns.insert(
                    fd,
                    Conn {
                        stream,
                        buf: Vec::new(),
                    },
                );
                out.push(ControlEvent::Accepted(fd));
            }
            return out;
        }
        let Some(conn) = self.conns.get_mut(&fd) else {
            return out;
        };
        let mut chunk = [0u8; 256];
        let mut closed = false;
        loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        while let Some(nl) = conn.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = conn.buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line).into_owned();
            out.push(ControlEvent::Request(fd, Command::parse(&line)));
        }
        if conn.buf.len() > MAX_LINE {
            closed = true;
        }
        if closed {
            self.conns.remove(&fd);
            out.push(ControlEvent::Closed(fd));
        }
        out
    }

    /// Sends one JSON line on connection `fd` (best effort: a peer that went away is dropped).
    pub fn reply(&mut self, fd: RawFd, value: &serde_json::Value) {
        if let Some(conn) = self.conns.get_mut(&fd) {
            let mut line = value.to_string();
            line.push('\n');
            // Answers are small; a peer that does not read them loses them.
            let _ = conn.stream.set_nonblocking(false);
            let _ = conn.stream.write_all(line.as_bytes());
            let _ = conn.stream.set_nonblocking(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(Command::parse("status\n"), Ok(Command::Status));
        assert_eq!(Command::parse(" kill "), Ok(Command::Kill));
        assert!(Command::parse("reboot").unwrap_err().contains("reboot"));
    }

    #[test]
    fn bind_refuses_live_sockets_and_files_and_replaces_stale_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.sock");
        let live = bind_unix(&p).unwrap();
        assert!(matches!(bind_unix(&p), Err(ControlError::InUse(_))));
        drop(live);
        // The file stays behind, nobody listens: stale.
        assert!(p.exists());
        let _again = bind_unix(&p).unwrap();
        let f = dir.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        assert!(matches!(bind_unix(&f), Err(ControlError::Exists(_))));
        assert_eq!(std::fs::read(&f).unwrap(), b"x");
    }

    #[test]
    fn serves_request_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.sock");
        let mut server = ControlServer::new(bind_unix(&p).unwrap(), p.clone());
        let mut client = UnixStream::connect(&p).unwrap();
        let ev = server.ready(server.listener_fd());
        let fd = match ev.as_slice() {
            [ControlEvent::Accepted(fd)] => *fd,
            _ => panic!("no accept"),
        };
        client.write_all(b"status\nbogus\n").unwrap();
        let ev = server.ready(fd);
        assert!(matches!(
            ev[0],
            ControlEvent::Request(_, Ok(Command::Status))
        ));
        assert!(matches!(ev[1], ControlEvent::Request(_, Err(_))));
        server.reply(fd, &serde_json::json!({"ok": true}));
        let mut line = [0u8; 12];
        client.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"{\"ok\":true}\n");
    }
}
