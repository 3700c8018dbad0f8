//! Secure aggregation over the network: the protocol of `weft_privacy::secagg` with the
//! coordinator as its relay and collector.
//!
//! Each round the coordinator draws one partition of the roster into communities (recorded in
//! the ledger before any key is exchanged), then walks every community through four stages
//! together: KEYS (members advertise two public keys), SHARES (each seals Shamir shares of its
//! secrets to every other member; the coordinator relays them unopened), MASKED (members fetch
//! the shares sealed to them, train, and upload masked updates), REVEAL (survivors reveal, for
//! each member, a share of exactly one secret). Each stage closes when every member it waits
//! for has answered or at its deadline; a community that falls below its threshold at any stage
//! fails with the stage named, and the others go on. The coordinator then measures, caps and
//! aggregates each community's mean as one contribution.
//!
//! A node takes part only from the KEYS stage: one that (re)connects later sits the round out
//! and its community treats it as dropped. A coordinator restarted mid-protocol fails the
//! round's unfinished communities rather than run their masks a second time.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::Status;
use weft_core::{ContentHash, NodeId};
use weft_privacy::secagg::{
    Advert, Collector, Community, CommunitySum, MaskedUpdate, Member, MemberIndex, Reveal, SealedShares, Share,
};

use crate::config::SecureAggregationConfig;
use crate::proto::{self, consortium_client::ConsortiumClient};
use crate::{NetError, CHUNK};

/// Where a secure round stands (every community moves through the stages together).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Keys,
    Shares,
    Masked,
    Reveal,
    Done,
}

impl Stage {
    fn to_proto(self) -> proto::SecureStage {
        match self {
            Stage::Keys => proto::SecureStage::Keys,
            Stage::Shares => proto::SecureStage::Shares,
            Stage::Masked => proto::SecureStage::Masked,
            Stage::Reveal => proto::SecureStage::Reveal,
            Stage::Done => proto::SecureStage::Done,
        }
    }

    /// What a member does in the stage, for messages.
    fn name(self) -> &'static str {
        match self {
            Stage::Keys => "keys",
            Stage::Shares => "shares",
            Stage::Masked => "masked updates",
            Stage::Reveal => "reveals",
            Stage::Done => "done",
        }
    }
}

/// Why the coordinator refuses a member's protocol message: a stable code and what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum SecureRefusal {
    #[error("no secure round {asked} is running (round {open} is the coordinator's)")]
    WrongRound { asked: u64, open: u64 },
    #[error("this node is in none of round {0}'s communities")]
    NotInCommunity(u64),
    #[error("the {stage} stage is closed or not yet open (the round is at {now})")]
    WrongStage { stage: &'static str, now: &'static str },
    #[error("its community has failed: {0}")]
    CommunityFailed(String),
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    Conflicting(String),
    #[error("{0}")]
    Missed(String),
}

impl SecureRefusal {
    pub fn code(&self) -> &'static str {
        match self {
            SecureRefusal::WrongRound { .. } => "wrong_round",
            SecureRefusal::NotInCommunity(_) => "not_in_community",
            SecureRefusal::WrongStage { .. } => "wrong_stage",
            SecureRefusal::CommunityFailed(_) => "community_failed",
            SecureRefusal::Malformed(_) => "malformed_protocol_message",
            SecureRefusal::Conflicting(_) => "conflicting_protocol_message",
            SecureRefusal::Missed(_) => "missed_stage",
        }
    }

    pub fn status(&self) -> Status {
        let message = format!("{}: {self}", self.code());
        match self {
            SecureRefusal::NotInCommunity(_) => Status::permission_denied(message),
            SecureRefusal::Malformed(_) | SecureRefusal::Conflicting(_) => Status::invalid_argument(message),
            _ => Status::failed_precondition(message),
        }
    }
}

/// The coordinator's verdict on a community's sum.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verdict {
    pub accepted: bool,
    pub code: String,
    pub detail: String,
    pub quality: f64,
}

/// One community's protocol state on the coordinator.
pub struct CommunityRun {
    pub id: String,
    /// 1-based, in the partition's order: part of every key derivation (as in the demo).
    pub index: u32,
    pub community: Community,
    collector: Collector,
    adverts: BTreeMap<MemberIndex, Advert>,
    /// Sealed shares by sender: relayed, never opened.
    sealed: BTreeMap<MemberIndex, Vec<SealedShares>>,
    masked: BTreeSet<MemberIndex>,
    /// Fixed when the MASKED stage closes: who reveals, and for whom which secret.
    survivors: BTreeSet<MemberIndex>,
    dropped: BTreeSet<MemberIndex>,
    reveals: BTreeMap<MemberIndex, Reveal>,
    pub failure: Option<String>,
    pub verdict: Option<Verdict>,
}

impl CommunityRun {
    fn fail(&mut self, stage: Stage, got: usize) {
        if self.failure.is_none() {
            let (k, t) = (self.community.members, self.community.threshold);
            let failure = format!(
                "only {got} of its {k} members answered the {} stage before it closed; the threshold is {t}",
                stage.name()
            );
            tracing::warn!(community = %self.id, code = "community_failed", "{failure}");
            self.failure = Some(failure);
        }
    }

    /// Has every member the stage waits for answered?
    fn complete(&self, stage: Stage) -> bool {
        self.failure.is_some()
            || match stage {
                Stage::Keys => self.adverts.len() == self.community.members,
                Stage::Shares => self.sealed.len() == self.adverts.len(),
                Stage::Masked => self.masked.len() == self.sealed.len(),
                Stage::Reveal => self.reveals.len() == self.survivors.len(),
                Stage::Done => true,
            }
    }
}

/// A secure round on the coordinator: the communities, where they stand, what they relayed.
pub struct SecureRound {
    pub round: u64,
    pub base_hash: ContentHash,
    pub stage: Stage,
    pub stage_closes: Instant,
    /// The keys stage waits for a first member until the round's deadline (nodes may start
    /// after the coordinator), then `stage_secs` for the others.
    keys_wait: Duration,
    round_closes: Instant,
    pub communities: Vec<CommunityRun>,
    /// Node → (its community's position in `communities`, its member index).
    members: BTreeMap<NodeId, (usize, MemberIndex)>,
    /// Bytes of masked updates received, per node.
    pub wire: BTreeMap<NodeId, u64>,
}

impl SecureRound {
    /// The round's communities as the ledger recorded their partition; updates have `length`
    /// values; the round closes at `round_closes`.
    pub fn new(
        round: u64,
        base_hash: ContentHash,
        partition: &BTreeMap<String, Vec<String>>,
        settings: &SecureAggregationConfig,
        length: usize,
        round_closes: Instant,
    ) -> Result<Self, NetError> {
        let mut communities = Vec::new();
        let mut members = BTreeMap::new();
        for (position, (id, nodes)) in partition.iter().enumerate() {
            let index = position as u32 + 1;
            let k = nodes.len();
            let community =
                Community::new(round, index, k, SecureAggregationConfig::threshold(k), settings.range, length)
                    .map_err(|e| NetError::Protocol(format!("{id}: {e}")))?;
            for (m, node) in nodes.iter().enumerate() {
                let node = NodeId::new(node.clone()).map_err(|e| NetError::Protocol(format!("{id}: {e}")))?;
                members.insert(node, (position, m as MemberIndex));
            }
            communities.push(CommunityRun {
                id: id.clone(),
                index,
                collector: Collector::new(community.clone()),
                community,
                adverts: BTreeMap::new(),
                sealed: BTreeMap::new(),
                masked: BTreeSet::new(),
                survivors: BTreeSet::new(),
                dropped: BTreeSet::new(),
                reveals: BTreeMap::new(),
                failure: None,
                verdict: None,
            });
        }
        Ok(SecureRound {
            round,
            base_hash,
            stage: Stage::Keys,
            stage_closes: round_closes,
            keys_wait: Duration::from_secs(settings.stage_secs),
            round_closes,
            communities,
            members,
            wire: BTreeMap::new(),
        })
    }

    /// A round whose protocol cannot run (the coordinator restarted in the middle of it):
    /// every community not yet measured fails, by name.
    pub fn interrupted(mut self, measured: &BTreeSet<NodeId>) -> Self {
        for c in &mut self.communities {
            if measured.iter().any(|m| m.as_str() == c.id) {
                c.verdict = Some(Verdict {
                    accepted: true,
                    detail: "measured before the restart".into(),
                    ..Verdict::default()
                });
            } else {
                c.failure = Some(
                    "the coordinator restarted during the round's protocol; a community's masks never run twice, so it sits this round out".into(),
                );
            }
        }
        self.stage = Stage::Done;
        self
    }

    /// The community and member index of `node`, refusing a message for another round.
    fn find(&mut self, node: &NodeId, round: u64) -> Result<(&mut CommunityRun, MemberIndex), SecureRefusal> {
        if round != self.round {
            return Err(SecureRefusal::WrongRound { asked: round, open: self.round });
        }
        let (position, member) = *self.members.get(node).ok_or(SecureRefusal::NotInCommunity(round))?;
        let community = &mut self.communities[position];
        if let Some(failure) = &community.failure {
            return Err(SecureRefusal::CommunityFailed(failure.clone()));
        }
        Ok((community, member))
    }

    fn at(&self, stage: Stage) -> Result<(), SecureRefusal> {
        if self.stage != stage {
            return Err(SecureRefusal::WrongStage { stage: stage.name(), now: self.stage.name() });
        }
        Ok(())
    }

    /// What `node` sees of its community now. Asked about another round, it says only which
    /// round it runs (the node waits for its round, or learns it has passed).
    pub fn state(&self, node: &NodeId, round: u64) -> Result<proto::CommunityState, SecureRefusal> {
        if round != self.round {
            return Ok(proto::CommunityState { round: self.round, ..Default::default() });
        }
        let (position, member) = *self.members.get(node).ok_or(SecureRefusal::NotInCommunity(round))?;
        let c = &self.communities[position];
        let mut state = proto::CommunityState {
            round: self.round,
            community: c.id.clone(),
            index: c.index,
            member,
            members: c.community.members as u32,
            threshold: c.community.threshold as u32,
            range: c.community.quantizer.range(),
            length: c.community.length as u64,
            stage: self.stage.to_proto() as i32,
            stage_deadline_ms: self.stage_closes.saturating_duration_since(Instant::now()).as_millis() as u64,
            ..Default::default()
        };
        if let Some(failure) = &c.failure {
            state.stage = proto::SecureStage::Failed as i32;
            state.failure = failure.clone();
            return Ok(state);
        }
        if self.stage >= Stage::Shares {
            state.adverts = c
                .adverts
                .values()
                .map(|a| proto::Advert {
                    member: a.member,
                    cipher_key: a.cipher_key.to_vec(),
                    mask_key: a.mask_key.to_vec(),
                })
                .collect();
        }
        if self.stage >= Stage::Masked {
            state.inbox = c
                .sealed
                .values()
                .flatten()
                .filter(|s| s.to == member)
                .map(|s| proto::Sealed {
                    from: s.from,
                    to: s.to,
                    ciphertext: s.ciphertext.clone(),
                    tag: s.tag.to_vec(),
                })
                .collect();
        }
        if self.stage >= Stage::Reveal {
            state.survivors = c.survivors.iter().copied().collect();
            state.dropped = c.dropped.iter().copied().collect();
        }
        if let Some(v) = &c.verdict {
            state.accepted = v.accepted;
            state.code = v.code.clone();
            state.detail = v.detail.clone();
            state.quality = v.quality;
        }
        Ok(state)
    }

    pub fn advertise(&mut self, node: &NodeId, request: &proto::AdvertiseRequest) -> Result<(), SecureRefusal> {
        self.at(Stage::Keys)?;
        let (c, member) = self.find(node, request.round)?;
        let key = |bytes: &[u8], what: &str| {
            <[u8; 32]>::try_from(bytes)
                .map_err(|_| SecureRefusal::Malformed(format!("a {what} public key is 32 bytes, got {}", bytes.len())))
        };
        let advert = Advert {
            member,
            cipher_key: key(&request.cipher_key, "cipher")?,
            mask_key: key(&request.mask_key, "mask")?,
        };
        // A retry after a lost answer sends the same keys (they derive from the node's secret).
        if repeated(c.adverts.get(&member), &advert, "advertised other keys")? {
            return Ok(());
        }
        c.collector.advert(advert).map_err(|e| SecureRefusal::Malformed(e.to_string()))?;
        c.adverts.insert(member, advert);
        if self.stage_closes == self.round_closes {
            let now = Instant::now();
            self.stage_closes = now.checked_add(self.keys_wait).unwrap_or(now).min(self.round_closes);
        }
        Ok(())
    }

    pub fn share(&mut self, node: &NodeId, request: &proto::ShareRequest) -> Result<(), SecureRefusal> {
        self.at(Stage::Shares)?;
        let (c, member) = self.find(node, request.round)?;
        if !c.adverts.contains_key(&member) {
            return Err(SecureRefusal::Missed("this member advertised no keys in the keys stage".into()));
        }
        let mut sealed = Vec::new();
        let mut recipients = BTreeSet::new();
        for s in &request.sealed {
            let malformed = |why: String| SecureRefusal::Malformed(format!("shares to member {}: {why}", s.to));
            if s.from != member {
                return Err(malformed(format!("sent by member {member}, they name member {}", s.from)));
            }
            if s.to == member || !c.adverts.contains_key(&s.to) {
                return Err(malformed("not another advertised member".into()));
            }
            if !recipients.insert(s.to) {
                return Err(malformed("sealed twice".into()));
            }
            // Two shares of one byte position each (x and 32 bytes of y, twice).
            if s.ciphertext.len() != 66 {
                return Err(malformed(format!("a sealed pair of shares is 66 bytes, got {}", s.ciphertext.len())));
            }
            let tag = <[u8; 32]>::try_from(s.tag.as_slice())
                .map_err(|_| malformed(format!("a tag is 32 bytes, got {}", s.tag.len())))?;
            sealed.push(SealedShares { from: s.from, to: s.to, ciphertext: s.ciphertext.clone(), tag });
        }
        if recipients.len() != c.adverts.len() - 1 {
            return Err(SecureRefusal::Malformed(format!(
                "shares must go to every other advertised member ({}), got {}",
                c.adverts.len() - 1,
                recipients.len()
            )));
        }
        if repeated(c.sealed.get(&member), &sealed, "sent other shares")? {
            return Ok(());
        }
        c.collector.shared(member);
        c.sealed.insert(member, sealed);
        Ok(())
    }

    /// Checks a masked upload's header before its words are received.
    pub fn check_masked(&mut self, node: &NodeId, header: &proto::MaskedHeader) -> Result<(), SecureRefusal> {
        self.at(Stage::Masked)?;
        let base = self.base_hash.to_string();
        let (c, member) = self.find(node, header.round)?;
        if header.base_hash != base {
            return Err(SecureRefusal::Malformed(format!(
                "masked against base {}, the round's is {base}",
                header.base_hash
            )));
        }
        if !c.sealed.contains_key(&member) {
            return Err(SecureRefusal::Missed("this member sent no shares in the shares stage".into()));
        }
        if c.masked.contains(&member) {
            return Err(SecureRefusal::Conflicting("this member already sent its masked update".into()));
        }
        if header.words != c.community.length as u64 {
            return Err(SecureRefusal::Malformed(format!(
                "{} words announced, the community's updates have {}",
                header.words, c.community.length
            )));
        }
        Ok(())
    }

    pub fn masked(&mut self, node: &NodeId, round: u64, words: Vec<u32>, bytes: u64) -> Result<(), SecureRefusal> {
        self.at(Stage::Masked)?;
        let (c, member) = self.find(node, round)?;
        if c.masked.contains(&member) {
            return Err(SecureRefusal::Conflicting("this member already sent its masked update".into()));
        }
        c.collector.masked(MaskedUpdate { member, words }).map_err(|e| SecureRefusal::Malformed(e.to_string()))?;
        c.masked.insert(member);
        self.wire.insert(node.clone(), bytes);
        Ok(())
    }

    pub fn reveal(&mut self, node: &NodeId, request: &proto::RevealRequest) -> Result<(), SecureRefusal> {
        self.at(Stage::Reveal)?;
        let (c, member) = self.find(node, request.round)?;
        if !c.survivors.contains(&member) {
            return Err(SecureRefusal::Missed("only members whose masked update arrived reveal".into()));
        }
        let shares = |list: &[proto::RevealedShare], allowed: &BTreeSet<MemberIndex>, what: &str| {
            let mut out = BTreeMap::new();
            for s in list {
                if !allowed.contains(&s.member) {
                    return Err(SecureRefusal::Malformed(format!(
                        "a share of member {}'s {what}, which is not asked for",
                        s.member
                    )));
                }
                // Every share a member holds is at its own point x = index + 1.
                if s.x != member + 1 {
                    return Err(SecureRefusal::Malformed(format!(
                        "member {member}'s shares are at x = {}, got {}",
                        member + 1,
                        s.x
                    )));
                }
                let y = <[u8; 32]>::try_from(s.y.as_slice())
                    .map_err(|_| SecureRefusal::Malformed(format!("a share is 32 bytes, got {}", s.y.len())))?;
                if out.insert(s.member, Share { x: s.x as u8, y }).is_some() {
                    return Err(SecureRefusal::Malformed(format!("two shares of member {}'s {what}", s.member)));
                }
            }
            Ok(out)
        };
        let reveal = Reveal {
            from: member,
            self_seeds: shares(&request.self_seeds, &c.survivors, "self-mask seed")?,
            mask_secrets: shares(&request.mask_secrets, &c.dropped, "mask secret")?,
        };
        if repeated(c.reveals.get(&member), &reveal, "revealed other shares")? {
            return Ok(());
        }
        c.reveals.insert(member, reveal);
        Ok(())
    }

    /// The coordinator's verdicts on the communities' sums are in: members learn them.
    pub fn measured(&mut self) {
        self.stage = Stage::Done;
    }

    /// Has every member the current stage waits for answered, in every community?
    pub fn stage_complete(&self) -> bool {
        self.communities.iter().all(|c| c.complete(self.stage))
    }

    /// Closes the current stage: a community below its threshold fails; the others move on to
    /// `next`, which closes at `closes`. Closing REVEAL returns each surviving community's sum.
    pub fn close_stage(&mut self, closes: Instant) -> Vec<(usize, CommunitySum)> {
        let stage = self.stage;
        let mut sums = Vec::new();
        for (position, c) in self.communities.iter_mut().enumerate() {
            if c.failure.is_some() {
                continue;
            }
            let threshold = c.community.threshold;
            match stage {
                Stage::Keys if c.adverts.len() < threshold => c.fail(stage, c.adverts.len()),
                Stage::Shares if c.sealed.len() < threshold => c.fail(stage, c.sealed.len()),
                Stage::Masked if c.masked.len() < threshold => c.fail(stage, c.masked.len()),
                Stage::Masked => {
                    let (survivors, dropped) = c.collector.survivors_and_dropped();
                    c.survivors = survivors;
                    c.dropped = dropped;
                }
                Stage::Reveal => {
                    let reveals: Vec<Reveal> = c.reveals.values().cloned().collect();
                    match c.collector.unmask(&reveals) {
                        Ok(sum) => sums.push((position, sum)),
                        Err(e) => {
                            tracing::warn!(community = %c.id, code = "community_failed", "{e}");
                            c.failure = Some(e.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        // After REVEAL the stage stays until the sums are measured ([`Self::measured`]).
        self.stage = match stage {
            Stage::Keys => Stage::Shares,
            Stage::Shares => Stage::Masked,
            Stage::Masked | Stage::Reveal => Stage::Reveal,
            Stage::Done => Stage::Done,
        };
        self.stage_closes = closes;
        sums
    }
}

/// Whether a member's message repeats one already recorded (a retry: nothing to do); a
/// different one is refused — a member says one thing per stage.
fn repeated<T: PartialEq>(earlier: Option<&T>, now: &T, what: &str) -> Result<bool, SecureRefusal> {
    match earlier {
        Some(earlier) if earlier == now => Ok(true),
        Some(_) => Err(SecureRefusal::Conflicting(format!("this member already {what}"))),
        None => Ok(false),
    }
}

/// How often a node asks for its community's state while it waits for a stage.
const POLL: Duration = Duration::from_millis(100);

/// A node's part in one secure round, after its keys are out.
pub struct Membership {
    round: u64,
    community: Community,
    id: String,
    member: Member,
    index: MemberIndex,
}

/// What became of a node's keys stages (when they did not end in an error).
pub enum Taken {
    /// The node took part in the keys stages and goes on.
    Keys(Box<Membership>),
    SatOut(SatOut),
}

/// Why a node cannot finish this round's protocol (it joined late, was refused, or its
/// community failed): nothing of its update left it in the clear.
#[derive(Debug)]
pub struct SatOut {
    pub code: String,
    pub detail: String,
}

fn refused(code: &str, detail: impl Into<String>) -> SatOut {
    SatOut { code: code.into(), detail: detail.into() }
}

/// Polls until the community is at `stage` or past it; `None` once the round has moved on.
async fn wait_for(
    client: &mut ConsortiumClient<Channel>,
    round: u64,
    stage: proto::SecureStage,
) -> Result<Option<proto::CommunityState>, NetError> {
    loop {
        let state = client.community(proto::CommunityRequest { round }).await?.into_inner();
        // The coordinator has moved past the round, or not set it up yet.
        if state.round > round {
            return Ok(None);
        }
        if state.round < round {
            tokio::time::sleep(POLL).await;
            continue;
        }
        let now = proto::SecureStage::try_from(state.stage).unwrap_or(proto::SecureStage::Unspecified);
        if now == proto::SecureStage::Failed || now as i32 >= stage as i32 {
            return Ok(Some(state));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn stage_of(state: &proto::CommunityState) -> proto::SecureStage {
    proto::SecureStage::try_from(state.stage).unwrap_or(proto::SecureStage::Unspecified)
}

/// The community the coordinator announces, checked against the consortium's rule: it crosses
/// the network.
fn community_of(
    state: &proto::CommunityState,
    settings: &proto::SecureAggregationSettings,
) -> Result<Community, NetError> {
    let members = state.members as usize;
    let bad = |why: String| NetError::Protocol(format!("the coordinator announces {}: {why}", state.community));
    if members < settings.community_size as usize {
        return Err(bad(format!("{members} members, fewer than the consortium's {}", settings.community_size)));
    }
    if state.threshold as usize != SecureAggregationConfig::threshold(members) {
        return Err(bad(format!(
            "threshold {} for {members} members, the rule's is {}",
            state.threshold,
            SecureAggregationConfig::threshold(members)
        )));
    }
    if state.range != settings.range {
        return Err(bad(format!("range {}, the consortium's is {}", state.range, settings.range)));
    }
    if state.member as usize >= members {
        return Err(bad(format!("member index {} of {members}", state.member)));
    }
    let length = usize::try_from(state.length).map_err(|_| bad(format!("{} values per update", state.length)))?;
    Community::new(state.round, state.index, members, state.threshold as usize, state.range, length)
        .map_err(|e| bad(e.to_string()))
}

/// The KEYS and SHARES stages: advertise, then seal shares to every advertised member. A node
/// that first sees its community past KEYS sits the round out.
pub async fn keys(
    client: &mut ConsortiumClient<Channel>,
    secret: &[u8; 32],
    round: u64,
    settings: &proto::SecureAggregationSettings,
) -> Result<Taken, NetError> {
    let Some(state) = wait_for(client, round, proto::SecureStage::Keys).await? else {
        return Ok(Taken::SatOut(refused("late", "the round moved on before its keys stage")));
    };
    match stage_of(&state) {
        proto::SecureStage::Keys => {}
        proto::SecureStage::Failed => return Ok(Taken::SatOut(refused("community_failed", state.failure))),
        _ => {
            return Ok(Taken::SatOut(refused(
                "missed_stage",
                "the round's keys stage had closed when this node arrived (it joined late or reconnected): it sits this round out and its community counts it as dropped",
            )))
        }
    }
    let community = community_of(&state, settings)?;
    let index = state.member;
    let mut member = Member::new(index, secret, &community);
    let advert = member.advert();
    let sent = client
        .advertise(proto::AdvertiseRequest {
            round,
            cipher_key: advert.cipher_key.to_vec(),
            mask_key: advert.mask_key.to_vec(),
        })
        .await;
    if let Some(refusal) = protocol_refusal(sent)? {
        return Ok(Taken::SatOut(refusal));
    }
    let Some(state) = wait_for(client, round, proto::SecureStage::Shares).await? else {
        return Ok(Taken::SatOut(refused("late", "the round moved on during its keys stage")));
    };
    match stage_of(&state) {
        proto::SecureStage::Shares => {}
        proto::SecureStage::Failed => return Ok(Taken::SatOut(refused("community_failed", state.failure))),
        _ => return Ok(Taken::SatOut(refused("missed_stage", "the shares stage closed before this node's turn"))),
    }
    let mut adverts = Vec::new();
    for a in &state.adverts {
        let key = |b: &[u8]| {
            <[u8; 32]>::try_from(b)
                .map_err(|_| NetError::Protocol(format!("the coordinator relays a {}-byte public key", b.len())))
        };
        if a.member as usize >= community.members {
            return Err(NetError::Protocol(format!("the coordinator relays an advert of member {}", a.member)));
        }
        adverts.push(Advert { member: a.member, cipher_key: key(&a.cipher_key)?, mask_key: key(&a.mask_key)? });
    }
    // The coordinator must relay our own keys unchanged: else it speaks for us to the others.
    if !adverts.contains(&advert) {
        return Err(NetError::Protocol("the coordinator's relayed adverts do not hold this node's own keys".into()));
    }
    let sealed = member.share(&community, &adverts).map_err(|e| NetError::Protocol(e.to_string()))?;
    let sent = client
        .share(proto::ShareRequest {
            round,
            sealed: sealed
                .into_iter()
                .map(|s| proto::Sealed { from: s.from, to: s.to, ciphertext: s.ciphertext, tag: s.tag.to_vec() })
                .collect(),
        })
        .await;
    if let Some(refusal) = protocol_refusal(sent)? {
        return Ok(Taken::SatOut(refusal));
    }
    // Tests kill a node here: its shares are out, its masked update never will be.
    weft_durable::crash::point("secagg-shared");
    Ok(Taken::Keys(Box::new(Membership { round, id: state.community, community, member, index })))
}

/// A refusal of one of our protocol messages is the round's outcome, not the node's end;
/// a lost connection is an error (the node reconnects).
fn protocol_refusal<T>(sent: Result<tonic::Response<T>, Status>) -> Result<Option<SatOut>, NetError> {
    match sent {
        Ok(_) => Ok(None),
        Err(status)
            if matches!(
                status.code(),
                tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument | tonic::Code::PermissionDenied
            ) =>
        {
            let (code, detail) = status.message().split_once(": ").unwrap_or(("refused", status.message()));
            Ok(Some(refused(code, detail)))
        }
        Err(status) => Err(NetError::Refused(status)),
    }
}

/// How a community's round ended for one of its members.
pub struct Finished {
    pub community: String,
    pub accepted: bool,
    pub code: String,
    pub detail: String,
    pub quality: f64,
    pub wire_bytes: u64,
}

/// The MASKED and REVEAL stages: open the shares sealed to this member, mask `update`, upload
/// it, reveal what the coordinator asks (one secret per member, never both), and wait for the
/// community's verdict.
pub async fn finish(
    client: &mut ConsortiumClient<Channel>,
    mut membership: Box<Membership>,
    base_hash: ContentHash,
    update: &[f32],
) -> Result<Result<Finished, SatOut>, NetError> {
    let round = membership.round;
    let community = membership.community.clone();
    let Some(state) = wait_for(client, round, proto::SecureStage::Masked).await? else {
        return Ok(Err(refused("late", "the round moved on before its masked stage")));
    };
    match stage_of(&state) {
        proto::SecureStage::Masked => {}
        proto::SecureStage::Failed => return Ok(Err(refused("community_failed", state.failure))),
        _ => {
            return Ok(Err(refused(
                "late",
                "the masked stage closed (the round's deadline) before this node finished training",
            )))
        }
    }
    let mut inbox = Vec::new();
    for s in &state.inbox {
        let tag = <[u8; 32]>::try_from(s.tag.as_slice())
            .map_err(|_| NetError::Protocol(format!("the coordinator relays a {}-byte tag", s.tag.len())))?;
        inbox.push(SealedShares { from: s.from, to: s.to, ciphertext: s.ciphertext.clone(), tag });
    }
    // A share that does not authenticate (another member's fault, or the relay's) costs this
    // node the round, not its place in the consortium: it sends nothing and counts as dropped.
    if let Err(e) = membership.member.receive(&community, &inbox) {
        return Ok(Err(refused("forged_share", format!("{}: {e}; this node sends nothing this round", membership.id))));
    }
    let masked = membership.member.mask(&community, update).map_err(|e| NetError::Protocol(e.to_string()))?;
    let clipped = update.iter().filter(|v| v.abs() > community.quantizer.range()).count();
    if clipped > 0 {
        tracing::warn!(community = %membership.id, clipped, range = community.quantizer.range(), "update values clipped to the range");
    }
    let bytes: Vec<u8> = masked.words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let wire_bytes = bytes.len() as u64;
    let header = proto::MaskedHeader { round, base_hash: base_hash.to_string(), words: masked.words.len() as u64 };
    let chunks = bytes.len().div_ceil(CHUNK);
    let head = std::iter::once(proto::MaskedPart { part: Some(proto::masked_part::Part::Header(header)) });
    let body = (0..chunks).map(move |i| {
        let end = ((i + 1) * CHUNK).min(bytes.len());
        proto::MaskedPart { part: Some(proto::masked_part::Part::Data(bytes[i * CHUNK..end].to_vec())) }
    });
    let sent = client.upload_masked(tokio_stream::iter(head.chain(body))).await;
    if let Some(refusal) = protocol_refusal(sent)? {
        return Ok(Err(refusal));
    }
    let Some(state) = wait_for(client, round, proto::SecureStage::Reveal).await? else {
        return Ok(Err(refused("late", "the round moved on before its reveal stage")));
    };
    match stage_of(&state) {
        proto::SecureStage::Reveal => {}
        proto::SecureStage::Failed => return Ok(Err(refused("community_failed", state.failure))),
        _ => return Ok(Err(refused("missed_stage", "the reveal stage closed before this node's turn"))),
    }
    let survivors: BTreeSet<MemberIndex> = state.survivors.iter().copied().collect();
    let dropped: BTreeSet<MemberIndex> = state.dropped.iter().copied().collect();
    if !survivors.contains(&membership.index) {
        return Err(NetError::Protocol(
            "the coordinator names this node dropped after it sent its masked update".into(),
        ));
    }
    // `reveal` refuses to give both secrets of one member (and below the threshold, anything).
    let reveal = membership
        .member
        .reveal(&community, &survivors, &dropped)
        .map_err(|e| NetError::Protocol(format!("refusing to reveal: {e}")))?;
    let shares = |m: &BTreeMap<MemberIndex, Share>| {
        m.iter()
            .map(|(member, s)| proto::RevealedShare { member: *member, x: u32::from(s.x), y: s.y.to_vec() })
            .collect()
    };
    let sent = client
        .reveal(proto::RevealRequest {
            round,
            self_seeds: shares(&reveal.self_seeds),
            mask_secrets: shares(&reveal.mask_secrets),
        })
        .await;
    if let Some(refusal) = protocol_refusal(sent)? {
        return Ok(Err(refusal));
    }
    let Some(state) = wait_for(client, round, proto::SecureStage::Done).await? else {
        return Ok(Err(refused("late", "the round moved on before the community's verdict")));
    };
    if stage_of(&state) == proto::SecureStage::Failed {
        return Ok(Err(refused("community_failed", state.failure)));
    }
    Ok(Ok(Finished {
        community: membership.id,
        accepted: state.accepted,
        code: state.code,
        detail: state.detail,
        quality: state.quality,
        wire_bytes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    fn round(nodes: &[&str], length: usize) -> SecureRound {
        let partition = BTreeMap::from([("community-1".to_owned(), nodes.iter().map(|n| (*n).to_owned()).collect())]);
        let settings = SecureAggregationConfig { community_size: 3, range: 1.0, stage_secs: 30 };
        SecureRound::new(4, ContentHash([7; 32]), &partition, &settings, length, Instant::now()).unwrap()
    }

    fn members(r: &SecureRound) -> Vec<Member> {
        let c = &r.communities[0].community;
        (0..c.members as u32).map(|m| Member::new(m, &[m as u8 + 10; 32], c)).collect()
    }

    fn advertise(r: &mut SecureRound, name: &str, m: &Member) -> Result<(), SecureRefusal> {
        let a = m.advert();
        r.advertise(
            &node(name),
            &proto::AdvertiseRequest { round: 4, cipher_key: a.cipher_key.to_vec(), mask_key: a.mask_key.to_vec() },
        )
    }

    fn sealed(shares: Vec<SealedShares>) -> Vec<proto::Sealed> {
        shares
            .into_iter()
            .map(|s| proto::Sealed { from: s.from, to: s.to, ciphertext: s.ciphertext, tag: s.tag.to_vec() })
            .collect()
    }

    fn adverts(r: &SecureRound) -> Vec<Advert> {
        r.communities[0].adverts.values().copied().collect()
    }

    fn inbox(r: &SecureRound, member: MemberIndex) -> Vec<SealedShares> {
        r.communities[0].sealed.values().flatten().filter(|s| s.to == member).cloned().collect()
    }

    fn reveal_request(reveal: &Reveal) -> proto::RevealRequest {
        let list = |m: &BTreeMap<MemberIndex, Share>| {
            m.iter().map(|(k, s)| proto::RevealedShare { member: *k, x: u32::from(s.x), y: s.y.to_vec() }).collect()
        };
        proto::RevealRequest {
            round: 4,
            self_seeds: list(&reveal.self_seeds),
            mask_secrets: list(&reveal.mask_secrets),
        }
    }

    #[test]
    fn a_dropped_member_is_recovered_and_every_bad_message_is_refused_by_name() {
        let names = ["node-a", "node-b", "node-c"];
        let mut r = round(&names, 4);
        let mut m = members(&r);
        let c = r.communities[0].community.clone();
        // KEYS: a short key, a stranger, a message for the wrong stage, a conflicting repeat.
        let short = proto::AdvertiseRequest { round: 4, cipher_key: vec![1; 31], mask_key: vec![1; 32] };
        assert_eq!(r.advertise(&node("node-a"), &short).unwrap_err().code(), "malformed_protocol_message");
        assert_eq!(advertise(&mut r, "node-x", &m[0]).unwrap_err().code(), "not_in_community");
        assert_eq!(
            r.share(&node("node-a"), &proto::ShareRequest { round: 4, sealed: vec![] }).unwrap_err().code(),
            "wrong_stage"
        );
        for (i, name) in names.iter().enumerate() {
            advertise(&mut r, name, &m[i]).unwrap();
        }
        advertise(&mut r, "node-a", &m[0]).unwrap();
        assert_eq!(advertise(&mut r, "node-a", &m[1]).unwrap_err().code(), "conflicting_protocol_message");
        assert!(r.stage_complete());
        assert!(r.close_stage(Instant::now()).is_empty());
        // SHARES: shares must go to every other member, sealed by the sender.
        let all = adverts(&r);
        let a_shares = m[0].share(&c, &all).unwrap();
        let partial = proto::ShareRequest { round: 4, sealed: sealed(a_shares[..1].to_vec()) };
        assert_eq!(r.share(&node("node-a"), &partial).unwrap_err().code(), "malformed_protocol_message");
        let as_b = proto::ShareRequest { round: 4, sealed: sealed(a_shares.clone()) };
        assert_eq!(r.share(&node("node-b"), &as_b).unwrap_err().code(), "malformed_protocol_message");
        for (i, name) in names.iter().enumerate() {
            let shares = m[i].share(&c, &all).unwrap();
            r.share(&node(name), &proto::ShareRequest { round: 4, sealed: sealed(shares) }).unwrap();
        }
        r.close_stage(Instant::now());
        // MASKED: node-c drops out after sharing.
        let updates = [vec![0.5, -0.25, 0.125, 0.0], vec![-0.5, 0.75, 0.25, 1.0], vec![0.9, 0.9, 0.9, 0.9]];
        for (i, member) in m.iter_mut().enumerate() {
            member.receive(&c, &inbox(&r, i as u32)).unwrap();
        }
        let header = |words| proto::MaskedHeader { round: 4, base_hash: ContentHash([7; 32]).to_string(), words };
        assert_eq!(r.check_masked(&node("node-a"), &header(5)).unwrap_err().code(), "malformed_protocol_message");
        let stale = proto::MaskedHeader { base_hash: ContentHash([8; 32]).to_string(), ..header(4) };
        assert_eq!(r.check_masked(&node("node-a"), &stale).unwrap_err().code(), "malformed_protocol_message");
        for (i, name) in names[..2].iter().enumerate() {
            r.check_masked(&node(name), &header(4)).unwrap();
            r.masked(&node(name), 4, m[i].mask(&c, &updates[i]).unwrap().words, 16).unwrap();
        }
        assert_eq!(r.check_masked(&node("node-a"), &header(4)).unwrap_err().code(), "conflicting_protocol_message");
        assert!(!r.stage_complete(), "node-c shared, so the stage waits for it until its deadline");
        r.close_stage(Instant::now());
        // REVEAL: survivors a and b; c's mask secret, never its self-mask seed.
        let survivors = BTreeSet::from([0, 1]);
        let dropped = BTreeSet::from([2]);
        let reveals: Vec<Reveal> = m[..2].iter().map(|x| x.reveal(&c, &survivors, &dropped).unwrap()).collect();
        let mut asks_too_much = reveal_request(&reveals[0]);
        asks_too_much.self_seeds.push(proto::RevealedShare { member: 2, x: 1, y: vec![0; 32] });
        assert_eq!(r.reveal(&node("node-a"), &asks_too_much).unwrap_err().code(), "malformed_protocol_message");
        assert_eq!(r.reveal(&node("node-c"), &reveal_request(&reveals[0])).unwrap_err().code(), "missed_stage");
        for (i, name) in names[..2].iter().enumerate() {
            r.reveal(&node(name), &reveal_request(&reveals[i])).unwrap();
        }
        assert!(r.stage_complete());
        let sums = r.close_stage(Instant::now());
        assert_eq!(sums.len(), 1);
        let sum = &sums[0].1;
        assert_eq!(sum.members, survivors);
        for (k, s) in sum.sum.iter().enumerate() {
            assert!((s - (updates[0][k] + updates[1][k])).abs() < 1e-6, "{k}: {s}");
        }
        r.measured();
        assert_eq!(r.state(&node("node-c"), 4).unwrap().stage, proto::SecureStage::Done as i32);
    }

    #[test]
    fn a_community_below_its_threshold_fails_by_name_and_refuses_what_follows() {
        let names = ["node-a", "node-b", "node-c", "node-d"];
        let mut r = round(&names, 2);
        let m = members(&r);
        // Threshold 3 of 4: two adverts are too few.
        advertise(&mut r, "node-a", &m[0]).unwrap();
        advertise(&mut r, "node-b", &m[1]).unwrap();
        r.close_stage(Instant::now());
        let state = r.state(&node("node-a"), 4).unwrap();
        assert_eq!(state.stage, proto::SecureStage::Failed as i32);
        assert!(state.failure.contains("only 2 of its 4 members answered the keys stage"), "{}", state.failure);
        let refused = r.share(&node("node-a"), &proto::ShareRequest { round: 4, sealed: vec![] }).unwrap_err();
        assert_eq!(refused.code(), "community_failed");
        // Another round's question gets only the round the coordinator runs.
        assert_eq!(r.state(&node("node-a"), 5).unwrap(), proto::CommunityState { round: 4, ..Default::default() });
    }
}
