//! The reference trainer in numpy (`trainers/numpy_byte_gpt.py`), run by a node under the job
//! contract, against weft's own training of the same job: the same windows, the same model and
//! optimizer, so the same update to float tolerance — over two rounds, so that the optimizer's
//! moments and warm-up carried in the trainer's state directory are checked too.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use weft_core::{Delta, ModelState};
use weft_model::{AdamW, AdamWSettings, CorpusText, Gpt, GptConfig, SplitMix64, WeightTrainer};
use weft_node::{ExternalCommand, ExternalSettings, ExternalTrainer, JobTraining};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A python with numpy: `trainers/setup` installs it into trainers/.venv on first use.
fn python() -> String {
    let out = Command::new("bash").arg(root().join("trainers/setup")).output().expect("running trainers/setup");
    assert!(out.status.success(), "trainers/setup failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("a path").trim().to_owned()
}

const CONFIG: GptConfig = GptConfig { layers: 2, heads: 4, width: 32, context: 32 };
const STEPS: u64 = 6;
const ROWS: usize = 4;

fn adamw() -> AdamWSettings {
    // A short warm-up, so that round 2 runs partly warmed-up from the trainer's saved step.
    AdamWSettings { warmup_steps: 8, ..AdamWSettings::default() }
}

/// ‖a − b‖ / ‖b‖ over every tensor.
fn relative_difference(a: &ModelState, b: &ModelState) -> f64 {
    let difference = Delta::between(b, a).expect("same layout").norm();
    let size = b.iter().flat_map(|(_, t)| t.data()).map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
    difference / size
}

#[test]
fn the_numpy_trainer_agrees_with_weft_training_over_two_rounds() {
    let text = std::fs::read(root().join("data/udhr/en.txt")).expect("the English UDHR");
    let (train, validation) = text.split_at(text.len() - 1500);
    let corpus = CorpusText { train, validation };
    let tmp = tempfile::tempdir().unwrap();
    let settings = ExternalSettings {
        external: ExternalCommand {
            command: format!("{} {}", python(), root().join("trainers/numpy_byte_gpt.py").display()),
            deadline: Duration::from_secs(300),
            max_change_norm: 100.0,
        },
        dir: tmp.path().join("jobs"),
        family: "byte-gpt".into(),
        config: serde_json::to_value(CONFIG).unwrap(),
        training: JobTraining { steps: STEPS, batch_rows: ROWS, context: CONFIG.context, seed: 0, adamw: adamw() },
    };
    let mut numpy = ExternalTrainer::new(settings, "node-en").unwrap();

    let mut reference = Gpt::init(CONFIG, 11).unwrap();
    let mut optimizer = AdamW::new(adamw(), &reference);
    let mut base = reference.to_state();
    for round in 1..=2u64 {
        let mut stream = SplitMix64::new(100 + round);
        let trained = numpy.train_round(round, &base, corpus, &mut stream, &mut |_, _| {}).unwrap();
        // weft's training of the same job: windows from the job's seed, as the node's stream gave it.
        let seed = SplitMix64::new(100 + round).next_u64();
        let before = reference.loss_per_byte(validation, ROWS);
        let report = optimizer.train(&mut reference, train, STEPS, ROWS, &mut SplitMix64::new(seed), |_, _| {});
        let after = reference.loss_per_byte(validation, ROWS);
        let expected = reference.to_state();

        let numpy_change = Delta::between(&base, &trained.weights).unwrap();
        let weft_change = Delta::between(&base, &expected).unwrap();
        let change_gap = relative_difference(numpy_change.state(), weft_change.state());
        eprintln!(
            "round {round}: update ‖Δ‖ {:.4} (weft {:.4}), relative difference of the updates {change_gap:.2e}; \
             train loss {:.6} vs {:.6}, validation {:.6} -> {:.6} vs {:.6} -> {:.6}",
            numpy_change.norm(),
            weft_change.norm(),
            trained.report.mean_loss,
            report.mean_loss,
            trained.validation_loss_before,
            trained.validation_loss_after,
            before,
            after
        );
        // Measured: 2–4e-6 (float sums in another order); a wrong window, step or moment is far
        // above the bound.
        assert!(change_gap < 1e-4, "round {round}: the updates differ by {change_gap:.3e} of weft's");
        assert_eq!((trained.report.steps, trained.report.tokens), (report.steps, report.tokens));
        for (declared, measured) in [
            (trained.report.mean_loss, report.mean_loss),
            (trained.report.final_loss, report.final_loss),
            (trained.validation_loss_before, before),
            (trained.validation_loss_after, after),
        ] {
            assert!((declared - measured).abs() < 1e-4 * measured.abs(), "round {round}: {declared} vs {measured}");
        }
        // Each round trains from weft's own result, so that rounds do not compound the gap.
        base = expected;
    }
}

#[test]
fn the_numpy_trainer_refuses_a_job_it_cannot_train() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("job.json");
    std::fs::write(&job, r#"{"weft_job": 1, "kind": "adapter", "base": {"family": "llama"}}"#).unwrap();
    let out = Command::new(python())
        .arg(root().join("trainers/numpy_byte_gpt.py"))
        .env("WEFT_JOB", &job)
        .output()
        .expect("running the numpy trainer");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("full-weight rounds of the byte GPT, not a adapter job"), "{stderr}");
}
