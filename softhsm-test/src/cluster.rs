//! Several `kms-server` processes on one PostgreSQL database and one SoftHSM2 token directory:
//! a private PostgreSQL instance that a test may stop and start at will ([`PrivatePostgres`]),
//! and replicas as child processes on loopback ports ([`Cluster`], [`Replica`]) that can be
//! killed with `SIGKILL` and started again on the same port.
//!
//! The replicas are configured exactly as `scripts/lib.sh` configures a server, through `KMS_*`
//! variables: the process's test token ([`crate::token`], the children share its
//! `SOFTHSM2_CONF`), a development PKI ([`crate::TestPki`], made by `kms-cli pki init`'s code),
//! officer-1 and officer-2 as bootstrap officers. Every child is killed when its handle drops.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::TestPki;

/// What this process started and must stop even when it cannot unwind (a watchdog exit):
/// replica process ids and private PostgreSQL instances (`pg_ctl` daemonizes them).
#[derive(Default)]
struct Started {
    replicas: Vec<u32>,
    postgres: Vec<(PathBuf, PathBuf, Option<String>)>,
}

fn registry() -> std::sync::MutexGuard<'static, Started> {
    static STARTED: std::sync::OnceLock<std::sync::Mutex<Started>> = std::sync::OnceLock::new();
    STARTED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Kills every replica and stops every private PostgreSQL instance this process started and
/// has not stopped yet: for a watchdog about to exit the process, where no destructor runs.
pub fn emergency_stop() {
    let mut s = registry();
    for pid in s.replicas.drain(..) {
        let _ = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    for (bin, data, run_as) in s.postgres.drain(..) {
        let _ = pg_ctl(&bin, run_as.as_deref())
            .args(["stop", "-m", "immediate", "-w", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
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
    _dir: tempfile::TempDir,
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
        let dir = tempfile::Builder::new().prefix("kms-pg-").tempdir()?;
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
        pg.start_server()?;
        registry()
            .postgres
            .push((pg.bin.clone(), pg.data.clone(), pg.run_as.clone()));
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

    /// Starts the server again and waits until it accepts connections.
    pub fn start_server(&self) -> anyhow::Result<()> {
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
        registry()
            .postgres
            .retain(|(_, data, _)| *data != self.data);
        let _ = self
            .tool("pg_ctl")
            .args(["stop", "-m", "immediate", "-w", "-D"])
            .arg(&self.data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
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

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the process with `SIGKILL` (no shutdown of any kind) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            let _ = child.kill();
            let _ = child.wait();
            registry().replicas.retain(|p| *p != pid);
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
        let mut cluster = Cluster {
            pki: TestPki::generate()?,
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
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", o.server_bin.display()))?;
        registry().replicas.push(child.id());
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

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
