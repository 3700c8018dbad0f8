//! The coordinator's durable state and its ledger, committed together.
//!
//! Each step of the round engine (consortium created, round opened, contribution received,
//! round closed, rollback) is one transaction: the new [`Head`], the rows it adds and the signed
//! ledger entries that describe it commit together or not at all. Blobs (deltas, bases,
//! optimizer state) are written to the [`BlobStore`](crate::BlobStore) *before* the transaction
//! that refers to them, so a committed state never points at a missing blob; a crash in between
//! leaves only an unreferenced blob, which is harmless and reused on retry.
//!
//! [`Journal`] is the narrow interface; [`SqliteJournal`] is the embedded default (bundled
//! SQLite, WAL, `synchronous=FULL`). A server database would implement the same trait.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};
use weft_core::quality::LossTable;
use weft_ledger::{Chain, ChainError, Entry, Event, PublicKey, SigningKey};

use crate::governance::GovernanceState;
use crate::head::ModelRefs;
use crate::record::{ContributionRecord, RoundRecord};

/// Everything the coordinator needs to continue after a restart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Head {
    /// The last closed round (0 before the first).
    pub round: u64,
    /// The round open now, if any.
    pub open: Option<u64>,
    /// Base, outer-optimizer state and center, by blob hash.
    #[serde(flatten)]
    pub model: ModelRefs,
    /// Held-out loss of the base, so that a restart need not measure it again.
    pub base_loss: LossTable,
    pub governance: Option<GovernanceState>,
    /// The circuit breaker's watch: the round whose base it guards (the anchor) and the last
    /// round watched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<BreakerWatch>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BreakerWatch {
    pub anchor_round: u64,
    pub until: u64,
    /// The anchor's state and held-out loss (what a trip restores).
    pub anchor: ModelRefs,
    pub anchor_loss: LossTable,
}

/// Rows a step adds beside the new head.
#[derive(Default)]
pub struct Rows<'a> {
    /// A contribution of the open round, in arrival order.
    pub contribution: Option<(u64, &'a ContributionRecord)>,
    /// A round that closed.
    pub closed: Option<&'a RoundRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("state database {path}: {source}")]
    Sql { path: PathBuf, source: rusqlite::Error },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("state database {path}: stored {what} is unreadable: {detail}")]
    Corrupt { path: PathBuf, what: String, detail: String },
    #[error("{path}: not a coordinator key: {detail}")]
    Key { path: PathBuf, detail: String },
    #[error("ledger: {0}")]
    Chain(#[from] ChainError),
    #[error("the journal at {0} was opened read-only")]
    ReadOnly(PathBuf),
    #[error("cannot draw a random key: {0}")]
    Random(String),
    #[error("{0} holds no ledger: not a coordinator's state database")]
    NoLedger(PathBuf),
    #[error("{path} is not a coordinator's state database: {source}")]
    NotState { path: PathBuf, source: rusqlite::Error },
    #[error("{0} holds no coordinator state (no {db}); give a coordinator's storage directory, e.g. OUT/coordinator of `weft demo --out OUT`", db = SqliteJournal::DATABASE)]
    NoState(PathBuf),
    #[error("{0} is in use by another coordinator (it holds {0}/coordinator.lock); stop it first")]
    InUse(PathBuf),
}

/// What the round engine needs from durable storage. Every method that changes state is one
/// atomic step.
pub trait Journal: Send {
    /// Where the journal lives (for messages).
    fn location(&self) -> &Path;
    /// The key that signs new entries.
    fn public_key(&self) -> Option<PublicKey>;
    /// The consortium's configuration (canonical JSON) and the current head, if one was created.
    fn load(&self) -> Result<Option<(Vec<u8>, Head)>, JournalError>;
    /// Contributions received so far in `round`, in arrival order.
    fn contributions(&self, round: u64) -> Result<Vec<ContributionRecord>, JournalError>;
    /// Closed rounds in order, each with the head right after it closed.
    fn rounds(&self) -> Result<Vec<(RoundRecord, Head)>, JournalError>;
    /// The head right after `round` closed; round 0 is the genesis.
    fn head_after(&self, round: u64) -> Result<Option<Head>, JournalError>;
    /// Creates the consortium: its config and the genesis head and entry.
    fn create(&mut self, config: &[u8], head: &Head, genesis: Event) -> Result<Entry, JournalError>;
    /// Commits one step: the new head, its rows and its ledger entries, atomically.
    fn commit(&mut self, head: &Head, rows: Rows<'_>, events: Vec<Event>) -> Result<Vec<Entry>, JournalError>;
    /// Every ledger line in order.
    fn ledger(&self) -> Result<Vec<Vec<u8>>, JournalError>;
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS head (id INTEGER PRIMARY KEY CHECK (id = 1), state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY, record BLOB NOT NULL, head BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS contributions (
    round INTEGER NOT NULL, arrival INTEGER NOT NULL, node TEXT NOT NULL, record BLOB NOT NULL,
    PRIMARY KEY (round, arrival));
CREATE TABLE IF NOT EXISTS ledger (seq INTEGER PRIMARY KEY, line BLOB NOT NULL);
";

/// The embedded default: `<dir>/state.sqlite` and the signing key `<dir>/coordinator.key`.
pub struct SqliteJournal {
    /// Held while a writer has the journal open: two coordinators on one storage would
    /// interleave their ledgers. The OS releases it when the process dies, however it dies.
    _lock: Option<std::fs::File>,
    dir: PathBuf,
    db: PathBuf,
    conn: Connection,
    key: Option<SigningKey>,
    chain: Chain,
}

impl SqliteJournal {
    pub const DATABASE: &'static str = "state.sqlite";
    pub const KEY_FILE: &'static str = "coordinator.key";

    /// Opens (or creates) the journal in `dir` for writing. The signing key is read from
    /// `coordinator.key`, or made and saved (mode 0600) the first time.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, JournalError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| JournalError::Io { path: dir.clone(), source })?;
        let lock_path = dir.join("coordinator.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| JournalError::Io { path: lock_path.clone(), source })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(JournalError::InUse(dir)),
            Err(std::fs::TryLockError::Error(source)) => return Err(JournalError::Io { path: lock_path, source }),
        }
        let key = load_or_create_key(&dir.join(Self::KEY_FILE))?;
        let db = dir.join(Self::DATABASE);
        let sql = |source| JournalError::Sql { path: db.clone(), source };
        let conn = Connection::open(&db).map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(sql)?;
        conn.execute_batch(SCHEMA).map_err(sql)?;
        let mut journal = SqliteJournal { _lock: Some(lock), dir, db, conn, key: None, chain: Chain::new(None) };
        journal.chain = match journal.last_entry()? {
            Some(last) => Chain::continue_from(key.public(), last.seq + 1, last.hash),
            None => Chain::new(Some(key.public())),
        };
        journal.key = Some(key);
        Ok(journal)
    }

    /// Opens the journal of an existing consortium for writing (operator commands such as
    /// rollback): refused, with nothing created, when `dir` holds no coordinator state.
    pub fn open_existing(dir: impl Into<PathBuf>) -> Result<Self, JournalError> {
        let dir = dir.into();
        let db = dir.join(Self::DATABASE);
        if !db.is_file() {
            return Err(JournalError::NoState(dir));
        }
        if !dir.join(Self::KEY_FILE).is_file() {
            return Err(JournalError::Key { path: dir.join(Self::KEY_FILE), detail: "missing".into() });
        }
        Self::open(dir)
    }

    /// Opens an existing journal read-only (for `weft ledger …`): nothing is created or changed.
    pub fn read(dir: impl Into<PathBuf>) -> Result<Self, JournalError> {
        let dir = dir.into();
        let db = dir.join(Self::DATABASE);
        if !db.is_file() {
            return Err(JournalError::NoState(dir));
        }
        // A read-only connection to a WAL database creates `-wal` and `-shm` files beside it and
        // cannot remove them when it closes. With no `-wal` file no writer is active (a
        // coordinator that stopped cleanly removed it): the database is then opened as
        // immutable, which creates nothing. With one, a coordinator runs (or crashed) and the
        // files are already there.
        let wal = dir.join(format!("{}-wal", Self::DATABASE));
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI;
        let opened = if wal.exists() {
            Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        } else {
            Connection::open_with_flags(format!("file:{}?immutable=1", uri_path(&db)), flags)
        };
        let not_state = |source| JournalError::NotState { path: db.clone(), source };
        let conn = opened.map_err(not_state)?;
        // An empty or foreign file opens (SQLite reads lazily): ask for the ledger now.
        conn.query_row("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'ledger'", [], |row| {
            row.get::<_, i64>(0)
        })
        .map_err(not_state)
        .and_then(|tables| match tables {
            1 => Ok(()),
            _ => Err(JournalError::NoLedger(db.clone())),
        })?;
        Ok(SqliteJournal { _lock: None, dir, db, conn, key: None, chain: Chain::new(None) })
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> JournalError + '_ {
        |source| JournalError::Sql { path: self.db.clone(), source }
    }

    fn decode<T: for<'de> Deserialize<'de>>(&self, what: &str, bytes: &[u8]) -> Result<T, JournalError> {
        serde_json::from_slice(bytes).map_err(|e| JournalError::Corrupt {
            path: self.db.clone(),
            what: what.to_owned(),
            detail: e.to_string(),
        })
    }

    /// Runs `read` on one consistent view of the committed state: a read transaction, so a
    /// running coordinator's commits in the meantime are not half seen (readers beside a live
    /// coordinator, such as the dashboard).
    pub fn consistent<T>(&self, read: impl FnOnce(&Self) -> Result<T, JournalError>) -> Result<T, JournalError> {
        self.conn.execute_batch("BEGIN DEFERRED").map_err(self.sql())?;
        let out = read(self);
        // Ends the read transaction; it changed nothing, so there is nothing to lose.
        let ended = self.conn.execute_batch("COMMIT").map_err(self.sql());
        let out = out?;
        ended?;
        Ok(out)
    }

    /// The number of ledger entries (cheap: readers poll it to see a step land).
    pub fn ledger_len(&self) -> Result<u64, JournalError> {
        let n: i64 = self.conn.query_row("SELECT COUNT(*) FROM ledger", [], |row| row.get(0)).map_err(self.sql())?;
        Ok(n.max(0) as u64)
    }

    fn last_entry(&self) -> Result<Option<Entry>, JournalError> {
        let line: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT line FROM ledger ORDER BY seq DESC LIMIT 1", [], |row| row.get(0))
            .optional()
            .map_err(self.sql())?;
        line.map(|line| self.decode("last ledger entry", &line)).transpose()
    }

    /// Seals `events` and writes them, the head and the rows in one transaction.
    fn write(
        &mut self,
        config: Option<&[u8]>,
        head: &Head,
        rows: Rows<'_>,
        events: Vec<Event>,
    ) -> Result<Vec<Entry>, JournalError> {
        let Some(key) = self.key.as_ref() else { return Err(JournalError::ReadOnly(self.dir.clone())) };
        let mut chain = self.chain.clone();
        let mut sealed = Vec::new();
        for event in events {
            sealed.push(chain.seal(key, event)?);
        }
        let encode = |what: &str, value: &dyn erased::Encode| value.encode(what, &self.db);
        let head_json = encode("head", head)?;
        let contribution = match rows.contribution {
            Some((round, r)) => Some((round, r, encode("contribution", r)?)),
            None => None,
        };
        let closed = match rows.closed {
            Some(r) => Some((r.round, encode("round record", r)?)),
            None => None,
        };
        let db = self.db.clone();
        let sql = |source| JournalError::Sql { path: db.clone(), source };
        let tx = self.conn.transaction().map_err(sql)?;
        if let Some(config) = config {
            tx.execute("INSERT INTO meta (key, value) VALUES ('config', ?1)", params![config]).map_err(sql)?;
            tx.execute("INSERT INTO meta (key, value) VALUES ('genesis', ?1)", params![head_json]).map_err(sql)?;
        }
        tx.execute("INSERT OR REPLACE INTO head (id, state) VALUES (1, ?1)", params![head_json]).map_err(sql)?;
        if let Some((round, record, json)) = contribution {
            tx.execute(
                "INSERT INTO contributions (round, arrival, node, record)
                 VALUES (?1, (SELECT COUNT(*) FROM contributions WHERE round = ?1), ?2, ?3)",
                params![round as i64, record.node.as_str(), json],
            )
            .map_err(sql)?;
        }
        if let Some((round, json)) = closed {
            tx.execute(
                "INSERT INTO rounds (round, record, head) VALUES (?1, ?2, ?3)",
                params![round as i64, json, head_json],
            )
            .map_err(sql)?;
        }
        for (entry, line) in &sealed {
            tx.execute("INSERT INTO ledger (seq, line) VALUES (?1, ?2)", params![entry.seq as i64, line])
                .map_err(sql)?;
        }
        weft_durable::crash::point("journal-before-commit");
        tx.commit().map_err(sql)?;
        self.chain = chain;
        Ok(sealed.into_iter().map(|(entry, _)| entry).collect())
    }
}

/// Values stored as JSON must read back as themselves (JSON has no NaN).
mod erased {
    use std::path::Path;

    use serde::{de::DeserializeOwned, Serialize};

    use super::JournalError;

    pub trait Encode {
        fn encode(&self, what: &str, db: &Path) -> Result<Vec<u8>, JournalError>;
    }

    impl<T: Serialize + DeserializeOwned + PartialEq> Encode for T {
        fn encode(&self, what: &str, db: &Path) -> Result<Vec<u8>, JournalError> {
            let corrupt = |detail: String| JournalError::Corrupt { path: db.to_owned(), what: what.to_owned(), detail };
            let json = serde_json::to_vec(self).map_err(|e| corrupt(e.to_string()))?;
            match serde_json::from_slice::<T>(&json) {
                Ok(back) if back == *self => Ok(json),
                _ => Err(corrupt("holds a number JSON cannot carry (NaN or infinity); not stored".into())),
            }
        }
    }
}

impl Journal for SqliteJournal {
    fn location(&self) -> &Path {
        &self.dir
    }

    fn public_key(&self) -> Option<PublicKey> {
        self.key.as_ref().map(SigningKey::public)
    }

    fn load(&self) -> Result<Option<(Vec<u8>, Head)>, JournalError> {
        let config: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'config'", [], |row| row.get(0))
            .optional()
            .map_err(self.sql())?;
        let head: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT state FROM head WHERE id = 1", [], |row| row.get(0))
            .optional()
            .map_err(self.sql())?;
        match (config, head) {
            (Some(config), Some(head)) => Ok(Some((config, self.decode("head", &head)?))),
            (None, None) => Ok(None),
            _ => Err(JournalError::Corrupt {
                path: self.db.clone(),
                what: "consortium".into(),
                detail: "config and head must both be present".into(),
            }),
        }
    }

    fn contributions(&self, round: u64) -> Result<Vec<ContributionRecord>, JournalError> {
        let mut stmt = self
            .conn
            .prepare("SELECT record FROM contributions WHERE round = ?1 ORDER BY arrival")
            .map_err(self.sql())?;
        let rows: Vec<Vec<u8>> = stmt
            .query_map(params![round as i64], |row| row.get(0))
            .map_err(self.sql())?
            .collect::<Result<_, _>>()
            .map_err(self.sql())?;
        rows.iter().map(|r| self.decode("contribution", r)).collect()
    }

    fn rounds(&self) -> Result<Vec<(RoundRecord, Head)>, JournalError> {
        let mut stmt = self.conn.prepare("SELECT record, head FROM rounds ORDER BY round").map_err(self.sql())?;
        let rows: Vec<(Vec<u8>, Vec<u8>)> = stmt
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(self.sql())?
            .collect::<Result<_, _>>()
            .map_err(self.sql())?;
        rows.iter().map(|(r, h)| Ok((self.decode("round record", r)?, self.decode("round head", h)?))).collect()
    }

    fn head_after(&self, round: u64) -> Result<Option<Head>, JournalError> {
        let json: Option<Vec<u8>> = if round == 0 {
            self.conn.query_row("SELECT value FROM meta WHERE key = 'genesis'", [], |row| row.get(0))
        } else {
            self.conn.query_row("SELECT head FROM rounds WHERE round = ?1", params![round as i64], |row| row.get(0))
        }
        .optional()
        .map_err(self.sql())?;
        json.map(|j| self.decode("round head", &j)).transpose()
    }

    fn create(&mut self, config: &[u8], head: &Head, genesis: Event) -> Result<Entry, JournalError> {
        let mut entries = self.write(Some(config), head, Rows::default(), vec![genesis])?;
        entries.pop().ok_or_else(|| JournalError::Corrupt {
            path: self.db.clone(),
            what: "genesis".into(),
            detail: "no entry was written".into(),
        })
    }

    fn commit(&mut self, head: &Head, rows: Rows<'_>, events: Vec<Event>) -> Result<Vec<Entry>, JournalError> {
        self.write(None, head, rows, events)
    }

    fn ledger(&self) -> Result<Vec<Vec<u8>>, JournalError> {
        let mut stmt = self.conn.prepare("SELECT line FROM ledger ORDER BY seq").map_err(self.sql())?;
        let lines = stmt
            .query_map([], |row| row.get(0))
            .map_err(self.sql())?
            .collect::<Result<Vec<Vec<u8>>, _>>()
            .map_err(self.sql())?;
        Ok(lines)
    }
}

/// `path` as the path of an SQLite URI: `%`, `?` and `#` would be read as URI syntax.
fn uri_path(path: &Path) -> String {
    let mut out = String::new();
    for c in path.to_string_lossy().chars() {
        match c {
            '%' | '?' | '#' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// The coordinator's signing key: 64 hex digits in a file only its owner can read.
fn load_or_create_key(path: &Path) -> Result<SigningKey, JournalError> {
    let key_error = |detail: String| JournalError::Key { path: path.to_owned(), detail };
    match std::fs::read_to_string(path) {
        Ok(text) => SigningKey::from_hex(&text).map_err(|e| key_error(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SigningKey::generate().map_err(|e| JournalError::Random(e.to_string()))?;
            weft_durable::write_private(path, key.to_hex().as_bytes())
                .map_err(|source| JournalError::Io { path: path.to_owned(), source })?;
            Ok(key)
        }
        Err(source) => Err(JournalError::Io { path: path.to_owned(), source }),
    }
}
