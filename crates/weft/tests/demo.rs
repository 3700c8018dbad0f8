//! The real `weft` binary, run as a user would run it.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

/// A small consortium so that the suite stays fast on two cores.
const SMALL: &[&str] = &["--layers", "1", "--heads", "2", "--width", "32", "--context", "32", "--batch", "8"];

fn weft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weft")).args(args).output().expect("the weft binary runs")
}

fn demo_json(dir: &Path, name: &str, extra: &[&str]) -> Value {
    let json = dir.join(name);
    let mut args = vec!["demo", "--json", json.to_str().unwrap()];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    let out = weft(&args);
    assert!(out.status.success(), "weft demo failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

#[test]
fn demo_report_has_the_documented_schema_and_loss_falls_for_every_language() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("run");
    let report =
        demo_json(tmp.path(), "r.json", &["--rounds", "2", "--local-steps", "30", "--out", out_dir.to_str().unwrap()]);
    assert_eq!(report["seed"], 0);
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    for round in rounds {
        assert!(round["round"].is_u64());
        assert_eq!(round["base_hash"].as_str().unwrap().len(), 64);
        assert!(round["unassigned_share"].is_f64());
        assert_eq!(round["heldout_loss"].as_object().unwrap().len(), 4);
        for c in round["contributions"].as_array().unwrap() {
            for key in ["node", "language", "accepted", "reason", "quality", "weight", "declared"] {
                assert!(c.get(key).is_some(), "contribution lacks {key}: {c}");
            }
            assert!(f(&c["weight"]) <= 0.5);
        }
    }
    let initial = report["initial_heldout_loss"].as_object().unwrap();
    let last = report["final_heldout_loss"].as_object().unwrap();
    assert_eq!(initial.len(), 4);
    for (lang, before) in initial {
        let after = f(&last[lang]);
        assert!(after < f(before) - 0.1, "{lang}: {before} -> {after}");
    }
    let sovereign = report["sovereign_heldout_loss"].as_object().unwrap();
    assert_eq!(sovereign.len(), 4);
    assert!(sovereign.values().all(|t| t.as_object().unwrap().len() == 4));
    // N+1 artifacts on disk: the bases and one sovereign model per node per round.
    assert!(out_dir.join("coordinator/bases/round-0002.safetensors").is_file());
    for node in ["node-en", "node-de", "node-fr", "node-es"] {
        assert!(out_dir.join(format!("nodes/{node}/round-0002/model.safetensors")).is_file());
        assert!(out_dir.join(format!("coordinator/nodes/{node}.json")).is_file());
    }
    // `weft inspect` reads back the published base with the hash the report names.
    let base = out_dir.join("coordinator/bases/round-0002.safetensors");
    let inspect = weft(&["inspect", base.to_str().unwrap()]);
    assert!(inspect.status.success());
    let text = String::from_utf8(inspect.stdout).unwrap();
    assert!(text.contains(rounds[1]["base_hash"].as_str().unwrap()), "{text}");
}

#[test]
fn an_infeasible_cap_binds_and_leaves_a_share_with_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let report =
        demo_json(tmp.path(), "cap.json", &["--rounds", "1", "--local-steps", "10", "--nodes", "2", "--cap", "0.4"]);
    let round = &report["rounds"][0];
    for c in round["contributions"].as_array().unwrap() {
        assert_eq!(f(&c["weight"]), 0.4);
        assert_eq!(c["capped"], true);
    }
    // What stays with the base is the cap's 0.2 plus whatever the default norm bound held back.
    assert!(f(&round["unassigned_share"]) >= 0.2 - 1e-12);
    assert!((f(&round["unassigned_share"]) - (1.0 - applied(round))).abs() < 1e-12);
    // With the plain mean nothing is held back: exactly the cap's share.
    let report = demo_json(
        tmp.path(),
        "mean.json",
        &["--rounds", "1", "--local-steps", "10", "--nodes", "2", "--cap", "0.4", "--aggregator", "mean"],
    );
    assert!((f(&report["rounds"][0]["unassigned_share"]) - 0.2).abs() < 1e-9);
}

/// Σ of the coefficients the accepted deltas carried in a round's step.
fn applied(round: &Value) -> f64 {
    round["contributions"].as_array().unwrap().iter().map(|c| f(&c["influence"])).sum()
}

#[test]
fn the_unassigned_share_is_what_the_aggregator_left_with_the_base() {
    // Multi-Krum keeps 3 of 5 deltas at the cap of 0.3: the policy's weights sum to 1, the step
    // carries 0.9 and 0.1 stays with the base.
    let tmp = tempfile::tempdir().unwrap();
    let args =
        ["--rounds", "1", "--local-steps", "10", "--nodes", "5", "--cap", "0.3", "--aggregator", "multi-krum:1:3"];
    let report = demo_json(tmp.path(), "krum.json", &args);
    let round = &report["rounds"][0];
    let weights: f64 = round["contributions"].as_array().unwrap().iter().map(|c| f(&c["weight"])).sum();
    assert!((weights - 1.0).abs() < 1e-9, "{weights}");
    assert!((applied(round) - 0.9).abs() < 1e-9, "{}", applied(round));
    assert!((f(&round["unassigned_share"]) - 0.1).abs() < 1e-9, "{}", round["unassigned_share"]);
}

#[test]
fn the_same_seed_gives_the_same_bases() {
    let tmp = tempfile::tempdir().unwrap();
    let args = ["--rounds", "2", "--local-steps", "8", "--nodes", "2", "--outer", "nesterov"];
    let hashes = |r: &Value| r["rounds"].as_array().unwrap().iter().map(|x| x["base_hash"].clone()).collect::<Vec<_>>();
    let a = demo_json(tmp.path(), "a.json", &args);
    let b = demo_json(tmp.path(), "b.json", &args);
    assert_eq!(hashes(&a), hashes(&b));
    let mut other = args.to_vec();
    other.extend(["--seed", "1"]);
    assert_ne!(hashes(&a), hashes(&demo_json(tmp.path(), "c.json", &other)));
}

#[test]
fn bad_flags_get_a_clear_error() {
    for (args, needle) in [
        (&["demo", "--cap", "1.5"][..], "--cap: cap must be in (0, 1], got 1.5"),
        (&["demo", "--quorum", "2"][..], "--quorum: quorum must be in [0, 1]"),
        (&["demo", "--lr", "-1"][..], "--lr: must be a positive number"),
        (&["demo", "--rounds", "0"][..], "--rounds: must be at least 1"),
        (&["demo", "--probe-scale", "2"][..], "--probe-scale: must be in (0, 1]"),
        (&["demo", "--exploration", "0.3"][..], "--governance"),
        (&["demo", "--languages", "en,xx"][..], "unknown language 'xx'"),
        (&["demo", "--nodes", "3", "--languages", "en,de"][..], "needs 3 languages"),
        (&["demo", "--width", "30", "--heads", "4"][..], "not divisible by heads"),
        (&["demo", "--outer", "nesterov", "--momentum", "1"][..], "momentum must be in [0, 1)"),
    ] {
        let out = weft(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let garbage = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(garbage.path(), b"not a safetensors file").unwrap();
    let out = weft(&["inspect", garbage.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a safetensors file"));
}

fn attacker_records(report: &Value) -> Vec<Value> {
    let attackers: Vec<&str> = report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| !n["attacker"].is_null())
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    report["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["contributions"].as_array().unwrap().clone())
        .filter(|c| attackers.contains(&c["node"].as_str().unwrap()))
        .collect()
}

#[test]
fn attack_harness_attackers_are_rejected_or_clipped_by_the_default_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let base = ["--nodes", "5", "--rounds", "1", "--local-steps", "10"];
    let nan = demo_json(tmp.path(), "nan.json", &[&base[..], &["--attack", "nan", "--attackers", "2"]].concat());
    let records = attacker_records(&nan);
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|c| c["reason"] == "non_finite"), "{records:?}");
    let flip = demo_json(tmp.path(), "flip.json", &[&base[..], &["--attack", "sign-flip"]].concat());
    assert!(attacker_records(&flip).iter().all(|c| c["accepted"] == false));
    // Model replacement gets through the floor (its probe looks like a whole local model) but the
    // default adaptive norm bound cuts its applied coefficient far below its weight.
    let scale = demo_json(tmp.path(), "scale.json", &[&base[..], &["--attack", "scale"]].concat());
    for c in attacker_records(&scale) {
        if c["accepted"] == true {
            assert!(f(&c["influence"]) < f(&c["weight"]) / 3.0, "{c}");
        }
    }
    let out = weft(&["demo", "--nodes", "5", "--aggregator", "multi-krum:2:1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--aggregator: multi-krum:2:1 needs at least 7 nodes, the roster has 5"), "{stderr}");
    let out = weft(&["demo", "--aggregator", "trimmed-mean:0.7"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("β must be in [0, 0.5)"));
}

#[test]
fn governance_demo_records_canaries_and_reputation_and_weft_reputation_prints_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("gov");
    let report = demo_json(
        tmp.path(),
        "gov.json",
        &[
            "--governance",
            "--attack",
            "zero",
            "--rounds",
            "2",
            "--local-steps",
            "15",
            "--out",
            out_dir.to_str().unwrap(),
        ],
    );
    let last = &report["rounds"][1]["governance"];
    let canaries = last["canaries"].as_array().unwrap();
    assert_eq!(canaries.len(), 8, "a public and a secret set for each of 4 languages");
    assert!(canaries.iter().all(|c| c["hash"].as_str().unwrap().len() == 64));
    let mean_r = |node: &str| {
        let rows: Vec<f64> = last["reputation"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["node"] == node)
            .map(|r| f(&r["reputation"]))
            .collect();
        rows.iter().sum::<f64>() / rows.len() as f64
    };
    assert!(mean_r("node-es") < 0.5 * mean_r("node-de"), "free-rider {} vs {}", mean_r("node-es"), mean_r("node-de"));
    let state = out_dir.join("coordinator/governance.json");
    let out = weft(&["reputation", state.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("node-es") && text.contains("Ĉ"), "{text}");
    let bad = weft(&["demo", "--attack", "canary-overfit"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("needs --governance"));
    let garbage = tmp.path().join("garbage.json");
    std::fs::write(&garbage, "{}").unwrap();
    let out = weft(&["reputation", garbage.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a weft governance state file"));
}

#[test]
fn simulate_runs_many_devices_and_reports_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("sim.json");
    let out =
        weft(&["simulate", "--nodes", "12", "--rounds", "2", "--local-steps", "1", "--json", json.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    assert!(rounds.iter().all(|r| r["accepted"] == 12 && f(&r["seconds"]) > 0.0));
    assert!(rounds[1]["peak_rss"].as_u64().unwrap() > 0);
    let bad = weft(&["simulate", "--nodes", "0"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--nodes and --rounds must be at least 1"));
}

/// Nine languages in three scripts: with the default rule every round moves the base, no round
/// raises any language's held-out loss by more than the tolerance (0.5 %), and every language
/// ends better than it started — Japanese and Chinese included. The ledger replays the check.
#[test]
fn nine_languages_keep_moving_and_every_language_gains() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("nine");
    let report = demo_json(
        tmp.path(),
        "nine.json",
        &["--nodes", "9", "--rounds", "3", "--local-steps", "30", "--out", out.to_str().unwrap()],
    );
    let mut previous = report["initial_heldout_loss"].clone();
    for round in report["rounds"].as_array().unwrap() {
        assert_eq!(round["base_changed"], true, "round {} did not move", round["round"]);
        let check = &round["language_check"];
        assert!(!check["attempts"].as_array().unwrap().is_empty());
        for (language, loss) in round["heldout_loss"].as_object().unwrap() {
            let before = f(&previous[language]);
            assert!((f(loss) - before) / before <= 0.005, "round {}: {language} {before} -> {loss}", round["round"]);
        }
        previous = round["heldout_loss"].clone();
    }
    let initial = report["initial_heldout_loss"].as_object().unwrap();
    assert_eq!(initial.len(), 9);
    for (language, before) in initial {
        assert!(f(&report["final_heldout_loss"][language]) < f(before), "{language} did not improve");
    }
    let verify = weft(&["ledger", "verify", out.join("coordinator").to_str().unwrap()]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
}

#[test]
fn gauntlet_and_a_voted_cap_show_in_the_demo_report_and_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let report = demo_json(
        tmp.path(),
        "gauntlet.json",
        &[
            "--rounds",
            "4",
            "--local-steps",
            "10",
            "--gauntlet",
            "--breaker",
            "--voting",
            "--propose",
            "cap=0.3",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let rounds = report["rounds"].as_array().unwrap();
    for round in rounds {
        // Every round that moved the aggregate was judged, with a test per language.
        let judgment = &round["gauntlet"];
        assert_eq!(judgment["verdict"]["tests"].as_object().unwrap().len(), 4, "{round}");
        let promoted = judgment["verdict"]["outcome"].get("promoted").is_some();
        assert_eq!(promoted, round["base_changed"] == true, "{judgment}");
    }
    // Proposed after round 1, counted when round 2 closed, round 3 under the old cap (the
    // time-lock), in force from round 4.
    let counted = &rounds[1]["proposals_counted"][0];
    assert_eq!(counted["effective_round"], 4, "{counted}");
    assert_eq!(counted["tally"]["passed"], true);
    for round in rounds {
        let largest = round["contributions"].as_array().unwrap().iter().map(|c| f(&c["weight"])).fold(0.0, f64::max);
        let cap = if round["round"] == 4 { 0.3 } else { 0.5 };
        assert!(largest <= cap + 1e-12, "round {}: weight {largest} above cap {cap}", round["round"]);
    }
    let verify = weft(&["ledger", "verify", out.join("coordinator").to_str().unwrap()]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    let stdout = String::from_utf8_lossy(&verify.stdout);
    assert!(stdout.contains("proposals: 1 made, 4 signed votes checked, 1 rule changes applied"), "{stdout}");
    assert!(stdout.contains("gauntlet: "), "{stdout}");
    let show = weft(&["proposal", "show", out.join("coordinator").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&show.stdout).contains("in force since round 4"));
    // A flag out of range is refused by name before anything runs.
    let bad = weft(&["demo", "--gauntlet", "--gauntlet-alpha", "0.9"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--gauntlet-alpha: must be in (0, 0.5], got 0.9"));
    let bad = weft(&["demo", "--voting", "--propose", "cap=1.5"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("cap must be in (0, 1], got 1.5"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
