//! What a refill pass does, as a pure function of the pools' counts: which pools get a new
//! member now and which retire members, within the concurrency limit and the memory budget.
//! Kept apart from the tasks so the rules are unit- and property-tested.

/// One pool as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolCounts {
    /// Members wanted.
    pub target: u32,
    /// Members ready (not retiring).
    pub ready: u32,
    /// Members booting (not retiring).
    pub booting: u32,
    /// Members being retired (still alive, still holding memory).
    pub retiring: u32,
    /// Memory of one member (MiB).
    pub member_mib: u64,
    /// Whether a member can be launched now (image resolved, no back-off running).
    pub can_launch: bool,
}

impl PoolCounts {
    fn live(&self) -> u32 {
        self.ready + self.booting
    }

    fn held_mib(&self) -> u64 {
        u64::from(self.live() + self.retiring) * self.member_mib
    }
}

/// What to do with one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Action {
    /// Members to launch.
    pub launch: u32,
    /// Ready members to retire (the pool shrank).
    pub retire_ready: u32,
    /// Booting members to retire.
    pub retire_booting: u32,
}

/// Plans one refill pass over `pools` (in priority order): pools above their target retire
/// members, ready ones first (retiring a booting one wastes the boot under way); pools below
/// it launch members while fewer than `concurrency` boot in all and the memory every member
/// holds (retiring ones included) stays within `budget_mib`.
pub fn plan(pools: &[PoolCounts], concurrency: u32, budget_mib: u64) -> Vec<Action> {
    let mut booting: u32 = pools.iter().map(|p| p.booting).sum();
    let mut held: u64 = pools.iter().map(|p| p.held_mib()).sum();
    let mut out = vec![Action::default(); pools.len()];
    for (p, a) in pools.iter().zip(out.iter_mut()) {
        if p.live() > p.target {
            let extra = p.live() - p.target;
            a.retire_ready = extra.min(p.ready);
            a.retire_booting = extra - a.retire_ready;
        }
    }
    for (p, a) in pools.iter().zip(out.iter_mut()) {
        if !p.can_launch || p.member_mib == 0 {
            continue;
        }
        let mut live = p.live();
        while live < p.target && booting < concurrency && held + p.member_mib <= budget_mib {
            a.launch += 1;
            live += 1;
            booting += 1;
            held += p.member_mib;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pool(target: u32, ready: u32, booting: u32) -> PoolCounts {
        PoolCounts {
            target,
            ready,
            booting,
            retiring: 0,
            member_mib: 64,
            can_launch: true,
        }
    }

    #[test]
    fn fills_up_to_concurrency_then_waits() {
        let a = plan(&[pool(5, 0, 0)], 2, 10_000);
        assert_eq!(a[0].launch, 2);
        let a = plan(&[pool(5, 1, 2)], 2, 10_000);
        assert_eq!(a[0].launch, 0);
        let a = plan(&[pool(5, 4, 0)], 2, 10_000);
        assert_eq!(a[0].launch, 1);
    }

    #[test]
    fn budget_counts_every_member_held() {
        // 3 * 64 = 192 held; room for one more in 256.
        let mut p = pool(10, 2, 0);
        p.retiring = 1;
        let a = plan(&[p], 8, 256);
        assert_eq!(a[0].launch, 1);
        let a = plan(&[pool(10, 0, 0), pool(10, 0, 0)], 8, 256);
        assert_eq!((a[0].launch, a[1].launch), (4, 0));
    }

    #[test]
    fn shrinking_retires_ready_first() {
        let a = plan(&[pool(1, 2, 2)], 2, 10_000);
        assert_eq!(
            (a[0].retire_ready, a[0].retire_booting, a[0].launch),
            (2, 1, 0)
        );
        let a = plan(&[pool(0, 0, 1)], 2, 10_000);
        assert_eq!((a[0].retire_ready, a[0].retire_booting), (0, 1));
    }

    #[test]
    fn unresolved_pools_wait() {
        let mut p = pool(3, 0, 0);
        p.can_launch = false;
        assert_eq!(plan(&[p], 2, 10_000)[0], Action::default());
    }

    proptest! {
        #[test]
        fn never_over_budget_or_concurrency_or_target(
            pools in proptest::collection::vec(
                (0u32..8, 0u32..8, 0u32..4, 0u32..3, 1u64..512, any::<bool>()),
                0..6,
            ),
            concurrency in 1u32..6,
            budget in 0u64..4096,
        ) {
            let pools: Vec<PoolCounts> = pools
                .into_iter()
                .map(|(target, ready, booting, retiring, member_mib, can_launch)| PoolCounts {
                    target, ready, booting, retiring, member_mib, can_launch,
                })
                .collect();
            let held_before: u64 = pools.iter().map(|p| p.held_mib()).sum();
            let booting_before: u32 = pools.iter().map(|p| p.booting).sum();
            let actions = plan(&pools, concurrency, budget);
            let launched_mib: u64 = pools
                .iter()
                .zip(&actions)
                .map(|(p, a)| u64::from(a.launch) * p.member_mib)
                .sum();
            let launched: u32 = actions.iter().map(|a| a.launch).sum();
            if launched > 0 {
                prop_assert!(held_before + launched_mib <= budget);
                prop_assert!(booting_before + launched <= concurrency);
            }
            for (p, a) in pools.iter().zip(&actions) {
                prop_assert!(a.launch == 0 || (a.retire_ready == 0 && a.retire_booting == 0));
                let after = p.live() + a.launch - a.retire_ready - a.retire_booting;
                if a.launch > 0 {
                    prop_assert!(after <= p.target);
                }
                if p.live() >= p.target {
                    prop_assert_eq!(after, p.target);
                }
                prop_assert!(a.retire_ready <= p.ready && a.retire_booting <= p.booting);
            }
        }
    }
}
