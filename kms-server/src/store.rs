//! The store port: key metadata in SQLite (embedded default) or PostgreSQL (shared, for high
//! availability), behind one interface. The database is chosen by the URL's scheme; the domain
//! never knows which is behind it.
//!
//! Both run through `sqlx`'s `Any` driver with the same SQL (`$n` placeholders are understood
//! by both, but each placeholder must appear exactly once: SQLite binds them by order of
//! appearance, so a repeated `$1` silently takes the next value); only the migrations differ, and they are embedded and run at start-up. SQLite runs
//! in WAL mode with `synchronous=FULL`, so a commit is durable when it returns.
//!
//! Nothing secret is stored: key material stays in the HSM; rows hold ids, names and states.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};
use uuid::Uuid;

use crate::error::KmsError;

/// The longest a query waits for a pool connection. A request that cannot get one within
/// this fails with `UNAVAILABLE` (and can be retried on another replica) rather than queueing
/// longer: connections are held for milliseconds, so a longer wait means the database is
/// unreachable or the pool far too small.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite:` URLs.
    Sqlite,
    /// `postgres:` / `postgresql:` URLs.
    Postgres,
}

impl Backend {
    /// The backend named by a database URL, if any.
    pub fn of_url(url: &str) -> Option<Self> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }
}

/// Whether a key may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Usable for every operation.
    Enabled,
    /// Usable for nothing but description.
    Disabled,
    /// Scheduled for destruction; behaves as disabled; can be cancelled (back to disabled).
    PendingDeletion,
    /// Its HSM objects are destroyed; only the metadata remains, as a tombstone.
    Destroyed,
}

impl KeyState {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Enabled => "enabled",
            KeyState::Disabled => "disabled",
            KeyState::PendingDeletion => "pending_deletion",
            KeyState::Destroyed => "destroyed",
        }
    }
}

impl FromStr for KeyState {
    type Err = KmsError;
    fn from_str(s: &str) -> Result<Self, KmsError> {
        match s {
            "enabled" => Ok(KeyState::Enabled),
            "disabled" => Ok(KeyState::Disabled),
            "pending_deletion" => Ok(KeyState::PendingDeletion),
            "destroyed" => Ok(KeyState::Destroyed),
            _ => Err(KmsError::Internal {
                what: "unknown key state in store",
            }),
        }
    }
}

/// Metadata of one master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The key id.
    pub key_id: Uuid,
    /// Optional unique alias.
    pub alias: Option<String>,
    /// Free text.
    pub description: String,
    /// Labels.
    pub tags: BTreeMap<String, String>,
    /// Current state.
    pub state: KeyState,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// Version used for new encryption.
    pub primary_version: u32,
    /// Versions below this one are retired.
    pub min_decryption_version: u32,
    /// When a pending deletion falls due (seconds since the Unix epoch).
    pub deletion_due_at: Option<i64>,
    /// Rotate when the primary version is this old, in seconds (0: no period).
    pub rotation_period_secs: u64,
    /// Most encryptions per version (0: the server's maximum).
    pub usage_limit: u64,
    /// Every version, oldest first.
    pub versions: Vec<VersionRecord>,
    /// Bumped by every change of the key's row (state, primary, minimum version, policy,
    /// deletion): how replicas tell that a cached record is stale. Usage counters are not part
    /// of it (they live on the versions and are never served from a cache).
    pub revision: i64,
}

/// One version of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRecord {
    /// The version number, from 1.
    pub version: u32,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// The HSM object's tag (see [`crate::hsm::KeyRef`]).
    pub hsm_tag: u64,
    /// Encryptions reserved so far (an upper bound of those performed).
    pub usage_reserved: u64,
}

impl KeyRecord {
    /// The HSM object of `version`, if the key has that version.
    pub fn key_ref(&self, version: u32) -> Option<crate::hsm::KeyRef> {
        self.versions
            .iter()
            .find(|v| v.version == version)
            .map(|v| crate::hsm::KeyRef {
                key_id: self.key_id,
                version,
                tag: v.hsm_tag,
            })
    }
}

/// One page of keys.
#[derive(Debug)]
pub struct KeyPage {
    /// Keys in creation order.
    pub keys: Vec<KeyRecord>,
    /// Position after the last key, when more may follow.
    pub next: Option<i64>,
}

/// The store: a connection pool and the queries the domain needs.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    url: std::sync::Arc<str>,
    /// Cleared when the database was found unreachable (a lost connection, a failed probe),
    /// set again when it answers: requests fail fast meanwhile instead of each waiting for
    /// the pool's connection timeout ([`Store::reachable`]).
    reachable: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// How many times `reachable` went from true to false ([`Store::outages`]).
    outages: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Store {
    /// Connects, applies pending migrations, and (for SQLite) creates the file if absent.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of_url(url).ok_or(StoreError::UnsupportedUrl)?;
        let url = match backend {
            Backend::Sqlite if !url.contains("mode=") => {
                format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' })
            }
            _ => url.to_string(),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = FULL").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                        conn.execute("PRAGMA busy_timeout = 5000").await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(StoreError::Connect)?;
        let migrator = match backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite"),
            Backend::Postgres => sqlx::migrate!("./migrations/postgres"),
        };
        // PostgreSQL migrations run under an advisory lock; SQLite's do not, so two processes
        // opening one new file together may both try a migration. Each migration is one
        // transaction: the loser's rolls back, and running again finds it applied.
        let mut attempts = 0;
        while let Err(e) = migrator.run(&pool).await {
            attempts += 1;
            if backend != Backend::Sqlite || attempts >= 5 {
                return Err(StoreError::Migrate(e));
            }
            tracing::info!(error = %e, "migration raced another process; running it again");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        if backend == Backend::Sqlite {
            restrict_sqlite_files(&url);
        }
        Ok(Store {
            pool,
            backend,
            url: url.into(),
            reachable: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
            outages: std::sync::Arc::default(),
        })
    }

    /// Whether the database answered the last time it was tried: `false` from a failure to
    /// reach it (see [`is_unreachable`]) until the next successful probe or write. Every
    /// request fails fast with `UNAVAILABLE` while it is `false` (its audit record could not
    /// be written anyway).
    pub fn reachable(&self) -> bool {
        self.reachable.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many times the database was found unreachable since the store was opened: a
    /// connection kept across a change of this number has lived through an outage.
    pub fn outages(&self) -> u64 {
        self.outages.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Records whether the database answered; logs the transitions.
    pub fn set_reachable(&self, reachable: bool) {
        let was = self
            .reachable
            .swap(reachable, std::sync::atomic::Ordering::SeqCst);
        if was != reachable {
            if !reachable {
                self.outages
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            if reachable {
                tracing::warn!("store reachable again");
            } else {
                tracing::error!("store unreachable: requests fail fast until it answers");
            }
        }
    }

    /// The database URL (PostgreSQL listeners open their own connection with it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Which database is behind this store.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The connection pool, for the modules that keep their own tables (audit, authorization).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Inserts a key and its first version in one transaction. A taken alias is
    /// [`KmsError::AliasExists`], decided by the unique constraint (so two concurrent creations
    /// of one alias give exactly one key).
    pub async fn insert_key(&self, key: &KeyRecord) -> Result<(), KmsError> {
        let tags = serde_json::to_string(&key.tags).map_err(|_| KmsError::Internal {
            what: "tags encoding",
        })?;
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        sqlx::query(
            "INSERT INTO kms_keys (key_id, alias, description, tags, state, created_at, primary_version, min_decryption_version)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(key.key_id.to_string())
        .bind(key.alias.clone())
        .bind(key.description.clone())
        .bind(tags)
        .bind(key.state.as_str())
        .bind(key.created_at)
        .bind(i64::from(key.primary_version))
        .bind(i64::from(key.min_decryption_version))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        for v in &key.versions {
            insert_version(&mut tx, key.key_id, v).await?;
        }
        tx.commit().await.map_err(db_error)
    }

    /// The key with this id.
    pub async fn key_by_id(&self, key_id: Uuid) -> Result<Option<KeyRecord>, KmsError> {
        let row = sqlx::query(&format!("{SELECT_KEY} WHERE key_id = $1"))
            .bind(key_id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?;
        self.with_versions(row.map(|r| key_from_row(&r)).transpose()?)
            .await
    }

    /// The key with this alias.
    pub async fn key_by_alias(&self, alias: &str) -> Result<Option<KeyRecord>, KmsError> {
        let row = sqlx::query(&format!("{SELECT_KEY} WHERE alias = $1"))
            .bind(alias.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?;
        self.with_versions(row.map(|r| key_from_row(&r)).transpose()?)
            .await
    }

    async fn with_versions(&self, key: Option<KeyRecord>) -> Result<Option<KeyRecord>, KmsError> {
        let Some(mut key) = key else { return Ok(None) };
        let rows = sqlx::query("SELECT version, created_at, hsm_tag, usage_reserved FROM kms_key_versions WHERE key_id = $1 ORDER BY version")
            .bind(key.key_id.to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        for row in rows {
            let version: i64 = row.try_get("version").map_err(db_error)?;
            key.versions.push(VersionRecord {
                version: u32::try_from(version).map_err(|_| KmsError::Internal {
                    what: "malformed version row",
                })?,
                created_at: row.try_get("created_at").map_err(db_error)?,
                hsm_tag: row.try_get::<i64, _>("hsm_tag").map_err(db_error)? as u64,
                usage_reserved: u64::try_from(
                    row.try_get::<i64, _>("usage_reserved").map_err(db_error)?,
                )
                .map_err(|_| KmsError::Internal {
                    what: "malformed usage counter",
                })?,
            });
        }
        Ok(Some(key))
    }

    /// Adds version `from + 1` and makes it primary, if the primary is still `from` and the key
    /// is still enabled (a conditional update: of two concurrent rotations exactly one
    /// succeeds, and none lands on a key disabled or scheduled for deletion meanwhile).
    /// Returns whether this call rotated.
    pub async fn rotate(
        &self,
        key_id: Uuid,
        from: u32,
        new: &VersionRecord,
    ) -> Result<bool, KmsError> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let updated = sqlx::query(
            "UPDATE kms_keys SET primary_version = $1, revision = revision + 1 WHERE key_id = $2 AND primary_version = $3 AND state = 'enabled'",
        )
        .bind(i64::from(from) + 1)
        .bind(key_id.to_string())
        .bind(i64::from(from))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if updated.rows_affected() != 1 {
            return Ok(false);
        }
        if new.version != from + 1 {
            return Err(KmsError::Internal {
                what: "rotation must add the next version",
            });
        }
        insert_version(&mut tx, key_id, new).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(true)
    }

    /// Sets a key's state between enabled and disabled. Returns whether the key was in one of
    /// those two states.
    pub async fn set_state(&self, key_id: Uuid, state: KeyState) -> Result<bool, KmsError> {
        let updated = sqlx::query(
            "UPDATE kms_keys SET state = $1, revision = revision + 1 WHERE key_id = $2 AND state IN ('enabled', 'disabled')",
        )
        .bind(state.as_str())
        .bind(key_id.to_string())
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(updated.rows_affected() == 1)
    }

    /// Sets `min_decryption_version` if it does not exceed the primary version. Returns whether
    /// it was set.
    pub async fn set_min_decryption_version(
        &self,
        key_id: Uuid,
        version: u32,
    ) -> Result<bool, KmsError> {
        let updated = sqlx::query(
            "UPDATE kms_keys SET min_decryption_version = $1, revision = revision + 1 WHERE key_id = $2 AND primary_version >= $3",
        )
        .bind(i64::from(version))
        .bind(key_id.to_string())
        .bind(i64::from(version))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(updated.rows_affected() == 1)
    }

    /// Reserves exactly `block` more encryptions of a version, if that does not pass `limit`.
    /// Returns the end of the reserved window (the window is `end - block .. end`), or `None`
    /// when the version has no whole block left. The reservation is durable before any of it
    /// is used, so a crash can only over-count; concurrent reservers get disjoint windows.
    pub async fn reserve_usage(
        &self,
        key_id: Uuid,
        version: u32,
        block: u64,
        limit: u64,
    ) -> Result<Option<u64>, KmsError> {
        let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        // The update and the read of its result share one transaction: our update holds the
        // row until commit, so the value read is exactly the end of our window.
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let updated = sqlx::query(
            "UPDATE kms_key_versions SET usage_reserved = usage_reserved + $1
              WHERE key_id = $2 AND version = $3 AND usage_reserved + $4 <= $5",
        )
        // Each placeholder is bound once: SQLite binds `$n` by position of appearance.
        .bind(to_i64(block))
        .bind(key_id.to_string())
        .bind(i64::from(version))
        .bind(to_i64(block))
        .bind(to_i64(limit))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if updated.rows_affected() != 1 {
            return Ok(None);
        }
        let end: i64 = sqlx::query(
            "SELECT usage_reserved FROM kms_key_versions WHERE key_id = $1 AND version = $2",
        )
        .bind(key_id.to_string())
        .bind(i64::from(version))
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?
        .try_get("usage_reserved")
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok(Some(u64::try_from(end).map_err(|_| {
            KmsError::Internal {
                what: "malformed usage counter",
            }
        })?))
    }

    /// Sets a key's rotation policy. Returns whether the key exists.
    pub async fn set_rotation_policy(
        &self,
        key_id: Uuid,
        period_secs: u64,
        usage_limit: u64,
    ) -> Result<bool, KmsError> {
        let updated = sqlx::query(
            "UPDATE kms_keys SET rotation_period_secs = $1, usage_limit = $2, revision = revision + 1 WHERE key_id = $3",
        )
        .bind(i64::try_from(period_secs).unwrap_or(i64::MAX))
        .bind(i64::try_from(usage_limit).unwrap_or(i64::MAX))
        .bind(key_id.to_string())
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(updated.rows_affected() == 1)
    }

    /// Cancels a pending deletion that is not yet due at `now`: the key goes back to disabled.
    /// Returns whether it was pending and not due. From the due time on, the scheduler may be
    /// destroying the key's HSM objects, so a cancellation could leave a live key without them.
    pub async fn cancel_deletion(&self, key_id: Uuid, now: i64) -> Result<bool, KmsError> {
        let updated = sqlx::query(
            "UPDATE kms_keys SET state = 'disabled', deletion_due_at = NULL, revision = revision + 1
              WHERE key_id = $1 AND state = 'pending_deletion' AND deletion_due_at > $2",
        )
        .bind(key_id.to_string())
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(updated.rows_affected() == 1)
    }

    /// Marks a pending key whose deletion is due at `now` as destroyed (after its HSM objects
    /// were destroyed). Returns whether this call marked it.
    pub async fn mark_destroyed(&self, key_id: Uuid, now: i64) -> Result<bool, KmsError> {
        let updated = sqlx::query(
            "UPDATE kms_keys SET state = 'destroyed', revision = revision + 1
              WHERE key_id = $1 AND state = 'pending_deletion' AND deletion_due_at <= $2",
        )
        .bind(key_id.to_string())
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(updated.rows_affected() == 1)
    }

    /// A digest of every key's revision: the number of keys and the sum of their revisions.
    /// Revisions only grow and key rows are never deleted, so the digest changes exactly when
    /// some key was created or changed: one cheap query tells a replica whether its cache may
    /// be stale.
    pub async fn key_digest(&self) -> Result<(i64, i64), KmsError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(revision), 0) AS BIGINT) AS s FROM kms_keys",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)?;
        Ok((
            row.try_get("n").map_err(db_error)?,
            row.try_get("s").map_err(db_error)?,
        ))
    }

    /// Every key's id and revision.
    pub async fn key_revisions(&self) -> Result<Vec<(Uuid, i64)>, KmsError> {
        let rows = sqlx::query("SELECT key_id, revision FROM kms_keys")
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|row| {
                let key_id: String = row.try_get("key_id").map_err(db_error)?;
                let key_id = Uuid::parse_str(&key_id).map_err(|_| KmsError::Internal {
                    what: "malformed key id in store",
                })?;
                Ok((key_id, row.try_get("revision").map_err(db_error)?))
            })
            .collect()
    }

    /// Up to `limit` keys created after position `after`, in creation order.
    pub async fn list_keys(&self, after: i64, limit: u32) -> Result<KeyPage, KmsError> {
        let rows = sqlx::query(&format!(
            "{SELECT_KEY} WHERE seq > $1 ORDER BY seq LIMIT $2"
        ))
        .bind(after)
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        let more = rows.len() > limit as usize;
        let mut keys = Vec::with_capacity(rows.len());
        let mut last = after;
        for row in rows.iter().take(limit as usize) {
            last = row.try_get::<i64, _>("seq").map_err(db_error)?;
            keys.extend(self.with_versions(Some(key_from_row(row)?)).await?);
        }
        Ok(KeyPage {
            keys,
            next: more.then_some(last),
        })
    }

    /// PostgreSQL: tries (never waits) to take the session advisory lock `key` on a pool
    /// connection of its own, for a job only one replica should run at a time. `None` when
    /// another session holds it. The lock lives as long as that connection: if this process
    /// dies, PostgreSQL releases it with the connection.
    pub async fn try_job_lock(&self, key: i64) -> Result<Option<JobLock>, KmsError> {
        if self.backend != Backend::Postgres {
            return Err(KmsError::Internal {
                what: "advisory locks need PostgreSQL",
            });
        }
        let mut conn = self.pool.acquire().await.map_err(db_error)?;
        let taken: bool = sqlx::query("SELECT pg_try_advisory_lock($1) AS taken")
            .bind(key)
            .fetch_one(&mut *conn)
            .await
            .map_err(db_error)?
            .try_get("taken")
            .map_err(db_error)?;
        Ok(taken.then_some(JobLock {
            conn: Some(conn),
            key,
        }))
    }

    /// Closes the pool (waits for connections to be returned).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A PostgreSQL session advisory lock held on its own connection ([`Store::try_job_lock`]).
/// [`JobLock::release`] unlocks it and returns the connection to the pool; dropped without
/// that (a cancelled task), the connection is closed instead, which releases the lock too —
/// a pooled connection never keeps a lock.
pub struct JobLock {
    conn: Option<sqlx::pool::PoolConnection<sqlx::Any>>,
    key: i64,
}

impl JobLock {
    /// Unlocks. If the unlock cannot be confirmed the connection is closed, which releases
    /// the lock as well.
    pub async fn release(mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let unlocked = sqlx::query("SELECT pg_advisory_unlock($1) AS unlocked")
            .bind(self.key)
            .fetch_one(&mut *conn)
            .await
            .ok()
            .and_then(|row| row.try_get::<bool, _>("unlocked").ok());
        if unlocked != Some(true) {
            tracing::warn!("advisory unlock not confirmed: closing its connection");
            drop(conn.detach());
        }
    }
}

impl Drop for JobLock {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Closing the connection is what releases a lock nobody unlocked.
            drop(conn.detach());
        }
    }
}

async fn insert_version(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    key_id: Uuid,
    v: &VersionRecord,
) -> Result<(), KmsError> {
    sqlx::query("INSERT INTO kms_key_versions (key_id, version, state, created_at, hsm_tag) VALUES ($1, $2, $3, $4, $5)")
        .bind(key_id.to_string())
        .bind(i64::from(v.version))
        .bind(KeyState::Enabled.as_str())
        .bind(v.created_at)
        // Stored as the same 64 bits, reinterpreted as signed for the database.
        .bind(v.hsm_tag as i64)
        .execute(&mut **tx)
        .await
        .map_err(db_error)?;
    Ok(())
}

const SELECT_KEY: &str =
    "SELECT seq, key_id, alias, description, tags, state, created_at, primary_version, min_decryption_version, rotation_period_secs, usage_limit, deletion_due_at, revision FROM kms_keys";

fn key_from_row(row: &AnyRow) -> Result<KeyRecord, KmsError> {
    let corrupt = |_| KmsError::Internal {
        what: "malformed key row",
    };
    let key_id: String = row.try_get("key_id").map_err(db_error)?;
    let tags: String = row.try_get("tags").map_err(db_error)?;
    let state: String = row.try_get("state").map_err(db_error)?;
    let primary: i64 = row.try_get("primary_version").map_err(db_error)?;
    let min_decryption: i64 = row.try_get("min_decryption_version").map_err(db_error)?;
    Ok(KeyRecord {
        key_id: Uuid::parse_str(&key_id).map_err(|_| KmsError::Internal {
            what: "malformed key id in store",
        })?,
        alias: row.try_get("alias").map_err(db_error)?,
        description: row.try_get("description").map_err(db_error)?,
        tags: serde_json::from_str(&tags).map_err(|_| KmsError::Internal {
            what: "malformed tags in store",
        })?,
        state: state.parse()?,
        created_at: row.try_get("created_at").map_err(db_error)?,
        primary_version: u32::try_from(primary).map_err(corrupt)?,
        min_decryption_version: u32::try_from(min_decryption).map_err(corrupt)?,
        rotation_period_secs: u64::try_from(
            row.try_get::<i64, _>("rotation_period_secs")
                .map_err(db_error)?,
        )
        .map_err(corrupt)?,
        usage_limit: u64::try_from(row.try_get::<i64, _>("usage_limit").map_err(db_error)?)
            .map_err(corrupt)?,
        deletion_due_at: row.try_get("deletion_due_at").map_err(db_error)?,
        versions: Vec::new(),
        revision: row.try_get("revision").map_err(db_error)?,
    })
}

/// Maps a database error to the domain: unique violations on the alias are a conflict;
/// everything about reaching the database is "unavailable"; the driver's message is logged
/// (it carries no secrets: none are stored) but never returned to a caller.
/// Schedules an enabled or disabled key for destruction at `due_at`, on `conn` (the
/// transaction of the approval that decided it, so the two happen together or not at all).
/// Returns whether the key was in one of those states.
pub(crate) async fn schedule_deletion_in(
    conn: &mut sqlx::AnyConnection,
    key_id: Uuid,
    due_at: i64,
) -> Result<bool, sqlx::Error> {
    let updated = sqlx::query(
        "UPDATE kms_keys SET state = 'pending_deletion', deletion_due_at = $1, revision = revision + 1
          WHERE key_id = $2 AND state IN ('enabled', 'disabled')",
    )
    .bind(due_at)
    .bind(key_id.to_string())
    .execute(conn)
    .await?;
    Ok(updated.rows_affected() == 1)
}

pub(crate) fn db_error(e: sqlx::Error) -> KmsError {
    if let sqlx::Error::Database(db) = &e {
        if db.is_unique_violation() {
            return KmsError::AliasExists;
        }
    }
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_) => {
            tracing::error!(error = %e, "store unreachable");
            KmsError::StoreUnavailable
        }
        other => {
            tracing::error!(error = %other, "store error");
            KmsError::StoreUnavailable
        }
    }
}

/// Whether `e` says the database cannot be reached (as opposed to a query it refused): a
/// transport error, no connection within the pool's timeout, or PostgreSQL ending or refusing
/// the connection (SQLSTATE class 08, 57P01-57P03: shutdown, crash, starting up).
pub fn is_unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

/// Makes the SQLite database file (and its WAL and shared-memory files, which SQLite creates
/// with the database's mode) readable by the server's user only: it holds key metadata, grants
/// and the audit trail.
fn restrict_sqlite_files(url: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:")
        .split('?')
        .next()
        .unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return;
    }
    for suffix in ["", "-wal", "-shm"] {
        let file = format!("{path}{suffix}");
        if std::path::Path::new(&file).exists() {
            if let Err(e) = std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
            {
                tracing::warn!(error = %e, "cannot restrict the database file to its owner");
            }
        }
    }
}

/// Failures while opening the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names neither SQLite nor PostgreSQL.
    #[error("database URL must start with sqlite: or postgres:")]
    UnsupportedUrl,
    /// The database could not be reached.
    #[error("cannot connect to the database")]
    Connect(#[source] sqlx::Error),
    /// A migration failed.
    #[error("database migration failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store_with_key() -> (tempfile::TempDir, Store, Uuid) {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::connect(
            &format!("sqlite://{}", dir.path().join("t.db").display()),
            4,
        )
        .await
        .expect("store");
        let key_id = Uuid::new_v4();
        let record = KeyRecord {
            key_id,
            alias: None,
            description: String::new(),
            tags: BTreeMap::new(),
            state: KeyState::Enabled,
            created_at: 0,
            primary_version: 1,
            min_decryption_version: 1,
            rotation_period_secs: 0,
            usage_limit: 0,
            deletion_due_at: None,
            versions: vec![VersionRecord {
                version: 1,
                created_at: 0,
                hsm_tag: 1,
                usage_reserved: 0,
            }],
            revision: 0,
        };
        store.insert_key(&record).await.expect("insert");
        (dir, store, key_id)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reservations_never_pass_the_limit_on_sqlite() {
        let (_dir, store, key_id) = store_with_key().await;
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut ends = Vec::new();
                    for _ in 0..50 {
                        if let Some(end) = store
                            .reserve_usage(key_id, 1, 10, 1000)
                            .await
                            .expect("reserve")
                        {
                            ends.push(end);
                        }
                    }
                    ends
                })
            })
            .collect();
        let mut ends = Vec::new();
        for t in tasks {
            ends.extend(t.await.expect("join"));
        }
        ends.sort();
        let expected: Vec<u64> = (1..=100).map(|i| i * 10).collect();
        assert_eq!(
            ends, expected,
            "every window distinct, exactly up to the limit"
        );
        let key = store.key_by_id(key_id).await.expect("read").expect("key");
        assert_eq!(key.versions[0].usage_reserved, 1000);
    }
}
