//! `weft node join`: a node dials out to its coordinator (behind NAT or a firewall, it never
//! listens), polls for rounds, trains on each announced base, and uploads a signed delta.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use weft_core::Contribution;
use weft_core::{ContentHash, ModelState, RuleChange};
use weft_ledger::{ContributionManifest, PublicKey, SigningKey};
use weft_model::{AdamWSettings, AdapterTrainer, AdapterTraining, GptConfig, PrivateTraining};
use weft_node::{
    AdapterNode, ExternalCommand, ExternalSettings, ExternalTrainer, JobTraining, LocalCorpus, Node, NodeError,
    NodeSettings,
};

use crate::config::{read_text, read_toml, KitFiles, NodeKit};
use crate::encoding::{self, Encoding};
use crate::proto::{self, consortium_client::ConsortiumClient, upload_part::Part};
use crate::refusal::RefusalCode;
use crate::secure::Taken;
use crate::witness::Witness;
use crate::{NetError, CHUNK, MAX_MESSAGE, PROTOCOL, WINDOW};

/// A node's startup kit, read from its directory.
pub struct Kit {
    pub config: NodeKit,
    ca: String,
    certificate: String,
    key: String,
    signing: SigningKey,
}

impl Kit {
    pub fn read(dir: &Path) -> Result<Self, NetError> {
        let config: NodeKit = read_toml(&dir.join(KitFiles::CONFIG))?;
        let signing_path = dir.join(KitFiles::SIGNING_KEY);
        let signing = SigningKey::from_hex(&read_text(&signing_path)?)
            .map_err(|e| NetError::Key(signing_path.display().to_string(), e.to_string()))?;
        Ok(Kit {
            config,
            ca: read_text(&dir.join(KitFiles::CA))?,
            certificate: read_text(&dir.join(KitFiles::CERTIFICATE))?,
            key: read_text(&dir.join(KitFiles::TLS_KEY))?,
            signing,
        })
    }
}

/// What one node did in a networked run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Participation {
    pub rounds: Vec<RoundOutcome>,
    /// On a pretrained base: the adapter the node trained for itself on the final published
    /// base and keeps (never sent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_adapter: Option<weft_node::PrivateAdapterManifest>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RoundOutcome {
    pub round: u64,
    pub accepted: bool,
    /// The refusal's code (empty when accepted); see [`refusal`](Self::refusal).
    pub code: String,
    pub detail: String,
    pub quality: f64,
    pub wire_bytes: u64,
    /// Seconds this node spent training for the round.
    pub train_seconds: f64,
    /// Under secure aggregation: the community whose sum carried the node's update (the
    /// verdict and quality are the community's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub community: Option<String>,
    /// The ledger head the receipt carried.
    #[serde(skip)]
    pub ledger_head: Option<proto::LedgerHead>,
}

impl RoundOutcome {
    /// Why the coordinator refused the contribution, if it did and the code is one this build
    /// knows (a newer coordinator may send others: `code` keeps the text).
    pub fn refusal(&self) -> Option<RefusalCode> {
        self.code.parse().ok()
    }
}

/// [`RoundOutcome::code`] of a round the node's own trainer failed (nothing was sent).
pub const TRAINER_FAILED: &str = "trainer_failed";

/// How long a node keeps trying to reach its coordinator before giving up.
pub struct JoinOptions {
    pub give_up_after: Duration,
    pub poll: Duration,
}

impl Default for JoinOptions {
    fn default() -> Self {
        JoinOptions { give_up_after: Duration::from_secs(120), poll: Duration::from_millis(200) }
    }
}

/// A TLS channel to the coordinator, authenticated by the kit's certificate.
pub async fn connect(kit: &Kit) -> Result<ConsortiumClient<Channel>, NetError> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&kit.ca))
        .identity(Identity::from_pem(&kit.certificate, &kit.key))
        .domain_name(kit.config.server_name.clone());
    let endpoint = Endpoint::from_shared(format!("https://{}", kit.config.address))
        .map_err(|e| NetError::Address(kit.config.address.clone(), e.to_string()))?
        .tls_config(tls)
        .map_err(|e| NetError::Tls(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .initial_stream_window_size(WINDOW)
        .initial_connection_window_size(2 * WINDOW);
    let channel = endpoint.connect().await.map_err(|e| NetError::Transport(format!("{e:?}")))?;
    Ok(ConsortiumClient::new(channel).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE))
}

/// A refusal that retrying cannot change (as opposed to a lost connection).
fn definitive(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::InvalidArgument
            | Code::NotFound
    )
}

/// Connects and joins, retrying with exponential backoff (0.1 s doubling to 5 s).
async fn join_with_backoff(
    kit: &Kit,
    options: &JoinOptions,
    witness: &mut Witness,
) -> Result<ConsortiumClient<Channel>, NetError> {
    let started = Instant::now();
    let mut wait = Duration::from_millis(100);
    loop {
        let attempt = async {
            let mut client = connect(kit).await?;
            let reply = client.join(proto::JoinRequest { protocol: PROTOCOL }).await?.into_inner();
            tracing::info!(node = %reply.node, consortium = %reply.consortium, coordinator_key = %reply.coordinator_key, "joined");
            Ok::<_, NetError>((client, reply.coordinator_key.parse::<PublicKey>().ok()))
        };
        match attempt.await {
            Ok((client, key)) => {
                witness.with_key(key);
                return Ok(client);
            }
            // The coordinator answered and said no: retrying will not help.
            Err(NetError::Refused(status)) if definitive(&status) => return Err(NetError::Refused(status)),
            Err(e) if started.elapsed() >= options.give_up_after => return Err(e),
            Err(e) => {
                tracing::info!("coordinator not reachable ({e}); retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// What a node trains with: the built-in byte GPT on its corpus, or a pretrained base's
/// adapters through its family's trainer (which holds the node's text).
pub enum LocalTrainer {
    ByteGpt(LocalCorpus),
    /// A full-weight consortium's node whose training runs in another process, under the
    /// job-file contract (`weft_node::ExternalTrainer`).
    External(LocalCorpus, ExternalCommand),
    Adapter(Box<dyn AdapterTrainer>),
}

/// A node across rounds: what it will train with until its first round, then the node itself
/// (whose state — optimizer moments, kept artifacts — carries over).
enum Participant {
    Ready(LocalTrainer),
    ByteGpt(Box<Node>),
    Adapter(AdapterNode),
}

/// Takes part in rounds until the coordinator says the consortium is finished.
pub async fn join(
    kit: Kit,
    trainer: LocalTrainer,
    artifacts: PathBuf,
    options: JoinOptions,
) -> Result<Participation, NetError> {
    // The latest ledger head the coordinator handed over, kept with the node's artifacts.
    let mut witness = Witness::open(&artifacts);
    let mut client = join_with_backoff(&kit, &options, &mut witness).await?;
    let mut node = Some(Participant::Ready(trainer));
    let mut done = Participation::default();
    let mut last_attempt = 0u64;
    // The last adapter announced and its training: the private adapter takes their shape.
    let mut last_adapter: Option<(proto::AdapterRound, proto::TrainingSettings)> = None;
    loop {
        let state = match client.heartbeat(proto::HeartbeatRequest {}).await {
            Ok(state) => state.into_inner(),
            Err(status) => {
                tracing::warn!("heartbeat failed ({status}); reconnecting");
                client = join_with_backoff(&kit, &options, &mut witness).await?;
                continue;
            }
        };
        witness.observe(state.ledger_head.as_ref());
        let phase = proto::Phase::try_from(state.phase).unwrap_or(proto::Phase::Unspecified);
        match phase {
            proto::Phase::Finished => {
                if let (Some((adapter, training)), Some(Participant::Adapter(_))) = (&last_adapter, &node) {
                    // The published base is served while the coordinator lingers: a node that
                    // misses it keeps its round adapters and says so.
                    match keep_private(&mut client, &state, &mut node, adapter, training, &artifacts).await {
                        Ok(manifest) => {
                            tracing::info!(adapter = %manifest.adapter_hash.short(), "kept a private adapter trained on the final base");
                            done.private_adapter = Some(manifest);
                        }
                        Err(e) => tracing::warn!("no private adapter on the final base: {e}"),
                    }
                }
                return Ok(done);
            }
            proto::Phase::Open if !state.submitted && state.round > last_attempt => {
                last_attempt = state.round;
                if let (Some(adapter), Some(training)) = (&state.adapter, state.training) {
                    last_adapter = Some((adapter.clone(), training));
                }
                let outcome = contribute(&mut client, &kit, &state, &mut node, &artifacts).await;
                match outcome {
                    Ok(outcome) => {
                        witness.observe(outcome.ledger_head.as_ref());
                        if outcome.accepted {
                            tracing::info!(
                                round = outcome.round,
                                quality = outcome.quality,
                                bytes = outcome.wire_bytes,
                                "contribution accepted for measurement"
                            );
                        } else {
                            tracing::warn!(round = outcome.round, code = %outcome.code, "contribution refused: {}", outcome.detail);
                        }
                        done.rounds.push(outcome);
                    }
                    Err(NetError::Node(e @ NodeError::Training { .. })) => {
                        // The node's trainer failed this round (crashed, timed out, wrote
                        // something the node refused): nothing was sent, and the node stays for
                        // the next round.
                        tracing::error!(round = state.round, "{e}; nothing sent this round");
                        done.rounds.push(RoundOutcome {
                            round: state.round,
                            accepted: false,
                            code: TRAINER_FAILED.into(),
                            detail: e.to_string(),
                            quality: 0.0,
                            wire_bytes: 0,
                            train_seconds: 0.0,
                            community: None,
                            ledger_head: None,
                        });
                    }
                    Err(NetError::Refused(status)) if !definitive(&status) => {
                        // The coordinator went away (a restart, the network): try this round again.
                        tracing::warn!("lost the coordinator mid-round ({status}); reconnecting");
                        last_attempt = state.round - 1;
                        client = join_with_backoff(&kit, &options, &mut witness).await?;
                    }
                    Err(e) => return Err(e),
                }
            }
            _ => tokio::time::sleep(options.poll).await,
        }
    }
}

/// One round: fetch the base, train, encode, sign, upload.
async fn contribute(
    client: &mut ConsortiumClient<Channel>,
    kit: &Kit,
    state: &proto::RoundState,
    node: &mut Option<Participant>,
    artifacts: &Path,
) -> Result<RoundOutcome, NetError> {
    let base_hash: ContentHash =
        state.base_hash.parse().map_err(|_| NetError::Protocol("a base hash that is not 64 hex digits".into()))?;
    let training = state.training.ok_or_else(|| NetError::Protocol("a round without training settings".into()))?;
    let adapter =
        state.adapter.as_ref().map(crate::announce::adapter_from_proto).transpose().map_err(NetError::Protocol)?;
    // Under secure aggregation the keys go out first (the stage is short); training follows.
    let membership = match &state.secure_aggregation {
        Some(settings) => {
            // Keyed by the node's own signing key: the coordinator relays, it never holds this.
            let secret = kit.signing.derive_secret("weft node secagg secret v1");
            match crate::secure::keys(client, &secret, state.round, settings).await? {
                Taken::Keys(membership) => Some(membership),
                Taken::SatOut(why) => return Ok(sat_out(state.round, why)),
            }
        }
        None => None,
    };
    // Checked before the base is fetched: a kit for the other kind of consortium trains nothing.
    let participant = node.take().ok_or_else(|| NetError::Protocol("the node was lost".into()))?;
    let participant = match (&adapter, participant) {
        (
            Some(_),
            Participant::Ready(LocalTrainer::ByteGpt(_) | LocalTrainer::External(..)) | Participant::ByteGpt(_),
        ) => {
            return Err(NetError::Protocol(
                "the coordinator announces adapter rounds on a pretrained base, but this node's kit has no base (node.toml lacks `base`: use the kit the consortium made for this base)".into(),
            ))
        }
        (None, Participant::Ready(LocalTrainer::Adapter(_)) | Participant::Adapter(_)) => {
            return Err(NetError::Protocol(
                "the coordinator announces full-weight rounds of the byte GPT, but this node's kit is for a pretrained base".into(),
            ))
        }
        (_, participant) => participant,
    };
    let base = match fetch_base(client, base_hash, artifacts).await {
        Ok(base) => base,
        Err(e) => {
            // The coordinator went away mid-download: the node (its optimizer, its kept
            // artifacts) stays for the retry.
            *node = Some(participant);
            return Err(e);
        }
    };
    let round = state.round;
    let training_started = std::time::Instant::now();
    let id = kit.config.id.clone();
    let language = kit.config.language.clone();
    let artifacts = artifacts.to_owned();
    // DP's sampling and noise are keyed by the node's own signing key: the coordinator knows the
    // round's seed, never this.
    let dp_secret = weft_node::node_secret(&kit.signing.derive_secret("weft node dp secret v1"), &id);
    let dp = dp_rule(&training)?;
    if dp.is_some() && matches!(participant, Participant::Ready(LocalTrainer::External(..))) {
        return Err(NetError::Trainer(
            "this consortium trains with DP-SGD ([privacy.dp]), which weft's built-in trainer applies; an outside trainer cannot join it yet (drop --trainer / [trainer])".into(),
        ));
    }
    let (participant, contribution) =
        tokio::task::spawn_blocking(move || -> (Participant, Result<Contribution, NetError>) {
            match (participant, adapter) {
                (Participant::Ready(LocalTrainer::Adapter(trainer)), Some(record)) => {
                    let mut node = AdapterNode::new(id, language, trainer, training.seed, artifacts);
                    if let Some(rule) = dp {
                        let private = PrivateTraining { dp: rule.mechanism, delta: rule.delta, secret: dp_secret };
                        // Fatal, not a failed round: a node must never train this consortium
                        // without the DP-SGD it announces.
                        if let Err(e) = node.with_privacy(private) {
                            return (Participant::Adapter(node), Err(NetError::Trainer(e.to_string())));
                        }
                    }
                    adapter_cycle(node, round, &base, base_hash, &record, &training)
                }
                (Participant::Adapter(node), Some(record)) => {
                    adapter_cycle(node, round, &base, base_hash, &record, &training)
                }
                (Participant::Ready(LocalTrainer::External(corpus, external)), _) => {
                    let config = byte_gpt_config(&training);
                    let settings = ExternalSettings {
                        external,
                        dir: artifacts.join("jobs"),
                        family: "byte-gpt".into(),
                        config: serde_json::to_value(config).unwrap_or_default(),
                        training: JobTraining {
                            steps: training.local_steps,
                            batch_rows: training.batch_rows as usize,
                            context: config.context,
                            seed: training.seed,
                            adamw: AdamWSettings { lr: training.lr, ..AdamWSettings::default() },
                        },
                    };
                    let built = ExternalTrainer::new(settings, id.as_str())
                        .map_err(|e| NetError::Trainer(e.to_string()))
                        .and_then(|trainer| {
                            Ok(Node::new(id, language, corpus, Box::new(trainer), training.seed, artifacts)?)
                        });
                    match built {
                        Ok(node) => byte_gpt_cycle(Box::new(node), round, &base, base_hash),
                        // As below: nothing is left to train with.
                        Err(e) => {
                            (Participant::Ready(LocalTrainer::ByteGpt(LocalCorpus::from_bytes(Vec::new()))), Err(e))
                        }
                    }
                }
                (Participant::Ready(LocalTrainer::ByteGpt(corpus)), _) => {
                    let config = byte_gpt_config(&training);
                    let settings = NodeSettings {
                        steps: training.local_steps,
                        batch_rows: training.batch_rows as usize,
                        adamw: AdamWSettings { lr: training.lr, ..AdamWSettings::default() },
                        seed: training.seed,
                        privacy: dp,
                    };
                    let built = settings
                        .byte_gpt_trainer(config, &dp_secret)
                        .map_err(|e| NetError::Trainer(e.to_string()))
                        .and_then(|trainer| Ok(Node::new(id, language, corpus, trainer, settings.seed, artifacts)?));
                    match built {
                        Ok(node) => byte_gpt_cycle(Box::new(node), round, &base, base_hash),
                        // A node that cannot be built (an empty corpus, a model shape out of
                        // range) ends the join with this error: nothing is left to train with.
                        Err(e) => {
                            (Participant::Ready(LocalTrainer::ByteGpt(LocalCorpus::from_bytes(Vec::new()))), Err(e))
                        }
                    }
                }
                (Participant::ByteGpt(node), _) => byte_gpt_cycle(node, round, &base, base_hash),
                (participant, _) => (participant, Err(NetError::Protocol("the round's kind changed".into()))),
            }
        })
        .await
        .map_err(|e| NetError::Protocol(e.to_string()))?;
    *node = Some(participant);
    let train_seconds = training_started.elapsed().as_secs_f64();
    let contribution = contribution?;
    if let Some(membership) = membership {
        let update = contribution.delta.state().flat_values();
        return Ok(match crate::secure::finish(client, membership, base_hash, &update).await? {
            Ok(done) => {
                tracing::info!(round, community = %done.community, accepted = done.accepted, "community sum measured");
                RoundOutcome {
                    round,
                    accepted: done.accepted,
                    code: done.code,
                    detail: done.detail,
                    quality: done.quality,
                    wire_bytes: done.wire_bytes,
                    train_seconds,
                    community: Some(done.community),
                    ledger_head: None,
                }
            }
            Err(why) => RoundOutcome { train_seconds, ..sat_out(round, why) },
        });
    }
    let encoding = Encoding::from_proto(state.encoding).ok_or_else(|| NetError::Protocol("unknown encoding".into()))?;
    let encoded = encoding::encode(contribution.delta.state(), encoding)?;
    // Sign the delta as the coordinator will decode it.
    let delta_hash = encoding::sent_hash(contribution.delta.state(), &encoded, encoding)?;
    let manifest = ContributionManifest {
        node: kit.config.id.to_string(),
        round,
        base_hash,
        delta_hash,
        token_count: contribution.token_count,
        declared: contribution.declared.iter().filter(|(_, v)| v.is_finite()).map(|(k, v)| (k.clone(), *v)).collect(),
    };
    let manifest = serde_json::to_vec(&manifest).map_err(|e| NetError::Protocol(e.to_string()))?;
    let signature = kit.signing.sign(&manifest);
    let header = proto::UploadHeader {
        manifest,
        signature: signature.0.to_vec(),
        encoding: encoding.to_proto() as i32,
        encoded_bytes: encoded.len() as u64,
    };
    let receipt = upload(client, header, encoded).await?;
    Ok(RoundOutcome {
        round,
        accepted: receipt.accepted,
        code: receipt.code,
        detail: receipt.detail,
        quality: receipt.quality,
        wire_bytes: receipt.wire_bytes,
        train_seconds,
        community: None,
        ledger_head: receipt.ledger_head,
    })
}

/// A secure round this node could not finish (nothing of its update left it in the clear).
fn sat_out(round: u64, why: crate::secure::SatOut) -> RoundOutcome {
    tracing::warn!(round, code = %why.code, "secure aggregation: {}", why.detail);
    RoundOutcome {
        round,
        accepted: false,
        code: why.code,
        detail: why.detail,
        quality: 0.0,
        wire_bytes: 0,
        train_seconds: 0.0,
        community: None,
        ledger_head: None,
    }
}

/// The DP-SGD rule the coordinator announces, checked: it crosses the network.
fn dp_rule(training: &proto::TrainingSettings) -> Result<Option<weft_privacy::DpRule>, NetError> {
    let Some(dp) = &training.dp else { return Ok(None) };
    let rule = weft_privacy::DpRule {
        mechanism: weft_privacy::DpSgd {
            clip_norm: dp.clip_norm,
            noise_multiplier: dp.noise_multiplier,
            sample_rate: dp.sample_rate,
        },
        delta: dp.delta,
        epsilon_budget: dp.epsilon_budget,
    };
    rule.validate()
        .map_err(|e| NetError::Protocol(format!("the coordinator announces DP-SGD settings out of range: {e}")))?;
    Ok(Some(rule))
}

/// After the last round: the final published base, and the node's private adapter on it.
async fn keep_private(
    client: &mut ConsortiumClient<Channel>,
    state: &proto::RoundState,
    node: &mut Option<Participant>,
    adapter: &proto::AdapterRound,
    training: &proto::TrainingSettings,
    artifacts: &Path,
) -> Result<weft_node::PrivateAdapterManifest, NetError> {
    let base_hash: ContentHash =
        state.base_hash.parse().map_err(|_| NetError::Protocol("a base hash that is not 64 hex digits".into()))?;
    let record = crate::announce::adapter_from_proto(adapter).map_err(NetError::Protocol)?;
    let settings = adapter_training(training);
    let base = fetch_base(client, base_hash, artifacts).await?;
    let Some(Participant::Adapter(mut trainer)) = node.take() else {
        return Err(NetError::Protocol("the node trains no adapters".into()));
    };
    let round = state.round;
    let kept = tokio::task::spawn_blocking(move || trainer.keep_private(round, &base, base_hash, &record, &settings))
        .await
        .map_err(|e| NetError::Protocol(e.to_string()))?;
    Ok(kept?)
}

fn adapter_training(training: &proto::TrainingSettings) -> AdapterTraining {
    AdapterTraining {
        steps: training.local_steps,
        batch: training.batch_rows as usize,
        context: training.context as usize,
        lr: training.lr,
    }
}

fn adapter_cycle(
    mut node: AdapterNode,
    round: u64,
    base: &ModelState,
    base_hash: ContentHash,
    record: &weft_core::AdapterRound,
    training: &proto::TrainingSettings,
) -> (Participant, Result<Contribution, NetError>) {
    let settings = adapter_training(training);
    let contribution = node.run_cycle(round, base, base_hash, record, &settings, |_, _| {}).map_err(NetError::from);
    (Participant::Adapter(node), contribution)
}

/// The byte GPT's shape as the round's training settings announce it.
fn byte_gpt_config(training: &proto::TrainingSettings) -> GptConfig {
    GptConfig {
        layers: training.layers as usize,
        heads: training.heads as usize,
        width: training.width as usize,
        context: training.context as usize,
    }
}

fn byte_gpt_cycle(
    mut node: Box<Node>,
    round: u64,
    base: &ModelState,
    base_hash: ContentHash,
) -> (Participant, Result<Contribution, NetError>) {
    let contribution = node.run_cycle(round, base, base_hash, |_, _| {}).map(|cycle| cycle.contribution);
    (Participant::ByteGpt(node), contribution.map_err(NetError::from))
}

/// The header, then the encoded delta in chunks cut as the stream is read.
pub async fn upload(
    client: &mut ConsortiumClient<Channel>,
    header: proto::UploadHeader,
    encoded: Vec<u8>,
) -> Result<proto::UploadReceipt, NetError> {
    let chunks = encoded.len().div_ceil(CHUNK);
    let head = std::iter::once(proto::UploadPart { part: Some(Part::Header(header)) });
    let body = (0..chunks).map(move |i| {
        let end = ((i + 1) * CHUNK).min(encoded.len());
        proto::UploadPart { part: Some(Part::Data(encoded[i * CHUNK..end].to_vec())) }
    });
    Ok(client.upload(tokio_stream::iter(head.chain(body))).await?.into_inner())
}

/// The base by hash: from the node's cache, or streamed from the coordinator and checked.
pub async fn fetch_base(
    client: &mut ConsortiumClient<Channel>,
    hash: ContentHash,
    artifacts: &Path,
) -> Result<ModelState, NetError> {
    let cache = artifacts.join("bases").join(format!("{hash}.safetensors"));
    if let Ok(bytes) = std::fs::read(&cache) {
        if let Ok(state) = ModelState::from_safetensors(&bytes) {
            if state.content_hash() == hash {
                return Ok(state);
            }
        }
    }
    let mut stream = client.fetch_base(proto::FetchBaseRequest { base_hash: hash.to_string() }).await?.into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await? {
        bytes.extend_from_slice(&chunk.data);
    }
    let state = ModelState::from_safetensors(&bytes)
        .map_err(|e| NetError::Protocol(format!("the base received is unreadable: {e}")))?;
    let actual = state.content_hash();
    if actual != hash {
        return Err(NetError::Protocol(format!("the base received hashes to {actual}, announced {hash}")));
    }
    if let Some(dir) = cache.parent() {
        let _ = std::fs::create_dir_all(dir);
        if weft_durable::write_atomic(&cache, &bytes).is_ok() {
            // Only the current base is worth keeping: a pretrained base is hundreds of MB a round.
            for old in std::fs::read_dir(dir).into_iter().flatten().filter_map(Result::ok) {
                if old.path() != cache {
                    let _ = std::fs::remove_file(old.path());
                }
            }
        }
    }
    Ok(state)
}

/// What the coordinator answered to a proposal or a vote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProposalOutcome {
    pub accepted: bool,
    /// The refusal's stable code (empty when accepted).
    pub code: String,
    pub detail: String,
    /// The proposal's id (hex).
    pub proposal: String,
}

/// Makes a class-3 proposal as this kit's member: signs it for the last closed round and, if a
/// round closed meanwhile (`stale_round`), signs it again for the new one.
pub async fn propose(kit: &Kit, change: &RuleChange, rationale: &str) -> Result<ProposalOutcome, NetError> {
    let mut client = connect(kit).await?;
    let state = client.heartbeat(proto::HeartbeatRequest {}).await?.into_inner();
    // While a round is open, the last closed one is the round before it.
    let open = proto::Phase::try_from(state.phase) == Ok(proto::Phase::Open);
    let mut after_round = if open { state.round.saturating_sub(1) } else { state.round };
    let change_json = serde_json::to_string(change).map_err(|e| NetError::Protocol(e.to_string()))?;
    let node = kit.config.id.to_string();
    for _ in 0..3 {
        let id = weft_core::proposal::proposal_id(after_round, &node, rationale, change);
        let signature = kit.signing.sign(&weft_core::proposal::proposal_message(&id));
        let request = proto::ProposeRequest {
            after_round,
            rationale: rationale.to_owned(),
            change_json: change_json.clone(),
            signature: signature.0.to_vec(),
        };
        let receipt = client.propose(request).await?.into_inner();
        if receipt.code == "stale_round" && receipt.last_closed_round != after_round {
            after_round = receipt.last_closed_round;
            continue;
        }
        return Ok(ProposalOutcome {
            accepted: receipt.accepted,
            code: receipt.code,
            detail: receipt.detail,
            proposal: if receipt.accepted { receipt.proposal } else { id.to_string() },
        });
    }
    Err(NetError::Protocol("rounds kept closing while the proposal was signed; try again".into()))
}

/// Votes on a proposal as this kit's member.
pub async fn vote(kit: &Kit, proposal: ContentHash, approve: bool) -> Result<ProposalOutcome, NetError> {
    let mut client = connect(kit).await?;
    let signature = kit.signing.sign(&weft_core::proposal::vote_message(&proposal, approve));
    let request = proto::VoteRequest { proposal: proposal.to_string(), approve, signature: signature.0.to_vec() };
    let receipt = client.vote(request).await?.into_inner();
    Ok(ProposalOutcome {
        accepted: receipt.accepted,
        code: receipt.code,
        detail: receipt.detail,
        proposal: proposal.to_string(),
    })
}
