//! The per-language check of a round's base (every-language fairness): the search for a step
//! that makes no language's held-out loss rise by more than the tolerance.
//!
//! Why measure rather than predict: deltas that each help their own language at their fair share
//! can hurt another language together. In a nine-language consortium seven Latin-script deltas,
//! each trained only on its own text, each push every byte prediction towards ASCII; summed, they
//! cost Japanese more than its own two deltas win back, although every one alone barely touched
//! it. So every candidate base is measured on the held-out text, and the search moves only on
//! what the measurements say.
//!
//! The search, a pure state machine (the coordinator runs it; `weft ledger verify` runs it again
//! on the recorded losses and must reach the same candidates):
//!
//! 1. The first candidate has each language's *standing* as its priority: `sℓ = (Lℓ / L⁰ℓ)⁴`, its
//!    held-out loss now over its loss when the consortium started — the languages that have come
//!    the least far own the most of the step (a ratio, so the script does not matter). If the
//!    candidate passes, it is published.
//! 2. Otherwise the languages that rose, and that some contribution helps, are *protected*: they
//!    get priority in proportion to how far they rose, `λℓ = sℓ·(1 + α·zℓ)`, `zℓ = riseℓ / max rise`
//!    (0 for the others; a language's share of the step is `λℓ / Σλ`, see [`crate::policy`]). α is
//!    searched for the fairest candidate: an α is too small while the protected languages are
//!    worse off than the others (one rises beyond the tolerance, or their smallest gain is below
//!    the others' smallest), too large otherwise — brackets α = 3, 15, 63 until one is large
//!    enough, then 3 bisections. Of the candidates that passed, the one whose worst language
//!    gained most is published.
//! 3. If none passed, the step is halved at the smallest α found large enough (or at α = 63), down
//!    to 1/16, and the first candidate that passes is published. If none does, the base stays
//!    (`language_regression`).
//!
//! Priorities are plain arithmetic (no transcendental functions), so a replay on any machine
//! reaches the same bits.

use std::collections::{BTreeMap, BTreeSet};

use crate::policy::{Measured, Priorities};
use crate::quality::LossTable;

/// The smallest step the search tries before it gives up.
pub const SMALLEST_SCALE: f64 = 1.0 / 16.0;
/// The brackets of α: the largest multiplies a language's priority by 64.
pub const BRACKETS: [f64; 3] = [3.0, 15.0, 63.0];
/// Bisections of α once a bracket is found.
pub const BISECTIONS: usize = 3;

/// The languages whose held-out loss `candidate` raises by more than `tolerance` (relative) over
/// `base`, worst first (ties: by name), with each relative rise. A language missing from either
/// table, or a non-finite loss, counts as an infinite rise.
pub fn regressions(base: &LossTable, candidate: &LossTable, tolerance: f64) -> Vec<(String, f64)> {
    let mut risen: Vec<(String, f64)> = base
        .iter()
        .filter_map(|(language, &b)| {
            let rise = match candidate.get(language) {
                Some(&c) if b.is_finite() && c.is_finite() && b > 0.0 => (c - b) / b,
                _ => f64::INFINITY,
            };
            (rise > tolerance).then(|| (language.clone(), rise))
        })
        .collect();
    risen.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    risen
}

/// Each language's standing `(L / L⁰)⁴`: its held-out loss now over its loss at the genesis, to
/// the fourth power (1 where either is unusable) — steep enough that the languages furthest behind
/// own clearly more of the step (measured on scripts/fairness.py's four configurations: the worst
/// language's gain over three rounds was best with the fourth power of the exponents 0, 2 and 4
/// tried). Multiplied out
/// rather than raised to a real power: plain arithmetic gives the same bits on every machine.
pub fn standing(base: &LossTable, reference: &LossTable) -> Priorities {
    base.iter()
        .map(|(l, &now)| {
            let ratio = match reference.get(l) {
                Some(&start) if start > 0.0 && start.is_finite() && now.is_finite() && now > 0.0 => now / start,
                _ => 1.0,
            };
            (l.clone(), ratio * ratio * ratio * ratio)
        })
        .collect()
}

/// The languages some of `measured` gains on: raising their priority can move weight to them.
pub fn helped_languages(measured: &[Measured]) -> BTreeSet<String> {
    measured.iter().flat_map(|m| m.gains.iter().filter(|(_, g)| **g > 0.0).map(|(l, _)| l.clone())).collect()
}

/// What the search concludes after judging a candidate.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Build and judge the next candidate ([`LanguageSearch::priorities`],
    /// [`LanguageSearch::scale`]). `risen`: the languages that rose beyond the tolerance in this
    /// one, worst first (empty when it passed and the search looks for a fairer one).
    Next { risen: Vec<(String, f64)> },
    /// Publish the candidate judged `index`-th (from 0): the one that passed with the best worst
    /// language.
    Publish { index: usize },
    /// The smallest step still raised `language` by `rise`: the base stays.
    GiveUp { language: String, rise: f64 },
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    First,
    Bracket(usize),
    Bisect(usize),
    Halve,
}

/// The search's state: which candidate to build next, and how to judge it.
#[derive(Clone, Debug)]
pub struct LanguageSearch {
    tolerance: f64,
    base: LossTable,
    helped: BTreeSet<String>,
    /// Each language's standing `s`: its priority before the search raises any.
    standing: Priorities,
    /// Each language's `z` once the first candidate failed: the languages it protects have z > 0.
    z: BTreeMap<String, f64>,
    phase: Phase,
    alpha: f64,
    /// The largest α known to favour the protected languages too little, the smallest known to
    /// favour them enough.
    lo: f64,
    hi: Option<f64>,
    scale: f64,
    judged: usize,
    /// The passing candidate with the best worst-language gain so far: (index, that gain).
    best: Option<(usize, f64)>,
}

impl LanguageSearch {
    /// A search from a base with held-out losses `base`, for a consortium whose genesis base had
    /// `reference` (the standing's denominator); `helped`: the languages some contribution of
    /// the round gains on.
    pub fn new(tolerance: f64, base: LossTable, reference: &LossTable, helped: BTreeSet<String>) -> Self {
        LanguageSearch {
            tolerance,
            standing: standing(&base, reference),
            base,
            helped,
            z: BTreeMap::new(),
            phase: Phase::First,
            alpha: 0.0,
            lo: 0.0,
            hi: None,
            scale: 1.0,
            judged: 0,
            best: None,
        }
    }

    pub fn tolerance(&self) -> f64 {
        self.tolerance
    }

    /// The passing candidate the search would publish now (its index among those judged).
    pub fn best(&self) -> Option<usize> {
        self.best.map(|(index, _)| index)
    }

    /// The priority multiplier of the next candidate.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The factor the next candidate's step is multiplied by.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The next candidate's language priorities: `sℓ·(1 + α·zℓ)` for every language of the base.
    pub fn priorities(&self) -> Priorities {
        self.standing
            .iter()
            .map(|(l, s)| (l.clone(), s * (1.0 + self.alpha * self.z.get(l).copied().unwrap_or(0.0))))
            .collect()
    }

    /// Judges the candidate just built (with [`priorities`](Self::priorities) and
    /// [`scale`](Self::scale)) from its measured held-out losses, and moves to the next.
    pub fn judge(&mut self, candidate: &LossTable) -> Verdict {
        let index = self.judged;
        self.judged += 1;
        let risen = regressions(&self.base, candidate, self.tolerance);
        if risen.is_empty() {
            let worst_gain = self
                .base
                .iter()
                .map(|(l, b)| candidate.get(l).map_or(f64::NEG_INFINITY, |c| (b - c) / b))
                .fold(f64::INFINITY, f64::min);
            if self.best.is_none_or(|(_, best)| worst_gain > best) {
                self.best = Some((index, worst_gain));
            }
            if matches!(self.phase, Phase::First | Phase::Halve) {
                return Verdict::Publish { index };
            }
        }
        match self.phase {
            Phase::First => {
                let helpable: Vec<&(String, f64)> = risen.iter().filter(|(l, _)| self.helped.contains(l)).collect();
                let top = helpable.iter().map(|(_, r)| *r).filter(|r| r.is_finite()).fold(0.0, f64::max);
                if top <= 0.0 {
                    return self.halve(&risen);
                }
                self.z = helpable.iter().map(|(l, r)| (l.clone(), if r.is_finite() { r / top } else { 1.0 })).collect();
                self.phase = Phase::Bracket(0);
                self.alpha = BRACKETS[0];
            }
            Phase::Bracket(k) => {
                if self.protected_worse_off(candidate) {
                    self.lo = self.alpha;
                    if k + 1 < BRACKETS.len() {
                        self.phase = Phase::Bracket(k + 1);
                        self.alpha = BRACKETS[k + 1];
                    } else {
                        return self.settle(&risen);
                    }
                } else {
                    self.hi = Some(self.alpha);
                    self.phase = Phase::Bisect(0);
                    self.alpha = (self.lo + self.alpha) / 2.0;
                }
            }
            Phase::Bisect(n) => {
                if self.protected_worse_off(candidate) {
                    self.lo = self.alpha;
                } else {
                    self.hi = Some(self.alpha);
                }
                if n + 1 < BISECTIONS {
                    self.phase = Phase::Bisect(n + 1);
                    self.alpha = (self.lo + self.hi.unwrap_or(self.alpha)) / 2.0;
                } else {
                    return self.settle(&risen);
                }
            }
            Phase::Halve => return self.halve(&risen),
        }
        Verdict::Next { risen }
    }

    /// Whether the languages the search protects are worse off than the others in `candidate`:
    /// then α is too small. Worse off: one of them rose beyond the tolerance, or (when none did)
    /// the smallest gain among them is below the smallest gain among the others.
    fn protected_worse_off(&self, candidate: &LossTable) -> bool {
        let gain = |l: &String| {
            let b = self.base[l];
            candidate.get(l).filter(|c| c.is_finite()).map_or(f64::NEG_INFINITY, |c| (b - c) / b)
        };
        let mut protected = f64::INFINITY;
        let mut others = f64::INFINITY;
        for language in self.base.keys() {
            if self.z.get(language).is_some_and(|z| *z > 0.0) {
                protected = protected.min(gain(language));
            } else {
                others = others.min(gain(language));
            }
        }
        protected < -self.tolerance || (protected < others && others >= -self.tolerance)
    }

    /// The priority search is over: publish its best passing candidate, else halve the step at
    /// the smallest α found to favour the protected languages enough (or the largest tried).
    fn settle(&mut self, risen: &[(String, f64)]) -> Verdict {
        if let Some((index, _)) = self.best {
            return Verdict::Publish { index };
        }
        self.alpha = self.hi.unwrap_or(self.alpha);
        self.halve(risen)
    }

    fn halve(&mut self, risen: &[(String, f64)]) -> Verdict {
        self.phase = Phase::Halve;
        if self.scale / 2.0 >= SMALLEST_SCALE {
            self.scale /= 2.0;
            Verdict::Next { risen: risen.to_vec() }
        } else {
            let (language, rise) = risen.first().cloned().unwrap_or_default();
            Verdict::GiveUp { language, rise }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pairs: &[(&str, f64)]) -> LossTable {
        pairs.iter().map(|(l, v)| (l.to_string(), *v)).collect()
    }

    fn helped(languages: &[&str]) -> BTreeSet<String> {
        languages.iter().map(|l| l.to_string()).collect()
    }

    #[test]
    fn regressions_are_relative_and_worst_first() {
        let base = table(&[("de", 2.0), ("ja", 4.0), ("zh", 4.0)]);
        let cand = table(&[("de", 2.009), ("ja", 4.4), ("zh", f64::NAN)]);
        let risen = regressions(&base, &cand, 0.005);
        assert_eq!(risen.iter().map(|(l, _)| l.as_str()).collect::<Vec<_>>(), ["zh", "ja"]);
        assert!((risen[1].1 - 0.1).abs() < 1e-12);
        assert!(regressions(&base, &base, 0.0).is_empty());
    }

    /// A toy world: a language's loss rises when its priority is too small (below `need`), the
    /// other languages' when it is too large (above `limit`).
    fn world(need: f64, limit: f64) -> impl Fn(&Priorities, f64) -> LossTable {
        move |p: &Priorities, scale: f64| {
            let ja = p["ja"];
            let ja_loss = if ja < need { 4.0 * (1.0 + 0.2 * scale) } else { 3.9 };
            let de_loss = if ja > limit { 2.0 * (1.0 + 0.1 * scale) } else { 1.9 };
            table(&[("de", de_loss), ("ja", ja_loss)])
        }
    }

    fn run(search: &mut LanguageSearch, world: &dyn Fn(&Priorities, f64) -> LossTable) -> (Verdict, usize) {
        for tried in 1..=20 {
            let verdict = search.judge(&world(&search.priorities(), search.scale()));
            if !matches!(verdict, Verdict::Next { .. }) {
                return (verdict, tried);
            }
        }
        panic!("the search does not end");
    }

    #[test]
    fn the_search_finds_a_priority_between_too_little_and_too_much() {
        let base = table(&[("de", 2.0), ("ja", 4.0)]);
        let mut search = LanguageSearch::new(0.005, base.clone(), &base, helped(&["de", "ja"]));
        let (verdict, tried) = run(&mut search, &world(6.0, 12.0));
        assert!(matches!(verdict, Verdict::Publish { index } if index > 0 && index < tried), "{verdict:?}");
        assert_eq!(search.scale(), 1.0);
        assert!(tried <= 1 + BRACKETS.len() + BISECTIONS, "{tried}");
    }

    #[test]
    fn without_a_fitting_priority_the_step_is_halved_and_then_given_up() {
        // Nothing between too little and too much: every priority fails, at every step.
        let base = table(&[("de", 2.0), ("ja", 4.0)]);
        let mut search = LanguageSearch::new(0.005, base.clone(), &base, helped(&["de", "ja"]));
        let (verdict, _) = run(&mut search, &world(8.0, 7.0));
        assert!(matches!(verdict, Verdict::GiveUp { .. }), "{verdict:?}");
        assert_eq!(search.scale(), SMALLEST_SCALE);
        // A language nobody helps gets no priority: the step is halved at once.
        let mut search = LanguageSearch::new(0.005, base.clone(), &base, helped(&["de"]));
        let verdict = search.judge(&table(&[("de", 1.9), ("ja", 4.4)]));
        assert!(matches!(verdict, Verdict::Next { .. }));
        assert_eq!((search.alpha(), search.scale()), (0.0, 0.5));
    }

    #[test]
    fn the_languages_that_came_least_far_start_with_the_most_priority() {
        let genesis = table(&[("de", 5.5), ("zh", 5.5)]);
        let now = table(&[("de", 2.75), ("zh", 4.125)]);
        let search = LanguageSearch::new(0.005, now, &genesis, helped(&["de", "zh"]));
        let p = search.priorities();
        assert_eq!(p["de"], 0.0625);
        assert_eq!(p["zh"], 0.31640625);
    }

    #[test]
    fn priorities_are_proportional_to_the_first_rise() {
        let base = table(&[("de", 2.0), ("ja", 4.0), ("zh", 4.0)]);
        let mut search = LanguageSearch::new(0.005, base.clone(), &base, helped(&["de", "ja", "zh"]));
        search.judge(&table(&[("de", 1.9), ("ja", 6.0), ("zh", 5.0)]));
        let p = search.priorities();
        assert_eq!(p["de"], 1.0);
        assert_eq!(p["ja"], 1.0 + BRACKETS[0]);
        assert_eq!(p["zh"], 1.0 + BRACKETS[0] * 0.5);
    }
}
