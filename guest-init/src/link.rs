//! The connection to the agent: dialling (vsock or Unix socket), the handshake, reconnecting
//! with backoff, sending what the [`Outbox`] holds and turning the agent's messages into
//! [`HostEvent`]s for the supervisor.
//!
//! The link outlives any one connection. When a connection breaks, the workload keeps running;
//! the link dials again (10 ms doubling to 1 s), says `Hello{reconnect: true}` once init has a
//! spec, resends the log records the agent has not stored, and repeats `Started`/`Ready` so a
//! restarted agent learns the state. In standalone mode there is no connection: a console sink
//! prints the log records instead.

use std::{
    io,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use futures::{SinkExt as _, StreamExt as _};
use hearth_proto::{
    channel::{ChannelError, GuestChannel},
    init::{
        Exec, Hello, HostMessage, InstanceSpec, LogStream, Pong, RootFs, guest_message,
        host_message,
    },
};
use nix::{fcntl::OFlag, sys::stat::Mode as FileMode};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::UnixStream,
    sync::{Notify, mpsc},
};

use crate::{
    bootstrap::Transport,
    outbox::{Outbox, now_nanos},
    spec::defaults,
};

/// What the agent asked for, in order.
#[derive(Debug)]
pub enum HostEvent {
    /// Connected (`first` = the first successful handshake of this boot).
    Connected {
        /// True only once.
        first: bool,
    },
    /// The instance spec (from `Welcome` or, for a warm-pool member, `assign`).
    Spec(Box<InstanceSpec>),
    /// A warm-pool member's root, to assemble while it waits for its spec (`Welcome.root`).
    Root(RootFs),
    /// Deliver a signal to the workload.
    Signal(i32),
    /// Stop the workload.
    Stop {
        /// Signal (0 = the default).
        signal: i32,
        /// Grace before SIGKILL.
        grace: Duration,
    },
    /// Run a command.
    Exec(Exec),
    /// The agent refused this instance; init cannot go on.
    Rejected(String),
}

/// How the link reaches the agent, resolved at start (before init leaves the host's root).
#[derive(Debug)]
pub enum Dial {
    /// A Unix socket, reached through a handle on its directory so it stays reachable after
    /// `pivot_root` (and a restarted agent's new socket in the same directory is found).
    Unix {
        /// The socket's directory.
        dir: OwnedFd,
        /// The socket's name in it.
        name: PathBuf,
        /// The path as given (used while the directory handle path is too long).
        path: PathBuf,
    },
    /// AF_VSOCK.
    Vsock {
        /// Host CID.
        cid: u32,
        /// Host port.
        port: u32,
    },
}

impl Dial {
    /// Resolves the transport; for a Unix socket opens its directory now.
    pub fn new(transport: &Transport) -> io::Result<Self> {
        match transport {
            Transport::Unix { path } => {
                let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
                let dir = dir.unwrap_or(Path::new("."));
                let name = path
                    .file_name()
                    .ok_or_else(|| io::Error::other("the socket path has no file name"))?;
                let fd = nix::fcntl::open(
                    dir,
                    OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                    FileMode::empty(),
                )?;
                Ok(Self::Unix {
                    dir: fd,
                    name: name.into(),
                    path: path.clone(),
                })
            }
            Transport::Vsock { cid, port } => Ok(Self::Vsock {
                cid: *cid,
                port: *port,
            }),
            Transport::Standalone { .. } => Err(io::Error::other("standalone mode has no agent")),
        }
    }

    async fn connect(&self) -> io::Result<Conn> {
        match self {
            Self::Unix { dir, name, path } => {
                let via = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
                match UnixStream::connect(&via).await {
                    Ok(s) => Ok(Conn::Unix(s)),
                    // sun_path is 108 bytes; the original path may still be reachable.
                    Err(e) if e.raw_os_error() == Some(libc::ENAMETOOLONG) => {
                        Ok(Conn::Unix(UnixStream::connect(path).await?))
                    }
                    Err(e) => Err(e),
                }
            }
            Self::Vsock { cid, port } => {
                let addr = tokio_vsock::VsockAddr::new(*cid, *port);
                Ok(Conn::Vsock(tokio_vsock::VsockStream::connect(addr).await?))
            }
        }
    }
}

/// One connection's byte stream.
#[derive(Debug)]
pub enum Conn {
    /// Unix socket.
    Unix(UnixStream),
    /// vsock.
    Vsock(tokio_vsock::VsockStream),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Self::Vsock(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Self::Vsock(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
            Self::Vsock(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Self::Vsock(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Doubling delays between `first` and `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff starting at `first`, capped at `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            next: first,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// State shared between the link and the supervisor.
#[derive(Debug, Default)]
struct Shared {
    have_spec: bool,
    instance_id: String,
    /// Repeated after a reconnect.
    state: Vec<guest_message::Msg>,
    finishing: bool,
}

/// The supervisor's handle on the link.
#[derive(Debug, Clone)]
pub struct LinkHandle {
    shared: Arc<Mutex<Shared>>,
    finish: Arc<Notify>,
}

impl LinkHandle {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers a message to repeat after every reconnect (Started, Ready).
    pub fn remember(&self, msg: guest_message::Msg) {
        self.lock().state.push(msg);
    }

    /// Init has its spec (also when it came from elsewhere).
    pub fn set_spec(&self, instance_id: &str) {
        let mut s = self.lock();
        s.have_spec = true;
        s.instance_id = instance_id.to_owned();
    }

    /// Deliver what is queued, close the connection once the agent has it all, and stop.
    pub fn finish(&self) {
        self.lock().finishing = true;
        self.finish.notify_one();
    }
}

/// Starts the link task; events arrive on the returned receiver.
pub fn start(
    dial: Dial,
    outbox: Arc<Outbox>,
    instance_id: String,
    boot_id: String,
) -> (
    LinkHandle,
    mpsc::UnboundedReceiver<HostEvent>,
    tokio::task::JoinHandle<()>,
) {
    let handle = LinkHandle {
        shared: Arc::new(Mutex::new(Shared {
            instance_id,
            ..Shared::default()
        })),
        finish: Arc::new(Notify::new()),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let link = Link {
        dial,
        outbox,
        handle: handle.clone(),
        events: tx,
        boot_id,
    };
    let task = tokio::spawn(link.run());
    (handle, rx, task)
}

struct Link {
    dial: Dial,
    outbox: Arc<Outbox>,
    handle: LinkHandle,
    events: mpsc::UnboundedSender<HostEvent>,
    boot_id: String,
}

/// How a session ended.
enum End {
    /// Everything was delivered and the agent closed: the link is done.
    Finished,
    /// The connection broke.
    Broken(String),
}

impl Link {
    fn hello(&self) -> Hello {
        let s = self.handle.lock();
        Hello {
            protocol_version: hearth_proto::PROTOCOL_VERSION,
            init_version: env!("CARGO_PKG_VERSION").into(),
            instance_id: s.instance_id.clone(),
            reconnect: s.have_spec,
            boot_id: self.boot_id.clone(),
            last_log_seq: self.outbox.last_log_seq(),
            now_unix_nanos: now_nanos(),
        }
    }

    async fn run(self) {
        let mut backoff = Backoff::new(defaults::RECONNECT_FIRST, defaults::RECONNECT_MAX);
        let mut first = true;
        let mut failures: u64 = 0;
        loop {
            let conn = match self.dial.connect().await {
                Ok(c) => c,
                Err(e) => {
                    failures += 1;
                    // The agent may be restarting: say so once, then every 100th attempt.
                    if failures == 1 || failures.is_multiple_of(100) {
                        tracing::warn!("Cannot reach the agent (attempt {failures}): {e}");
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            let hello = self.hello();
            let reconnect = hello.reconnect;
            let (channel, welcome) =
                match GuestChannel::connect(conn, hello, defaults::HANDSHAKE_TIMEOUT).await {
                    Ok(x) => x,
                    Err(ChannelError::Rejected(reason)) => {
                        let _ = self.events.send(HostEvent::Rejected(reason));
                        return;
                    }
                    Err(e @ ChannelError::Version { .. }) => {
                        let _ = self.events.send(HostEvent::Rejected(e.to_string()));
                        return;
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!("Handshake with the agent failed: {e}");
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue;
                    }
                };
            backoff.reset();
            failures = 0;
            tracing::info!(reconnect, "connected to the agent");
            let _ = self.events.send(HostEvent::Connected { first });
            first = false;
            if reconnect {
                self.outbox.rewind(welcome.resume_after_log_seq);
                let state = self.handle.lock().state.clone();
                self.outbox.send_first(state);
            } else if let Some(spec) = welcome.spec {
                self.got_spec(spec);
            } else if let Some(root) = welcome.root
                && !self.handle.lock().have_spec
            {
                let _ = self.events.send(HostEvent::Root(root));
            }
            match self.session(channel).await {
                End::Finished => return,
                End::Broken(why) => {
                    tracing::warn!("Connection to the agent broke: {why}; reconnecting");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    fn got_spec(&self, spec: InstanceSpec) {
        {
            let mut s = self.handle.lock();
            if s.have_spec {
                tracing::warn!("Ignoring a second spec");
                return;
            }
            s.have_spec = true;
            if !spec.instance_id.is_empty() {
                s.instance_id = spec.instance_id.clone();
            }
        }
        let _ = self.events.send(HostEvent::Spec(Box::new(spec)));
    }

    fn dispatch(&self, msg: host_message::Msg) {
        use host_message::Msg;
        match msg {
            Msg::LogAck(a) => self.outbox.ack(a.seq),
            Msg::Ping(p) => self
                .outbox
                .send(guest_message::Msg::Pong(Pong { nonce: p.nonce })),
            Msg::Signal(s) => {
                let _ = self.events.send(HostEvent::Signal(s.signal));
            }
            Msg::Stop(s) => {
                let _ = self.events.send(HostEvent::Stop {
                    signal: s.signal,
                    grace: Duration::from_millis(s.grace_millis),
                });
            }
            Msg::Exec(e) => {
                let _ = self.events.send(HostEvent::Exec(e));
            }
            Msg::Assign(spec) => self.got_spec(spec),
            other @ (Msg::Welcome(_) | Msg::Reject(_)) => tracing::warn!(
                "Ignoring {} outside the handshake",
                hearth_proto::channel::host_kind(&other)
            ),
        }
    }

    async fn session(&self, channel: GuestChannel<Conn>) -> End {
        let (mut sink, mut stream) = channel.into_framed().split();
        // Reading never waits for writing: the agent's acknowledgements, Stop and Exec get
        // through even while a flood of output fills the socket.
        let reader = async {
            loop {
                match stream.next().await {
                    None => return End::Broken("the agent closed the connection".into()),
                    Some(Err(e)) => return End::Broken(format!("{e:#}")),
                    Some(Ok(HostMessage { msg: Some(m) })) => self.dispatch(m),
                    Some(Ok(_)) => {}
                }
            }
        };
        let writer = async {
            loop {
                let batch = self.outbox.take(256);
                if !batch.is_empty() {
                    for msg in batch {
                        sink.feed(msg).await.map_err(|e| e.to_string())?;
                    }
                    sink.flush().await.map_err(|e| e.to_string())?;
                    continue;
                }
                if self.handle.lock().finishing && self.outbox.drained() {
                    // Everything is written: half-close; the agent closing its side says it
                    // has read everything.
                    sink.close().await.map_err(|e| e.to_string())?;
                    return Ok::<(), String>(());
                }
                tokio::select! {
                    () = self.outbox.changed() => {}
                    () = self.handle.finish.notified() => {}
                }
            }
        };
        tokio::pin!(reader, writer);
        tokio::select! {
            end = &mut reader => end,
            written = &mut writer => match written {
                Err(e) => End::Broken(e),
                Ok(()) => match reader.await {
                    // After our half-close, the agent's close is the end we wait for.
                    End::Broken(_) | End::Finished => End::Finished,
                },
            },
        }
    }
}

/// Standalone mode: prints log records on the console (`stdout: …`, `stderr: …`) and
/// acknowledges them; drops everything else (the supervisor prints its own lines).
pub fn start_console(outbox: Arc<Outbox>) -> (LinkHandle, tokio::task::JoinHandle<()>) {
    let handle = LinkHandle {
        shared: Arc::default(),
        finish: Arc::new(Notify::new()),
    };
    let h = handle.clone();
    let task = tokio::spawn(async move {
        loop {
            let batch = outbox.take(256);
            let empty = batch.is_empty();
            for msg in batch {
                match msg.msg {
                    Some(guest_message::Msg::Log(r)) => {
                        let name = match LogStream::try_from(r.stream) {
                            Ok(LogStream::Stderr) => "stderr",
                            Ok(LogStream::Init) => "init",
                            _ => "stdout",
                        };
                        crate::console::line(&format!(
                            "{name}: {}",
                            String::from_utf8_lossy(&r.data)
                        ));
                        outbox.ack(r.seq);
                    }
                    Some(guest_message::Msg::LogsDropped(d)) => {
                        crate::console::line(&format!(
                            "hearth-init: {} log records dropped",
                            d.count
                        ));
                    }
                    _ => {}
                }
            }
            if !empty {
                continue;
            }
            if h.lock().finishing && outbox.drained() {
                return;
            }
            tokio::select! {
                () = outbox.changed() => {}
                () = h.finish.notified() => {}
            }
        }
    });
    (handle, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(50));
        let got: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, vec![10, 20, 40, 50, 50]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(10));
    }
}
