//! Differential privacy through the real binary: `weft demo --privacy dp`, the ledger's charges,
//! `weft privacy`, and the budget stop.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const SMALL: &[&str] = &["--layers", "1", "--heads", "2", "--width", "32", "--context", "32", "--batch", "8"];

fn weft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weft")).args(args).output().expect("the weft binary runs")
}

fn demo(dir: &Path, extra: &[&str]) -> Value {
    let json = dir.join("report.json");
    let out_dir = dir.join("run");
    let mut args = vec!["demo", "--json", json.to_str().unwrap(), "--out", out_dir.to_str().unwrap()];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    let out = weft(&args);
    assert!(out.status.success(), "weft demo failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn privacy_table(storage: &Path) -> Value {
    let out = weft(&["privacy", storage.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn verify(storage: &Path) {
    let out = weft(&["ledger", "verify", storage.to_str().unwrap()]);
    assert!(out.status.success(), "ledger verify failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_dp_demo_charges_every_node_releases_nothing_else_and_replays() {
    let tmp = tempfile::tempdir().unwrap();
    let flags = ["--privacy", "dp", "--epsilon", "8", "--rounds", "2", "--local-steps", "10"];
    let report = demo(tmp.path(), &flags);
    let mut spent = std::collections::BTreeMap::new();
    for round in report["rounds"].as_array().unwrap() {
        for c in round["contributions"].as_array().unwrap() {
            let charge = &c["privacy"];
            assert!(charge.is_object(), "no charge recorded: {c}");
            let total = f(&charge["epsilon_total"]);
            assert!(total <= 8.0 && f(&charge["epsilon_round"]) <= total, "{charge}");
            // Composition spends more each round.
            let node = c["node"].as_str().unwrap().to_owned();
            let before = spent.insert(node, total).unwrap_or(0.0);
            assert!(total > before);
            // Under DP the node states its mechanism and ε, nothing computed from its data.
            let declared: Vec<&str> = c["declared"].as_object().unwrap().keys().map(String::as_str).collect();
            assert!(declared.iter().all(|k| k.starts_with("dp_")), "{declared:?}");
            assert_eq!(c["token_count"], 0);
        }
    }
    assert_eq!(spent.len(), 4);
    // DP-SGD still learns: every language's held-out loss falls.
    let (initial, last) = (&report["initial_heldout_loss"], &report["final_heldout_loss"]);
    for (language, before) in initial.as_object().unwrap() {
        assert!(f(&last[language]) < f(before) - 0.1, "{language}: {before} -> {}", last[language]);
    }
    let storage = tmp.path().join("run/coordinator");
    verify(&storage);
    let table = privacy_table(&storage);
    assert_eq!(f(&table["mechanism"]["sample_rate"]), 0.005);
    for row in table["nodes"].as_array().unwrap() {
        assert_eq!(row["rounds_charged"], 2);
        assert_eq!(f(&row["epsilon_spent"]), spent[row["node"].as_str().unwrap()]);
        assert_eq!(f(&row["budget"]), 8.0);
    }
    // The same seed gives the same bases: the private streams are keyed, not random.
    let again = tempfile::tempdir().unwrap();
    let second = demo(again.path(), &flags);
    assert_eq!(report["final_base_hash"], second["final_base_hash"]);
}

#[test]
fn a_node_past_its_budget_is_refused_by_name_and_the_base_stays() {
    let tmp = tempfile::tempdir().unwrap();
    // σ 0.8 for 10 steps at q 0.005 spends ε ≈ 1.46 in one round and ≈ 1.50 in two: a budget of
    // 1.48 admits the first round and refuses the second.
    let report = demo(
        tmp.path(),
        &[
            "--privacy",
            "dp",
            "--epsilon",
            "1.48",
            "--dp-noise-multiplier",
            "0.8",
            "--rounds",
            "2",
            "--local-steps",
            "10",
        ],
    );
    let rounds = report["rounds"].as_array().unwrap();
    assert!(rounds[0]["contributions"].as_array().unwrap().iter().all(|c| c["accepted"] == true));
    let second = &rounds[1];
    for c in second["contributions"].as_array().unwrap() {
        assert_eq!(c["reason"], "privacy_budget_exhausted", "{c}");
        assert!(c["detail"].as_str().unwrap().contains("over its budget 1.480"), "{c}");
        assert!(c["privacy"].is_null() && c["delta_hash"].is_null(), "nothing charged or stored: {c}");
    }
    assert_eq!(second["base_changed"], false);
    assert_eq!(second["base_hash"], rounds[0]["base_hash"]);
    let storage = tmp.path().join("run/coordinator");
    verify(&storage);
    for row in privacy_table(&storage)["nodes"].as_array().unwrap() {
        assert_eq!((row["rounds_charged"].as_u64(), row["refused_over_budget"].as_u64()), (Some(1), Some(1)));
    }
}

#[test]
fn privacy_settings_out_of_range_are_refused_by_flag() {
    for (args, expected) in [
        (vec!["--privacy", "dp", "--epsilon", "-1"], "--epsilon: must be a positive number"),
        (vec!["--privacy", "dp", "--dp-sample-rate", "2"], "--dp-sample-rate: must be in (0, 1]"),
        (vec!["--privacy", "dp", "--delta", "1"], "--delta: must be in (0, 1)"),
        (vec!["--privacy", "dp", "--dp-noise-multiplier", "0"], "--dp-noise-multiplier: must be a positive number"),
        (vec!["--privacy", "dp", "--dp-clip-norm", "nan"], "--dp-clip-norm: must be a positive number"),
        (vec!["--privacy", "dp", "--epsilon", "0.0001"], "--epsilon: no noise multiplier up to 1000"),
        (vec!["--epsilon", "8"], "--privacy"),
    ] {
        let mut all = vec!["demo"];
        all.extend(args.iter());
        let out = weft(&all);
        assert!(!out.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // Reading an empty directory creates nothing.
    let tmp = tempfile::tempdir().unwrap();
    let out = weft(&["privacy", tmp.path().join("nothing").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(!tmp.path().join("nothing").exists());
}

#[test]
fn secure_aggregation_governs_community_means_and_the_ledger_redraws_the_partition() {
    let tmp = tempfile::tempdir().unwrap();
    let flags = ["--secure-aggregation", "3", "--nodes", "6", "--rounds", "2", "--local-steps", "10"];
    let report = demo(tmp.path(), &flags);
    for round in report["rounds"].as_array().unwrap() {
        let ids: Vec<&str> =
            round["contributions"].as_array().unwrap().iter().map(|c| c["node"].as_str().unwrap()).collect();
        // The coordinator received community means only, and measured each one itself.
        assert_eq!(ids, ["community-1", "community-2"]);
        for c in round["contributions"].as_array().unwrap() {
            assert!(c["quality"].is_f64() && c["delta_hash"].is_string(), "{c}");
        }
    }
    let storage = tmp.path().join("run/coordinator");
    verify(&storage);
    let out = weft(&["ledger", "show", storage.to_str().unwrap(), "--json"]);
    let entries: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let draws: Vec<&Value> = entries.iter().filter_map(|e| e["event"].get("communities_drawn")).collect();
    assert_eq!(draws.len(), 2, "one partition per round");
    for draw in &draws {
        let mut members: Vec<&str> = draw["communities"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|m| m.as_array().unwrap().iter().map(|n| n.as_str().unwrap()))
            .collect();
        members.sort();
        assert_eq!(members, ["node-de", "node-en", "node-es", "node-fr", "node-it", "node-pt"]);
        assert!(draw["communities"].as_object().unwrap().values().all(|m| m.as_array().unwrap().len() == 3));
    }
    // Every language still gains, and the run reproduces.
    let (initial, last) = (&report["initial_heldout_loss"], &report["final_heldout_loss"]);
    for (language, before) in initial.as_object().unwrap() {
        assert!(f(&last[language]) < f(before) - 0.1, "{language}");
    }
    let again = tempfile::tempdir().unwrap();
    assert_eq!(demo(again.path(), &flags)["final_base_hash"], report["final_base_hash"]);
}

#[test]
fn a_partition_its_seed_does_not_draw_does_not_verify_even_when_signed() {
    // A dishonest coordinator signs another partition than the round's seed draws: the chain
    // and signatures check out (re-sealed with the run's own key), the replay does not.
    let tmp = tempfile::tempdir().unwrap();
    demo(tmp.path(), &["--secure-aggregation", "3", "--nodes", "6", "--rounds", "1", "--local-steps", "5"]);
    let storage = tmp.path().join("run/coordinator");
    let key_hex = std::fs::read_to_string(storage.join("coordinator.key")).unwrap();
    let key = weft_ledger::SigningKey::from_hex(key_hex.trim()).unwrap();
    let db = rusqlite::Connection::open(storage.join("state.sqlite")).unwrap();
    let lines: Vec<(i64, Vec<u8>)> = db
        .prepare("SELECT seq, line FROM ledger ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut chain = weft_ledger::Chain::new(None);
    let mut tampered_seq = None;
    for (seq, line) in &lines {
        let entry: weft_ledger::Entry = serde_json::from_slice(line).unwrap();
        let mut event = entry.event;
        if let weft_ledger::Event::CommunitiesDrawn { communities, .. } = &mut event {
            // Swap one member between the two communities.
            let mut values: Vec<Vec<String>> = communities.values().cloned().collect();
            let (a, b) = (values[0][0].clone(), values[1][0].clone());
            values[0][0] = b;
            values[1][0] = a;
            for (slot, members) in communities.values_mut().zip(values) {
                *slot = members;
            }
            tampered_seq = Some(*seq);
        }
        let (_, resealed) = chain.seal(&key, event).unwrap();
        db.execute("UPDATE ledger SET line = ?1 WHERE seq = ?2", rusqlite::params![resealed, seq]).unwrap();
    }
    drop(db);
    let seq = tampered_seq.expect("the run drew communities");
    let out = weft(&["ledger", "verify", storage.to_str().unwrap()]);
    assert!(!out.status.success(), "a partition its seed does not draw verified");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("ledger entry {seq} (communities_drawn")), "{stderr}");
    assert!(stderr.contains("not the one its seed draws"), "{stderr}");
}

#[test]
fn secure_aggregation_settings_out_of_range_are_refused_by_name() {
    for (args, expected) in [
        (vec!["demo", "--secure-aggregation", "2"], "must be at least 3"),
        (vec!["demo", "--secure-aggregation", "5", "--nodes", "4"], "more than the roster's 4 nodes"),
        (vec!["demo", "--secure-aggregation", "3", "--privacy", "dp"], "not built yet"),
        (
            vec!["demo", "--secure-aggregation", "3", "--processes", "--encoding", "int8"],
            "--encoding int8: under --secure-aggregation",
        ),
    ] {
        let out = weft(&args);
        assert!(!out.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // consortium.toml: each key of the section is checked when the coordinator starts.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("consortium");
    let init = weft(&[
        "consortium",
        "init",
        dir.to_str().unwrap(),
        "--node",
        "node-de:de",
        "--node",
        "node-en:en",
        "--node",
        "node-fr:fr",
        "--secure-aggregation",
        "3",
    ]);
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let toml_path = dir.join("consortium.toml");
    let written = std::fs::read_to_string(&toml_path).unwrap();
    assert!(written.contains("stage_secs = 30"), "{written}");
    for (from, to, expected) in [
        ("stage_secs = 30", "stage_secs = 0", "[privacy.secure_aggregation] stage_secs: must be between 1 and 3600"),
        ("range = 1.0", "range = -1.0", "[privacy.secure_aggregation] range: must be a positive number"),
        ("stage_secs = 30", "stage_secs = 30\nmask_seed_bits = 32", "mask_seed_bits"),
        ("encoding = \"f32\"", "encoding = \"int8\"", "encoding: int8 cannot apply under secure aggregation"),
    ] {
        std::fs::write(&toml_path, written.replace(from, to)).unwrap();
        let out = weft(&["coordinator", "serve", dir.to_str().unwrap()]);
        assert!(!out.status.success(), "{to} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{to}: {stderr}");
    }
    // Nothing was started on a refused configuration.
    assert!(!dir.join("coordinator/state.sqlite").exists());
}

#[test]
fn dp_over_the_network_charges_every_node_the_same_as_in_one_process() {
    // The coordinator announces the mechanism; each node keys its stream with its own signing
    // key (so the bases differ from the one-process run's), states its ε, and is charged.
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("net.json");
    let mut args = vec!["demo", "--processes", "--json", json.to_str().unwrap()];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(&["--privacy", "dp", "--epsilon", "8", "--rounds", "2", "--local-steps", "5"]);
    let out = weft(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let in_process = demo(tmp.path(), &["--privacy", "dp", "--epsilon", "8", "--rounds", "2", "--local-steps", "5"]);
    for (net, local) in report["rounds"].as_array().unwrap().iter().zip(in_process["rounds"].as_array().unwrap()) {
        let charges = |round: &Value| -> Vec<(String, f64)> {
            let mut c: Vec<(String, f64)> = round["contributions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| (c["node"].as_str().unwrap().to_owned(), f(&c["privacy"]["epsilon_total"])))
                .collect();
            c.sort_by(|a, b| a.0.cmp(&b.0));
            c
        };
        assert_eq!(charges(net).len(), 4);
        assert_eq!(charges(net), charges(local), "the same mechanism costs the same ε either way");
    }
    assert_ne!(report["final_base_hash"], in_process["final_base_hash"], "each node's noise is its own");
}

#[test]
fn secure_aggregation_over_processes_gives_the_in_process_bases_bit_for_bit() {
    // Masks cancel exactly in fixed point: nodes keying their masks with their own signing keys
    // over the network give the same community sums, so the same bases, as the one-process run.
    let tmp = tempfile::tempdir().unwrap();
    let flags = ["--secure-aggregation", "3", "--nodes", "4", "--rounds", "2", "--local-steps", "5"];
    let json = tmp.path().join("net.json");
    let out_dir = tmp.path().join("net");
    let mut args = vec!["demo", "--processes", "--json", json.to_str().unwrap(), "--out", out_dir.to_str().unwrap()];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(&flags);
    let out = weft(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ledger verified"), "{stdout}");
    let net: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let local = demo(tmp.path(), &flags);
    let bases = |report: &Value| -> Vec<Value> {
        report["rounds"].as_array().unwrap().iter().map(|r| r["base_hash"].clone()).collect()
    };
    assert_eq!(bases(&net), bases(&local));
    assert_eq!(net["final_base_hash"], local["final_base_hash"]);

    // The coordinator's ledger: one partition per round, and deltas from communities only.
    let storage = out_dir.join("consortium/coordinator");
    verify(&storage);
    let out = weft(&["ledger", "show", storage.to_str().unwrap(), "--json"]);
    let entries: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let draws = entries.iter().filter(|e| e["event"].get("communities_drawn").is_some()).count();
    assert_eq!(draws, 2);
    let senders: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["event"].get("contribution_received"))
        .map(|c| c["node"].as_str().unwrap())
        .collect();
    assert_eq!(senders, ["community-1", "community-1"]);
    // A second networked run into the same directory is refused: its keys would be new.
    let again = weft(&args);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a consortium"));
}
