//! Bad input, tried as a new user would: each gets a clear error or the documented behaviour,
//! and nothing is created or changed where it should not be.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const TINY: &[&str] =
    &["--local-steps", "3", "--layers", "1", "--heads", "2", "--width", "16", "--context", "16", "--batch", "4"];

fn weft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weft")).args(args).env_remove("WEFT_CRASH_AT").output().expect("weft runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every path under `dir`, to compare before and after a command.
fn listing(dir: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path.clone());
            }
            found.insert(path);
        }
    }
    found
}

/// A finished one-round demo run; returns its --out directory.
fn finished_run(dir: &Path) -> PathBuf {
    let out = dir.join("run");
    let mut args = vec!["demo", "--nodes", "2", "--rounds", "1", "--out", out.to_str().unwrap()];
    args.extend_from_slice(TINY);
    let done = weft(&args);
    assert!(done.status.success(), "{}", stderr(&done));
    out
}

#[test]
fn inspect_checks_the_header_length_before_reading_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    // A header length of 2^40 in a 16-byte file, and in a sparse 3 GiB one: refused from the
    // first 8 bytes, whatever the file's size.
    for (name, size) in [("small", 16u64), ("sparse", 3 << 30)] {
        let path = tmp.path().join(name);
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&(1u64 << 40).to_le_bytes()).unwrap();
        file.set_len(size).unwrap();
        let out = weft(&["inspect", path.to_str().unwrap()]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("the header claims 1099511627776 bytes"), "{}", stderr(&out));
    }
    // A header that fits the limit but not the file.
    let path = tmp.path().join("truncated");
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"a\":");
    std::fs::write(&path, bytes).unwrap();
    let out = weft(&["inspect", path.to_str().unwrap()]);
    assert!(stderr(&out).contains("the file holds only 5"), "{}", stderr(&out));
    let out = weft(&["inspect", tmp.path().join("absent").to_str().unwrap()]);
    assert!(stderr(&out).contains("opening") && stderr(&out).contains("absent"), "{}", stderr(&out));
}

#[test]
fn printing_commands_stop_quietly_when_their_reader_goes_away() {
    let tmp = tempfile::tempdir().unwrap();
    let out = finished_run(tmp.path());
    let storage = out.join("coordinator");
    let base = storage.join("bases/round-0001.safetensors");
    let commands: [&[&str]; 4] = [
        &["ledger", "show", storage.to_str().unwrap()],
        &["ledger", "show", "--json", storage.to_str().unwrap()],
        &["ledger", "verify", storage.to_str().unwrap()],
        &["inspect", base.to_str().unwrap()],
    ];
    for args in commands {
        // The read end is closed before the command writes: its first line meets a broken pipe.
        let mut child = Command::new(env!("CARGO_BIN_EXE_weft"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let done = child.wait_with_output().unwrap();
        assert!(done.status.success(), "{args:?}: {}", stderr(&done));
        assert!(stderr(&done).is_empty(), "{args:?} printed: {}", stderr(&done));
    }
    // The networked demo prints its processes' lines as its own: when its reader goes, it stops
    // them and ends quietly, without waiting for the rounds (nor leaving nodes to fail).
    let started = std::time::Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["demo", "--processes", "--secure-aggregation", "3", "--rounds", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let done = child.wait_with_output().unwrap();
    assert!(done.status.success(), "{}", stderr(&done));
    assert!(!stderr(&done).contains("error"), "{}", stderr(&done));
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "it ran the rounds: {:?}", started.elapsed());
}

#[test]
fn read_only_and_operator_commands_create_nothing_where_nothing_was() {
    let tmp = tempfile::tempdir().unwrap();
    let absent = tmp.path().join("no-such-dir");
    let out = weft(&["coordinator", "rollback", absent.to_str().unwrap(), "--to-round", "0"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("holds no coordinator state"), "{}", stderr(&out));
    assert!(!absent.exists(), "rollback created {}", absent.display());

    for (name, content) in [("empty", Vec::new()), ("garbage", vec![0x5a; 5000])] {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("state.sqlite"), content).unwrap();
        let before = listing(&dir);
        for args in [["ledger", "verify"], ["ledger", "show"]] {
            let out = weft(&[args[0], args[1], dir.to_str().unwrap()]);
            assert!(!out.status.success());
            assert!(stderr(&out).contains("not a coordinator's state database"), "{name}: {}", stderr(&out));
        }
        let out = weft(&["coordinator", "rollback", dir.to_str().unwrap(), "--to-round", "0"]);
        assert!(!out.status.success(), "{name}");
        assert_eq!(listing(&dir), before, "{name}: a command created files");
    }

    // On a finished run, reading leaves no trace (no SQLite -wal/-shm beside the database).
    let run = finished_run(tmp.path());
    let storage = run.join("coordinator");
    let before = listing(&storage);
    for args in [["ledger", "verify"], ["ledger", "show"]] {
        assert!(weft(&[args[0], args[1], storage.to_str().unwrap()]).status.success());
    }
    assert_eq!(listing(&storage), before);
}

#[test]
fn a_continued_run_with_other_settings_names_each_flag_and_both_values() {
    let tmp = tempfile::tempdir().unwrap();
    let run = finished_run(tmp.path());
    let mut args = vec!["demo", "--nodes", "2", "--rounds", "1", "--out", run.to_str().unwrap()];
    args.extend_from_slice(TINY);
    args.extend_from_slice(&["--cap", "0.4", "--seed", "7"]);
    let out = weft(&args);
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(text.contains("--cap: the run was started with 0.5, this command gives 0.4"), "{text}");
    assert!(text.contains("--seed: the run was started with 0, this command gives 7"), "{text}");
    assert_eq!(text.matches("--seed").count(), 1, "each flag once: {text}");
    assert!(!text.contains("initial_base_hash"), "follows from --seed: {text}");
}

#[test]
fn init_refuses_a_language_it_has_no_held_out_text_for_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let consortium = tmp.path().join("consortium");
    let mut args = vec!["consortium", "init", consortium.to_str().unwrap(), "--node", "a:en", "--node", "b:zz"];
    args.extend_from_slice(TINY);
    let out = weft(&args);
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(text.contains("--node b:zz") && text.contains("no held-out text for language 'zz'"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    assert!(!consortium.exists(), "a refused init wrote {}", consortium.display());
}

/// A provisioned (not started) consortium with `edit` applied to its consortium.toml.
fn consortium_with(dir: &Path, file: &str, edit: impl Fn(&str) -> String) -> PathBuf {
    let consortium = dir.join("consortium");
    if !consortium.exists() {
        let mut args = vec!["consortium", "init", consortium.to_str().unwrap(), "--node", "a:en", "--node", "b:de"];
        args.extend_from_slice(TINY);
        let out = weft(&args);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let path = consortium.join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, edit(&text)).unwrap();
    consortium
}

#[test]
fn serve_refuses_out_of_range_settings_by_name_before_it_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let set = |key: &'static str, value: &'static str| {
        move |text: &str| {
            text.lines()
                .map(|l| if l.starts_with(&format!("{key} =")) { format!("{key} = {value}") } else { l.to_owned() })
                .collect::<Vec<_>>()
                .join("\n")
        }
    };
    for (key, value, needle) in [
        ("round_deadline_secs", "18446744073709551615", "round_deadline_secs"),
        ("round_deadline_secs", "0", "round_deadline_secs: must be between 1 and"),
        ("rounds", "0", "rounds: must be at least 1"),
        ("cap", "1.5", "[policy] cap: cap must be in (0, 1]"),
        ("rounds", "3", ""),
    ] {
        let dir = consortium_with(tmp.path(), "consortium.toml", set(key, value));
        if needle.is_empty() {
            continue; // restored
        }
        let out = weft(&["coordinator", "serve", dir.to_str().unwrap()]);
        assert!(!out.status.success(), "{key} = {value} was served");
        assert!(stderr(&out).contains(needle), "{key} = {value}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
        assert!(!dir.join("coordinator/state.sqlite").exists(), "{key} = {value} created state");
        consortium_with(tmp.path(), "consortium.toml", set(key, if key == "cap" { "0.5" } else { "600" }));
        if key == "rounds" {
            consortium_with(tmp.path(), "consortium.toml", set("rounds", "3"));
        }
    }
    // A roster certificate that is no fingerprint at all.
    let dir = consortium_with(tmp.path(), "roster.toml", |text| {
        let mut done = false;
        text.lines()
            .map(|l| {
                if l.starts_with("certificate =") && !done {
                    done = true;
                    "certificate = \"xyz\"".to_owned()
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    let out = weft(&["coordinator", "serve", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("roster.toml") && stderr(&out).contains("not 64 lowercase hex digits"),
        "{}",
        stderr(&out)
    );
}

/// A trainer set wrongly, on the command line or in the kit's node.toml, is refused by name
/// before the node dials out (no coordinator runs here: reaching it would be another error).
#[test]
fn join_refuses_a_wrong_trainer_setting_by_name_before_it_connects() {
    let tmp = tempfile::tempdir().unwrap();
    let consortium = consortium_with(tmp.path(), "consortium.toml", str::to_owned);
    let kit = consortium.join("nodes/a");
    let kit_str = kit.to_str().unwrap();
    let join = |extra: &[&str]| {
        let mut args = vec!["node", "join", kit_str, "--give-up-after", "1"];
        args.extend_from_slice(extra);
        weft(&args)
    };
    for (extra, needle) in [
        (&["--trainer", " "][..], "--trainer: the command is empty"),
        (&["--trainer-deadline-secs", "5"][..], "need a trainer: --trainer or [trainer] in node.toml"),
        (&["--trainer", "true", "--trainer-deadline-secs", "0"][..], "deadline"),
        (&["--trainer", "true", "--trainer-max-change", "0"][..], "must be a positive number, got 0"),
    ] {
        let out = join(extra);
        assert!(!out.status.success(), "{extra:?} joined");
        assert!(stderr(&out).contains(needle), "{extra:?}: expected {needle:?} in\n{}", stderr(&out));
    }
    let config = kit.join("node.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}\n[trainer]\ncommand = \"\"\n")).unwrap();
    let out = join(&[]);
    assert!(stderr(&out).contains("node.toml [trainer] command: the command is empty"), "{}", stderr(&out));
    std::fs::write(&config, format!("{text}\n[trainer]\ncommand = \"x\"\nmax_chnage = 3.0\n")).unwrap();
    let out = join(&[]);
    assert!(stderr(&out).contains("max_chnage"), "{}", stderr(&out));
    assert!(!kit.join("artifacts").exists(), "a refused join wrote its artifacts directory");
}
