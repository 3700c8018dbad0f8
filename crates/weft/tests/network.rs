//! The networked consortium as separate processes of the real binary on loopback: a coordinator
//! and nodes over mutual TLS. A test that plays a misbehaving node speaks the protocol itself
//! (weft-net's client) from the test process.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_core::RejectionCode;
use weft_net::client::{connect, fetch_base, upload, Kit};
use weft_net::proto::{self, consortium_client::ConsortiumClient, upload_part::Part};
use weft_net::refusal::{RefusalCode, RefusalCode as C};

mod support;
use support::{free_port, Running};

const TINY: &[&str] =
    &["--local-steps", "4", "--layers", "1", "--heads", "2", "--width", "16", "--context", "16", "--batch", "4"];

fn weft() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_weft"));
    command.env_remove("WEFT_CRASH_AT");
    command
}

impl Running {
    /// Waits for the process to end, however it ends; `None` if it outlives `limit`.
    fn exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = self.0.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn wait(&mut self, limit: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("a weft process did not finish within {limit:?}");
    }
}

fn init(dir: &Path, port: u16, nodes: &[&str], rounds: u64, deadline: u64) {
    init_with(dir, port, nodes, rounds, deadline, &[]);
}

fn init_with(dir: &Path, port: u16, nodes: &[&str], rounds: u64, deadline: u64, extra: &[&str]) {
    let mut command = weft();
    command.args(["consortium", "init"]).arg(dir).args(["--address", &format!("127.0.0.1:{port}")]);
    command.args(["--rounds", &rounds.to_string(), "--deadline-secs", &deadline.to_string()]).args(TINY).args(extra);
    for node in nodes {
        command.args(["--node", node]);
    }
    let out = command.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn serve(dir: &Path, log: &str) -> Running {
    serve_crashing(dir, log, None)
}

/// A coordinator that aborts (as kill -9 would) at crash point `crash_at`.
fn serve_crashing(dir: &Path, log: &str, crash_at: Option<&str>) -> Running {
    let stdout = std::fs::File::create(dir.join(format!("{log}.out"))).unwrap();
    let stderr = std::fs::File::create(dir.join(format!("{log}.err"))).unwrap();
    let mut command = weft();
    if let Some(point) = crash_at {
        command.env("WEFT_CRASH_AT", point);
    }
    let child = command
        .args(["coordinator", "serve"])
        .arg(dir)
        .args(["--linger-secs", "2", "--json"])
        .arg(dir.join(format!("{log}.json")))
        .env("WEFT_LOG", "info")
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .unwrap();
    Running(child)
}

fn join(dir: &Path, node: &str) -> Running {
    join_crashing(dir, node, None)
}

/// A node that aborts (as kill -9 would) at crash point `crash_at`.
fn join_crashing(dir: &Path, node: &str, crash_at: Option<&str>) -> Running {
    let kit = dir.join("nodes").join(node);
    let stdout = std::fs::File::create(dir.join(format!("{node}.out"))).unwrap();
    let mut command = weft();
    if let Some(point) = crash_at {
        command.env("WEFT_CRASH_AT", point);
    }
    let child = command
        .args(["node", "join"])
        .arg(&kit)
        .args(["--give-up-after", "60", "--json"])
        .arg(dir.join(format!("{node}.json")))
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Running(child)
}

fn hashes(report: &Path) -> Vec<String> {
    let report: Value = serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
    report["rounds"].as_array().unwrap().iter().map(|r| r["base_hash"].as_str().unwrap().to_owned()).collect()
}

/// The bases `weft demo` computes in one process for the same consortium.
fn demo_hashes(dir: &Path, languages: &str, rounds: u64) -> Vec<String> {
    let json = dir.join("demo.json");
    let nodes = languages.split(',').count().to_string();
    let out = weft()
        .args(["demo", "--nodes", &nodes, "--languages", languages, "--rounds", &rounds.to_string(), "--json"])
        .arg(&json)
        .args(TINY)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    hashes(&json)
}

fn closed_rounds(storage: &Path) -> i64 {
    let Ok(db) =
        rusqlite::Connection::open_with_flags(storage.join("state.sqlite"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return 0;
    };
    db.query_row("SELECT COUNT(*) FROM rounds", [], |r| r.get(0)).unwrap_or(0)
}

#[test]
fn three_node_processes_give_the_in_process_bases_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("consortium");
    init(&dir, free_port(), &["node-de:de", "node-en:en", "node-fr:fr"], 2, 120);
    let mut coordinator = serve(&dir, "serve");
    let mut nodes: Vec<Running> = ["node-de", "node-en", "node-fr"].iter().map(|n| join(&dir, n)).collect();
    for node in &mut nodes {
        assert!(node.wait(Duration::from_secs(120)), "a node failed");
    }
    assert!(coordinator.wait(Duration::from_secs(60)), "{}", std::fs::read_to_string(dir.join("serve.err")).unwrap());
    let networked = hashes(&dir.join("serve.json"));
    assert_eq!(networked, demo_hashes(tmp.path(), "de,en,fr", 2));

    let storage = dir.join("coordinator");
    let verify = weft().args(["ledger", "verify"]).arg(&storage).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    // Every contribution in the ledger carries its node's signature.
    let shown = weft().args(["ledger", "show", "--json"]).arg(&storage).output().unwrap();
    let entries: Value = serde_json::from_slice(&shown.stdout).unwrap();
    let received: Vec<&Value> =
        entries.as_array().unwrap().iter().filter_map(|e| e["event"].get("contribution_received")).collect();
    assert_eq!(received.len(), 6);
    assert!(received.iter().all(|r| r["node_signature"].as_str().is_some_and(|s| s.len() == 128)));
    // Bytes on the wire are reported per node and round: f32 is the canonical safetensors size.
    let report: Value = serde_json::from_slice(&std::fs::read(dir.join("serve.json")).unwrap()).unwrap();
    assert!(report["wire_bytes"]["1"]["node-de"].as_u64().unwrap() > 10_000);

    // Every node kept the last ledger head it was handed: the ledger's own last entry.
    let witnesses: Vec<PathBuf> = ["node-de", "node-en", "node-fr"]
        .iter()
        .map(|n| dir.join("nodes").join(n).join("artifacts").join("witnessed-head.json"))
        .collect();
    let last = entries.as_array().unwrap().last().unwrap();
    for witness in &witnesses {
        let head: Value = serde_json::from_slice(&std::fs::read(witness).unwrap()).unwrap();
        assert_eq!((&head["seq"], &head["hash"]), (&last["seq"], &last["hash"]), "{}", witness.display());
    }
    let verify = weft().args(["ledger", "verify"]).arg(&storage).arg("--witness").args(&witnesses).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));

    // The coordinator drops its last round consistently (ledger, rounds, head): the chain still
    // verifies on its own; a member's witnessed head shows the cut.
    let cut = tmp.path().join("cut");
    copy_dir(&storage, &cut);
    truncate_to_round(&cut, 1);
    let alone = weft().args(["ledger", "verify"]).arg(&cut).output().unwrap();
    assert!(alone.status.success(), "{}", String::from_utf8_lossy(&alone.stderr));
    let witnessed = weft().args(["ledger", "verify"]).arg(&cut).arg("--witness").arg(&witnesses[0]).output().unwrap();
    assert!(!witnessed.status.success());
    let stderr = String::from_utf8_lossy(&witnessed.stderr);
    assert!(
        stderr.contains(&format!("the coordinator signed entry #{}", last["seq"]))
            && stderr.contains("its tail was cut off"),
        "{stderr}"
    );
    // `weft node export` refuses to build proofs from the cut ledger.
    let export = weft()
        .args(["node", "export"])
        .arg(dir.join("nodes").join("node-de").join("artifacts"))
        .arg("--coordinator")
        .arg(&cut)
        .args(["--node", "node-de", "--out"])
        .arg(tmp.path().join("bundle"))
        .output()
        .unwrap();
    assert!(!export.status.success());
    assert!(String::from_utf8_lossy(&export.stderr).contains("does not hold the head this node witnessed"));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Drops every round after `round` from a coordinator's storage as a coordinator hiding them
/// would: their ledger entries, round and contribution rows, and the head put back.
fn truncate_to_round(storage: &Path, round: i64) {
    let db = rusqlite::Connection::open(storage.join("state.sqlite")).unwrap();
    let lines: Vec<(i64, Vec<u8>)> = db
        .prepare("SELECT seq, line FROM ledger ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let first_cut = lines
        .iter()
        .find(|(_, line)| {
            let entry: Value = serde_json::from_slice(line).unwrap();
            entry["event"].get("round_opened").is_some_and(|o| o["round"].as_i64() == Some(round + 1))
        })
        .unwrap()
        .0;
    let head: Vec<u8> = db.query_row("SELECT head FROM rounds WHERE round = ?1", [round], |r| r.get(0)).unwrap();
    db.execute("DELETE FROM ledger WHERE seq >= ?1", [first_cut]).unwrap();
    db.execute("DELETE FROM rounds WHERE round > ?1", [round]).unwrap();
    db.execute("DELETE FROM contributions WHERE round > ?1", [round]).unwrap();
    db.execute("UPDATE head SET state = ?1 WHERE id = 1", [head]).unwrap();
}

#[test]
fn nodes_wait_for_a_late_coordinator_and_survive_its_restart_mid_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("consortium");
    init(&dir, free_port(), &["node-de:de", "node-en:en"], 3, 120);
    // Nodes first: they retry with backoff until the coordinator is up.
    let mut nodes: Vec<Running> = ["node-de", "node-en"].iter().map(|n| join(&dir, n)).collect();
    std::thread::sleep(Duration::from_millis(1500));
    let mut first = serve(&dir, "first");
    let storage = dir.join("coordinator");
    let started = Instant::now();
    while closed_rounds(&storage) < 1 {
        assert!(started.elapsed() < Duration::from_secs(60), "round 1 never closed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGKILL, then a new coordinator on the same storage and port.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let mut second = serve(&dir, "second");
    for node in &mut nodes {
        assert!(node.wait(Duration::from_secs(120)), "a node failed after the restart");
    }
    assert!(second.wait(Duration::from_secs(60)), "{}", std::fs::read_to_string(dir.join("second.err")).unwrap());
    let verify = weft().args(["ledger", "verify", "--json"]).arg(&storage).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    let report: Value = serde_json::from_slice(&verify.stdout).unwrap();
    let expected = demo_hashes(tmp.path(), "de,en", 3);
    assert_eq!(report["final_base_hash"].as_str().unwrap(), expected[2]);
    assert_eq!(report["rounds"], 3);
}

#[test]
fn a_late_node_is_not_waited_for_and_joins_the_next_round() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("consortium");
    init(&dir, free_port(), &["node-de:de", "node-en:en", "node-fr:fr"], 2, 8);
    let mut coordinator = serve(&dir, "serve");
    let mut early: Vec<Running> = ["node-de", "node-en"].iter().map(|n| join(&dir, n)).collect();
    let storage = dir.join("coordinator");
    let started = Instant::now();
    while closed_rounds(&storage) < 1 {
        assert!(started.elapsed() < Duration::from_secs(30), "round 1 waited past its deadline");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut late = join(&dir, "node-fr");
    assert!(late.wait(Duration::from_secs(60)));
    for node in &mut early {
        assert!(node.wait(Duration::from_secs(60)));
    }
    assert!(coordinator.wait(Duration::from_secs(60)));
    let report: Value = serde_json::from_slice(&std::fs::read(dir.join("serve.json")).unwrap()).unwrap();
    let contributors = |round: usize| report["rounds"][round]["contributions"].as_array().unwrap().len();
    assert_eq!((contributors(0), contributors(1)), (2, 3), "round 1 closed at its deadline without node-fr");
    let fr: Value = serde_json::from_slice(&std::fs::read(dir.join("node-fr.json")).unwrap()).unwrap();
    assert_eq!(fr["rounds"][0]["round"], 2);
}

// ---- a node that misbehaves, played by the test itself ----

/// A channel to the coordinator, once it listens (it may still be starting).
async fn connect_when_up(kit: &Kit) -> ConsortiumClient<tonic::transport::Channel> {
    let started = Instant::now();
    loop {
        match connect(kit).await {
            Ok(c) => return c,
            Err(_) if started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("cannot reach the coordinator: {e}"),
        }
    }
}

async fn wait_for_round(client: &mut ConsortiumClient<tonic::transport::Channel>, round: u64) -> proto::RoundState {
    let started = Instant::now();
    loop {
        let state = client.heartbeat(proto::HeartbeatRequest {}).await.unwrap().into_inner();
        if state.phase == proto::Phase::Open as i32 && state.round == round {
            return state;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "round {round} never opened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Prepared {
    header: proto::UploadHeader,
    bytes: Vec<u8>,
}

/// A small honest-looking delta for the open round, encoded and signed with `key`.
async fn prepare(
    client: &mut ConsortiumClient<tonic::transport::Channel>,
    state: &proto::RoundState,
    node: &str,
    key: &weft_ledger::SigningKey,
    artifacts: &Path,
) -> Prepared {
    let base_hash: weft_core::ContentHash = state.base_hash.parse().unwrap();
    let base = fetch_base(client, base_hash, artifacts).await.unwrap();
    let mut delta = weft_core::ModelState::new();
    for (name, t) in base.iter() {
        let data = (0..t.data().len()).map(|i| (i as f32 * 0.37).sin() * 1e-4).collect();
        delta.insert(name, weft_core::Tensor::new(t.shape().to_vec(), data).unwrap());
    }
    let bytes = weft_net::encoding::encode(&delta, weft_net::encoding::Encoding::F32).unwrap();
    let manifest = weft_ledger::ContributionManifest {
        node: node.to_owned(),
        round: state.round,
        base_hash,
        delta_hash: delta.content_hash(),
        token_count: 1,
        declared: Default::default(),
    };
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let signature = key.sign(&manifest).0.to_vec();
    let header = proto::UploadHeader {
        manifest,
        signature,
        encoding: proto::Encoding::F32 as i32,
        encoded_bytes: bytes.len() as u64,
    };
    Prepared { header, bytes }
}

async fn send(client: &mut ConsortiumClient<tonic::transport::Channel>, p: &Prepared) -> proto::UploadReceipt {
    upload(client, p.header.clone(), p.bytes.clone()).await.unwrap()
}

/// Why a receipt refuses, as the typed code the coordinator sent.
fn code(receipt: &proto::UploadReceipt) -> RefusalCode {
    receipt.code.parse().unwrap_or_else(|_| panic!("an unknown refusal code {:?}: {}", receipt.code, receipt.detail))
}

fn kit_with(dir: &Path, from: &str, name: &str, certificate: &str, key: &str) -> PathBuf {
    let kit = dir.join(name);
    std::fs::create_dir_all(&kit).unwrap();
    for file in ["node.toml", "ca.pem", "signing.key"] {
        std::fs::copy(dir.join("nodes").join(from).join(file), kit.join(file)).unwrap();
    }
    std::fs::write(kit.join("tls.pem"), certificate).unwrap();
    std::fs::write(kit.join("tls.key"), key).unwrap();
    kit
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_by_name_while_the_consortium_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("consortium");
    let port = free_port();
    // node-fr never shows up: each round stays open until its deadline, long enough for the
    // test's uploads (a duplicate is refused as such only while the round is open).
    init(&dir, port, &["node-de:de", "node-en:en", "node-fr:fr"], 2, 10);
    let mut coordinator = serve(&dir, "serve");
    let mut honest = join(&dir, "node-de");
    // The test is node-en.
    let kit_dir = dir.join("nodes").join("node-en");
    let own_key =
        weft_ledger::SigningKey::from_hex(&std::fs::read_to_string(kit_dir.join("signing.key")).unwrap()).unwrap();
    let kit = Kit::read(&kit_dir).unwrap();
    let mut client = connect_when_up(&kit).await;
    let state = wait_for_round(&mut client, 1).await;
    let artifacts = tmp.path().join("artifacts");
    let good = prepare(&mut client, &state, "node-en", &own_key, &artifacts).await;

    // A signature by a key that is not node-en's.
    let forger = weft_ledger::SigningKey::from_seed([42; 32]);
    let forged = prepare(&mut client, &state, "node-en", &forger, &artifacts).await;
    assert_eq!(code(&send(&mut client, &forged).await), C::BadSignature);
    // Claiming to be another node.
    let impostor = prepare(&mut client, &state, "node-de", &own_key, &artifacts).await;
    assert_eq!(code(&send(&mut client, &impostor).await), C::IdentityMismatch);
    // A manifest whose delta hash is not the delta's.
    let mut mismatched = prepare(&mut client, &state, "node-en", &own_key, &artifacts).await;
    let last = mismatched.bytes.len() - 1;
    mismatched.bytes[last] ^= 0x40;
    assert_eq!(code(&send(&mut client, &mismatched).await), C::DeltaHashMismatch);
    // Garbage where the delta should be.
    let mut garbage = prepare(&mut client, &state, "node-en", &own_key, &artifacts).await;
    garbage.bytes = vec![0x5a; garbage.bytes.len()];
    assert_eq!(code(&send(&mut client, &garbage).await), C::Rejected(RejectionCode::MalformedDelta));
    // More bytes than announced, and fewer (the stream ends early, as when a node dies mid-upload).
    let mut oversize = prepare(&mut client, &state, "node-en", &own_key, &artifacts).await;
    oversize.bytes.extend_from_slice(&[0; 16]);
    oversize.header.encoded_bytes -= 16;
    assert_eq!(code(&send(&mut client, &oversize).await), C::Oversize);
    let mut truncated = prepare(&mut client, &state, "node-en", &own_key, &artifacts).await;
    truncated.bytes.truncate(truncated.bytes.len() / 2);
    assert_eq!(code(&send(&mut client, &truncated).await), C::Truncated);
    // A manifest for another base than the current one.
    let mut stale = prepare(&mut client, &state, "node-en", &own_key, &artifacts).await;
    let mut manifest: weft_ledger::ContributionManifest = serde_json::from_slice(&stale.header.manifest).unwrap();
    manifest.base_hash = weft_core::ContentHash([7; 32]);
    stale.header.manifest = serde_json::to_vec(&manifest).unwrap();
    stale.header.signature = own_key.sign(&stale.header.manifest).0.to_vec();
    assert_eq!(code(&send(&mut client, &stale).await), C::Rejected(RejectionCode::StaleBase));
    // A node that dies mid-upload: the connection goes away with half the delta sent, once the
    // coordinator has started spooling it.
    {
        let mut dying = connect(&kit).await.unwrap();
        let half = good.bytes.len() / 2;
        let parts = vec![
            proto::UploadPart { part: Some(Part::Header(good.header.clone())) },
            proto::UploadPart { part: Some(Part::Data(good.bytes[..half].to_vec())) },
        ];
        let stream = tokio_stream::StreamExt::chain(tokio_stream::iter(parts), tokio_stream::pending());
        let upload = tokio::spawn(async move { dying.upload(stream).await });
        // Only node-en's spool files count: the honest node may be uploading at the same time.
        let incoming = dir.join("coordinator").join("incoming");
        let spooling = || {
            std::fs::read_dir(&incoming)
                .map(|d| d.flatten().any(|f| f.file_name().to_string_lossy().starts_with("node-en-")))
                .unwrap_or(false)
        };
        let started = Instant::now();
        while !spooling() {
            assert!(started.elapsed() < Duration::from_secs(30), "the coordinator never started spooling");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        upload.abort();
        assert!(upload.await.is_err(), "the half-sent upload cannot complete");
        // Its spool file goes away with it.
        let started = Instant::now();
        while spooling() {
            assert!(started.elapsed() < Duration::from_secs(30), "the partial upload's spool file was left behind");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // An upload with no header.
    let no_header = client
        .upload(tokio_stream::iter(vec![proto::UploadPart { part: Some(Part::Data(vec![1, 2, 3])) }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&no_header), C::MissingHeader);
    // Garbage bytes on the port: the coordinator drops that connection and keeps serving.
    {
        use std::io::Write;
        let mut raw = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = raw.write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(1000));
    }
    // A certificate the consortium CA signed for someone outside the roster.
    let outsider_key = rcgen::KeyPair::generate().unwrap();
    let (outsider_cert, _) =
        weft_net::provision::issue_client_certificate(&dir, "weft", "intruder", &outsider_key).unwrap();
    let outsider =
        Kit::read(&kit_with(&dir, "node-en", "outsider", &outsider_cert, &outsider_key.serialize_pem())).unwrap();
    let mut intruder = connect(&outsider).await.unwrap();
    let refused = intruder.heartbeat(proto::HeartbeatRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("unknown_certificate"), "{}", refused.message());
    // A certificate from another CA does not get past the TLS handshake.
    let stranger_key = rcgen::KeyPair::generate().unwrap();
    let stranger_cert =
        rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().self_signed(&stranger_key).unwrap();
    let stranger =
        Kit::read(&kit_with(&dir, "node-en", "stranger", &stranger_cert.pem(), &stranger_key.serialize_pem())).unwrap();
    let handshake = async {
        connect(&stranger).await?.heartbeat(proto::HeartbeatRequest {}).await.map_err(weft_net::NetError::from)
    };
    assert!(handshake.await.is_err(), "a certificate from another CA was accepted");

    // After all that, the real contribution is taken, and a second one is refused.
    let receipt = send(&mut client, &good).await;
    assert!(receipt.accepted, "{} {}", receipt.code, receipt.detail);
    assert_eq!(receipt.wire_bytes, good.bytes.len() as u64);
    assert_eq!(code(&send(&mut client, &good).await), C::Rejected(RejectionCode::DuplicateNode));

    // Round 2: the round-1 manifest replayed is refused; a fresh one is taken.
    let state = wait_for_round(&mut client, 2).await;
    assert_eq!(code(&send(&mut client, &good).await), C::ReplayedManifest);
    let fresh = prepare(&mut client, &state, "node-en", &own_key, &artifacts).await;
    assert!(send(&mut client, &fresh).await.accepted);
    assert!(honest.wait(Duration::from_secs(60)));
    assert!(coordinator.wait(Duration::from_secs(60)));
    let log = std::fs::read_to_string(dir.join("serve.err")).unwrap();
    // The cut upload is refused as truncated, besides the deliberately short one: as "the stream
    // broke" if the server sees the connection fail, or as short of its size if HTTP/2 reports
    // the cancelled stream as ended.
    let truncated = log.lines().filter(|l| l.contains("\"truncated\"")).count();
    assert!(truncated >= 2, "the upload cut mid-way is not logged as truncated:\n{log}");
    for code in [
        "stale_base",
        "bad_signature",
        "identity_mismatch",
        "delta_hash_mismatch",
        "truncated",
        "unknown_certificate",
        "tls_handshake",
    ] {
        assert!(log.contains(code), "the coordinator's log does not name {code}");
    }
    let verify = weft().args(["ledger", "verify"]).arg(dir.join("coordinator")).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
}

/// `weft consortium add-node DIR --request SITE/request.toml`.
fn add_node(dir: &Path, site: &Path) -> std::process::Output {
    weft().args(["consortium", "add-node"]).arg(dir).arg("--request").arg(site.join("request.toml")).output().unwrap()
}

#[test]
fn a_site_makes_its_own_keys_and_is_admitted_with_public_material_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("consortium");
    init(&dir, free_port(), &["node-de:de"], 1, 60);
    let site = tmp.path().join("site-en");
    let out =
        weft().args(["node", "keygen"]).arg(&site).args(["--id", "node-en", "--language", "en"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let request = std::fs::read_to_string(site.join("request.toml")).unwrap();
    assert!(!request.contains("PRIVATE"), "the request must carry no private key");
    let out = add_node(&dir, &site);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!dir.join("nodes").join("node-en").join("tls.key").exists(), "the consortium never holds the site's key");
    for file in ["tls.pem", "ca.pem", "node.toml"] {
        std::fs::copy(dir.join("nodes").join("node-en").join(file), site.join(file)).unwrap();
    }
    let again = add_node(&dir, &site);
    assert!(!again.status.success(), "a node cannot be added twice");
    // The admitted site takes part in a round.
    let mut coordinator = serve(&dir, "serve");
    let mut de = join(&dir, "node-de");
    let site_out = std::fs::File::create(tmp.path().join("site.out")).unwrap();
    let mut en = Running(
        weft()
            .args(["node", "join"])
            .arg(&site)
            .args(["--give-up-after", "60"])
            .stdout(site_out)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(en.wait(Duration::from_secs(60)) && de.wait(Duration::from_secs(60)));
    assert!(coordinator.wait(Duration::from_secs(60)));
    let report: Value = serde_json::from_slice(&std::fs::read(dir.join("serve.json")).unwrap()).unwrap();
    assert_eq!(report["rounds"][0]["contributions"].as_array().unwrap().len(), 2);
    // Once the consortium has started, its roster is committed in the ledger: no silent change.
    let late_site = tmp.path().join("site-fr");
    assert!(weft()
        .args(["node", "keygen"])
        .arg(&late_site)
        .args(["--id", "node-fr", "--language", "fr"])
        .status()
        .unwrap()
        .success());
    let refused = add_node(&dir, &late_site);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("already started"));
}

/// `weft demo --processes` (a coordinator and one process per node) with canary governance and
/// a policy other than the default: the same bases, the same reputation table and one report
/// schema as the in-process demo — the reports differ only in timings, bytes on the wire and the
/// network section.
#[test]
fn governance_over_the_network_matches_the_in_process_demo() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |processes: bool, json: &Path| {
        let mut command = weft();
        command.args(["demo", "--nodes", "3", "--rounds", "2", "--governance", "--cap", "0.45", "--json"]).arg(json);
        command.args(TINY);
        if processes {
            command.arg("--processes");
        }
        let out = command.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
        report
    };
    let mut local = run(false, &tmp.path().join("local.json"));
    let mut networked = run(true, &tmp.path().join("networked.json"));
    for round in 0..2 {
        assert_eq!(local["rounds"][round]["base_hash"], networked["rounds"][round]["base_hash"]);
        assert_eq!(local["rounds"][round]["governance"], networked["rounds"][round]["governance"]);
    }
    let network = networked.as_object_mut().unwrap().remove("network").expect("a network section");
    assert!(network["wire_bytes"]["1"]["node-de"].as_u64().unwrap() > 0);
    for (report, over_the_network) in [(&mut local, false), (&mut networked, true)] {
        let report = report.as_object_mut().unwrap();
        report.remove("seconds").expect("seconds");
        for round in report["rounds"].as_array_mut().unwrap() {
            let number = round["round"].to_string();
            let round = round.as_object_mut().unwrap();
            let timing = round.remove("timing").expect("a round's timing");
            assert!(timing["aggregation_ms"].as_f64().unwrap() > 0.0);
            assert!(timing["closed_unix_ms"].as_u64().unwrap() >= timing["opened_unix_ms"].as_u64().unwrap());
            let contributions = round.get_mut("contributions").unwrap().as_array_mut().unwrap();
            for contribution in contributions.iter_mut() {
                let contribution = contribution.as_object_mut().unwrap();
                let timing = contribution.remove("timing").expect("a contribution's timing");
                assert!(timing["intake_ms"].as_f64().unwrap() > 0.0);
                // Bytes on the wire only over the network, as the network section counts them.
                let wire = contribution.remove("wire_bytes");
                let node = contribution["node"].as_str().unwrap();
                if over_the_network {
                    assert_eq!(wire.as_ref(), Some(&network["wire_bytes"][&number][node]), "{node}");
                } else {
                    assert_eq!(wire, None);
                }
            }
            // Contributions are recorded in arrival order, which the network does not fix.
            contributions.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
        }
    }
    assert_eq!(local, networked);
    assert_eq!(local["policy"]["cap"], 0.45);
}

/// A node whose external trainer crashes in round 1 loses that round only: nothing is sent, its
/// outcome says why, and in round 2 its trainer's weights are measured like everyone's.
#[test]
fn a_node_with_an_external_trainer_survives_its_crash_and_contributes_the_next_round() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("consortium");
    init(&dir, free_port(), &["node-de:de", "node-fr:fr"], 2, 20);
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../weft-node/tests/fixtures/contract_trainer.py");
    let mut coordinator = serve(&dir, "serve");
    let mut de = join(&dir, "node-de");
    let mut fr = Running(
        weft()
            .args(["node", "join"])
            .arg(dir.join("nodes/node-fr"))
            .args(["--give-up-after", "60", "--trainer", &format!("python3 {fixture} crash-first"), "--json"])
            .arg(dir.join("node-fr.json"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(fr.wait(Duration::from_secs(180)), "the node with the failing trainer did not finish cleanly");
    assert!(de.wait(Duration::from_secs(180)));
    assert!(coordinator.wait(Duration::from_secs(180)));

    let outcome: Value = serde_json::from_slice(&std::fs::read(dir.join("node-fr.json")).unwrap()).unwrap();
    let rounds = outcome["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    assert_eq!(rounds[0]["code"], weft_net::client::TRAINER_FAILED);
    assert!(rounds[0]["detail"].as_str().unwrap().contains("exit status: 3"), "{}", rounds[0]["detail"]);
    assert_eq!(rounds[0]["wire_bytes"], 0);
    assert_eq!(rounds[1]["accepted"], true, "{}", rounds[1]);
    // The coordinator measured node-fr in round 2 only, and its ledger replays.
    let report: Value = serde_json::from_slice(&std::fs::read(dir.join("serve.json")).unwrap()).unwrap();
    // In the order they arrived: sorted to compare.
    let nodes_in = |round: usize| -> Vec<String> {
        let mut nodes: Vec<String> = report["rounds"][round]["contributions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["node"].as_str().unwrap().to_owned())
            .collect();
        nodes.sort();
        nodes
    };
    assert_eq!(nodes_in(0), vec!["node-de"]);
    assert_eq!(nodes_in(1), vec!["node-de", "node-fr"]);
    // The job's copies of the base and of the node's text are gone; its log stays.
    let job = dir.join("nodes/node-fr/artifacts/jobs/round-0001");
    assert!(job.join("trainer.log").is_file() && !job.join("corpus").exists() && !job.join("base").exists());
    let verify = weft().args(["ledger", "verify"]).arg(dir.join("coordinator")).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
}

/// A python with numpy for the reference trainers: `trainers/setup` installs it on first use.
fn python_with_numpy() -> String {
    let setup = concat!(env!("CARGO_MANIFEST_DIR"), "/../../trainers/setup");
    let out = Command::new("bash").arg(setup).output().expect("running trainers/setup");
    assert!(out.status.success(), "trainers/setup failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("a path").trim().to_owned()
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()) {
        if entry.is_dir() {
            files.extend(files_under(&entry));
        } else {
            files.push(entry);
        }
    }
    files
}

/// One node trains with the numpy reference trainer, set in its kit's node.toml, the others
/// with the built-in trainer, under canary governance. The rounds complete; the coordinator
/// measures and weighs the numpy node's contributions like everyone's; a second run of the same
/// consortium gives the same bases bit for bit; the node's jobs held its own text and nothing of
/// the others' or of the canaries.
#[test]
fn a_consortium_with_a_numpy_trainer_completes_rounds_reproducibly() {
    let python = python_with_numpy();
    let trainer = concat!(env!("CARGO_MANIFEST_DIR"), "/../../trainers/numpy_byte_gpt.py");
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str| -> (PathBuf, Value) {
        let dir = tmp.path().join(name);
        let mut command = weft();
        command.args(["consortium", "init"]).arg(&dir).args(["--address", &format!("127.0.0.1:{}", free_port())]);
        command.args(["--rounds", "2", "--deadline-secs", "120", "--governance"]).args(TINY);
        for node in ["node-de:de", "node-fr:fr", "node-ja:ja"] {
            command.args(["--node", node]);
        }
        let out = command.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // The trainer keeps a copy of what the job gave it (`seen/`), for the checks below.
        let kit = dir.join("nodes/node-ja/node.toml");
        let mut toml = std::fs::read_to_string(&kit).unwrap();
        toml.push_str(&format!(
            "\n[trainer]\ncommand = \"job=$(dirname $WEFT_JOB) && cp -r $job/corpus $job/seen && {python} {trainer}\"\ndeadline_secs = 120\nmax_change = 50.0\n"
        ));
        std::fs::write(&kit, toml).unwrap();
        let mut coordinator = serve(&dir, "serve");
        let nodes: Vec<Running> = ["node-de", "node-fr", "node-ja"].iter().map(|n| join(&dir, n)).collect();
        for mut node in nodes {
            assert!(node.wait(Duration::from_secs(240)), "a node did not finish cleanly");
        }
        assert!(coordinator.wait(Duration::from_secs(240)));
        let report: Value = serde_json::from_slice(&std::fs::read(dir.join("serve.json")).unwrap()).unwrap();
        (dir, report)
    };
    let (dir, report) = run("first");
    for round in 0..2 {
        let contributions = report["rounds"][round]["contributions"].as_array().unwrap();
        assert_eq!(contributions.len(), 3, "round {}: {contributions:?}", round + 1);
        let ja = contributions.iter().find(|c| c["node"] == "node-ja").expect("node-ja contributed");
        // Measured by the coordinator itself, and given a share of the step like the others.
        assert!(ja["heldout_loss"].is_object() && ja["quality"].is_number(), "{ja}");
        assert_eq!(ja["accepted"], true, "{ja}");
        assert!(ja["weight"].as_f64().unwrap() > 0.0, "{ja}");
        assert!(ja["declared"]["train_loss"].as_f64().unwrap() > 0.0, "{ja}");
    }
    let (_, again) = run("second");
    assert_eq!(hashes(&dir.join("serve.json")), hashes(&tmp.path().join("second/serve.json")));
    assert_ne!(report["rounds"][0]["base_hash"], again["rounds"][1]["base_hash"]);

    // What the trainer was given: the node's own text, split as the node splits it, and nothing
    // of the other members' text or of the coordinator's canaries anywhere in its jobs.
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data");
    let own = std::fs::read(data.join("corpora/ja.txt")).unwrap();
    let jobs = dir.join("nodes/node-ja/artifacts/jobs");
    let others: Vec<Vec<u8>> = ["de", "fr"]
        .iter()
        .map(|l| std::fs::read(data.join(format!("corpora/{l}.txt"))).unwrap()[1000..1064].to_vec())
        .chain(
            ["de", "fr", "ja"]
                .iter()
                .flat_map(|l| files_under(&data.join(format!("canaries/{l}"))))
                .map(|f| std::fs::read(f).unwrap()),
        )
        .collect();
    for round in ["round-0001", "round-0002"] {
        let seen = jobs.join(round).join("seen");
        let mut given = std::fs::read(seen.join("train.txt")).unwrap();
        given.extend(std::fs::read(seen.join("validation.txt")).unwrap());
        assert!(given == own, "{round}: the job's text is not the node's own corpus");
    }
    for file in files_under(&jobs) {
        let bytes = std::fs::read(&file).unwrap();
        for other in &others {
            let found = !other.is_empty() && bytes.windows(other.len()).any(|w| w == other.as_slice());
            assert!(!found, "{} holds text that is not node-ja's", file.display());
        }
    }
    let verify = weft().args(["ledger", "verify"]).arg(dir.join("coordinator")).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
}

fn ledger_entries(storage: &Path) -> Vec<Value> {
    let out = weft().args(["ledger", "show", "--json"]).arg(storage).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn read_state(path: &Path) -> weft_core::ModelState {
    weft_core::ModelState::from_safetensors(&std::fs::read(path).unwrap()).unwrap()
}

fn participation(dir: &Path, node: &str) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join(format!("{node}.json"))).unwrap()).unwrap()
}

#[test]
fn a_node_killed_mid_secure_aggregation_is_recovered_by_its_community() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("consortium");
    let nodes = ["node-de", "node-en", "node-es", "node-fr"];
    // One community of four (threshold three); a round waits at most 20 s for masked updates.
    init_with(
        &dir,
        free_port(),
        &["node-de:de", "node-en:en", "node-es:es", "node-fr:fr"],
        2,
        20,
        &["--secure-aggregation", "3"],
    );
    let mut coordinator = serve(&dir, "serve");
    let mut running: Vec<Running> = nodes[..3].iter().map(|n| join(&dir, n)).collect();
    // node-fr dies (abort, as kill -9) right after its sealed shares went out.
    let mut killed = join_crashing(&dir, "node-fr", Some("secagg-shared"));
    let status = killed.exit(Duration::from_secs(60)).expect("node-fr reaches its crash point");
    assert!(!status.success());
    // Restarted at once, it finds round 1 past its keys stage: it sits the round out.
    running.push(join(&dir, "node-fr"));
    for node in &mut running {
        assert!(node.wait(Duration::from_secs(120)), "a node failed");
    }
    assert!(coordinator.wait(Duration::from_secs(60)), "{}", std::fs::read_to_string(dir.join("serve.err")).unwrap());

    let served: Value = serde_json::from_slice(&std::fs::read(dir.join("serve.json")).unwrap()).unwrap();
    assert!(served.get("failed_communities").is_none(), "{served}");
    let fr = participation(&dir, "node-fr");
    assert_eq!(fr["rounds"][0]["code"], "missed_stage", "{fr}");
    assert_eq!(fr["rounds"][1]["accepted"], true, "{fr}");
    assert_eq!(fr["rounds"][1]["community"], "community-1");

    // Round 1's community sum is exactly the three survivors' mean (to the fixed point's
    // resolution): the dropped member's masks were removed from its revealed secret.
    let storage = dir.join("coordinator");
    let entries = ledger_entries(&storage);
    let event = |kind: &str, round: u64| -> Value {
        entries
            .iter()
            .filter_map(|e| e["event"].get(kind))
            .find(|e| e["round"] == round)
            .unwrap_or_else(|| panic!("no {kind} for round {round}"))
            .clone()
    };
    let base_hash = event("round_opened", 1)["base_hash"].as_str().unwrap().to_owned();
    let received = event("contribution_received", 1);
    assert_eq!(received["node"], "community-1");
    let blobs = storage.join("blobs");
    let base = read_state(&blobs.join(format!("{base_hash}.safetensors")));
    let sum = read_state(&blobs.join(format!("{}.safetensors", received["delta_hash"].as_str().unwrap())));
    let survivors: Vec<weft_core::ModelState> = nodes[..3]
        .iter()
        .map(|n| read_state(&dir.join("nodes").join(n).join("artifacts/round-0001/model.safetensors")))
        .collect();
    let mut worst = 0f32;
    for (name, tensor) in sum.iter() {
        for (i, &v) in tensor.data().iter().enumerate() {
            let b = base.get(name).unwrap().data()[i];
            let mean = survivors.iter().map(|s| s.get(name).unwrap().data()[i] - b).sum::<f32>() / 3.0;
            worst = worst.max((v - mean).abs());
        }
    }
    assert!(worst < 1e-6, "the community's sum is off the survivors' mean by {worst}");
    assert!(survivors.iter().all(|s| s.num_values() == sum.num_values()));
    let verify = weft().args(["ledger", "verify"]).arg(&storage).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
}

#[test]
fn a_coordinator_killed_mid_secure_aggregation_fails_the_round_by_name_and_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("consortium");
    init_with(&dir, free_port(), &["node-de:de", "node-en:en", "node-es:es"], 2, 60, &["--secure-aggregation", "3"]);
    // Killed when the shares stage closes: members hold each other's shares, no sum exists.
    let mut first = serve_crashing(&dir, "first", Some("secagg-stage-closed:2"));
    let mut nodes: Vec<Running> = ["node-de", "node-en", "node-es"].iter().map(|n| join(&dir, n)).collect();
    let status = first.exit(Duration::from_secs(60)).expect("the coordinator reaches its crash point");
    assert!(!status.success());
    let mut second = serve(&dir, "second");
    for node in &mut nodes {
        assert!(node.wait(Duration::from_secs(120)), "a node failed after the restart");
    }
    assert!(second.wait(Duration::from_secs(60)), "{}", std::fs::read_to_string(dir.join("second.err")).unwrap());

    let served: Value = serde_json::from_slice(&std::fs::read(dir.join("second.json")).unwrap()).unwrap();
    let why = served["failed_communities"]["1"]["community-1"].as_str().unwrap_or_default();
    assert!(why.contains("restarted"), "{served}");
    let rounds = served["rounds"].as_array().unwrap();
    assert_eq!((rounds[0]["accepted"].as_u64(), rounds[1]["accepted"].as_u64()), (Some(0), Some(1)), "{served}");
    // Round 1 published its base unchanged; round 2 moved on from it.
    let storage = dir.join("coordinator");
    let entries = ledger_entries(&storage);
    let opened: Vec<&Value> = entries.iter().filter_map(|e| e["event"].get("round_opened")).collect();
    assert_eq!(opened[0]["base_hash"], rounds[0]["base_hash"]);
    assert_ne!(rounds[1]["base_hash"], rounds[0]["base_hash"]);
    // Each node's round 1 ended by name (which one depends on where the crash caught it);
    // each took part in round 2.
    for node in ["node-de", "node-en", "node-es"] {
        let p = participation(&dir, node);
        for r in p["rounds"].as_array().unwrap() {
            match r["round"].as_u64() {
                Some(1) => assert!(r["accepted"] == false && !r["code"].as_str().unwrap().is_empty(), "{node}: {p}"),
                _ => assert_eq!((r["round"].as_u64(), &r["accepted"]), (Some(2), &Value::Bool(true)), "{node}: {p}"),
            }
        }
    }
    let verify = weft().args(["ledger", "verify"]).arg(&storage).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
}

#[test]
fn secure_aggregation_waits_for_nodes_that_start_after_the_coordinator() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("consortium");
    init_with(&dir, free_port(), &["node-de:de", "node-en:en", "node-es:es"], 1, 60, &["--secure-aggregation", "3"]);
    // Key stages of 3 s: the keys stage's clock starts with its first member, not the round.
    let toml = dir.join("consortium.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    assert!(text.contains("stage_secs = 30"), "{text}");
    std::fs::write(&toml, text.replace("stage_secs = 30", "stage_secs = 3")).unwrap();
    let mut coordinator = serve(&dir, "serve");
    std::thread::sleep(Duration::from_secs(5));
    let mut nodes: Vec<Running> = ["node-de", "node-en", "node-es"].iter().map(|n| join(&dir, n)).collect();
    for node in &mut nodes {
        assert!(node.wait(Duration::from_secs(120)), "a node failed");
    }
    assert!(coordinator.wait(Duration::from_secs(60)), "{}", std::fs::read_to_string(dir.join("serve.err")).unwrap());
    let served: Value = serde_json::from_slice(&std::fs::read(dir.join("serve.json")).unwrap()).unwrap();
    assert!(served.get("failed_communities").is_none(), "{served}");
    assert_eq!(served["rounds"][0]["accepted"], 1, "{served}");
}

/// The community state of `round` once it is at `stage` or past it.
async fn community_at(
    client: &mut ConsortiumClient<tonic::transport::Channel>,
    round: u64,
    stage: proto::SecureStage,
) -> proto::CommunityState {
    let started = Instant::now();
    loop {
        let state = client.community(proto::CommunityRequest { round }).await.unwrap().into_inner();
        if state.round == round && state.stage >= stage as i32 {
            return state;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "round {round} never reached {stage:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_seals_forged_shares_makes_its_community_fail_by_name_not_its_peers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("consortium");
    init_with(&dir, free_port(), &["node-de:de", "node-en:en", "node-es:es"], 1, 15, &["--secure-aggregation", "3"]);
    let mut coordinator = serve(&dir, "serve");
    let mut honest: Vec<Running> = ["node-de", "node-en"].iter().map(|n| join(&dir, n)).collect();
    // The test is node-es: well-formed keys, then shares whose tags cannot authenticate.
    let kit = Kit::read(&dir.join("nodes/node-es")).unwrap();
    let mut client = connect_when_up(&kit).await;
    wait_for_round(&mut client, 1).await;
    let keys = community_at(&mut client, 1, proto::SecureStage::Keys).await;
    let me = keys.member;
    let advert = proto::AdvertiseRequest { round: 1, cipher_key: vec![9; 32], mask_key: vec![7; 32] };
    client.advertise(advert).await.unwrap();
    let shares = community_at(&mut client, 1, proto::SecureStage::Shares).await;
    let sealed = shares
        .adverts
        .iter()
        .filter(|a| a.member != me)
        .map(|a| proto::Sealed { from: me, to: a.member, ciphertext: vec![0; 66], tag: vec![0; 32] })
        .collect();
    // Well-formed, so the coordinator (which cannot open them) relays them.
    client.share(proto::ShareRequest { round: 1, sealed }).await.unwrap();
    for node in &mut honest {
        assert!(node.wait(Duration::from_secs(120)), "an honest node failed");
    }
    assert!(coordinator.wait(Duration::from_secs(60)), "{}", std::fs::read_to_string(dir.join("serve.err")).unwrap());
    // Each honest member refused the forged share and sent nothing; the community failed by
    // name; the base stayed; the ledger replays.
    for node in ["node-de", "node-en"] {
        let p = participation(&dir, node);
        assert_eq!(p["rounds"][0]["code"], "forged_share", "{node}: {p}");
    }
    let served: Value = serde_json::from_slice(&std::fs::read(dir.join("serve.json")).unwrap()).unwrap();
    let why = served["failed_communities"]["1"]["community-1"].as_str().unwrap_or_default();
    assert!(why.contains("masked updates stage"), "{served}");
    assert_eq!(served["rounds"][0]["accepted"], 0);
    assert_eq!(served["rounds"][0]["base_changed"], false);
    let verify = weft().args(["ledger", "verify"]).arg(dir.join("coordinator")).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
}

/// Runs `weft` until it succeeds or `within` passes (the coordinator may not listen yet).
fn weft_until_up(args: &[&std::ffi::OsStr], within: Duration) -> std::process::Output {
    let started = std::time::Instant::now();
    loop {
        let out = weft().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !stderr.contains("transport") || started.elapsed() > within {
            return out;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn members_change_the_cap_by_signed_votes_over_the_network_after_the_time_lock() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("consortium");
    let nodes = ["node-de", "node-en", "node-fr"];
    // No node trains: rounds close at their deadline, and proposals and votes come in between.
    init_with(
        &dir,
        free_port(),
        &["node-de:de", "node-en:en", "node-fr:fr"],
        6,
        3,
        &["--voting", "--voting-rounds", "2"],
    );
    let mut coordinator = serve(&dir, "serve");
    let kit = |n: &str| dir.join("nodes").join(n);
    let create = weft_until_up(
        &[
            "proposal".as_ref(),
            "create".as_ref(),
            kit("node-de").as_os_str(),
            "--cap".as_ref(),
            "0.4".as_ref(),
            "--rationale".as_ref(),
            "no member above 40%".as_ref(),
        ],
        Duration::from_secs(30),
    );
    assert!(create.status.success(), "{}", String::from_utf8_lossy(&create.stderr));
    let stdout = String::from_utf8_lossy(&create.stdout);
    let id = stdout.split_whitespace().last().unwrap().to_owned();
    assert_eq!(id.len(), 64, "{stdout}");
    for node in nodes {
        let out = weft().args(["proposal", "vote"]).arg(kit(node)).args(["--proposal", &id, "--yes"]).output().unwrap();
        assert!(out.status.success(), "{node}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // A second vote from the same member is refused by name.
    let again =
        weft().args(["proposal", "vote"]).arg(kit("node-en")).args(["--proposal", &id, "--no"]).output().unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already_voted"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(coordinator.wait(Duration::from_secs(90)), "{}", std::fs::read_to_string(dir.join("serve.err")).unwrap());

    let storage = dir.join("coordinator");
    let verify = weft().args(["ledger", "verify"]).arg(&storage).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    assert!(String::from_utf8_lossy(&verify.stdout)
        .contains("proposals: 1 made, 3 signed votes checked, 1 rule changes applied"));
    let entries = ledger_entries(&storage);
    let made = entries.iter().find_map(|e| e["event"].get("proposal_made")).unwrap();
    let tally_after = made["tally_after_round"].as_u64().unwrap();
    let changed = entries.iter().find_map(|e| e["event"].get("rules_changed")).unwrap();
    // Counted when round `tally_after` closed; one round of time-lock; in force from the next.
    assert_eq!(changed["round"].as_u64().unwrap(), tally_after + 2);
    for e in &entries {
        if let Some(decision) = e["event"].get("decision") {
            let round = decision["round"].as_u64().unwrap();
            let expected = if round >= tally_after + 2 { 0.4 } else { 0.5 };
            assert_eq!(decision["cap"].as_f64().unwrap(), expected, "round {round}");
        }
    }
    let show = weft().args(["proposal", "show"]).arg(&storage).output().unwrap();
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(
        shown.contains(&format!("in force since round {}", tally_after + 2))
            && shown.contains("rules in force: cap 0.4"),
        "{shown}"
    );
}
