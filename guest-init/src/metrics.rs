//! The periodic `Metrics` frame: CPU, memory, OOM kills and processes from [`Cgroups`];
//! network bytes from `/proc/net/dev` of the instance's namespace; root filesystem usage of the
//! writable layer.

use std::{fs::File, os::fd::AsFd as _};

use hearth_proto::init::Metrics;

use crate::{cgroup::Cgroups, outbox::now_nanos};

/// Totals over every interface but loopback.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetTotals {
    /// Received bytes.
    pub rx_bytes: u64,
    /// Received packets.
    pub rx_packets: u64,
    /// Sent bytes.
    pub tx_bytes: u64,
    /// Sent packets.
    pub tx_packets: u64,
}

/// Parses `/proc/net/dev`.
pub fn parse_net_dev(text: &str) -> NetTotals {
    let mut t = NetTotals::default();
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() == "lo" {
            continue;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        if v.len() < 10 {
            continue;
        }
        t.rx_bytes += v[0];
        t.rx_packets += v[1];
        t.tx_bytes += v[8];
        t.tx_packets += v[9];
    }
    t
}

/// Gathers one sample. `scratch` is the writable layer's root (opened before the switch).
pub fn sample(cgroups: &Cgroups, scratch: Option<&File>) -> Metrics {
    let u = cgroups.usage();
    let net = std::fs::read_to_string("/proc/net/dev")
        .map(|t| parse_net_dev(&t))
        .unwrap_or_default();
    let (used, total) = scratch
        .and_then(|f| nix::sys::statvfs::fstatvfs(f.as_fd()).ok())
        .map(|s| {
            let frag = s.fragment_size();
            let total = s.blocks() * frag;
            (total.saturating_sub(s.blocks_free() * frag), total)
        })
        .unwrap_or((0, 0));
    Metrics {
        at_unix_nanos: now_nanos(),
        cpu_usage_micros: u.cpu_usage_micros,
        cpu_user_micros: u.cpu_user_micros,
        cpu_system_micros: u.cpu_system_micros,
        memory_used_bytes: u.memory_used_bytes,
        memory_cache_bytes: u.memory_cache_bytes,
        memory_limit_bytes: u.memory_limit_bytes,
        oom_kills: cgroups.oom_kills(),
        net_rx_bytes: net.rx_bytes,
        net_tx_bytes: net.tx_bytes,
        net_rx_packets: net.rx_packets,
        net_tx_packets: net.tx_packets,
        rootfs_used_bytes: used,
        rootfs_total_bytes: total,
        process_count: u.process_count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_skips_loopback() {
        let text = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0
  eth0:    5000      50    0    0    0     0          0         0     7000      70    0    0    0     0       0          0
  eth1:       1       1    0    0    0     0          0         0        2       2    0    0    0     0       0          0
";
        assert_eq!(
            parse_net_dev(text),
            NetTotals {
                rx_bytes: 5001,
                rx_packets: 51,
                tx_bytes: 7002,
                tx_packets: 72
            }
        );
    }
}
