//! The group-commit writer: one task owns the chain head. Each turn it takes the first queued
//! record and everything else already queued (up to `max_batch`), chains them, writes them in
//! one transaction, and answers every waiter only after the commit returned. The head advances
//! only after a commit; after any failure it is reloaded from the store before the next batch
//! (a commit that failed ambiguously may have landed). A batch that loses a race with another
//! writer on the same chain (a seq primary-key conflict) is re-chained on the new head and
//! retried. Checkpoints are written between batches, never while a caller waits on them.
//!
//! **Several writers on one chain** (replicas sharing a store). Alone, a writer appends
//! optimistically: one `INSERT` per batch on the head it knows. Once it has lost a race it
//! switches to *contended mode* for [`CONTENDED_FOR`]: each batch is a transaction that first
//! takes the chain lock ([`db::lock_chain`]: a PostgreSQL advisory lock, SQLite's write lock),
//! then reads the head, chains on it and appends — writers take turns instead of racing, so a
//! batch never fails because others keep winning. The cost is three more round trips per
//! batch, paid only while other writers are active.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::chain::{self, SecretKey};
use super::{db, AuditError, AuditParams, AuditRecord, AuditStats, Checkpoint};
use crate::hsm::Hsm;
use crate::service::Clock;
use crate::store::Store;

/// How many times a batch is re-chained after losing a race with another writer.
const MAX_CONFLICT_RETRIES: usize = 8;
/// How long a writer that lost a race appends under the chain lock.
const CONTENDED_FOR: Duration = Duration::from_secs(30);

/// What the writer is asked to do.
// Records are nearly every message: boxing them would only add an allocation per request.
#[allow(clippy::large_enum_variant)]
pub(super) enum Msg {
    /// Append a record.
    Record(Pending),
    /// Write a checkpoint now (after what is queued before this message).
    Checkpoint(oneshot::Sender<Result<Option<u64>, AuditError>>),
    /// Final checkpoint, then stop.
    Shutdown(oneshot::Sender<()>),
}

/// A record waiting for its batch's commit.
pub(super) struct Pending {
    pub record: AuditRecord,
    pub reply: oneshot::Sender<Result<u64, AuditError>>,
}

/// The writer's counters, shared with [`super::Audit::stats`].
#[derive(Default)]
pub(super) struct Counters {
    records: AtomicU64,
    flushes: AtomicU64,
    failed_flushes: AtomicU64,
    conflicts: AtomicU64,
    checkpoints: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> AuditStats {
        AuditStats {
            records: self.records.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
            failed_flushes: self.failed_flushes.load(Ordering::Relaxed),
            conflicts: self.conflicts.load(Ordering::Relaxed),
            checkpoints: self.checkpoints.load(Ordering::Relaxed),
        }
    }
}

/// The last committed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Head {
    pub seq: u64,
    pub hash: [u8; 32],
}

/// The last checkpoint.
#[derive(Debug, Clone, Copy)]
pub(super) struct LastCheckpoint {
    pub seq: u64,
    pub time: i64,
}

/// What the writer works with.
pub(super) struct Ports {
    pub hsm: Hsm,
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub key_object_id: Vec<u8>,
    pub chain_key: Arc<SecretKey>,
    pub stats: Arc<Counters>,
    pub head_seq: Arc<AtomicU64>,
}

pub(super) struct Writer {
    ports: Ports,
    params: AuditParams,
    /// `None`: unknown (after a failure); reloaded before the next batch.
    head: Option<Option<Head>>,
    last_checkpoint: LastCheckpoint,
    conn: Option<sqlx::pool::PoolConnection<sqlx::Any>>,
    /// [`Store::outages`] when `conn` was taken.
    conn_outages: u64,
    /// Until when batches are appended under the chain lock (another writer was seen).
    contended_until: Option<tokio::time::Instant>,
}

impl Writer {
    pub(super) fn new(
        ports: Ports,
        params: AuditParams,
        head: Option<Head>,
        last_checkpoint: Option<LastCheckpoint>,
    ) -> Self {
        let now = ports.clock.now_unix();
        Writer {
            ports,
            params,
            head: Some(head),
            // Without a checkpoint yet, the interval counts from start-up.
            last_checkpoint: last_checkpoint.unwrap_or(LastCheckpoint { seq: 0, time: now }),
            conn: None,
            conn_outages: 0,
            contended_until: None,
        }
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let period = self
            .params
            .checkpoint_interval
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let msg = tokio::select! {
                msg = rx.recv() => msg,
                _ = tick.tick() => {
                    self.maybe_checkpoint(false).await;
                    continue;
                }
            };
            let Some(msg) = msg else {
                // Every `Audit` clone is gone: seal what was written.
                self.maybe_checkpoint(true).await;
                return;
            };
            let control = match msg {
                Msg::Record(first) => {
                    let mut batch = vec![first];
                    let mut control = None;
                    while batch.len() < self.params.max_batch {
                        match rx.try_recv() {
                            Ok(Msg::Record(p)) => batch.push(p),
                            Ok(other) => {
                                control = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.flush(batch).await;
                    self.maybe_checkpoint(false).await;
                    control
                }
                other => Some(other),
            };
            match control {
                None | Some(Msg::Record(_)) => {}
                Some(Msg::Checkpoint(reply)) => {
                    let _ = reply.send(self.checkpoint().await);
                }
                Some(Msg::Shutdown(reply)) => {
                    self.maybe_checkpoint(true).await;
                    rx.close();
                    // Answer whatever was queued behind the shutdown: closed.
                    while let Ok(msg) = rx.try_recv() {
                        if let Msg::Record(p) = msg {
                            let _ = p.reply.send(Err(AuditError::Closed));
                        }
                    }
                    let _ = reply.send(());
                    return;
                }
            }
        }
    }

    /// Chains `batch` on the head and commits it in one transaction; answers every waiter.
    async fn flush(&mut self, mut batch: Vec<Pending>) {
        let stats = Arc::clone(&self.ports.stats);
        if self.conn_outages != self.ports.store.outages() {
            // The store was found unreachable since this connection was taken (an outage, a
            // restart): it is most likely dead, and the first batch after the store returns
            // would fail on it. Start from a fresh one. (Retrying a failed append instead
            // could write a batch twice when its commit landed but the answer was lost.)
            self.conn = None;
            self.head = None;
        }
        for _ in 0..=MAX_CONFLICT_RETRIES {
            let contended = self
                .contended_until
                .is_some_and(|until| tokio::time::Instant::now() < until);
            let attempt = if contended {
                tokio::time::timeout(WRITE_TIMEOUT, self.append_locked(&mut batch)).await
            } else {
                tokio::time::timeout(WRITE_TIMEOUT, self.append(&mut batch)).await
            };
            let written = attempt.unwrap_or_else(|_| {
                // The store stopped answering mid-write (a partition without a reset, a frozen
                // host): the connection is closed rather than returned to the pool half-way
                // through a statement, and the batch fails like any unreachable store's.
                if let Some(conn) = self.conn.take() {
                    drop(conn.detach());
                }
                Err(sqlx::Error::PoolTimedOut)
            });
            match written {
                Ok(head) => {
                    self.ports.store.set_reachable(true);
                    self.set_head(Some(head));
                    stats.flushes.fetch_add(1, Ordering::Relaxed);
                    stats
                        .records
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    for p in batch {
                        let _ = p.reply.send(Ok(p.record.seq));
                    }
                    return;
                }
                Err(e) if is_conflict(&e) => {
                    // Another writer extended the chain: re-chain on its head, and take turns
                    // with it from now on.
                    stats.conflicts.fetch_add(1, Ordering::Relaxed);
                    if !contended {
                        tracing::info!("audit: another writer shares the chain; appending under the chain lock");
                    }
                    self.contended_until = Some(tokio::time::Instant::now() + CONTENDED_FOR);
                    self.head = None;
                }
                Err(e) => {
                    if crate::store::is_unreachable(&e) {
                        self.ports.store.set_reachable(false);
                    }
                    // A connection that failed mid-transaction is not reused.
                    self.conn = None;
                    tracing::error!(error = %e, records = batch.len(), "audit: batch not written");
                    self.head = None;
                    break;
                }
            }
        }
        self.head = None;
        stats.failed_flushes.fetch_add(1, Ordering::Relaxed);
        for p in batch {
            let _ = p.reply.send(Err(AuditError::NotDurable));
        }
    }

    /// Appends `batch` on the head this writer knows (reloaded first if unknown): one
    /// `INSERT`. Another writer's append since then is a primary-key conflict.
    async fn append(&mut self, batch: &mut [Pending]) -> Result<Head, sqlx::Error> {
        let head = match self.head {
            Some(head) => head,
            None => {
                let head = db::head(self.ports.store.pool()).await?;
                self.set_head(head);
                head
            }
        };
        let new_head = chain_batch(&self.ports.chain_key, batch, head);
        let records: Vec<&AuditRecord> = batch.iter().map(|p| &p.record).collect();
        let backend = self.ports.store.backend();
        let conn = self.connection().await?;
        db::insert_records(conn, backend, &records).await?;
        Ok(new_head)
    }

    /// Contended mode: in one transaction, takes the chain lock, reads the head, chains
    /// `batch` on it and appends. Only a writer still in optimistic mode can conflict.
    async fn append_locked(&mut self, batch: &mut [Pending]) -> Result<Head, sqlx::Error> {
        use sqlx::Connection as _;
        let backend = self.ports.store.backend();
        let chain_key = Arc::clone(&self.ports.chain_key);
        // Borrowed, not taken: if `flush` gives up waiting, it still holds the connection and
        // closes it.
        let conn = self.connection().await?;
        let result = async {
            let mut tx = conn.begin().await?;
            let appended = async {
                db::lock_chain(&mut tx, backend).await?;
                let head = db::head_on(&mut tx).await?;
                let new_head = chain_batch(&chain_key, batch, head);
                let records: Vec<&AuditRecord> = batch.iter().map(|p| &p.record).collect();
                db::insert_records(&mut tx, backend, &records).await?;
                Ok::<_, sqlx::Error>(new_head)
            }
            .await;
            match appended {
                Ok(new_head) => {
                    tx.commit().await?;
                    Ok(new_head)
                }
                Err(e) => {
                    // Now, not at the connection's next use: the chain lock must not outlive
                    // a failed append.
                    let _ = tx.rollback().await;
                    Err(e)
                }
            }
        }
        .await;
        result
    }

    /// The writer's own connection, taken from the pool once and kept: its statement cache
    /// stays warm and no batch waits for a free pool connection.
    async fn connection(&mut self) -> Result<&mut sqlx::AnyConnection, sqlx::Error> {
        if self.conn.is_none() {
            self.conn_outages = self.ports.store.outages();
            self.conn = Some(acquire(&self.ports.store).await?);
        }
        match self.conn.as_mut() {
            Some(conn) => Ok(&mut **conn),
            None => Err(sqlx::Error::PoolClosed),
        }
    }

    fn set_head(&mut self, head: Option<Head>) {
        self.head = Some(head);
        if let Some(h) = head {
            self.ports.head_seq.fetch_max(h.seq, Ordering::SeqCst);
        }
    }

    /// Writes a checkpoint when one is due (`force`: whenever records were written since the
    /// last one). Failures are logged and retried at the next opportunity: records stay
    /// protected by the chain meanwhile.
    async fn maybe_checkpoint(&mut self, force: bool) {
        let Some(Some(head)) = self.head else {
            return;
        };
        if head.seq <= self.last_checkpoint.seq {
            return;
        }
        let now = self.ports.clock.now_unix();
        let interval = i64::try_from(self.params.checkpoint_interval.as_secs()).unwrap_or(i64::MAX);
        let due = force
            || head.seq - self.last_checkpoint.seq >= u64::from(self.params.checkpoint_every)
            || now.saturating_sub(self.last_checkpoint.time) >= interval;
        if due {
            if let Err(e) = self.write_checkpoint(head, now).await {
                tracing::warn!(error = %e, "audit: checkpoint not written; will retry");
            }
        }
    }

    /// Writes a checkpoint at the head now if records were written since the last one.
    async fn checkpoint(&mut self) -> Result<Option<u64>, AuditError> {
        if self.head.is_none() {
            let head = db::head(self.ports.store.pool())
                .await
                .map_err(AuditError::Store)?;
            self.set_head(head);
        }
        let Some(Some(head)) = self.head else {
            return Ok(None);
        };
        if head.seq <= self.last_checkpoint.seq {
            return Ok(None);
        }
        let now = self.ports.clock.now_unix();
        self.write_checkpoint(head, now).await?;
        Ok(Some(head.seq))
    }

    async fn write_checkpoint(&mut self, head: Head, now: i64) -> Result<(), AuditError> {
        let mac = self
            .ports
            .hsm
            .audit_hmac(
                self.ports.key_object_id.clone(),
                chain::checkpoint_input(head.seq, &head.hash, now),
            )
            .await?;
        db::insert_checkpoint(
            self.ports.store.pool(),
            &Checkpoint {
                seq: head.seq,
                record_hash: hex::encode(head.hash),
                time: now,
                mac: hex::encode(mac),
            },
        )
        .await?;
        self.last_checkpoint = LastCheckpoint {
            seq: head.seq,
            time: now,
        };
        self.ports.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The longest one append may take (statements and commit): longer than SQLite's 5 s busy
/// timeout, far shorter than TCP's retransmission timeout, which a store that stopped
/// answering without closing the connection would otherwise hold every waiting request to.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the writer waits for a connection: its batch's callers are waiting too, and a
/// store that gives none in this time is treated as unreachable (requests then fail fast).
const WRITER_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);

async fn acquire(store: &Store) -> Result<sqlx::pool::PoolConnection<sqlx::Any>, sqlx::Error> {
    match tokio::time::timeout(WRITER_ACQUIRE_TIMEOUT, store.pool().acquire()).await {
        Ok(conn) => conn,
        Err(_) => Err(sqlx::Error::PoolTimedOut),
    }
}

/// Chains `batch` on `head` (seq, previous hash, hash of each record); returns the new head.
fn chain_batch(chain_key: &SecretKey, batch: &mut [Pending], head: Option<Head>) -> Head {
    let mut prev = head.map(|h| h.hash).unwrap_or(chain::GENESIS);
    let mut seq = head.map(|h| h.seq).unwrap_or(0);
    for pending in batch {
        seq += 1;
        let r = &mut pending.record;
        r.seq = seq;
        let hash = chain::record_hash(chain_key, &prev, r);
        r.prev_hash = hex::encode(prev);
        r.hash = hex::encode(hash);
        prev = hash;
    }
    Head { seq, hash: prev }
}

fn is_conflict(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}
