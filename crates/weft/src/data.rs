//! Where the demo's text comes from: node corpora (fetched once by `scripts/fetch-corpora`) and
//! the held-out UDHR texts committed under `data/udhr`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// Languages the project ships held-out text for and can fetch a corpus for.
pub const LANGUAGES: [&str; 9] = ["en", "de", "fr", "es", "it", "pt", "ja", "zh-cn", "id"];

/// The data directory: `--data`, else `WEFT_DATA`, else the repository's `data/`.
pub fn data_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("WEFT_DATA").map(PathBuf::from))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data"))
}

pub fn heldout(data: &Path, language: &str) -> anyhow::Result<Vec<u8>> {
    let path = data.join("udhr").join(format!("{language}.txt"));
    std::fs::read(&path).with_context(|| format!("reading the held-out text {}", path.display()))
}

/// Whether a coordinator using `data` can find held-out text for `language`: the committed UDHR
/// text for the byte model; for a pretrained base (`base`), the tail of a corpus that is there or
/// that `scripts/fetch-corpora` can fetch.
pub fn check_heldout_source(data: &Path, language: &str, base: bool) -> anyhow::Result<()> {
    let (path, fetchable) = if base {
        (data.join("corpora").join(format!("{language}.txt")), LANGUAGES.contains(&language))
    } else {
        (data.join("udhr").join(format!("{language}.txt")), false)
    };
    if fetchable || path.is_file() {
        return Ok(());
    }
    bail!(
        "no held-out text for language '{language}': {} does not exist{} (languages the project has text for: {})",
        path.display(),
        if base { " and the project cannot fetch a corpus for it" } else { "" },
        LANGUAGES.join(", ")
    )
}

/// The training corpus of one language, fetched on first use.
pub fn corpus(data: &Path, language: &str) -> anyhow::Result<Vec<u8>> {
    let path = data.join("corpora").join(format!("{language}.txt"));
    if !path.is_file() {
        fetch(data, language)?;
    }
    let bytes = std::fs::read(&path).with_context(|| format!("reading the corpus {}", path.display()))?;
    if bytes.is_empty() {
        bail!("the corpus {} is empty; delete it and run again to re-fetch", path.display());
    }
    Ok(bytes)
}

fn fetch(data: &Path, language: &str) -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fetch-corpora");
    eprintln!(
        "weft: no corpus for '{language}' under {}: fetching Debian's debian-reference-{language} (one time, ~1 MB of text)",
        data.join("corpora").display()
    );
    if !script.is_file() {
        bail!("{} is missing: fetch the corpus by hand into data/corpora/{language}.txt", script.display());
    }
    let status = Command::new("bash")
        .arg(&script)
        .arg(language)
        .env("WEFT_CORPORA_DIR", data.join("corpora"))
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} {language} failed ({status}); see its message above", script.display());
    }
    Ok(())
}
