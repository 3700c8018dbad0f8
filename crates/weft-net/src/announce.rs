//! What a round announces to nodes beside its base: the adapter they train, on the wire.

use weft_core::{AdapterRound, AdapterTrack};

use crate::proto;

pub fn adapter_to_proto(record: &AdapterRound) -> proto::AdapterRound {
    proto::AdapterRound {
        seed: record.seed,
        rank: u32::try_from(record.rank).unwrap_or(u32::MAX),
        alpha: record.alpha,
        targets: record.targets.clone(),
        track: match record.track {
            AdapterTrack::Shared => "shared",
            AdapterTrack::Full => "full",
        }
        .to_owned(),
    }
}

/// The adapter a coordinator announced; what does not parse is named. (Whether the model can
/// carry it — rank, targets — the node's family checks when it builds the round's factors.)
pub fn adapter_from_proto(wire: &proto::AdapterRound) -> Result<AdapterRound, String> {
    let track = match wire.track.as_str() {
        "shared" => AdapterTrack::Shared,
        "full" => AdapterTrack::Full,
        other => return Err(format!("the round's adapter track {other:?} is neither shared nor full")),
    };
    if wire.rank == 0 || !(wire.alpha.is_finite() && wire.alpha > 0.0) || wire.targets.is_empty() {
        return Err(format!(
            "the round's adapter needs a rank ≥ 1, a positive alpha and targets, got rank {} alpha {} targets {:?}",
            wire.rank, wire.alpha, wire.targets
        ));
    }
    Ok(AdapterRound {
        seed: wire.seed,
        rank: wire.rank as usize,
        alpha: wire.alpha,
        targets: wire.targets.clone(),
        track,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adapter_reads_back_as_announced_and_a_bad_one_is_named() {
        for track in [AdapterTrack::Shared, AdapterTrack::Full] {
            let record = AdapterRound { seed: u64::MAX, rank: 8, alpha: 16.0, targets: vec!["all".into()], track };
            assert_eq!(adapter_from_proto(&adapter_to_proto(&record)).unwrap(), record);
        }
        let wire = adapter_to_proto(&AdapterRound {
            seed: 1,
            rank: 8,
            alpha: 16.0,
            targets: vec!["q".into()],
            track: AdapterTrack::Shared,
        });
        let err = adapter_from_proto(&proto::AdapterRound { track: "both".into(), ..wire.clone() }).unwrap_err();
        assert!(err.contains("\"both\""), "{err}");
        assert!(adapter_from_proto(&proto::AdapterRound { rank: 0, ..wire.clone() }).is_err());
        assert!(adapter_from_proto(&proto::AdapterRound { alpha: f32::NAN, ..wire }).is_err());
    }
}
