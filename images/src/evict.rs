//! Choosing what to evict under a disk budget: least recently used images first, never a
//! protected (pinned or in-use) image, never a blob that a kept image still references.
//!
//! Pure planning over a snapshot, so the policy is tested without a disk.

use std::collections::{HashMap, HashSet};

use crate::digest::Digest;

/// One image as eviction sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Manifest digest.
    pub digest: Digest,
    /// Last use (any monotonic unit; smaller is older).
    pub last_used: u64,
    /// Pinned, in use by an instance, or being pulled: never evicted.
    pub protected: bool,
    /// Bytes of its rootfs image and config.
    pub own_bytes: u64,
    /// Blobs it references (config and layers).
    pub blobs: Vec<Digest>,
}

/// What to delete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Images to evict, oldest first.
    pub images: Vec<Digest>,
    /// Blobs no kept image references.
    pub blobs: Vec<Digest>,
    /// Bytes in use before.
    pub before: u64,
    /// Bytes in use after the plan runs.
    pub after: u64,
}

/// Plans eviction down to `budget` bytes. `blob_sizes` lists every stored blob;
/// `busy_blobs` are blobs a pull in progress needs (never deleted). Blobs no image references
/// go first; then images, least recently used first, with the blobs only they used.
pub fn plan(
    images: &[Candidate],
    blob_sizes: &HashMap<Digest, u64>,
    busy_blobs: &HashSet<Digest>,
    budget: u64,
) -> Plan {
    let mut refcount: HashMap<&Digest, usize> = HashMap::new();
    for img in images {
        for b in img.blobs.iter().collect::<HashSet<_>>() {
            *refcount.entry(b).or_default() += 1;
        }
    }
    let before = images.iter().map(|i| i.own_bytes).sum::<u64>() + blob_sizes.values().sum::<u64>();
    let mut plan = Plan {
        before,
        after: before,
        ..Plan::default()
    };
    if before <= budget {
        return plan;
    }
    let mut orphans: Vec<&Digest> = blob_sizes
        .keys()
        .filter(|d| !refcount.contains_key(d) && !busy_blobs.contains(*d))
        .collect();
    orphans.sort();
    for d in orphans {
        plan.after -= blob_sizes[d];
        plan.blobs.push(d.clone());
    }
    let mut lru: Vec<&Candidate> = images.iter().filter(|i| !i.protected).collect();
    lru.sort_by_key(|i| (i.last_used, i.digest.clone()));
    for img in lru {
        if plan.after <= budget {
            break;
        }
        plan.after -= img.own_bytes;
        plan.images.push(img.digest.clone());
        for b in img.blobs.iter().collect::<HashSet<_>>() {
            let n = refcount.get_mut(b).expect("counted above");
            *n -= 1;
            if *n == 0
                && !busy_blobs.contains(b)
                && let Some(size) = blob_sizes.get(b)
            {
                plan.after -= size;
                plan.blobs.push(b.clone());
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn d(i: u8) -> Digest {
        Digest::of(&[i])
    }

    #[test]
    fn lru_first_and_shared_blobs_kept() {
        let base = d(100);
        let images = vec![
            Candidate {
                digest: d(1),
                last_used: 10,
                protected: false,
                own_bytes: 10,
                blobs: vec![base.clone(), d(101)],
            },
            Candidate {
                digest: d(2),
                last_used: 5,
                protected: true,
                own_bytes: 10,
                blobs: vec![d(102)],
            },
            Candidate {
                digest: d(3),
                last_used: 20,
                protected: false,
                own_bytes: 10,
                blobs: vec![base.clone(), d(103)],
            },
        ];
        let sizes: HashMap<Digest, u64> = [
            (base.clone(), 100),
            (d(101), 10),
            (d(102), 10),
            (d(103), 10),
            (d(104), 7),
        ]
        .into();
        let p = plan(&images, &sizes, &HashSet::new(), 150);
        // Orphan 104 first; then image 1 (oldest unpinned) with its own blob 101, not the base.
        assert_eq!(p.blobs, vec![d(104), d(101)]);
        assert_eq!(p.images, vec![d(1)]);
        assert_eq!((p.before, p.after), (167, 140));
        let p = plan(&images, &sizes, &HashSet::new(), 0);
        assert_eq!(p.images, vec![d(1), d(3)]);
        assert!(p.blobs.contains(&base) && !p.blobs.contains(&d(102)));
    }

    proptest! {
        #[test]
        fn never_touches_protected_or_kept(
            specs in proptest::collection::vec((0u64..100, any::<bool>(), 0u64..50, proptest::collection::vec(0u8..12, 0..4)), 0..8),
            budget in 0u64..500,
        ) {
            let images: Vec<Candidate> = specs.iter().enumerate().map(|(i, (lu, prot, own, blobs))| Candidate {
                digest: d(200 + i as u8), last_used: *lu, protected: *prot, own_bytes: *own,
                blobs: blobs.iter().map(|b| d(*b)).collect(),
            }).collect();
            let sizes: HashMap<Digest, u64> = (0u8..14).map(|b| (d(b), 10 + b as u64)).collect();
            let busy: HashSet<Digest> = [d(13)].into();
            let p = plan(&images, &sizes, &busy, budget);
            let evicted: HashSet<&Digest> = p.images.iter().collect();
            let deleted: HashSet<&Digest> = p.blobs.iter().collect();
            prop_assert!(!deleted.contains(&d(13)));
            for img in &images {
                if img.protected { prop_assert!(!evicted.contains(&img.digest)); }
                if !evicted.contains(&img.digest) {
                    for b in &img.blobs { prop_assert!(!deleted.contains(b)); }
                }
            }
            let remaining = images.iter().filter(|i| !evicted.contains(&i.digest)).map(|i| i.own_bytes).sum::<u64>()
                + sizes.iter().filter(|(d, _)| !deleted.contains(d)).map(|(_, s)| s).sum::<u64>();
            prop_assert_eq!(remaining, p.after);
        }
    }
}
