//! A trainer in another process — PyTorch, numpy, any script — behind one file contract.
//!
//! Each round the node writes a job directory and runs the trainer's command with `WEFT_JOB`
//! set to its `job.json` ([`Job`]): the base's weights and configuration, the node's text, the
//! round's settings, a deadline, and where to write (every path absolute). The command runs in
//! the node's own working directory, so that a relative command works as the operator typed it. The trainer writes the trained weights
//! (`update.safetensors`, f32, the base's names and shapes) and `metrics.json` ([`JobMetrics`])
//! and exits 0. The node then checks everything itself — that the process finished in time and
//! succeeded, that both files parse, the names, shapes, dtype and finite values, the size of the
//! change against a bound, and that the trainer names the base it was given — before anything
//! is kept or sent. A failed job leaves nothing but its log; the node stays in the consortium.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use weft_core::{AdapterRound, AdapterTrack, ContentHash, Delta, ModelState};
use weft_model::{
    AdamWSettings, AdapterJobForm, AdapterTrainer, AdapterTraining, CorpusText, FamilyError, SplitMix64, TrainReport,
    TrainedAdapter, TrainedWeights, WeightTrainer,
};

/// The contract's version, `weft_job` in every `job.json`.
pub const JOB_VERSION: u32 = 1;

/// `job.json`: everything a trainer needs, and nothing of any other node's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub weft_job: u32,
    pub kind: JobKind,
    pub round: u64,
    pub node: String,
    pub base: JobBase,
    /// The round's adapter, for `adapter` jobs (null for `full_weights`).
    pub adapter: Option<JobAdapter>,
    /// The node's own text.
    pub corpus: JobCorpus,
    pub training: JobTraining,
    /// Seconds the trainer has; past them it is killed and the round is lost for this node.
    pub deadline_secs: u64,
    pub output: JobOutput,
    /// A directory that persists across rounds for the trainer's own state (its optimizer's).
    pub state_dir: PathBuf,
}

/// What a job asks the trainer to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Every tensor of the base, trained.
    FullWeights,
    /// Every factor of the round's adapter (`adapter.initial`'s names and shapes), trained from
    /// the initial values; the base stays frozen.
    Adapter,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobBase {
    /// weft's canonical content hash of the base; `metrics.json` names it back.
    pub hash: ContentHash,
    /// f32 safetensors with the base's tensors (Hugging Face's names for a Llama base).
    pub weights: PathBuf,
    /// The model's family (`byte-gpt`, `llama`) and configuration (for `llama`, the content of
    /// Hugging Face's `config.json`).
    pub family: String,
    pub config: serde_json::Value,
    /// `tokenizer.json`, for a family with a tokenizer (null for the byte GPT: bytes are tokens).
    pub tokenizer: Option<PathBuf>,
}

/// The round's adapter: LoRA factors whose product `(alpha / rank) · B·A` is added to each
/// targeted projection's weight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobAdapter {
    pub rank: usize,
    pub alpha: f32,
    /// The projections adapted in every layer, as the family names them (`q`, `v`, …); the
    /// factors' tensor names in `initial` say which module each belongs to.
    pub targets: Vec<String>,
    /// `shared`: `A` stays as given, only the `B` factors train. `full`: both train.
    pub track: AdapterTrack,
    /// f32 safetensors with every factor before training (`A` from the round's seed, `B = 0`).
    pub initial: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobCorpus {
    pub train: PathBuf,
    /// A tail of the node's text never trained on (null when the node has none to spare).
    pub validation: Option<PathBuf>,
}

/// The round's training, as the consortium set it for every node: a trainer that follows it
/// does what the built-in trainer does.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobTraining {
    pub steps: u64,
    /// Windows per step.
    pub batch_rows: usize,
    /// Positions per window (bytes for the byte GPT, tokens for a tokenized family).
    pub context: usize,
    /// This node's and round's seed.
    pub seed: u64,
    /// AdamW: weight decay on tensors of two or more dimensions only; `warmup_steps` counts the
    /// optimizer's steps over the node's whole life; `clip_norm` clips the global gradient norm
    /// (0: no clipping).
    pub adamw: AdamWSettings,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobOutput {
    pub weights: PathBuf,
    pub metrics: PathBuf,
}

/// `metrics.json`, written by the trainer. Declared figures: recorded, never used for weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobMetrics {
    /// The hash of the base it trained from, as `job.json` gave it.
    pub base_hash: ContentHash,
    pub steps: u64,
    pub tokens: u64,
    /// Mean training loss over the round.
    pub train_loss: f64,
    /// Mean training loss over the round's last quarter (default: `train_loss`).
    #[serde(default)]
    pub final_train_loss: Option<f64>,
    /// Loss on the validation tail before and after (0 when not reported).
    #[serde(default)]
    pub validation_loss_before: Option<f64>,
    #[serde(default)]
    pub validation_loss_after: Option<f64>,
}

/// What a node operator chooses about its external trainer; the round's settings come from the
/// consortium.
#[derive(Clone, Debug, PartialEq)]
pub struct ExternalCommand {
    /// Run with `sh -c` in the node's working directory.
    pub command: String,
    pub deadline: Duration,
    /// The largest L2 norm of the weight change the node accepts from its trainer.
    pub max_change_norm: f64,
}

/// How a node runs an external trainer for full-weight rounds.
#[derive(Clone, Debug, PartialEq)]
pub struct ExternalSettings {
    pub external: ExternalCommand,
    /// Where the node keeps its jobs (`round-NNNN/`) and the trainer's state (`state/`).
    pub dir: PathBuf,
    pub family: String,
    pub config: serde_json::Value,
    /// The round's settings; `seed` is replaced by each round's own.
    pub training: JobTraining,
}

/// A [`WeightTrainer`] that runs a command per round under the file contract above.
pub struct ExternalTrainer {
    settings: ExternalSettings,
    node: String,
    steps: u64,
}

/// Refuses settings no trainer could run under, and makes the job directory absolute (the
/// trainer must find every path the job names, wherever it runs).
fn checked(external: &ExternalCommand, dir: &Path) -> Result<PathBuf, FamilyError> {
    if external.command.trim().is_empty() {
        return Err("the trainer command is empty".into());
    }
    if !(external.max_change_norm > 0.0 && external.max_change_norm.is_finite()) {
        return Err(format!("the bound on the weight change must be positive, got {}", external.max_change_norm).into());
    }
    if external.deadline.is_zero() {
        return Err("the trainer's deadline must be at least 1 s".into());
    }
    Ok(std::path::absolute(dir).map_err(|e| format!("the job directory {}: {e}", dir.display()))?)
}

impl ExternalTrainer {
    /// `node` names the node in its jobs.
    pub fn new(mut settings: ExternalSettings, node: impl Into<String>) -> Result<Self, FamilyError> {
        settings.dir = checked(&settings.external, &settings.dir)?;
        Ok(ExternalTrainer { settings, node: node.into(), steps: 0 })
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), FamilyError> {
    Ok(std::fs::write(path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))?)
}

/// Round `round`'s job directory under `jobs`, empty but for its `base/`, `corpus/` and `out/`,
/// and the trainer's lasting `state/` beside it.
fn fresh_job_dir(jobs: &Path, round: u64) -> Result<(PathBuf, PathBuf), FamilyError> {
    let dir = jobs.join(format!("round-{round:04}"));
    if dir.exists() {
        // A job left by a crash or an earlier failure: start it over.
        std::fs::remove_dir_all(&dir).map_err(|e| format!("clearing {}: {e}", dir.display()))?;
    }
    let state_dir = jobs.join("state");
    for sub in [dir.join("base"), dir.join("corpus"), dir.join("out"), state_dir.clone()] {
        std::fs::create_dir_all(&sub).map_err(|e| format!("writing {}: {e}", sub.display()))?;
    }
    Ok((dir, state_dir))
}

fn output(dir: &Path) -> JobOutput {
    JobOutput { weights: dir.join("out/update.safetensors"), metrics: dir.join("out/metrics.json") }
}

fn write_job(dir: &Path, job: &Job) -> Result<(), FamilyError> {
    write(&dir.join("job.json"), &serde_json::to_vec_pretty(job)?)
}

/// Runs the command with `WEFT_JOB` naming `dir`'s job; its output goes to `trainer.log` there.
fn run(external: &ExternalCommand, dir: &Path) -> Result<(), FamilyError> {
    let log_path = dir.join("trainer.log");
    let log = std::fs::File::create(&log_path).map_err(|e| format!("creating {}: {e}", log_path.display()))?;
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(&external.command)
        .env("WEFT_JOB", dir.join("job.json"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| format!("{}: {e}", log_path.display()))?)
        .stderr(log);
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn().map_err(|e| format!("cannot start the trainer `{}`: {e}", external.command))?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("waiting for the trainer: {e}"))? {
            if status.success() {
                return Ok(());
            }
            return Err(format!("the trainer failed ({status}); its output is in {}", log_path.display()).into());
        }
        if started.elapsed() > external.deadline {
            kill_group(&mut child);
            return Err(format!(
                "the trainer did not finish within its deadline of {} s and was stopped; its output is in {}",
                external.deadline.as_secs(),
                log_path.display()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn named(path: &Path, e: &dyn std::fmt::Display) -> FamilyError {
    format!("{}: {e}", path.display()).into()
}

/// What the trainer wrote, checked: a safetensors file of finite f32 values with `start`'s
/// names and shapes, changed from `start` by no more than the operator's bound, and metrics
/// that name the job's base and hold finite losses.
fn collect(job: &Job, start: &ModelState, bound: f64) -> Result<(ModelState, JobMetrics), FamilyError> {
    let out = &job.output;
    let bytes = std::fs::read(&out.weights).map_err(|e| named(&out.weights, &e))?;
    let weights = ModelState::from_safetensors(&bytes).map_err(|e| named(&out.weights, &e))?;
    weights.check_finite().map_err(|e| named(&out.weights, &e))?;
    let change = Delta::between(start, &weights).map_err(|e| named(&out.weights, &e))?;
    let norm = change.norm();
    if norm > bound {
        return Err(named(
            &out.weights,
            &format_args!("the weights changed by {norm:.4} (L2), more than the bound {bound}"),
        ));
    }
    let text = std::fs::read(&out.metrics).map_err(|e| named(&out.metrics, &e))?;
    let metrics: JobMetrics = serde_json::from_slice(&text).map_err(|e| named(&out.metrics, &e))?;
    if metrics.base_hash != job.base.hash {
        return Err(named(
            &out.metrics,
            &format_args!("the trainer names base {}, the job gave {}", metrics.base_hash, job.base.hash),
        ));
    }
    let losses = [metrics.train_loss, metrics.final_train_loss.unwrap_or(0.0)];
    let validation = [metrics.validation_loss_before.unwrap_or(0.0), metrics.validation_loss_after.unwrap_or(0.0)];
    if losses.iter().chain(&validation).any(|v| !v.is_finite()) {
        return Err(named(&out.metrics, &"a loss is not a finite number"));
    }
    Ok((weights, metrics))
}

/// Runs a written job and collects it; whatever happened, the job's copies of the base and of
/// the node's text are not kept.
fn run_and_collect(
    external: &ExternalCommand,
    dir: &Path,
    job: &Job,
    start: &ModelState,
) -> Result<(ModelState, JobMetrics), FamilyError> {
    let result = run(external, dir).and_then(|()| collect(job, start, external.max_change_norm));
    for copy in ["base", "corpus", "adapter"] {
        let _ = std::fs::remove_dir_all(dir.join(copy));
    }
    result
}

/// Stops the trainer and everything it started (its process group).
fn kill_group(child: &mut std::process::Child) {
    #[cfg(unix)]
    {
        let group = format!("-{}", child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl WeightTrainer for ExternalTrainer {
    fn configuration(&self) -> serde_json::Value {
        serde_json::json!({
            "family": self.settings.family,
            "config": self.settings.config,
            "trainer": self.settings.external.command,
        })
    }

    fn train_round(
        &mut self,
        round: u64,
        base: &ModelState,
        text: CorpusText<'_>,
        rng: &mut SplitMix64,
        on_step: &mut dyn FnMut(u64, f64),
    ) -> Result<TrainedWeights, FamilyError> {
        // The trainer's seed comes from the node's stream for this round, as the built-in's does.
        let seed = rng.next_u64();
        let (dir, state_dir) = fresh_job_dir(&self.settings.dir, round)?;
        let weights = dir.join("base/model.safetensors");
        write(&weights, &base.to_safetensors(None)?)?;
        let (train, validation) = (dir.join("corpus/train.txt"), dir.join("corpus/validation.txt"));
        write(&train, text.train)?;
        write(&validation, text.validation)?;
        let job = Job {
            weft_job: JOB_VERSION,
            kind: JobKind::FullWeights,
            round,
            node: self.node.clone(),
            base: JobBase {
                hash: base.content_hash(),
                weights,
                family: self.settings.family.clone(),
                config: self.settings.config.clone(),
                tokenizer: None,
            },
            adapter: None,
            corpus: JobCorpus { train, validation: Some(validation) },
            training: JobTraining { seed, ..self.settings.training },
            deadline_secs: self.settings.external.deadline.as_secs().max(1),
            output: output(&dir),
            state_dir,
        };
        write_job(&dir, &job)?;
        let (weights, metrics) = run_and_collect(&self.settings.external, &dir, &job, base)?;
        on_step(metrics.steps, metrics.train_loss);
        self.steps += metrics.steps;
        Ok(TrainedWeights {
            weights,
            report: TrainReport {
                steps: metrics.steps,
                tokens: metrics.tokens,
                mean_loss: metrics.train_loss,
                final_loss: metrics.final_train_loss.unwrap_or(metrics.train_loss),
                last_grad_norm: 0.0,
            },
            validation_loss_before: metrics.validation_loss_before.unwrap_or(0.0),
            validation_loss_after: metrics.validation_loss_after.unwrap_or(0.0),
            // An outside trainer's DP is not weft's to vouch for: refused under DP (see join).
            dp: None,
        })
    }

    fn has_optimizer(&self) -> bool {
        // The trainer keeps its own optimizer state in `state_dir`; the node has none to restore.
        true
    }

    fn optimizer_steps(&self) -> u64 {
        self.steps
    }

    fn optimizer_state(&self) -> Result<ModelState, FamilyError> {
        Ok(ModelState::new())
    }

    fn restore_optimizer(&mut self, _layout: &ModelState, _state: &ModelState, steps: u64) -> Result<(), FamilyError> {
        self.steps = steps;
        Ok(())
    }
}

/// An [`AdapterTrainer`] that runs a command per round under the same contract: the job gives
/// the frozen base, the family's configuration and tokenizer, and the round's initial factors;
/// the trainer writes every factor, trained; the node checks them against the initial ones
/// (names, shapes, finite values, the size of the change, frozen factors untouched) and derives
/// the update it sends.
pub struct ExternalAdapterTrainer {
    external: ExternalCommand,
    dir: PathBuf,
    node: String,
    form: Box<dyn AdapterJobForm>,
    /// The node's training text (its own; the trainer tokenizes it).
    text: Vec<u8>,
}

impl ExternalAdapterTrainer {
    /// Jobs under `dir` (`round-NNNN/`, `state/`); `node` names the node in them.
    pub fn new(
        external: ExternalCommand,
        dir: &Path,
        node: impl Into<String>,
        form: Box<dyn AdapterJobForm>,
        text: Vec<u8>,
    ) -> Result<Self, FamilyError> {
        let dir = checked(&external, dir)?;
        if text.is_empty() {
            return Err("the node's training text is empty".into());
        }
        Ok(ExternalAdapterTrainer { external, dir, node: node.into(), form, text })
    }
}

impl AdapterTrainer for ExternalAdapterTrainer {
    fn train_round(
        &mut self,
        round: u64,
        base: &ModelState,
        adapter: &AdapterRound,
        settings: &AdapterTraining,
        rng: &mut SplitMix64,
        on_step: &mut dyn FnMut(u64, f64),
    ) -> Result<TrainedAdapter, FamilyError> {
        let seed = rng.next_u64();
        let initial = self.form.initial(adapter)?;
        let (dir, state_dir) = fresh_job_dir(&self.dir, round)?;
        std::fs::create_dir_all(dir.join("adapter")).map_err(|e| named(&dir.join("adapter"), &e))?;
        let weights = dir.join("base/model.safetensors");
        write(&weights, &base.to_safetensors(None)?)?;
        let tokenizer = dir.join("base/tokenizer.json");
        write(&tokenizer, self.form.tokenizer())?;
        // With the weights and the tokenizer beside it, `base/` loads as a Hugging Face model
        // directory (`from_pretrained`).
        write(&dir.join("base/config.json"), &serde_json::to_vec_pretty(&self.form.configuration())?)?;
        let initial_path = dir.join("adapter/initial.safetensors");
        write(&initial_path, &initial.to_safetensors(None)?)?;
        let train = dir.join("corpus/train.txt");
        write(&train, &self.text)?;
        let job = Job {
            weft_job: JOB_VERSION,
            kind: JobKind::Adapter,
            round,
            node: self.node.clone(),
            base: JobBase {
                hash: base.content_hash(),
                weights,
                family: self.form.family().into(),
                config: self.form.configuration(),
                tokenizer: Some(tokenizer),
            },
            adapter: Some(JobAdapter {
                rank: adapter.rank,
                alpha: adapter.alpha,
                targets: adapter.targets.clone(),
                track: adapter.track,
                initial: initial_path,
            }),
            corpus: JobCorpus { train, validation: None },
            training: JobTraining {
                steps: settings.steps,
                batch_rows: settings.batch,
                context: settings.context,
                seed,
                adamw: self.form.optimizer(settings.lr),
            },
            deadline_secs: self.external.deadline.as_secs().max(1),
            output: output(&dir),
            state_dir,
        };
        write_job(&dir, &job)?;
        let (trained, metrics) = run_and_collect(&self.external, &dir, &job, &initial)?;
        let update = self.form.update_of(adapter, &trained).map_err(|e| named(&job.output.weights, &e))?;
        on_step(metrics.steps, metrics.train_loss);
        Ok(TrainedAdapter {
            update,
            adapter: trained,
            steps: metrics.steps,
            tokens: metrics.tokens,
            mean_loss: metrics.train_loss,
            last_loss: metrics.final_train_loss.unwrap_or(metrics.train_loss),
            dp: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_core::Tensor;

    /// A stand-in trainer for the contract's plumbing (the stdlib only): it reads the job and
    /// the base, and writes what its mode says — a well-formed small step, or one kind of garbage.
    const FIXTURE: &str = include_str!("../tests/fixtures/contract_trainer.py");

    fn base() -> ModelState {
        let mut state = ModelState::new();
        state.insert("a", Tensor::new(vec![2, 3], vec![0.5, -1.0, 2.0, 0.0, 1.5, -0.25]).unwrap());
        state.insert("b", Tensor::new(vec![4], vec![1.0, 2.0, 3.0, 4.0]).unwrap());
        state
    }

    fn trainer(dir: &Path, mode: &str, deadline: Duration) -> ExternalTrainer {
        std::fs::write(dir.join("fixture.py"), FIXTURE).unwrap();
        let settings = ExternalSettings {
            external: ExternalCommand {
                command: format!("python3 {} {mode}", dir.join("fixture.py").display()),
                deadline,
                max_change_norm: 10.0,
            },
            dir: dir.join("jobs"),
            family: "byte-gpt".into(),
            config: serde_json::json!({"layers": 1}),
            training: JobTraining {
                steps: 7,
                batch_rows: 2,
                context: 16,
                seed: 0,
                adamw: AdamWSettings { lr: 1e-3, ..AdamWSettings::default() },
            },
        };
        ExternalTrainer::new(settings, "node-de").unwrap()
    }

    fn run(mode: &str, deadline: Duration) -> (tempfile::TempDir, Result<TrainedWeights, FamilyError>) {
        let tmp = tempfile::tempdir().unwrap();
        let mut trainer = trainer(tmp.path(), mode, deadline);
        let text = CorpusText { train: b"this node's own text", validation: b"its tail" };
        let result = trainer.train_round(3, &base(), text, &mut SplitMix64::new(1), &mut |_, _| {});
        (tmp, result)
    }

    #[test]
    fn a_well_formed_job_comes_back_checked() {
        let (tmp, result) = run("ok", Duration::from_secs(60));
        let trained = result.unwrap();
        let expected: Vec<f32> = base().get("a").unwrap().data().iter().map(|v| v + 0.001).collect();
        assert_eq!(trained.weights.get("a").unwrap().data(), expected.as_slice());
        assert_eq!((trained.report.steps, trained.report.tokens), (7, 20));
        assert_eq!(trained.report.mean_loss, 2.5);
        let job_dir = tmp.path().join("jobs/round-0003");
        let job: Job = serde_json::from_slice(&std::fs::read(job_dir.join("job.json")).unwrap()).unwrap();
        assert_eq!((job.round, job.node.as_str(), job.base.hash), (3, "node-de", base().content_hash()));
        // The job's copies of the base and of the node's text are gone; the log stays.
        assert!(!job_dir.join("base").exists() && !job_dir.join("corpus").exists());
        assert!(job_dir.join("trainer.log").is_file());
    }

    /// Each way a trainer can fail is named, and nothing comes back.
    #[test]
    fn every_bad_trainer_is_refused_by_name() {
        for (mode, needle) in [
            ("crash", "the trainer failed (exit status: 3)"),
            ("garbage", "update.safetensors: not a readable safetensors file"),
            ("shape", "has shape"),
            ("nan", "non-finite value"),
            ("big", "more than the bound 10"),
            ("other-base", "the trainer names base 0000"),
            ("no-metrics", "metrics.json"),
        ] {
            let (_tmp, result) = run(mode, Duration::from_secs(60));
            let message = result.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(message.contains(needle), "{mode}: {message}");
        }
    }

    #[test]
    fn a_trainer_past_its_deadline_is_stopped() {
        let started = Instant::now();
        let (tmp, result) = run("hang", Duration::from_secs(1));
        let message = result.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("did not finish within its deadline of 1 s"), "{message}");
        assert!(started.elapsed() < Duration::from_secs(20), "waited {:?}", started.elapsed());
        // The process it started is gone too, or a zombie waiting for whoever inherited it.
        let pid = std::fs::read_to_string(tmp.path().join("jobs/round-0003/pid")).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
        let state = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()).unwrap_or("gone");
        assert!(state == "gone" || state == "Z", "the trainer's helper {pid} is still in state {state}");
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let good = trainer(tmp.path(), "ok", Duration::from_secs(5)).settings;
        for (external, needle) in [
            (ExternalCommand { command: " ".into(), ..good.external.clone() }, "command is empty"),
            (ExternalCommand { max_change_norm: 0.0, ..good.external.clone() }, "must be positive"),
            (ExternalCommand { max_change_norm: f64::NAN, ..good.external.clone() }, "must be positive"),
            (ExternalCommand { deadline: Duration::ZERO, ..good.external.clone() }, "at least 1 s"),
        ] {
            let settings = ExternalSettings { external, ..good.clone() };
            let message = ExternalTrainer::new(settings, "n").err().map(|e| e.to_string()).unwrap_or_default();
            assert!(message.contains(needle), "{message}");
        }
        // A job directory given relative (a kit path as typed) becomes absolute: the trainer runs
        // in the node's working directory and must find every path the job names.
        let relative = ExternalSettings { dir: PathBuf::from("kit/artifacts/jobs"), ..good };
        let trainer = ExternalTrainer::new(relative, "n").unwrap();
        assert!(trainer.settings.dir.is_absolute() && trainer.settings.dir.ends_with("kit/artifacts/jobs"));
    }

    /// A family's adapter form in miniature: one `A` the shared track keeps frozen, one `B`.
    struct TinyLora;

    const A: &str = "layer.q_proj.lora_A.weight";
    const B: &str = "layer.q_proj.lora_B.weight";

    impl AdapterJobForm for TinyLora {
        fn family(&self) -> &'static str {
            "tiny"
        }
        fn configuration(&self) -> serde_json::Value {
            serde_json::json!({"hidden_size": 3})
        }
        fn tokenizer(&self) -> &[u8] {
            b"{\"model\": {}}"
        }
        fn optimizer(&self, lr: f32) -> AdamWSettings {
            AdamWSettings { lr, warmup_steps: 0, ..AdamWSettings::default() }
        }
        fn initial(&self, round: &AdapterRound) -> Result<ModelState, FamilyError> {
            let mut state = ModelState::new();
            let a = (0..3).map(|i| (round.seed + i) as f32 * 0.25).collect();
            state.insert(A, Tensor::new(vec![1, 3], a)?);
            state.insert(B, Tensor::zeros(vec![3, 1]));
            Ok(state)
        }
        fn update_of(&self, round: &AdapterRound, trained: &ModelState) -> Result<ModelState, FamilyError> {
            if trained.get(A) != self.initial(round)?.get(A) {
                return Err(format!("the trainer changed `{A}`, a factor this round keeps frozen").into());
            }
            let mut update = ModelState::new();
            update.insert(B, trained.get(B).ok_or("no B")?.clone());
            Ok(update)
        }
    }

    fn run_adapter(mode: &str) -> (tempfile::TempDir, Result<TrainedAdapter, FamilyError>) {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("fixture.py"), FIXTURE).unwrap();
        let external = ExternalCommand {
            command: format!("python3 {} {mode}", tmp.path().join("fixture.py").display()),
            deadline: Duration::from_secs(60),
            max_change_norm: 10.0,
        };
        let text = b"this node's own text".to_vec();
        let mut trainer =
            ExternalAdapterTrainer::new(external, &tmp.path().join("jobs"), "node-ja", Box::new(TinyLora), text)
                .unwrap();
        let record =
            AdapterRound { seed: 2, rank: 1, alpha: 2.0, targets: vec!["q".into()], track: AdapterTrack::Shared };
        let settings = AdapterTraining { steps: 4, batch: 2, context: 8, lr: 1e-3 };
        let result = trainer.train_round(5, &base(), &record, &settings, &mut SplitMix64::new(1), &mut |_, _| {});
        (tmp, result)
    }

    #[test]
    fn an_adapter_job_gives_the_factors_and_takes_back_the_update() {
        let (tmp, result) = run_adapter("ok");
        let trained = result.unwrap();
        // The node sends B; it keeps every factor, A exactly as the round gave it.
        assert_eq!(trained.update.names().collect::<Vec<_>>(), vec![B]);
        assert_eq!(trained.update.get(B).unwrap().data(), &[0.001f32; 3]);
        assert_eq!(trained.adapter.get(A).unwrap().data(), &[0.5f32, 0.75, 1.0]);
        let job: Job =
            serde_json::from_slice(&std::fs::read(tmp.path().join("jobs/round-0005/job.json")).unwrap()).unwrap();
        assert_eq!((job.kind, job.base.family.as_str()), (JobKind::Adapter, "tiny"));
        let adapter = job.adapter.unwrap();
        assert_eq!((adapter.rank, adapter.alpha, adapter.track), (1, 2.0, AdapterTrack::Shared));
        assert_eq!((job.training.steps, job.training.batch_rows, job.training.context), (4, 2, 8));
        assert_eq!((job.training.adamw.lr, job.corpus.validation), (1e-3, None));
        assert_eq!(job.base.weights.parent(), job.base.tokenizer.as_deref().and_then(Path::parent));
        // The base, the tokenizer, the initial factors and the text are not kept.
        let dir = tmp.path().join("jobs/round-0005");
        assert!(!dir.join("base").exists() && !dir.join("adapter").exists() && !dir.join("corpus").exists());
    }

    #[test]
    fn an_adapter_trainer_that_breaks_the_contract_is_refused_by_name() {
        for (mode, needle) in [
            ("change-a", "a factor this round keeps frozen"),
            ("shape", "has shape"),
            ("nan", "non-finite value"),
            ("big", "more than the bound 10"),
            ("crash", "the trainer failed"),
        ] {
            let (_tmp, result) = run_adapter(mode);
            let message = result.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(message.contains(needle), "{mode}: {message}");
        }
    }

    /// Every object of `value` has exactly the properties `schema` declares, with the required
    /// ones present, down the tree: the committed JSON Schemas describe what the node writes and
    /// reads.
    fn same_shape(schema: &serde_json::Value, value: &serde_json::Value, at: &str) {
        let Some(properties) = schema.get("properties").and_then(|p| p.as_object()) else { return };
        if value.is_null() {
            // An optional object the job leaves out (`adapter` of a full-weight job).
            return;
        }
        let object = value.as_object().unwrap_or_else(|| panic!("{at}: not an object"));
        let declared: Vec<&String> = properties.keys().collect();
        let written: Vec<&String> = object.keys().collect();
        assert_eq!(declared, written, "{at}: the schema's properties and the node's fields differ");
        for required in schema["required"].as_array().into_iter().flatten() {
            let name = required.as_str().unwrap_or_default();
            assert!(object.contains_key(name), "{at}: required '{name}' is not a field");
        }
        for (name, sub) in properties {
            same_shape(sub, &object[name], &format!("{at}.{name}"));
        }
    }

    #[test]
    fn the_committed_schemas_describe_the_contract() {
        let (tmp, result) = run("ok", Duration::from_secs(60));
        result.unwrap();
        let job: serde_json::Value =
            serde_json::from_slice(&std::fs::read(tmp.path().join("jobs/round-0003/job.json")).unwrap()).unwrap();
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../../docs/trainer/job.schema.json")).unwrap();
        same_shape(&schema, &job, "job.json");
        assert_eq!(schema["properties"]["weft_job"]["const"], JOB_VERSION);
        // An adapter job fills what a full-weight job leaves null.
        let (tmp, result) = run_adapter("ok");
        result.unwrap();
        let job: serde_json::Value =
            serde_json::from_slice(&std::fs::read(tmp.path().join("jobs/round-0005/job.json")).unwrap()).unwrap();
        assert!(job["adapter"].is_object() && job["base"]["tokenizer"].is_string());
        same_shape(&schema, &job, "job.json");

        let metrics = JobMetrics {
            base_hash: base().content_hash(),
            steps: 1,
            tokens: 2,
            train_loss: 3.0,
            final_train_loss: Some(3.0),
            validation_loss_before: Some(4.0),
            validation_loss_after: Some(3.5),
        };
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../../docs/trainer/metrics.schema.json")).unwrap();
        same_shape(&schema, &serde_json::to_value(&metrics).unwrap(), "metrics.json");
        // What the schema requires is exactly what the node cannot do without.
        let minimal =
            serde_json::json!({"base_hash": base().content_hash(), "steps": 1, "tokens": 2, "train_loss": 3.0});
        assert!(serde_json::from_value::<JobMetrics>(minimal.clone()).is_ok());
        for required in schema["required"].as_array().unwrap() {
            let mut without = minimal.clone();
            without.as_object_mut().unwrap().remove(required.as_str().unwrap());
            assert!(serde_json::from_value::<JobMetrics>(without).is_err(), "{required} is not required by the node");
        }
    }
}
