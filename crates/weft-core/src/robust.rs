//! Aggregation rules, from the plain weighted mean to Byzantine-robust ones, and the per-column
//! kernels they run on.
//!
//! Every rule keeps the round engine's guarantees: the policy's weights `wᵢ` (each ≤ cap,
//! `W = Σ wᵢ ≤ 1`) decide who is in and how much mass the step may carry; the rule decides how
//! the accepted deltas are combined. Rules that are not weighted sums (median, trimmed mean,
//! centered clipping) scale their result by `W`, so the unassigned share still stays with the
//! base; Multi-Krum re-applies the cap to the nodes it selects.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How accepted deltas are combined into the step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "kebab-case")]
pub enum Aggregator {
    /// `Σ wᵢΔᵢ`.
    #[default]
    WeightedMean,
    /// `Σ wᵢ·min(1, τ/‖Δᵢ‖)·Δᵢ`: every delta's L2 norm is bounded by τ before the weighted mean.
    NormBound { bound: NormBound },
    /// `W · median(Δ)`, coordinate by coordinate.
    Median,
    /// `W · mean` of each coordinate after dropping the ⌊βn⌋ largest and ⌊βn⌋ smallest values.
    TrimmedMean { beta: f64 },
    /// Scores each delta by the summed squared distance to its n−f−2 nearest others, keeps the
    /// m best, and takes their weighted mean (cap re-applied).
    MultiKrum { f: usize, m: usize },
    /// Karimireddy et al. 2021: starting from the previous round's step `v`, `iterations` times
    /// `v ← v + Σ w̃ᵢ·min(1, τ/‖Δᵢ − v‖)·(Δᵢ − v)` with `w̃ = w/W`; the step is `W·v`.
    CenteredClipping { tau: f64, iterations: usize },
}

/// The norm bound of [`Aggregator::NormBound`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "kebab-case")]
pub enum NormBound {
    /// τ itself.
    Fixed(f64),
    /// τ = this multiple of the median norm of the round's accepted deltas.
    Adaptive(f64),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AggregatorError {
    #[error("unknown aggregator '{0}' (expected mean, norm-bound:TAU, norm-bound:adaptive:K, median, trimmed-mean:BETA, multi-krum:F:M, centered-clipping:TAU:ITERATIONS)")]
    Unknown(String),
    #[error("aggregator '{spec}': {why}")]
    Invalid { spec: String, why: String },
    #[error("{rule} needs {needed} accepted deltas, the round has {got}")]
    TooFew { rule: String, needed: usize, got: usize },
}

impl Aggregator {
    /// Checks the rule's own parameters.
    pub fn validate(&self) -> Result<(), AggregatorError> {
        let invalid = |why: &str| Err(AggregatorError::Invalid { spec: self.to_string(), why: why.to_owned() });
        match *self {
            Aggregator::NormBound { bound: NormBound::Fixed(t) | NormBound::Adaptive(t) }
                if !(t.is_finite() && t > 0.0) =>
            {
                invalid("the bound must be a positive number")
            }
            Aggregator::TrimmedMean { beta } if !(0.0..0.5).contains(&beta) => invalid("β must be in [0, 0.5)"),
            Aggregator::MultiKrum { m: 0, .. } => invalid("m must be at least 1"),
            Aggregator::CenteredClipping { tau, iterations } if !(tau.is_finite() && tau > 0.0) || iterations == 0 => {
                invalid("τ must be a positive number and iterations at least 1")
            }
            _ => Ok(()),
        }
    }

    /// The fewest accepted deltas the rule can work with.
    pub fn min_inputs(&self) -> usize {
        match *self {
            // Krum's score needs n − f − 2 ≥ 1 neighbours, i.e. n > 2f + 2 as in Blanchard et al.
            Aggregator::MultiKrum { f, m } => (2 * f + 3).max(m),
            _ => 1,
        }
    }

    /// Checks that `n` accepted deltas are enough.
    pub fn check_inputs(&self, n: usize) -> Result<(), AggregatorError> {
        let needed = self.min_inputs();
        if n < needed {
            return Err(AggregatorError::TooFew { rule: self.to_string(), needed, got: n });
        }
        Ok(())
    }

    /// True when the step is a weighted sum of the deltas, computable one delta at a time.
    pub fn is_linear(&self) -> bool {
        matches!(self, Aggregator::WeightedMean | Aggregator::NormBound { .. })
    }

    /// Number of values trimmed at each end of a column of `n`.
    pub fn trimmed(beta: f64, n: usize) -> usize {
        ((beta * n as f64).floor() as usize).min(n.saturating_sub(1) / 2)
    }
}

impl fmt::Display for Aggregator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Aggregator::WeightedMean => write!(f, "mean"),
            Aggregator::NormBound { bound: NormBound::Fixed(t) } => write!(f, "norm-bound:{t}"),
            Aggregator::NormBound { bound: NormBound::Adaptive(k) } => write!(f, "norm-bound:adaptive:{k}"),
            Aggregator::Median => write!(f, "median"),
            Aggregator::TrimmedMean { beta } => write!(f, "trimmed-mean:{beta}"),
            Aggregator::MultiKrum { f: byz, m } => write!(f, "multi-krum:{byz}:{m}"),
            Aggregator::CenteredClipping { tau, iterations } => write!(f, "centered-clipping:{tau}:{iterations}"),
        }
    }
}

impl FromStr for Aggregator {
    type Err = AggregatorError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = spec.split(':').collect();
        let bad = |why: &str| AggregatorError::Invalid { spec: spec.to_owned(), why: why.to_owned() };
        let num = |s: &str| s.parse::<f64>().map_err(|_| bad(&format!("'{s}' is not a number")));
        let int = |s: &str| s.parse::<usize>().map_err(|_| bad(&format!("'{s}' is not a whole number")));
        let rule = match parts.as_slice() {
            ["mean"] => Aggregator::WeightedMean,
            ["norm-bound", "adaptive", k] => Aggregator::NormBound { bound: NormBound::Adaptive(num(k)?) },
            ["norm-bound", t] => Aggregator::NormBound { bound: NormBound::Fixed(num(t)?) },
            ["median"] => Aggregator::Median,
            ["trimmed-mean", b] => Aggregator::TrimmedMean { beta: num(b)? },
            ["multi-krum", byz, m] => Aggregator::MultiKrum { f: int(byz)?, m: int(m)? },
            ["centered-clipping", t, it] => Aggregator::CenteredClipping { tau: num(t)?, iterations: int(it)? },
            _ => return Err(AggregatorError::Unknown(spec.to_owned())),
        };
        rule.validate()?;
        Ok(rule)
    }
}

/// `min(1, τ/‖x‖)`: the factor that brings a vector of norm `norm` within `tau`.
pub fn clip_factor(norm: f64, tau: f64) -> f64 {
    if norm > tau {
        tau / norm
    } else {
        1.0
    }
}

/// Median of a column (mean of the two middle values for an even count). Reorders `column`.
pub fn median(column: &mut [f32]) -> f32 {
    let n = column.len();
    if n == 0 {
        return 0.0;
    }
    let mid = n / 2;
    let (low, upper, _) = column.select_nth_unstable_by(mid, f32::total_cmp);
    let upper = *upper;
    if n % 2 == 1 {
        upper
    } else {
        let lower = low.iter().copied().max_by(f32::total_cmp).unwrap_or(upper);
        0.5 * (lower + upper)
    }
}

/// Mean after dropping `k` values at each end (requires `2k < n`). Reorders `column`.
pub fn trimmed_mean(column: &mut [f32], k: usize) -> f32 {
    let n = column.len();
    if n == 0 || 2 * k >= n {
        return 0.0;
    }
    if k > 0 {
        column.select_nth_unstable_by(k - 1, f32::total_cmp);
        let rest = &mut column[k..];
        rest.select_nth_unstable_by(n - 2 * k, f32::total_cmp);
    }
    let kept = &column[k..n - k];
    // Selection leaves the kept values in an order that depends on the input order; summing in
    // f64 makes that order invisible in the f32 result for any realistic column length.
    (kept.iter().map(|&v| f64::from(v)).sum::<f64>() / kept.len() as f64) as f32
}

/// What [`reduce_sorted_columns`] takes from each sorted column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnPick {
    /// The median (mean of the two middle values for an even count).
    Median,
    /// The mean after dropping this many values at each end.
    Trimmed(usize),
}

/// Comparators `(a, b)` of Batcher's odd–even merge sort for `n` inputs: the network for the next
/// power of two with every comparator that touches padding dropped (padding acts as +∞, which a
/// comparator never moves, so the rest still sorts).
pub fn sorting_network(n: usize) -> Vec<(usize, usize)> {
    let size = n.next_power_of_two();
    let mut comparators = Vec::new();
    let mut p = 1;
    while p < size {
        let mut k = p;
        while k >= 1 {
            let mut j = k % p;
            while j + k < size {
                for i in 0..k.min(size - j - k) {
                    let (a, b) = (i + j, i + j + k);
                    if a / (2 * p) == b / (2 * p) && b < n {
                        comparators.push((a, b));
                    }
                }
                j += 2 * k;
            }
            k /= 2;
        }
        p *= 2;
    }
    comparators
}

/// The comparators that can influence the rows `pick` reads: walking the network backwards, a
/// comparator matters if it writes a row that matters, and then both of its rows matter.
fn needed_comparators(network: Vec<(usize, usize)>, n: usize, pick: ColumnPick) -> Vec<(usize, usize)> {
    let mut live = vec![false; n];
    match pick {
        ColumnPick::Median => {
            live[n / 2] = true;
            live[(n - 1) / 2] = true;
        }
        ColumnPick::Trimmed(k) => {
            let k = k.min((n - 1) / 2);
            live[k..n - k].iter_mut().for_each(|l| *l = true);
        }
    }
    let mut kept: Vec<(usize, usize)> = network
        .into_iter()
        .rev()
        .filter(|&(a, b)| {
            let needed = live[a] || live[b];
            if needed {
                live[a] = true;
                live[b] = true;
            }
            needed
        })
        .collect();
    kept.reverse();
    kept
}

/// Coordinate-wise median or trimmed mean of `inputs` (all the same length, all values finite)
/// into `out`. Blocks of columns are copied into n rows and sorted column-wise by one sorting
/// network of vector min/max operations: no per-column branching, so it runs at close to memory
/// speed. Each output is computed by one thread in a fixed order: thread-count free.
pub fn reduce_sorted_columns(inputs: &[&[f32]], out: &mut [f32], pick: ColumnPick) {
    use rayon::prelude::*;
    const BLOCK: usize = 1024;
    let n = inputs.len();
    if n == 0 {
        out.fill(0.0);
        return;
    }
    let network = needed_comparators(sorting_network(n), n, pick);
    out.par_chunks_mut(BLOCK).enumerate().for_each_init(Vec::new, |rows: &mut Vec<f32>, (block, out)| {
        let width = out.len();
        let start = block * BLOCK;
        rows.clear();
        for input in inputs {
            rows.extend_from_slice(&input[start..start + width]);
        }
        for &(a, b) in &network {
            let (low, high) = rows.split_at_mut(b * width);
            let (ra, rb) = (&mut low[a * width..(a + 1) * width], &mut high[..width]);
            for (x, y) in ra.iter_mut().zip(rb.iter_mut()) {
                let (lo, hi) = if *y < *x { (*y, *x) } else { (*x, *y) };
                *x = lo;
                *y = hi;
            }
        }
        let row = |i: usize| &rows[i * width..(i + 1) * width];
        match pick {
            ColumnPick::Median if n % 2 == 1 => out.copy_from_slice(row(n / 2)),
            ColumnPick::Median => {
                for ((o, a), b) in out.iter_mut().zip(row(n / 2 - 1)).zip(row(n / 2)) {
                    *o = 0.5 * (a + b);
                }
            }
            ColumnPick::Trimmed(k) => {
                let k = k.min((n - 1) / 2);
                out.fill(0.0);
                for i in k..n - k {
                    for (o, v) in out.iter_mut().zip(row(i)) {
                        *o += v;
                    }
                }
                let scale = 1.0 / (n - 2 * k) as f32;
                out.iter_mut().for_each(|o| *o *= scale);
            }
        }
    });
}

/// Multi-Krum selection from the squared pairwise distances `dist2[i·n + j]`: each delta's
/// score is the sum of its `n − f − 2` smallest distances to the others; the `m` lowest scores
/// win (ties by index). Returns the selected indices, ascending, and every score.
pub fn krum_select(dist2: &[f64], n: usize, f: usize, m: usize) -> (Vec<usize>, Vec<f64>) {
    let neighbours = n.saturating_sub(f + 2).max(1);
    let scores: Vec<f64> = (0..n)
        .map(|i| {
            let mut row: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| dist2[i * n + j]).collect();
            row.sort_by(f64::total_cmp);
            row.iter().take(neighbours).sum()
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut chosen: Vec<usize> = order.into_iter().take(m.min(n)).collect();
    chosen.sort_unstable();
    (chosen, scores)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_prints_every_rule() {
        for spec in [
            "mean",
            "norm-bound:2.5",
            "norm-bound:adaptive:2",
            "median",
            "trimmed-mean:0.2",
            "multi-krum:1:3",
            "centered-clipping:0.5:3",
        ] {
            let rule: Aggregator = spec.parse().unwrap();
            assert_eq!(rule.to_string(), spec);
        }
        assert!(matches!("krum".parse::<Aggregator>(), Err(AggregatorError::Unknown(_))));
        assert!(matches!("trimmed-mean:0.5".parse::<Aggregator>(), Err(AggregatorError::Invalid { .. })));
        assert!(matches!("norm-bound:-1".parse::<Aggregator>(), Err(AggregatorError::Invalid { .. })));
        assert!(matches!("multi-krum:1:0".parse::<Aggregator>(), Err(AggregatorError::Invalid { .. })));
        assert!(matches!("centered-clipping:1:0".parse::<Aggregator>(), Err(AggregatorError::Invalid { .. })));
        assert!(matches!("multi-krum:x:1".parse::<Aggregator>(), Err(AggregatorError::Invalid { .. })));
    }

    #[test]
    fn krum_needs_more_than_2f_plus_2() {
        let rule = Aggregator::MultiKrum { f: 1, m: 2 };
        assert_eq!(
            rule.check_inputs(4),
            Err(AggregatorError::TooFew { rule: "multi-krum:1:2".into(), needed: 5, got: 4 })
        );
        assert!(rule.check_inputs(5).is_ok());
    }

    #[test]
    fn median_and_trimmed_mean_ignore_outliers() {
        assert_eq!(median(&mut [3.0, 1.0, 1e30, 2.0, -1e30]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(trimmed_mean(&mut [1e30, 1.0, 2.0, 3.0, -1e30], 1), 2.0);
        assert_eq!(trimmed_mean(&mut [1.0, 2.0], 0), 1.5);
        assert_eq!(Aggregator::trimmed(0.2, 5), 1);
        assert_eq!(Aggregator::trimmed(0.49, 3), 1);
        assert_eq!(Aggregator::trimmed(0.4, 2), 0);
    }

    #[test]
    fn krum_drops_the_outlier_and_favours_colluders_it_cannot_tell_apart() {
        // Four honest points near 0 and one far away: the far one is never selected.
        let points = [0.0f64, 0.1, -0.1, 0.05, 10.0];
        let n = points.len();
        let dist2: Vec<f64> = (0..n * n).map(|k| (points[k / n] - points[k % n]).powi(2)).collect();
        let (chosen, scores) = krum_select(&dist2, n, 1, 3);
        assert!(!chosen.contains(&4));
        assert!(scores[4] > scores[0]);
    }

    proptest! {
        #[test]
        fn the_network_sorts_every_size(mut xs in prop::collection::vec(-1e6f32..1e6, 1..70)) {
            let mut sorted = xs.clone();
            sorted.sort_by(f32::total_cmp);
            for (a, b) in sorting_network(xs.len()) {
                if xs[b] < xs[a] {
                    xs.swap(a, b);
                }
            }
            prop_assert_eq!(xs, sorted);
        }

        #[test]
        fn column_kernels_match_the_scalar_definitions(
            n in 1usize..20, len in 1usize..700, seed in any::<u32>(), beta in 0.0..0.49f64,
        ) {
            let inputs: Vec<Vec<f32>> = (0..n)
                .map(|i| (0..len).map(|j| ((j as u32).wrapping_mul(2654435761).wrapping_add(seed ^ (i as u32 * 40503)) % 2001) as f32 - 1000.0).collect())
                .collect();
            let views: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
            let k = Aggregator::trimmed(beta, n);
            let mut med = vec![0.0; len];
            let mut trim = vec![0.0; len];
            reduce_sorted_columns(&views, &mut med, ColumnPick::Median);
            reduce_sorted_columns(&views, &mut trim, ColumnPick::Trimmed(k));
            for j in 0..len {
                let mut column: Vec<f32> = inputs.iter().map(|x| x[j]).collect();
                prop_assert_eq!(med[j], median(&mut column.clone()));
                let expected = trimmed_mean(&mut column, k);
                prop_assert!((trim[j] - expected).abs() <= 1e-3 * expected.abs().max(1.0), "{} vs {}", trim[j], expected);
            }
        }

        #[test]
        fn median_is_an_order_statistic(mut xs in prop::collection::vec(-1e6f32..1e6, 1..40)) {
            let m = median(&mut xs.clone());
            xs.sort_by(f32::total_cmp);
            let n = xs.len();
            let expected = if n % 2 == 1 { xs[n / 2] } else { 0.5 * (xs[n / 2 - 1] + xs[n / 2]) };
            prop_assert_eq!(m, expected);
        }

        #[test]
        fn trimmed_mean_lies_within_the_kept_range(mut xs in prop::collection::vec(-1e6f32..1e6, 1..40), beta in 0.0..0.49f64) {
            let k = Aggregator::trimmed(beta, xs.len());
            let t = trimmed_mean(&mut xs.clone(), k);
            xs.sort_by(f32::total_cmp);
            let n = xs.len();
            prop_assert!(t >= xs[k] - 1e-1 && t <= xs[n - 1 - k] + 1e-1, "{} not in [{}, {}]", t, xs[k], xs[n - 1 - k]);
        }
    }
}
