//! `kms-scaleout`: several `kms-server` replicas on one store and one SoftHSM2 token.
//!
//! - `kms-scaleout demo` runs the scale-out scenario of [`softhsm_test::scaleout`]: three
//!   replicas on a private PostgreSQL instance, a mixed load through all three, one replica
//!   killed with `SIGKILL` and restarted, PostgreSQL stopped and started under load, then the
//!   checks (every ciphertext decrypts through every replica, version histories agree, the
//!   audit trail verifies and holds every acknowledged request). `scripts/scaleout-demo.sh`
//!   runs it on the release build.
//! - `kms-scaleout bench` measures `GenerateDataKey` and `Decrypt` at one concurrency through
//!   1, 2 and 3 replicas on PostgreSQL and through one replica on SQLite, each against the
//!   limits taken in the same run (a no-op `Ping` through the same replicas and the direct
//!   PKCS#11 loop on the same token), and the time a key change made through one replica
//!   takes to reach the others. Rounds alternate the set-ups; medians are reported.
//!
//! Everything is bounded: fixed phase lengths, a timeout on every call, a watchdog on the
//! whole run; child processes (replicas, PostgreSQL) are stopped on every exit path.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use sdk::KmsClient;
use softhsm_test::bench::{run_rpc, HsmTarget, HsmWork, Stats, CALL_TIMEOUT};
use softhsm_test::cluster::{Cluster, ClusterOptions, PrivatePostgres};

/// Several kms-server replicas on one store and one SoftHSM2 token.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The kms-server binary (default: `kms-server` beside this executable).
    #[arg(long, global = true)]
    server_bin: Option<PathBuf>,
    /// Hard limit on the whole run, in seconds: everything is stopped after it.
    #[arg(long, global = true, default_value_t = 900)]
    max_total_seconds: u64,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The scale-out scenario with its faults and checks.
    Demo {
        /// Seconds of load (the faults happen at fixed fractions of it; at least 20).
        #[arg(long, default_value_t = 40)]
        seconds: u64,
        /// Concurrent clients.
        #[arg(long, default_value_t = 12)]
        workers: usize,
        /// Most operations in all.
        #[arg(long, default_value_t = 20_000)]
        max_ops: u64,
    },
    /// Throughput and latency through 1, 2 and 3 replicas on PostgreSQL against one on SQLite.
    Bench {
        /// Replica counts to measure on PostgreSQL.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
        replicas: Vec<usize>,
        /// Concurrent callers (tokio tasks; and OS threads for the direct PKCS#11 loop).
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// HTTP/2 connections per replica, shared round-robin by the callers.
        #[arg(long, default_value_t = 2)]
        connections: usize,
        /// Measured seconds per phase.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Warm-up seconds before each phase.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Rounds (each measures every set-up once, in turn).
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// HSM session pool per replica.
        #[arg(long, default_value_t = 8)]
        pool: usize,
        /// Key changes timed for the coherence figure, per round.
        #[arg(long, default_value_t = 10)]
        changes: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server_bin = softhsm_test::bench::server_bin(args.server_bin.as_deref())?;
    // The token (and SOFTHSM2_CONF of this process) first: the replicas inherit its conf.
    let _ = softhsm_test::token();
    let limit = Duration::from_secs(args.max_total_seconds);
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!(
            "kms-scaleout: watchdog: run exceeded {} s; stopping everything",
            limit.as_secs()
        );
        softhsm_test::cluster::emergency_stop();
        std::process::exit(3);
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let outcome = match &args.command {
        Cmd::Demo {
            seconds,
            workers,
            max_ops,
        } => rt.block_on(demo(server_bin, *seconds, *workers, *max_ops)),
        Cmd::Bench { .. } => rt.block_on(bench(server_bin, &args.command)),
    };
    drop(rt);
    // softhsm-test keeps its token folder for the life of the process; this run is over.
    if let Some(dir) = softhsm_test::softhsm_conf().parent() {
        let ours = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("kms-softhsm-"));
        if ours {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    outcome
}

async fn demo(
    server_bin: PathBuf,
    seconds: u64,
    workers: usize,
    max_ops: u64,
) -> anyhow::Result<()> {
    let options = softhsm_test::scaleout::Options {
        server_bin,
        duration: Duration::from_secs(seconds),
        workers,
        max_ops,
        progress: true,
    };
    match softhsm_test::scaleout::run(&options).await? {
        Some(report) => {
            print!("{}", report.markdown());
            println!("\nEvery check passed.");
            Ok(())
        }
        None => bail!("no PostgreSQL server binaries (initdb, pg_ctl): install postgresql"),
    }
}

// ---------------------------------------------------------------------------------------------
// The benchmark.

/// One set-up: a store and a number of replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Setup {
    Sqlite,
    Postgres(usize),
}

impl Setup {
    fn name(self) -> String {
        match self {
            Setup::Sqlite => "SQLite, 1 replica".into(),
            Setup::Postgres(1) => "PostgreSQL, 1 replica".into(),
            Setup::Postgres(n) => format!("PostgreSQL, {n} replicas"),
        }
    }
    fn replicas(self) -> usize {
        match self {
            Setup::Sqlite => 1,
            Setup::Postgres(n) => n,
        }
    }
}

/// What one set-up measured in one round.
struct Measured {
    ping: Stats,
    gdk: Stats,
    dec: Stats,
    hsm_gdk: Stats,
    hsm_dec: Stats,
}

async fn bench(server_bin: PathBuf, command: &Cmd) -> anyhow::Result<()> {
    let Cmd::Bench {
        replicas,
        concurrency,
        connections,
        seconds,
        warmup,
        rounds,
        pool,
        changes,
    } = command
    else {
        bail!("not the bench command");
    };
    if replicas.is_empty() || replicas.contains(&0) || *concurrency == 0 || *connections == 0 {
        bail!("--replicas, --concurrency and --connections need positive numbers");
    }
    let warmup = Duration::from_secs_f64(*warmup);
    let measure = Duration::from_secs_f64(*seconds);
    let pg = PrivatePostgres::start()?.context(
        "the benchmark needs PostgreSQL server binaries (initdb, pg_ctl): install postgresql",
    )?;
    let dir = tempfile::Builder::new()
        .prefix("kms-scaleout-bench-")
        .tempdir()?;
    let mut setups = vec![Setup::Sqlite];
    setups.extend(replicas.iter().map(|&n| Setup::Postgres(n)));
    let load_before = loadavg();
    let mut results: BTreeMap<Setup, Vec<Measured>> = BTreeMap::new();
    let mut lags: Vec<Duration> = Vec::new();
    for round in 1..=*rounds {
        for &setup in &setups {
            eprintln!("round {round}: {}", setup.name());
            let store_url = match setup {
                Setup::Sqlite => format!(
                    "sqlite://{}",
                    dir.path().join(format!("r{round}.db")).display()
                ),
                Setup::Postgres(n) => {
                    let name = format!("bench_r{round}_n{n}");
                    pg.create_database(&name).await?;
                    pg.url(&name)
                }
            };
            let cluster = Cluster::start(
                ClusterOptions {
                    server_bin: server_bin.clone(),
                    store_url,
                    dir: dir.path().join(format!("r{round}-{}", setup.replicas())),
                    session_pool: *pool,
                    store_connections: 8,
                    check_interval_secs: 60,
                    log_filter: "warn".into(),
                    extra_env: Vec::new(),
                },
                setup.replicas(),
            )
            .await?;
            let (measured, key) =
                measure_setup(&cluster, *concurrency, *connections, warmup, measure)
                    .await
                    .with_context(|| setup.name())?;
            if setup == Setup::Postgres(*replicas.iter().max().unwrap_or(&1))
                && setup.replicas() > 1
            {
                lags.extend(coherence(&cluster, &key, *changes).await?);
            }
            results.entry(setup).or_default().push(measured);
        }
    }
    print!(
        "{}",
        report(
            &results,
            &lags,
            *concurrency,
            *connections,
            *seconds,
            &load_before
        )
    );
    Ok(())
}

/// app-1 bound and granted one key (through replica 1), visible through every replica; the
/// key and one blob under it.
async fn provision(cluster: &Cluster) -> anyhow::Result<(String, Vec<u8>)> {
    let pki = &cluster.pki;
    let first = cluster.replicas[0].endpoint();
    let officer = KmsClient::connect(&first, &pki.client_tls("officer-1")?).await?;
    let approver = KmsClient::connect(&first, &pki.client_tls("officer-2")?).await?;
    let app = pki.principal("app-1");
    let proposal = officer.propose_role_binding(&app, "app", false).await?;
    approver.approve(&proposal.approval_id).await?;
    let key = officer
        .create_key(sdk::NewKey {
            description: "kms-scaleout bench".into(),
            ..Default::default()
        })
        .await?
        .key_id;
    let proposal = officer
        .propose_grant(sdk::GrantSpec {
            principal: app,
            key: key.clone(),
            operations: vec!["generate-data-key".into(), "decrypt".into()],
            ..Default::default()
        })
        .await?;
    let done = approver.approve(&proposal.approval_id).await?;
    if done.state != "executed" {
        bail!("grant: {} {}", done.state, done.result);
    }
    let tls = pki.client_tls("app-1")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut blob = Vec::new();
    for r in &cluster.replicas {
        let client = KmsClient::connect(&r.endpoint(), &tls).await?;
        loop {
            match client.generate_data_key(&key, &context()).await {
                Ok(d) => {
                    blob = d.blob;
                    break;
                }
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => bail!("{} does not serve app-1 after 20 s: {e}", r.name),
            }
        }
    }
    Ok((key, blob))
}

fn context() -> sdk::Context {
    BTreeMap::from([("bench".to_string(), "scaleout".to_string())])
}

async fn measure_setup(
    cluster: &Cluster,
    concurrency: usize,
    connections: usize,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<(Measured, String)> {
    let (key, blob) = provision(cluster).await?;
    let tls = cluster.pki.client_tls("app-1")?;
    // Interleaved, so that caller i (client i % len) spreads evenly over the replicas.
    let mut clients = Vec::new();
    for _ in 0..connections {
        for r in &cluster.replicas {
            clients.push(
                tokio::time::timeout(CALL_TIMEOUT, KmsClient::connect(&r.endpoint(), &tls))
                    .await
                    .context("connect timed out")??,
            );
        }
    }
    let ping = run_rpc(&clients, concurrency, warmup, measure, |c, _| async move {
        c.ping().await
    })
    .await?;
    let gdk = {
        let key = key.clone();
        run_rpc(&clients, concurrency, warmup, measure, move |c, _| {
            let key = key.clone();
            async move { c.generate_data_key(&key, &context()).await.map(drop) }
        })
        .await?
    };
    let dec = {
        let blob = std::sync::Arc::new(blob);
        run_rpc(&clients, concurrency, warmup, measure, move |c, _| {
            let blob = std::sync::Arc::clone(&blob);
            async move { c.decrypt(&blob, &context(), None).await.map(drop) }
        })
        .await?
    };
    // The HSM limit, on the same token and key, with the replicas idle.
    let pkcs11 = softhsm_test::pkcs11();
    let label = &softhsm_test::token().label;
    let target = HsmTarget::open(&pkcs11, label, &format!("kms:{key}:v1"))?;
    let key_uuid = uuid::Uuid::parse_str(&key).context("key id")?;
    let aad = kms_server::blob::NewBlob::new(key_uuid, 1, &proto::context::encode(&context())).aad;
    let hsm_gdk = target.run(concurrency, warmup, measure, HsmWork::GenerateDataKey, &aad)?;
    let hsm_dec = target.run(concurrency, warmup, measure, HsmWork::Decrypt, &aad)?;
    Ok((
        Measured {
            ping,
            gdk,
            dec,
            hsm_gdk,
            hsm_dec,
        },
        key,
    ))
}

/// `changes` times: disables (or enables) the key through replica 1 and times until every
/// other replica refuses (or serves) a data key under it.
async fn coherence(cluster: &Cluster, key: &str, changes: usize) -> anyhow::Result<Vec<Duration>> {
    let pki = &cluster.pki;
    let officer = KmsClient::connect(
        &cluster.replicas[0].endpoint(),
        &pki.client_tls("officer-1")?,
    )
    .await?;
    let tls = pki.client_tls("app-1")?;
    let mut others = Vec::new();
    for r in &cluster.replicas[1..] {
        others.push(KmsClient::connect(&r.endpoint(), &tls).await?);
    }
    let mut lags = Vec::new();
    for i in 0..changes {
        let disable = i % 2 == 0;
        if disable {
            officer.disable_key(key).await?;
        } else {
            officer.enable_key(key).await?;
        }
        let changed = Instant::now();
        for c in &others {
            loop {
                let served = c.generate_data_key(key, &context()).await.is_ok();
                if served != disable {
                    lags.push(changed.elapsed());
                    break;
                }
                if changed.elapsed() > Duration::from_secs(10) {
                    bail!("a key change did not reach a replica within 10 s");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    Ok(lags)
}

/// Picks one measurement of a set-up's round.
type Pick<'a> = &'a dyn Fn(&Measured) -> &Stats;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn report(
    results: &BTreeMap<Setup, Vec<Measured>>,
    lags: &[Duration],
    concurrency: usize,
    connections: usize,
    seconds: f64,
    load_before: &str,
) -> String {
    let mut s = String::new();
    let rounds = results.values().map(Vec::len).max().unwrap_or(0);
    let _ = writeln!(
        s,
        "## Scale-out: {concurrency} concurrent callers, {connections} connection(s) per replica, {seconds} s per phase, median of {rounds} round(s)\n"
    );
    let _ = writeln!(
        s,
        "Machine: {} CPU(s) shared by the load generator, every replica, PostgreSQL and SoftHSM2. Load average before: {load_before}; after: {}.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    let med =
        |runs: &[Measured], f: &dyn Fn(&Measured) -> f64| median(runs.iter().map(f).collect());
    let _ = writeln!(
        s,
        "| set-up | call | calls/s | p50 µs | p99 µs | ÷ min(HSM loop, Ping) | ÷ SQLite 1 replica | p99 ÷ Ping p99 |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|");
    let sqlite = results.get(&Setup::Sqlite);
    for (setup, runs) in results {
        let rows: [(&str, Pick, Pick); 3] = [
            ("Ping", &|m| &m.ping, &|m| &m.ping),
            ("GenerateDataKey", &|m| &m.gdk, &|m| &m.hsm_gdk),
            ("Decrypt", &|m| &m.dec, &|m| &m.hsm_dec),
        ];
        for (name, stat, hsm) in rows {
            let rate = med(runs, &|m| stat(m).per_sec());
            let p50 = med(runs, &|m| stat(m).p50() as f64);
            let p99 = med(runs, &|m| stat(m).p99() as f64);
            let limit = med(runs, &|m| hsm(m).per_sec().min(m.ping.per_sec()));
            let vs_sqlite = sqlite
                .map(|base| rate / med(base, &|m| stat(m).per_sec()).max(1.0))
                .unwrap_or(0.0);
            let p99_ratio = p99 / med(runs, &|m| m.ping.p99() as f64).max(1.0);
            let limit_text = if name == "Ping" {
                "—".to_string()
            } else {
                format!("{:.2}", rate / limit.max(1.0))
            };
            let _ = writeln!(
                s,
                "| {} | {name} | {rate:.0} | {p50:.0} | {p99:.0} | {limit_text} | {vs_sqlite:.2} | {p99_ratio:.2} |",
                setup.name()
            );
        }
    }
    let _ = writeln!(s, "\nLimits of the same runs (medians):\n");
    let _ = writeln!(
        s,
        "| set-up | HSM loop: GenerateDataKey work /s | HSM loop: Decrypt work /s |"
    );
    let _ = writeln!(s, "|---|---:|---:|");
    for (setup, runs) in results {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} |",
            setup.name(),
            med(runs, &|m| m.hsm_gdk.per_sec()),
            med(runs, &|m| m.hsm_dec.per_sec())
        );
    }
    if !lags.is_empty() {
        let mut ms: Vec<f64> = lags.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(|a, b| a.total_cmp(b));
        let _ = writeln!(
            s,
            "\nCache coherence (PostgreSQL, the largest replica count): a key disabled or enabled through replica 1, until every other replica refuses or serves a data key under it, probing every millisecond: {} observations, median {:.1} ms, max {:.1} ms (bound: {} s).",
            ms.len(),
            median(ms.clone()),
            ms.last().copied().unwrap_or(0.0),
            kms_server::service::KEY_CACHE_MAX_AGE.as_secs()
        );
    }
    s
}
