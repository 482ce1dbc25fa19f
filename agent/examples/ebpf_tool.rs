//! `ebpf_tool`: attach, inspect and remove Hearth's eBPF filter from the command line. The
//! eBPF benchmark (`cargo xtask bench ebpf`) drives it; it is also handy for trying a policy
//! by hand. Pins live under `<bpffs>/hearth/<instance>`; `<bpffs>` is mounted if needed.
//!
//! ```text
//! ebpf_tool attach --bpffs /sys/fs/bpf --instance demo --netns NS --ifname veth0 \
//!     --mac 02:00:00:00:00:02 --ipv4 10.0.0.2 --allow "10.0.0.1 tcp 5201" --gateway 10.0.0.1
//! ebpf_tool counters --bpffs /sys/fs/bpf --instance demo
//! ebpf_tool remove --bpffs /sys/fs/bpf --instance demo
//! ```

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use hearth_agent::ebpf::{Filter, LoadOptions, NodeAddr, PinRoot, Policy, Rule};

#[derive(Parser)]
#[command(about = "Attach, inspect and remove Hearth's eBPF filter")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

// Parsed once per run; the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Load the programs, attach them to an interface and pin everything; then exit.
    Attach {
        #[command(flatten)]
        at: Where,
        /// Network namespace (`ip netns` name) of the interface.
        #[arg(long)]
        netns: Option<String>,
        /// The instance's host-side interface.
        #[arg(long)]
        ifname: String,
        /// The instance's MAC address.
        #[arg(long, value_parser = parse_mac)]
        mac: [u8; 6],
        /// The instance's IPv4 address.
        #[arg(long)]
        ipv4: Option<Ipv4Addr>,
        /// The instance's IPv6 addresses.
        #[arg(long)]
        ipv6: Vec<Ipv6Addr>,
        /// Allowed destinations: `CIDR [tcp|udp|icmp|any [PORT|FIRST-LAST]]`.
        #[arg(long)]
        allow: Vec<Rule>,
        /// Denied destinations, same form.
        #[arg(long)]
        deny: Vec<Rule>,
        /// Allow the internet.
        #[arg(long)]
        internet: bool,
        /// The node's gateway (one per family); ping to it is allowed.
        #[arg(long)]
        gateway: Vec<IpAddr>,
        /// The node's DNS resolver (one per family).
        #[arg(long)]
        dns: Vec<IpAddr>,
        /// The ingress proxy's address (one per family).
        #[arg(long)]
        proxy: Vec<IpAddr>,
        /// The instance's HTTP ports.
        #[arg(long)]
        http_port: Vec<u16>,
    },
    /// Print the counters that are not zero.
    Counters {
        #[command(flatten)]
        at: Where,
    },
    /// Detach and unpin.
    Remove {
        #[command(flatten)]
        at: Where,
    },
    /// Measure the programs' own cost per packet with BPF_PROG_TEST_RUN (nothing attached);
    /// prints one JSON object with nanoseconds per packet.
    Cost {
        /// Runs per measurement.
        #[arg(long, default_value_t = 1_000_000)]
        repeat: u32,
    },
}

#[derive(clap::Args)]
struct Where {
    /// A bpffs mount point (mounted if it is not one).
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// The instance name (the pin directory).
    #[arg(long)]
    instance: String,
}

impl Where {
    fn root(&self) -> anyhow::Result<PinRoot> {
        Ok(PinRoot::mounting(&self.bpffs, self.bpffs.join("hearth"))?)
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad MAC {s:?}: {e}"))?;
    bytes
        .try_into()
        .map_err(|_| format!("bad MAC {s:?}: need 6 bytes"))
}

fn node(addrs: &[IpAddr]) -> NodeAddr {
    let mut n = NodeAddr::default();
    for a in addrs {
        match a {
            IpAddr::V4(a) => n.v4 = Some(*a),
            IpAddr::V6(a) => n.v6 = Some(*a),
        }
    }
    n
}

fn enter_netns(name: &str) -> anyhow::Result<()> {
    let path = Path::new("/run/netns").join(name);
    let file =
        std::fs::File::open(&path).with_context(|| format!("Cannot open {}", path.display()))?;
    // SAFETY: setns with a valid namespace fd; this program is single-threaded here.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "setns into {name} failed: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Attach {
            at,
            netns,
            ifname,
            mac,
            ipv4,
            ipv6,
            allow,
            deny,
            internet,
            gateway,
            dns,
            proxy,
            http_port,
        } => {
            let root = at.root()?;
            if let Some(ns) = netns {
                enter_netns(&ns)?;
            }
            let mut policy = Policy::new(mac);
            policy.instance_ipv4 = ipv4;
            policy.instance_ipv6 = ipv6;
            policy.allow = allow;
            policy.deny = deny;
            policy.internet = internet;
            policy.gateway = node(&gateway);
            policy.allow_gateway_ping = !gateway.is_empty();
            policy.dns = node(&dns);
            policy.ingress_proxy = node(&proxy);
            policy.http_ports = http_port;
            let filter = Filter::load_and_attach(
                &root,
                &at.instance,
                &ifname,
                &policy,
                &LoadOptions::default(),
            )
            .context("Attaching failed")?;
            let a = filter.attachment().expect("attached");
            println!(
                "attached {} to {} (links {} and {})",
                a.instance, a.ifname, a.egress_link_id, a.ingress_link_id
            );
        }
        Cmd::Counters { at } => {
            let filter = Filter::adopt(&at.root()?, &at.instance)?;
            for (direction, verdict, c) in filter.counters()?.nonzero() {
                println!(
                    "{:8} {:5} {:17} {:>12} packets {:>15} bytes",
                    direction.name(),
                    if verdict.is_pass() { "pass" } else { "drop" },
                    verdict.name(),
                    c.packets,
                    c.bytes
                );
            }
        }
        Cmd::Cost { repeat } => cost(repeat)?,
        Cmd::Remove { at } => {
            if !at.root()?.remove(&at.instance)? {
                bail!("Nothing is pinned for {}", at.instance);
            }
        }
    }
    Ok(())
}

/// An Ethernet + IPv4 + TCP (or UDP) frame of `len` bytes.
fn frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    ports: (u16, u16),
    len: usize,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (len - 14) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&ip_len.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&ports.0.to_be_bytes());
    f.extend_from_slice(&ports.1.to_be_bytes());
    if proto == 6 {
        f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        f.extend_from_slice(&((len - 34) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
    }
    f.resize(len, 0x5a);
    f
}

fn cost(repeat: u32) -> anyhow::Result<()> {
    use hearth_agent::ebpf::Direction::{Egress, Ingress};
    let (inst_mac, host_mac) = ([0x02, 0x48, 0x54, 0, 0, 2], [0x02, 0x48, 0x54, 0, 0, 1]);
    let (inst, server) = (Ipv4Addr::new(10, 99, 0, 2), Ipv4Addr::new(10, 99, 0, 1));
    let mut policy = Policy::new(inst_mac);
    policy.instance_ipv4 = Some(inst);
    policy.gateway = NodeAddr::v4(server);
    policy.allow = vec![
        format!("{server} tcp 5201").parse()?,
        "198.51.100.0/24 tcp 443".parse()?,
    ];
    policy.deny = vec!["192.0.2.0/24".parse()?];
    let filter = Filter::load(&policy, &LoadOptions::default())?;
    let data = frame(inst_mac, host_mac, inst, server, 6, (40000, 5201), 1514);
    let ack = frame(host_mac, inst_mac, server, inst, 6, (5201, 40000), 66);
    let denied = frame(
        inst_mac,
        host_mac,
        inst,
        Ipv4Addr::new(192, 0, 2, 1),
        17,
        (40000, 53),
        128,
    );
    // The first packet opens the flow; the timed ones hit it, as a connection's packets do.
    filter.classify(Egress, &data)?;
    let egress_flow = filter.time_run(Egress, &data, repeat)?;
    let ingress_reply = filter.time_run(Ingress, &ack, repeat)?;
    // A denied packet never opens a flow: every run walks the whole policy.
    let egress_policy = filter.time_run(Egress, &denied, repeat)?;
    println!(
        r#"{{"egress_flow_ns":{},"ingress_reply_ns":{},"egress_policy_ns":{},"repeat":{repeat}}}"#,
        egress_flow.as_nanos(),
        ingress_reply.as_nanos(),
        egress_policy.as_nanos(),
    );
    Ok(())
}
