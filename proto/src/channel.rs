//! Async channels over one agent <-> hearth-init connection: the handshake and typed
//! send/receive, for both ends.
//!
//! The agent accepts a connection (Unix socket, or hearth-vmm's hybrid-vsock socket) and wraps
//! it with [`HostChannel::accept`], which reads the `Hello`, checks the protocol version (and
//! answers `Reject` when it is unsupported), and returns the channel for the agent to answer with
//! [`HostChannel::welcome`] or [`HostChannel::reject`]. hearth-init dials and wraps the stream
//! with [`GuestChannel::connect`], which sends the `Hello` and waits for the answer.
//!
//! Both channels are `tokio_util` [`Framed`] streams underneath; [`HostChannel::split`] gives a
//! sender and a receiver that can live in different tasks.

use std::time::Duration;

use futures::{
    SinkExt as _, StreamExt as _,
    stream::{SplitSink, SplitStream},
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

use crate::{
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
    frame::{FrameCodec, FrameError},
    init::{
        Exec, GuestMessage, Hello, HostMessage, InstanceSpec, LogAck, Ping, Reject, Signal, Stop,
        Welcome, guest_message, host_message,
    },
};

/// Why a channel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// Framing or the transport failed.
    #[error("Frame exchange failed")]
    Frame(#[from] FrameError),
    /// The peer closed the connection.
    #[error("Peer closed the connection")]
    Closed,
    /// The peer sent nothing in time.
    #[error("Peer sent no {what} within {after:?}")]
    Timeout {
        /// The frame that was awaited.
        what: &'static str,
        /// How long we waited.
        after: Duration,
    },
    /// The peer sent a frame the protocol does not allow at this point.
    #[error("Expected {expected}, got {got}")]
    Unexpected {
        /// What the protocol requires here.
        expected: &'static str,
        /// What arrived (the message kind).
        got: String,
    },
    /// The peer speaks a protocol version this side does not support.
    #[error("Peer speaks protocol version {peer}; this side supports {min} to {max}")]
    Version {
        /// The peer's version.
        peer: u32,
        /// Oldest supported version.
        min: u32,
        /// Newest supported version.
        max: u32,
    },
    /// The agent rejected the connection.
    #[error("Agent rejected the connection: {0}")]
    Rejected(String),
}

/// The frames the agent reads from hearth-init.
pub type HostFramed<S> = Framed<S, FrameCodec<GuestMessage, HostMessage>>;
/// The frames hearth-init reads from the agent.
pub type GuestFramed<S> = Framed<S, FrameCodec<HostMessage, GuestMessage>>;

impl From<guest_message::Msg> for GuestMessage {
    fn from(msg: guest_message::Msg) -> Self {
        Self { msg: Some(msg) }
    }
}

impl From<host_message::Msg> for HostMessage {
    fn from(msg: host_message::Msg) -> Self {
        Self { msg: Some(msg) }
    }
}

/// A short name of a guest message kind, for errors and logs.
pub fn guest_kind(msg: &guest_message::Msg) -> &'static str {
    use guest_message::Msg;
    match msg {
        Msg::Hello(_) => "Hello",
        Msg::Started(_) => "Started",
        Msg::Ready(_) => "Ready",
        Msg::Log(_) => "LogRecord",
        Msg::LogsDropped(_) => "LogsDropped",
        Msg::Metrics(_) => "Metrics",
        Msg::Exited(_) => "Exited",
        Msg::InitError(_) => "InitError",
        Msg::ExecResult(_) => "ExecResult",
        Msg::Pong(_) => "Pong",
    }
}

/// A short name of a host message kind, for errors and logs.
pub fn host_kind(msg: &host_message::Msg) -> &'static str {
    use host_message::Msg;
    match msg {
        Msg::Welcome(_) => "Welcome",
        Msg::Reject(_) => "Reject",
        Msg::Signal(_) => "Signal",
        Msg::Stop(_) => "Stop",
        Msg::Exec(_) => "Exec",
        Msg::LogAck(_) => "LogAck",
        Msg::Ping(_) => "Ping",
        Msg::Assign(_) => "Assign",
    }
}

/// True when `peer` is a protocol version this build can speak.
pub fn version_supported(peer: u32) -> bool {
    (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&peer)
}

/// The agent's end of one connection from hearth-init, after the `Hello`.
#[derive(Debug)]
pub struct HostChannel<S> {
    framed: HostFramed<S>,
    hello: Hello,
}

impl<S: AsyncRead + AsyncWrite + Unpin> HostChannel<S> {
    /// Reads the `Hello` that must open every connection, within `timeout`.
    ///
    /// An unsupported protocol version is answered with `Reject` (so init can report why) and
    /// returned as [`ChannelError::Version`]; any other first frame is a protocol error.
    pub async fn accept(stream: S, timeout: Duration) -> Result<Self, ChannelError> {
        let mut framed: HostFramed<S> = Framed::new(stream, FrameCodec::new());
        let first = tokio::time::timeout(timeout, framed.next())
            .await
            .map_err(|_| ChannelError::Timeout {
                what: "Hello",
                after: timeout,
            })?;
        let hello = match first {
            None => return Err(ChannelError::Closed),
            Some(frame) => match frame?.msg {
                Some(guest_message::Msg::Hello(hello)) => hello,
                Some(other) => {
                    return Err(ChannelError::Unexpected {
                        expected: "Hello",
                        got: guest_kind(&other).to_owned(),
                    });
                }
                None => {
                    return Err(ChannelError::Unexpected {
                        expected: "Hello",
                        got: "an empty message".to_owned(),
                    });
                }
            },
        };
        if !version_supported(hello.protocol_version) {
            let err = ChannelError::Version {
                peer: hello.protocol_version,
                min: MIN_PROTOCOL_VERSION,
                max: PROTOCOL_VERSION,
            };
            // Best effort: the peer may already be gone.
            let _ = framed
                .send(HostMessage::from(host_message::Msg::Reject(Reject {
                    reason: err.to_string(),
                })))
                .await;
            return Err(err);
        }
        Ok(Self { framed, hello })
    }

    /// The `Hello` init opened the connection with.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Accepts the connection. `spec` is `None` on a reconnect (`hello().reconnect`) and for a
    /// warm-pool member that will get its spec with [`HostSender::assign`];
    /// `resume_after_log_seq` is the newest log seq the agent has stored (init resends newer
    /// records it still holds).
    pub async fn welcome(
        &mut self,
        spec: Option<InstanceSpec>,
        resume_after_log_seq: u64,
    ) -> Result<(), ChannelError> {
        let version = self.hello.protocol_version.min(PROTOCOL_VERSION);
        self.send(host_message::Msg::Welcome(Welcome {
            protocol_version: version,
            spec,
            resume_after_log_seq,
            root: None,
        }))
        .await
    }

    /// Refuses the connection and closes it.
    pub async fn reject(mut self, reason: impl Into<String>) -> Result<(), ChannelError> {
        self.send(host_message::Msg::Reject(Reject {
            reason: reason.into(),
        }))
        .await?;
        self.framed.close().await?;
        Ok(())
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: host_message::Msg) -> Result<(), ChannelError> {
        self.framed.send(HostMessage::from(msg)).await?;
        Ok(())
    }

    /// Receives the next message; `Ok(None)` when init closed the connection cleanly.
    pub async fn recv(&mut self) -> Result<Option<guest_message::Msg>, ChannelError> {
        recv_guest(&mut self.framed).await
    }

    /// Splits the channel into a sender and a receiver for separate tasks.
    pub fn split(self) -> (HostSender<S>, HostReceiver<S>) {
        let (sink, stream) = self.framed.split();
        (HostSender { sink }, HostReceiver { stream })
    }

    /// The underlying framed stream (for callers that need `Stream`/`Sink` directly).
    pub fn into_framed(self) -> HostFramed<S> {
        self.framed
    }
}

async fn recv_guest<St>(stream: &mut St) -> Result<Option<guest_message::Msg>, ChannelError>
where
    St: futures::Stream<Item = Result<GuestMessage, FrameError>> + Unpin,
{
    loop {
        match stream.next().await {
            None => return Ok(None),
            Some(frame) => {
                // A message with an unknown or absent oneof comes from a newer peer: skip it.
                if let Some(msg) = frame?.msg {
                    return Ok(Some(msg));
                }
            }
        }
    }
}

/// The sending half of a [`HostChannel`].
#[derive(Debug)]
pub struct HostSender<S> {
    sink: SplitSink<HostFramed<S>, HostMessage>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> HostSender<S> {
    /// Sends one message.
    pub async fn send(&mut self, msg: host_message::Msg) -> Result<(), ChannelError> {
        self.sink.send(HostMessage::from(msg)).await?;
        Ok(())
    }

    /// Delivers `signal` to the workload's process group.
    pub async fn signal(&mut self, signal: i32) -> Result<(), ChannelError> {
        self.send(host_message::Msg::Signal(Signal { signal }))
            .await
    }

    /// Asks init to stop the workload: `signal` (SIGTERM when 0), then SIGKILL after `grace`.
    pub async fn stop(&mut self, signal: i32, grace: Duration) -> Result<(), ChannelError> {
        self.send(host_message::Msg::Stop(Stop {
            signal,
            grace_millis: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
        }))
        .await
    }

    /// Runs a one-off command in the instance; the answer is an `ExecResult` with the same
    /// `request_id`.
    pub async fn exec(&mut self, exec: Exec) -> Result<(), ChannelError> {
        self.send(host_message::Msg::Exec(exec)).await
    }

    /// Acknowledges log records up to and including `seq` (init may drop them).
    pub async fn ack_logs(&mut self, seq: u64) -> Result<(), ChannelError> {
        self.send(host_message::Msg::LogAck(LogAck { seq })).await
    }

    /// Hands its spec to a warm-pool member that was welcomed without one.
    pub async fn assign(&mut self, spec: InstanceSpec) -> Result<(), ChannelError> {
        self.send(host_message::Msg::Assign(spec)).await
    }

    /// Sends a `Ping`; init answers `Pong` with the same nonce.
    pub async fn ping(&mut self, nonce: u64) -> Result<(), ChannelError> {
        self.send(host_message::Msg::Ping(Ping { nonce })).await
    }

    /// Flushes and closes the write side (init sees end of stream).
    pub async fn close(&mut self) -> Result<(), ChannelError> {
        self.sink.close().await?;
        Ok(())
    }
}

/// The receiving half of a [`HostChannel`].
#[derive(Debug)]
pub struct HostReceiver<S> {
    stream: SplitStream<HostFramed<S>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> HostReceiver<S> {
    /// Receives the next message; `Ok(None)` when init closed the connection cleanly.
    pub async fn recv(&mut self) -> Result<Option<guest_message::Msg>, ChannelError> {
        recv_guest(&mut self.stream).await
    }
}

/// hearth-init's end of one connection to the agent, after the agent's `Welcome`.
#[derive(Debug)]
pub struct GuestChannel<S> {
    framed: GuestFramed<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> GuestChannel<S> {
    /// Sends `hello` and waits up to `timeout` for the agent's answer.
    ///
    /// Returns the channel and the `Welcome`; a `Reject` is [`ChannelError::Rejected`].
    pub async fn connect(
        stream: S,
        hello: Hello,
        timeout: Duration,
    ) -> Result<(Self, Welcome), ChannelError> {
        let mut framed: GuestFramed<S> = Framed::new(stream, FrameCodec::new());
        framed
            .send(GuestMessage::from(guest_message::Msg::Hello(hello)))
            .await?;
        let answer = tokio::time::timeout(timeout, framed.next())
            .await
            .map_err(|_| ChannelError::Timeout {
                what: "Welcome",
                after: timeout,
            })?;
        match answer {
            None => Err(ChannelError::Closed),
            Some(frame) => match frame?.msg {
                Some(host_message::Msg::Welcome(welcome)) => {
                    if !version_supported(welcome.protocol_version) {
                        return Err(ChannelError::Version {
                            peer: welcome.protocol_version,
                            min: MIN_PROTOCOL_VERSION,
                            max: PROTOCOL_VERSION,
                        });
                    }
                    Ok((Self { framed }, welcome))
                }
                Some(host_message::Msg::Reject(reject)) => {
                    Err(ChannelError::Rejected(reject.reason))
                }
                Some(other) => Err(ChannelError::Unexpected {
                    expected: "Welcome or Reject",
                    got: host_kind(&other).to_owned(),
                }),
                None => Err(ChannelError::Unexpected {
                    expected: "Welcome or Reject",
                    got: "an empty message".to_owned(),
                }),
            },
        }
    }

    /// The underlying framed stream.
    pub fn into_framed(self) -> GuestFramed<S> {
        self.framed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{LogRecord, Started};

    fn hello(version: u32) -> Hello {
        Hello {
            protocol_version: version,
            init_version: "test".into(),
            instance_id: "web-1".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn handshake_and_messages_both_ways() {
        let (host_io, guest_io) = tokio::io::duplex(4096);
        let host = tokio::spawn(async move {
            let mut ch = HostChannel::accept(host_io, Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(ch.hello().instance_id, "web-1");
            ch.welcome(
                Some(InstanceSpec {
                    instance_id: "web-1".into(),
                    ..Default::default()
                }),
                0,
            )
            .await
            .unwrap();
            let (mut tx, mut rx) = ch.split();
            let got = rx.recv().await.unwrap().unwrap();
            assert!(matches!(
                got,
                guest_message::Msg::Started(Started { pid: 7, .. })
            ));
            tx.ack_logs(3).await.unwrap();
            assert!(matches!(
                rx.recv().await.unwrap(),
                Some(guest_message::Msg::Log(LogRecord { seq: 1, .. }))
            ));
            assert!(rx.recv().await.unwrap().is_none());
        });
        let (guest, welcome) =
            GuestChannel::connect(guest_io, hello(PROTOCOL_VERSION), Duration::from_secs(5))
                .await
                .unwrap();
        assert_eq!(welcome.spec.unwrap().instance_id, "web-1");
        let mut framed = guest.into_framed();
        framed
            .send(GuestMessage::from(guest_message::Msg::Started(Started {
                pid: 7,
                ..Default::default()
            })))
            .await
            .unwrap();
        let ack = framed.next().await.unwrap().unwrap();
        assert!(matches!(
            ack.msg,
            Some(host_message::Msg::LogAck(LogAck { seq: 3 }))
        ));
        framed
            .send(GuestMessage::from(guest_message::Msg::Log(LogRecord {
                seq: 1,
                ..Default::default()
            })))
            .await
            .unwrap();
        drop(framed);
        host.await.unwrap();
    }

    #[tokio::test]
    async fn unsupported_version_is_rejected_with_a_reason() {
        let (host_io, guest_io) = tokio::io::duplex(4096);
        let host = tokio::spawn(HostChannel::accept(host_io, Duration::from_secs(5)));
        let err = GuestChannel::connect(
            guest_io,
            hello(PROTOCOL_VERSION + 100),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        match err {
            ChannelError::Rejected(reason) => assert!(reason.contains("protocol version")),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            host.await.unwrap(),
            Err(ChannelError::Version { .. })
        ));
    }

    #[tokio::test]
    async fn first_frame_must_be_hello() {
        let (host_io, guest_io) = tokio::io::duplex(4096);
        let mut framed: GuestFramed<_> = Framed::new(guest_io, FrameCodec::new());
        framed
            .send(GuestMessage::from(guest_message::Msg::Started(
                Started::default(),
            )))
            .await
            .unwrap();
        let err = HostChannel::accept(host_io, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ChannelError::Unexpected { ref got, .. } if got == "Started"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn silent_peer_times_out() {
        let (host_io, _guest_io) = tokio::io::duplex(4096);
        let err = HostChannel::accept(host_io, Duration::from_secs(3))
            .await
            .unwrap_err();
        assert!(matches!(err, ChannelError::Timeout { what: "Hello", .. }));
    }

    #[tokio::test]
    async fn reject_reaches_init() {
        let (host_io, guest_io) = tokio::io::duplex(4096);
        let host = tokio::spawn(async move {
            let ch = HostChannel::accept(host_io, Duration::from_secs(5))
                .await
                .unwrap();
            ch.reject("no such instance").await.unwrap();
        });
        let err = GuestChannel::connect(guest_io, hello(PROTOCOL_VERSION), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, ChannelError::Rejected(r) if r == "no such instance"));
        host.await.unwrap();
    }
}
