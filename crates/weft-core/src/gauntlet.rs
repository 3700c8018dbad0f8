//! Champion–challenger adoption: a round's aggregate (the challenger) replaces the published
//! base (the champion) only if it is significantly better on the consortium's held-out items and
//! no language is, with confidence, worse by more than a set amount.
//!
//! The test is paired: both models are scored on the same items in the same order, and each
//! language's gain is the relative drop of its mean per-item loss, `(Σ champion − Σ challenger)
//! / Σ champion`. Its distribution comes from a bootstrap over the items (resampled pairs, so the
//! items' own difficulty cancels) drawn from a seed the ledger records; a verifier recomputes
//! every number bit for bit.
//!
//! * Improvement: per language, the one-sided bootstrap p-value of "gain ≤ margin"; the p-values
//!   are Holm-corrected across languages (family-wise error α), and at least one language must be
//!   significantly better.
//! * Non-inferiority: per language, the α-quantile of the bootstrap gains (a one-sided lower
//!   confidence bound) must be at least `−non_inferiority`. Every language must pass (an
//!   intersection–union test, which needs no correction).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Per-item losses by language: the same items, in the same order, for every model scored.
pub type ItemLosses = BTreeMap<String, Vec<f64>>;

/// The consortium's promotion rule (`[gauntlet]`; a key left out takes its default).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GauntletRules {
    /// Family-wise error rate of the improvement test, and the level of each language's
    /// non-inferiority bound.
    pub alpha: f64,
    /// The relative gain a language must show significantly (0: any gain at all).
    pub margin: f64,
    /// The largest relative regression of any language's mean loss that the lower confidence
    /// bound may show.
    pub non_inferiority: f64,
    /// Bootstrap resamples per language.
    pub resamples: u32,
}

impl Default for GauntletRules {
    /// Measured on the demo (README, *Upgrades through a gauntlet*): a small consortium's honest
    /// rounds pass.
    fn default() -> Self {
        GauntletRules { alpha: 0.05, margin: 0.001, non_inferiority: 0.01, resamples: 2000 }
    }
}

/// The circuit breaker (`[breaker]`): after a base is published, the held-out loss of every
/// language is watched for `watch_rounds` rounds (the publishing round included) against the
/// base before it; a rise beyond `threshold` (relative) in any language rolls the consortium back
/// to that base. It catches what each round's own checks allow: several steps that each stay
/// within the non-inferiority bound but add up.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerRules {
    pub watch_rounds: u64,
    pub threshold: f64,
}

impl Default for BreakerRules {
    fn default() -> Self {
        BreakerRules { watch_rounds: 3, threshold: 0.02 }
    }
}

impl BreakerRules {
    pub fn validate(&self) -> Result<(), GauntletError> {
        if !(1..=1000).contains(&self.watch_rounds) {
            return Err(GauntletError::Rule {
                key: "breaker.watch_rounds",
                detail: format!("must be in 1..=1000, got {}", self.watch_rounds),
            });
        }
        if !(self.threshold > 0.0 && self.threshold < 1.0) {
            return Err(GauntletError::Rule {
                key: "breaker.threshold",
                detail: format!("must be in (0, 1), got {}", self.threshold),
            });
        }
        Ok(())
    }
}

/// A rule out of range, named by its key.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum GauntletError {
    #[error("{key}: {detail}")]
    Rule { key: &'static str, detail: String },
    #[error("the champion is scored on languages {champion:?}, the challenger on {challenger:?}")]
    Languages { champion: Vec<String>, challenger: Vec<String> },
    #[error("language {language}: the champion is scored on {champion} items, the challenger on {challenger}")]
    Items { language: String, champion: usize, challenger: usize },
    #[error("language {language}: {items} items; a paired test needs at least {MIN_ITEMS}")]
    TooFewItems { language: String, items: usize },
    #[error("language {language}, item {item}: loss {loss} is not a finite non-negative number")]
    Loss { language: String, item: usize, loss: f64 },
    #[error("no language to test")]
    NoLanguage,
}

/// Fewer items than this say nothing a bootstrap can use.
pub const MIN_ITEMS: usize = 5;

impl GauntletRules {
    pub fn validate(&self) -> Result<(), GauntletError> {
        let rule = |key, detail: String| Err(GauntletError::Rule { key, detail });
        if !(self.alpha > 0.0 && self.alpha <= 0.5) {
            return rule("gauntlet.alpha", format!("must be in (0, 0.5], got {}", self.alpha));
        }
        if !(0.0..1.0).contains(&self.margin) {
            return rule("gauntlet.margin", format!("must be in [0, 1), got {}", self.margin));
        }
        if !(0.0..1.0).contains(&self.non_inferiority) {
            return rule("gauntlet.non_inferiority", format!("must be in [0, 1), got {}", self.non_inferiority));
        }
        if !(100..=100_000).contains(&self.resamples) {
            return rule("gauntlet.resamples", format!("must be in 100..=100000, got {}", self.resamples));
        }
        Ok(())
    }
}

/// One language's paired comparison.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LanguageTest {
    pub items: u64,
    /// Mean per-item loss of the champion and of the challenger.
    pub champion_loss: f64,
    pub challenger_loss: f64,
    /// `(champion − challenger) / champion` of the means: positive when the challenger is better.
    pub gain: f64,
    /// The α- and (1−α)-quantiles of the bootstrap gains.
    pub lower: f64,
    pub upper: f64,
    /// One-sided p-value of "gain ≤ margin", and after Holm's correction across languages.
    pub p_value: f64,
    pub p_holm: f64,
    pub improved: bool,
    pub non_inferior: bool,
}

/// What the gauntlet concluded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum GauntletOutcome {
    /// Every language non-inferior, these significantly better.
    Promoted { improved: Vec<String> },
    /// No language significantly better than the champion.
    NotBetter,
    /// These languages may be worse than the non-inferiority bound allows (their lower bound).
    Regressed { languages: BTreeMap<String, f64> },
}

impl GauntletOutcome {
    pub fn promoted(&self) -> bool {
        matches!(self, GauntletOutcome::Promoted { .. })
    }

    /// A stable code for tables and refusals.
    pub fn code(&self) -> &'static str {
        match self {
            GauntletOutcome::Promoted { .. } => "promoted",
            GauntletOutcome::NotBetter => "not_better",
            GauntletOutcome::Regressed { .. } => "regressed",
        }
    }
}

impl std::fmt::Display for GauntletOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GauntletOutcome::Promoted { improved } => {
                write!(f, "promoted: significantly better in {}", improved.join(", "))
            }
            GauntletOutcome::NotBetter => write!(f, "refused: no language significantly better than the champion"),
            GauntletOutcome::Regressed { languages } => {
                let worst: Vec<String> =
                    languages.iter().map(|(l, lower)| format!("{l} (gain ≥ {:.2}%)", lower * 100.0)).collect();
                write!(f, "refused: may regress beyond the non-inferiority bound in {}", worst.join(", "))
            }
        }
    }
}

/// The gauntlet's verdict on one challenger.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GauntletVerdict {
    pub tests: BTreeMap<String, LanguageTest>,
    pub outcome: GauntletOutcome,
}

/// Judges `challenger` against `champion` (per-item losses on the same items) under `rules`,
/// resampling from `seed`. Deterministic: the same inputs give the same verdict bit for bit.
pub fn judge(
    rules: &GauntletRules,
    champion: &ItemLosses,
    challenger: &ItemLosses,
    seed: u64,
) -> Result<GauntletVerdict, GauntletError> {
    rules.validate()?;
    if champion.keys().ne(challenger.keys()) {
        return Err(GauntletError::Languages {
            champion: champion.keys().cloned().collect(),
            challenger: challenger.keys().cloned().collect(),
        });
    }
    if champion.is_empty() {
        return Err(GauntletError::NoLanguage);
    }
    let mut tests = BTreeMap::new();
    for (language, before) in champion {
        let after = &challenger[language];
        check_items(language, before, after)?;
        tests.insert(language.clone(), paired_test(rules, language, before, after, seed));
    }
    holm(&mut tests, rules.alpha);
    for test in tests.values_mut() {
        test.non_inferior = test.lower >= -rules.non_inferiority;
    }
    let regressed: BTreeMap<String, f64> =
        tests.iter().filter(|(_, t)| !t.non_inferior).map(|(l, t)| (l.clone(), t.lower)).collect();
    let improved: Vec<String> = tests.iter().filter(|(_, t)| t.improved).map(|(l, _)| l.clone()).collect();
    let outcome = if !regressed.is_empty() {
        GauntletOutcome::Regressed { languages: regressed }
    } else if improved.is_empty() {
        GauntletOutcome::NotBetter
    } else {
        GauntletOutcome::Promoted { improved }
    };
    Ok(GauntletVerdict { tests, outcome })
}

fn check_items(language: &str, before: &[f64], after: &[f64]) -> Result<(), GauntletError> {
    if before.len() != after.len() {
        return Err(GauntletError::Items {
            language: language.to_owned(),
            champion: before.len(),
            challenger: after.len(),
        });
    }
    if before.len() < MIN_ITEMS {
        return Err(GauntletError::TooFewItems { language: language.to_owned(), items: before.len() });
    }
    for (item, &loss) in before.iter().chain(after).enumerate() {
        if !(loss.is_finite() && loss >= 0.0) {
            let item = item % before.len();
            return Err(GauntletError::Loss { language: language.to_owned(), item, loss });
        }
    }
    Ok(())
}

/// The relative gain of the means, with its bootstrap quantiles and p-value (Holm's correction
/// and the verdicts are filled in by the caller).
fn paired_test(rules: &GauntletRules, language: &str, before: &[f64], after: &[f64], seed: u64) -> LanguageTest {
    let n = before.len();
    let gain_of = |sum_before: f64, sum_after: f64| {
        if sum_before > 0.0 {
            (sum_before - sum_after) / sum_before
        } else {
            0.0
        }
    };
    let (sum_before, sum_after) = (before.iter().sum::<f64>(), after.iter().sum::<f64>());
    let mut rng = SplitMix64::new(language_seed(seed, language));
    let resamples = rules.resamples as usize;
    let mut gains = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        let (mut b, mut a) = (0.0, 0.0);
        for _ in 0..n {
            let i = rng.below(n as u64) as usize;
            b += before[i];
            a += after[i];
        }
        gains.push(gain_of(b, a));
    }
    gains.sort_by(f64::total_cmp);
    let at_or_below_margin = gains.iter().take_while(|&&g| g <= rules.margin).count();
    let low_index = ((rules.alpha * resamples as f64).floor() as usize).min(resamples - 1);
    let high_index = (((1.0 - rules.alpha) * resamples as f64).ceil() as usize).clamp(1, resamples) - 1;
    LanguageTest {
        items: n as u64,
        champion_loss: sum_before / n as f64,
        challenger_loss: sum_after / n as f64,
        gain: gain_of(sum_before, sum_after),
        lower: gains[low_index],
        upper: gains[high_index],
        p_value: (1 + at_or_below_margin) as f64 / (resamples + 1) as f64,
        p_holm: 1.0,
        improved: false,
        non_inferior: false,
    }
}

/// Holm's step-down correction: the i-th smallest of m p-values (ties in language order) is
/// adjusted to `max_{j ≤ i} min(1, (m − j) · p_j)`; a language is improved when that is ≤ α.
fn holm(tests: &mut BTreeMap<String, LanguageTest>, alpha: f64) {
    let mut order: Vec<(f64, String)> = tests.iter().map(|(l, t)| (t.p_value, l.clone())).collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    let m = order.len();
    let mut running = 0.0_f64;
    for (j, (p, language)) in order.into_iter().enumerate() {
        running = running.max(((m - j) as f64 * p).min(1.0));
        if let Some(test) = tests.get_mut(&language) {
            test.p_holm = running;
            test.improved = running <= alpha;
        }
    }
}

/// Each language resamples from its own stream, so that one language's result does not depend
/// on which others are tested.
fn language_seed(seed: u64, language: &str) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"weft-gauntlet-language/1\n");
    hasher.update(&seed.to_le_bytes());
    hasher.update(language.as_bytes());
    let bytes = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// SplitMix64: small, fast and fully specified, so a verifier in any language can redraw.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias for n ≪ 2^64 is negligible and the
    /// same for everyone).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn losses(values: &[(&str, Vec<f64>)]) -> ItemLosses {
        values.iter().map(|(l, v)| (l.to_string(), v.clone())).collect()
    }

    /// Items of varied difficulty, as real documents are.
    fn items(n: usize, offset: f64) -> Vec<f64> {
        (0..n).map(|i| 2.0 + offset + ((i * 37) % 11) as f64 * 0.1).collect()
    }

    #[test]
    fn a_challenger_better_everywhere_is_promoted() {
        let champion = losses(&[("de", items(30, 0.0)), ("ja", items(30, 0.5))]);
        let challenger: ItemLosses =
            champion.iter().map(|(l, v)| (l.clone(), v.iter().map(|x| x * 0.95).collect())).collect();
        let verdict = judge(&GauntletRules::default(), &champion, &challenger, 7).unwrap();
        assert_eq!(verdict.outcome, GauntletOutcome::Promoted { improved: vec!["de".into(), "ja".into()] });
        let de = &verdict.tests["de"];
        assert!((de.gain - 0.05).abs() < 1e-12);
        assert!(de.lower <= de.gain && de.gain <= de.upper);
        assert_eq!(de.p_value, 1.0 / 2001.0);
    }

    #[test]
    fn the_champion_against_itself_is_not_better() {
        let champion = losses(&[("en", items(20, 0.0))]);
        let verdict = judge(&GauntletRules::default(), &champion, &champion, 1).unwrap();
        assert_eq!(verdict.outcome, GauntletOutcome::NotBetter);
        assert_eq!(verdict.tests["en"].p_value, 1.0);
    }

    #[test]
    fn a_language_that_may_regress_refuses_the_challenger_even_if_others_gain() {
        let champion = losses(&[("de", items(30, 0.0)), ("zh-cn", items(30, 0.0))]);
        let mut challenger = champion.clone();
        challenger.insert("de".into(), champion["de"].iter().map(|x| x * 0.8).collect());
        challenger.insert("zh-cn".into(), champion["zh-cn"].iter().map(|x| x * 1.05).collect());
        let verdict = judge(&GauntletRules::default(), &champion, &challenger, 3).unwrap();
        let GauntletOutcome::Regressed { languages } = &verdict.outcome else { panic!("{:?}", verdict.outcome) };
        assert_eq!(languages.keys().collect::<Vec<_>>(), vec!["zh-cn"]);
        assert!(verdict.tests["de"].improved);
    }

    #[test]
    fn a_gain_smaller_than_the_margin_is_not_enough() {
        let champion = losses(&[("en", items(40, 0.0))]);
        let challenger = losses(&[("en", champion["en"].iter().map(|x| x * 0.99).collect())]);
        let strict = GauntletRules { margin: 0.02, ..GauntletRules::default() };
        assert_eq!(judge(&strict, &champion, &challenger, 5).unwrap().outcome, GauntletOutcome::NotBetter);
        assert!(judge(&GauntletRules::default(), &champion, &challenger, 5).unwrap().outcome.promoted());
    }

    #[test]
    fn mismatched_or_bad_inputs_are_refused_by_name() {
        let rules = GauntletRules::default();
        let a = losses(&[("en", items(10, 0.0))]);
        let b = losses(&[("de", items(10, 0.0))]);
        assert!(matches!(judge(&rules, &a, &b, 0), Err(GauntletError::Languages { .. })));
        let short = losses(&[("en", items(9, 0.0))]);
        assert!(matches!(judge(&rules, &a, &short, 0), Err(GauntletError::Items { .. })));
        let few = losses(&[("en", items(3, 0.0))]);
        assert!(matches!(judge(&rules, &few, &few, 0), Err(GauntletError::TooFewItems { items: 3, .. })));
        let mut nan = a.clone();
        if let Some(v) = nan.get_mut("en") {
            v[4] = f64::NAN;
        }
        assert!(matches!(judge(&rules, &a, &nan, 0), Err(GauntletError::Loss { item: 4, .. })));
        for bad in [
            GauntletRules { alpha: 0.0, ..rules },
            GauntletRules { alpha: 0.7, ..rules },
            GauntletRules { margin: -0.1, ..rules },
            GauntletRules { non_inferiority: 1.0, ..rules },
            GauntletRules { resamples: 10, ..rules },
        ] {
            assert!(matches!(judge(&bad, &a, &a, 0), Err(GauntletError::Rule { .. })), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn the_verdict_is_a_function_of_its_inputs_and_holm_never_lowers_a_p_value(
            seed in any::<u64>(),
            shifts in proptest::collection::vec(-0.1f64..0.1, 1..5),
            n in 5usize..40,
        ) {
            let rules = GauntletRules { resamples: 200, ..GauntletRules::default() };
            let languages = ["de", "en", "ja", "zh-cn", "id"];
            let champion: ItemLosses =
                shifts.iter().enumerate().map(|(k, _)| (languages[k].to_string(), items(n, k as f64))).collect();
            let challenger: ItemLosses = shifts
                .iter()
                .enumerate()
                .map(|(k, s)| {
                    let l = languages[k].to_string();
                    let v = champion[&l].iter().enumerate().map(|(i, x)| x * (1.0 - s) + (i % 3) as f64 * 0.01).collect();
                    (l, v)
                })
                .collect();
            let first = judge(&rules, &champion, &challenger, seed).unwrap();
            let again = judge(&rules, &champion, &challenger, seed).unwrap();
            prop_assert_eq!(&first, &again);
            let mut last_holm = 0.0;
            let mut by_p: Vec<&LanguageTest> = first.tests.values().collect();
            by_p.sort_by(|a, b| a.p_value.total_cmp(&b.p_value));
            for t in by_p {
                prop_assert!(t.p_value > 0.0 && t.p_value <= 1.0);
                prop_assert!(t.p_holm >= t.p_value && t.p_holm <= 1.0);
                prop_assert!(t.p_holm >= last_holm);
                last_holm = t.p_holm;
                prop_assert!(t.lower <= t.upper);
            }
            // One language's test does not depend on which others are tested.
            let (one, _) = first.tests.iter().next().unwrap();
            let alone = judge(
                &rules,
                &losses(&[(one, champion[one].clone())]),
                &losses(&[(one, challenger[one].clone())]),
                seed,
            )
            .unwrap();
            prop_assert_eq!(alone.tests[one].lower, first.tests[one].lower);
            prop_assert_eq!(alone.tests[one].p_value, first.tests[one].p_value);
            // Promotion needs every language non-inferior and one improved.
            let all_ok = first.tests.values().all(|t| t.non_inferior);
            let any_better = first.tests.values().any(|t| t.improved);
            prop_assert_eq!(first.outcome.promoted(), all_ok && any_better);
        }
    }
}
