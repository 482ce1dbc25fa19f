//! Egress NAT as nftables scripts (fed to `nft -f -`, one atomic transaction each).
//!
//! The agent owns one table, `ip <nat_table>`:
//!
//! ```text
//! table ip hearth {
//!     set internet { type ipv4_addr; }      # instances whose policy allows the internet
//!     chain postrouting {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         ip saddr @internet oifname != "hearth0" masquerade
//!     }
//! }
//! ```
//!
//! Only the set changes per instance, so turning NAT on or off for one instance never rewrites
//! the chain, and re-running the node script keeps the set's members (an agent restart does not
//! interrupt NAT for running instances).

use std::net::Ipv4Addr;

use super::config::NodePlan;

/// Name of the set of instance addresses that are masqueraded.
pub const INTERNET_SET: &str = "internet";

/// Creates the table, set and chain when missing and (re)writes the chain's single rule; set
/// members are kept. Idempotent.
pub fn node_script(plan: &NodePlan) -> String {
    let t = &plan.nat_table;
    format!(
        "add table ip {t}\n\
         add set ip {t} {INTERNET_SET} {{ type ipv4_addr; }}\n\
         add chain ip {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         flush chain ip {t} postrouting\n\
         add rule ip {t} postrouting ip saddr @{INTERNET_SET} oifname != \"{bridge}\" masquerade\n",
        bridge = plan.bridge
    )
}

/// Adds `addr` to the masqueraded set (adding a member twice is not an error).
pub fn allow_script(plan: &NodePlan, addr: Ipv4Addr) -> String {
    format!(
        "add element ip {t} {INTERNET_SET} {{ {addr} }}\n",
        t = plan.nat_table
    )
}

/// Removes `addr` from the masqueraded set, whether or not it was a member (nft 1.0.6 has no
/// `destroy`, so the element is added and deleted in one transaction).
pub fn deny_script(plan: &NodePlan, addr: Ipv4Addr) -> String {
    let t = &plan.nat_table;
    format!(
        "add element ip {t} {INTERNET_SET} {{ {addr} }}\n\
         delete element ip {t} {INTERNET_SET} {{ {addr} }}\n"
    )
}

/// Deletes the table whether or not it exists (same add-then-delete idiom).
pub fn remove_table_script(plan: &NodePlan) -> String {
    let t = &plan.nat_table;
    format!("add table ip {t}\ndelete table ip {t}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::NetConfig;

    #[test]
    fn scripts_name_only_our_table() {
        let plan = NetConfig {
            nat_table: "hearth_t1".into(),
            bridge: "hbr1".into(),
            ..Default::default()
        }
        .plan_with_resolv_conf("")
        .unwrap();
        let node = node_script(&plan);
        assert!(node.contains("oifname != \"hbr1\" masquerade"), "{node}");
        let addr = Ipv4Addr::new(10, 88, 0, 20);
        for script in [
            node,
            allow_script(&plan, addr),
            deny_script(&plan, addr),
            remove_table_script(&plan),
        ] {
            for line in script.lines() {
                let words: Vec<_> = line.split_whitespace().collect();
                assert!(
                    words.windows(2).any(|w| w == ["ip", "hearth_t1"]),
                    "line outside our table: {line}"
                );
            }
        }
    }
}
