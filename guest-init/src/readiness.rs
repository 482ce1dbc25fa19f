//! Readiness: every readiness port accepts a TCP connection.
//!
//! This is on the cold-start path, so there is no fixed sleep: ports are tried at once, then
//! after 1 ms, doubling to 100 ms between rounds, until the timeout.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use tokio::{net::TcpStream, time::Instant};

use crate::spec::defaults;

/// Delays between polling rounds: `first`, doubling up to `max`.
#[derive(Debug, Clone)]
pub struct Schedule {
    next: Duration,
    max: Duration,
}

impl Schedule {
    /// The default schedule (1 ms doubling to 100 ms).
    pub fn new() -> Self {
        Self {
            next: defaults::READINESS_FIRST_POLL,
            max: defaults::READINESS_MAX_POLL,
        }
    }
}

impl Default for Schedule {
    fn default() -> Self {
        Self::new()
    }
}

impl Iterator for Schedule {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(d)
    }
}

async fn accepts(addr: SocketAddr) -> bool {
    // A local connect either succeeds or is refused at once; the timeout only guards against
    // an address that drops packets.
    matches!(
        tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// Waits until every port in `ports` accepts a connection on loopback (or on `address`, the
/// instance's own address, for a workload that binds only that). Returns the time it took, or
/// the first port still closed at the timeout.
pub async fn wait(
    ports: &[u16],
    address: Option<IpAddr>,
    timeout: Duration,
) -> Result<Duration, u16> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut pending: Vec<u16> = ports.to_vec();
    let mut schedule = Schedule::new();
    loop {
        let mut still = Vec::with_capacity(pending.len());
        for port in pending {
            let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
            let open = accepts(local).await
                || match address {
                    Some(a) => accepts(SocketAddr::new(a, port)).await,
                    None => false,
                };
            if !open {
                still.push(port);
            }
        }
        pending = still;
        let Some(&first) = pending.first() else {
            return Ok(start.elapsed());
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(first);
        }
        let pause = schedule.next().unwrap_or(defaults::READINESS_MAX_POLL);
        tokio::time::sleep_until((now + pause).min(deadline)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_starts_at_one_millisecond() {
        let ms: Vec<u128> = Schedule::new().take(9).map(|d| d.as_millis()).collect();
        assert_eq!(ms, vec![1, 2, 4, 8, 16, 32, 64, 100, 100]);
    }

    #[tokio::test]
    async fn no_ports_is_ready_at_once() {
        assert!(wait(&[], None, Duration::from_millis(1)).await.is_ok());
    }

    #[tokio::test]
    async fn a_port_that_opens_later_is_seen() {
        // Reserve a port, release it, and listen on it again a little later.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let opener = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .unwrap();
            // Keep it open while the poller connects.
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(l);
        });
        let took = wait(&[port], None, Duration::from_secs(10)).await.unwrap();
        assert!(took >= Duration::from_millis(25), "{took:?}");
        opener.abort();
    }

    #[tokio::test]
    async fn a_closed_port_times_out_and_is_named() {
        let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open_port = open.local_addr().unwrap().port();
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = wait(&[open_port, closed], None, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(err, closed);
    }
}
