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
use weft_coordinator::{Coordinator, Measure, RoundRecord, SubmitError};
use weft_core::{ContentHash, Contribution, Delta, NodeId};
use weft_ledger::{ContributionManifest, Signature};

use crate::config::{fingerprint, ConsortiumConfig, Member, Roster};
use crate::encoding::{self, Encoding};
use crate::proto::{self, consortium_server::ConsortiumServer, upload_part::Part};
use crate::{NetError, CHUNK, MAX_MESSAGE, PROTOCOL};

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
}

/// Bytes each node sent per round.
pub type WireBytes = BTreeMap<u64, BTreeMap<String, u64>>;

struct View {
    phase: proto::Phase,
    round: u64,
    base_hash: ContentHash,
    deadline: Option<Instant>,
    submitted: BTreeSet<String>,
    base_bytes: Arc<Vec<u8>>,
}

struct Shared<M: Measure> {
    engine: Mutex<Coordinator<M>>,
    view: Mutex<View>,
    submitted: Notify,
    options: ServeOptions,
    coordinator_key: String,
    wire: Mutex<WireBytes>,
    values: usize,
    tensors: usize,
}

/// A refusal to send back to the node (and log).
struct Refusal {
    code: &'static str,
    detail: String,
}

fn refuse(code: &'static str, detail: impl Into<String>) -> Refusal {
    Refusal { code, detail: detail.into() }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data: keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves until every round of the config is closed; returns the rounds closed by this run.
pub async fn serve<M: Measure + Send + 'static>(
    coordinator: Coordinator<M>,
    options: ServeOptions,
) -> Result<(Vec<RoundRecord>, WireBytes), NetError> {
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
    let (values, tensors) = (coordinator.base().num_values(), coordinator.base().len());
    let shared = Arc::new(Shared {
        view: Mutex::new(View {
            phase: proto::Phase::Waiting,
            round: coordinator.round(),
            base_hash: coordinator.base_hash(),
            deadline: None,
            submitted: BTreeSet::new(),
            base_bytes: Arc::new(Vec::new()),
        }),
        engine: Mutex::new(coordinator),
        submitted: Notify::new(),
        options,
        coordinator_key,
        wire: Mutex::new(BTreeMap::new()),
        values,
        tensors,
    });
    let service = ConsortiumServer::new(Service { shared: shared.clone() })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = Server::builder().add_service(service).serve_with_incoming_shutdown(
        crate::tls::incoming(listener, tls),
        async {
            let _ = stopped.await;
        },
    );
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
    let records = outcome?;
    let wire = lock(&shared.wire).clone();
    Ok((records, wire))
}

/// An open round: number, base hash, nodes already heard, the base's bytes.
type Opened = (u64, ContentHash, BTreeSet<String>, Vec<u8>);

/// Opens, waits for, and closes every remaining round.
async fn drive<M: Measure + Send + 'static>(shared: Arc<Shared<M>>) -> Result<Vec<RoundRecord>, NetError> {
    let mut records = Vec::new();
    let rounds = shared.options.config.rounds;
    let deadline = Duration::from_secs(shared.options.config.round_deadline_secs);
    loop {
        let s = shared.clone();
        let opened = tokio::task::spawn_blocking(move || -> Result<Option<Opened>, NetError> {
            let mut engine = lock(&s.engine);
            let (announcement, done) = match engine.open_round_state() {
                Some(state) => state,
                None if engine.round() >= rounds => return Ok(None),
                None => (engine.open_round()?, BTreeSet::new()),
            };
            let bytes = engine.base().to_safetensors(None).map_err(|e| NetError::Transport(e.to_string()))?;
            Ok(Some((announcement.round, announcement.base_hash, done, bytes)))
        })
        .await
        .map_err(|e| NetError::Transport(e.to_string()))??;
        let Some((round, base_hash, done, bytes)) = opened else { break };
        let closes_at = Instant::now() + deadline;
        {
            let mut view = lock(&shared.view);
            *view = View {
                phase: proto::Phase::Open,
                round,
                base_hash,
                deadline: Some(closes_at),
                submitted: done,
                base_bytes: Arc::new(bytes),
            };
        }
        tracing::info!(round, base = %base_hash.short(), "round open");
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
        {
            let mut view = lock(&shared.view);
            view.phase = proto::Phase::Waiting;
            view.deadline = None;
        }
        let s = shared.clone();
        let record = tokio::task::spawn_blocking(move || lock(&s.engine).close_round())
            .await
            .map_err(|e| NetError::Transport(e.to_string()))??;
        tracing::info!(round, accepted = record.accepted, base = %record.base_hash.short(), "round closed");
        {
            let mut view = lock(&shared.view);
            view.base_hash = record.base_hash;
            view.submitted.clear();
        }
        records.push(record);
    }
    lock(&shared.view).phase = proto::Phase::Finished;
    tracing::info!("all rounds done");
    Ok(records)
}

struct Service<M: Measure> {
    shared: Arc<Shared<M>>,
}

impl<M: Measure> Service<M> {
    /// The roster member behind the client certificate of this connection.
    fn member<T>(&self, request: &Request<T>) -> Result<Member, Status> {
        let certs = request.peer_certs().ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let cert = certs.first().ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let print = fingerprint(cert.as_ref());
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
            node: member.id,
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
                layers: config.model.layers as u32,
                heads: config.model.heads as u32,
                width: config.model.width as u32,
                context: config.model.context as u32,
            }),
            encoding: config.encoding.to_proto() as i32,
            submitted: view.submitted.contains(&member.id),
            max_upload_bytes: config.encoding.max_bytes(self.shared.values, self.shared.tensors),
        }))
    }

    type FetchBaseStream = ChunkStream;

    async fn fetch_base(&self, request: Request<proto::FetchBaseRequest>) -> Result<Response<ChunkStream>, Status> {
        self.member(&request)?;
        let bytes = {
            let view = lock(&self.shared.view);
            if request.get_ref().base_hash != view.base_hash.to_string() || view.base_bytes.is_empty() {
                return Err(Status::not_found(format!("base {} is not the current base", request.get_ref().base_hash)));
            }
            view.base_bytes.clone()
        };
        let chunks = bytes.len().div_ceil(CHUNK);
        // Chunks are cut as the stream is read: one chunk in flight per request.
        let stream = tokio_stream::iter((0..chunks).map(move |i| {
            let end = ((i + 1) * CHUNK).min(bytes.len());
            Ok(proto::Chunk { data: bytes[i * CHUNK..end].to_vec() })
        }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn upload(
        &self,
        request: Request<Streaming<proto::UploadPart>>,
    ) -> Result<Response<proto::UploadReceipt>, Status> {
        let member = self.member(&request)?;
        let mut parts = request.into_inner();
        let mut wire = 0u64;
        let receipt = match self.receive(&member, &mut parts, &mut wire).await {
            Ok(quality) => proto::UploadReceipt {
                accepted: true,
                code: String::new(),
                detail: String::new(),
                quality,
                wire_bytes: wire,
            },
            Err(r) => {
                tracing::warn!(node = %member.id, code = r.code, "upload refused: {}", r.detail);
                proto::UploadReceipt {
                    accepted: false,
                    code: r.code.to_owned(),
                    detail: r.detail,
                    quality: 0.0,
                    wire_bytes: wire,
                }
            }
        };
        Ok(Response::new(receipt))
    }
}

impl<M: Measure + Send + 'static> Service<M> {
    /// Receives, checks and submits one upload; returns the measured quality.
    async fn receive(
        &self,
        member: &Member,
        parts: &mut Streaming<proto::UploadPart>,
        wire: &mut u64,
    ) -> Result<f64, Refusal> {
        let header = match parts.message().await {
            Ok(Some(proto::UploadPart { part: Some(Part::Header(h)) })) => h,
            Ok(_) => return Err(refuse("missing_header", "an upload starts with its header")),
            Err(e) => return Err(refuse("transport", e.to_string())),
        };
        let manifest: ContributionManifest =
            serde_json::from_slice(&header.manifest).map_err(|e| refuse("bad_manifest", e.to_string()))?;
        if manifest.node != member.id {
            return Err(refuse(
                "identity_mismatch",
                format!("the manifest names {}, the certificate is {}", manifest.node, member.id),
            ));
        }
        let signature = <[u8; 64]>::try_from(header.signature.as_slice())
            .map(Signature)
            .map_err(|_| refuse("bad_signature", "a signature is 64 bytes"))?;
        if !member.signing_key.verify(&header.manifest, &signature) {
            return Err(refuse("bad_signature", "the manifest's signature does not verify with the node's roster key"));
        }
        let config = &self.shared.options.config;
        let encoding =
            Encoding::from_proto(header.encoding).ok_or_else(|| refuse("bad_encoding", "unknown encoding"))?;
        if encoding != config.encoding {
            return Err(refuse(
                "bad_encoding",
                format!("the consortium sends {:?}, not {encoding:?}", config.encoding),
            ));
        }
        let max = config.encoding.max_bytes(self.shared.values, self.shared.tensors);
        if header.encoded_bytes > max {
            return Err(refuse(
                "oversize",
                format!("{} bytes announced, at most {max} for this model", header.encoded_bytes),
            ));
        }
        self.check_round(&manifest)?;

        // Spool to disk, chunk by chunk, never past the announced size.
        let spool = self.shared.options.spool.join(format!("{}-{}.upload", member.id, manifest.round));
        let mut file = tokio::fs::File::create(&spool).await.map_err(|e| refuse("internal", e.to_string()))?;
        loop {
            match parts.message().await {
                Ok(Some(proto::UploadPart { part: Some(Part::Data(data)) })) => {
                    *wire += data.len() as u64;
                    if *wire > header.encoded_bytes {
                        let _ = tokio::fs::remove_file(&spool).await;
                        return Err(refuse(
                            "oversize",
                            format!("more than the {} bytes announced", header.encoded_bytes),
                        ));
                    }
                    file.write_all(&data).await.map_err(|e| refuse("internal", e.to_string()))?;
                }
                Ok(None) => break,
                Ok(Some(_)) => {
                    let _ = tokio::fs::remove_file(&spool).await;
                    return Err(refuse("bad_stream", "a second header in one upload"));
                }
                Err(e) => {
                    let _ = tokio::fs::remove_file(&spool).await;
                    return Err(refuse("truncated", format!("the stream broke after {} bytes: {e}", *wire)));
                }
            }
        }
        file.flush().await.map_err(|e| refuse("internal", e.to_string()))?;
        drop(file);
        if *wire != header.encoded_bytes {
            let _ = tokio::fs::remove_file(&spool).await;
            return Err(refuse(
                "truncated",
                format!("{} bytes received of the {} announced", *wire, header.encoded_bytes),
            ));
        }
        self.shared
            .wire
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(manifest.round)
            .or_default()
            .insert(member.id.clone(), *wire);

        // Decode and submit under the engine's lock: one delta in memory at a time.
        let shared = self.shared.clone();
        let node = member.id.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<f64, Refusal> {
            let bytes = std::fs::read(&spool).map_err(|e| refuse("internal", e.to_string()));
            let _ = std::fs::remove_file(&spool);
            let bytes = bytes?;
            let mut engine = lock(&shared.engine);
            match engine.open_round_state() {
                Some((a, _)) if a.round == manifest.round => {}
                _ => {
                    return Err(refuse(
                        "late",
                        format!("round {} closed before the upload finished; join the next round", manifest.round),
                    ))
                }
            }
            let state = encoding::decode(&bytes, encoding, engine.base())
                .map_err(|e| refuse("malformed_delta", e.to_string()))?;
            drop(bytes);
            let delta = Delta::from_state(state);
            let actual = delta.content_hash();
            if actual != manifest.delta_hash {
                return Err(refuse(
                    "delta_hash_mismatch",
                    format!("the delta hashes to {actual}, the signed manifest says {}", manifest.delta_hash),
                ));
            }
            let contribution = Contribution {
                node: NodeId::new(node.clone()).map_err(|e| refuse("bad_manifest", e.to_string()))?,
                round: manifest.round,
                base_hash: manifest.base_hash,
                delta,
                token_count: manifest.token_count,
                declared: manifest.declared.clone(),
            };
            match engine.submit_signed(contribution, Some(signature)) {
                Ok(receipt) => Ok(receipt.quality),
                Err(SubmitError::Rejected(reason)) => Err(Refusal { code: reason.code(), detail: reason.to_string() }),
                Err(SubmitError::Internal(e)) => Err(refuse("internal", e.to_string())),
            }
        })
        .await
        .map_err(|e| refuse("internal", e.to_string()))?;
        if result.is_ok() {
            lock(&self.shared.view).submitted.insert(member.id.clone());
            self.shared.submitted.notify_one();
        }
        result
    }

    /// The manifest must be for the round open now, on its base, from a node not yet heard.
    fn check_round(&self, manifest: &ContributionManifest) -> Result<(), Refusal> {
        let view = lock(&self.shared.view);
        if view.phase != proto::Phase::Open {
            return Err(refuse(
                "late",
                format!("no round is open (round {} is closed); join the next round", view.round),
            ));
        }
        if manifest.round < view.round {
            return Err(refuse(
                "replayed_manifest",
                format!("the manifest is for round {}, round {} is open", manifest.round, view.round),
            ));
        }
        if manifest.round != view.round {
            return Err(refuse(
                "wrong_round",
                format!("the manifest is for round {}, round {} is open", manifest.round, view.round),
            ));
        }
        if manifest.base_hash != view.base_hash {
            return Err(refuse(
                "stale_base",
                format!("trained on {}, the base is {}", manifest.base_hash, view.base_hash),
            ));
        }
        if view.submitted.contains(&manifest.node) {
            return Err(refuse(
                "duplicate_node",
                format!("{} already contributed to round {}", manifest.node, view.round),
            ));
        }
        Ok(())
    }
}
