//! Assembling and running a server: mutual TLS, HSM self-test, store, the KMS service, gRPC
//! health and reflection, request size limits, graceful shutdown, and the background tasks
//! that let several replicas share one store: the key cache check, the PostgreSQL listener,
//! the authorization refresher, the scheduler (one replica at a time on PostgreSQL), the
//! recovery session heartbeat and readiness.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use cryptoki::context::Pkcs11;
use proto::v1::key_management_server::KeyManagementServer;
use tokio::net::TcpListener;

use crate::audit::{Audit, AuditError, AuditParams};
use crate::authz::{Authz, AuthzParams};
use crate::config::{ConfigError, RotationParams};
use crate::domains::Domains;
use crate::error::KmsError;
use crate::grpc::GrpcService;
use crate::hsm::{Hsm, HsmError, HsmParams};
use crate::recovery::Recovery;
use crate::recovery::SESSION_HEARTBEAT;
use crate::service::{Clock, KeyService, KEY_SYNC_INTERVAL};
use crate::store::{Backend, Store, StoreError};
use crate::tls::{ServerTls, TlsError, TlsIncoming, TlsParams};

/// Largest request message accepted by the transport. `Encrypt` payloads are further limited
/// to 4 KiB by the service; this bounds everything else (contexts, blobs, metadata).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Configuration refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// HSM could not be opened, or its self-test failed.
    #[error("HSM")]
    Hsm(#[from] HsmError),
    /// Store could not be opened.
    #[error("store")]
    Store(#[from] StoreError),
    /// The TLS certificates or key could not be loaded.
    #[error("TLS")]
    Tls(#[from] TlsError),
    /// Listener problem.
    #[error("listener")]
    Io(#[from] std::io::Error),
    /// The audit trail could not be opened.
    #[error("audit trail")]
    Audit(#[from] AuditError),
    /// The authorization tables could not be read, or bootstrap was refused.
    #[error("authorization: {0}")]
    Authz(#[source] KmsError),
}

/// Everything a server needs besides its listener.
pub struct Parts {
    /// The process-wide PKCS#11 context.
    pub pkcs11: Pkcs11,
    /// Token and login.
    pub hsm: HsmParams,
    /// Database URL.
    pub store_url: String,
    /// Database pool size.
    pub store_max_connections: u32,
    /// Source of time.
    pub clock: Arc<dyn Clock>,
    /// Rotation settings.
    pub rotation: RotationParams,
    /// Bootstrap officers, approval and break-glass policy.
    pub authz: AuthzParams,
    /// Audit trail settings; `None` turns the audit trail off (benchmark baseline only).
    pub audit: Option<AuditParams>,
    /// Mutual TLS material (the server serves nothing else).
    pub tls: TlsParams,
    /// This replica's name among those sharing the store (recorded with the recovery share
    /// sessions it holds, and named to callers who reach another replica).
    pub instance: String,
}

/// A server ready to serve: ports opened, self-test passed.
pub struct Ready {
    hsm: Hsm,
    service: Arc<KeyService>,
    authz: Arc<Authz>,
    audit: Audit,
    domains: Arc<Domains>,
    store: Store,
    check_interval: std::time::Duration,
    tls: ServerTls,
    instance: String,
}

impl Ready {
    /// Loads the TLS material, opens the HSM, runs its known-answer self-test (refusing to go
    /// on if it fails), opens the store and runs migrations.
    pub async fn open(parts: Parts) -> Result<Self, StartError> {
        let tls = ServerTls::load(&parts.tls)?;
        let pkcs11 = parts.pkcs11;
        let hsm_params = parts.hsm;
        let hsm = tokio::task::spawn_blocking(move || Hsm::open(pkcs11, hsm_params))
            .await
            .map_err(|_| HsmError::Other("HSM open panicked".into()))??;
        hsm.self_test().await?;
        tracing::info!("HSM self-test passed");
        // One connection more than configured: the audit writer keeps one for itself.
        let store = Store::connect(&parts.store_url, parts.store_max_connections + 1).await?;
        tracing::info!(backend = ?store.backend(), "store ready");
        let service = Arc::new(
            KeyService::new(hsm.clone(), store.clone(), Arc::clone(&parts.clock))
                .with_usage_policy(parts.rotation.usage),
        );
        let audit = match parts.audit {
            Some(params) => {
                Audit::open(hsm.clone(), store.clone(), Arc::clone(&parts.clock), params).await?
            }
            None => {
                tracing::warn!("AUDIT TRAIL DISABLED: for benchmark baselines only");
                Audit::disabled()
            }
        };
        let recovery = Arc::new(Recovery::new(
            hsm.clone(),
            store.clone(),
            Arc::clone(&parts.clock),
            parts.instance.clone(),
        ));
        let domains = Arc::new(Domains::new(
            Arc::clone(&service),
            store.clone(),
            Arc::clone(&parts.clock),
        ));
        let authz = Authz::open(
            store.clone(),
            Arc::clone(&service),
            recovery,
            parts.clock,
            parts.authz,
        )
        .await
        .map_err(StartError::Authz)?;
        Ok(Ready {
            hsm,
            domains,
            service,
            authz: Arc::new(authz),
            audit,
            store,
            check_interval: parts.rotation.check_interval,
            tls,
            instance: parts.instance,
        })
    }

    /// The key service this server will serve (tests and tools drive the scheduler with it).
    pub fn service(&self) -> Arc<KeyService> {
        Arc::clone(&self.service)
    }

    /// The audit trail this server writes.
    pub fn audit(&self) -> Audit {
        self.audit.clone()
    }

    /// The authorization layer this server asks.
    pub fn authz(&self) -> Arc<Authz> {
        Arc::clone(&self.authz)
    }

    /// This replica's instance name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Serves mutual TLS on `listener` until `shutdown` completes, then
    /// drains. Accepted connections get `TCP_NODELAY` (see [`TlsIncoming`]): without it small
    /// responses can wait ~40 ms for a delayed acknowledgement (measured with `kms-bench`).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartError> {
        let addr: SocketAddr = listener.local_addr()?;
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<KeyManagementServer<GrpcService>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| StartError::Io(std::io::Error::other(e.to_string())))?;
        let scheduler = tokio::spawn(rotation_scheduler(
            Arc::clone(&self.service),
            self.store.clone(),
            self.check_interval,
        ));
        let authz_changed = Arc::new(tokio::sync::Notify::new());
        let refresher = tokio::spawn(authz_refresher(
            Arc::clone(&self.authz),
            Arc::clone(&authz_changed),
        ));
        let key_sync = tokio::spawn(key_sync(Arc::clone(&self.service)));
        let notifications = (self.store.backend() == Backend::Postgres).then(|| {
            tokio::spawn(store_listener(
                self.store.clone(),
                Arc::clone(&self.service),
                authz_changed,
            ))
        });
        let recovery = Arc::clone(self.authz.recovery());
        let heartbeat = tokio::spawn(recovery_heartbeat(Arc::clone(&recovery)));
        let readiness = tokio::spawn(readiness(self.hsm.clone(), self.store.clone(), health));
        let kms = KeyManagementServer::new(GrpcService::new(
            self.service,
            self.authz,
            self.audit.clone(),
            self.domains,
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
        tracing::info!(%addr, "serving (mutual TLS 1.3)");
        let result = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection)
            .add_service(kms)
            .serve_with_incoming_shutdown(TlsIncoming::new(listener, self.tls), shutdown)
            .await;
        scheduler.abort();
        refresher.abort();
        key_sync.abort();
        if let Some(notifications) = notifications {
            notifications.abort();
        }
        heartbeat.abort();
        readiness.abort();
        recovery.shutdown().await;
        self.audit.shutdown().await;
        self.store.close().await;
        result.map_err(|e| StartError::Io(std::io::Error::other(e.to_string())))
    }
}

/// How stale this process's view of bindings, grants and break-glass windows may be when
/// another server on the same store changed them (this process's own changes apply at once).
pub const AUTHZ_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// How often readiness is checked: the health service reports a lost HSM or store within
/// this much (plus [`READINESS_TIMEOUT`]).
pub const READINESS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// How long one readiness probe of the HSM or the store may take before it counts as a failure.
pub const READINESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Every [`READINESS_INTERVAL`]: probes the HSM (a logged-in session draws one random byte)
/// and the store (`SELECT 1`), and sets `grpc.health.v1` for `kms.v1.KeyManagement` and for
/// the whole server (`""`) to `NOT_SERVING` while either fails, `SERVING` again once both
/// answer. Logs only the transitions.
async fn readiness(hsm: Hsm, store: Store, health: tonic_health::server::HealthReporter) {
    use tonic_health::ServingStatus;
    let mut ready = true;
    loop {
        // While the store is known to be down, look four times as often: requests fail fast
        // meanwhile, and service resumes at the first probe that the store answers.
        let pause = if store.reachable() {
            READINESS_INTERVAL
        } else {
            READINESS_INTERVAL / 4
        };
        tokio::time::sleep(pause).await;
        let hsm_ok = matches!(
            tokio::time::timeout(READINESS_TIMEOUT, hsm.ping()).await,
            Ok(Ok(()))
        );
        let store_ok = matches!(
            tokio::time::timeout(
                READINESS_TIMEOUT,
                sqlx::query("SELECT 1").execute(store.pool())
            )
            .await,
            Ok(Ok(_))
        );
        store.set_reachable(store_ok);
        let now_ready = hsm_ok && store_ok;
        if now_ready == ready {
            continue;
        }
        ready = now_ready;
        let status = if ready {
            tracing::info!("ready again: HSM and store answer");
            ServingStatus::Serving
        } else {
            tracing::error!(hsm_ok, store_ok, "not ready: health reports NOT_SERVING");
            ServingStatus::NotServing
        };
        health
            .set_service_status(
                <KeyManagementServer<GrpcService> as tonic::server::NamedService>::NAME,
                status,
            )
            .await;
        health.set_service_status("", status).await;
    }
}

/// Re-reads bindings, grants and windows every [`AUTHZ_REFRESH`], and at once when `changed`
/// is notified (a PostgreSQL notification that another replica changed them): a revocation
/// made through another replica takes effect here within milliseconds on PostgreSQL, within
/// [`AUTHZ_REFRESH`] otherwise. Notifications that arrive during a reload coalesce into one
/// more reload.
async fn authz_refresher(authz: Arc<Authz>, changed: Arc<tokio::sync::Notify>) {
    let mut tick = tokio::time::interval(AUTHZ_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = changed.notified() => {}
        }
        if let Err(e) = authz.reload().await {
            tracing::warn!(error = %e, "authorization refresh failed; keeping the last view");
        }
    }
}

/// Every [`KEY_SYNC_INTERVAL`]: checks that the cached key records are current
/// ([`KeyService::sync`]). Logs only when checking starts or stops failing.
async fn key_sync(service: Arc<KeyService>) {
    let mut tick = tokio::time::interval(KEY_SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        match service.sync().await {
            Ok(outcome) => {
                if outcome.evicted > 0 {
                    tracing::debug!(evicted = outcome.evicted, "stale key records evicted");
                }
                if failing {
                    tracing::info!("key cache check works again");
                    failing = false;
                }
            }
            Err(e) if !failing => {
                tracing::warn!(error = %e, "key cache check failed; keys are read from the store once the cache is older than its bound");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// PostgreSQL only: listens on `kms_keys` (a key row changed: evict it at once) and
/// `kms_authz` (bindings, grants or windows changed: reload them), which the store's triggers
/// notify at commit. A lost connection is re-established (with a pause after errors); what
/// changed meanwhile is found by [`key_sync`] within a second, and authorization is reloaded
/// after every reconnection.
async fn store_listener(
    store: Store,
    service: Arc<KeyService>,
    authz_changed: Arc<tokio::sync::Notify>,
) {
    use sqlx::postgres::PgListener;
    let pause = std::time::Duration::from_secs(1);
    loop {
        let mut listener = match PgListener::connect(store.url()).await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::debug!(error = %e, "store listener cannot connect; retrying");
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        if let Err(e) = listener.listen_all([KEYS_CHANNEL, AUTHZ_CHANNEL]).await {
            tracing::debug!(error = %e, "store listener cannot LISTEN; retrying");
            tokio::time::sleep(pause).await;
            continue;
        }
        tracing::debug!("store listener listening");
        // Whatever changed while nobody listened.
        authz_changed.notify_one();
        loop {
            match listener.try_recv().await {
                Ok(Some(notification)) => match notification.channel() {
                    KEYS_CHANNEL => match parse_key_notification(notification.payload()) {
                        Some((key_id, revision)) => {
                            service.invalidate(key_id, revision);
                        }
                        None => tracing::warn!("malformed key notification ignored"),
                    },
                    _ => authz_changed.notify_one(),
                },
                // The connection was lost and has been re-established: changes in between
                // were not notified.
                Ok(None) => {
                    tracing::info!("store listener reconnected");
                    authz_changed.notify_one();
                }
                Err(e) => {
                    tracing::debug!(error = %e, "store listener lost its connection");
                    break;
                }
            }
        }
        tokio::time::sleep(pause).await;
    }
}

/// The channel the `kms_keys` trigger notifies: `'<key id>:<revision>'`.
const KEYS_CHANNEL: &str = "kms_keys";
/// The channel the authorization tables' triggers notify.
const AUTHZ_CHANNEL: &str = "kms_authz";

fn parse_key_notification(payload: &str) -> Option<(uuid::Uuid, i64)> {
    let (id, revision) = payload.split_once(':')?;
    Some((uuid::Uuid::parse_str(id).ok()?, revision.parse().ok()?))
}

/// Every [`SESSION_HEARTBEAT`]: renews this replica's claim on the recovery share session it
/// holds, if any.
async fn recovery_heartbeat(recovery: Arc<Recovery>) {
    let mut tick = tokio::time::interval(SESSION_HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = recovery.heartbeat().await {
            tracing::warn!(error = %e, "recovery session heartbeat failed");
        }
    }
}

/// The PostgreSQL advisory lock the scheduler holds while it runs (one replica at a time).
pub const SCHEDULER_LOCK: i64 = 7_243_011;
/// The longest one scheduler run may take before it is abandoned (and, on PostgreSQL, its
/// lock released for another replica).
pub const SCHEDULER_MAX_RUN: std::time::Duration = std::time::Duration::from_secs(600);

/// Every `interval`: rotates keys whose period is due and destroys keys whose pending deletion
/// is due. Failures are logged and retried at the next tick.
///
/// Exactly once per due item across replicas: every rotation is a conditional update and every
/// destruction a conditional state change, so even concurrent runs cannot rotate a key twice
/// or destroy it twice. On PostgreSQL the run also holds a session advisory lock
/// ([`SCHEDULER_LOCK`], tried, never waited for), so only one replica at a time does the HSM
/// work; if that replica dies, its connection closes, PostgreSQL releases the lock, and the
/// next replica to tick takes over.
async fn rotation_scheduler(service: Arc<KeyService>, store: Store, interval: std::time::Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let lock = match store.backend() {
            Backend::Sqlite => None,
            Backend::Postgres => match store.try_job_lock(SCHEDULER_LOCK).await {
                Ok(Some(lock)) => Some(lock),
                Ok(None) => {
                    tracing::debug!("another replica runs the scheduler");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "scheduler lock unavailable");
                    continue;
                }
            },
        };
        let run = async {
            match service.rotate_due().await {
                Ok(rotated) if !rotated.is_empty() => {
                    tracing::info!(count = rotated.len(), "scheduled rotations done")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "scheduled rotation check failed"),
            }
            if let Err(e) = service.destroy_due().await {
                tracing::warn!(error = %e, "scheduled deletion check failed");
            }
        };
        if tokio::time::timeout(SCHEDULER_MAX_RUN, run).await.is_err() {
            tracing::error!("scheduler run took too long: abandoned");
        }
        if let Some(lock) = lock {
            lock.release().await;
        }
    }
}
