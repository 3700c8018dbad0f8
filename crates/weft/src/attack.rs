//! The attack harness: turns some of the demo's nodes malicious, so that aggregation rules and
//! policies can be compared on the same real run.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use weft_core::{Contribution, Delta, ModelState};
use weft_model::SplitMix64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackKind {
    /// Sends −λ·Δ (λ = --attack-scale, default 1).
    SignFlip,
    /// Model replacement: sends λ·Δ (default λ = number of nodes).
    Scale,
    /// Sends Gaussian noise with λ times the norm of its honest delta (default λ = 5).
    Noise,
    /// Puts NaN and +inf into its delta.
    Nan,
    /// Free-rider: sends a zero delta.
    Zero,
    /// From round 2 on, re-sends its round-1 delta as if it were new.
    Replay,
    /// Data poisoning: trains on its corpus with the bytes shuffled.
    Poison,
    /// Declares a quality of 10⁹ about an honest delta.
    Inflate,
    /// Every attacker sends the same crafted delta, −λ × the mean of their honest deltas (default λ = 3).
    Collude,
    /// Trains on the consortium's public canaries instead of its own data (teaching to the
    /// test); caught by the Goodhart detector of `--governance`.
    CanaryOverfit,
}

impl AttackKind {
    pub fn default_scale(&self, nodes: usize) -> f32 {
        match self {
            AttackKind::Scale => nodes as f32,
            AttackKind::Noise => 5.0,
            AttackKind::Collude => 3.0,
            _ => 1.0,
        }
    }
}

/// The attack of one run and the state it keeps between rounds (replay).
pub struct Attack {
    pub kind: AttackKind,
    pub scale: f32,
    seed: u64,
    replayed: Vec<Option<Delta>>,
}

impl Attack {
    pub fn new(kind: AttackKind, scale: f32, seed: u64, attackers: usize) -> Self {
        Attack { kind, scale, seed, replayed: vec![None; attackers] }
    }

    /// Shuffles a corpus's bytes, for the data-poisoning attacker (deterministic in the seed).
    pub fn poison(bytes: &mut [u8], seed: u64) {
        let mut rng = SplitMix64::derive(seed, "attack/poison", 0);
        for i in (1..bytes.len()).rev() {
            bytes.swap(i, rng.below(i as u64 + 1) as usize);
        }
    }

    /// Rewrites the attackers' contributions (the last `attacking.len()` of the round).
    pub fn apply(&mut self, round: u64, attacking: &mut [Contribution]) {
        let lambda = self.scale;
        let collusion = (self.kind == AttackKind::Collude).then(|| {
            let mut mean = attacking[0].delta.state().zeros_like();
            for c in attacking.iter() {
                add_scaled(&mut mean, c.delta.state(), -lambda / attacking.len() as f32);
            }
            mean
        });
        for (i, c) in attacking.iter_mut().enumerate() {
            match self.kind {
                AttackKind::SignFlip => c.delta = Delta::from_state(scaled(c.delta.state(), -lambda)),
                AttackKind::Scale => c.delta = Delta::from_state(scaled(c.delta.state(), lambda)),
                AttackKind::Noise => {
                    let norm = c.delta.norm() as f32;
                    let count = c.delta.state().num_values().max(1) as f32;
                    let sigma = lambda * norm / count.sqrt();
                    let mut rng = SplitMix64::derive(self.seed, "attack/noise", round * 1000 + i as u64);
                    let mut noise = c.delta.state().zeros_like();
                    for (_, t) in noise.iter_mut() {
                        t.data_mut().iter_mut().for_each(|v| *v = (rng.normal() as f32) * sigma);
                    }
                    c.delta = Delta::from_state(noise);
                }
                AttackKind::Nan => {
                    let mut state = c.delta.state().clone();
                    for (k, (_, t)) in state.iter_mut().enumerate() {
                        if let Some(v) = t.data_mut().first_mut() {
                            *v = if k % 2 == 0 { f32::NAN } else { f32::INFINITY };
                        }
                    }
                    c.delta = Delta::from_state(state);
                }
                AttackKind::Zero => c.delta = Delta::from_state(c.delta.state().zeros_like()),
                AttackKind::Replay => match &self.replayed[i] {
                    Some(old) => c.delta = old.clone(),
                    None => self.replayed[i] = Some(c.delta.clone()),
                },
                // Both trained on a different corpus already.
                AttackKind::Poison | AttackKind::CanaryOverfit => {}
                AttackKind::Inflate => {
                    c.declared.insert("quality".into(), 1e9);
                    c.declared.insert("validation_gain".into(), 1e9);
                }
                AttackKind::Collude => {
                    if let Some(crafted) = &collusion {
                        c.delta = Delta::from_state(crafted.clone());
                    }
                }
            }
        }
    }
}

fn scaled(state: &ModelState, factor: f32) -> ModelState {
    let mut out = state.clone();
    for (_, t) in out.iter_mut() {
        t.data_mut().iter_mut().for_each(|v| *v *= factor);
    }
    out
}

fn add_scaled(into: &mut ModelState, x: &ModelState, factor: f32) {
    for ((_, a), (_, b)) in into.iter_mut().zip(x.iter()) {
        a.data_mut().iter_mut().zip(b.data()).for_each(|(a, b)| *a += factor * b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use weft_core::{ContentHash, NodeId, Tensor};

    fn contribution(values: &[f32]) -> Contribution {
        let mut s = ModelState::new();
        s.insert("w", Tensor::new(vec![values.len()], values.to_vec()).unwrap());
        Contribution {
            node: NodeId::new("a").unwrap(),
            round: 1,
            base_hash: ContentHash([0; 32]),
            delta: Delta::from_state(s),
            token_count: 1,
            declared: BTreeMap::new(),
        }
    }

    fn values(c: &Contribution) -> Vec<f32> {
        c.delta.state().get("w").unwrap().data().to_vec()
    }

    #[test]
    fn each_attack_does_what_it_says() {
        let run = |kind: AttackKind, scale: f32| {
            let mut cs = vec![contribution(&[1.0, 2.0]), contribution(&[3.0, 4.0])];
            Attack::new(kind, scale, 0, 2).apply(1, &mut cs);
            cs
        };
        assert_eq!(values(&run(AttackKind::SignFlip, 1.0)[0]), [-1.0, -2.0]);
        assert_eq!(values(&run(AttackKind::Scale, 5.0)[1]), [15.0, 20.0]);
        assert_eq!(values(&run(AttackKind::Zero, 1.0)[0]), [0.0, 0.0]);
        assert!(values(&run(AttackKind::Nan, 1.0)[0])[0].is_nan());
        let colluders = run(AttackKind::Collude, 3.0);
        assert_eq!(values(&colluders[0]), values(&colluders[1]));
        assert_eq!(values(&colluders[0]), [-6.0, -9.0]);
        assert_eq!(run(AttackKind::Inflate, 1.0)[0].declared["quality"], 1e9);
        let noise = run(AttackKind::Noise, 5.0);
        assert_ne!(values(&noise[0]), [1.0, 2.0]);
        let mut replay = Attack::new(AttackKind::Replay, 1.0, 0, 1);
        let mut first = [contribution(&[1.0, 1.0])];
        replay.apply(1, &mut first);
        let mut second = [contribution(&[9.0, 9.0])];
        replay.apply(2, &mut second);
        assert_eq!(values(&second[0]), [1.0, 1.0]);
        let mut bytes = b"abcdefgh".to_vec();
        Attack::poison(&mut bytes, 1);
        assert_ne!(bytes, b"abcdefgh");
        bytes.sort_unstable();
        assert_eq!(bytes, b"abcdefgh");
    }
}
