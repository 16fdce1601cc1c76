//! Several `kms-server` processes on one PostgreSQL database and one SoftHSM2 token directory:
//! a private PostgreSQL instance that a test may stop and start at will ([`PrivatePostgres`]),
//! and replicas as child processes on loopback ports ([`Cluster`], [`Replica`]) that can be
//! killed with `SIGKILL` and started again on the same port.
//!
//! The replicas are configured exactly as `scripts/lib.sh` configures a server, through `KMS_*`
//! variables: the process's test token ([`crate::token`], the children share its
//! `SOFTHSM2_CONF`), a development PKI ([`crate::TestPki`], made by `kms-cli pki init`'s code),
//! officer-1 and officer-2 as bootstrap officers. Every child is killed when its handle drops,
//! and [`emergency_stop`] (a watchdog's or a signal handler's) stops every child and removes
//! every temporary folder this process still has, even one being started at that moment.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::TestPki;

/// What this process started and must stop even when it cannot unwind (a watchdog or a
/// signal exit): replica process ids, private PostgreSQL instances (`pg_ctl` daemonizes them,
/// in a session of their own, so neither a terminal's `SIGINT` nor this process's death reaches
/// them) and temporary folders (the PostgreSQL data, the PKI with its CA key, logs).
///
/// Every process is started, and every folder made, while holding the registry's lock and
/// registered before it is released; [`emergency_stop`] takes the same lock and refuses every
/// later start ([`stopping`]). So a process is either seen by the stop or never started, even
/// a replica being restarted at that moment.
#[derive(Default)]
struct Started {
    replicas: Vec<u32>,
    postgres: Vec<(PathBuf, PathBuf, Option<String>)>,
    dirs: Vec<PathBuf>,
}

/// Set (for good) when [`emergency_stop`] begins.
static STOPPING: AtomicBool = AtomicBool::new(false);

fn registry() -> std::sync::MutexGuard<'static, Started> {
    static STARTED: std::sync::OnceLock<std::sync::Mutex<Started>> = std::sync::OnceLock::new();
    STARTED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// The registry, unless an emergency stop has begun (then nothing may be started any more).
fn registry_for_start() -> anyhow::Result<std::sync::MutexGuard<'static, Started>> {
    let s = registry();
    if stopping() {
        bail!("stopping: nothing more is started");
    }
    Ok(s)
}

/// Whether [`emergency_stop`] has begun (the process is about to exit).
pub fn stopping() -> bool {
    STOPPING.load(Ordering::SeqCst)
}

/// Kills every replica, stops every private PostgreSQL instance and removes every registered
/// temporary folder this process has not stopped or removed yet; refuses every later start.
/// For a watchdog or a signal handler about to exit the process, where no destructor runs, and
/// as a last sweep before a normal exit (a no-op when everything was dropped). Waits for a
/// start in progress (held under the same lock) and then stops what it started.
pub fn emergency_stop() {
    STOPPING.store(true, Ordering::SeqCst);
    let mut s = registry();
    let pids: Vec<String> = s.replicas.drain(..).map(|p| p.to_string()).collect();
    if !pids.is_empty() {
        let _ = Command::new("kill")
            .arg("-9")
            .args(&pids)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    for (bin, data, run_as) in s.postgres.drain(..) {
        stop_immediately(&bin, &data, run_as.as_deref());
    }
    for dir in s.dirs.drain(..) {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `pg_ctl stop -m immediate` (at most 20 s); if that fails, `SIGKILL` to the postmaster named
/// in the pid file, when that process is still a `postgres` of this data folder.
fn stop_immediately(bin: &Path, data: &Path, run_as: Option<&str>) {
    let stopped = pg_ctl(bin, run_as)
        .args(["stop", "-m", "immediate", "-w", "-t", "20", "-D"])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if stopped {
        return;
    }
    let Some(pid) = std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
    else {
        return;
    };
    let ours = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let data = data.as_os_str().as_encoded_bytes();
        args.first().is_some_and(|a| a.ends_with(b"postgres")) && args.contains(&data)
    });
    if ours {
        let _ = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Registers `dir` for removal by [`emergency_stop`] (e.g. a folder made by other code).
pub fn track_dir(dir: &Path) {
    registry().dirs.push(dir.to_path_buf());
}

/// Removes `dir` now and unregisters it (both under the registry's lock, so an emergency stop
/// either removes it itself or finds it gone).
pub fn remove_tracked_dir(dir: &Path) {
    let mut s = registry();
    let _ = std::fs::remove_dir_all(dir);
    s.dirs.retain(|d| d != dir);
}

/// A temporary folder that [`emergency_stop`] removes too; removed when dropped, unless kept.
pub struct TempDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

/// Makes a temporary folder named `<prefix>*` (in the system's temporary folder), registered
/// for [`emergency_stop`].
pub fn temp_dir(prefix: &str) -> anyhow::Result<TempDir> {
    let mut s = registry_for_start()?;
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    let path = dir.path().to_path_buf();
    s.dirs.push(path.clone());
    Ok(TempDir {
        dir: Some(dir),
        path,
    })
}

impl TempDir {
    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the folder (for a failure's logs): unregistered, not removed.
    pub fn keep(mut self) -> PathBuf {
        let mut s = registry();
        s.dirs.retain(|d| *d != self.path);
        if let Some(dir) = self.dir.take() {
            let _ = dir.keep();
        }
        self.path.clone()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let mut s = registry();
            let _ = dir.close();
            s.dirs.retain(|d| *d != self.path);
        }
    }
}

fn pg_ctl(bin: &Path, run_as: Option<&str>) -> Command {
    pg_tool(bin, "pg_ctl", run_as)
}

/// A PostgreSQL server tool from `bin`, run as `run_as` when given (initdb and the server
/// refuse to run as root).
fn pg_tool(bin: &Path, name: &str, run_as: Option<&str>) -> Command {
    let path = bin.join(name);
    let mut command = match run_as {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(path);
            c
        }
        None => Command::new(path),
    };
    command.stdin(Stdio::null());
    command
}

/// A PostgreSQL server of the test's own: `initdb` in a temporary folder, `pg_ctl` on a free
/// loopback port, trust authentication for `postgres`. Run as the `postgres` user when this
/// process is root (PostgreSQL refuses to run as root). Stopped (immediately) when dropped.
pub struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    run_as: Option<String>,
    _dir: TempDir,
}

impl PrivatePostgres {
    /// Initializes and starts a fresh instance. `None` when no PostgreSQL server binaries are
    /// installed (`KMS_PG_BINDIR`, `pg_config --bindir`, `/usr/lib/postgresql/*/bin`), unless
    /// `KMS_TEST_REQUIRE_POSTGRES=1`, which makes that an error.
    pub fn start() -> anyhow::Result<Option<Self>> {
        let Some(bin) = postgres_bindir() else {
            if std::env::var("KMS_TEST_REQUIRE_POSTGRES").as_deref() == Ok("1") {
                bail!("KMS_TEST_REQUIRE_POSTGRES=1 but no PostgreSQL server binaries (initdb, pg_ctl) are installed");
            }
            eprintln!(
                "SKIPPED: no PostgreSQL server binaries (initdb, pg_ctl) for a private instance"
            );
            return Ok(None);
        };
        let run_as = if effective_uid() == Some(0) {
            Some("postgres".to_string())
        } else {
            None
        };
        let dir = temp_dir("kms-pg-")?;
        let data = dir.path().join("data");
        let log = dir.path().join("postgres.log");
        if let Some(user) = &run_as {
            // The server's user must reach its files.
            std::fs::set_permissions(
                dir.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )?;
            run(Command::new("chown").arg(user).arg(dir.path()))
                .context("give the PostgreSQL folder to its user")?;
        }
        let pg = PrivatePostgres {
            port: free_port()?,
            bin,
            data,
            log,
            run_as,
            _dir: dir,
        };
        // Registered before initdb: from here on an emergency stop stops it (`pg_ctl stop` on a
        // folder without a running server does nothing) and removes the folder.
        registry_for_start()?
            .postgres
            .push((pg.bin.clone(), pg.data.clone(), pg.run_as.clone()));
        let initdb = registry_for_start()?;
        pg.tool("initdb")
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(&pg.data)
            .stdout(Stdio::null())
            .status()
            .context("initdb")?
            .success()
            .then_some(())
            .context("initdb failed")?;
        drop(initdb);
        pg.start_server()?;
        Ok(Some(pg))
    }

    /// A URL of database `db` on this instance.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates database `name`.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<()> {
        use sqlx::Connection as _;
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&self.url("postgres")).await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        Ok(())
    }

    /// Stops the server (`pg_ctl stop -m fast`: open connections are terminated) and waits.
    pub fn stop(&self) -> anyhow::Result<()> {
        run(self
            .tool("pg_ctl")
            .args(["stop", "-m", "fast", "-w", "-t", "60", "-D"])
            .arg(&self.data))
        .context("pg_ctl stop")
    }

    /// Starts the server again and waits until it accepts connections (refused once an
    /// emergency stop has begun; an emergency stop waits for a start in progress).
    pub fn start_server(&self) -> anyhow::Result<()> {
        let _started = registry_for_start()?;
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={} \
             -c max_connections=200 -c fsync=on -c synchronous_commit=on",
            self.port,
            self.data.display()
        );
        run(self
            .tool("pg_ctl")
            .args(["start", "-w", "-t", "60", "-o", &options, "-l"])
            .arg(&self.log)
            .arg("-D")
            .arg(&self.data))
        .with_context(|| format!("pg_ctl start (log: {})", self.log.display()))
    }

    /// The server's log so far (for failure reports).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn tool(&self, name: &str) -> Command {
        pg_tool(&self.bin, name, self.run_as.as_deref())
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // Stopped, then unregistered, under the lock: an emergency stop meanwhile waits.
        let mut s = registry();
        stop_immediately(&self.bin, &self.data, self.run_as.as_deref());
        s.postgres.retain(|(_, data, _)| *data != self.data);
    }
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command.stdin(Stdio::null()).output()?;
    if !output.status.success() {
        bail!(
            "{:?} failed ({}): {}{}",
            command.get_program(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Where `initdb` and `pg_ctl` are.
fn postgres_bindir() -> Option<PathBuf> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Ok(dir) = std::env::var("KMS_PG_BINDIR") {
        return Some(PathBuf::from(dir)).filter(|d| has_tools(d));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_tools(&dir) {
            return Some(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, dir)| has_tools(dir))
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

/// This process's effective user id, from `/proc/self/status`.
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// A free loopback port (the short race until a server binds it is acceptable for tests).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// How a [`Cluster`] starts its replicas.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The `kms-server` binary.
    pub server_bin: PathBuf,
    /// The store every replica uses.
    pub store_url: String,
    /// Where configuration-free state goes: each replica's log.
    pub dir: PathBuf,
    /// HSM session pool per replica.
    pub session_pool: usize,
    /// Store pool per replica (plus the audit writer's own connection).
    pub store_connections: u32,
    /// Scheduler interval (seconds).
    pub check_interval_secs: u64,
    /// `KMS_LOG` of the replicas.
    pub log_filter: String,
    /// Extra `KMS_*` variables for every replica.
    pub extra_env: Vec<(String, String)>,
}

/// One `kms-server` child process; it keeps its port and name across restarts.
pub struct Replica {
    /// Its instance name (`KMS_INSTANCE_NAME`).
    pub name: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl Replica {
    /// `https://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is running (one that exited is reaped and unregistered, so that
    /// an emergency stop never signals a reused process id).
    pub fn is_running(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        let mut s = registry();
        match child.try_wait() {
            Ok(None) => true,
            Ok(Some(_)) => {
                let pid = child.id();
                s.replicas.retain(|p| *p != pid);
                false
            }
            Err(_) => false,
        }
    }

    /// Kills the process with `SIGKILL` (no shutdown of any kind) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            let mut s = registry();
            let _ = child.kill();
            let _ = child.wait();
            s.replicas.retain(|p| *p != pid);
        }
    }

    /// The replica's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Replicas on one store and token, sharing one development PKI.
pub struct Cluster {
    options: ClusterOptions,
    /// The development PKI: the server certificate every replica presents, and the clients'.
    pub pki: TestPki,
    /// The replicas, in order (`replica-1`, ...).
    pub replicas: Vec<Replica>,
}

impl Cluster {
    /// Starts `n` replicas (one after the other: the first initializes the store) and waits
    /// until each answers `Ping` (at most 60 s each).
    pub async fn start(options: ClusterOptions, n: usize) -> anyhow::Result<Self> {
        if !options.server_bin.is_file() {
            bail!("{} is not a file", options.server_bin.display());
        }
        std::fs::create_dir_all(&options.dir)?;
        let pki = {
            let mut s = registry_for_start()?;
            let pki = TestPki::generate()?;
            s.dirs.push(pki.dir().to_path_buf());
            pki
        };
        let mut cluster = Cluster {
            pki,
            options,
            replicas: Vec::new(),
        };
        for i in 1..=n {
            let name = format!("replica-{i}");
            cluster.replicas.push(Replica {
                log: cluster.options.dir.join(format!("{name}.log")),
                name,
                port: free_port()?,
                child: None,
            });
            cluster.start_replica(i - 1).await?;
        }
        Ok(cluster)
    }

    /// (Re)starts replica `index` on its port and waits until it answers `Ping`; returns how
    /// long that took.
    pub async fn start_replica(&mut self, index: usize) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let tls = self.pki.server_params();
        let officers = format!(
            "{},{}",
            self.pki.principal("officer-1"),
            self.pki.principal("officer-2")
        );
        let o = &self.options;
        let replica = &mut self.replicas[index];
        replica.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&replica.log)
            .context("replica log")?;
        let mut command = Command::new(&o.server_bin);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("SOFTHSM2_CONF", crate::softhsm_conf())
            .env("KMS_LISTEN", format!("127.0.0.1:{}", replica.port))
            .env("KMS_INSTANCE_NAME", &replica.name)
            .env("KMS_HSM_MODULE", crate::module_path())
            .env("KMS_HSM_TOKEN_LABEL", &crate::token().label)
            .env("KMS_HSM_PIN", crate::USER_PIN)
            .env("KMS_HSM_SESSION_POOL_SIZE", o.session_pool.to_string())
            .env("KMS_STORE_URL", &o.store_url)
            .env("KMS_STORE_MAX_CONNECTIONS", o.store_connections.to_string())
            .env(
                "KMS_ROTATION_CHECK_INTERVAL_SECS",
                o.check_interval_secs.to_string(),
            )
            .env("KMS_TLS_CA_CERT", &tls.ca_cert)
            .env("KMS_TLS_CERT", &tls.cert)
            .env("KMS_TLS_KEY", &tls.key)
            .env("KMS_BOOTSTRAP_SECURITY_OFFICERS", officers)
            .env("KMS_LOG", &o.log_filter);
        for (k, v) in &o.extra_env {
            command.env(k, v);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = spawn_registered(&mut command)
            .with_context(|| format!("start {}", o.server_bin.display()))?;
        replica.child = Some(child);
        let endpoint = replica.endpoint();
        let officer = self.pki.client_tls("officer-1")?;
        let deadline = started + Duration::from_secs(60);
        let mut last = String::new();
        while Instant::now() < deadline {
            if !self.replicas[index].is_running() {
                bail!(
                    "{} exited during start-up:\n{}",
                    self.replicas[index].name,
                    tail(&self.replicas[index].log(), 30)
                );
            }
            match tokio::time::timeout(
                Duration::from_secs(2),
                sdk::KmsClient::connect(&endpoint, &officer),
            )
            .await
            {
                Ok(Ok(client)) => match client.ping().await {
                    Ok(()) => return Ok(started.elapsed()),
                    Err(e) => last = e.to_string(),
                },
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "connect timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "{} did not answer Ping within 60 s ({last}):\n{}",
            self.replicas[index].name,
            tail(&self.replicas[index].log(), 30)
        )
    }

    /// Every replica's `ERROR` lines (at most `lines` each, the first ones: what went wrong
    /// first explains the rest).
    pub fn errors(&self, lines: usize) -> String {
        let mut out = String::new();
        for r in &self.replicas {
            let log = r.log();
            let errors: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(" ERROR "))
                .take(lines)
                .collect();
            out.push_str(&format!(
                "--- {} errors ---\n{}\n",
                r.name,
                errors.join("\n")
            ));
        }
        out
    }

    /// The last lines of every replica's log.
    pub fn logs(&self, lines: usize) -> String {
        let mut out = String::new();
        for r in &self.replicas {
            out.push_str(&format!("--- {} ---\n{}\n", r.name, tail(&r.log(), lines)));
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for r in &mut self.replicas {
            r.kill();
        }
        // The PKI folder (with its CA key) goes under the registry's lock, not after it.
        remove_tracked_dir(self.pki.dir());
    }
}

/// Spawns `command` and registers its process id for [`emergency_stop`], both under the
/// registry's lock (refused once a stop has begun).
fn spawn_registered(command: &mut Command) -> anyhow::Result<Child> {
    let mut s = registry_for_start()?;
    let child = command.spawn()?;
    s.replicas.push(child.id());
    Ok(child)
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
