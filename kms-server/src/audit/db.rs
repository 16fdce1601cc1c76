//! The audit tables (migration 6), through the store's pool: the same SQL on SQLite and
//! PostgreSQL, each `$n` placeholder appearing once and in order. Hashes, MACs and the audit
//! key's `CKA_ID` are lowercase hex; context, identifiers and detail are JSON text.

use std::collections::BTreeMap;

use crate::store::Backend;
use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row};

use super::writer::{Head, LastCheckpoint};
use super::{AuditError, AuditRecord, Checkpoint, Outcome, RecordFilter, Severity};

/// Columns of `audit_records`, in insertion order.
const COLUMNS: &str =
    "seq, recorded_at, request_id, principal, role, operation, key_id, key_version, \
     outcome, error_code, context, identifiers, break_glass, severity, detail, prev_hash, hash";
const COLUMN_COUNT: usize = 17;
/// Most rows per `INSERT`: 512 × 17 = 8,704 parameters, within SQLite's limit (32,766 since
/// 3.32; the bundled library is newer) and PostgreSQL's (65,535).
const MAX_ROWS_PER_STATEMENT: usize = 512;

/// The registered audit key's `CKA_ID`.
pub(super) async fn audit_key(pool: &AnyPool) -> Result<Option<Vec<u8>>, AuditError> {
    let row = sqlx::query("SELECT hsm_object_id FROM audit_key WHERE id = 1")
        .fetch_optional(pool)
        .await
        .map_err(AuditError::Store)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let id: String = row.try_get("hsm_object_id").map_err(AuditError::Store)?;
    hex::decode(id)
        .map(Some)
        .map_err(|_| AuditError::Corrupt { seq: 0 })
}

/// Registers `object_id` as the audit key unless one is registered already.
pub(super) async fn register_audit_key(
    pool: &AnyPool,
    object_id: &[u8],
    now: i64,
) -> Result<(), AuditError> {
    sqlx::query(
        "INSERT INTO audit_key (id, hsm_object_id, created_at) VALUES (1, $1, $2)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(hex::encode(object_id))
    .bind(now)
    .execute(pool)
    .await
    .map_err(AuditError::Store)?;
    Ok(())
}

/// The last record's seq and hash.
pub(super) async fn head(pool: &AnyPool) -> Result<Option<Head>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    head_on(&mut conn).await
}

/// Like [`head`], on `conn` (inside the writer's transaction when it holds the chain lock).
pub(super) async fn head_on(conn: &mut sqlx::AnyConnection) -> Result<Option<Head>, sqlx::Error> {
    let row = sqlx::query("SELECT seq, hash FROM audit_records ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let seq: i64 = row.try_get("seq")?;
    let hash: String = row.try_get("hash")?;
    let mut bytes = [0u8; 32];
    // An unreadable head hash is chained on as-is would be wrong; refuse to extend it.
    hex::decode_to_slice(&hash, &mut bytes).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    Ok(Some(Head {
        seq: seq as u64,
        hash: bytes,
    }))
}

/// The last checkpoint's seq and time.
pub(super) async fn last_checkpoint(pool: &AnyPool) -> Result<Option<LastCheckpoint>, sqlx::Error> {
    let row =
        sqlx::query("SELECT seq, recorded_at FROM audit_checkpoints ORDER BY seq DESC LIMIT 1")
            .fetch_optional(pool)
            .await?;
    row.map(|row| {
        Ok(LastCheckpoint {
            seq: row.try_get::<i64, _>("seq")? as u64,
            time: row.try_get("recorded_at")?,
        })
    })
    .transpose()
}

/// Inserts `records` atomically on `conn` (the writer's own connection): one multi-row
/// `INSERT` — a single statement is its own transaction, so a batch costs one round trip to
/// the database and one durable commit — or, for a batch larger than one statement holds,
/// several inside one transaction.
pub(super) async fn insert_records(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    records: &[&AuditRecord],
) -> Result<(), sqlx::Error> {
    use sqlx::Connection as _;
    if records.len() <= MAX_ROWS_PER_STATEMENT {
        let sql = insert_sql(records.len(), backend);
        return insert_statement(&sql, records)
            .execute(&mut *conn)
            .await
            .map(drop);
    }
    let mut tx = conn.begin().await?;
    for chunk in records.chunks(MAX_ROWS_PER_STATEMENT) {
        let sql = insert_sql(chunk.len(), backend);
        insert_statement(&sql, chunk).execute(&mut *tx).await?;
    }
    tx.commit().await
}

/// The PostgreSQL advisory lock writers of one chain hold, once they have seen another
/// writer, while they read the head and append (see the writer's contended mode).
const CHAIN_LOCK: i64 = 7_243_012;

/// Inside `conn`'s open transaction: waits until no other writer of the chain is appending.
/// PostgreSQL: a transaction advisory lock; SQLite: a first write, which takes the database's
/// single write lock (held until commit).
pub(super) async fn lock_chain(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
) -> Result<(), sqlx::Error> {
    match backend {
        Backend::Postgres => sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(CHAIN_LOCK)
            .execute(&mut *conn)
            .await
            .map(drop),
        Backend::Sqlite => sqlx::query("UPDATE audit_key SET id = id WHERE id = 1")
            .execute(&mut *conn)
            .await
            .map(drop),
    }
}

/// The text of an `INSERT` of `rows` rows. Statements are cached per connection by their
/// text, so a steady load reuses the few batch sizes it produces.
///
/// SQLite gets anonymous `?` parameters: for numbered ones (`$n`) sqlx asks SQLite each
/// parameter's name, a linear search in SQLite, so binding a statement with P numbered
/// parameters costs O(P²) — with hundreds of parameters per batch that was a third of the
/// writer's time (measured with `perf`).
fn insert_sql(rows: usize, backend: Backend) -> String {
    let mut sql = String::with_capacity(40 + rows * COLUMN_COUNT * 6);
    sql.push_str("INSERT INTO audit_records (");
    sql.push_str(COLUMNS);
    sql.push_str(") VALUES ");
    let mut n = 0;
    for i in 0..rows {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..COLUMN_COUNT {
            if c > 0 {
                sql.push_str(", ");
            }
            n += 1;
            match backend {
                Backend::Sqlite => sql.push('?'),
                Backend::Postgres => {
                    sql.push('$');
                    sql.push_str(&n.to_string());
                }
            }
        }
        sql.push(')');
    }
    sql
}

/// `sql` (from [`insert_sql`]) bound to `chunk`'s rows.
fn insert_statement<'q>(
    sql: &'q str,
    chunk: &[&'q AuditRecord],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    let mut query = sqlx::query(sql);
    for r in chunk {
        query = query
            .bind(r.seq as i64)
            .bind(r.time)
            .bind(r.request_id.as_str())
            .bind(r.principal.as_str())
            .bind(r.role.as_str())
            .bind(r.operation.as_str())
            .bind(r.key_id.as_deref())
            .bind(r.key_version.map(i64::from))
            .bind(r.outcome.as_str())
            .bind(r.error_code.as_deref())
            .bind(json(&r.context))
            .bind(json(&r.identifiers))
            .bind(r.break_glass.as_deref())
            .bind(r.severity.as_str())
            .bind(json(&r.detail))
            .bind(r.prev_hash.as_str())
            .bind(r.hash.as_str());
    }
    query
}

/// Inserts a checkpoint (nothing if another writer already checkpointed this seq).
pub(super) async fn insert_checkpoint(pool: &AnyPool, c: &Checkpoint) -> Result<(), AuditError> {
    sqlx::query(
        "INSERT INTO audit_checkpoints (seq, record_hash, recorded_at, mac) VALUES ($1, $2, $3, $4)
         ON CONFLICT (seq) DO NOTHING",
    )
    .bind(c.seq as i64)
    .bind(c.record_hash.clone())
    .bind(c.time)
    .bind(c.mac.clone())
    .execute(pool)
    .await
    .map_err(AuditError::Store)?;
    Ok(())
}

/// Every checkpoint, by seq.
pub(super) async fn all_checkpoints(
    pool: &AnyPool,
) -> Result<BTreeMap<u64, Checkpoint>, AuditError> {
    let mut out = BTreeMap::new();
    let mut after = 0;
    loop {
        let page = checkpoints(pool, after, 10_000).await?;
        let Some(last) = page.last() else {
            return Ok(out);
        };
        after = last.seq;
        out.extend(page.into_iter().map(|c| (c.seq, c)));
    }
}

/// Up to `limit` checkpoints after `after`.
pub(super) async fn checkpoints(
    pool: &AnyPool,
    after: u64,
    limit: u32,
) -> Result<Vec<Checkpoint>, AuditError> {
    let rows = sqlx::query(
        "SELECT seq, record_hash, recorded_at, mac FROM audit_checkpoints
         WHERE seq > $1 ORDER BY seq LIMIT $2",
    )
    .bind(after as i64)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await
    .map_err(AuditError::Store)?;
    rows.iter()
        .map(|row| {
            let decoded = (|| -> Result<Checkpoint, sqlx::Error> {
                Ok(Checkpoint {
                    seq: row.try_get::<i64, _>("seq")? as u64,
                    record_hash: row.try_get("record_hash")?,
                    time: row.try_get("recorded_at")?,
                    mac: row.try_get("mac")?,
                })
            })();
            decoded.map_err(|_| AuditError::Corrupt {
                seq: row.try_get::<i64, _>("seq").unwrap_or(0) as u64,
            })
        })
        .collect()
}

/// Up to `limit` records after `after` in seq order, each decoded or the seq (0 if even that
/// is unreadable) of a row that cannot be.
pub(super) async fn raw_records(
    pool: &AnyPool,
    after: u64,
    limit: u32,
) -> Result<Vec<Result<AuditRecord, u64>>, AuditError> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM audit_records WHERE seq > $1 ORDER BY seq LIMIT $2"
    ))
    .bind(after as i64)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await
    .map_err(AuditError::Store)?;
    Ok(rows.iter().map(decode).collect())
}

/// Up to `limit` records after `after` matching `filter`, in seq order.
pub(super) async fn records(
    pool: &AnyPool,
    after: u64,
    limit: u32,
    filter: &RecordFilter,
) -> Result<Vec<AuditRecord>, AuditError> {
    let mut sql = format!("SELECT {COLUMNS} FROM audit_records WHERE seq > $1");
    let mut n = 1;
    let mut binds: Vec<Bind> = vec![Bind::Int(after as i64)];
    let mut cond = |sql: &mut String, template: &str, values: Vec<Bind>| {
        let mut part = template.to_string();
        for value in values {
            n += 1;
            part = part.replacen("{}", &format!("${n}"), 1);
            binds.push(value);
        }
        sql.push_str(" AND ");
        sql.push_str(&part);
    };
    if filter.break_glass_only {
        cond(&mut sql, "break_glass IS NOT NULL", vec![]);
    }
    if let Some(w) = &filter.break_glass_window {
        cond(&mut sql, "break_glass = {}", vec![Bind::Text(w.clone())]);
    }
    if let Some(p) = &filter.principal {
        cond(&mut sql, "principal = {}", vec![Bind::Text(p.clone())]);
    }
    if let Some(o) = &filter.operation {
        cond(&mut sql, "operation = {}", vec![Bind::Text(o.clone())]);
    }
    if let Some(k) = &filter.key_id {
        cond(&mut sql, "key_id = {}", vec![Bind::Text(k.clone())]);
    }
    if let Some(o) = filter.outcome {
        cond(
            &mut sql,
            "outcome = {}",
            vec![Bind::Text(o.as_str().into())],
        );
    }
    if let Some(h) = &filter.identifier_hash {
        // Values are stored as JSON strings: match the quoted hash exactly.
        let pattern = format!("%\"{}\"%", h.to_ascii_lowercase());
        cond(
            &mut sql,
            "(context LIKE {} OR identifiers LIKE {})",
            vec![Bind::Text(pattern.clone()), Bind::Text(pattern)],
        );
    }
    if let Some(t) = filter.since {
        cond(&mut sql, "recorded_at >= {}", vec![Bind::Int(t)]);
    }
    if let Some(t) = filter.until {
        cond(&mut sql, "recorded_at < {}", vec![Bind::Int(t)]);
    }
    n += 1;
    sql.push_str(&format!(" ORDER BY seq LIMIT ${n}"));
    binds.push(Bind::Int(i64::from(limit)));
    let mut query = sqlx::query(&sql);
    for b in binds {
        query = match b {
            Bind::Int(v) => query.bind(v),
            Bind::Text(v) => query.bind(v),
        };
    }
    let rows = query.fetch_all(pool).await.map_err(AuditError::Store)?;
    rows.iter()
        .map(|row| decode(row).map_err(|seq| AuditError::Corrupt { seq }))
        .collect()
}

enum Bind {
    Int(i64),
    Text(String),
}

fn json<T: serde::Serialize>(value: &T) -> String {
    // Maps and lists of strings always serialize.
    serde_json::to_string(value).unwrap_or_default()
}

/// Decodes one row, strictly: unknown outcome or severity spellings, malformed JSON, a
/// negative seq or version are all unreadable.
fn decode(row: &AnyRow) -> Result<AuditRecord, u64> {
    let seq = row
        .try_get::<i64, _>("seq")
        .ok()
        .and_then(|s| u64::try_from(s).ok())
        .ok_or(0u64)?;
    let bad = |_| seq;
    let text = |name: &str| row.try_get::<String, _>(name).map_err(bad);
    let opt_text = |name: &str| row.try_get::<Option<String>, _>(name).map_err(bad);
    let identifiers: Vec<(String, String)> =
        serde_json::from_str(&text("identifiers")?).map_err(|_| seq)?;
    let key_version = row
        .try_get::<Option<i64>, _>("key_version")
        .map_err(bad)?
        .map(u32::try_from)
        .transpose()
        .map_err(|_| seq)?;
    let context: BTreeMap<String, String> =
        serde_json::from_str(&text("context")?).map_err(|_| seq)?;
    let detail: BTreeMap<String, String> =
        serde_json::from_str(&text("detail")?).map_err(|_| seq)?;
    Ok(AuditRecord {
        seq,
        time: row.try_get("recorded_at").map_err(bad)?,
        request_id: text("request_id")?,
        principal: text("principal")?,
        role: text("role")?,
        operation: text("operation")?,
        key_id: opt_text("key_id")?,
        key_version,
        outcome: Outcome::parse(&text("outcome")?).ok_or(seq)?,
        error_code: opt_text("error_code")?,
        context,
        identifiers,
        break_glass: opt_text("break_glass")?,
        severity: Severity::parse(&text("severity")?).ok_or(seq)?,
        detail,
        prev_hash: text("prev_hash")?,
        hash: text("hash")?,
    })
}
