//! The host side of vsock: Unix-socket connections multiplexed onto guest stream sockets, with
//! virtio-vsock credit flow control in both directions.

use std::{
    collections::{HashMap, VecDeque},
    io::{Read, Write},
    os::{
        fd::{AsRawFd, RawFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::PathBuf,
    sync::Arc,
};

use super::{
    metrics::VsockMetrics,
    packet::{HOST_CID, Header, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, TxPacket, op},
};
use crate::metrics::{add, inc};

/// Receive buffer each connection advertises to the guest.
pub const CONN_BUF_ALLOC: u32 = 256 << 10;
/// Send a credit update once the guest's view of our free space is this stale.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;
/// First local port for host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Most connections at once.
const MAX_CONNS: usize = 1024;
/// Largest read from a host socket at a time.
const READ_CHUNK: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated, waiting for the `CONNECT <port>` line.
    AwaitingConnect,
    /// Host-initiated, REQUEST sent to the guest, waiting for its RESPONSE.
    Connecting,
    /// Data flows.
    Established,
    /// The host closed its side; SHUTDOWN sent, waiting for the guest's RST.
    HostClosed,
}

struct Conn {
    stream: UnixStream,
    state: State,
    local_port: u32,
    peer_port: u32,
    line: Vec<u8>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest.
    rx_cnt: u32,
    /// Payload bytes from the guest written to the stream.
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Bytes for the stream that did not fit yet.
    tx_buf: Vec<u8>,
    /// Bytes read from the stream, not yet delivered.
    rx_pending: VecDeque<u8>,
    readable: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            state,
            local_port,
            peer_port,
            line: Vec::new(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            tx_buf: Vec::new(),
            rx_pending: VecDeque::new(),
            readable: true,
        }
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        while !self.tx_buf.is_empty() {
            match self.stream.write(&self.tx_buf) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// All host-side connections of one vsock device.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: Option<UnixListener>,
    conns: HashMap<u32, Conn>,
    by_ports: HashMap<(u32, u32), u32>,
    ctrl: VecDeque<Header>,
    next_token: u32,
    next_port: u32,
    closed: Vec<UnixStream>,
    metrics: Arc<VsockMetrics>,
}

/// A socket the event loop must start watching.
pub type Watch = (RawFd, u32);

impl Muxer {
    /// A muxer for guest `guest_cid` whose host side lives at `uds_path`.
    pub fn new(guest_cid: u64, uds_path: PathBuf, metrics: Arc<VsockMetrics>) -> Self {
        Self {
            guest_cid,
            uds_path,
            listener: None,
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            ctrl: VecDeque::new(),
            next_token: 0,
            next_port: FIRST_LOCAL_PORT,
            closed: Vec::new(),
            metrics,
        }
    }

    /// Sets the listening socket (bound by the builder).
    pub fn set_listener(&mut self, l: UnixListener) {
        self.listener = Some(l);
    }

    /// The listener's fd.
    pub fn listener_fd(&self) -> Option<RawFd> {
        self.listener.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Streams to stop watching and close (take them, deregister, then drop them).
    pub fn take_closed(&mut self) -> Vec<UnixStream> {
        std::mem::take(&mut self.closed)
    }

    fn header(&self, c: &Conn, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: c.local_port,
            dst_port: c.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: c.fwd_cnt,
        }
    }

    fn add_conn(&mut self, c: Conn) -> Watch {
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(1);
        let fd = c.stream.as_raw_fd();
        if c.state != State::AwaitingConnect {
            self.by_ports.insert((c.local_port, c.peer_port), token);
        }
        self.conns.insert(token, c);
        (fd, token)
    }

    fn remove(&mut self, token: u32) {
        if let Some(c) = self.conns.remove(&token) {
            self.by_ports.remove(&(c.local_port, c.peer_port));
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
            self.closed.push(c.stream);
        }
    }

    fn rst(&mut self, token: u32) {
        if let Some(c) = self.conns.get(&token) {
            let h = self.header(c, op::RST);
            self.ctrl.push_back(h);
            inc(&self.metrics.rst_sent);
        }
        self.remove(token);
    }

    /// Accepts pending host connections.
    pub fn accept(&mut self) -> Vec<Watch> {
        let mut out = Vec::new();
        let Some(listener) = &self.listener else {
            return out;
        };
        let mut accepted = Vec::new();
        while let Ok((s, _)) = listener.accept() {
            accepted.push(s);
        }
        for s in accepted {
            if self.conns.len() >= MAX_CONNS || s.set_nonblocking(true).is_err() {
                continue;
            }
            out.push(self.add_conn(Conn::new(s, State::AwaitingConnect, 0, 0)));
        }
        out
    }

    /// A host stream became readable or writable.
    pub fn conn_event(&mut self, token: u32, readable: bool, writable: bool) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if writable && c.flush().is_err() {
            self.rst(token);
            return;
        }
        if !readable {
            return;
        }
        c.readable = true;
        if c.state != State::AwaitingConnect {
            return;
        }
        // Read the CONNECT line one byte at a time so no payload after it is consumed.
        let mut byte = [0u8; 1];
        loop {
            match c.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) if c.line.len() < MAX_CONNECT_LINE => c.line.push(byte[0]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                _ => {
                    self.remove(token);
                    return;
                }
            }
        }
        let line = String::from_utf8_lossy(&c.line).into_owned();
        let port = line
            .strip_prefix("CONNECT ")
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(peer_port) = port else {
            let _ = c.stream.write_all(b"ERR expected CONNECT <port>\n");
            self.remove(token);
            return;
        };
        let local_port = self.alloc_port();
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        c.state = State::Connecting;
        c.local_port = local_port;
        c.peer_port = peer_port;
        c.readable = true;
        self.by_ports.insert((local_port, peer_port), token);
        inc(&self.metrics.host_connects);
        let h = self.header(&self.conns[&token], op::REQUEST);
        self.ctrl.push_back(h);
    }

    fn alloc_port(&mut self) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.by_ports.keys().any(|(l, _)| *l == p) {
                return p;
            }
        }
    }

    fn rst_for(&mut self, h: &Header) {
        self.ctrl.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Default::default()
        });
        inc(&self.metrics.rst_sent);
    }

    /// Handles one packet from the guest; returns a new host stream to watch, if any.
    pub fn handle_tx(&mut self, pkt: TxPacket) -> Option<Watch> {
        let h = pkt.hdr;
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID || h.type_ != TYPE_STREAM {
            inc(&self.metrics.bad_packets);
            if h.op != op::RST {
                self.rst_for(&h);
            }
            return None;
        }
        let key = (h.dst_port, h.src_port);
        let token = self.by_ports.get(&key).copied();
        if let Some(t) = token
            && let Some(c) = self.conns.get_mut(&t)
        {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match (h.op, token) {
            (op::REQUEST, None) => return self.guest_connect(&h),
            (op::REQUEST, Some(t)) => self.rst(t),
            (op::RESPONSE, Some(t)) => {
                let c = self.conns.get_mut(&t)?;
                if c.state != State::Connecting {
                    self.rst(t);
                    return None;
                }
                c.state = State::Established;
                c.tx_buf
                    .extend_from_slice(format!("OK {}\n", c.local_port).as_bytes());
                if c.flush().is_err() {
                    self.rst(t);
                }
            }
            (op::RW, Some(t)) => {
                let c = self.conns.get_mut(&t)?;
                if c.state != State::Established && c.state != State::HostClosed {
                    self.rst(t);
                    return None;
                }
                // A guest ignoring our credit must not make us buffer without bound.
                if c.tx_buf.len() + pkt.payload.len() > CONN_BUF_ALLOC as usize * 2 {
                    self.rst(t);
                    return None;
                }
                c.tx_buf.extend_from_slice(&pkt.payload);
                let before = c.tx_buf.len();
                if c.flush().is_err() {
                    self.rst(t);
                    return None;
                }
                // Everything accepted from the guest counts as forwarded once buffered: the
                // buffer is bounded above, and the stream drains it.
                let _ = before;
                c.fwd_cnt = c.fwd_cnt.wrapping_add(pkt.payload.len() as u32);
                add(&self.metrics.tx_bytes, pkt.payload.len() as u64);
                if c.fwd_cnt.wrapping_sub(c.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
                    c.last_fwd_cnt_sent = c.fwd_cnt;
                    let h = self.header(&self.conns[&t], op::CREDIT_UPDATE);
                    self.ctrl.push_back(h);
                }
            }
            (op::SHUTDOWN, Some(t)) => {
                let both = SHUTDOWN_RCV | SHUTDOWN_SEND;
                if h.flags & both == both {
                    self.rst(t);
                } else if h.flags & SHUTDOWN_SEND != 0 {
                    let c = self.conns.get_mut(&t)?;
                    let _ = c.flush();
                    let _ = c.stream.shutdown(std::net::Shutdown::Write);
                }
            }
            (op::RST, Some(t)) => self.remove(t),
            (op::CREDIT_REQUEST, Some(t)) => {
                let c = self.conns.get_mut(&t)?;
                c.last_fwd_cnt_sent = c.fwd_cnt;
                let h = self.header(&self.conns[&t], op::CREDIT_UPDATE);
                self.ctrl.push_back(h);
            }
            (op::CREDIT_UPDATE, Some(_)) => {}
            (op::RST, None) => {}
            _ => {
                inc(&self.metrics.bad_packets);
                self.rst_for(&h);
            }
        }
        None
    }

    fn guest_connect(&mut self, h: &Header) -> Option<Watch> {
        let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), h.dst_port));
        let stream = match UnixStream::connect(&path) {
            Ok(s) if self.conns.len() < MAX_CONNS && s.set_nonblocking(true).is_ok() => s,
            _ => {
                inc(&self.metrics.guest_connects_refused);
                self.rst_for(h);
                return None;
            }
        };
        inc(&self.metrics.guest_connects);
        let mut c = Conn::new(stream, State::Established, h.dst_port, h.src_port);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        let resp = self.header(&c, op::RESPONSE);
        self.ctrl.push_back(resp);
        Some(self.add_conn(c))
    }

    /// True when a packet for the guest may be ready.
    pub fn has_rx(&self) -> bool {
        !self.ctrl.is_empty()
            || self.conns.values().any(|c| {
                c.state == State::Established
                    && c.credit() > 0
                    && (c.readable || !c.rx_pending.is_empty())
            })
    }

    /// The next packet for the guest, with at most `cap` payload bytes.
    pub fn next_rx(&mut self, cap: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(h) = self.ctrl.pop_front() {
            return Some((h, Vec::new()));
        }
        let tokens: Vec<u32> = self.conns.keys().copied().collect();
        for t in tokens {
            let Some(c) = self.conns.get_mut(&t) else {
                continue;
            };
            if c.state != State::Established {
                continue;
            }
            let credit = c.credit() as usize;
            if credit == 0 {
                continue;
            }
            if c.rx_pending.is_empty() && c.readable {
                let mut buf = vec![0u8; credit.min(READ_CHUNK)];
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        c.state = State::HostClosed;
                        let mut h = self.header(&self.conns[&t], op::SHUTDOWN);
                        h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                        return Some((h, Vec::new()));
                    }
                    Ok(n) => c.rx_pending.extend(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => c.readable = false,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        self.rst(t);
                        return self.ctrl.pop_front().map(|h| (h, Vec::new()));
                    }
                }
            }
            let n = c.rx_pending.len().min(cap).min(credit);
            if n == 0 {
                continue;
            }
            let data: Vec<u8> = c.rx_pending.drain(..n).collect();
            c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
            add(&self.metrics.rx_bytes, n as u64);
            let mut h = self.header(&self.conns[&t], op::RW);
            h.len = n as u32;
            if let Some(c) = self.conns.get_mut(&t) {
                c.last_fwd_cnt_sent = c.fwd_cnt;
            }
            return Some((h, data));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: u64 = 3;

    fn pkt(op: u16, src_port: u32, dst_port: u32, payload: &[u8]) -> TxPacket {
        TxPacket {
            hdr: Header {
                src_cid: GUEST,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len: payload.len() as u32,
                type_: TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc: 4096,
                fwd_cnt: 0,
            },
            payload: payload.to_vec(),
        }
    }

    fn muxer(dir: &std::path::Path) -> Muxer {
        let mut m = Muxer::new(GUEST, dir.join("v.sock"), Arc::default());
        m.set_listener(UnixListener::bind(dir.join("v.sock")).unwrap());
        m.listener.as_ref().unwrap().set_nonblocking(true).unwrap();
        m
    }

    #[test]
    fn guest_connects_to_a_host_listener_and_exchanges_data() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = muxer(dir.path());
        let host = UnixListener::bind(dir.path().join("v.sock_1024")).unwrap();
        let (_, token) = m.handle_tx(pkt(op::REQUEST, 5000, 1024, b"")).unwrap();
        let (resp, _) = m.next_rx(4096).unwrap();
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port),
            (op::RESPONSE, 1024, 5000)
        );
        let (mut s, _) = host.accept().unwrap();
        m.handle_tx(pkt(op::RW, 5000, 1024, b"ping"));
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        s.write_all(b"pong").unwrap();
        m.conn_event(token, true, false);
        let (h, data) = m.next_rx(4096).unwrap();
        assert_eq!((h.op, data.as_slice()), (op::RW, &b"pong"[..]));
        // Host closes: the guest gets a SHUTDOWN, then its RST removes the connection.
        drop(s);
        m.conn_event(token, true, false);
        let (h, _) = m.next_rx(4096).unwrap();
        assert_eq!(h.op, op::SHUTDOWN);
        m.handle_tx(pkt(op::RST, 5000, 1024, b""));
        assert_eq!(m.take_closed().len(), 1);
        assert!(m.next_rx(4096).is_none());
    }

    #[test]
    fn refused_guest_connect_and_unknown_packets_get_rst() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = muxer(dir.path());
        assert!(m.handle_tx(pkt(op::REQUEST, 5000, 9999, b"")).is_none());
        assert_eq!(m.next_rx(4096).unwrap().0.op, op::RST);
        m.handle_tx(pkt(op::RW, 1, 2, b"x"));
        assert_eq!(m.next_rx(4096).unwrap().0.op, op::RST);
        let mut bad = pkt(op::REQUEST, 1, 2, b"");
        bad.hdr.src_cid = 99;
        m.handle_tx(bad);
        assert_eq!(m.next_rx(4096).unwrap().0.op, op::RST);
    }

    #[test]
    fn host_connect_line_and_credit() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = muxer(dir.path());
        let mut host = UnixStream::connect(dir.path().join("v.sock")).unwrap();
        let watches = m.accept();
        assert_eq!(watches.len(), 1);
        let token = watches[0].1;
        host.write_all(b"CONNECT 52\nearly").unwrap();
        m.conn_event(token, true, false);
        let (req, _) = m.next_rx(4096).unwrap();
        assert_eq!((req.op, req.dst_port), (op::REQUEST, 52));
        // No data before the guest accepts.
        assert!(m.next_rx(4096).is_none());
        let mut resp = pkt(op::RESPONSE, 52, req.src_port, b"");
        resp.hdr.buf_alloc = 3;
        m.handle_tx(resp);
        let mut line = [0u8; 14];
        host.read_exact(&mut line).unwrap();
        assert_eq!(&line, format!("OK {}\n", req.src_port).as_bytes());
        // The guest advertised 3 bytes of buffer: "early" arrives in pieces as credit allows.
        let (h, d) = m.next_rx(4096).unwrap();
        assert_eq!((h.op, d.as_slice()), (op::RW, &b"ear"[..]));
        assert!(m.next_rx(4096).is_none());
        let mut upd = pkt(op::CREDIT_UPDATE, 52, req.src_port, b"");
        upd.hdr.buf_alloc = 3;
        upd.hdr.fwd_cnt = 3;
        m.handle_tx(upd);
        let (_, d) = m.next_rx(1).unwrap();
        assert_eq!(d, b"l");
    }
}
