//! The tamper-evident audit trail: one record per RPC, written durably *before* the response
//! is sent (fail closed), hash-chained, with checkpoints MACed inside the HSM.
//!
//! - **What is stored**: time, request id, principal, role, operation, key id and version,
//!   outcome, error code, break-glass window, severity, non-secret detail — and, for the
//!   encryption context and any identifiers, only the keys/labels in clear and the values as
//!   HMAC-SHA256 under an identifier key ([`Audit::hash_identifier`]). An auditor who knows a
//!   value can find the records about it (`hash VALUE`); the trail never holds it.
//! - **Chain** (`chain.rs`): each record carries the previous record's hash; the hash is keyed
//!   (HMAC under a chain key derived from the HSM audit key), so editing, deleting, inserting
//!   or reordering records is detected by [`Audit::verify`] even by an attacker who can write to
//!   the database. Seq numbers are consecutive from 1 and the primary key, so two writers that
//!   race on one chain fail instead of forking; the loser reloads the head and retries.
//! - **Checkpoints**: every [`AuditParams::checkpoint_every`] records or
//!   [`AuditParams::checkpoint_interval`], and at [`Audit::shutdown`], the head's hash is MACed
//!   *inside the HSM* with the audit key. They keep protecting the history even if the in-memory
//!   chain key leaked.
//! - **Group commit** (`writer.rs`): one task owns the chain head; [`Audit::record`] queues its
//!   record and waits; the task takes everything queued (up to [`AuditParams::max_batch`]),
//!   chains it and writes it in one transaction — one durable flush for many requests, no HSM
//!   call per record. If the transaction fails, every waiter gets an error and the head is
//!   reloaded from the store before the next batch.
//! - **Audit key**: a 256-bit generic secret in the HSM (sensitive, never extractable, sign
//!   and verify only), generated on first start; the store's `audit_key` row names it, so
//!   processes racing to create one agree on a single winner.
//!
//! **Limits** (see [`VerifyReport`]): records after the last checkpoint are protected by the
//! keyed chain only. Deleting the *last* records (and any checkpoint after them) is not
//! visible in the data alone; a running [`Audit`] notices it (it knows the head it wrote), and
//! a final checkpoint at shutdown plus exported checkpoints (held by a SIEM) bound it
//! otherwise. A record whose commit failed ambiguously (connection lost during COMMIT) may
//! exist although its request was answered `UNAVAILABLE`.

mod chain;
mod db;
mod writer;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot};

use crate::hsm::{Hsm, HsmError};
use crate::service::Clock;
use crate::store::Store;

use chain::SecretKey;
use writer::Msg;

/// How the trail is written.
#[derive(Debug, Clone)]
pub struct AuditParams {
    /// Write a checkpoint after this many records (at least 1).
    pub checkpoint_every: u32,
    /// Write a checkpoint when this much time (on the injected clock, whole seconds) has passed
    /// since the last one and records were written since.
    pub checkpoint_interval: Duration,
    /// Most records per transaction (at least 1).
    pub max_batch: usize,
}

impl Default for AuditParams {
    fn default() -> Self {
        AuditParams {
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(60),
            max_batch: 512,
        }
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Allowed and succeeded.
    Ok,
    /// Refused by authorization.
    Denied,
    /// Allowed but failed.
    Failed,
}

impl Outcome {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "ok" => Some(Outcome::Ok),
            "denied" => Some(Outcome::Denied),
            "failed" => Some(Outcome::Failed),
            _ => None,
        }
    }
}

/// How loudly a record should be reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Routine.
    Info,
    /// Needs attention (break-glass use, dangerous operations).
    High,
}

impl Severity {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::High => "high",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "info" => Some(Severity::Info),
            "high" => Some(Severity::High),
            _ => None,
        }
    }
}

/// What a caller asks to record about one request. `Debug` prints context and identifier
/// keys and labels but never their values.
#[derive(Clone)]
pub struct AuditEvent {
    /// The request id (also in the server log).
    pub request_id: String,
    /// Who asked (the authenticated principal).
    pub principal: String,
    /// Under which role.
    pub role: String,
    /// The RPC, e.g. `GenerateDataKey`.
    pub operation: String,
    /// The key the request named, if any (id, not alias).
    pub key_id: Option<String>,
    /// The key version used, if any.
    pub key_version: Option<u32>,
    /// How it ended.
    pub outcome: Outcome,
    /// The gRPC code name when it did not succeed (e.g. `PERMISSION_DENIED`).
    pub error_code: Option<String>,
    /// The encryption context: keys kept, values stored only as HMACs.
    pub context: BTreeMap<String, String>,
    /// Other identifiers, as (label, value): values stored only as HMACs.
    pub identifiers: Vec<(String, String)>,
    /// The break-glass window id, when the use happened under one.
    pub break_glass: Option<String>,
    /// How loudly to report it.
    pub severity: Severity,
    /// Non-secret metadata (approval id, batch item outcomes), stored in clear.
    pub detail: BTreeMap<String, String>,
}

impl AuditEvent {
    /// An event with no key, context, identifiers, break-glass window or detail, severity
    /// [`Severity::Info`] (or [`Severity::High`] once [`AuditEvent::break_glass`] is set
    /// through [`AuditEvent::under_break_glass`]).
    pub fn new(
        request_id: impl Into<String>,
        principal: impl Into<String>,
        role: impl Into<String>,
        operation: impl Into<String>,
        outcome: Outcome,
    ) -> Self {
        AuditEvent {
            request_id: request_id.into(),
            principal: principal.into(),
            role: role.into(),
            operation: operation.into(),
            key_id: None,
            key_version: None,
            outcome,
            error_code: None,
            context: BTreeMap::new(),
            identifiers: Vec::new(),
            break_glass: None,
            severity: Severity::Info,
            detail: BTreeMap::new(),
        }
    }

    /// Marks the event as a use under break-glass window `window`, severity high.
    pub fn under_break_glass(mut self, window: impl Into<String>) -> Self {
        self.break_glass = Some(window.into());
        self.severity = Severity::High;
        self
    }
}

impl std::fmt::Debug for AuditEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let context: Vec<&String> = self.context.keys().collect();
        let identifiers: Vec<&String> = self.identifiers.iter().map(|(label, _)| label).collect();
        f.debug_struct("AuditEvent")
            .field("request_id", &self.request_id)
            .field("principal", &self.principal)
            .field("role", &self.role)
            .field("operation", &self.operation)
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .field("outcome", &self.outcome)
            .field("error_code", &self.error_code)
            .field("context_keys (values redacted)", &context)
            .field("identifier_labels (values redacted)", &identifiers)
            .field("break_glass", &self.break_glass)
            .field("severity", &self.severity)
            .field("detail", &self.detail)
            .finish()
    }
}

/// One stored record; serializes to one JSON line for a SIEM ([`AuditRecord::to_json_line`]).
/// Hashes are lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the chain, consecutive from 1.
    pub seq: u64,
    /// When it was recorded (seconds since the Unix epoch, injected clock).
    pub time: i64,
    /// The request id.
    pub request_id: String,
    /// Who asked.
    pub principal: String,
    /// Under which role.
    pub role: String,
    /// The RPC.
    pub operation: String,
    /// The key named, if any.
    pub key_id: Option<String>,
    /// The key version used, if any.
    pub key_version: Option<u32>,
    /// How it ended.
    pub outcome: Outcome,
    /// The gRPC code name when it did not succeed.
    pub error_code: Option<String>,
    /// Context key → HMAC of the value ([`Audit::hash_identifier`]).
    pub context: BTreeMap<String, String>,
    /// (label, HMAC of the value), in the caller's order.
    pub identifiers: Vec<(String, String)>,
    /// The break-glass window id, if the use happened under one.
    pub break_glass: Option<String>,
    /// How loudly to report it.
    pub severity: Severity,
    /// Non-secret metadata.
    pub detail: BTreeMap<String, String>,
    /// The previous record's hash (64 zeros for the first).
    pub prev_hash: String,
    /// This record's chain hash.
    pub hash: String,
}

impl AuditRecord {
    /// The record as one line of JSON (no trailing newline).
    pub fn to_json_line(&self) -> String {
        // Serializing plain strings, integers and string maps cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Whether `hash` (from [`Audit::hash_identifier`]) is one of this record's context or
    /// identifier value HMACs.
    pub fn mentions(&self, hash: &str) -> bool {
        self.context.values().any(|v| v == hash) || self.identifiers.iter().any(|(_, v)| v == hash)
    }
}

/// One stored checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The last record covered.
    pub seq: u64,
    /// That record's hash.
    pub record_hash: String,
    /// When the checkpoint was written (seconds since the Unix epoch).
    pub time: i64,
    /// HMAC-SHA256 by the HSM audit key over (seq, record hash, time), hex.
    pub mac: String,
}

/// Which records [`Audit::records`] returns. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct RecordFilter {
    /// Only records made under a break-glass window.
    pub break_glass_only: bool,
    /// Only records made under this break-glass window.
    pub break_glass_window: Option<String>,
    /// Only this principal's records.
    pub principal: Option<String>,
    /// Only this operation.
    pub operation: Option<String>,
    /// Only records naming this key id.
    pub key_id: Option<String>,
    /// Only records with this outcome.
    pub outcome: Option<Outcome>,
    /// Only records whose context or identifier values include this HMAC (hex, from
    /// [`Audit::hash_identifier`]).
    pub identifier_hash: Option<String>,
    /// Only records at or after this time (seconds since the Unix epoch).
    pub since: Option<i64>,
    /// Only records before this time (seconds since the Unix epoch).
    pub until: Option<i64>,
}

impl RecordFilter {
    /// The break-glass report: every record made under a break-glass window.
    pub fn break_glass() -> Self {
        RecordFilter {
            break_glass_only: true,
            ..RecordFilter::default()
        }
    }
}

/// What [`Audit::verify`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Records checked (up to the first bad one).
    pub records: u64,
    /// Checkpoints whose MAC was checked in the HSM.
    pub checkpoints: u64,
    /// The last record's seq (0: none).
    pub last_seq: u64,
    /// The last checkpoint's seq (0: none).
    pub last_checkpoint_seq: u64,
    /// Records after the last checkpoint: protected by the keyed chain only, and a deletion
    /// of exactly these, at the end, is visible only to a running writer.
    pub unsealed: u64,
    /// The first problem, if any.
    pub first_bad: Option<BadRecord>,
}

impl VerifyReport {
    /// Whether the whole trail verified.
    pub fn is_ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// The first record that failed verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BadRecord {
    /// Its seq (for [`Problem::Missing`], the first missing seq).
    pub seq: u64,
    /// What is wrong.
    pub problem: Problem,
}

/// What is wrong with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Problem {
    /// No record has this seq although later records or checkpoints exist (deleted), or the
    /// store ends before the head this process wrote (truncated).
    Missing,
    /// A stored field cannot be decoded.
    Unreadable,
    /// Its `prev_hash` is not the previous record's hash: inserted, reordered or re-linked.
    BrokenLink,
    /// Its hash does not match its contents: edited.
    Edited,
    /// A checkpoint at this seq has a MAC the HSM audit key did not make.
    CheckpointForged,
    /// A checkpoint at this seq names another record hash than the stored record's.
    CheckpointMismatch,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Problem::Missing => "record missing (deleted or truncated)",
            Problem::Unreadable => "record unreadable",
            Problem::BrokenLink => "chain link broken (record inserted or reordered)",
            Problem::Edited => "record edited (hash does not match contents)",
            Problem::CheckpointForged => "checkpoint MAC invalid",
            Problem::CheckpointMismatch => "checkpoint does not match the record",
        })
    }
}

/// Counters of the writer, since [`Audit::open`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Records committed.
    pub records: u64,
    /// Transactions committed (each holds one or more records).
    pub flushes: u64,
    /// Batches that failed (their callers got an error).
    pub failed_flushes: u64,
    /// Batches retried because another writer had extended the chain.
    pub conflicts: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
}

/// Failures of the audit trail. A caller of [`Audit::record`] answers `UNAVAILABLE` on any of
/// them and returns nothing else.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The HSM failed (audit key, derivation or checkpoint MAC).
    #[error("audit HSM operation failed")]
    Hsm(#[source] HsmError),
    /// The store names an audit key that the token does not hold (wrong token, or the key was
    /// destroyed): the trail cannot be extended or verified.
    #[error("the audit key named by the store is not in the token")]
    KeyMissing,
    /// The store failed.
    #[error("audit store operation failed")]
    Store(#[source] sqlx::Error),
    /// The record was not written durably (the batch's transaction failed; the cause is logged
    /// once by the writer).
    #[error("audit record not written")]
    NotDurable,
    /// The writer has stopped ([`Audit::shutdown`]) or the audit trail is disabled.
    #[error("audit trail closed")]
    Closed,
    /// A stored record or checkpoint cannot be decoded.
    #[error("audit record {seq} unreadable")]
    Corrupt {
        /// Its seq.
        seq: u64,
    },
    /// Writing an export failed.
    #[error("audit export could not be written")]
    Export(#[source] std::io::Error),
    /// The software HMAC failed its known-answer test.
    #[error("audit self-test failed")]
    SelfTest,
}

impl From<HsmError> for AuditError {
    fn from(e: HsmError) -> Self {
        match e {
            HsmError::KeyMissing => AuditError::KeyMissing,
            other => AuditError::Hsm(other),
        }
    }
}

/// The audit trail. Cheap to clone; all clones share one writer.
#[derive(Clone)]
pub struct Audit {
    inner: Option<Arc<Shared>>,
}

struct Shared {
    hsm: Hsm,
    store: Store,
    clock: Arc<dyn Clock>,
    key_object_id: Vec<u8>,
    identifier_key: SecretKey,
    chain_key: Arc<SecretKey>,
    tx: mpsc::Sender<Msg>,
    stats: Arc<writer::Counters>,
    /// The highest seq this process knows to be committed (for truncation detection).
    head_seq: Arc<AtomicU64>,
}

impl Audit {
    /// Finds (or generates and registers) the HSM audit key, derives the in-memory identifier
    /// and chain keys, reads the chain head and starts the group-commit writer task.
    pub async fn open(
        hsm: Hsm,
        store: Store,
        clock: Arc<dyn Clock>,
        params: AuditParams,
    ) -> Result<Audit, AuditError> {
        if !chain::software_self_test() {
            return Err(AuditError::SelfTest);
        }
        let key_object_id = audit_key(&hsm, &store, clock.now_unix()).await?;
        let identifier_key = SecretKey::new(
            hsm.audit_hmac(key_object_id.clone(), chain::IDENTIFIER_KEY_LABEL.to_vec())
                .await?,
        );
        let chain_key = Arc::new(SecretKey::new(
            hsm.audit_hmac(key_object_id.clone(), chain::CHAIN_KEY_LABEL.to_vec())
                .await?,
        ));
        let head = db::head(store.pool()).await.map_err(AuditError::Store)?;
        let last_checkpoint = db::last_checkpoint(store.pool())
            .await
            .map_err(AuditError::Store)?;
        let params = AuditParams {
            checkpoint_every: params.checkpoint_every.max(1),
            checkpoint_interval: params.checkpoint_interval,
            max_batch: params.max_batch.max(1),
        };
        let (tx, rx) = mpsc::channel(params.max_batch.saturating_mul(4).max(64));
        let stats = Arc::new(writer::Counters::default());
        let head_seq = Arc::new(AtomicU64::new(head.map(|h| h.seq).unwrap_or(0)));
        let writer = writer::Writer::new(
            writer::Ports {
                hsm: hsm.clone(),
                store: store.clone(),
                clock: Arc::clone(&clock),
                key_object_id: key_object_id.clone(),
                chain_key: Arc::clone(&chain_key),
                stats: Arc::clone(&stats),
                head_seq: Arc::clone(&head_seq),
            },
            params,
            head,
            last_checkpoint,
        );
        tokio::spawn(writer.run(rx));
        Ok(Audit {
            inner: Some(Arc::new(Shared {
                hsm,
                store,
                clock,
                key_object_id,
                identifier_key,
                chain_key,
                tx,
                stats,
                head_seq,
            })),
        })
    }

    /// **An audit trail that records nothing.** For the benchmark's audit-off baseline ONLY:
    /// [`Audit::record`] returns `Ok(0)` without writing anything, so a server built with it
    /// breaks the fail-closed audit guarantee. Never use it in a deployed server.
    /// [`Audit::verify`], [`Audit::records`] and [`Audit::checkpoint_now`] return
    /// [`AuditError::Closed`]; [`Audit::hash_identifier`] hashes under an all-zero key.
    pub fn disabled() -> Audit {
        Audit { inner: None }
    }

    /// Whether a record can be expected to be written now: `false` while the store is known
    /// to be unreachable, so callers fail fast instead of queueing behind a dead connection.
    pub fn available(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(|shared| shared.store.reachable())
    }

    /// Whether this is [`Audit::disabled`].
    pub fn is_disabled(&self) -> bool {
        self.inner.is_none()
    }

    /// Records `event`; `Ok(seq)` means the record is durable. On `Err` the caller answers
    /// `UNAVAILABLE` and returns nothing else.
    pub async fn record(&self, event: AuditEvent) -> Result<u64, AuditError> {
        let Some(shared) = &self.inner else {
            return Ok(0);
        };
        let record = shared.prepare(event);
        let (reply, answer) = oneshot::channel();
        shared
            .tx
            .send(Msg::Record(writer::Pending { record, reply }))
            .await
            .map_err(|_| AuditError::Closed)?;
        answer.await.map_err(|_| AuditError::Closed)?
    }

    /// Hex HMAC-SHA256 of `value` under the identifier key: what records store instead of
    /// context values and identifiers. The same value gives the same hash in every record,
    /// whatever its label or context key, and after every restart.
    pub fn hash_identifier(&self, value: &str) -> String {
        match &self.inner {
            Some(shared) => shared.hash_identifier(value),
            None => hex::encode(chain::hmac_sha256(&[0; 32], &[value.as_bytes()])),
        }
    }

    /// Checks the whole trail: consecutive seqs, every chain link and hash, every checkpoint's
    /// MAC (in the HSM) and its match with the record it covers, and that the store still
    /// holds every record this process committed. Reports the first problem.
    pub async fn verify(&self) -> Result<VerifyReport, AuditError> {
        let shared = self.shared()?;
        shared.verify().await
    }

    /// Up to `limit` (at most 10 000) records with seq above `after_seq` matching `filter`, in
    /// seq order. Page by passing the last seq returned.
    pub async fn records(
        &self,
        after_seq: u64,
        limit: u32,
        filter: &RecordFilter,
    ) -> Result<Vec<AuditRecord>, AuditError> {
        let shared = self.shared()?;
        db::records(shared.store.pool(), after_seq, limit.min(10_000), filter).await
    }

    /// Up to `limit` (at most 10 000) checkpoints with seq above `after_seq`, in seq order.
    pub async fn checkpoints(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<Checkpoint>, AuditError> {
        let shared = self.shared()?;
        db::checkpoints(shared.store.pool(), after_seq, limit.min(10_000)).await
    }

    /// Writes every record matching `filter` with seq above `after_seq` to `out` as JSON lines
    /// (for a SIEM); returns how many.
    pub async fn export(
        &self,
        after_seq: u64,
        filter: &RecordFilter,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<u64, AuditError> {
        let mut after = after_seq;
        let mut count = 0;
        loop {
            let page = self.records(after, 1000, filter).await?;
            let Some(last) = page.last() else {
                return Ok(count);
            };
            after = last.seq;
            for record in &page {
                writeln!(out, "{}", record.to_json_line()).map_err(AuditError::Export)?;
                count += 1;
            }
        }
    }

    /// Flushes what is queued and writes a checkpoint at the head now, if records were written
    /// since the last one. Returns the checkpoint's seq (`None`: nothing to checkpoint).
    pub async fn checkpoint_now(&self) -> Result<Option<u64>, AuditError> {
        let shared = self.shared()?;
        let (reply, answer) = oneshot::channel();
        shared
            .tx
            .send(Msg::Checkpoint(reply))
            .await
            .map_err(|_| AuditError::Closed)?;
        answer.await.map_err(|_| AuditError::Closed)?
    }

    /// Flushes what is queued, writes a final checkpoint and stops the writer: later
    /// [`Audit::record`] calls (from any clone) fail with [`AuditError::Closed`].
    pub async fn shutdown(&self) {
        let Some(shared) = &self.inner else {
            return;
        };
        let (reply, answer) = oneshot::channel();
        if shared.tx.send(Msg::Shutdown(reply)).await.is_ok() {
            let _ = answer.await;
        }
    }

    /// The writer's counters.
    pub fn stats(&self) -> AuditStats {
        self.inner
            .as_ref()
            .map(|shared| shared.stats.snapshot())
            .unwrap_or_default()
    }

    fn shared(&self) -> Result<&Shared, AuditError> {
        self.inner.as_deref().ok_or(AuditError::Closed)
    }
}

impl Shared {
    fn hash_identifier(&self, value: &str) -> String {
        hex::encode(self.identifier_key.mac(&[value.as_bytes()]))
    }

    /// The record for `event`, values replaced by HMACs, not yet chained.
    fn prepare(&self, event: AuditEvent) -> AuditRecord {
        AuditRecord {
            seq: 0,
            time: self.clock.now_unix(),
            request_id: event.request_id,
            principal: event.principal,
            role: event.role,
            operation: event.operation,
            key_id: event.key_id,
            key_version: event.key_version,
            outcome: event.outcome,
            error_code: event.error_code,
            context: event
                .context
                .into_iter()
                .map(|(k, v)| {
                    let hash = self.hash_identifier(&v);
                    (k, hash)
                })
                .collect(),
            identifiers: event
                .identifiers
                .into_iter()
                .map(|(label, v)| {
                    let hash = self.hash_identifier(&v);
                    (label, hash)
                })
                .collect(),
            break_glass: event.break_glass,
            severity: event.severity,
            detail: event.detail,
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    async fn verify(&self) -> Result<VerifyReport, AuditError> {
        // Everything this process committed before now must be found.
        let committed = self.head_seq.load(Ordering::SeqCst);
        let checkpoints = db::all_checkpoints(self.store.pool()).await?;
        let mut report = VerifyReport {
            records: 0,
            checkpoints: 0,
            last_seq: 0,
            last_checkpoint_seq: checkpoints.keys().next_back().copied().unwrap_or(0),
            unsealed: 0,
            first_bad: None,
        };
        let bad = |report: &mut VerifyReport, seq, problem| {
            report.first_bad = Some(BadRecord { seq, problem });
        };
        let mut prev = chain::GENESIS;
        let mut expected = 1u64;
        'pages: loop {
            let page = db::raw_records(self.store.pool(), expected - 1, 1000).await?;
            if page.is_empty() {
                break;
            }
            for row in page {
                let record = match row {
                    Ok(record) => record,
                    // A row whose seq is readable but skips ahead: the gap comes first.
                    Err(seq) if seq > expected => {
                        bad(&mut report, expected, Problem::Missing);
                        break 'pages;
                    }
                    Err(_) => {
                        bad(&mut report, expected, Problem::Unreadable);
                        break 'pages;
                    }
                };
                if record.seq != expected {
                    bad(&mut report, expected, Problem::Missing);
                    break 'pages;
                }
                let Ok(stored_prev) = hex32(&record.prev_hash) else {
                    bad(&mut report, expected, Problem::Unreadable);
                    break 'pages;
                };
                let Ok(stored_hash) = hex32(&record.hash) else {
                    bad(&mut report, expected, Problem::Unreadable);
                    break 'pages;
                };
                if !bool::from(stored_prev.ct_eq(&prev)) {
                    bad(&mut report, expected, Problem::BrokenLink);
                    break 'pages;
                }
                let hash = chain::record_hash(&self.chain_key, &prev, &record);
                if !bool::from(hash.ct_eq(&stored_hash)) {
                    bad(&mut report, expected, Problem::Edited);
                    break 'pages;
                }
                if let Some(checkpoint) = checkpoints.get(&record.seq) {
                    report.checkpoints += 1;
                    if let Some(problem) = self.check_checkpoint(checkpoint, &hash).await? {
                        bad(&mut report, expected, problem);
                        break 'pages;
                    }
                }
                report.records += 1;
                report.last_seq = record.seq;
                prev = hash;
                expected += 1;
            }
        }
        if report.first_bad.is_none() {
            // A checkpoint (or this process's own head) beyond the last record: the end of the
            // trail was deleted.
            let beyond = checkpoints.keys().next_back().copied().unwrap_or(0);
            if beyond >= expected || committed >= expected {
                bad(&mut report, expected, Problem::Missing);
            }
        }
        report.unsealed = report.last_seq.saturating_sub(report.last_checkpoint_seq);
        Ok(report)
    }

    /// Checks one checkpoint against the record hash recomputed at its seq.
    async fn check_checkpoint(
        &self,
        checkpoint: &Checkpoint,
        record_hash: &[u8; 32],
    ) -> Result<Option<Problem>, AuditError> {
        let (Ok(claimed_hash), Ok(mac)) = (hex32(&checkpoint.record_hash), hex32(&checkpoint.mac))
        else {
            return Ok(Some(Problem::CheckpointForged));
        };
        let expected = self
            .hsm
            .audit_hmac(
                self.key_object_id.clone(),
                chain::checkpoint_input(checkpoint.seq, &claimed_hash, checkpoint.time),
            )
            .await?;
        if !bool::from(expected.ct_eq(&mac)) {
            return Ok(Some(Problem::CheckpointForged));
        }
        if !bool::from(claimed_hash.ct_eq(record_hash)) {
            return Ok(Some(Problem::CheckpointMismatch));
        }
        Ok(None)
    }
}

/// The HSM `CKA_ID` of this store's audit key: the registered one, or a freshly generated one
/// registered now. Two processes racing here agree: the first registration wins, the loser
/// destroys its own key.
async fn audit_key(hsm: &Hsm, store: &Store, now: i64) -> Result<Vec<u8>, AuditError> {
    let pool = store.pool();
    if let Some(id) = db::audit_key(pool).await? {
        return Ok(id);
    }
    let mut candidate = crate::hsm::AUDIT_KEY_LABEL.as_bytes().to_vec();
    candidate.push(b':');
    candidate.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    hsm.generate_audit_key(candidate.clone()).await?;
    db::register_audit_key(pool, &candidate, now).await?;
    let registered = db::audit_key(pool).await?.ok_or(AuditError::KeyMissing)?;
    if registered != candidate {
        tracing::info!("another process registered the audit key first; using it");
        if let Err(e) = hsm.destroy_audit_key(candidate).await {
            tracing::warn!(error = %e, "could not destroy the unused audit key");
        }
    }
    Ok(registered)
}

fn hex32(s: &str) -> Result<[u8; 32], ()> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| ())?;
    Ok(out)
}
