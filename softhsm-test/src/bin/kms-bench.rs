//! `kms-bench`: a load generator that measures the KMS against limits taken in the same run.
//!
//! What it does, end to end, with nothing to set up by hand:
//!
//! 1. creates a fresh SoftHSM2 token in a private temporary token directory
//!    ([`softhsm_test::token`]) and starts the release `kms-server` binary as a child process on
//!    `127.0.0.1:<free port>`, configured only through `KMS_*` variables, with a SQLite store in
//!    a temporary directory and a development PKI ([`softhsm_test::TestPki`]): every connection
//!    is mutual TLS 1.3, exactly as in production, with `officer-1` and `officer-2` as the
//!    bootstrap security officers; it waits (at most 30 s) until `Ping` answers;
//! 2. sets up separation of duties as in production: officer-1 binds `app-1` to the `app` role
//!    and creates one key, and grants app-1 `generate-data-key` and `decrypt` on it (each
//!    change approved by officer-2); app-1 makes every measured call and one data-key blob
//!    under the key;
//! 3. for every concurrency level (`--concurrency`, default `1,8,64`) and every client set-up
//!    (`--connections`, default `1,4` HTTP/2 connections shared round-robin by the tasks),
//!    runs for `--seconds` (after `--warmup`), recording every call's latency:
//!    - `Ping` through the SDK: the floor of the RPC stack (same server, same connections);
//!    - `GenerateDataKey` and `Decrypt` through the SDK;
//!    - the direct PKCS#11 limit on the same token, in this process, with as many OS threads as
//!      the concurrency level, each with its own logged-in session: the exact HSM work of
//!      `GenerateDataKey` (`C_GenerateRandom` 32 + 12 bytes, `C_Encrypt` AES-256-GCM with the
//!      same 42-byte AAD the server builds) and of `Decrypt` (`C_Decrypt` AES-256-GCM);
//! 4. reports throughput, p50 and p99, and the ratios KMS throughput / min(HSM loop, Ping)
//!    (target ≥ 0.75 at concurrency 64) and KMS p99 / Ping p99 (target ≤ 1.3);
//! 5. samples the server's `VmRSS` during the load and reads its `VmHWM` at the end
//!    (target ≤ 200 MiB);
//! 6. creates keys (officer-1, each with an approved grant for app-1) until there are `--keys`
//!    (default 1,000) and compares `GenerateDataKey` at concurrency 8 spread round-robin over
//!    10 keys and over all keys (target: ≤ 1.2×); the on-demand rotations of the last phase
//!    are officer-1's too.
//!
//! Run it from the workspace root:
//!
//! ```text
//! cargo build --release -p kms-server -p softhsm-test && ./target/release/kms-bench
//! ```
//!
//! `--json FILE` also writes the figures as JSON. The whole run is bounded: every RPC has a
//! timeout, every phase a fixed duration, and a watchdog (`--max-total-seconds`) kills the
//! server and exits if anything hangs. The server child is killed on every exit path.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use cryptoki::context::Pkcs11;
use sdk::KmsClient;
use softhsm_test::bench::{run_rpc, HsmTarget, HsmWork, Stats, CALL_TIMEOUT};

/// How long the server may take to answer its first `Ping`.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Throughput ratio target at [`TARGET_CONCURRENCY`].
const TARGET_THROUGHPUT_RATIO: f64 = 0.75;
/// p99 ratio target (KMS p99 / Ping p99).
const TARGET_P99_RATIO: f64 = 1.3;
/// The concurrency at which the targets apply.
const TARGET_CONCURRENCY: usize = 64;
/// Server memory target.
const TARGET_RSS_MIB: f64 = 200.0;
/// Key-count scaling target (many-key p50/p99 over few-key p50/p99).
const TARGET_SCALING_RATIO: f64 = 1.2;
/// Concurrency of key creation and of the key-count comparison.
const SCALING_CONCURRENCY: usize = 8;

/// Load generator for kms-server: throughput and latency against limits measured in the same run.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The kms-server binary (default: `kms-server` beside this executable).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Server HSM session pool size (`KMS_HSM_SESSION_POOL_SIZE`).
    #[arg(long, default_value_t = 8)]
    pool: usize,
    /// Concurrency levels: tokio tasks for RPCs, OS threads for the direct PKCS#11 loops.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    concurrency: Vec<usize>,
    /// Client set-ups to compare: number of HTTP/2 connections the tasks share round-robin.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    connections: Vec<usize>,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Warm-up seconds before each phase (not recorded).
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Total number of keys for the key-count scaling phase (0 skips it).
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Number of keys of the small side of the key-count comparison.
    #[arg(long, default_value_t = 10)]
    few_keys: usize,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Hard limit on the whole run: the server is killed and the bench exits after it.
    #[arg(long, default_value_t = 900)]
    max_total_seconds: u64,
    /// Run the server with its audit trail off (`KMS_AUDIT_ENABLED=false`): only as the
    /// baseline of `scripts/bench-audit.sh`, which measures what durable auditing costs.
    #[arg(long)]
    audit_off: bool,
    /// Skip the rotation-under-load phase.
    #[arg(long)]
    no_rotation: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency needs positive numbers");
    }
    if args.connections.is_empty() || args.connections.contains(&0) {
        bail!("--connections needs positive numbers");
    }
    if !(0.001..=600.0).contains(&args.seconds) || !(0.0..=60.0).contains(&args.warmup) {
        bail!("--seconds must be in [0.001, 600] and --warmup in [0, 60]");
    }
    if args.keys != 0 && (args.few_keys == 0 || args.few_keys > args.keys) {
        bail!("--few-keys must be between 1 and --keys");
    }
    let server_bin = softhsm_test::bench::server_bin(args.server_bin.as_deref())?;

    // The token (and SOFTHSM2_CONF for this process) first: the child inherits the same conf.
    let token_label = softhsm_test::token().label.clone();
    let conf = softhsm_test::softhsm_conf();
    let pkcs11 = softhsm_test::pkcs11();

    let db_dir = tempfile::Builder::new().prefix("kms-bench-db-").tempdir()?;
    let pki = softhsm_test::TestPki::generate().context("development PKI")?;
    let ids = Identities {
        app: pki.client_tls("app-1")?,
        app_principal: pki.principal("app-1"),
        officer: pki.client_tls("officer-1")?,
        approver: pki.client_tls("officer-2")?,
    };
    let officers = format!(
        "{},{}",
        pki.principal("officer-1"),
        pki.principal("officer-2")
    );
    let server_tls = pki.server_params();
    let port = free_port()?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let log_path = db_dir.path().join("server.log");
    let log = std::fs::File::create(&log_path).context("server log file")?;
    let child = Command::new(&server_bin)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("SOFTHSM2_CONF", &conf)
        .env("KMS_LISTEN", addr.to_string())
        .env("KMS_HSM_MODULE", softhsm_test::module_path())
        .env("KMS_HSM_TOKEN_LABEL", &token_label)
        .env("KMS_HSM_PIN", softhsm_test::USER_PIN)
        .env(
            "KMS_STORE_URL",
            format!("sqlite://{}", db_dir.path().join("kms.db").display()),
        )
        .env("KMS_TLS_CA_CERT", &server_tls.ca_cert)
        .env("KMS_TLS_CERT", &server_tls.cert)
        .env("KMS_TLS_KEY", &server_tls.key)
        .env("KMS_BOOTSTRAP_SECURITY_OFFICERS", officers)
        .env("KMS_HSM_SESSION_POOL_SIZE", args.pool.to_string())
        .env(
            "KMS_AUDIT_ENABLED",
            if args.audit_off { "false" } else { "true" },
        )
        .env("KMS_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {}", server_bin.display()))?;
    let server = ServerGuard::new(child);
    let pid = server.pid();
    server.watchdog(Duration::from_secs(args.max_total_seconds));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let outcome = run(&args, &rt, &pkcs11, &token_label, addr, pid, &server, &ids);
    if outcome.is_err() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if !text.trim().is_empty() {
            eprintln!("--- kms-server log ---\n{}", tail(&text, 40));
        }
    }
    drop(server);
    drop(rt);
    // softhsm-test keeps its token directory for the life of the process; this run is over.
    if let Some(dir) = conf.parent() {
        let is_ours = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("kms-softhsm-"));
        if is_ours {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    outcome
}

/// The TLS identities the bench connects with.
struct Identities {
    /// `app-1`: every measured call.
    app: sdk::ClientTls,
    /// The principal of `app-1`, for its role binding and grants.
    app_principal: String,
    /// `officer-1`: key management; proposes the binding and the grants.
    officer: sdk::ClientTls,
    /// `officer-2`: approves officer-1's proposals.
    approver: sdk::ClientTls,
}

#[allow(clippy::too_many_arguments)]
fn run(
    args: &Args,
    rt: &tokio::runtime::Runtime,
    pkcs11: &Pkcs11,
    token_label: &str,
    addr: SocketAddr,
    pid: u32,
    server: &ServerGuard,
    ids: &Identities,
) -> anyhow::Result<()> {
    let endpoint = format!("https://{addr}");
    let load_before = loadavg();
    let started = Instant::now();
    // Only the bootstrap officers hold a role on a fresh server.
    let officer = rt.block_on(wait_ready(&endpoint, &ids.officer, server))?;
    let startup_ms = started.elapsed().as_secs_f64() * 1000.0;
    eprintln!("kms-server ready on {addr} after {startup_ms:.0} ms (pid {pid})");
    let approver = rt
        .block_on(connect_many(&endpoint, &ids.approver, 1))?
        .remove(0);
    let app = ids.app_principal.as_str();
    rt.block_on(async {
        let proposal = officer
            .propose_role_binding(app, "app", false)
            .await
            .context("ProposeRoleBinding app-1")?;
        approve(&approver, &proposal.approval_id).await
    })
    .context("bind app-1 to the app role")?;

    let ctx: sdk::Context = BTreeMap::from([("bench".to_string(), "1".to_string())]);
    let key = rt
        .block_on(officer.create_key(sdk::NewKey {
            description: "kms-bench".into(),
            ..Default::default()
        }))
        .context("CreateKey")?;
    let key_id = key.key_id.clone();
    rt.block_on(grant_app(&officer, &approver, app, &key_id))?;
    let tls = &ids.app;
    let probe = rt.block_on(connect_many(&endpoint, tls, 1))?.remove(0);
    let blob = rt
        .block_on(probe.generate_data_key(&key_id, &ctx))
        .context("GenerateDataKey (set-up)")?
        .blob;
    let key_uuid = uuid::Uuid::parse_str(&key_id).context("key id is not a UUID")?;
    let aad = kms_server::blob::NewBlob::new(key_uuid, 1, &proto::context::encode(&ctx)).aad;

    let hsm = HsmTarget::open(pkcs11, token_label, &format!("kms:{key_id}:v1"))?;

    let rss = RssSampler::start(pid);
    let warmup = Duration::from_secs_f64(args.warmup);
    let measure = Duration::from_secs_f64(args.seconds);

    let mut levels = Vec::new();
    for &c in &args.concurrency {
        let mut by_conns = Vec::new();
        for &n in &args.connections {
            eprintln!("concurrency {c}, {n} connection(s): Ping, GenerateDataKey, Decrypt");
            let clients = rt.block_on(connect_many(&endpoint, tls, n))?;
            let ping = rt.block_on(run_rpc(
                &clients,
                c,
                warmup,
                measure,
                |client, _| async move { client.ping().await },
            ))?;
            let gdk = {
                let key_id = key_id.clone();
                let ctx = ctx.clone();
                rt.block_on(run_rpc(&clients, c, warmup, measure, move |client, _| {
                    let key_id = key_id.clone();
                    let ctx = ctx.clone();
                    async move { client.generate_data_key(&key_id, &ctx).await.map(drop) }
                }))?
            };
            let dec = {
                let blob = Arc::new(blob.clone());
                let ctx = ctx.clone();
                rt.block_on(run_rpc(&clients, c, warmup, measure, move |client, _| {
                    let blob = Arc::clone(&blob);
                    let ctx = ctx.clone();
                    async move { client.decrypt(&blob, &ctx, None).await.map(drop) }
                }))?
            };
            by_conns.push(RpcSet {
                connections: n,
                ping,
                gdk,
                dec,
            });
        }
        eprintln!("concurrency {c}: direct PKCS#11 loops ({c} threads)");
        let hsm_gdk = hsm.run(c, warmup, measure, HsmWork::GenerateDataKey, &aad)?;
        let hsm_dec = hsm.run(c, warmup, measure, HsmWork::Decrypt, &aad)?;
        levels.push(Level {
            concurrency: c,
            hsm_gdk,
            hsm_dec,
            rpc: by_conns,
        });
    }

    let scaling = if args.keys > 0 {
        let connections = args.connections[0];
        eprintln!(
            "creating keys (each with an approved grant for app-1) up to {} in total",
            args.keys
        );
        let clients = rt.block_on(connect_many(&endpoint, tls, connections))?;
        let officers = rt.block_on(connect_many(&endpoint, &ids.officer, connections))?;
        let t = Instant::now();
        let mut keys = vec![key_id.clone()];
        let created = rt.block_on(create_keys(
            &officers,
            &approver,
            app,
            args.keys.saturating_sub(1),
        ))?;
        keys.extend(created);
        let create_secs = t.elapsed().as_secs_f64();
        eprintln!(
            "{} keys in {create_secs:.1} s; GenerateDataKey over {} vs {} keys",
            keys.len(),
            args.few_keys,
            keys.len()
        );
        let few = rt.block_on(gdk_round_robin(
            &clients,
            &keys[..args.few_keys],
            &ctx,
            warmup,
            measure,
        ))?;
        let many = rt.block_on(gdk_round_robin(&clients, &keys, &ctx, warmup, measure))?;
        Some(Scaling {
            connections,
            create_secs,
            few_count: args.few_keys,
            many_count: keys.len(),
            few,
            many,
        })
    } else {
        None
    };

    // Rotation under load: GenerateDataKey at the scaling concurrency on one key, first
    // undisturbed, then while another connection rotates that key every 250 ms.
    let rotation = if args.no_rotation {
        None
    } else {
        eprintln!("GenerateDataKey with and without rotations every 250 ms");
        let clients = rt.block_on(connect_many(&endpoint, tls, 1))?;
        let one_key = [key_id.clone()];
        let quiet = rt.block_on(gdk_round_robin(&clients, &one_key, &ctx, warmup, measure))?;
        let stop = Arc::new(AtomicBool::new(false));
        let rotator = {
            let (client, key, stop) = (officer.clone(), key_id.clone(), Arc::clone(&stop));
            rt.spawn(async move {
                let mut rotations = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    client.rotate_key(&key).await?;
                    rotations += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                anyhow::Ok(rotations)
            })
        };
        let rotating = rt.block_on(gdk_round_robin(&clients, &one_key, &ctx, warmup, measure))?;
        stop.store(true, Ordering::Relaxed);
        let rotations = rt.block_on(rotator).context("rotator panicked")??;
        Some((quiet, rotating, rotations))
    };

    let rss_max_kib = rss.stop();
    let hwm_kib = proc_status_kib(pid, "VmHWM:").context("read VmHWM of the server")?;
    let rss_end_kib = proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let memory = Memory {
        rss_max_kib,
        rss_end_kib,
        hwm_kib,
    };

    let report = Report {
        args,
        load_before,
        load_after: loadavg(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        startup_ms,
        levels,
        scaling,
        memory,
    };
    print!("{}", report.markdown());
    if let Some((quiet, rotating, rotations)) = rotation {
        let p99_ratio = rotating.p99() as f64 / quiet.p99().max(1) as f64;
        println!("\n## Rotation under load\n");
        println!(
            "GenerateDataKey at concurrency {SCALING_CONCURRENCY} on one key; the second run rotates that key every 250 ms ({rotations} rotations). Target: p99 within 1.5x.\n"
        );
        println!("| run | calls/s | p50 µs | p99 µs |\n|---|---:|---:|---:|");
        println!(
            "| no rotation | {:.0} | {} | {} |",
            quiet.per_sec(),
            quiet.p50(),
            quiet.p99()
        );
        println!(
            "| rotating | {:.0} | {} | {} |",
            rotating.per_sec(),
            rotating.p50(),
            rotating.p99()
        );
        println!(
            "\np99 ratio rotating / quiet: {p99_ratio:.2} ({})",
            if p99_ratio <= 1.5 { "PASS" } else { "FAIL" }
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, report.json()).with_context(|| format!("write {}", path.display()))?;
        eprintln!("JSON written to {}", path.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The server child.

/// Owns the `kms-server` child: kills and reaps it when dropped (every exit path), or when the
/// watchdog fires.
struct ServerGuard {
    child: Arc<Mutex<Option<Child>>>,
    pid: u32,
}

impl ServerGuard {
    fn new(child: Child) -> Self {
        let pid = child.id();
        ServerGuard {
            child: Arc::new(Mutex::new(Some(child))),
            pid,
        }
    }

    fn pid(&self) -> u32 {
        self.pid
    }

    /// `Some(status)` once the child has exited.
    fn exited(&self) -> Option<std::process::ExitStatus> {
        let mut guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// After `limit`, kills the server and ends the process: nothing may run forever.
    fn watchdog(&self, limit: Duration) {
        let child = Arc::clone(&self.child);
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            eprintln!(
                "kms-bench: watchdog: run exceeded {} s; killing the server",
                limit.as_secs()
            );
            kill(&child);
            std::process::exit(3);
        });
    }
}

fn kill(child: &Mutex<Option<Child>>) {
    let mut guard = child.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(mut c) = guard.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        kill(&self.child);
    }
}

/// A free loopback port (the tiny race until the server binds it is acceptable for a tool).
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("find a free port")?;
    Ok(listener.local_addr()?.port())
}

async fn wait_ready(
    endpoint: &str,
    tls: &sdk::ClientTls,
    server: &ServerGuard,
) -> anyhow::Result<KmsClient> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Some(status) = server.exited() {
            bail!("kms-server exited during start-up ({status})");
        }
        match tokio::time::timeout(Duration::from_secs(2), KmsClient::connect(endpoint, tls)).await
        {
            Ok(Ok(client)) => {
                match tokio::time::timeout(Duration::from_secs(2), client.ping()).await {
                    Ok(Ok(())) => return Ok(client),
                    Ok(Err(e)) => last = e.to_string(),
                    Err(_) => last = "ping timed out".into(),
                }
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "connect timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "kms-server did not answer Ping within {} s: {last}",
        STARTUP_TIMEOUT.as_secs()
    )
}

async fn connect_many(
    endpoint: &str,
    tls: &sdk::ClientTls,
    n: usize,
) -> anyhow::Result<Vec<KmsClient>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let client = tokio::time::timeout(CALL_TIMEOUT, KmsClient::connect(endpoint, tls))
            .await
            .context("connect timed out")?
            .context("connect")?;
        clients.push(client);
    }
    Ok(clients)
}

// ---------------------------------------------------------------------------------------------
// Measurements.
/// Approves request `approval_id` as `approver`; fails unless it executed.
async fn approve(approver: &KmsClient, approval_id: &str) -> anyhow::Result<()> {
    let done = tokio::time::timeout(CALL_TIMEOUT, approver.approve(approval_id))
        .await
        .context("Approve timed out")?
        .context("Approve")?;
    if done.state != "executed" {
        bail!("approval {approval_id}: {} {}", done.state, done.result);
    }
    Ok(())
}

/// Grants `app` the operations the bench measures on `key`: proposed by `officer`, approved
/// by `approver`.
async fn grant_app(
    officer: &KmsClient,
    approver: &KmsClient,
    app: &str,
    key: &str,
) -> anyhow::Result<()> {
    let proposal = tokio::time::timeout(
        CALL_TIMEOUT,
        officer.propose_grant(sdk::GrantSpec {
            principal: app.to_string(),
            key: key.to_string(),
            operations: vec!["generate-data-key".into(), "decrypt".into()],
            ..sdk::GrantSpec::default()
        }),
    )
    .await
    .context("ProposeGrant timed out")?
    .context("ProposeGrant")?;
    approve(approver, &proposal.approval_id)
        .await
        .context("grant app-1 a key")
}

/// Creates `count` keys from [`SCALING_CONCURRENCY`] tasks as the officers of `clients`, each
/// with an approved grant for `app`; returns their ids.
async fn create_keys(
    clients: &[KmsClient],
    approver: &KmsClient,
    app: &str,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..SCALING_CONCURRENCY {
        let client = clients[i % clients.len()].clone();
        let approver = approver.clone();
        let app = app.to_string();
        let next = Arc::clone(&next);
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let key = tokio::time::timeout(
                    CALL_TIMEOUT,
                    client.create_key(sdk::NewKey {
                        description: "kms-bench scaling".into(),
                        ..Default::default()
                    }),
                )
                .await
                .context("CreateKey timed out")?
                .context("CreateKey")?;
                grant_app(&client, &approver, &app, &key.key_id).await?;
                ids.push(key.key_id);
            }
            anyhow::Ok(ids)
        }));
    }
    let mut ids = Vec::with_capacity(count);
    for task in tasks {
        ids.extend(task.await.context("key creation task panicked")??);
    }
    Ok(ids)
}

/// `GenerateDataKey` at [`SCALING_CONCURRENCY`], call `n` on key `n % keys.len()`.
async fn gdk_round_robin(
    clients: &[KmsClient],
    keys: &[String],
    ctx: &sdk::Context,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Stats> {
    let keys: Arc<Vec<String>> = Arc::new(keys.to_vec());
    let ctx = ctx.clone();
    run_rpc(
        clients,
        SCALING_CONCURRENCY,
        warmup,
        measure,
        move |client, n| {
            let keys = Arc::clone(&keys);
            let ctx = ctx.clone();
            async move {
                let key = &keys[usize::try_from(n).unwrap_or(0) % keys.len()];
                client.generate_data_key(key, &ctx).await.map(drop)
            }
        },
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Server memory.

/// A `/proc/<pid>/status` field in KiB.
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Samples the server's `VmRSS` every 20 ms on a thread and keeps the maximum.
struct RssSampler {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicU64::new(0));
        let thread = {
            let stop = Arc::clone(&stop);
            let max = Arc::clone(&max);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(kib) = proc_status_kib(pid, "VmRSS:") {
                        max.fetch_max(kib, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        RssSampler {
            stop,
            max,
            thread: Some(thread),
        }
    }

    /// Stops sampling; the largest `VmRSS` seen, in KiB.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.max.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// Report.

struct RpcSet {
    connections: usize,
    ping: Stats,
    gdk: Stats,
    dec: Stats,
}

struct Level {
    concurrency: usize,
    hsm_gdk: Stats,
    hsm_dec: Stats,
    rpc: Vec<RpcSet>,
}

struct Scaling {
    connections: usize,
    create_secs: f64,
    few_count: usize,
    many_count: usize,
    few: Stats,
    many: Stats,
}

struct Memory {
    rss_max_kib: u64,
    rss_end_kib: u64,
    hwm_kib: u64,
}

struct Report<'a> {
    args: &'a Args,
    load_before: String,
    load_after: String,
    cpus: usize,
    startup_ms: f64,
    levels: Vec<Level>,
    scaling: Option<Scaling>,
    memory: Memory,
}

/// One KMS call against its limits.
struct Ratio {
    throughput: f64,
    limit: f64,
    limit_name: &'static str,
    p99: f64,
    /// Informative: 1 / (1/HSM + 1/Ping), the rate if the HSM work and the RPC work of a call
    /// cannot overlap (they share the same CPUs here), and KMS throughput over it.
    additive: f64,
    additive_ratio: f64,
}

fn ratio(kms: &Stats, hsm: &Stats, ping: &Stats) -> Ratio {
    let (limit, limit_name) = if hsm.per_sec() <= ping.per_sec() {
        (hsm.per_sec(), "HSM loop")
    } else {
        (ping.per_sec(), "Ping")
    };
    Ratio {
        throughput: if limit > 0.0 {
            kms.per_sec() / limit
        } else {
            0.0
        },
        limit,
        limit_name,
        p99: kms.p99() as f64 / ping.p99().max(1) as f64,
        additive: additive_bound(hsm.per_sec(), ping.per_sec()),
        additive_ratio: kms.per_sec() / additive_bound(hsm.per_sec(), ping.per_sec()).max(1e-9),
    }
}

fn additive_bound(a: f64, b: f64) -> f64 {
    if a > 0.0 && b > 0.0 {
        1.0 / (1.0 / a + 1.0 / b)
    } else {
        0.0
    }
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The 1, 5 and 15 minute load averages, to show whether something else ran on the machine.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Report<'_> {
    fn markdown(&self) -> String {
        let a = self.args;
        let mut s = String::new();
        let _ = writeln!(s, "# kms-bench results\n");
        let _ = writeln!(
            s,
            "{} measured s per phase after {} s warm-up; server session pool {}; server ready after {:.0} ms. \
             RPC concurrency = tokio tasks sharing `conns` HTTP/2 connections round-robin; \
             HSM loop concurrency = OS threads, one PKCS#11 session each, same token, in the bench process.\n",
            a.seconds, a.warmup, a.pool, self.startup_ms
        );
        let _ = writeln!(
            s,
            "Machine: {} CPUs shared by this load generator, the server and SoftHSM2. Load average (1/5/15 min) \
             before the run: {}; after: {} (anything well above the load this run adds means other work competed).\n",
            self.cpus, self.load_before, self.load_after
        );
        let _ = writeln!(s, "## Throughput and latency\n");
        let _ = writeln!(
            s,
            "| conc | conns | call | calls/s | p50 µs | p99 µs |\n|---:|---:|---|---:|---:|---:|"
        );
        for l in &self.levels {
            let mut row = |conns: &str, name: &str, st: &Stats| {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {:.0} | {} | {} |",
                    l.concurrency,
                    conns,
                    name,
                    st.per_sec(),
                    st.p50(),
                    st.p99()
                );
            };
            row("–", "HSM loop: GenerateDataKey work", &l.hsm_gdk);
            row("–", "HSM loop: Decrypt work", &l.hsm_dec);
            for r in &l.rpc {
                let n = r.connections.to_string();
                row(&n, "Ping", &r.ping);
                row(&n, "GenerateDataKey", &r.gdk);
                row(&n, "Decrypt", &r.dec);
            }
        }
        let _ = writeln!(s, "\n## Ratios against the limits of the same run\n");
        let _ = writeln!(
            s,
            "Throughput ratio = KMS calls/s ÷ min(HSM-loop calls/s, Ping calls/s), target ≥ {TARGET_THROUGHPUT_RATIO} at concurrency {TARGET_CONCURRENCY}. \
             p99 ratio = KMS p99 ÷ Ping p99 (same concurrency, same connections), target ≤ {TARGET_P99_RATIO}. \
             Marks in brackets are informative (the targets are set at concurrency {TARGET_CONCURRENCY}). \
             The last column is informative only: the additive bound 1/(1/HSM + 1/Ping) is what a call could reach \
             if its HSM work and its RPC work could not overlap at all (true when one machine's CPUs run the client, \
             the server and the software HSM), and the KMS throughput as a fraction of it.\n"
        );
        let _ = writeln!(
            s,
            "| conc | conns | call | KMS calls/s | limit calls/s (which) | throughput ratio | p99 ratio | additive bound calls/s (KMS ÷ it) |\n|---:|---:|---|---:|---:|---:|---:|---:|"
        );
        for l in &self.levels {
            let at_target = l.concurrency == TARGET_CONCURRENCY;
            for r in &l.rpc {
                for (name, kms, hsm) in [
                    ("GenerateDataKey", &r.gdk, &l.hsm_gdk),
                    ("Decrypt", &r.dec, &l.hsm_dec),
                ] {
                    let q = ratio(kms, hsm, &r.ping);
                    let m = |ok: bool| {
                        if at_target {
                            mark(ok).to_string()
                        } else {
                            format!("({})", mark(ok).to_lowercase())
                        }
                    };
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {:.0} | {:.0} ({}) | {:.2} {} | {:.2} {} | {:.0} ({:.2}) |",
                        l.concurrency,
                        r.connections,
                        name,
                        kms.per_sec(),
                        q.limit,
                        q.limit_name,
                        q.throughput,
                        m(q.throughput >= TARGET_THROUGHPUT_RATIO),
                        q.p99,
                        m(q.p99 <= TARGET_P99_RATIO),
                        q.additive,
                        q.additive_ratio,
                    );
                }
            }
        }
        let m = &self.memory;
        let _ = writeln!(s, "\n## Server memory\n");
        let _ = writeln!(
            s,
            "| measure | MiB | target ≤ {TARGET_RSS_MIB} MiB |\n|---|---:|---|\n\
             | VmRSS, max sampled every 20 ms during the load | {:.1} | {} |\n\
             | VmHWM (peak RSS) at the end | {:.1} | {} |\n\
             | VmRSS at the end | {:.1} | |",
            mib(m.rss_max_kib),
            mark(mib(m.rss_max_kib) <= TARGET_RSS_MIB),
            mib(m.hwm_kib),
            mark(mib(m.hwm_kib) <= TARGET_RSS_MIB),
            mib(m.rss_end_kib),
        );
        if let Some(sc) = &self.scaling {
            let _ = writeln!(s, "\n## Key-count scaling\n");
            let _ = writeln!(
                s,
                "{} keys in the store and the token ({} created in {:.1} s at concurrency {SCALING_CONCURRENCY}); \
                 GenerateDataKey at concurrency {SCALING_CONCURRENCY}, {} connection(s), calls spread round-robin over the keys. \
                 Target: {}-key latency within {TARGET_SCALING_RATIO}× of {}-key latency.\n",
                sc.many_count,
                sc.many_count.saturating_sub(1),
                sc.create_secs,
                sc.connections,
                sc.many_count,
                sc.few_count
            );
            let _ = writeln!(
                s,
                "| keys used | calls/s | p50 µs | p99 µs |\n|---:|---:|---:|---:|\n\
                 | {} | {:.0} | {} | {} |\n| {} | {:.0} | {} | {} |",
                sc.few_count,
                sc.few.per_sec(),
                sc.few.p50(),
                sc.few.p99(),
                sc.many_count,
                sc.many.per_sec(),
                sc.many.p50(),
                sc.many.p99()
            );
            let r50 = sc.many.p50() as f64 / sc.few.p50().max(1) as f64;
            let r99 = sc.many.p99() as f64 / sc.few.p99().max(1) as f64;
            let _ = writeln!(
                s,
                "\n| ratio {} keys ÷ {} keys | value | target ≤ {TARGET_SCALING_RATIO} |\n|---|---:|---|\n\
                 | p50 | {r50:.2} | {} |\n| p99 | {r99:.2} | {} |",
                sc.many_count,
                sc.few_count,
                mark(r50 <= TARGET_SCALING_RATIO),
                mark(r99 <= TARGET_SCALING_RATIO)
            );
        }
        s
    }

    fn json(&self) -> String {
        fn stats(st: &Stats) -> String {
            format!(
                "{{\"calls\":{},\"seconds\":{:.4},\"calls_per_sec\":{:.1},\"p50_us\":{},\"p99_us\":{},\"max_us\":{}}}",
                st.calls,
                st.secs,
                st.per_sec(),
                st.p50(),
                st.p99(),
                st.hist.max()
            )
        }
        let a = self.args;
        let mut levels = Vec::new();
        for l in &self.levels {
            let rpc: Vec<String> = l
                .rpc
                .iter()
                .map(|r| {
                    let g = ratio(&r.gdk, &l.hsm_gdk, &r.ping);
                    let d = ratio(&r.dec, &l.hsm_dec, &r.ping);
                    format!(
                        "{{\"connections\":{},\"ping\":{},\"generate_data_key\":{},\"decrypt\":{},\
                         \"generate_data_key_throughput_ratio\":{:.4},\"generate_data_key_p99_ratio\":{:.4},\
                         \"decrypt_throughput_ratio\":{:.4},\"decrypt_p99_ratio\":{:.4}}}",
                        r.connections,
                        stats(&r.ping),
                        stats(&r.gdk),
                        stats(&r.dec),
                        g.throughput,
                        g.p99,
                        d.throughput,
                        d.p99
                    )
                })
                .collect();
            levels.push(format!(
                "{{\"concurrency\":{},\"hsm_generate_data_key\":{},\"hsm_decrypt\":{},\"rpc\":[{}]}}",
                l.concurrency,
                stats(&l.hsm_gdk),
                stats(&l.hsm_dec),
                rpc.join(",")
            ));
        }
        let scaling = match &self.scaling {
            Some(sc) => format!(
                "{{\"connections\":{},\"create_seconds\":{:.2},\"few_keys\":{},\"many_keys\":{},\"few\":{},\"many\":{}}}",
                sc.connections,
                sc.create_secs,
                sc.few_count,
                sc.many_count,
                stats(&sc.few),
                stats(&sc.many)
            ),
            None => "null".into(),
        };
        format!(
            "{{\"seconds\":{},\"warmup\":{},\"pool\":{},\"cpus\":{},\"load_before\":\"{}\",\"load_after\":\"{}\",\"startup_ms\":{:.0},\"levels\":[{}],\
             \"memory\":{{\"rss_max_kib\":{},\"hwm_kib\":{},\"rss_end_kib\":{}}},\"scaling\":{}}}\n",
            a.seconds,
            a.warmup,
            a.pool,
            self.cpus,
            self.load_before,
            self.load_after,
            self.startup_ms,
            levels.join(","),
            self.memory.rss_max_kib,
            self.memory.hwm_kib,
            self.memory.rss_end_kib,
            scaling
        )
    }
}
