//! Crash safety of the real binary: the demo is killed (abort, as `kill -9` would) at every
//! crash point on many of its passes, then run again with the same --out. Every run must end
//! with the bases of a run that never crashed, bit for bit, and a ledger that verifies.
//! `scripts/crash-sweep` kills the process at random moments instead, for longer.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const RUN: &[&str] = &[
    "demo",
    "--nodes",
    "3",
    "--rounds",
    "3",
    "--local-steps",
    "4",
    "--layers",
    "1",
    "--heads",
    "2",
    "--width",
    "16",
    "--context",
    "16",
    "--batch",
    "4",
];

fn weft(args: &[&str], crash_at: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_weft"));
    command.args(args);
    match crash_at {
        Some(point) => command.env("WEFT_CRASH_AT", point),
        None => command.env_remove("WEFT_CRASH_AT"),
    };
    command.output().expect("the weft binary runs")
}

fn run(out: &Path, crash_at: Option<&str>) -> Output {
    run_with(out, crash_at, &[])
}

fn run_with(out: &Path, crash_at: Option<&str>, extra: &[&str]) -> Output {
    let json = out.with_extension("json");
    let mut args = RUN.to_vec();
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--out", out.to_str().unwrap(), "--json", json.to_str().unwrap()]);
    weft(&args, crash_at)
}

fn base_hashes(out: &Path) -> Vec<String> {
    let report: Value = serde_json::from_slice(&std::fs::read(out.with_extension("json")).unwrap()).unwrap();
    report["rounds"].as_array().unwrap().iter().map(|r| r["base_hash"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn a_crash_at_any_point_loses_nothing_and_changes_no_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("reference");
    assert!(run(&reference, None).status.success());
    let expected = base_hashes(&reference);
    assert_eq!(expected.len(), 3);
    // (point, passes): 3 nodes × 3 rounds pass the per-contribution points 9 times, etc.
    let points: &[(&str, &[u32])] = &[
        ("node-trained", &[1, 5, 9]),
        ("artifact-before-manifest", &[2, 7]),
        ("contribution-measured", &[1, 4, 9]),
        ("blob-written", &[1, 3, 8, 12]),
        ("journal-before-commit", &[1, 2, 5, 11, 16]),
        ("round-aggregated", &[1, 3]),
        ("round-blobs-stored", &[2]),
    ];
    let mut crashes = 0;
    for (point, passes) in points {
        for pass in *passes {
            let spec = format!("{point}:{pass}");
            let out = tmp.path().join(spec.replace(':', "-"));
            let crashed = run(&out, Some(&spec));
            assert!(!crashed.status.success(), "{spec}: the crash point was never reached");
            assert!(String::from_utf8_lossy(&crashed.stderr).contains("crash point"), "{spec}");
            crashes += 1;
            let resumed = run(&out, None);
            assert!(resumed.status.success(), "{spec}: resume failed:\n{}", String::from_utf8_lossy(&resumed.stderr));
            assert_eq!(base_hashes(&out), expected, "{spec}: the bases differ from a run without a crash");
            let verify = weft(&["ledger", "verify", out.join("coordinator").to_str().unwrap()], None);
            assert!(verify.status.success(), "{spec}: {}", String::from_utf8_lossy(&verify.stderr));
        }
    }
    assert_eq!(crashes, 20);
}

/// Killed mid-round under each privacy tier, a run resumes to the bases of a run that never
/// stopped: DP's streams are keyed by the node and round (the same noise again), privacy charges
/// are not made twice, and the round's partition into communities is the same one (recorded
/// again after the restart, identical, which verify accepts).
#[test]
fn privacy_tiers_survive_a_crash_mid_round() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, flags) in
        [("dp", &["--privacy", "dp", "--epsilon", "8"][..]), ("secagg", &["--secure-aggregation", "3"][..])]
    {
        let reference = tmp.path().join(format!("{name}-reference"));
        assert!(run_with(&reference, None, flags).status.success(), "{name}");
        for spec in ["contribution-measured:2", "journal-before-commit:6"] {
            let out = tmp.path().join(format!("{name}-{}", spec.replace(':', "-")));
            let crashed = run_with(&out, Some(spec), flags);
            assert!(!crashed.status.success(), "{name} {spec}: the crash point was never reached");
            let resumed = run_with(&out, None, flags);
            assert!(resumed.status.success(), "{name} {spec}: {}", String::from_utf8_lossy(&resumed.stderr));
            assert_eq!(base_hashes(&out), base_hashes(&reference), "{name} {spec}");
            let verify = weft(&["ledger", "verify", out.join("coordinator").to_str().unwrap()], None);
            assert!(verify.status.success(), "{name} {spec}: {}", String::from_utf8_lossy(&verify.stderr));
        }
    }
}

/// With governance, a restart mid-round scores the committed contributions again from the
/// stored deltas; reputation and bases come out the same.
#[test]
fn governance_state_survives_a_crash_mid_round() {
    let tmp = tempfile::tempdir().unwrap();
    let report =
        |out: &Path| -> Value { serde_json::from_slice(&std::fs::read(out.with_extension("json")).unwrap()).unwrap() };
    let reference = tmp.path().join("reference");
    assert!(run_with(&reference, None, &["--governance"]).status.success());
    for spec in ["contribution-measured:5", "journal-before-commit:9"] {
        let out = tmp.path().join(spec.replace(':', "-"));
        assert!(!run_with(&out, Some(spec), &["--governance"]).status.success());
        let resumed = run_with(&out, None, &["--governance"]);
        assert!(resumed.status.success(), "{spec}: {}", String::from_utf8_lossy(&resumed.stderr));
        assert_eq!(base_hashes(&out), base_hashes(&reference), "{spec}");
        let last = |r: &Value| r["rounds"][2]["governance"]["reputation"].clone();
        assert_eq!(last(&report(&out)), last(&report(&reference)), "{spec}: reputation differs");
    }
}

#[test]
fn ledger_commands_verify_prove_roll_back_and_name_a_tampered_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    assert!(run(&out, None).status.success());
    let storage = out.join("coordinator");
    let dir = storage.to_str().unwrap();
    let expected = base_hashes(&out);

    let proof = tmp.path().join("proof.json");
    let proved =
        weft(&["ledger", "prove", dir, "--node", "node-de", "--round", "2", "--out", proof.to_str().unwrap()], None);
    assert!(proved.status.success(), "{}", String::from_utf8_lossy(&proved.stderr));
    let checked = weft(&["ledger", "check-proof", proof.to_str().unwrap()], None);
    assert!(checked.status.success());
    // The same proof under another key is refused.
    let other = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29";
    let refused = weft(&["ledger", "check-proof", proof.to_str().unwrap(), "--key", other], None);
    assert!(!refused.status.success());

    let shown = weft(&["ledger", "show", dir], None);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("round 3 published base") && text.contains("accepted  weight"), "{text}");

    let rolled = weft(&["coordinator", "rollback", dir, "--to-round", "1"], None);
    assert!(rolled.status.success(), "{}", String::from_utf8_lossy(&rolled.stderr));
    let verified = weft(&["ledger", "verify", dir, "--json"], None);
    let report: Value = serde_json::from_slice(&verified.stdout).unwrap();
    assert_eq!(report["final_base_hash"].as_str().unwrap(), expected[0]);
    assert_eq!(report["rollbacks"], 1);

    let bundle = tmp.path().join("bundle");
    let node_dir = out.join("nodes").join("node-en");
    let exported = weft(
        &[
            "node",
            "export",
            node_dir.to_str().unwrap(),
            "--coordinator",
            dir,
            "--node",
            "node-en",
            "--out",
            bundle.to_str().unwrap(),
        ],
        None,
    );
    assert!(exported.status.success(), "{}", String::from_utf8_lossy(&exported.stderr));
    assert!(bundle.join("round-0003").join("model.safetensors").is_file());
    let proofs = weft(&["ledger", "check-proof", bundle.join("proofs.json").to_str().unwrap()], None);
    assert_eq!(String::from_utf8_lossy(&proofs.stdout).matches("proof OK").count(), 3);

    // One byte of entry 5 changed in the database: verify fails and names entry 5.
    let db = rusqlite::Connection::open(storage.join("state.sqlite")).unwrap();
    let mut line: Vec<u8> = db.query_row("SELECT line FROM ledger WHERE seq = 5", [], |r| r.get(0)).unwrap();
    let at = line.len() / 2;
    line[at] ^= 0x04;
    db.execute("UPDATE ledger SET line = ?1 WHERE seq = 5", rusqlite::params![line]).unwrap();
    drop(db);
    let broken = weft(&["ledger", "verify", dir], None);
    assert!(!broken.status.success());
    let message = String::from_utf8_lossy(&broken.stderr);
    assert!(message.contains("ledger entry 5"), "{message}");
}
