//! Secure aggregation inside a community (the SecAgg protocol of Bonawitz et al. 2017, as
//! SecAgg+ runs it on a complete graph): the collector learns the sum of the members' updates
//! and nothing else about any one of them, and the sum survives members who drop out after
//! sharing their keys, as long as `threshold` members stay.
//!
//! Arithmetic is on wrapping `u32` (modulus 2^32), never f32: an update is clipped to
//! `[-range, range]` per value and encoded as `round(x · scale)` in two's complement, with
//! `scale = ⌊(2^31 − 1) / (members · range)⌋`, so that the sum of every member's values cannot
//! wrap (see [`Quantizer`]).
//!
//! Keys: each member holds two x25519 key pairs (one agrees share-encryption keys, one agrees
//! mask keys) and a 32-byte self-mask seed. A pairwise mask key is HKDF-SHA256 of the x25519
//! secret (salt: the round's context; info names the use), and its mask is the ChaCha20
//! keystream keyed by all 32 bytes of it — not a seed folded to 32 bits and expanded with
//! MT19937, as Flower's SecAgg+ does (its issue #7522). The self-mask seed and the mask key's
//! secret are Shamir-shared (over GF(2^8), byte by byte) among the members, encrypted to each
//! with ChaCha20 and a BLAKE3 MAC; for each member the collector asks survivors for exactly one
//! of the two: the self-mask seed of a member whose masked update arrived, the mask secret of
//! one whose did not.

use std::collections::{BTreeMap, BTreeSet};

use chacha20::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use x25519_dalek::{PublicKey, StaticSecret};

/// A member's index in its community.
pub type MemberIndex = u32;

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SecAggError {
    #[error("a community needs at least 3 members, got {0}")]
    TooSmall(usize),
    #[error("threshold {threshold} must be between 2 and the community's {members} members")]
    Threshold { threshold: usize, members: usize },
    #[error("clipping range must be a positive number, got {0}")]
    Range(f32),
    #[error("only {got} members {stage}, the threshold is {threshold}: the community fails")]
    BelowThreshold { stage: &'static str, got: usize, threshold: usize },
    #[error("member {0} is not in this community")]
    UnknownMember(MemberIndex),
    #[error("member {member}'s masked update has {got} values, the community's updates have {expected}")]
    Length { member: MemberIndex, got: usize, expected: usize },
    #[error("the share from member {from} to member {to} does not authenticate")]
    Forged { from: MemberIndex, to: MemberIndex },
    #[error("shares of member {0}'s secret do not agree")]
    Shares(MemberIndex),
    #[error("member {0} already sent its masked update")]
    Repeated(MemberIndex),
    #[error("a member refuses to reveal both secrets of member {0}")]
    BothSecrets(MemberIndex),
    #[error("a second partition of round {round} was asked for: two partitions would let the coordinator solve for single updates")]
    SecondPartition { round: u64 },
}

/// Fixed point on `u32` modulo 2^32.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quantizer {
    range: f32,
    scale: f64,
}

impl Quantizer {
    /// Values are clipped to `[-range, range]`; `members` such values sum without wrapping.
    pub fn new(range: f32, members: usize) -> Result<Self, SecAggError> {
        if !(range.is_finite() && range > 0.0) {
            return Err(SecAggError::Range(range));
        }
        let scale = (f64::from(i32::MAX) / (members.max(1) as f64 * f64::from(range))).floor();
        Ok(Quantizer { range, scale })
    }

    pub fn range(&self) -> f32 {
        self.range
    }

    /// The value one unit of the encoding stands for.
    pub fn resolution(&self) -> f64 {
        1.0 / self.scale
    }

    pub fn encode(&self, x: f32) -> u32 {
        // NaN is clipped to 0: a non-finite update must not poison the community's sum.
        let clipped = if x.is_nan() { 0.0 } else { x.clamp(-self.range, self.range) };
        (f64::from(clipped) * self.scale).round() as i64 as i32 as u32
    }

    /// A sum of encoded values back to f32.
    pub fn decode(&self, sum: u32) -> f32 {
        (f64::from(sum as i32) / self.scale) as f32
    }
}

/// What a member publishes through the collector: its two public keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Advert {
    pub member: MemberIndex,
    pub cipher_key: [u8; 32],
    pub mask_key: [u8; 32],
}

/// Shares from one member to another, encrypted for the recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedShares {
    pub from: MemberIndex,
    pub to: MemberIndex,
    pub ciphertext: Vec<u8>,
    pub tag: [u8; 32],
}

/// A member's masked update: uniformly random to anyone without the masks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaskedUpdate {
    pub member: MemberIndex,
    pub words: Vec<u32>,
}

/// What a survivor reveals to unmask the sum: per member, a share of exactly one secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reveal {
    pub from: MemberIndex,
    /// Shares of the self-mask seeds of the members whose masked update arrived.
    pub self_seeds: BTreeMap<MemberIndex, Share>,
    /// Shares of the mask secrets of the members whose masked update did not.
    pub mask_secrets: BTreeMap<MemberIndex, Share>,
}

/// One Shamir share of a 32-byte secret: the polynomial's value at `x` (1..=255), byte by byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    pub x: u8,
    pub y: [u8; 32],
}

/// The round and community every key derivation is bound to (the HKDF salt).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Context(Vec<u8>);

impl Context {
    pub fn new(round: u64, community: u32) -> Self {
        let mut bytes = b"weft secagg v1".to_vec();
        bytes.extend_from_slice(&round.to_le_bytes());
        bytes.extend_from_slice(&community.to_le_bytes());
        Context(bytes)
    }
}

fn hkdf(context: &Context, secret: &[u8], info: &str) -> [u8; 32] {
    let mut key = [0u8; 32];
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(&context.0), secret);
    // 32 bytes is far below HKDF-SHA256's limit of 255 · 32.
    if hk.expand(info.as_bytes(), &mut key).is_err() {
        unreachable!("32 bytes is a valid HKDF-SHA256 output length");
    }
    key
}

/// The mask stream: the ChaCha20 keystream keyed by all 32 bytes of `key`, as u32 words.
pub fn mask_stream(key: &[u8; 32], words: usize) -> Vec<u32> {
    let mut rng = ChaCha20Rng::from_seed(*key);
    (0..words).map(|_| rng.next_u32()).collect()
}

fn add_stream(into: &mut [u32], key: &[u8; 32], negate: bool) {
    let mut rng = ChaCha20Rng::from_seed(*key);
    for w in into.iter_mut() {
        let m = rng.next_u32();
        *w = if negate { w.wrapping_sub(m) } else { w.wrapping_add(m) };
    }
}

/// GF(2^8) with the AES polynomial x^8 + x^4 + x^3 + x + 1.
mod gf256 {
    pub fn mul(mut a: u8, mut b: u8) -> u8 {
        let mut p = 0u8;
        while b != 0 {
            if b & 1 != 0 {
                p ^= a;
            }
            let carry = a & 0x80 != 0;
            a <<= 1;
            if carry {
                a ^= 0x1b;
            }
            b >>= 1;
        }
        p
    }

    pub fn inv(a: u8) -> u8 {
        // a^254 = a^-1 in GF(2^8) (a ≠ 0).
        let mut result = 1u8;
        let mut base = a;
        let mut e = 254u8;
        while e != 0 {
            if e & 1 != 0 {
                result = mul(result, base);
            }
            base = mul(base, base);
            e >>= 1;
        }
        result
    }
}

/// Shamir's `threshold`-of-`n` split of a 32-byte secret, each byte its own polynomial.
pub fn shamir_split(secret: &[u8; 32], threshold: usize, xs: &[u8], rng: &mut ChaCha20Rng) -> Vec<Share> {
    let degree = threshold.saturating_sub(1);
    let coefficients: Vec<[u8; 32]> = (0..degree)
        .map(|_| {
            let mut c = [0u8; 32];
            rng.fill_bytes(&mut c);
            c
        })
        .collect();
    xs.iter()
        .map(|&x| {
            let mut y = *secret;
            let mut power = 1u8;
            for c in &coefficients {
                power = gf256::mul(power, x);
                for (y, &c) in y.iter_mut().zip(c) {
                    *y ^= gf256::mul(c, power);
                }
            }
            Share { x, y }
        })
        .collect()
}

/// The secret at 0 by Lagrange interpolation of `shares` (distinct, non-zero x).
pub fn shamir_combine(shares: &[Share]) -> Option<[u8; 32]> {
    let xs: BTreeSet<u8> = shares.iter().map(|s| s.x).collect();
    if shares.is_empty() || xs.len() != shares.len() || xs.contains(&0) {
        return None;
    }
    let mut secret = [0u8; 32];
    for (i, share) in shares.iter().enumerate() {
        // l_i(0) = Π_{j≠i} x_j / (x_j − x_i); subtraction is xor.
        let mut numerator = 1u8;
        let mut denominator = 1u8;
        for (j, other) in shares.iter().enumerate() {
            if i != j {
                numerator = gf256::mul(numerator, other.x);
                denominator = gf256::mul(denominator, other.x ^ share.x);
            }
        }
        let weight = gf256::mul(numerator, gf256::inv(denominator));
        for (s, &y) in secret.iter_mut().zip(&share.y) {
            *s ^= gf256::mul(y, weight);
        }
    }
    Some(secret)
}

/// The community's parameters, the same for every member and the collector.
#[derive(Clone, Debug, PartialEq)]
pub struct Community {
    pub context: Context,
    pub members: usize,
    pub threshold: usize,
    pub quantizer: Quantizer,
    /// Values per update.
    pub length: usize,
}

impl Community {
    pub fn new(
        round: u64,
        index: u32,
        members: usize,
        threshold: usize,
        range: f32,
        length: usize,
    ) -> Result<Self, SecAggError> {
        if members < 3 {
            return Err(SecAggError::TooSmall(members));
        }
        if !(2..=members).contains(&threshold) {
            return Err(SecAggError::Threshold { threshold, members });
        }
        Ok(Community {
            context: Context::new(round, index),
            members,
            threshold,
            quantizer: Quantizer::new(range, members)?,
            length,
        })
    }

    /// The x of member `m`'s shares (members are 0-based, x is 1-based).
    fn x(m: MemberIndex) -> u8 {
        (m + 1) as u8
    }
}

/// One member's side of the protocol.
pub struct Member {
    index: MemberIndex,
    cipher: StaticSecret,
    mask: StaticSecret,
    self_seed: [u8; 32],
    rng: ChaCha20Rng,
    /// Shares received from the others (and its own), by the member they belong to.
    held: BTreeMap<MemberIndex, (Share, Share)>,
    /// Every member's advert, as the collector relayed it.
    adverts: BTreeMap<MemberIndex, Advert>,
}

impl Member {
    /// A member whose keys and shares come from `secret` (32 bytes only it knows) for this
    /// community's context: the same secret and context give the same keys (runs reproduce),
    /// another round gives unrelated ones.
    pub fn new(index: MemberIndex, secret: &[u8; 32], community: &Community) -> Self {
        let mut rng = ChaCha20Rng::from_seed(hkdf(&community.context, secret, "weft secagg member randomness v1"));
        let mut draw = || {
            let mut b = [0u8; 32];
            rng.fill_bytes(&mut b);
            b
        };
        let (cipher, mask, self_seed) = (StaticSecret::from(draw()), StaticSecret::from(draw()), draw());
        Member { index, cipher, mask, self_seed, rng, held: BTreeMap::new(), adverts: BTreeMap::new() }
    }

    pub fn advert(&self) -> Advert {
        Advert {
            member: self.index,
            cipher_key: PublicKey::from(&self.cipher).to_bytes(),
            mask_key: PublicKey::from(&self.mask).to_bytes(),
        }
    }

    /// The encryption and MAC keys of the shares `from` seals to `to` (this member is one of
    /// them; `peer` is the other's advert). Each direction has its own keys, so the stream is
    /// never reused: each (from, to) seals exactly one message per context.
    fn share_keys(
        &self,
        community: &Community,
        from: MemberIndex,
        to: MemberIndex,
        peer: &Advert,
    ) -> ([u8; 32], [u8; 32]) {
        let agreed = self.cipher.diffie_hellman(&PublicKey::from(peer.cipher_key));
        let mut ikm = agreed.as_bytes().to_vec();
        ikm.extend_from_slice(&from.to_le_bytes());
        ikm.extend_from_slice(&to.to_le_bytes());
        (
            hkdf(&community.context, &ikm, "weft secagg share encryption v1"),
            hkdf(&community.context, &ikm, "weft secagg share mac v1"),
        )
    }

    /// Splits its self-mask seed and mask secret among every advertised member and seals each
    /// one's shares to it. Needs adverts from at least `threshold` members.
    pub fn share(&mut self, community: &Community, adverts: &[Advert]) -> Result<Vec<SealedShares>, SecAggError> {
        if adverts.len() < community.threshold {
            return Err(SecAggError::BelowThreshold {
                stage: "advertised keys",
                got: adverts.len(),
                threshold: community.threshold,
            });
        }
        self.adverts = adverts.iter().map(|a| (a.member, *a)).collect();
        let xs: Vec<u8> = adverts.iter().map(|a| Community::x(a.member)).collect();
        let seeds = shamir_split(&self.self_seed, community.threshold, &xs, &mut self.rng);
        let secrets = shamir_split(&self.mask.to_bytes(), community.threshold, &xs, &mut self.rng);
        let mut sealed = Vec::new();
        for ((advert, seed), secret) in adverts.iter().zip(seeds).zip(secrets) {
            if advert.member == self.index {
                self.held.insert(self.index, (seed, secret));
                continue;
            }
            let (key, mac_key) = self.share_keys(community, self.index, advert.member, advert);
            let mut plain = Vec::with_capacity(66);
            plain.push(seed.x);
            plain.extend_from_slice(&seed.y);
            plain.push(secret.x);
            plain.extend_from_slice(&secret.y);
            let stream = ChaCha20Rng::from_seed(key);
            let ciphertext = xor_stream(stream, &plain);
            let tag = *blake3::keyed_hash(&mac_key, &ciphertext).as_bytes();
            sealed.push(SealedShares { from: self.index, to: advert.member, ciphertext, tag });
        }
        Ok(sealed)
    }

    /// Opens the shares sealed to it; a forged or misaddressed one is refused by name.
    pub fn receive(&mut self, community: &Community, sealed: &[SealedShares]) -> Result<(), SecAggError> {
        for s in sealed {
            let forged = SecAggError::Forged { from: s.from, to: s.to };
            let advert = self.adverts.get(&s.from).copied().ok_or(SecAggError::UnknownMember(s.from))?;
            if s.to != self.index {
                return Err(forged);
            }
            let (key, mac_key) = self.share_keys(community, s.from, self.index, &advert);
            let expected = blake3::keyed_hash(&mac_key, &s.ciphertext);
            if expected != blake3::Hash::from(s.tag) || s.ciphertext.len() != 66 {
                return Err(forged);
            }
            let plain = xor_stream(ChaCha20Rng::from_seed(key), &s.ciphertext);
            let share = |at: usize| {
                let mut y = [0u8; 32];
                y.copy_from_slice(&plain[at + 1..at + 33]);
                Share { x: plain[at], y }
            };
            self.held.insert(s.from, (share(0), share(33)));
        }
        Ok(())
    }

    /// Its update, quantized and masked: its self mask, plus the pairwise mask with every other
    /// member that shared (added towards higher indices, subtracted towards lower ones, so
    /// that the pairs cancel in the sum).
    pub fn mask(&self, community: &Community, update: &[f32]) -> Result<MaskedUpdate, SecAggError> {
        if update.len() != community.length {
            return Err(SecAggError::Length { member: self.index, got: update.len(), expected: community.length });
        }
        let mut words: Vec<u32> = update.iter().map(|&x| community.quantizer.encode(x)).collect();
        add_stream(&mut words, &hkdf(&community.context, &self.self_seed, "weft secagg self mask v1"), false);
        for (&other, advert) in &self.adverts {
            if other == self.index || !self.held.contains_key(&other) {
                continue;
            }
            let key = pairwise_key(community, &self.mask, self.index, advert);
            add_stream(&mut words, &key, other < self.index);
        }
        Ok(MaskedUpdate { member: self.index, words })
    }

    /// The shares that unmask the sum: the self-mask seed of each survivor, the mask secret of
    /// each dropped member — never both for the same member, and nothing when fewer than the
    /// threshold survived (the sum of so few could expose one of them).
    pub fn reveal(
        &self,
        community: &Community,
        survivors: &BTreeSet<MemberIndex>,
        dropped: &BTreeSet<MemberIndex>,
    ) -> Result<Reveal, SecAggError> {
        if let Some(both) = survivors.intersection(dropped).next() {
            return Err(SecAggError::BothSecrets(*both));
        }
        if survivors.len() < community.threshold {
            return Err(SecAggError::BelowThreshold {
                stage: "sent masked updates",
                got: survivors.len(),
                threshold: community.threshold,
            });
        }
        let pick = |set: &BTreeSet<MemberIndex>, second: bool| {
            set.iter()
                .filter_map(|m| {
                    self.held.get(m).map(|(seed, secret)| (*m, if second { secret.clone() } else { seed.clone() }))
                })
                .collect()
        };
        Ok(Reveal { from: self.index, self_seeds: pick(survivors, false), mask_secrets: pick(dropped, true) })
    }
}

fn xor_stream(mut stream: ChaCha20Rng, data: &[u8]) -> Vec<u8> {
    let mut pad = vec![0u8; data.len()];
    stream.fill_bytes(&mut pad);
    data.iter().zip(pad).map(|(d, p)| d ^ p).collect()
}

fn pairwise_key(community: &Community, secret: &StaticSecret, me: MemberIndex, other: &Advert) -> [u8; 32] {
    let agreed = secret.diffie_hellman(&PublicKey::from(other.mask_key));
    let (lo, hi) = (me.min(other.member), me.max(other.member));
    let mut ikm = agreed.as_bytes().to_vec();
    ikm.extend_from_slice(&lo.to_le_bytes());
    ikm.extend_from_slice(&hi.to_le_bytes());
    hkdf(&community.context, &ikm, "weft secagg pairwise mask v1")
}

/// The collector's side: it sees adverts, sealed shares, masked updates and reveals, and
/// outputs only the sum of the survivors' updates. It keeps one running sum, not the masked
/// updates: its memory is one update's, whatever the community's size.
pub struct Collector {
    community: Community,
    adverts: BTreeMap<MemberIndex, Advert>,
    /// Members who sent their sealed shares: the ones every masked update is masked against.
    shared: BTreeSet<MemberIndex>,
    /// Members whose masked update is in `masked_sum`.
    survivors: BTreeSet<MemberIndex>,
    masked_sum: Vec<u32>,
}

/// A community's unmasked result.
#[derive(Clone, Debug, PartialEq)]
pub struct CommunitySum {
    pub sum: Vec<f32>,
    /// Members whose update is in the sum.
    pub members: BTreeSet<MemberIndex>,
}

impl Collector {
    pub fn new(community: Community) -> Self {
        let masked_sum = vec![0; community.length];
        Collector {
            community,
            adverts: BTreeMap::new(),
            shared: BTreeSet::new(),
            survivors: BTreeSet::new(),
            masked_sum,
        }
    }

    pub fn advert(&mut self, advert: Advert) -> Result<(), SecAggError> {
        if advert.member as usize >= self.community.members {
            return Err(SecAggError::UnknownMember(advert.member));
        }
        self.adverts.insert(advert.member, advert);
        Ok(())
    }

    pub fn adverts(&self) -> Vec<Advert> {
        self.adverts.values().copied().collect()
    }

    /// Records that `member` sent its sealed shares (they are relayed, never opened here).
    pub fn shared(&mut self, member: MemberIndex) {
        self.shared.insert(member);
    }

    pub fn masked(&mut self, update: MaskedUpdate) -> Result<(), SecAggError> {
        if !self.shared.contains(&update.member) {
            return Err(SecAggError::UnknownMember(update.member));
        }
        if self.survivors.contains(&update.member) {
            return Err(SecAggError::Repeated(update.member));
        }
        if update.words.len() != self.community.length {
            return Err(SecAggError::Length {
                member: update.member,
                got: update.words.len(),
                expected: self.community.length,
            });
        }
        for (s, w) in self.masked_sum.iter_mut().zip(update.words) {
            *s = s.wrapping_add(w);
        }
        self.survivors.insert(update.member);
        Ok(())
    }

    /// Members whose masked update arrived, and members who shared but sent none.
    pub fn survivors_and_dropped(&self) -> (BTreeSet<MemberIndex>, BTreeSet<MemberIndex>) {
        let dropped = self.shared.difference(&self.survivors).copied().collect();
        (self.survivors.clone(), dropped)
    }

    /// The sum of the survivors' updates, from at least `threshold` reveals; or why the
    /// community fails.
    pub fn unmask(&self, reveals: &[Reveal]) -> Result<CommunitySum, SecAggError> {
        let c = &self.community;
        let (survivors, dropped) = self.survivors_and_dropped();
        if survivors.len() < c.threshold {
            return Err(SecAggError::BelowThreshold {
                stage: "sent masked updates",
                got: survivors.len(),
                threshold: c.threshold,
            });
        }
        let reveals: Vec<&Reveal> = reveals.iter().filter(|r| survivors.contains(&r.from)).collect();
        if reveals.len() < c.threshold {
            return Err(SecAggError::BelowThreshold {
                stage: "revealed shares",
                got: reveals.len(),
                threshold: c.threshold,
            });
        }
        let recover = |member: MemberIndex, second: bool| -> Result<[u8; 32], SecAggError> {
            let shares: Vec<Share> = reveals
                .iter()
                .filter_map(|r| if second { r.mask_secrets.get(&member) } else { r.self_seeds.get(&member) })
                .take(c.threshold)
                .cloned()
                .collect();
            if shares.len() < c.threshold {
                return Err(SecAggError::BelowThreshold {
                    stage: "revealed shares for one member",
                    got: shares.len(),
                    threshold: c.threshold,
                });
            }
            shamir_combine(&shares).ok_or(SecAggError::Shares(member))
        };
        let mut sum = self.masked_sum.clone();
        for &s in &survivors {
            let seed = recover(s, false)?;
            add_stream(&mut sum, &hkdf(&c.context, &seed, "weft secagg self mask v1"), true);
        }
        for &d in &dropped {
            let secret = StaticSecret::from(recover(d, true)?);
            // The recovered secret must be the one d advertised: else the shares were bad.
            let advert = self.adverts.get(&d).ok_or(SecAggError::UnknownMember(d))?;
            if PublicKey::from(&secret).to_bytes() != advert.mask_key {
                return Err(SecAggError::Shares(d));
            }
            for &s in &survivors {
                let other = self.adverts.get(&s).ok_or(SecAggError::UnknownMember(s))?;
                let key = pairwise_key(c, &secret, d, other);
                // Survivor s added this mask if d > s and subtracted it if d < s: undo that.
                add_stream(&mut sum, &key, d > s);
            }
        }
        Ok(CommunitySum { sum: sum.into_iter().map(|s| c.quantizer.decode(s)).collect(), members: survivors })
    }
}

/// The key phase run in one process (the demo, benchmarks, tests): every member advertises
/// through the collector, seals its shares to the others, and opens the ones sealed to it. Over
/// a network the same three steps travel as messages through the coordinator.
pub fn exchange_keys(
    community: &Community,
    members: &mut [Member],
    collector: &mut Collector,
) -> Result<(), SecAggError> {
    for m in members.iter() {
        collector.advert(m.advert())?;
    }
    let adverts = collector.adverts();
    let mut sealed: Vec<SealedShares> = Vec::new();
    for m in members.iter_mut() {
        sealed.extend(m.share(community, &adverts)?);
        collector.shared(m.index);
    }
    for m in members.iter_mut() {
        let mine: Vec<SealedShares> = sealed.iter().filter(|s| s.to == m.index).cloned().collect();
        m.receive(community, &mine)?;
    }
    Ok(())
}

/// One random partition of a round's roster into communities of at least `size` members (the
/// last takes the remainder), drawn from the round's ledger-fixed seed; a second request for
/// the same round is refused, because two partitions of the same updates let the coordinator
/// solve for single ones.
#[derive(Default)]
pub struct Partitions {
    drawn: BTreeSet<u64>,
}

impl Partitions {
    pub fn draw<T: Clone + Ord>(
        &mut self,
        round: u64,
        seed: &[u8; 32],
        roster: &[T],
        size: usize,
    ) -> Result<Vec<Vec<T>>, SecAggError> {
        if size < 3 || roster.len() < size {
            return Err(SecAggError::TooSmall(roster.len().min(size)));
        }
        if !self.drawn.insert(round) {
            return Err(SecAggError::SecondPartition { round });
        }
        let mut order: Vec<T> = roster.to_vec();
        order.sort();
        let mut rng = ChaCha20Rng::from_seed(*seed);
        // Fisher–Yates with rejection sampling (no modulo bias).
        for i in (1..order.len()).rev() {
            let bound = (i + 1) as u64;
            let zone = u64::MAX - u64::MAX % bound;
            let j = loop {
                let r = rng.next_u64();
                if r < zone {
                    break (r % bound) as usize;
                }
            };
            order.swap(i, j);
        }
        let communities = order.len() / size;
        let mut out: Vec<Vec<T>> = vec![Vec::new(); communities];
        for (i, member) in order.into_iter().enumerate() {
            out[(i / size).min(communities - 1)].push(member);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn community(members: usize, threshold: usize, length: usize) -> Community {
        Community::new(7, 0, members, threshold, 1.0, length).unwrap()
    }

    fn updates(members: usize, length: usize) -> Vec<Vec<f32>> {
        (0..members).map(|m| (0..length).map(|i| ((m * 31 + i * 7) % 97) as f32 / 97.0 - 0.5).collect()).collect()
    }

    /// Runs the protocol; `drop_after_sharing` members share their keys and then send nothing.
    fn run(
        c: &Community,
        updates: &[Vec<f32>],
        drop_after_sharing: &[MemberIndex],
    ) -> (Result<CommunitySum, SecAggError>, Collector) {
        let mut members: Vec<Member> = (0..c.members as u32).map(|m| Member::new(m, &[m as u8 + 1; 32], c)).collect();
        let mut collector = Collector::new(c.clone());
        exchange_keys(c, &mut members, &mut collector).unwrap();
        for m in &members {
            if !drop_after_sharing.contains(&m.index) {
                collector.masked(m.mask(c, &updates[m.index as usize]).unwrap()).unwrap();
            }
        }
        let (survivors, dropped) = collector.survivors_and_dropped();
        let reveals: Vec<Reveal> = members
            .iter()
            .filter(|m| survivors.contains(&m.index))
            .filter_map(|m| m.reveal(c, &survivors, &dropped).ok())
            .collect();
        (collector.unmask(&reveals), collector)
    }

    fn quantized_sum(c: &Community, updates: &[Vec<f32>], members: &[usize]) -> Vec<f32> {
        (0..c.length)
            .map(|i| {
                let s = members.iter().fold(0u32, |s, &m| s.wrapping_add(c.quantizer.encode(updates[m][i])));
                c.quantizer.decode(s)
            })
            .collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// For any community, updates and set of members dropping after sharing: the sum is
        /// exactly the survivors' quantized sum, or the community fails by name below threshold.
        #[test]
        fn the_sum_is_the_survivors_sum_or_a_named_failure(
            members in 3usize..7,
            length in 1usize..40,
            values in proptest::collection::vec(-2.0f32..2.0, 7 * 40),
            dropping in proptest::prelude::any::<u8>(),
        ) {
            let threshold = members / 2 + 1;
            let c = community(members, threshold, length);
            let u: Vec<Vec<f32>> = (0..members).map(|m| values[m * length..(m + 1) * length].to_vec()).collect();
            let dropped: Vec<MemberIndex> = (0..members as u32).filter(|m| dropping & (1 << m) != 0).collect();
            let survivors: Vec<usize> = (0..members).filter(|m| !dropped.contains(&(*m as u32))).collect();
            match run(&c, &u, &dropped).0 {
                Ok(sum) => {
                    proptest::prop_assert!(survivors.len() >= threshold);
                    proptest::prop_assert_eq!(sum.sum, quantized_sum(&c, &u, &survivors));
                }
                Err(e) => {
                    proptest::prop_assert!(survivors.len() < threshold, "{}", e);
                    let named = matches!(e, SecAggError::BelowThreshold { .. });
                    proptest::prop_assert!(named);
                }
            }
        }
    }

    #[test]
    fn masks_cancel_exactly() {
        let c = community(5, 3, 257);
        let u = updates(5, 257);
        let (sum, _) = run(&c, &u, &[]);
        let sum = sum.unwrap();
        assert_eq!(sum.sum, quantized_sum(&c, &u, &[0, 1, 2, 3, 4]));
        let plain: Vec<f32> = (0..257).map(|i| u.iter().map(|x| x[i]).sum()).collect();
        for (a, b) in sum.sum.iter().zip(&plain) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn a_member_dropped_after_sharing_is_recovered() {
        let c = community(5, 3, 64);
        let u = updates(5, 64);
        let (sum, _) = run(&c, &u, &[1, 3]);
        let sum = sum.unwrap();
        assert_eq!(sum.members, BTreeSet::from([0, 2, 4]));
        assert_eq!(sum.sum, quantized_sum(&c, &u, &[0, 2, 4]));
    }

    #[test]
    fn below_the_threshold_the_community_fails_by_name() {
        let c = community(4, 3, 16);
        let (sum, _) = run(&c, &updates(4, 16), &[0, 2]);
        assert_eq!(sum, Err(SecAggError::BelowThreshold { stage: "sent masked updates", got: 2, threshold: 3 }));
    }

    #[test]
    fn the_mask_stream_depends_on_every_key_bit() {
        let key = [0x5au8; 32];
        let stream = mask_stream(&key, 16);
        for bit in 0..256 {
            let mut flipped = key;
            flipped[bit / 8] ^= 1 << (bit % 8);
            let other = mask_stream(&flipped, 16);
            // Half the bits of 512 differ on average; a key bit the stream ignored would give 0.
            let differing: u32 = stream.iter().zip(&other).map(|(a, b)| (a ^ b).count_ones()).sum();
            assert!(differing > 150, "bit {bit}: only {differing} stream bits change");
        }
    }

    #[test]
    fn what_the_collector_holds_does_not_give_a_single_update() {
        // Try: the collector's best guess at member 0's update from its masked words is the
        // masked words themselves; they are uniformly spread, unrelated to the update.
        let c = community(3, 2, 4096);
        let mut u = updates(3, 4096);
        u[0] = vec![0.25; 4096];
        let mut members: Vec<Member> = (0..3).map(|m| Member::new(m, &[m as u8 + 1; 32], &c)).collect();
        let mut collector = Collector::new(c.clone());
        exchange_keys(&c, &mut members, &mut collector).unwrap();
        // Exactly what the collector receives from member 0.
        let masked = members[0].mask(&c, &u[0]).unwrap();
        let words = &masked.words;
        let guess: Vec<f32> = words.iter().map(|&w| c.quantizer.decode(w)).collect();
        let near = guess.iter().filter(|&&g| (g - 0.25).abs() < 0.01).count();
        // Uniform over [-range·members, range·members): ≈ 0.02 / 6 of the values land near 0.25 by chance.
        assert!(near < 60, "{near} of 4096 masked values sit near the true update");
        let high_bit_set = words.iter().filter(|&&w| w & 0x8000_0000 != 0).count();
        assert!((1848..2248).contains(&high_bit_set), "{high_bit_set}");
        // A member's second masked update is refused (it would count it twice).
        collector.masked(masked.clone()).unwrap();
        assert_eq!(collector.masked(masked), Err(SecAggError::Repeated(0)));
        // And a member refuses to reveal both secrets of anyone.
        let m = Member::new(0, &[1; 32], &c);
        let both = BTreeSet::from([1]);
        assert_eq!(m.reveal(&c, &both, &both).unwrap_err(), SecAggError::BothSecrets(1));
    }

    #[test]
    fn a_forged_share_is_refused() {
        let c = community(3, 2, 4);
        let mut a = Member::new(0, &[1; 32], &c);
        let mut b = Member::new(1, &[2; 32], &c);
        let third = Member::new(2, &[3; 32], &c);
        let adverts = [a.advert(), b.advert(), third.advert()];
        let mut sealed = a.share(&c, &adverts).unwrap();
        b.share(&c, &adverts).unwrap();
        let to_b: Vec<SealedShares> = sealed.iter().filter(|s| s.to == 1).cloned().collect();
        b.receive(&c, &to_b).unwrap();
        sealed[0].ciphertext[5] ^= 1;
        let forged: Vec<SealedShares> = sealed.iter().filter(|s| s.to == 1).cloned().collect();
        assert_eq!(b.receive(&c, &forged), Err(SecAggError::Forged { from: 0, to: 1 }));
    }

    #[test]
    fn shamir_needs_threshold_shares() {
        let mut rng = ChaCha20Rng::from_seed([9; 32]);
        let secret = [42u8; 32];
        let shares = shamir_split(&secret, 3, &[1, 2, 3, 4, 5], &mut rng);
        assert_eq!(shamir_combine(&shares[1..4]), Some(secret));
        assert_eq!(shamir_combine(&[shares[0].clone(), shares[4].clone(), shares[2].clone()]), Some(secret));
        assert_ne!(shamir_combine(&shares[..2]), Some(secret));
    }

    #[test]
    fn quantization_clips_to_the_documented_range_and_sums_without_wrapping() {
        let q = Quantizer::new(1.0, 4).unwrap();
        let top = q.encode(5.0);
        let sum = (0..4).fold(0u32, |s, _| s.wrapping_add(top));
        assert!((q.decode(sum) - 4.0).abs() < 1e-6);
        let bottom = q.encode(-5.0);
        let sum = (0..4).fold(0u32, |s, _| s.wrapping_add(bottom));
        assert!((q.decode(sum) + 4.0).abs() < 1e-6);
        assert_eq!(q.encode(f32::NAN), 0);
        assert!(q.resolution() < 2e-9);
        assert_eq!(Quantizer::new(0.0, 3), Err(SecAggError::Range(0.0)));
    }

    #[test]
    fn one_partition_per_round_and_only_one() {
        let roster: Vec<u32> = (0..10).collect();
        let mut partitions = Partitions::default();
        let drawn = partitions.draw(1, &[3; 32], &roster, 3).unwrap();
        assert_eq!(drawn.len(), 3);
        assert!(drawn.iter().all(|c| c.len() >= 3));
        let mut all: Vec<u32> = drawn.concat();
        all.sort();
        assert_eq!(all, roster);
        assert_eq!(partitions.draw(1, &[4; 32], &roster, 3), Err(SecAggError::SecondPartition { round: 1 }));
        // The same seed gives the same partition (another collector can check it).
        assert_eq!(Partitions::default().draw(1, &[3; 32], &roster, 3).unwrap(), drawn);
        assert!(Partitions::default().draw(2, &[3; 32], &roster[..2], 3).is_err());
    }
}
