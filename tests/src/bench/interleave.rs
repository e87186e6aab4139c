//! Repetitions taken round-robin: the points a ratio compares (the placements and peers of one
//! backend, depth and CPU placement) run one after another in every repetition, so each median
//! is drawn from the same stretches of this noisy machine's time as its neighbours'. Taking one
//! point's repetitions back to back, then the next point's, let a slow minute land on one side
//! of a ratio only (the same peer measured 564K and 668K ops/s a few minutes apart).

use anyhow::Result;

/// Splits `cases` into runs of consecutive cases with the same `key`, keeping their order.
pub fn groups<C, K: PartialEq>(cases: Vec<C>, key: impl Fn(&C) -> K) -> Vec<Vec<C>> {
    let mut out: Vec<Vec<C>> = Vec::new();
    for c in cases {
        match out.last_mut() {
            Some(g) if g.first().is_some_and(|first| key(first) == key(&c)) => g.push(c),
            _ => out.push(vec![c]),
        }
    }
    out
}

/// Runs every case of `group` once per repetition, in order, `reps` times (`run` gets each
/// case's index in the group); each case's runs combined, in the group's order.
pub fn round_robin<C, T>(
    group: &[C],
    reps: usize,
    mut run: impl FnMut(usize, &C) -> Result<T>,
    combine: impl Fn(&[T]) -> T,
) -> Result<Vec<T>> {
    let mut runs: Vec<Vec<T>> = group.iter().map(|_| Vec::new()).collect();
    for _ in 0..reps.max(1) {
        for (i, (c, r)) in group.iter().zip(runs.iter_mut()).enumerate() {
            r.push(run(i, c)?);
        }
    }
    Ok(runs.iter().map(|r| combine(r)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_split_only_where_the_key_changes() {
        let g = groups(vec![1, 1, 2, 2, 2, 1], |&x| x);
        assert_eq!(g, vec![vec![1, 1], vec![2, 2, 2], vec![1]]);
    }

    #[test]
    fn round_robin_alternates_cases_within_each_repetition() {
        let mut order = Vec::new();
        let out = round_robin(
            &['a', 'b'],
            3,
            |i, &c| {
                assert_eq!(i, usize::from(c == 'b'));
                order.push(c);
                Ok(order.len())
            },
            |runs| runs.iter().sum::<usize>(),
        )
        .unwrap();
        assert_eq!(order, vec!['a', 'b', 'a', 'b', 'a', 'b']);
        assert_eq!(out, vec![1 + 3 + 5, 2 + 4 + 6]);
    }
}
