//! `weft coordinator serve`: the round engine behind gRPC with mutual TLS.
//!
//! One task drives the rounds (open, wait for every roster node or the deadline, close). Each
//! upload is spooled to disk chunk by chunk (memory does not grow with the delta's size or the
//! number of nodes uploading), its signed manifest checked, then decoded and submitted to the
//! round engine one at a time. Every refusal names its reason to the node and in the log; the
//! coordinator keeps serving the others.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio_stream::Stream;
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};
use weft_coordinator::{BlobStore, DurableCoordinator, Measure, ProposalSubmitError, RoundRecord, SubmitError};
use weft_core::{AdapterRound, ContentHash, Contribution, Delta, ModelState, NodeId, Rejection, RuleChange};
use weft_ledger::{ContributionManifest, Signature, WitnessedHead};

use crate::config::{ConsortiumConfig, Fingerprint, Member, Roster, SecureAggregationConfig};
use crate::encoding::{self, Encoding};
use crate::proto::{self, consortium_server::ConsortiumServer, upload_part::Part};
use crate::refusal::Refusal;
use crate::secure::{SecureRound, Stage, Verdict};
use crate::{NetError, CHUNK, FRAME, MAX_MESSAGE, PROTOCOL, WINDOW};

/// What a served consortium is told to do.
pub struct ServeOptions {
    pub config: ConsortiumConfig,
    pub roster: Roster,
    /// PEM: the coordinator's certificate and key, and the consortium CA that signs members.
    pub certificate: String,
    pub key: String,
    pub ca: String,
    /// Where uploads are spooled before they are checked.
    pub spool: PathBuf,
    /// How long to keep answering after the last round (so nodes learn it is over).
    pub linger: Duration,
    /// The DP-SGD rule nodes train with (`[privacy.dp]`, its noise calibrated).
    pub dp: Option<weft_privacy::DpRule>,
}

/// Bytes each node sent per round.
pub type WireBytes = BTreeMap<u64, BTreeMap<NodeId, u64>>;

/// What a served run did.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Served {
    /// The rounds closed by this run.
    pub rounds: Vec<RoundRecord>,
    /// round → node → bytes of delta received.
    pub wire_bytes: WireBytes,
    /// round → seconds from opening to the closed record.
    pub round_seconds: BTreeMap<u64, f64>,
    /// Under secure aggregation: round → community → why it failed (too few members at a
    /// stage, or the coordinator restarted mid-protocol).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failed_communities: FailedCommunities,
}

/// What the upload tasks see of the round, without waiting for the engine.
struct View {
    phase: proto::Phase,
    round: u64,
    /// The current base: nodes fetch it from the blob store by this hash.
    base_hash: ContentHash,
    deadline: Option<Instant>,
    submitted: BTreeSet<NodeId>,
    /// The open round's adapter, when contributions are adapters.
    adapter: Option<AdapterRound>,
    /// f32 values and tensors an update to the open round has: an upload may need no more.
    update_size: (usize, usize),
}

/// The round engine on a thread of its own: every measurement, check and aggregation runs
/// there, one at a time, in arrival order. (Also keeps the allocator's memory in one place:
/// deltas freed on many threads would each leave memory cached in their own malloc arena.)
struct Engine<M: Measure> {
    jobs: std::sync::mpsc::Sender<Job<M>>,
    /// The ledger head after the last job: heartbeats and receipts hand it to nodes without
    /// waiting for the engine.
    head: Arc<Mutex<Option<WitnessedHead>>>,
}

type Job<M> = Box<dyn FnOnce(&mut DurableCoordinator<M>) + Send>;

impl<M: Measure + Send + 'static> Engine<M> {
    fn start(mut coordinator: DurableCoordinator<M>) -> Result<Self, NetError> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job<M>>();
        let head = Arc::new(Mutex::new(coordinator.ledger_head().cloned()));
        std::thread::Builder::new()
            .name("weft-engine".into())
            .spawn(move || {
                for job in queue {
                    job(&mut coordinator);
                }
            })
            .map_err(|e| NetError::Transport(format!("starting the engine thread: {e}")))?;
        Ok(Engine { jobs, head })
    }

    /// The ledger's last entry, as of the last job done.
    fn head(&self) -> Option<proto::LedgerHead> {
        lock(&self.head).as_ref().map(|h| proto::LedgerHead {
            seq: h.seq,
            hash: h.hash.to_string(),
            signature: h.signature.to_string(),
        })
    }

    /// Runs `f` on the engine thread and waits for its result.
    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut DurableCoordinator<M>) -> R + Send + 'static,
    ) -> Result<R, NetError> {
        let (done, result) = tokio::sync::oneshot::channel();
        let head = self.head.clone();
        self.jobs
            .send(Box::new(move |c| {
                let outcome = f(c);
                // Before the caller hears the outcome: its receipt carries the head it left.
                *lock(&head) = c.ledger_head().cloned();
                let _ = done.send(outcome);
            }))
            .map_err(|_| NetError::Transport("the engine thread has stopped".into()))?;
        result.await.map_err(|_| NetError::Transport("the engine thread has stopped".into()))
    }
}

struct Shared<M: Measure> {
    engine: Engine<M>,
    view: Mutex<View>,
    /// The engine's blob store, read directly to stream bases (blobs never change once stored).
    store: Arc<dyn BlobStore>,
    submitted: Notify,
    options: ServeOptions,
    coordinator_key: String,
    wire: Mutex<WireBytes>,
    uploads: std::sync::atomic::AtomicU64,
    /// The open round's secure aggregation protocol (`[privacy] secure_aggregation`).
    secure: Mutex<Option<SecureRound>>,
    /// Communities that failed, by round: community → why.
    failed_communities: Mutex<FailedCommunities>,
}

/// round → community → why it failed.
pub type FailedCommunities = BTreeMap<u64, BTreeMap<String, String>>;

/// An upload in progress. If the node goes away mid-stream (killed, connection reset), the
/// server drops the upload's task without a refusal to send: this logs it and removes the
/// partial spool file.
struct Progress {
    node: NodeId,
    wire: u64,
    spool: Option<PathBuf>,
    finished: bool,
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(spool) = &self.spool {
            let _ = std::fs::remove_file(spool);
        }
        if !self.finished {
            tracing::warn!(node = %self.node, code = "truncated", "upload refused: the stream broke after {} bytes (the node went away)", self.wire);
        }
    }
}

/// A 64-byte ed25519 signature from the wire.
fn signature_of(bytes: &[u8]) -> Result<Signature, Status> {
    let bytes: [u8; 64] =
        bytes.try_into().map_err(|_| Status::invalid_argument("malformed_signature: a signature is 64 bytes"))?;
    Ok(Signature(bytes))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data: keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves until every round of the config is closed; returns the rounds closed by this run.
/// The coordinator must be durable: nodes reconnect after a restart and their signed
/// contributions go into its ledger.
pub async fn serve<M: Measure + Send + 'static>(
    coordinator: DurableCoordinator<M>,
    options: ServeOptions,
) -> Result<Served, NetError> {
    options.config.validate()?;
    let address = tokio::net::lookup_host(&options.config.address)
        .await
        .map_err(|e| NetError::Address(options.config.address.clone(), e.to_string()))?
        .next()
        .ok_or_else(|| NetError::Address(options.config.address.clone(), "resolves to nothing".into()))?;
    let tls = crate::tls::server_config(&options.certificate, &options.key, &options.ca)?;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| NetError::Address(options.config.address.clone(), e.to_string()))?;
    std::fs::create_dir_all(&options.spool).map_err(|source| NetError::Io { path: options.spool.clone(), source })?;
    let coordinator_key = coordinator.public_key().map(|k| k.to_string()).unwrap_or_default();
    let base_size = (coordinator.base().num_values(), coordinator.base().len());
    let shared = Arc::new(Shared {
        view: Mutex::new(View {
            phase: proto::Phase::Waiting,
            round: coordinator.round(),
            base_hash: coordinator.base_hash(),
            deadline: None,
            submitted: BTreeSet::new(),
            adapter: None,
            update_size: base_size,
        }),
        store: coordinator.store().clone(),
        engine: Engine::start(coordinator)?,
        submitted: Notify::new(),
        options,
        coordinator_key,
        wire: Mutex::new(BTreeMap::new()),
        uploads: std::sync::atomic::AtomicU64::new(0),
        secure: Mutex::new(None),
        failed_communities: Mutex::new(BTreeMap::new()),
    });
    let service = ConsortiumServer::new(Service { shared: shared.clone() })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // HTTP/2 windows sized for megabyte chunks: the defaults (64 KiB) stall a fast link.
    let server = Server::builder()
        .initial_stream_window_size(WINDOW)
        .initial_connection_window_size(2 * WINDOW)
        .max_frame_size(Some(FRAME))
        .add_service(service)
        .serve_with_incoming_shutdown(crate::tls::incoming(listener, tls), async {
            let _ = stopped.await;
        });
    let server = tokio::spawn(server);
    tracing::info!(%address, "coordinator serving");
    let outcome = drive(shared.clone()).await;
    tokio::time::sleep(shared.options.linger).await;
    let _ = stop.send(());
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(NetError::Transport(e.to_string())),
        Err(e) => return Err(NetError::Transport(e.to_string())),
    }
    let (rounds, round_seconds) = outcome?;
    let wire = lock(&shared.wire).clone();
    let failed_communities = lock(&shared.failed_communities).clone();
    Ok(Served { rounds, wire_bytes: wire, round_seconds, failed_communities })
}

/// An open round as the engine reports it.
struct Opened {
    round: u64,
    base_hash: ContentHash,
    /// Nodes already heard (a round continued after a restart).
    done: BTreeSet<NodeId>,
    adapter: Option<AdapterRound>,
    update_size: (usize, usize),
    /// Opened by an earlier run of the coordinator (which stopped mid-round).
    continued: bool,
}

/// Opens, waits for, and closes every remaining round.
async fn drive<M: Measure + Send + 'static>(
    shared: Arc<Shared<M>>,
) -> Result<(Vec<RoundRecord>, BTreeMap<u64, f64>), NetError> {
    let mut records = Vec::new();
    let mut seconds = BTreeMap::new();
    let rounds = shared.options.config.rounds;
    let deadline = Duration::from_secs(shared.options.config.round_deadline_secs);
    let closes = |opened: Instant| opened.checked_add(deadline).ok_or(NetError::Deadline);
    loop {
        let opened = shared
            .engine
            .run(move |engine| -> Result<Option<Opened>, NetError> {
                let (announcement, done, continued) = match engine.open_round_state() {
                    Some((announcement, done)) => (announcement, done, true),
                    None if engine.round() >= rounds => return Ok(None),
                    None => (engine.open_round()?, BTreeSet::new(), false),
                };
                let update_size = engine.with_update_layout(|l| (l.num_values(), l.len())).unwrap_or_default();
                Ok(Some(Opened {
                    round: announcement.round,
                    base_hash: announcement.base_hash,
                    done,
                    adapter: engine.adapter_round(),
                    update_size,
                    continued,
                }))
            })
            .await??;
        let Some(Opened { round, base_hash, done, adapter, update_size, continued }) = opened else { break };
        let opened_at = Instant::now();
        let closes_at = closes(opened_at)?;
        let secure = shared.options.config.privacy.and_then(|p| p.secure_aggregation);
        if let Some(settings) = secure {
            // Set up before the round shows as open: a node that sees it open finds its community.
            let partition = shared.engine.run(|engine| engine.draw_communities()).await??;
            let mut run = SecureRound::new(round, base_hash, &partition, &settings, update_size.0, closes_at)?;
            if continued {
                run = run.interrupted(&done);
            }
            *lock(&shared.secure) = Some(run);
        }
        {
            let mut view = lock(&shared.view);
            *view = View {
                phase: proto::Phase::Open,
                round,
                base_hash,
                deadline: Some(closes_at),
                submitted: done,
                adapter,
                update_size,
            };
        }
        tracing::info!(round, base = %base_hash.short(), "round open");
        match secure {
            Some(settings) => run_secure_round(&shared, &settings, closes_at).await?,
            None => {
                let roster = shared.options.roster.node.len();
                loop {
                    if lock(&shared.view).submitted.len() >= roster {
                        break;
                    }
                    let wait = shared.submitted.notified();
                    tokio::select! {
                        _ = wait => {}
                        _ = tokio::time::sleep_until(closes_at.into()) => break,
                    }
                }
            }
        }
        {
            let mut view = lock(&shared.view);
            view.phase = proto::Phase::Waiting;
            view.deadline = None;
        }
        // The base in force after the close: the round's, or the anchor a circuit breaker restored.
        let (record, base_now) =
            shared.engine.run(|engine| engine.close_round().map(|record| (record, engine.base_hash()))).await??;
        tracing::info!(round, accepted = record.accepted, base = %base_now.short(), "round closed");
        {
            let mut view = lock(&shared.view);
            view.base_hash = base_now;
            view.submitted.clear();
        }
        seconds.insert(record.round, opened_at.elapsed().as_secs_f64());
        records.push(record);
    }
    lock(&shared.view).phase = proto::Phase::Finished;
    tracing::info!("all rounds done");
    Ok((records, seconds))
}

/// A short stage waits `stage_secs` from now, never past `round_closes` when given.
fn stage_deadline(settings: &SecureAggregationConfig, round_closes: Option<Instant>) -> Instant {
    let now = Instant::now();
    let end = now.checked_add(Duration::from_secs(settings.stage_secs)).unwrap_or(now);
    round_closes.map_or(end, |r| end.min(r))
}

/// Walks the open round's communities through the protocol's stages (each waits for its
/// members or its deadline), then measures each surviving community's mean as one
/// contribution.
async fn run_secure_round<M: Measure + Send + 'static>(
    shared: &Arc<Shared<M>>,
    settings: &SecureAggregationConfig,
    closes_at: Instant,
) -> Result<(), NetError> {
    let mut means = Vec::new();
    for _ in [Stage::Keys, Stage::Shares, Stage::Masked, Stage::Reveal] {
        if lock(&shared.secure).as_ref().is_none_or(|s| s.stage == Stage::Done) {
            break;
        }
        // The stage's deadline is read again after every message: the keys stage's moves up
        // when its first member arrives.
        loop {
            let wait = shared.submitted.notified();
            let stage_closes = match lock(&shared.secure).as_ref() {
                Some(s) if !s.stage_complete() && Instant::now() < s.stage_closes => s.stage_closes,
                _ => break,
            };
            tokio::select! {
                _ = wait => {}
                _ = tokio::time::sleep_until(stage_closes.into()) => {}
            }
        }
        let mut secure = lock(&shared.secure);
        let Some(s) = secure.as_mut() else { break };
        let closed = s.stage;
        // MASKED waits for training: it closes at the round's deadline; the key stages are
        // short, and the survivors' reveals get their stage even past the round's deadline.
        let next = match closed {
            Stage::Shares => closes_at,
            Stage::Masked => stage_deadline(settings, None),
            _ => stage_deadline(settings, Some(closes_at)),
        };
        for (position, sum) in s.close_stage(next) {
            let n = sum.members.len() as f32;
            let mean: Vec<f32> = sum.sum.iter().map(|v| v / n).collect();
            means.push((s.communities[position].id.clone(), mean));
        }
        tracing::info!(round = s.round, stage = ?closed, "secure aggregation stage closed");
        drop(secure);
        // Tests kill the coordinator here, mid-protocol.
        weft_durable::crash::point("secagg-stage-closed");
    }
    let Some((round, base_hash)) = lock(&shared.secure).as_ref().map(|s| (s.round, s.base_hash)) else {
        return Ok(());
    };
    for (id, mean) in means {
        let community = id.clone();
        let job = move |engine: &mut DurableCoordinator<M>| -> Result<Verdict, NetError> {
            let state = engine
                .with_update_layout(|layout| ModelState::from_flat(layout, &mean))
                .ok_or_else(|| {
                    NetError::Protocol(format!("round {round} closed before {community}'s sum was measured"))
                })?
                .map_err(|e| NetError::Protocol(format!("{community}'s sum: {e}")))?;
            let contribution = Contribution {
                node: NodeId::new(community.clone()).map_err(|e| NetError::Protocol(e.to_string()))?,
                round,
                base_hash,
                delta: Delta::from_state(state),
                // Members' token counts would be per-node facts: the community states none.
                token_count: 0,
                declared: BTreeMap::new(),
            };
            match engine.submit(contribution) {
                Ok(receipt) => Ok(Verdict { accepted: true, quality: receipt.quality, ..Verdict::default() }),
                Err(SubmitError::Rejected(reason)) => Ok(Verdict {
                    accepted: false,
                    code: reason.code().to_string(),
                    detail: reason.to_string(),
                    quality: 0.0,
                }),
                Err(SubmitError::Internal(e)) => Err(e.into()),
            }
        };
        let verdict = shared.engine.run(job).await??;
        tracing::info!(community = %id, accepted = verdict.accepted, code = %verdict.code, quality = verdict.quality, "community sum measured");
        if let Some(c) = lock(&shared.secure).as_mut().and_then(|s| s.communities.iter_mut().find(|c| c.id == id)) {
            c.verdict = Some(verdict);
        }
    }
    let mut secure = lock(&shared.secure);
    if let Some(s) = secure.as_mut() {
        s.measured();
        let failed: BTreeMap<String, String> =
            s.communities.iter().filter_map(|c| c.failure.clone().map(|f| (c.id.clone(), f))).collect();
        if !failed.is_empty() {
            lock(&shared.failed_communities).insert(s.round, failed);
        }
        let mut wire = lock(&shared.wire);
        wire.entry(s.round).or_default().extend(s.wire.iter().map(|(n, b)| (n.clone(), *b)));
    }
    Ok(())
}

struct Service<M: Measure> {
    shared: Arc<Shared<M>>,
}

impl<M: Measure> Service<M> {
    /// The roster member behind the client certificate of this connection.
    fn member<T>(&self, request: &Request<T>) -> Result<Member, Status> {
        let certs = request.peer_certs().ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let cert = certs.first().ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let print = Fingerprint::of(cert.as_ref());
        match self.shared.options.roster.by_certificate(&print) {
            Some(member) => Ok(member.clone()),
            None => {
                tracing::warn!(code = "unknown_certificate", certificate = %print, "refused: a certificate signed by the consortium CA but not in the roster");
                Err(Status::permission_denied(format!("unknown_certificate: {print} is not in the roster")))
            }
        }
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<proto::Chunk, Status>> + Send>>;

#[tonic::async_trait]
impl<M: Measure + Send + 'static> proto::consortium_server::Consortium for Service<M> {
    async fn join(&self, request: Request<proto::JoinRequest>) -> Result<Response<proto::JoinReply>, Status> {
        let member = self.member(&request)?;
        let protocol = request.get_ref().protocol;
        if protocol != PROTOCOL {
            return Err(Status::failed_precondition(format!(
                "protocol {protocol} is not spoken here (this coordinator speaks {PROTOCOL})"
            )));
        }
        tracing::info!(node = %member.id, "node joined");
        Ok(Response::new(proto::JoinReply {
            protocol: PROTOCOL,
            consortium: self.shared.options.config.name.clone(),
            node: member.id.to_string(),
            coordinator_key: self.shared.coordinator_key.clone(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::RoundState>, Status> {
        let member = self.member(&request)?;
        let config = &self.shared.options.config;
        let view = lock(&self.shared.view);
        let deadline_ms = view.deadline.map_or(0, |d| d.saturating_duration_since(Instant::now()).as_millis() as u64);
        Ok(Response::new(proto::RoundState {
            phase: view.phase as i32,
            round: view.round,
            base_hash: view.base_hash.to_string(),
            deadline_ms,
            training: Some(proto::TrainingSettings {
                local_steps: config.training.local_steps,
                batch_rows: config.training.batch as u32,
                lr: config.training.lr,
                seed: config.seed,
                // The byte GPT's shape; zero on a pretrained base (nodes read its config.json).
                layers: config.model.map_or(0, |m| m.layers as u32),
                heads: config.model.map_or(0, |m| m.heads as u32),
                width: config.model.map_or(0, |m| m.width as u32),
                context: config.context() as u32,
                dp: self.shared.options.dp.map(|rule| proto::DpSgdSettings {
                    clip_norm: rule.mechanism.clip_norm,
                    noise_multiplier: rule.mechanism.noise_multiplier,
                    sample_rate: rule.mechanism.sample_rate,
                    delta: rule.delta,
                    epsilon_budget: rule.epsilon_budget,
                }),
            }),
            encoding: config.encoding.to_proto() as i32,
            submitted: view.submitted.contains(&member.id),
            max_upload_bytes: config.encoding.max_bytes(view.update_size.0, view.update_size.1),
            adapter: view.adapter.as_ref().map(crate::announce::adapter_to_proto),
            secure_aggregation: config
                .privacy
                .and_then(|p| p.secure_aggregation)
                .map(|s| proto::SecureAggregationSettings { community_size: s.community_size as u32, range: s.range }),
            ledger_head: self.shared.engine.head(),
        }))
    }

    async fn community(
        &self,
        request: Request<proto::CommunityRequest>,
    ) -> Result<Response<proto::CommunityState>, Status> {
        let member = self.member(&request)?;
        let secure = lock(&self.shared.secure);
        let state = match secure.as_ref() {
            Some(s) => s.state(&member.id, request.get_ref().round).map_err(|e| e.status())?,
            // No secure round has started yet: the node waits.
            None => proto::CommunityState::default(),
        };
        Ok(Response::new(state))
    }

    async fn advertise(&self, request: Request<proto::AdvertiseRequest>) -> Result<Response<proto::SecureAck>, Status> {
        let member = self.member(&request)?;
        self.secure_step(&member, |s| s.advertise(&member.id, request.get_ref()))
    }

    async fn share(&self, request: Request<proto::ShareRequest>) -> Result<Response<proto::SecureAck>, Status> {
        let member = self.member(&request)?;
        self.secure_step(&member, |s| s.share(&member.id, request.get_ref()))
    }

    async fn upload_masked(
        &self,
        request: Request<Streaming<proto::MaskedPart>>,
    ) -> Result<Response<proto::SecureAck>, Status> {
        let member = self.member(&request)?;
        let mut parts = request.into_inner();
        let header = match parts.message().await {
            Ok(Some(proto::MaskedPart { part: Some(proto::masked_part::Part::Header(h)) })) => h,
            Ok(_) => {
                return Err(Status::invalid_argument(
                    "malformed_protocol_message: a masked upload starts with its header",
                ))
            }
            Err(status) => return Err(status),
        };
        self.secure_step(&member, |s| s.check_masked(&member.id, &header))?;
        // The header was checked against the community's length: at most that many words.
        let expected = header.words.saturating_mul(4);
        let mut bytes = Vec::with_capacity(usize::try_from(expected).unwrap_or(0));
        while let Some(part) = parts.message().await? {
            match part.part {
                Some(proto::masked_part::Part::Data(data)) => {
                    if bytes.len() as u64 + data.len() as u64 > expected {
                        return Err(Status::invalid_argument(format!(
                            "malformed_protocol_message: more than the {expected} bytes announced"
                        )));
                    }
                    bytes.extend_from_slice(&data);
                }
                _ => return Err(Status::invalid_argument("malformed_protocol_message: a second header in one upload")),
            }
        }
        if bytes.len() as u64 != expected {
            return Err(Status::invalid_argument(format!(
                "malformed_protocol_message: {} bytes received of the {expected} announced",
                bytes.len()
            )));
        }
        let words: Vec<u32> = bytes.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect();
        drop(bytes);
        let wire = expected;
        self.secure_step(&member, |s| s.masked(&member.id, header.round, words, wire))?;
        lock(&self.shared.view).submitted.insert(member.id.clone());
        tracing::info!(node = %member.id, round = header.round, bytes = wire, "masked update received");
        Ok(Response::new(proto::SecureAck { wire_bytes: wire }))
    }

    async fn reveal(&self, request: Request<proto::RevealRequest>) -> Result<Response<proto::SecureAck>, Status> {
        let member = self.member(&request)?;
        self.secure_step(&member, |s| s.reveal(&member.id, request.get_ref()))
    }

    type FetchBaseStream = ChunkStream;

    async fn fetch_base(&self, request: Request<proto::FetchBaseRequest>) -> Result<Response<ChunkStream>, Status> {
        self.member(&request)?;
        let hash = {
            let view = lock(&self.shared.view);
            if request.get_ref().base_hash != view.base_hash.to_string() {
                return Err(Status::not_found(format!("base {} is not the current base", request.get_ref().base_hash)));
            }
            view.base_hash
        };
        let blob = self.shared.store.open(&hash).map_err(|e| Status::internal(format!("the base's blob: {e}")))?;
        // Chunks are copied out of the stored blob as the node reads the stream: at most two
        // chunks in memory per download, whatever the model's size.
        let (send, receive) = tokio::sync::mpsc::channel(2);
        tokio::task::spawn_blocking(move || {
            for chunk in blob.bytes().chunks(CHUNK) {
                if send.blocking_send(Ok(proto::Chunk { data: chunk.to_vec() })).is_err() {
                    break;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(receive);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn propose(
        &self,
        request: Request<proto::ProposeRequest>,
    ) -> Result<Response<proto::ProposalReceipt>, Status> {
        let member = self.member(&request)?;
        let request = request.into_inner();
        let change: RuleChange = serde_json::from_str(&request.change_json).map_err(|e| {
            Status::invalid_argument(format!("malformed_proposal: the change is not a rule change: {e}"))
        })?;
        let signature = signature_of(&request.signature)?;
        let proposer = member.id.to_string();
        self.proposal_step(move |c| c.propose(request.after_round, &proposer, &request.rationale, change, signature))
            .await
    }

    async fn vote(&self, request: Request<proto::VoteRequest>) -> Result<Response<proto::ProposalReceipt>, Status> {
        let member = self.member(&request)?;
        let request = request.into_inner();
        let proposal: ContentHash = request
            .proposal
            .parse()
            .map_err(|_| Status::invalid_argument("malformed_vote: the proposal id is not 64 hex digits"))?;
        let signature = signature_of(&request.signature)?;
        let voter = member.id.to_string();
        self.proposal_step(move |c| c.vote(proposal, &voter, request.approve, signature).map(|()| proposal)).await
    }

    async fn upload(
        &self,
        request: Request<Streaming<proto::UploadPart>>,
    ) -> Result<Response<proto::UploadReceipt>, Status> {
        let member = self.member(&request)?;
        let mut parts = request.into_inner();
        let mut progress = Progress { node: member.id.clone(), wire: 0, spool: None, finished: false };
        let started = Instant::now();
        let mut spooled = None;
        let outcome = self.receive(&member, &mut parts, &mut progress, &mut spooled).await;
        progress.finished = true;
        let wire = progress.wire;
        let wire_seconds = spooled.unwrap_or_else(|| started.elapsed()).as_secs_f64();
        let process_seconds = started.elapsed().as_secs_f64() - wire_seconds;
        let mut receipt =
            proto::UploadReceipt { wire_bytes: wire, wire_seconds, process_seconds, ..Default::default() };
        match outcome {
            Ok(quality) => {
                receipt.accepted = true;
                receipt.quality = quality;
            }
            Err(refusal) => {
                let code = refusal.code();
                tracing::warn!(node = %member.id, code = code.as_str(), "upload refused: {refusal}");
                receipt.code = code.to_string();
                receipt.detail = refusal.to_string();
            }
        }
        receipt.ledger_head = self.shared.engine.head();
        Ok(Response::new(receipt))
    }
}

impl<M: Measure + Send + 'static> Service<M> {
    /// A proposal or vote handed to the engine: recorded, or refused with its code.
    async fn proposal_step(
        &self,
        step: impl FnOnce(&mut DurableCoordinator<M>) -> Result<ContentHash, ProposalSubmitError> + Send + 'static,
    ) -> Result<Response<proto::ProposalReceipt>, Status> {
        let (outcome, last_closed) = self
            .shared
            .engine
            .run(move |c| (step(c), c.round()))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let mut receipt = proto::ProposalReceipt { last_closed_round: last_closed, ..Default::default() };
        match outcome {
            Ok(id) => {
                receipt.accepted = true;
                receipt.proposal = id.to_string();
            }
            Err(ProposalSubmitError::Refused(e)) => {
                tracing::warn!(code = e.code(), "proposal or vote refused: {e}");
                receipt.code = e.code().to_owned();
                receipt.detail = e.to_string();
            }
            Err(ProposalSubmitError::Internal(e)) => return Err(Status::internal(e.to_string())),
        }
        receipt.ledger_head = self.shared.engine.head();
        Ok(Response::new(receipt))
    }

    /// One protocol message applied to the open secure round; the round's driver is woken (the
    /// stage may be complete).
    fn secure_step(
        &self,
        member: &Member,
        step: impl FnOnce(&mut SecureRound) -> Result<(), crate::secure::SecureRefusal>,
    ) -> Result<Response<proto::SecureAck>, Status> {
        let mut secure = lock(&self.shared.secure);
        let Some(s) = secure.as_mut() else {
            return Err(Status::failed_precondition("wrong_stage: no secure aggregation round is running"));
        };
        if let Err(refusal) = step(s) {
            tracing::warn!(node = %member.id, code = refusal.code(), "secure aggregation message refused: {refusal}");
            return Err(refusal.status());
        }
        drop(secure);
        self.shared.submitted.notify_one();
        Ok(Response::new(proto::SecureAck::default()))
    }

    /// Receives, checks and submits one upload; returns the measured quality.
    async fn receive(
        &self,
        member: &Member,
        parts: &mut Streaming<proto::UploadPart>,
        progress: &mut Progress,
        spooled: &mut Option<Duration>,
    ) -> Result<f64, Refusal> {
        let started = Instant::now();
        let header = match parts.message().await {
            Ok(Some(proto::UploadPart { part: Some(Part::Header(h)) })) => h,
            Ok(_) => return Err(Refusal::MissingHeader),
            Err(status) => return Err(Refusal::Transport(status)),
        };
        let manifest: ContributionManifest = serde_json::from_slice(&header.manifest).map_err(Refusal::BadManifest)?;
        if manifest.node != member.id.as_str() {
            return Err(Refusal::IdentityMismatch { manifest: manifest.node, certificate: member.id.clone() });
        }
        let signature = <[u8; 64]>::try_from(header.signature.as_slice())
            .map(Signature)
            .map_err(|_| Refusal::SignatureLength(header.signature.len()))?;
        if !member.signing_key.verify(&header.manifest, &signature) {
            return Err(Refusal::BadSignature);
        }
        let config = &self.shared.options.config;
        if config.privacy.is_some_and(|p| p.secure_aggregation.is_some()) {
            return Err(Refusal::SecureAggregationOnly);
        }
        let encoding = Encoding::from_proto(header.encoding).ok_or(Refusal::UnknownEncoding(header.encoding))?;
        if encoding != config.encoding {
            return Err(Refusal::WrongEncoding { expected: config.encoding, got: encoding });
        }
        let (values, tensors) = lock(&self.shared.view).update_size;
        let max = config.encoding.max_bytes(values, tensors);
        if header.encoded_bytes > max {
            return Err(Refusal::Oversize { announced: header.encoded_bytes, max });
        }
        self.check_round(&member.id, &manifest)?;

        // Spool to disk, chunk by chunk, never past the announced size.
        // Unique per upload: a node may retry while an earlier attempt is still being torn down.
        let serial = self.shared.uploads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let spool = self.shared.options.spool.join(format!("{}-{}-{serial}.upload", member.id, manifest.round));
        progress.spool = Some(spool.clone());
        let wire = &mut progress.wire;
        let internal = |e: std::io::Error| Refusal::Internal(format!("spooling the upload: {e}"));
        let mut file = tokio::fs::File::create(&spool).await.map_err(internal)?;
        file.set_max_buf_size(CHUNK);
        loop {
            match parts.message().await {
                Ok(Some(proto::UploadPart { part: Some(Part::Data(data)) })) => {
                    *wire += data.len() as u64;
                    if *wire > header.encoded_bytes {
                        let _ = tokio::fs::remove_file(&spool).await;
                        return Err(Refusal::OverAnnounced { announced: header.encoded_bytes });
                    }
                    file.write_all(&data).await.map_err(internal)?;
                }
                Ok(None) => break,
                Ok(Some(_)) => {
                    let _ = tokio::fs::remove_file(&spool).await;
                    return Err(Refusal::SecondHeader);
                }
                Err(status) => {
                    let _ = tokio::fs::remove_file(&spool).await;
                    return Err(Refusal::StreamBroke { received: *wire, status });
                }
            }
        }
        file.flush().await.map_err(internal)?;
        drop(file);
        *spooled = Some(started.elapsed());
        if *wire != header.encoded_bytes {
            let _ = tokio::fs::remove_file(&spool).await;
            return Err(Refusal::Truncated { received: *wire, announced: header.encoded_bytes });
        }
        self.shared
            .wire
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(manifest.round)
            .or_default()
            .insert(member.id.clone(), *wire);

        // Decode and submit under the engine's lock: one delta in memory at a time.
        let node = member.id.clone();
        let shared = self.shared.clone();
        let wire_bytes = *wire;
        let job = move |engine: &mut DurableCoordinator<M>| -> Result<f64, Refusal> {
            // Read on the engine thread: however many uploads finish together, one encoded and
            // one decoded delta are in memory at a time.
            let bytes =
                std::fs::read(&spool).map_err(|e| Refusal::Internal(format!("reading the spooled upload: {e}")));
            let _ = std::fs::remove_file(&spool);
            let bytes = bytes?;
            match engine.open_round_state() {
                Some((a, _)) if a.round == manifest.round => {}
                _ => return Err(Refusal::ClosedMeanwhile { round: manifest.round }),
            }
            // Decoded against the layout the round's updates have (an adapter round's is the
            // adapter's, not the base's).
            let state = engine
                .with_update_layout(|layout| encoding::decode(&bytes, encoding, layout))
                .ok_or(Refusal::ClosedMeanwhile { round: manifest.round })?
                .map_err(Refusal::MalformedDelta)?;
            drop(bytes);
            let delta = Delta::from_state(state);
            let actual = delta.content_hash();
            if actual != manifest.delta_hash {
                return Err(Refusal::DeltaHashMismatch { actual, signed: manifest.delta_hash });
            }
            let contribution = Contribution {
                node: node.clone(),
                round: manifest.round,
                base_hash: manifest.base_hash,
                delta,
                token_count: manifest.token_count,
                declared: manifest.declared.clone(),
            };
            match engine.submit_received(contribution, Some(signature), Some(wire_bytes)) {
                Ok(receipt) => {
                    // Recorded here, not by the upload's task: the task may be gone (the node
                    // hung up) while its contribution counts.
                    lock(&shared.view).submitted.insert(node);
                    shared.submitted.notify_one();
                    Ok(receipt.quality)
                }
                Err(SubmitError::Rejected(reason)) => Err(Refusal::Rejected(reason)),
                Err(SubmitError::Internal(e)) => Err(Refusal::Internal(e.to_string())),
            }
        };
        self.shared.engine.run(job).await.map_err(|e| Refusal::Internal(e.to_string()))?
    }

    /// The manifest must be for the round open now, on its base, from a node not yet heard.
    /// (The engine checks the same again; these are the checks an upload can fail before it is
    /// spooled.)
    fn check_round(&self, node: &NodeId, manifest: &ContributionManifest) -> Result<(), Refusal> {
        let view = lock(&self.shared.view);
        if view.phase != proto::Phase::Open {
            return Err(Refusal::NoRoundOpen { round: view.round });
        }
        if manifest.round < view.round {
            return Err(Refusal::ReplayedManifest { manifest: manifest.round, open: view.round });
        }
        if manifest.round != view.round {
            return Err(Refusal::Rejected(Rejection::WrongRound { expected: view.round, got: manifest.round }));
        }
        if manifest.base_hash != view.base_hash {
            return Err(Refusal::Rejected(Rejection::StaleBase { expected: view.base_hash, got: manifest.base_hash }));
        }
        if view.submitted.contains(node) {
            return Err(Refusal::Rejected(Rejection::DuplicateNode));
        }
        Ok(())
    }
}
