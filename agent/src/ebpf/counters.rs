//! One instance's packet counters, summed over CPUs: packets and bytes per direction and
//! verdict (pass or drop, with its reason).

use hearth_ebpf_common::{
    COUNTER_SLOTS, Counter, Direction, DropReason, PassReason, SLOTS_PER_DIRECTION, Verdict,
};

/// A snapshot of an instance's counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counters {
    slots: Vec<Counter>,
}

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            slots: vec![Counter::default(); COUNTER_SLOTS as usize],
        }
    }
}

impl Counters {
    /// Counters from the per-slot sums (index: [`Verdict::slot`]).
    pub(crate) fn from_slots(slots: Vec<Counter>) -> Counters {
        debug_assert_eq!(slots.len(), COUNTER_SLOTS as usize);
        Counters { slots }
    }

    /// Packets and bytes with `verdict` in `direction`.
    pub fn get(&self, direction: Direction, verdict: Verdict) -> Counter {
        self.slots[verdict.slot(direction) as usize]
    }

    /// Packets and bytes dropped for `reason` in `direction`.
    pub fn dropped_for(&self, direction: Direction, reason: DropReason) -> Counter {
        self.get(direction, Verdict::Drop(reason))
    }

    /// Packets and bytes passed for `reason` in `direction`.
    pub fn passed_for(&self, direction: Direction, reason: PassReason) -> Counter {
        self.get(direction, Verdict::Pass(reason))
    }

    /// Everything passed in `direction`.
    pub fn passed(&self, direction: Direction) -> Counter {
        self.total(direction, true)
    }

    /// Everything dropped in `direction`.
    pub fn dropped(&self, direction: Direction) -> Counter {
        self.total(direction, false)
    }

    fn total(&self, direction: Direction, pass: bool) -> Counter {
        let mut sum = Counter::default();
        for (d, v, c) in self.iter() {
            if d == direction && v.is_pass() == pass {
                sum += c;
            }
        }
        sum
    }

    /// Every (direction, verdict, counter), zeros included, in slot order: what a metrics
    /// exporter walks (labels: [`Direction::name`], pass/drop, [`Verdict::name`]).
    pub fn iter(&self) -> impl Iterator<Item = (Direction, Verdict, Counter)> + '_ {
        Direction::ALL.into_iter().flat_map(move |d| {
            PassReason::ALL
                .into_iter()
                .map(Verdict::Pass)
                .chain(DropReason::ALL.into_iter().map(Verdict::Drop))
                .map(move |v| (d, v, self.get(d, v)))
        })
    }

    /// What was counted since `earlier` (counters only grow; a smaller value counts as 0).
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters {
            slots: self
                .slots
                .iter()
                .zip(&earlier.slots)
                .map(|(now, then)| Counter {
                    packets: now.packets.saturating_sub(then.packets),
                    bytes: now.bytes.saturating_sub(then.bytes),
                })
                .collect(),
        }
    }

    /// The non-zero entries, for messages and logs.
    pub fn nonzero(&self) -> Vec<(Direction, Verdict, Counter)> {
        self.iter().filter(|(_, _, c)| c.packets != 0).collect()
    }
}

const _: () = assert!(SLOTS_PER_DIRECTION * 2 == COUNTER_SLOTS);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_and_differences() {
        let mut slots = vec![Counter::default(); COUNTER_SLOTS as usize];
        slots[Verdict::Pass(PassReason::Rule).slot(Direction::Egress) as usize] = Counter {
            packets: 3,
            bytes: 300,
        };
        slots[Verdict::Drop(DropReason::Denied).slot(Direction::Egress) as usize] = Counter {
            packets: 2,
            bytes: 20,
        };
        slots[Verdict::Drop(DropReason::Unsolicited).slot(Direction::Ingress) as usize] = Counter {
            packets: 1,
            bytes: 60,
        };
        let c = Counters::from_slots(slots);
        assert_eq!(c.passed(Direction::Egress).packets, 3);
        assert_eq!(c.dropped(Direction::Egress).bytes, 20);
        assert_eq!(c.dropped(Direction::Ingress).packets, 1);
        assert_eq!(c.passed(Direction::Ingress).packets, 0);
        assert_eq!(c.nonzero().len(), 3);
        let d = c.since(&Counters::default());
        assert_eq!(d, c);
        assert_eq!(c.since(&c).nonzero(), vec![]);
    }
}
