//! Grouping atoms into subjobs (spec §10.5).
//!
//! ClusterRunner's time-based grouper tries to hand every executor one big
//! chunk holding most of the recorded work (80 %), then fills the tail with
//! many small chunks so that executors finish at roughly the same time. The
//! algorithm below reproduces the original (`TimeBasedAtomGrouper`) decision
//! for decision, including its quirks, because the resulting subjob layout is
//! observable through the API (subjob ids, atom ids, artifact directory names).

use std::collections::HashMap;

/// One atom placed into a subjob.
///
/// The grouping only refers to atoms by position so that callers keep owning
/// their atom data; the subjob id is the position of the group in the returned
/// list and the atom id is the position inside the group.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupedAtom {
    /// Position of the atom in the input slice (atomizer order).
    pub index: usize,
    /// Estimated run time in seconds: the recorded time, or the largest
    /// recorded time for atoms that have no record. `None` when grouping fell
    /// back to one atom per subjob, because no estimate was made then.
    pub expected_time: Option<f64>,
}

/// Subjobs, each a list of atoms.
type Groups = Vec<Vec<GroupedAtom>>;

/// Share of the estimated total run time that goes into the first `N` "big" subjobs.
const BIG_CHUNK_FRACTION: f64 = 0.8;

/// `max_executors` default of the original (Python's `sys.maxsize`, 2^63 − 1).
const DEFAULT_MAX_EXECUTORS: u64 = i64::MAX as u64;

/// Groups `atoms` (command strings, which are also the timing-map keys) into subjobs.
///
/// * If `timings` holds a record for none of the atoms (in particular when it
///   is empty), every atom becomes its own subjob in input order and no
///   expected time is set.
/// * Otherwise the big/small bucket algorithm of spec §10.5 is used with
///   `N = max_executors` (default 2^63 − 1). `Some(0)` is treated as `1`: the
///   original would divide by zero, and a job can never run on zero executors.
///
/// Every input position appears in exactly one group; empty input gives no groups.
pub fn group_atoms(
    atoms: &[String],
    timings: &HashMap<String, f64>,
    max_executors: Option<u64>,
) -> Vec<Vec<GroupedAtom>> {
    match time_based_groups(atoms, timings, max_executors) {
        Some((mut big, small)) => {
            big.extend(small);
            big
        }
        None => one_atom_per_subjob(atoms.len()),
    }
}

fn one_atom_per_subjob(count: usize) -> Vec<Vec<GroupedAtom>> {
    (0..count)
        .map(|index| {
            vec![GroupedAtom {
                index,
                expected_time: None,
            }]
        })
        .collect()
}

/// Runs the time-based algorithm, returning the groups of the limited ("big")
/// bucket pass and of the unlimited ("small") pass separately so tests can
/// check the `N` bound. `None` means no atom had timing data.
fn time_based_groups(
    atoms: &[String],
    timings: &HashMap<String, f64>,
    max_executors: Option<u64>,
) -> Option<(Groups, Groups)> {
    let (expected, total) = expected_times(atoms, timings)?;

    let n = max_executors.unwrap_or(DEFAULT_MAX_EXECUTORS).max(1);
    // Converted once: group counts are usizes, and a limit above usize::MAX
    // can never be reached anyway.
    let limit = usize::try_from(n).unwrap_or(usize::MAX);
    let n_f = n as f64;
    let big_target = total * BIG_CHUNK_FRACTION / n_f;
    let small_target = total * (1.0 - BIG_CHUNK_FRACTION) / (2.0 * n_f);

    // Stable sort, slowest first; ties keep atomizer order. `+ 0.0` folds -0.0
    // into 0.0 so total_cmp (needed for a total order) ranks them as equal,
    // like Python's comparison does.
    let mut remaining: Vec<usize> = (0..atoms.len()).collect();
    remaining.sort_by(|&a, &b| (expected[b] + 0.0).total_cmp(&(expected[a] + 0.0)));

    let big = bucket(&mut remaining, &expected, big_target, Some(limit));
    let small = bucket(&mut remaining, &expected, small_target, None);

    let to_grouped = |groups: Vec<Vec<usize>>| -> Groups {
        groups
            .into_iter()
            .map(|group| {
                group
                    .into_iter()
                    .map(|index| GroupedAtom {
                        index,
                        expected_time: Some(expected[index]),
                    })
                    .collect()
            })
            .collect()
    };
    Some((to_grouped(big), to_grouped(small)))
}

/// Step 1 of §10.5: per-atom expected times and the estimated serial total.
/// Returns `None` when no atom has a record.
fn expected_times(atoms: &[String], timings: &HashMap<String, f64>) -> Option<(Vec<f64>, f64)> {
    let recorded: Vec<Option<f64>> = atoms.iter().map(|a| timings.get(a).copied()).collect();
    let mut total = 0.0_f64;
    // Starts at 0 like the original, so unknown atoms never get a negative estimate.
    let mut max_t = 0.0_f64;
    let mut without = 0_u64;
    for t in &recorded {
        match t {
            Some(t) => {
                if max_t < *t {
                    max_t = *t;
                }
                total += t;
            }
            None => without += 1,
        }
    }
    if usize::try_from(without).is_ok_and(|w| w == atoms.len()) {
        return None;
    }
    // One multiplication rather than repeated additions, as the original does,
    // so totals (and thus bucket targets) round identically.
    let unknown_total = max_t * without as f64;
    total += unknown_total;
    let expected = recorded.into_iter().map(|t| t.unwrap_or(max_t)).collect();
    Some((expected, total))
}

/// Step 4 of §10.5. Removes the atoms it places from `remaining` (which stays
/// in sorted order) and returns the groups as input positions.
fn bucket(
    remaining: &mut Vec<usize>,
    expected: &[f64],
    target: f64,
    limit: Option<usize>,
) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    while limit.is_none_or(|l| groups.len() < l) && !remaining.is_empty() {
        let snapshot = std::mem::take(remaining);
        let mut cur: Vec<usize> = Vec::new();
        let mut t = 0.0_f64;
        for (pos, &atom) in snapshot.iter().enumerate() {
            let time = expected[atom];
            if !cur.is_empty() && t + time > target {
                remaining.push(atom);
                continue;
            }
            t += time;
            cur.push(atom);
            // |R| after this removal = atoms skipped so far + atoms not yet visited.
            let left = remaining.len() + (snapshot.len() - pos - 1);
            if let Some(l) = limit
                && groups.len().saturating_add(left).saturating_add(1) <= l
            {
                // Enough executor slots remain for every leftover atom to get
                // its own subjob, which beats packing them together.
                groups.push(cur);
                remaining.extend_from_slice(&snapshot[pos + 1..]);
                groups.extend(remaining.drain(..).map(|a| vec![a]));
                return groups;
            }
        }
        groups.push(cur);
    }
    groups
}

/// Queue dispatch's batches of short atoms aim at this run time: a dispatch costs about a
/// millisecond (a round trip to the slave and the bookkeeping of one subjob), so a 50 ms batch
/// keeps that cost near 2% while the imbalance it can add at the end of a build stays tiny.
pub const QUEUE_BATCH_TARGET_S: f64 = 0.05;

/// Guided self-scheduling factor: a batch never holds more than remaining ÷ (executors × this),
/// so batches shrink to single atoms as the queue empties and the last executors to finish do
/// so together.
const QUEUE_GUIDE_FACTOR: usize = 4;

/// Queue dispatch: the atoms longest expected time first, in small batches that executors take
/// from the queue as they free. Atoms with a recorded time expect it; atoms without one expect
/// the longest recorded time (pessimistic: an unknown atom started late could end the build
/// late). Without any recorded time the atomizer order is kept, no time is expected and every
/// atom is its own subjob.
///
/// Batches (consecutive atoms in that order) are sized for the per-dispatch cost: atoms are
/// added while the batch's expected time stays within `QUEUE_BATCH_TARGET_S` and its size within
/// remaining ÷ (`executors` × 4). An atom expected to take longer than the target (and every
/// atom without history) goes alone. The sort is stable: equal times keep atomizer order.
pub fn queue_order(
    atoms: &[String],
    timings: &HashMap<String, f64>,
    executors: usize,
) -> Vec<Vec<GroupedAtom>> {
    let known: Vec<Option<f64>> = atoms.iter().map(|a| timings.get(a).copied()).collect();
    let max_t = known
        .iter()
        .flatten()
        .copied()
        .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.max(t))));
    let mut order: Vec<GroupedAtom> = known
        .iter()
        .enumerate()
        .map(|(index, t)| GroupedAtom {
            index,
            expected_time: max_t.map(|m| t.unwrap_or(m)),
        })
        .collect();
    if max_t.is_none() {
        return order.into_iter().map(|g| vec![g]).collect();
    }
    order.sort_by(|a, b| {
        b.expected_time
            .unwrap_or_default()
            .total_cmp(&a.expected_time.unwrap_or_default())
    });
    let per_round = executors.max(1) * QUEUE_GUIDE_FACTOR;
    let mut groups = Vec::new();
    let mut rest = order.into_iter().peekable();
    let mut remaining = atoms.len();
    while let Some(first) = rest.next() {
        let guided = remaining.div_ceil(per_round);
        let mut time = first.expected_time.unwrap_or_default();
        let mut batch = vec![first];
        while batch.len() < guided {
            let Some(next) = rest.peek() else { break };
            let t = next.expected_time.unwrap_or_default();
            if time + t > QUEUE_BATCH_TARGET_S {
                break;
            }
            time += t;
            batch.extend(rest.next());
        }
        remaining -= batch.len();
        groups.push(batch);
    }
    groups
}

#[cfg(test)]
mod queue_tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("a{i}")).collect()
    }

    #[test]
    fn without_history_atomizer_order_is_kept() {
        let g = queue_order(&names(3), &HashMap::new(), 1);
        assert_eq!(g.iter().map(|g| g[0].index).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(g.iter().all(|g| g[0].expected_time.is_none()));
    }

    #[test]
    fn longest_first_and_unknown_atoms_are_pessimistic() {
        let t = HashMap::from([
            ("a0".to_string(), 1.0),
            ("a1".to_string(), 5.0),
            ("a3".to_string(), 2.0),
        ]);
        let g = queue_order(&names(4), &t, 1);
        let order: Vec<(usize, f64)> = g
            .iter()
            .map(|g| (g[0].index, g[0].expected_time.unwrap()))
            .collect();
        // a2 has no record: it expects the longest recorded time (5.0) and keeps its place
        // after a1 among equals.
        assert_eq!(order, [(1, 5.0), (2, 5.0), (3, 2.0), (0, 1.0)]);
    }

    /// Every atom once, in longest-first order, whatever the batching.
    fn flat(g: &[Vec<GroupedAtom>]) -> Vec<usize> {
        g.iter().flatten().map(|a| a.index).collect()
    }

    #[test]
    fn short_atoms_are_batched_and_batches_shrink_to_single_atoms() {
        // 2,000 atoms of ~2 ms on 8 executors.
        let t: HashMap<String, f64> = names(2000)
            .into_iter()
            .enumerate()
            .map(|(i, n)| (n, 0.002 + (i % 3) as f64 * 1e-4))
            .collect();
        let g = queue_order(&names(2000), &t, 8);
        let mut all = flat(&g);
        all.sort_unstable();
        assert_eq!(all, (0..2000).collect::<Vec<_>>());
        let sizes: Vec<usize> = g.iter().map(Vec::len).collect();
        // Early batches are as long as the target allows (50 ms of ~2 ms atoms)...
        assert!(sizes[0] >= 20 && sizes[0] <= 25, "{sizes:?}");
        for b in &g {
            let time: f64 = b.iter().map(|a| a.expected_time.unwrap()).sum();
            assert!(time <= QUEUE_BATCH_TARGET_S + 1e-9 || b.len() == 1);
        }
        // ...never more than remaining ÷ (executors × 4), so the last ones are single atoms.
        let mut remaining = 2000usize;
        for &n in &sizes {
            assert!(n <= remaining.div_ceil(32), "{sizes:?}");
            remaining -= n;
        }
        assert!(sizes.ends_with(&[1; 30]), "{sizes:?}");
        assert!(g.len() < 400, "{} batches", g.len());
    }

    #[test]
    fn long_and_unknown_atoms_go_alone() {
        let mut t: HashMap<String, f64> = names(100).into_iter().map(|n| (n, 0.001)).collect();
        t.insert("a5".into(), 0.5);
        t.remove("a7");
        let g = queue_order(&names(100), &t, 2);
        // a5 (0.5 s) and a7 (no history: expects the longest, 0.5 s) come first, alone.
        assert_eq!(g[0].iter().map(|a| a.index).collect::<Vec<_>>(), [5]);
        assert_eq!(g[1].iter().map(|a| a.index).collect::<Vec<_>>(), [7]);
        assert!(g[2].len() > 1);
        assert_eq!(flat(&g).len(), 100);
    }

    #[test]
    fn few_atoms_are_not_batched() {
        let t: HashMap<String, f64> = names(8).into_iter().map(|n| (n, 0.001)).collect();
        let g = queue_order(&names(8), &t, 2);
        assert!(g.iter().all(|b| b.len() == 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn timing_map(pairs: &[(&str, f64)]) -> HashMap<String, f64> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    /// Groups as sets of atom names: inner order is irrelevant, outer order is not.
    fn as_name_sets(atoms: &[String], groups: &[Vec<GroupedAtom>]) -> Vec<BTreeSet<String>> {
        groups
            .iter()
            .map(|g| g.iter().map(|a| atoms[a.index].clone()).collect())
            .collect()
    }

    fn expect_sets(expected: &[&[&str]]) -> Vec<BTreeSet<String>> {
        expected
            .iter()
            .map(|g| g.iter().map(|s| (*s).to_owned()).collect())
            .collect()
    }

    fn data_set_2() -> (Vec<String>, HashMap<String, f64>) {
        (
            names(&["a1", "a2", "a3", "a4", "a5"]),
            timing_map(&[
                ("a1", 100.0),
                ("a2", 100.0),
                ("a3", 50.0),
                ("a4", 2.0),
                ("a5", 2.0),
            ]),
        )
    }

    #[test]
    fn data_set_1_two_executors() {
        let atoms = names(&["a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8", "a9", "a10"]);
        let timings = timing_map(&[
            ("a1", 1.0),
            ("a2", 10.0),
            ("a3", 11.0),
            ("a4", 2.0),
            ("a5", 10.0),
            ("a6", 5.0),
            ("a7", 2.0),
            ("a8", 8.0),
            ("a9", 10.0),
            ("a10", 3.0),
        ]);
        let groups = group_atoms(&atoms, &timings, Some(2));
        assert_eq!(
            as_name_sets(&atoms, &groups),
            expect_sets(&[
                &["a3", "a2", "a10"],
                &["a5", "a9", "a4", "a7"],
                &["a8"],
                &["a6"],
                &["a1"],
            ])
        );
    }

    #[test]
    fn data_set_2_three_executors() {
        let (atoms, timings) = data_set_2();
        let groups = group_atoms(&atoms, &timings, Some(3));
        assert_eq!(
            as_name_sets(&atoms, &groups),
            expect_sets(&[&["a1"], &["a2"], &["a3", "a4", "a5"]])
        );
    }

    #[test]
    fn data_set_2_two_executors() {
        let (atoms, timings) = data_set_2();
        let groups = group_atoms(&atoms, &timings, Some(2));
        assert_eq!(
            as_name_sets(&atoms, &groups),
            expect_sets(&[&["a1"], &["a2"], &["a3"], &["a4", "a5"]])
        );
    }

    #[test]
    fn data_set_2_five_executors() {
        let (atoms, timings) = data_set_2();
        let groups = group_atoms(&atoms, &timings, Some(5));
        assert_eq!(
            as_name_sets(&atoms, &groups),
            expect_sets(&[&["a1"], &["a2"], &["a3"], &["a4"], &["a5"]])
        );
    }

    #[test]
    fn unknown_atoms_get_max_time_and_count_in_total() {
        let atoms = names(&["a2", "a3", "a4", "a5"]);
        let timings = timing_map(&[("a1", 1.0), ("a2", 2.0), ("a3", 3.0)]);
        let (expected, total) = expected_times(&atoms, &timings).expect("has timing data");
        assert_eq!(expected, vec![2.0, 3.0, 3.0, 3.0]);
        assert_eq!(total, 11.0);

        let groups = group_atoms(&atoms, &timings, Some(3));
        let mut times: Vec<(String, Option<f64>)> = groups
            .iter()
            .flatten()
            .map(|a| (atoms[a.index].clone(), a.expected_time))
            .collect();
        times.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            times,
            vec![
                ("a2".to_owned(), Some(2.0)),
                ("a3".to_owned(), Some(3.0)),
                ("a4".to_owned(), Some(3.0)),
                ("a5".to_owned(), Some(3.0)),
            ]
        );
    }

    #[test]
    fn all_atom_times_known_total() {
        let atoms = names(&["a1", "a2", "a3"]);
        let timings = timing_map(&[("a1", 1.0), ("a2", 2.0), ("a3", 3.0)]);
        let (expected, total) = expected_times(&atoms, &timings).expect("has timing data");
        assert_eq!(expected, vec![1.0, 2.0, 3.0]);
        assert_eq!(total, 6.0);
    }

    #[test]
    fn empty_timing_map_gives_one_atom_per_subjob() {
        let atoms: Vec<String> = (0..1000).map(|i| format!("atom_{i}")).collect();
        let groups = group_atoms(&atoms, &HashMap::new(), Some(2));
        assert_eq!(groups.len(), 1000);
        for (i, g) in groups.iter().enumerate() {
            assert_eq!(
                g,
                &vec![GroupedAtom {
                    index: i,
                    expected_time: None
                }]
            );
        }
    }

    #[test]
    fn timing_map_without_matching_atoms_falls_back() {
        let atoms = names(&["atom_0", "atom_1"]);
        let timings = timing_map(&[("other", 5.0)]);
        let groups = group_atoms(&atoms, &timings, Some(2));
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0][0].index, 0);
        assert_eq!(groups[1][0].index, 1);
        assert!(groups.iter().flatten().all(|a| a.expected_time.is_none()));
    }

    #[test]
    fn unlimited_executors_gives_singletons_slowest_first() {
        let atoms = names(&["a", "b", "c", "d"]);
        let timings = timing_map(&[("a", 1.0), ("b", 5.0), ("c", 3.0), ("d", 5.0)]);
        let groups = group_atoms(&atoms, &timings, None);
        let order: Vec<usize> = groups
            .iter()
            .map(|g| {
                assert_eq!(g.len(), 1);
                g[0].index
            })
            .collect();
        // Ties (b, d) keep atomizer order.
        assert_eq!(order, vec![1, 3, 2, 0]);
    }

    #[test]
    fn zero_executors_behaves_like_one() {
        let (atoms, timings) = data_set_2();
        assert_eq!(
            group_atoms(&atoms, &timings, Some(0)),
            group_atoms(&atoms, &timings, Some(1))
        );
    }

    #[test]
    fn empty_input_gives_no_groups() {
        assert!(group_atoms(&[], &HashMap::new(), None).is_empty());
        assert!(group_atoms(&[], &timing_map(&[("x", 1.0)]), Some(3)).is_empty());
    }

    /// Minimal LCG (Knuth's MMIX constants) so the property test needs no extra crates.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 33
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn property_every_atom_in_exactly_one_group_and_big_pass_bounded() {
        let mut rng = Lcg(0x1234_5678_9abc_def0);
        for case in 0..400 {
            let count = usize::try_from(rng.below(60)).expect("small");
            let atoms: Vec<String> = (0..count).map(|i| format!("atom_{i}")).collect();
            let mut timings = HashMap::new();
            for atom in &atoms {
                // Roughly a third unknown; some zero and duplicate times for ties.
                match rng.below(6) {
                    0 | 1 => {}
                    2 => {
                        timings.insert(atom.clone(), 0.0);
                    }
                    _ => {
                        let t = rng.below(1000) as f64 / 10.0;
                        timings.insert(atom.clone(), t);
                    }
                }
            }
            if rng.below(4) == 0 {
                timings.insert("not_an_atom".to_owned(), 42.0);
            }
            let max_executors = match rng.below(4) {
                0 => None,
                _ => Some(rng.below(12) + 1),
            };

            let groups = group_atoms(&atoms, &timings, max_executors);
            let mut seen = vec![0_u32; count];
            for g in &groups {
                assert!(!g.is_empty(), "case {case}: empty group");
                for a in g {
                    seen[a.index] += 1;
                }
            }
            assert!(
                seen.iter().all(|&c| c == 1),
                "case {case}: atoms not placed exactly once: {seen:?}"
            );

            if let Some(n) = max_executors
                && let Some((big, small)) = time_based_groups(&atoms, &timings, Some(n))
            {
                assert!(
                    big.len() as u64 <= n,
                    "case {case}: {} big groups for N = {n}",
                    big.len()
                );
                assert_eq!(big.len() + small.len(), groups.len());
            }
        }
    }
}
