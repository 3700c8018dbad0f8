//! Secure aggregation in the one-process demo: each community's members run the protocol of
//! `weft_privacy::secagg` (keys, sealed Shamir shares, masked updates, reveals) through a
//! collector that sees only what the coordinator would, and the coordinator receives the
//! community's mean update.

use std::collections::BTreeMap;

use anyhow::Context as _;
use weft_core::{Contribution, Delta, ModelState, NodeId};
use weft_net::config::SecureAggregationConfig;
use weft_privacy::secagg::{exchange_keys, Collector, Community, Member};

/// The mean update of `members`' contributions as `community` sees it through the protocol, or
/// why the community failed. `secret(node)` is each node's own 32 secret bytes.
pub fn community_contribution(
    round: u64,
    index: u32,
    id: &str,
    settings: &SecureAggregationConfig,
    members: &[&Contribution],
    secret: impl Fn(&NodeId) -> [u8; 32],
) -> anyhow::Result<Contribution> {
    let first = members.first().context("a community without members")?;
    let layout = first.delta.state();
    let length: usize = layout.iter().map(|(_, t)| t.data().len()).sum();
    let community = Community::new(
        round,
        index,
        members.len(),
        SecureAggregationConfig::threshold(members.len()),
        settings.range,
        length,
    )?;
    let mut nodes: Vec<Member> =
        members.iter().enumerate().map(|(i, c)| Member::new(i as u32, &secret(&c.node), &community)).collect();
    let mut collector = Collector::new(community.clone());
    exchange_keys(&community, &mut nodes, &mut collector)?;
    let mut clipped = 0usize;
    for (m, c) in nodes.iter().zip(members) {
        let flat = c.delta.state().flat_values();
        clipped += flat.iter().filter(|v| v.abs() > settings.range).count();
        collector.masked(m.mask(&community, &flat)?)?;
    }
    if clipped > 0 {
        tracing::warn!(community = id, clipped, range = settings.range, "update values clipped to the range");
    }
    let (survivors, dropped) = collector.survivors_and_dropped();
    let reveals = nodes.iter().map(|m| m.reveal(&community, &survivors, &dropped)).collect::<Result<Vec<_>, _>>()?;
    let sum = collector.unmask(&reveals)?;
    let n = sum.members.len() as f32;
    let mean: Vec<f32> = sum.sum.iter().map(|s| s / n).collect();
    Ok(Contribution {
        node: NodeId::new(id)?,
        round,
        base_hash: first.base_hash,
        delta: Delta::from_state(ModelState::from_flat(layout, &mean)?),
        token_count: members.iter().map(|c| c.token_count).sum(),
        declared: BTreeMap::new(),
    })
}
