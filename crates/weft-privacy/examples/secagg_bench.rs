//! Secure aggregation's cost: masking (quantize + self mask + k − 1 pairwise masks) per member,
//! unmasking at the collector (sum, self masks off, a dropped member's pairwise masks off), and
//! bytes on the wire, against sending the f32 update in the clear. Median of `RUNS` runs.
//!
//!     cargo run --release -p weft-privacy --example secagg_bench [-- LENGTH...]
//!
//! One JSON line per (length, members).

use std::collections::BTreeSet;
use std::io::Write;
use std::time::Instant;

use weft_privacy::secagg::{exchange_keys, Collector, Community, Member};

const RUNS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let lengths: Vec<usize> = match std::env::args().skip(1).map(|a| a.parse()).collect::<Result<Vec<_>, _>>()? {
        l if l.is_empty() => vec![120_576, 1_000_000],
        l => l,
    };
    for &length in &lengths {
        for members in [3usize, 5] {
            let threshold = members / 2 + 1;
            let (mut mask_s, mut unmask_s, mut setup_s) = (Vec::new(), Vec::new(), Vec::new());
            let mut control_bytes = 0usize;
            for run in 0..RUNS {
                let c = Community::new(run as u64, 1, members, threshold, 1.0, length)?;
                let update: Vec<f32> = (0..length).map(|i| ((i % 1000) as f32 / 1000.0 - 0.5) * 0.1).collect();
                let started = Instant::now();
                let mut nodes: Vec<Member> =
                    (0..members as u32).map(|m| Member::new(m, &[m as u8 + 1; 32], &c)).collect();
                let mut collector = Collector::new(c.clone());
                exchange_keys(&c, &mut nodes, &mut collector)?;
                setup_s.push(started.elapsed().as_secs_f64() / members as f64);
                // One member masks (timed); the last one drops out after sharing.
                let started = Instant::now();
                let first = nodes[0].mask(&c, &update)?;
                mask_s.push(started.elapsed().as_secs_f64());
                let mut masked = vec![first];
                for m in &nodes[1..members - 1] {
                    masked.push(m.mask(&c, &update)?);
                }
                // The collector's side (timed, as Flower's unmasking is): summing the masked
                // updates as they arrive, then removing the masks.
                let started = Instant::now();
                for update in masked {
                    collector.masked(update)?;
                }
                let summing = started.elapsed().as_secs_f64();
                let (survivors, dropped) = collector.survivors_and_dropped();
                let reveals = nodes[..members - 1]
                    .iter()
                    .map(|m| m.reveal(&c, &survivors, &dropped))
                    .collect::<Result<Vec<_>, _>>()?;
                let started = Instant::now();
                let sum = collector.unmask(&reveals)?;
                unmask_s.push(summing + started.elapsed().as_secs_f64());
                assert_eq!(sum.members, (0..members as u32 - 1).collect::<BTreeSet<_>>());
                // Per member: its advert (2 keys), the shares it seals to the others (66 B + a
                // 32 B tag each), and its reveal (33 B per member it holds a share of).
                control_bytes = 64 + (members - 1) * (66 + 32) + members * 33;
            }
            let (mask, unmask) = (median(mask_s), median(unmask_s));
            // A reader that goes away (`| head`) ends the benchmark quietly.
            let line = format!(
                "{{\"length\": {length}, \"members\": {members}, \"mask_seconds\": {mask:.6}, \"mask_values_per_second\": {:.0}, \"unmask_seconds_one_dropped\": {unmask:.6}, \"key_setup_seconds_per_member\": {:.6}, \"wire_bytes_per_member\": {}, \"plain_f32_bytes\": {}, \"runs\": {RUNS}}}",
                length as f64 / mask,
                median(setup_s),
                4 * length + control_bytes,
                4 * length
            );
            if writeln!(std::io::stdout(), "{line}").is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}
