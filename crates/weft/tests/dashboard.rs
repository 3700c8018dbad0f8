//! The dashboard as people meet it: `weft dashboard` over a finished demo, read with plain HTTP,
//! and `coordinator serve --dashboard` beside a live networked consortium, in headless Chromium
//! driven over WebDriver (Debian's chromium and chromium-driver, installed by
//! `scripts/install-browser` when missing).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

mod support;
use support::{free_port, Running};

fn weft() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_weft"));
    command.env_remove("WEFT_CRASH_AT").env_remove("WEFT_DASHBOARD_TOKEN");
    command
}

/// An HTTP/1.1 response.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// One request over a fresh connection (`Connection: close`), as a plain client sends it.
fn http(address: &str, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Reply {
    let mut stream = TcpStream::connect(address).unwrap_or_else(|e| panic!("connecting to {address}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" {
        request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let status: u16 = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut raw = Vec::new();
    // ChromeDriver keeps the connection open whatever the request says: read what it announced.
    match headers.get("content-length").and_then(|n| n.parse::<usize>().ok()) {
        Some(n) => {
            raw.resize(n, 0);
            reader.read_exact(&mut raw).unwrap();
        }
        None => {
            reader.read_to_end(&mut raw).unwrap();
        }
    }
    if headers.get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        raw = dechunk(&raw);
    }
    Reply { status, headers, body: String::from_utf8(raw).expect("a UTF-8 body") }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let end = raw.windows(2).position(|w| w == b"\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[end + 2..end + 2 + size]);
        raw = &raw[end + 4 + size..];
    }
}

fn get(address: &str, path: &str) -> Reply {
    http(address, "GET", path, &[], None)
}

/// Starts `weft dashboard` and returns it with the address it printed.
fn dashboard(dir: &Path, extra: &[&str]) -> (Running, String) {
    let mut child = weft()
        .args(["dashboard"])
        .arg(dir)
        .args(["--addr", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let address = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("the dashboard printed no address: {line:?}"))
        .to_string();
    (Running(child), address)
}

/// Every file under `dir` with its size and modification time.
fn tree(dir: &Path) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                files.insert(entry.path(), (meta.len(), meta.modified().unwrap()));
            }
        }
    }
    files
}

/// `name{labels} value` samples of a Prometheus exposition.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {l}"));
            (key.to_string(), value.parse().unwrap_or_else(|_| panic!("not a number: {l}")))
        })
        .collect()
}

#[test]
fn a_finished_demo_is_shown_read_only_with_every_parameter_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let demo = weft()
        .args(["demo", "--rounds", "2", "--local-steps", "20", "--layers", "1", "--heads", "2", "--width", "32"])
        .args(["--context", "32", "--batch", "8", "--attack", "nan", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(demo.status.success(), "{}", String::from_utf8_lossy(&demo.stderr));
    let report: Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();

    // The report: self-contained (nothing fetched, no script), with the chart and the refusal.
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains(r#"id="loss-chart""#) && html.contains(r#"data-languages="de,en,es,fr""#));
    assert!(!html.contains("<script") && !html.contains("src=") && !html.contains("href=\"http"));
    assert!(html.contains(r#"data-decision="non_finite""#), "the NaN attacker's refusal is in the report");
    assert!(html.contains(r#"id="verify"><span class="badge ok""#), "the report shows the ledger verified");

    let storage = out.join("coordinator");
    let before = tree(&out);
    let (server, address) = dashboard(&storage, &["--no-verify"]);
    for page in ["/", "/rounds", "/rounds/1", "/rounds/2", "/reputation", "/privacy", "/ledger", "/ledger/0"] {
        let reply = get(&address, page);
        assert_eq!(reply.status, 200, "{page}: {}", reply.body);
        assert!(reply.headers["content-type"].starts_with("text/html"), "{page}");
        assert!(reply.headers["content-security-policy"].contains("script-src 'self'"), "{page}");
    }
    let round = get(&address, "/rounds/1").body;
    assert!(round.contains(r#"data-node="node-es" data-decision="non_finite""#), "{round}");
    let node = get(&address, "/nodes/node-de").body;
    assert!(node.contains("/nodes/node-de/proof?round=2"));

    // A contribution's proof, checked without the ledger by the CLI.
    let proof = get(&address, "/nodes/node-de/proof?round=2");
    assert_eq!(proof.status, 200, "{}", proof.body);
    let proof_file = tmp.path().join("proof.json");
    std::fs::write(&proof_file, &proof.body).unwrap();
    let checked = weft().args(["ledger", "check-proof"]).arg(&proof_file).output().unwrap();
    assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stderr));

    // Bad requests: 400 naming the parameter, 404 naming what is missing, 405 for writes.
    for (path, status, says) in [
        ("/ledger?limit=0", 400, "limit must be"),
        ("/ledger?limit=abc", 400, "limit must be"),
        ("/ledger?kind=everything", 400, "not a ledger event"),
        ("/ledger?from=1&from=2", 400, "given twice"),
        ("/ledger?node=%3Cscript%3E", 400, "not a node id"),
        ("/rounds?page=2", 400, "unknown query parameter 'page'"),
        ("/rounds/zero", 400, "round must be"),
        ("/rounds/0", 400, "round must be"),
        ("/rounds/99", 404, "round 99 has not been opened"),
        ("/nodes/nobody", 404, "no node nobody"),
        ("/nodes/node-de/proof", 400, "needs ?round="),
        ("/nodes/node-de/proof?round=9", 404, ""),
        ("/ledger/100000", 404, "no entry #100000"),
        ("/admin", 404, "no page at /admin"),
    ] {
        let reply = get(&address, path);
        assert_eq!(reply.status, status, "{path}: {}", reply.body);
        assert!(reply.body.contains(says), "{path}: {}", reply.body);
    }
    for method in ["POST", "PUT", "DELETE"] {
        assert_eq!(http(&address, method, "/", &[], None).status, 405, "{method} /");
    }

    // /metrics agrees with the run's own report.
    let metrics = get(&address, "/metrics");
    assert!(metrics.headers["content-type"].starts_with("text/plain; version=0.0.4"));
    let m = samples(&metrics.body);
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(m["weft_rounds_closed_total"], rounds.len() as f64);
    let accepted: u64 = rounds.iter().map(|r| r["accepted"].as_u64().unwrap()).sum();
    assert_eq!(m["weft_contributions_total{decision=\"accepted\"}"], accepted as f64);
    assert_eq!(m["weft_contributions_total{decision=\"non_finite\"}"], 2.0);
    assert_eq!(m["weft_round_duration_seconds_count"], 2.0);
    assert_eq!(m["weft_aggregation_duration_seconds_bucket{le=\"+Inf\"}"], 2.0);
    for (language, loss) in report["final_heldout_loss"].as_object().unwrap() {
        let key = format!("weft_heldout_loss_nats_per_byte{{language=\"{language}\"}}");
        assert_eq!(m[&key], loss.as_f64().unwrap(), "{key}");
    }
    let show = weft().args(["ledger", "show", "--json"]).arg(&storage).output().unwrap();
    let entries: Vec<Value> = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(m["weft_ledger_entries"], entries.len() as f64);
    drop(server);

    // Wrong paths and unsafe addresses are refused before anything listens.
    let missing = weft().args(["dashboard"]).arg(tmp.path().join("nothing")).output().unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no such directory"), "{missing:?}");
    assert!(!tmp.path().join("nothing").exists());
    let not_storage = weft().args(["dashboard"]).arg(tmp.path()).output().unwrap();
    assert!(String::from_utf8_lossy(&not_storage.stderr).contains("holds no coordinator state"), "{not_storage:?}");
    // The run's directory instead of its coordinator's: the error gives the command to use.
    let run_dir = weft().args(["dashboard"]).arg(&out).output().unwrap();
    let said = String::from_utf8_lossy(&run_dir.stderr);
    assert!(!run_dir.status.success() && said.contains(&format!("weft dashboard {}", storage.display())), "{said}");
    let open = weft().args(["dashboard"]).arg(&storage).args(["--addr", "0.0.0.0:0"]).output().unwrap();
    assert!(String::from_utf8_lossy(&open.stderr).contains("access token"), "{open:?}");
    let short = weft().args(["dashboard"]).arg(&storage).args(["--token", "abc"]).output().unwrap();
    assert!(String::from_utf8_lossy(&short.stderr).contains("at least 16"), "{short:?}");

    // With a token: refused without it; `?token=` sets a cookie and drops it from the address.
    let token = "correct-horse-battery-staple";
    let (server, address) = dashboard(&storage, &["--token", token]);
    assert_eq!(get(&address, "/").status, 401);
    assert_eq!(get(&address, "/metrics").status, 401);
    assert_eq!(get(&address, "/?token=wrong-horse-battery-staple").status, 401);
    let entered = get(&address, &format!("/rounds?token={token}"));
    assert_eq!(entered.status, 303);
    assert_eq!(entered.headers["location"], "/rounds");
    let cookie = entered.headers["set-cookie"].split(';').next().unwrap().to_string();
    assert!(entered.headers["set-cookie"].contains("HttpOnly"));
    assert_eq!(http(&address, "GET", "/rounds", &[("Cookie", &cookie)], None).status, 200);
    let bearer = format!("Bearer {token}");
    let started = Instant::now();
    loop {
        let reply = http(&address, "GET", "/metrics", &[("Authorization", &bearer)], None);
        assert_eq!(reply.status, 200);
        if samples(&reply.body).get("weft_ledger_verified") == Some(&1.0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the dashboard's verification did not pass: {}",
            reply.body
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(server);
    assert_eq!(tree(&out), before, "the dashboard changed the run's files");
}

/// The project's own script installs Debian's Chromium and ChromeDriver when they are missing.
fn browser() -> (PathBuf, PathBuf) {
    let (chromium, driver) = (PathBuf::from("/usr/bin/chromium"), PathBuf::from("/usr/bin/chromedriver"));
    if !chromium.exists() || !driver.exists() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/install-browser");
        let out = Command::new(&script).output().unwrap_or_else(|e| panic!("{}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed:\n{}\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (chromium, driver)
}

/// A WebDriver session (W3C protocol) with ChromeDriver, over the plain HTTP client above.
struct Browser {
    driver: String,
    session: String,
    _chromedriver: Running,
}

impl Browser {
    fn start(profile: &Path) -> Browser {
        let (chromium, driver) = browser();
        let port = free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let chromedriver = Running(child);
        let address = format!("127.0.0.1:{port}");
        let started = Instant::now();
        while TcpStream::connect(&address).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                // Headless in a sandbox-less CI container, and no calls home (the network is closed).
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--no-first-run", "--window-size=1280,1500",
                         format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let reply = http(&address, "POST", "/session", &[], Some(&capabilities.to_string()));
        let value: Value = serde_json::from_str(&reply.body).unwrap();
        let session = value["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {}", reply.body))
            .to_string();
        Browser { driver: address, session, _chromedriver: chromedriver }
    }

    fn command(&self, method: &str, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let body = (method == "POST").then(|| body.to_string());
        let reply = http(&self.driver, method, &path, &[], body.as_deref());
        let value: Value = serde_json::from_str(&reply.body).unwrap_or(Value::Null);
        assert_eq!(reply.status, 200, "WebDriver {method} {path}: {}", reply.body);
        value["value"].clone()
    }

    fn go(&self, url: &str) {
        self.command("POST", "/url", json!({ "url": url }));
    }

    /// Runs `script` in the page and returns what it returns.
    fn run(&self, script: &str) -> Value {
        self.command("POST", "/execute/sync", json!({ "script": script, "args": [] }))
    }

    fn click(&self, css: &str) {
        let element = self.command("POST", "/element", json!({ "using": "css selector", "value": css }));
        let id = element.as_object().and_then(|o| o.values().next()).and_then(Value::as_str).unwrap().to_string();
        self.command("POST", &format!("/element/{id}/click"), json!({}));
    }

    /// Polls `script` until it returns true.
    fn wait_for(&self, what: &str, script: &str, limit: Duration) {
        let started = Instant::now();
        while self.run(script) != Value::Bool(true) {
            assert!(started.elapsed() < limit, "waited {limit:?} for {what}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn screenshot(&self, path: &Path) {
        let png = self.command("GET", "/screenshot", Value::Null);
        std::fs::write(path, base64(png.as_str().unwrap())).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http(&self.driver, "DELETE", &format!("/session/{}", self.session), &[], None);
    }
}

fn base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let clean: Vec<u8> = text.bytes().filter(|c| *c != b'=' && !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let bits = chunk.iter().enumerate().fold(0u32, |acc, (i, c)| acc | (u32::from(value(*c)) << (18 - 6 * i)));
        out.extend_from_slice(&bits.to_be_bytes()[1..chunk.len()]);
    }
    out
}

const TINY: &[&str] =
    &["--local-steps", "4", "--layers", "1", "--heads", "2", "--width", "16", "--context", "16", "--batch", "4"];

/// A trainer that sends noise instead of training: the coordinator measures it and refuses it.
const NOISY_TRAINER: &str = r#"
import weft_trainer as wt

job = wt.load_job()
rng = wt.SplitMix64(job["training"]["seed"])
noisy = {}
for name, tensor in wt.read_safetensors(job["base"]["weights"]).items():
    shape, values = tensor if isinstance(tensor, tuple) else (list(tensor.shape), tensor.ravel().tolist())
    noisy[name] = (shape, [v + ((rng.next_u64() >> 11) / 2.0**53 - 0.5) for v in values])
wt.write_safetensors(job["output"]["weights"], noisy)
wt.write_metrics(job, 1, 0, 0.0)
"#;

#[test]
fn the_live_dashboard_in_chromium_shows_rounds_a_refusal_and_the_loss_chart_and_updates_without_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("consortium");
    let mut init = weft();
    init.args(["consortium", "init"]).arg(&dir).args(["--address", &format!("127.0.0.1:{}", free_port())]);
    init.args(["--rounds", "3", "--deadline-secs", "90"]).args(TINY);
    for node in ["node-de:de", "node-fr:fr", "node-es:es", "node-ja:ja"] {
        init.args(["--node", node]);
    }
    let out = init.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let trainer = tmp.path().join("noisy.py");
    std::fs::write(&trainer, NOISY_TRAINER).unwrap();
    let trainers = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../trainers");
    let kit = dir.join("nodes/node-ja/node.toml");
    let mut toml = std::fs::read_to_string(&kit).unwrap();
    toml.push_str(&format!(
        "\n[trainer]\ncommand = \"PYTHONPATH={} python3 {}\"\n",
        trainers.display(),
        trainer.display()
    ));
    std::fs::write(&kit, toml).unwrap();

    let dashboard = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(tmp.path().join("serve.err")).unwrap();
    let _coordinator = Running(
        weft()
            .args(["coordinator", "serve"])
            .arg(&dir)
            .args(["--dashboard", &dashboard, "--linger-secs", "300"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    while TcpStream::connect(&dashboard).is_err() {
        assert!(started.elapsed() < Duration::from_secs(60), "the dashboard did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The page is open before any node joins: every round that shows up, shows up live.
    let browser = Browser::start(&tmp.path().join("profile"));
    browser.go(&format!("http://{dashboard}/rounds"));
    browser.wait_for(
        "the rounds page",
        "return document.getElementById('rounds-table') !== null",
        Duration::from_secs(30),
    );
    let closed = "return document.querySelectorAll('#rounds-table tr.round:not(.open)').length";
    assert_eq!(browser.run(closed), json!(0));
    browser.run("window.weftNotReloaded = true; return null;");
    browser.wait_for(
        "the live indicator",
        "return document.getElementById('live').textContent.startsWith('live')",
        Duration::from_secs(30),
    );

    let nodes: Vec<Running> = ["node-de", "node-fr", "node-es", "node-ja"]
        .iter()
        .map(|node| {
            Running(
                weft()
                    .args(["node", "join"])
                    .arg(dir.join("nodes").join(node))
                    .args(["--give-up-after", "120"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    browser.wait_for(
        "round 1 to appear",
        "return document.querySelectorAll('#rounds-table tr.round:not(.open)').length >= 1",
        Duration::from_secs(180),
    );
    browser.wait_for(
        "round 3 to appear",
        "return document.querySelector('#rounds-table tr.round[data-round=\"3\"]:not(.open)') !== null",
        Duration::from_secs(180),
    );
    assert_eq!(browser.run("return window.weftNotReloaded === true"), json!(true), "the page was reloaded");
    drop(nodes);

    // The loss chart: one line per language, a point per round and the initial base.
    let chart = browser.run(
        "return Array.from(document.querySelectorAll('#loss-chart g.series')).map(g => [g.dataset.language, Number(g.dataset.points)])",
    );
    assert_eq!(chart, json!([["de", 4], ["es", 4], ["fr", 4], ["ja", 4]]));

    // A person clicks through to round 1 and reads why node-ja was refused.
    browser.click("#rounds-table a[href='/rounds/1']");
    browser.wait_for(
        "round 1's page",
        "return location.pathname === '/rounds/1' && document.querySelector('tr.contribution') !== null",
        Duration::from_secs(30),
    );
    let refused = browser.run(
        "const r = document.querySelector('tr.contribution[data-node=\"node-ja\"]'); return r && [r.dataset.decision, r.querySelector('td.reason').textContent]",
    );
    assert_eq!(refused[0], json!("below_floor"), "{refused}");
    assert!(refused[1].as_str().is_some_and(|reason| reason.contains("floor")), "{refused}");
    let accepted = "return document.querySelectorAll('tr.contribution[data-decision=\"accepted\"]').length";
    assert_eq!(browser.run(accepted), json!(3));

    // The overview, once its ledger verification has passed: the screenshot.
    browser.go(&format!("http://{dashboard}/"));
    browser.wait_for(
        "the ledger to verify",
        "return document.getElementById('verify').textContent.includes('passed') && document.getElementById('rounds-closed').textContent === '3'",
        Duration::from_secs(120),
    );
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    browser.screenshot(&shot);
    assert!(std::fs::read(&shot).unwrap().starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    if let Some(copy) = std::env::var_os("WEFT_DASHBOARD_SCREENSHOT") {
        std::fs::copy(&shot, copy).unwrap();
    }
}
