//! Test harness: a throw-away SoftHSM2 token, a fresh SQLite file or PostgreSQL database, and
//! a real server started in process on `127.0.0.1:0`, with connected SDK clients.
//!
//! Every [`TestServer`] serves mutual TLS exactly as production does, with its own development
//! PKI ([`TestPki`], made by `kms_cli::pki`) in a temporary folder: clients connect with one of
//! the identities of `kms_cli::pki::DEV_IDENTITIES`, and tests can issue odd certificates
//! from the PKI's CA.
//!
//! SoftHSM2 keeps one state per process, so this crate initializes one PKCS#11 context per
//! process ([`pkcs11`]), pointed at a private token directory, and creates one fresh token per
//! test run ([`token`]) that servers find by its label, exactly as production does.
//!
//! PostgreSQL: set `KMS_TEST_POSTGRES_URL` (e.g. `postgres://postgres@127.0.0.1:5432/test`).
//! Each test then gets its own database, dropped afterwards. Without the variable the
//! PostgreSQL half of each test prints that it was skipped, unless
//! `KMS_TEST_REQUIRE_POSTGRES=1`, which turns the skip into a failure (CI sets it).

#![forbid(unsafe_code)]

pub mod bench;
pub mod cluster;
pub mod scaleout;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context as _};
use cryptoki::context::Pkcs11;
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use kms_server::audit::AuditParams;
use kms_server::authz::AuthzParams;
use kms_server::config::RotationParams;
use kms_server::hsm::HsmParams;
use kms_server::server::{Parts, Ready};
use kms_server::service::{Clock, SystemClock};
use kms_server::tls::TlsParams;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The user PIN of test tokens.
pub const USER_PIN: &str = "test-user-pin-1234";
/// The security officer PIN of test tokens.
pub const SO_PIN: &str = "test-so-pin-5678";

/// Where the SoftHSM2 module is: `KMS_HSM_MODULE`, else the usual Debian paths.
pub fn module_path() -> PathBuf {
    if let Ok(path) = std::env::var("KMS_HSM_MODULE") {
        return PathBuf::from(path);
    }
    for candidate in [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    PathBuf::from(kms_server::config::DEFAULT_MODULE)
}

struct Process {
    pkcs11: Pkcs11,
    token_dir: PathBuf,
    _dir: tempfile::TempDir,
}

fn process() -> &'static Process {
    static PROCESS: OnceLock<Process> = OnceLock::new();
    PROCESS.get_or_init(|| match init_process() {
        Ok(p) => p,
        Err(e) => panic!(
            "cannot set up SoftHSM2 (is softhsm2 installed? `apt-get install softhsm2`): {e:#}"
        ),
    })
}

fn init_process() -> anyhow::Result<Process> {
    let dir = tempfile::Builder::new().prefix("kms-softhsm-").tempdir()?;
    let token_dir = dir.path().join("tokens");
    std::fs::create_dir_all(&token_dir)?;
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", token_dir.display()),
    )?;
    // SoftHSM2 reads its configuration file once, at C_Initialize, from this variable.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let pkcs11 = kms_server::hsm::load_module(&module_path()).context("load SoftHSM2")?;
    Ok(Process {
        pkcs11,
        token_dir,
        _dir: dir,
    })
}

/// The process-wide PKCS#11 context (SoftHSM2 on a private token directory).
pub fn pkcs11() -> Pkcs11 {
    process().pkcs11.clone()
}

/// The SoftHSM2 configuration file of this process (for child processes such as `kms-server`).
pub fn softhsm_conf() -> PathBuf {
    process()
        .token_dir
        .parent()
        .map(|p| p.join("softhsm2.conf"))
        .unwrap_or_default()
}

/// The token of this test run.
pub struct TestToken {
    /// Its label, unique per run.
    pub label: String,
}

/// The fresh token of this test run, created on first use.
pub fn token() -> &'static TestToken {
    static TOKEN: OnceLock<TestToken> = OnceLock::new();
    TOKEN.get_or_init(|| {
        let label = format!(
            "kms-test-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        if let Err(e) = init_token(&pkcs11(), &label) {
            panic!("cannot initialize a SoftHSM2 token: {e:#}");
        }
        TestToken { label }
    })
}

/// Initializes a new token labelled `label` in the first free slot, with the test PINs.
pub fn init_token(pkcs11: &Pkcs11, label: &str) -> anyhow::Result<()> {
    // Two tests must not pick the same free slot at once.
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INIT.lock().unwrap_or_else(|p| p.into_inner());
    let slots = pkcs11.get_all_slots()?;
    let free = slots
        .into_iter()
        .find(|slot| {
            pkcs11
                .get_token_info(*slot)
                .map(|t| !t.token_initialized())
                .unwrap_or(false)
        })
        .context("no free SoftHSM2 slot")?;
    pkcs11.init_token(free, &AuthPin::from(SO_PIN), label)?;
    // After C_InitToken SoftHSM2 may renumber slots: find the token again by label.
    let slot =
        kms_server::hsm::find_token(pkcs11, label).context("new token not found by label")?;
    let session = pkcs11.open_rw_session(slot)?;
    session.login(UserType::So, Some(&AuthPin::from(SO_PIN)))?;
    session.init_pin(&AuthPin::from(USER_PIN))?;
    session.logout()?;
    Ok(())
}

/// Initializes one more token (for tests that need a token of their own, such as an empty one
/// to restore into, or one whose security officer logs in); returns its label.
pub fn new_token() -> anyhow::Result<String> {
    let label = format!(
        "kms-own-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    init_token(&pkcs11(), &label)?;
    Ok(label)
}

/// Deletes the files of the token labelled `label` from the token directory, as a lost or
/// wiped HSM. Returns how many token folders were removed (one, normally).
pub fn remove_token_files(label: &str) -> anyhow::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(&process().token_dir)? {
        let dir = entry?.path();
        let Ok(token_object) = std::fs::read(dir.join("token.object")) else {
            continue;
        };
        if token_object
            .windows(label.len())
            .any(|w| w == label.as_bytes())
        {
            std::fs::remove_dir_all(&dir)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// A session on the run's token, logged in as its user: for tests that look into the token.
pub fn user_session() -> anyhow::Result<cryptoki::session::Session> {
    let pkcs11 = pkcs11();
    let label = &token().label;
    let slot =
        kms_server::hsm::find_token(&pkcs11, label).context("the run's token is not there")?;
    let session = pkcs11.open_rw_session(slot)?;
    match session.login(UserType::User, Some(&AuthPin::from(USER_PIN))) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
            Ok(session)
        }
        Err(e) => Err(e.into()),
    }
}

/// HSM parameters for the test token.
pub fn hsm_params(pool_size: usize) -> HsmParams {
    HsmParams {
        token_label: token().label.clone(),
        pin: AuthPin::from(USER_PIN),
        so_pin: Some(AuthPin::from(SO_PIN)),
        pool_size,
    }
}

/// Which database a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// A SQLite file in a temporary folder.
    Sqlite,
    /// A fresh database on the PostgreSQL server of `KMS_TEST_POSTGRES_URL`.
    Postgres,
}

/// A test database, removed when dropped.
pub struct TestDb {
    /// The URL a server should use.
    pub url: String,
    /// Which kind.
    pub kind: StoreKind,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl TestDb {
    /// A fresh database of `kind`; `None` when PostgreSQL is not configured (and not required).
    pub async fn new(kind: StoreKind) -> anyhow::Result<Option<Self>> {
        match kind {
            StoreKind::Sqlite => {
                let dir = tempfile::Builder::new().prefix("kms-db-").tempdir()?;
                let url = format!("sqlite://{}", dir.path().join("kms.db").display());
                Ok(Some(TestDb {
                    url,
                    kind,
                    _dir: Some(dir),
                    pg: None,
                }))
            }
            StoreKind::Postgres => {
                let Some(admin) = postgres_url()? else {
                    return Ok(None);
                };
                let name = format!("kms_test_{}", uuid::Uuid::new_v4().simple());
                let mut conn = connect_pg(&admin).await?;
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await?;
                let url = replace_database(&admin, &name)?;
                Ok(Some(TestDb {
                    url,
                    kind,
                    _dir: None,
                    pg: Some((admin, name)),
                }))
            }
        }
    }
}

impl TestDb {
    /// A database that exists already at `url` (e.g. on a [`cluster::PrivatePostgres`]),
    /// left in place when this is dropped.
    pub fn at(url: String, kind: StoreKind) -> Self {
        TestDb {
            url,
            kind,
            _dir: None,
            pg: None,
        }
    }

    /// Drops a PostgreSQL test database now, terminating its connections (a store outage).
    pub async fn drop_now(&self) -> anyhow::Result<()> {
        let Some((admin, name)) = &self.pg else {
            bail!("only PostgreSQL databases can be dropped")
        };
        let mut conn = connect_pg(admin).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await?;
        Ok(())
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.pg.take() {
            // Drop runs outside any async context guarantee: use a private runtime on a thread.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(rt) = rt {
                    rt.block_on(async {
                        if let Ok(mut conn) = connect_pg(&admin).await {
                            let _ = sqlx::query(&format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            ))
                            .execute(&mut conn)
                            .await;
                        }
                    });
                }
            })
            .join();
        }
    }
}

async fn connect_pg(url: &str) -> anyhow::Result<sqlx::AnyConnection> {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    sqlx::AnyConnection::connect(url)
        .await
        .context("connect to PostgreSQL (KMS_TEST_POSTGRES_URL)")
}

fn replace_database(url: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").context("URL without scheme")? + 3;
    let path_start = base[scheme_end..]
        .find('/')
        .map(|i| scheme_end + i)
        .unwrap_or(base.len());
    let mut out = format!("{}/{}", &base[..path_start], name);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

/// `KMS_TEST_POSTGRES_URL`, or `None` (with a notice) when unset and not required.
pub fn postgres_url() -> anyhow::Result<Option<String>> {
    match std::env::var("KMS_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Ok(Some(url)),
        _ if std::env::var("KMS_TEST_REQUIRE_POSTGRES").as_deref() == Ok("1") => {
            bail!("KMS_TEST_REQUIRE_POSTGRES=1 but KMS_TEST_POSTGRES_URL is not set")
        }
        _ => {
            eprintln!("SKIPPED: PostgreSQL half of this test (KMS_TEST_POSTGRES_URL is not set)");
            Ok(None)
        }
    }
}

/// Server parts for the run's token, `db` and the server certificate of `pki`.
pub fn parts(
    db: &TestDb,
    pool_size: usize,
    clock: Arc<dyn Clock>,
    rotation: RotationParams,
    pki: &TestPki,
) -> Parts {
    Parts {
        pkcs11: pkcs11(),
        hsm: hsm_params(pool_size),
        store_url: db.url.clone(),
        store_max_connections: 4,
        clock,
        rotation,
        tls: pki.server_params(),
        authz: AuthzParams {
            bootstrap_officers: vec![pki.principal("officer-1"), pki.principal("officer-2")],
            ..AuthzParams::default()
        },
        audit: Some(AuditParams::default()),
        instance: format!("test-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
    }
}

/// The development identities and the role each is bound to on a test server.
pub const DEV_ROLES: &[(&str, &str)] = kms_cli::pki::DEV_IDENTITIES;

/// How [`TestServer::start_opts`] sets a server up.
pub struct ServerOptions {
    /// Source of time.
    pub clock: Arc<dyn Clock>,
    /// Rotation settings.
    pub rotation: RotationParams,
    /// Whether a break-glass window needs approval (the default) or opens at once.
    pub break_glass_requires_approval: bool,
    /// Whether the audit trail is on (off only for benchmark baselines).
    pub audit: bool,
    /// The label of a token of the test's own ([`new_token`]) instead of the run's token.
    pub token: Option<String>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            clock: Arc::new(SystemClock),
            rotation: RotationParams::default(),
            break_glass_requires_approval: true,
            audit: true,
            token: None,
        }
    }
}

/// A development PKI (`kms-cli pki init`) in a temporary folder, removed when dropped.
pub struct TestPki {
    dir: tempfile::TempDir,
    ca: kms_cli::pki::DevCa,
}

impl TestPki {
    /// The trust domain of test principals.
    pub const TRUST_DOMAIN: &'static str = kms_cli::pki::DEFAULT_TRUST_DOMAIN;

    /// A fresh CA, server certificate and one client certificate per development identity.
    pub fn generate() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("kms-pki-").tempdir()?;
        let written = kms_cli::pki::init(dir.path(), Self::TRUST_DOMAIN, true)?;
        Ok(TestPki {
            dir,
            ca: written.ca,
        })
    }

    /// The folder: `ca.pem`, `ca.key`, `server.pem`, `server.key`, `<name>.pem`, `<name>.key`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA, to issue further (odd) certificates.
    pub fn ca(&self) -> &kms_cli::pki::DevCa {
        &self.ca
    }

    /// The server's TLS settings.
    pub fn server_params(&self) -> TlsParams {
        TlsParams {
            ca_cert: self.dir().join("ca.pem"),
            cert: self.dir().join("server.pem"),
            key: self.dir().join("server.key"),
        }
    }

    /// `DIR/NAME`, as `kms-cli --identity` takes it.
    pub fn identity_path(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    /// The TLS identity of development identity `name` (e.g. `app-1`, `officer-1`).
    pub fn client_tls(&self, name: &str) -> anyhow::Result<sdk::ClientTls> {
        sdk::ClientTls::from_files(
            self.dir().join("ca.pem"),
            self.dir().join(format!("{name}.pem")),
            self.dir().join(format!("{name}.key")),
        )
        .with_context(|| format!("TLS identity {name}"))
    }

    /// The principal of development identity `name`, e.g.
    /// `spiffe://hospital.test/app/app-1`.
    ///
    /// # Panics
    /// When `name` is not one of `kms_cli::pki::DEV_IDENTITIES` (a mistake in the test).
    pub fn principal(&self, name: &str) -> String {
        match kms_cli::pki::DEV_IDENTITIES
            .iter()
            .find(|(n, _)| *n == name)
        {
            Some((name, kind)) => kms_cli::pki::principal(Self::TRUST_DOMAIN, kind, name),
            None => panic!("{name:?} is not a development identity"),
        }
    }
}

/// A clock that tests set and move.
pub struct ManualClock(std::sync::atomic::AtomicI64);

impl ManualClock {
    /// A clock showing `now` (seconds since the Unix epoch).
    pub fn new(now: i64) -> Arc<Self> {
        Arc::new(ManualClock(std::sync::atomic::AtomicI64::new(now)))
    }

    /// Moves the clock forward by `seconds`.
    pub fn advance(&self, seconds: i64) {
        self.0
            .fetch_add(seconds, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_unix(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A running in-process server.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its instance name (what other replicas call it).
    pub instance: String,
    pki: TestPki,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// Starts a server on the run's token and `db`, on `127.0.0.1:0`.
    pub async fn start(db: &TestDb) -> anyhow::Result<Self> {
        Self::start_with(db, 4).await
    }

    /// Starts a server with a session pool of `pool_size`.
    pub async fn start_with(db: &TestDb, pool_size: usize) -> anyhow::Result<Self> {
        let pki = TestPki::generate()?;
        let ready = Ready::open(parts(
            db,
            pool_size,
            Arc::new(SystemClock),
            RotationParams::default(),
            &pki,
        ))
        .await?;
        Self::serve(ready, pki).await
    }

    /// Starts a server with its own clock and rotation settings; also returns its key service.
    pub async fn start_custom(
        db: &TestDb,
        clock: Arc<dyn Clock>,
        rotation: RotationParams,
    ) -> anyhow::Result<(Self, Arc<kms_server::service::KeyService>)> {
        let pki = TestPki::generate()?;
        let ready = Ready::open(parts(db, 4, clock, rotation, &pki)).await?;
        let service = ready.service();
        Ok((Self::serve(ready, pki).await?, service))
    }

    /// Starts a server on the token labelled `token_label` (see [`new_token`]) and `db`.
    pub async fn start_on_token(db: &TestDb, token_label: &str) -> anyhow::Result<Self> {
        Self::start_on_token_with(db, token_label, true).await
    }

    /// Like [`TestServer::start_on_token`]; `so_pin`: whether the server knows the token's
    /// security officer PIN (recovery ceremonies need it).
    pub async fn start_on_token_with(
        db: &TestDb,
        token_label: &str,
        so_pin: bool,
    ) -> anyhow::Result<Self> {
        let pki = TestPki::generate()?;
        let mut parts = parts(
            db,
            4,
            Arc::new(SystemClock),
            RotationParams::default(),
            &pki,
        );
        parts.hsm.token_label = token_label.to_owned();
        if !so_pin {
            parts.hsm.so_pin = None;
        }
        let ready = Ready::open(parts).await?;
        Self::serve(ready, pki).await
    }

    /// Starts a server set up by `options`.
    pub async fn start_opts(db: &TestDb, options: ServerOptions) -> anyhow::Result<Self> {
        let pki = TestPki::generate()?;
        let mut parts = parts(db, 4, options.clock, options.rotation, &pki);
        parts.authz.break_glass_requires_approval = options.break_glass_requires_approval;
        if !options.audit {
            parts.audit = None;
        }
        if let Some(label) = options.token {
            parts.hsm.token_label = label;
        }
        let ready = Ready::open(parts).await?;
        Self::serve(ready, pki).await
    }

    /// Serves an already opened server on `127.0.0.1:0`; `pki` must be the PKI whose
    /// [`TestPki::server_params`] the server was opened with. Binds every development
    /// identity to its role (officer-1 proposes, officer-2 approves) unless already bound.
    pub async fn serve(ready: Ready, pki: TestPki) -> anyhow::Result<Self> {
        let server = Self::serve_only(ready, pki).await?;
        server.bind_dev_roles().await?;
        Ok(server)
    }

    async fn bind_dev_roles(&self) -> anyhow::Result<()> {
        let officer = self.client_as("officer-1").await?;
        let approver = self.client_as("officer-2").await?;
        let bound = officer.list_role_bindings().await?;
        for (name, role) in DEV_ROLES {
            let principal = self.principal(name);
            if bound
                .iter()
                .any(|b| b.principal == principal && b.role == *role)
            {
                continue;
            }
            let outcome = async {
                let request = officer
                    .propose_role_binding(&principal, role, false)
                    .await?;
                let done = approver.approve(&request.approval_id).await?;
                if done.state != "executed" {
                    bail!("binding {name} as {role}: {} {}", done.state, done.result);
                }
                Ok(())
            }
            .await;
            if let Err(e) = outcome {
                // Servers started together on one store: another one may have bound it.
                let now = officer.list_role_bindings().await?;
                if !now
                    .iter()
                    .any(|b| b.principal == principal && b.role == *role)
                {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Issues a certificate for `spiffe://<trust domain>/<kind>/<name>` from the server's CA
    /// and returns a client using it; the principal holds no role.
    pub async fn client_for_new_principal(
        &self,
        kind: &str,
        name: &str,
    ) -> anyhow::Result<sdk::KmsClient> {
        Ok(sdk::KmsClient::from_channel(
            self.channel_for_new_principal(kind, name).await?,
        ))
    }

    /// Like [`TestServer::client_for_new_principal`], as a raw channel.
    pub async fn channel_for_new_principal(
        &self,
        kind: &str,
        name: &str,
    ) -> anyhow::Result<tonic::transport::Channel> {
        let issued = self
            .pki
            .ca()
            .issue_identity(TestPki::TRUST_DOMAIN, kind, name)?;
        let ca = std::fs::read(self.pki.dir().join("ca.pem"))?;
        let tls =
            sdk::ClientTls::from_pem(&ca, issued.cert_pem.as_bytes(), issued.key_pem.as_bytes())?;
        Ok(tls.channel(&self.endpoint()).await?)
    }

    /// A new principal `spiffe://<trust domain>/<role>/<name>`, bound to `role` through an
    /// approved request; returns its client.
    pub async fn add_principal(&self, role: &str, name: &str) -> anyhow::Result<sdk::KmsClient> {
        let client = self.client_for_new_principal(role, name).await?;
        let principal = kms_cli::pki::principal(TestPki::TRUST_DOMAIN, role, name);
        let officer = self.client_as("officer-1").await?;
        let request = officer
            .propose_role_binding(&principal, role, false)
            .await?;
        let done = self
            .client_as("officer-2")
            .await?
            .approve(&request.approval_id)
            .await?;
        if done.state != "executed" {
            bail!("binding {name} as {role}: {}", done.state);
        }
        Ok(client)
    }

    /// Creates a key (as officer-1) and grants `app-1` every key operation on it without
    /// context constraints (approved by officer-2): the set-up of tests about key use.
    pub async fn create_key_for_app(&self, alias: &str) -> anyhow::Result<sdk::KeyInfo> {
        self.create_key_granted(sdk::NewKey {
            alias: Some(alias.to_string()).filter(|a| !a.is_empty()),
            ..sdk::NewKey::default()
        })
        .await
    }

    /// Like [`TestServer::create_key_for_app`], for a fully specified new key.
    pub async fn create_key_granted(&self, new: sdk::NewKey) -> anyhow::Result<sdk::KeyInfo> {
        let officer = self.client_as("officer-1").await?;
        let key = officer.create_key(new).await?;
        self.grant_app(&key.key_id).await?;
        Ok(key)
    }

    /// Grants `app-1` every key operation on `key` (proposed by officer-1, approved by
    /// officer-2).
    pub async fn grant_app(&self, key: &str) -> anyhow::Result<()> {
        let officer = self.client_as("officer-1").await?;
        let request = officer
            .propose_grant(sdk::GrantSpec {
                principal: self.principal("app-1"),
                key: key.to_string(),
                operations: ["generate-data-key", "encrypt", "decrypt", "re-encrypt"]
                    .map(String::from)
                    .to_vec(),
                ..sdk::GrantSpec::default()
            })
            .await?;
        let done = self
            .client_as("officer-2")
            .await?
            .approve(&request.approval_id)
            .await?;
        if done.state != "executed" {
            bail!("grant on {key}: {}", done.state);
        }
        Ok(())
    }

    /// A raw channel with the certificate of development identity `name`.
    pub async fn channel_as(&self, name: &str) -> anyhow::Result<tonic::transport::Channel> {
        Ok(self.pki.client_tls(name)?.channel(&self.endpoint()).await?)
    }

    async fn serve_only(ready: Ready, pki: TestPki) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let instance = ready.instance().to_string();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            ready
                .serve(listener, async {
                    let _ = rx.await;
                })
                .await?;
            Ok(())
        });
        Ok(TestServer {
            addr,
            instance,
            pki,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// The `https://` endpoint of the server.
    pub fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A connected SDK client, as the application identity `app-1`.
    pub async fn client(&self) -> anyhow::Result<sdk::KmsClient> {
        self.client_as("app-1").await
    }

    /// A connected SDK client with the certificate of development identity `name`.
    pub async fn client_as(&self, name: &str) -> anyhow::Result<sdk::KmsClient> {
        let tls = self.pki.client_tls(name)?;
        Ok(sdk::KmsClient::connect(&self.endpoint(), &tls).await?)
    }

    /// The principal of development identity `name` (see [`TestPki::principal`]).
    pub fn principal(&self, name: &str) -> String {
        self.pki.principal(name)
    }

    /// The principal of a non-development identity `name` of `role` (see
    /// [`TestServer::add_principal`]).
    pub fn principal_of(&self, role: &str, name: &str) -> String {
        kms_cli::pki::principal(TestPki::TRUST_DOMAIN, role, name)
    }

    /// The server's PKI folder.
    pub fn pki_dir(&self) -> &Path {
        self.pki.dir()
    }

    /// The server's PKI, with its CA.
    pub fn pki(&self) -> &TestPki {
        &self.pki
    }

    /// `DIR/NAME` of development identity `name`, as `kms-cli --identity` takes it.
    pub fn identity(&self, name: &str) -> String {
        self.pki.identity_path(name).display().to_string()
    }

    /// Stops the server and waits until it has released its store and sessions.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
