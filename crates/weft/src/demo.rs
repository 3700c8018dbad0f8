//! `weft demo`: a whole consortium on embedded defaults, in one process or (`--processes`) as a
//! coordinator process and one process per node over mutual TLS on loopback.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use weft_coordinator::{
    CanaryRegistry, DurableCoordinator, HeldoutSet, Journal, SqliteJournal, SubmitError, Visibility,
};
use weft_core::{ContentHash, NodeId, OuterOptimizer, RuleChange, Weighting};
use weft_durable::write_atomic;
use weft_ledger::SigningKey;
use weft_net::config::{ConsortiumConfig, KitFiles};
use weft_net::encoding::Encoding;
use weft_node::{LocalCorpus, Node};

use crate::args::RunArgs;
use crate::attack::{Attack, AttackKind};
use crate::report::{Finished, NetworkReport, NodeInfo, Report};
use crate::reputation::ReputationFile;
use crate::run::{setting_error, RunSettings, Source};
use crate::{data, say, table};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Number of sovereign nodes: one per language, the first N of --languages.
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// Languages, one node each (available: en, de, fr, es, it, pt, ja, zh-cn, id)
    /// [default: en,de,fr,es,it,pt,ja,zh-cn,id; with --base: de,fr,es,ja,it,pt,zh-cn,id].
    #[arg(long, value_delimiter = ',')]
    pub languages: Option<Vec<String>>,
    #[command(flatten)]
    pub run: RunArgs,
    /// Make the last --attackers nodes malicious with this attack.
    #[arg(long, value_enum)]
    pub attack: Option<AttackKind>,
    /// How many nodes attack (the last ones).
    #[arg(long, default_value_t = 1)]
    pub attackers: usize,
    /// The attack's factor λ (default depends on the attack: see `weft demo --help`).
    #[arg(long)]
    pub attack_scale: Option<f32>,
    /// With --voting: after round 1 the first node proposes this class-3 change (`cap=0.4`,
    /// `floor=0.01`, `quorum=0.75`, comma-separated) and every member signs a vote for it.
    #[arg(long, requires = "voting", value_parser = parse_change)]
    pub propose: Option<RuleChange>,
    /// Keep every artifact here (nodes' sovereign models, bases, deltas, manifests, records;
    /// with --processes, the whole consortium: kits, the coordinator's storage and ledger).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Data directory (udhr/ and corpora/); default: the repository's data/.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Run as separate processes on this machine: `weft coordinator serve` and one `weft node
    /// join` per node, over mutual TLS on loopback (same bases as in one process, except under
    /// --privacy dp, where each node keys its noise with its own signing key).
    #[arg(long)]
    pub processes: bool,
    /// With --processes: how deltas travel (f32, f16, bf16, int8).
    #[arg(long, default_value = "f32")]
    pub encoding: Encoding,
    /// Improve a real pretrained base with low-rank adapters instead of training the built-in
    /// byte model: `smollm2-135m` (fetched and imported on first use) or a directory written by
    /// `weft model import`. The --adapter-* flags set its training; the byte model's (--layers,
    /// --heads, --width, --context, --local-steps, --batch, --lr) do not apply.
    #[arg(long)]
    pub base: Option<String>,
    #[command(flatten)]
    pub adapter: crate::realbase::AdapterArgs,
    /// With --base: compare with each node training alone (`alone`, the default) or not (`none`).
    #[arg(long, value_enum, default_value_t = crate::realbase::Baseline::Alone)]
    pub baseline: crate::realbase::Baseline,
}

impl DemoArgs {
    /// The run these flags describe, checked as `consortium.toml` is: an error names the flag.
    fn run(&self) -> anyhow::Result<RunSettings> {
        let default: Vec<String> = data::LANGUAGES.iter().map(|l| (*l).to_owned()).collect();
        let languages = choose_languages(self.languages.as_ref().unwrap_or(&default), self.nodes)?;
        self.run_settings(&languages)
    }

    /// The run's settings for these languages, one node each.
    pub(crate) fn run_settings(&self, languages: &[String]) -> anyhow::Result<RunSettings> {
        let members = languages
            .iter()
            .map(|l| Ok((NodeId::new(format!("node-{l}"))?, l.clone())))
            .collect::<anyhow::Result<Vec<_>>>()?;
        RunSettings::new(self.run.sections()?, members).map_err(|e| setting_error(e, Source::Flags))
    }
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if let Some(base) = &args.base {
        return crate::realbase::run(&args, base);
    }
    let started = Instant::now();
    let run = args.run()?;
    if args.attack.is_some() && !(1..=run.members.len()).contains(&args.attackers) {
        bail!("--attackers must be between 1 and the number of nodes ({})", run.members.len());
    }
    let data_dir = data::data_dir(args.data.clone());
    // The held-out text ships with the project: check it before fetching any corpus.
    for language in run.languages() {
        data::heldout(&data_dir, &language)?;
    }
    if args.processes {
        return processes(&args, &run, &data_dir, started);
    }
    in_process(&args, &run, &data_dir, started)
}

fn in_process(args: &DemoArgs, run: &RunSettings, data_dir: &Path, started: Instant) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let out = args.out.clone().unwrap_or_else(|| scratch.path().to_owned());
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    // The coordinator's durable state: journal, ledger and blobs. Running the same command
    // again with the same --out continues the run (after a crash, too).
    let storage = out.join("coordinator");
    let resuming = storage.join(SqliteJournal::DATABASE).is_file();
    if resuming && args.attack.is_some() {
        bail!(
            "{} holds a run to continue, but --attack cannot be resumed (the attack harness keeps its state in memory); use a new --out",
            out.display()
        );
    }
    let languages = run.languages();
    let registry = match &run.sections.governance {
        Some(g) => Some(crate::run::canary_registry(data_dir, g.canaries.as_deref(), &languages)?),
        None => None,
    };
    let mut attack = args.attack.map(|kind| {
        let scale = args.attack_scale.unwrap_or_else(|| kind.default_scale(run.members.len()));
        Attack::new(kind, scale, run.seed(), args.attackers)
    });
    let first_attacker = run.members.len() - if attack.is_some() { args.attackers } else { 0 };
    let attackers: Vec<NodeId> = run.members[first_attacker..].iter().map(|(id, _)| id.clone()).collect();

    let mut nodes = Vec::new();
    let mut infos = Vec::new();
    for (index, (id, language)) in run.members.iter().enumerate() {
        let mut bytes = data::corpus(data_dir, language)?;
        let attacker = index >= first_attacker;
        match attack.as_ref().map(|a| a.kind) {
            Some(AttackKind::Poison) if attacker => Attack::poison(&mut bytes, run.seed() ^ index as u64),
            Some(AttackKind::CanaryOverfit) if attacker => {
                let registry = registry.as_ref().context("--attack canary-overfit needs --governance")?;
                bytes = public_canaries(registry, &languages)?;
            }
            _ => {}
        }
        infos.push(NodeInfo {
            node: id.clone(),
            language: language.clone(),
            corpus_bytes: bytes.len(),
            attacker: attacker.then_some(args.attack).flatten(),
        });
        let dir = out.join("nodes").join(id.as_str());
        nodes.push(Node::new(
            id.clone(),
            language.clone(),
            LocalCorpus::from_bytes(bytes),
            // In one process there is no node key: each node's DP stream is keyed by the run's
            // seed and its id (the networked node keys it with its own signing key).
            run.node.byte_gpt_trainer(run.model(), &demo_node_secret(run.seed(), id))?,
            run.node.seed,
            dir,
        )?);
    }

    let attack_settings = args.attack.map(|kind| (kind, args.attackers, args.attack_scale));
    // The members' signing keys (a networked node makes its own; here they follow from the seed).
    let member_keys: BTreeMap<String, SigningKey> = run
        .members
        .iter()
        .map(|(id, _)| {
            (id.to_string(), {
                let material = [&b"weft demo member key"[..], &run.seed().to_le_bytes()].concat();
                SigningKey::from_seed(weft_node::node_secret(&material, id))
            })
        })
        .collect();
    let voters = member_keys.iter().map(|(id, key)| (id.clone(), key.public())).collect();
    let mut coordinator =
        run.coordinator(data_dir, &storage, serde_json::json!({ "attack": attack_settings }), &voters)?;
    if resuming {
        say!("continuing the run in {} after round {}", out.display(), coordinator.round());
    } else {
        save_base(&out, 0, &coordinator)?;
    }
    print_header(run, &coordinator, &languages)?;
    if let Some(attack) = &attack {
        let names: Vec<String> = attackers.iter().map(ToString::to_string).collect();
        say!("attack: {:?} (λ = {}) by {}", attack.kind, attack.scale, names.join(", "));
    }
    let genesis = SqliteJournal::read(&storage)?;
    let initial = genesis.head_after(0)?.context("the coordinator's journal has no genesis")?;
    say!("round 0 base {}  held-out loss {}", initial.model.base_hash.short(), table::losses(&initial.base_loss));
    drop(genesis);

    while coordinator.round() < run.sections.rounds {
        if let (Some(change), 1) = (&args.propose, coordinator.round()) {
            if coordinator.proposals().is_some_and(|b| b.open.is_empty() && b.scheduled.is_empty()) {
                propose_and_vote(&mut coordinator, change, &member_keys)?;
            }
        }
        // A round left open by a crash continues; nodes it already heard from are not asked again.
        let policy_before = *coordinator.policy();
        let (announcement, done) = match coordinator.open_round_state() {
            Some(state) => state,
            None => (coordinator.open_round()?, Default::default()),
        };
        if *coordinator.policy() != policy_before {
            let now = coordinator.policy();
            let change = RuleChange {
                cap: (now.cap != policy_before.cap).then_some(now.cap),
                floor: (now.floor != policy_before.floor).then_some(now.floor),
                quorum: (now.quorum != policy_before.quorum).then_some(now.quorum),
            };
            say!(
                "\nround {}: the voted change takes effect after its time-lock: {}",
                announcement.round,
                change.describe(&policy_before)
            );
        }
        let communities = match run.secure_aggregation {
            Some(_) => Some(coordinator.draw_communities()?),
            None => None,
        };
        let pending: Vec<&mut Node> = nodes.iter_mut().filter(|n| !done.contains(n.id())).collect();
        let mut contributions =
            train_all(pending, announcement.round, run.node.steps, coordinator.base(), announcement.base_hash)?;
        if let Some(attack) = attack.as_mut() {
            attack.apply(announcement.round, &mut contributions[first_attacker..]);
        }
        if let (Some(communities), Some(settings)) = (&communities, run.secure_aggregation) {
            say!();
            for (id, members) in communities {
                say!("round {} {id}: {}", announcement.round, members.join(", "));
            }
            contributions =
                community_contributions(announcement.round, communities, &settings, &contributions, &done, run.seed())?;
        }
        let mut local_losses = BTreeMap::new();
        for contribution in contributions {
            local_losses.insert(contribution.node.clone(), contribution.declared.get("final_train_loss").copied());
            match coordinator.submit(contribution) {
                Ok(_) | Err(SubmitError::Rejected(_)) => {}
                Err(SubmitError::Internal(e)) => return Err(e.into()),
            }
        }
        let record = coordinator.close_round()?;
        save_base(&out, record.round, &coordinator)?;
        let rounds_dir = out.join("coordinator").join("rounds");
        std::fs::create_dir_all(&rounds_dir)?;
        let json = serde_json::to_vec_pretty(&record)?;
        write_atomic(&rounds_dir.join(format!("round-{:04}.json", record.round)), &json)?;
        table::round(&record, &local_losses, &attackers)?;
        if let Some(governance) = coordinator.governance() {
            table::reputation(&record, &languages)?;
            let saved = ReputationFile {
                settings: *governance.settings(),
                topics: languages.clone(),
                state: governance.state().clone(),
            };
            write_atomic(&out.join("coordinator").join("governance.json"), &serde_json::to_vec_pretty(&saved)?)?;
        }
    }

    let manifests_dir = out.join("coordinator").join("nodes");
    std::fs::create_dir_all(&manifests_dir)?;
    for (node, manifest) in coordinator.manifests() {
        write_atomic(&manifests_dir.join(format!("{node}.json")), &serde_json::to_vec_pretty(manifest)?)?;
    }
    drop(coordinator);
    let finished = Finished {
        run,
        storage: &storage,
        nodes: infos,
        artifacts: nodes.iter().map(|n| (n.id().clone(), n.dir().to_owned())).collect(),
        seconds: started.elapsed().as_secs_f64(),
        network: None,
    };
    let report = Report::build(finished, &mut run.heldout(data_dir)?)?;
    let html = args.out.as_deref().map(|out| (storage.as_path(), out));
    finish(&report, &languages, args.json.as_deref(), args.out.as_deref(), html)
}

/// `cap=0.4,floor=0.01`: a class-3 change as `--propose` takes it.
fn parse_change(text: &str) -> Result<RuleChange, String> {
    let mut change = RuleChange::default();
    for part in text.split(',') {
        let (key, value) = part.split_once('=').ok_or_else(|| format!("{part:?} is not KEY=VALUE"))?;
        let value: f64 = value.trim().parse().map_err(|_| format!("{key}: {value:?} is not a number"))?;
        match key.trim() {
            "cap" => change.cap = Some(value),
            "floor" => change.floor = Some(value),
            "quorum" => change.quorum = Some(value),
            other => return Err(format!("{other:?} cannot be changed by vote (cap, floor, quorum can)")),
        }
    }
    Ok(change)
}

/// The demo's class-3 scenario: the first node proposes `change` after round 1 and every member
/// signs a vote for it.
fn propose_and_vote(
    coordinator: &mut DurableCoordinator<HeldoutSet>,
    change: &RuleChange,
    keys: &BTreeMap<String, SigningKey>,
) -> anyhow::Result<()> {
    let Some((proposer, key)) = keys.iter().next() else { return Ok(()) };
    let after = coordinator.round();
    let rationale = format!("demo: {}", change.describe(coordinator.policy()));
    let id = weft_core::proposal::proposal_id(after, proposer, &rationale, change);
    let signature = key.sign(&weft_core::proposal::proposal_message(&id));
    let id = coordinator.propose(after, proposer, &rationale, change.clone(), signature)?;
    let voting = coordinator.proposals().map(|b| b.voting).unwrap_or_default();
    say!(
        "\nproposal {} by {proposer} (class 3): {} — counted when round {} closes, {:.0}% of the votes and {:.0}% turnout to pass, then a time-lock of {} round(s)",
        id.short(),
        change.describe(coordinator.policy()),
        after + voting.voting_rounds,
        100.0 * voting.supermajority,
        100.0 * voting.quorum,
        voting.timelock_rounds
    );
    let mut cast = Vec::new();
    for (voter, key) in keys {
        let approve = true;
        let signature = key.sign(&weft_core::proposal::vote_message(&id, approve));
        coordinator.vote(id, voter, approve, signature)?;
        cast.push(format!("{voter} {}", if approve { "yes" } else { "no" }));
    }
    say!("  signed votes: {}", cast.join(" · "));
    Ok(())
}

/// The summary table, the report files, the final line: the same for both ways of running.
/// `html`: the coordinator's storage and the directory to write its `report.html` into.
fn finish(
    report: &Report,
    languages: &[String],
    json: Option<&Path>,
    out: Option<&Path>,
    html: Option<(&Path, &Path)>,
) -> anyhow::Result<()> {
    table::summary(
        &report.initial_heldout_loss,
        &report.final_heldout_loss,
        &report.sovereign_heldout_loss,
        languages,
    )?;
    let bytes = serde_json::to_vec_pretty(report)?;
    if let Some(out) = out {
        write_atomic(&out.join("report.json"), &bytes)?;
        say!("artifacts kept in {}", out.display());
    }
    if let Some((storage, dir)) = html {
        let page = crate::dashboard::write_report(storage, dir)?;
        say!("report with charts: {} (browse the run: weft dashboard {})", page.display(), storage.display());
    }
    if let Some(path) = json {
        std::fs::write(path, &bytes).with_context(|| format!("writing {}", path.display()))?;
        say!("report written to {}", path.display());
    }
    say!("final base {}  ({:.1} s)", report.final_base_hash, report.seconds);
    Ok(())
}

fn print_header(
    run: &RunSettings,
    coordinator: &DurableCoordinator<HeldoutSet>,
    languages: &[String],
) -> anyhow::Result<()> {
    let model = run.model();
    say!(
        "weft demo: {} nodes ({}), {} rounds of {} local steps, model {} layers × {} heads × width {} × context {} ({} parameters), seed {}",
        run.members.len(),
        languages.join(", "),
        run.sections.rounds,
        run.node.steps,
        model.layers,
        model.heads,
        model.width,
        model.context,
        coordinator.base().num_values(),
        run.seed()
    );
    let policy = &run.policy;
    // What the policy weighs: nodes, or under secure aggregation communities.
    let (inputs, unit) = match run.secure_aggregation {
        Some(s) => (run.members.len() / s.community_size, " communities"),
        None => (run.members.len(), ""),
    };
    say!(
        "policy: floor {} · cap {} · quorum {} ({} of {}{unit}) · weighting {} · aggregator {} · outer {} · quality probed at {:.3}·Δ",
        policy.floor,
        policy.cap,
        policy.quorum,
        policy.required(inputs),
        inputs,
        match policy.weighting {
            Weighting::Quality => "by measured quality",
            Weighting::Equal => "equal",
            Weighting::Declared => "by DECLARED quality (Tapestry baseline)",
        },
        run.aggregator,
        describe_outer(&run.outer),
        coordinator.probe_scale()
    );
    if let Some(s) = &run.secure_aggregation {
        say!(
            "privacy: secure aggregation in {inputs} communities of at least {} nodes, redrawn each round from a seed the round's opening fixes; the coordinator sees only community means (values clipped to ±{}, fixed point mod 2^32)",
            s.community_size,
            s.range
        );
    }
    if let Some(p) = &run.privacy {
        let m = p.rule.mechanism;
        say!(
            "privacy: record-level DP-SGD on every node · budget ε {} per node at δ {:e} · noise σ {:.4}{} · sampling rate {} · clip norm {}",
            p.rule.epsilon_budget,
            p.rule.delta,
            m.noise_multiplier,
            if run.sections.privacy.and_then(|c| c.dp).is_some_and(|c| c.noise_multiplier.is_none()) {
                format!(" (calibrated: {} rounds × {} steps spend at most the budget)", run.sections.rounds, p.steps_per_round)
            } else {
                String::new()
            },
            m.sample_rate,
            m.clip_norm
        );
    }
    Ok(())
}

/// `--processes`: the same consortium as separate processes — the consortium is provisioned
/// from the same sections (`consortium.toml` holds exactly these flags), then one `weft
/// coordinator serve` and one `weft node join` per node run over mutual TLS on loopback.
fn processes(args: &DemoArgs, run: &RunSettings, data_dir: &Path, started: Instant) -> anyhow::Result<()> {
    if args.attack.is_some() {
        bail!("--processes runs the honest consortium; --attack is for the in-process demo");
    }
    if run.secure_aggregation.is_some() && args.encoding != Encoding::F32 {
        bail!("--encoding {}: under --secure-aggregation updates travel masked, as 32-bit words modulo 2^32 (drop --encoding)", format!("{:?}", args.encoding).to_lowercase());
    }
    let exe = std::env::current_exe().context("locating the weft binary")?;
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let dir = match &args.out {
        Some(out) => {
            let dir = out.join("consortium");
            if dir.exists() {
                bail!(
                    "{} already holds a consortium: the networked demo provisions a new one (its certificates and keys are fresh); use a new --out",
                    dir.display()
                );
            }
            dir
        }
        None => scratch.path().join("consortium"),
    };
    let config = ConsortiumConfig {
        name: "weft-demo".into(),
        address: format!("127.0.0.1:{}", free_port()?),
        server_name: "weft-coordinator".into(),
        rounds: run.sections.rounds,
        seed: run.seed(),
        round_deadline_secs: 600,
        encoding: args.encoding,
        storage: "coordinator".into(),
        model: Some(run.model()),
        base: None,
        training: run.sections.training,
        policy: run.sections.policy.clone(),
        governance: run.sections.governance.clone(),
        privacy: run.sections.privacy,
        gauntlet: run.sections.gauntlet,
        voting: run.sections.voting,
        breaker: run.sections.breaker,
    };
    weft_net::provision::init(&dir, &config, &run.members)?;
    let served_json = scratch.path().join("served.json");
    let mut serve = std::process::Command::new(&exe);
    serve.args(["coordinator", "serve"]).arg(&dir).args(["--linger-secs", "1", "--json"]).arg(&served_json);
    serve.arg("--data").arg(data_dir);
    // The processes' output goes through this one: when its reader goes away (`| head`), the
    // demo stops them all quietly instead of leaving them to fail on a closed pipe.
    let closed = Arc::new(AtomicBool::new(false));
    let mut forwarders = Vec::new();
    let mut coordinator = Child(serve.stdout(Stdio::piped()).spawn().context("starting the coordinator")?);
    forwarders.extend(forward(&mut coordinator.0, &closed));
    let mut nodes = Vec::new();
    for (id, _) in &run.members {
        let mut join = std::process::Command::new(&exe);
        join.args(["node", "join"]).arg(dir.join("nodes").join(id.as_str())).arg("--data").arg(data_dir);
        let mut child = Child(join.stdout(Stdio::piped()).spawn().with_context(|| format!("starting node {id}"))?);
        forwarders.extend(forward(&mut child.0, &closed));
        nodes.push((id.clone(), child, None));
    }
    let served = loop {
        if closed.load(Ordering::Relaxed) {
            return Err(crate::output::Closed.into());
        }
        for (_, child, status) in &mut nodes {
            if status.is_none() {
                *status = child.0.try_wait().context("waiting for a node")?;
            }
        }
        if nodes.iter().all(|(_, _, status)| status.is_some()) {
            if let Some(served) = coordinator.0.try_wait().context("waiting for the coordinator")? {
                break served;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    for forwarder in forwarders {
        let _ = forwarder.join();
    }
    if closed.load(Ordering::Relaxed) {
        return Err(crate::output::Closed.into());
    }
    let failed: Vec<String> = nodes
        .iter()
        .filter(|(_, _, status)| !status.is_some_and(|s| s.success()))
        .map(|(id, _, _)| id.to_string())
        .collect();
    if !served.success() || !failed.is_empty() {
        bail!("the networked demo failed (coordinator: {served}; failed nodes: {failed:?})");
    }
    let served: weft_net::server::Served = serde_json::from_slice(
        &std::fs::read(&served_json).with_context(|| format!("reading {}", served_json.display()))?,
    )?;
    let storage = dir.join(&config.storage);
    if run.secure_aggregation.is_some() {
        say!();
        communities_from_ledger(&storage, &served)?;
    }
    let infos = run
        .members
        .iter()
        .map(|(id, language)| {
            Ok(NodeInfo {
                node: id.clone(),
                language: language.clone(),
                corpus_bytes: data::corpus(data_dir, language)?.len(),
                attacker: None,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let finished = Finished {
        run,
        storage: &storage,
        nodes: infos,
        artifacts: run
            .members
            .iter()
            .map(|(id, _)| (id.clone(), dir.join("nodes").join(id.as_str()).join(KitFiles::ARTIFACTS)))
            .collect(),
        seconds: started.elapsed().as_secs_f64(),
        network: Some(NetworkReport {
            encoding: args.encoding,
            wire_bytes: served.wire_bytes,
            round_seconds: served.round_seconds,
        }),
    };
    let report = Report::build(finished, &mut run.heldout(data_dir)?)?;
    // Replays every round from the ledger and its blobs, as `weft ledger verify` does.
    let audit = weft_coordinator::verify_with(&storage, None, None)
        .with_context(|| format!("{}: ledger verification FAILED", storage.display()))?;
    say!("ledger verified: {} entries, {} rounds replayed bit for bit", audit.entries, audit.replayed);
    if args.out.is_some() {
        say!("consortium kept in {} (`weft ledger show {}`)", dir.display(), storage.display());
    }
    let html = args.out.as_deref().map(|out| (storage.as_path(), out));
    finish(&report, &run.languages(), args.json.as_deref(), None, html)
}

/// Each round's communities as the ledger recorded them, and what became of each: its sum's
/// measured quality, or why it failed.
fn communities_from_ledger(storage: &Path, served: &weft_net::server::Served) -> anyhow::Result<()> {
    use weft_ledger::Event;
    let mut measured: BTreeMap<(u64, String), String> = BTreeMap::new();
    let mut drawn = Vec::new();
    for entry in crate::ledger::checked_entries(storage)? {
        match entry.event {
            Event::CommunitiesDrawn { round, communities, .. } => drawn.push((round, communities)),
            Event::Evaluation { round, node, quality, .. } => {
                let q = quality.map_or("unmeasurable".into(), |q| format!("sum measured: quality {:+.2}%", 100.0 * q));
                measured.insert((round, node), q);
            }
            _ => {}
        }
    }
    // A restarted coordinator records the same partition again: show it once.
    drawn.dedup();
    for (round, communities) in drawn {
        for (id, members) in communities {
            let outcome = match served.failed_communities.get(&round).and_then(|f| f.get(&id)) {
                Some(why) => format!("failed: {why}"),
                None => measured.get(&(round, id.clone())).cloned().unwrap_or_else(|| "no sum".into()),
            };
            say!("round {round} {id}: {} · {outcome}", members.join(", "));
        }
    }
    Ok(())
}

/// Prints `child`'s output lines as the demo's own; marks `closed` when the demo's reader has
/// gone.
fn forward(child: &mut std::process::Child, closed: &Arc<AtomicBool>) -> Option<std::thread::JoinHandle<()>> {
    use std::io::BufRead;
    let stdout = child.stdout.take()?;
    let closed = closed.clone();
    Some(std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if crate::output::line(format_args!("{line}")).is_err() {
                closed.store(true, Ordering::Relaxed);
                break;
            }
        }
    }))
}

/// A child process that is killed if the demo stops early (an error, Ctrl-C unwinding).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// The public canaries now scoring each of the consortium's languages: what a node that
/// teaches to the test trains on.
fn public_canaries(registry: &CanaryRegistry, languages: &[String]) -> anyhow::Result<Vec<u8>> {
    let mut text = Vec::new();
    for language in languages {
        text.extend_from_slice(&registry.active(language, Visibility::Public)?.text);
    }
    Ok(text)
}

pub(crate) fn choose_languages(requested: &[String], nodes: usize) -> anyhow::Result<Vec<String>> {
    if nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let mut chosen: Vec<String> = Vec::new();
    for language in requested {
        if !data::LANGUAGES.contains(&language.as_str()) {
            bail!("unknown language '{language}' in --languages (available: {})", data::LANGUAGES.join(", "));
        }
        if chosen.contains(language) {
            bail!("language '{language}' is listed twice in --languages: one node per language");
        }
        chosen.push(language.clone());
    }
    if chosen.len() < nodes {
        bail!("--nodes {nodes} needs {nodes} languages but --languages lists {}", chosen.len());
    }
    chosen.truncate(nodes);
    Ok(chosen)
}

fn describe_outer(outer: &OuterOptimizer) -> String {
    match outer {
        OuterOptimizer::Plain { lr } => format!("plain (lr {lr})"),
        OuterOptimizer::Nesterov { lr, momentum } => format!("nesterov (lr {lr}, momentum {momentum})"),
    }
}

/// Trains every node on the announced base, in parallel, with one progress bar each.
fn train_all(
    nodes: Vec<&mut Node>,
    round: u64,
    steps: u64,
    base: &weft_core::ModelState,
    base_hash: ContentHash,
) -> anyhow::Result<Vec<weft_core::Contribution>> {
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("  {prefix:<14} {bar:30} {pos:>4}/{len} steps  loss {msg}")
        .map_err(|e| anyhow::anyhow!("progress bar template: {e}"))?;
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = nodes
            .into_iter()
            .map(|node| {
                let bar = bars.add(ProgressBar::new(steps));
                bar.set_style(style.clone());
                bar.set_prefix(node.id().to_string());
                scope.spawn(move || {
                    let result = node.run_cycle(round, base, base_hash, |step, loss| {
                        bar.set_position(step);
                        bar.set_message(format!("{loss:.3}"));
                    });
                    bar.finish_and_clear();
                    result
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect::<Vec<_>>()
    });
    let mut contributions = Vec::new();
    for result in results {
        match result {
            Ok(cycle) => contributions.push(cycle?.contribution),
            Err(_) => bail!("a node's training thread panicked"),
        }
    }
    Ok(contributions)
}

fn save_base(out: &Path, round: u64, coordinator: &DurableCoordinator<HeldoutSet>) -> anyhow::Result<()> {
    let dir = out.join("coordinator").join("bases");
    std::fs::create_dir_all(&dir)?;
    let bytes = coordinator.base().to_safetensors(None)?;
    write_atomic(&dir.join(format!("round-{round:04}.safetensors")), &bytes)?;
    Ok(())
}

/// A node's DP secret in the one-process demo, where every node is this process anyway.
pub(crate) fn demo_node_secret(seed: u64, node: &NodeId) -> [u8; 32] {
    weft_node::node_secret(&seed.to_le_bytes(), node)
}

/// Under secure aggregation: each community's members' contributions, through the protocol,
/// become one contribution — the community's mean update. A community that fails (too few
/// members) is reported by name and sends nothing; the others proceed.
fn community_contributions(
    round: u64,
    communities: &BTreeMap<String, Vec<String>>,
    settings: &weft_net::config::SecureAggregationConfig,
    contributions: &[weft_core::Contribution],
    done: &std::collections::BTreeSet<NodeId>,
    seed: u64,
) -> anyhow::Result<Vec<weft_core::Contribution>> {
    let mut out = Vec::new();
    for (index, (id, members)) in communities.iter().enumerate() {
        if done.contains(id.as_str()) {
            continue;
        }
        let mine: Vec<&weft_core::Contribution> =
            contributions.iter().filter(|c| members.iter().any(|m| c.node == m.as_str())).collect();
        let secret =
            |node: &NodeId| weft_node::node_secret(&[b"secagg".as_slice(), &seed.to_le_bytes()].concat(), node);
        match crate::secure::community_contribution(round, index as u32 + 1, id, settings, &mine, secret) {
            Ok(contribution) => out.push(contribution),
            Err(e) => say!("  {id} ({}) failed: {e:#}", members.join(", ")),
        }
    }
    Ok(out)
}
