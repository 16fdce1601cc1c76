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
//! Everything is bounded: every flag is checked before anything starts, fixed phase lengths, a
//! timeout on every call, a watchdog on the whole run. Child processes (replicas, PostgreSQL)
//! are stopped and the temporary folders (PostgreSQL data, PKI, SoftHSM2 token, logs) removed
//! on every exit path: a normal end, a failure, the watchdog, `SIGINT`, `SIGTERM` and `SIGHUP`
//! (which exit with 128 + the signal number; the watchdog with 3).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::builder::RangedU64ValueParser;
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
    /// Hard limit on the whole run, in seconds (1..=86400): everything is stopped after it.
    #[arg(long, global = true, default_value_t = 900,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    max_total_seconds: u64,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The scale-out scenario with its faults and checks.
    Demo {
        /// Seconds of load, 20..=600 (the faults happen at fixed fractions of it).
        #[arg(long, default_value_t = 40,
              value_parser = clap::value_parser!(u64).range(DEMO_SECONDS))]
        seconds: u64,
        /// Concurrent clients, 1..=64.
        #[arg(long, default_value_t = 12,
              value_parser = RangedU64ValueParser::<usize>::new().range(DEMO_WORKERS))]
        workers: usize,
        /// Most operations in all, 1..=10000000.
        #[arg(long, default_value_t = 20_000,
              value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        max_ops: u64,
    },
    /// Throughput and latency through 1, 2 and 3 replicas on PostgreSQL against one on SQLite.
    Bench {
        /// Replica counts to measure on PostgreSQL: distinct, each 1..=8, comma-separated.
        #[arg(long, default_value = "1,2,3", value_parser = parse_replicas)]
        replicas: ReplicaCounts,
        /// Concurrent callers, 1..=1024 (tokio tasks; and OS threads for the direct PKCS#11
        /// loop).
        #[arg(long, default_value_t = 64,
              value_parser = RangedU64ValueParser::<usize>::new().range(1..=1024))]
        concurrency: usize,
        /// HTTP/2 connections per replica, 1..=64, shared round-robin by the callers.
        #[arg(long, default_value_t = 2,
              value_parser = RangedU64ValueParser::<usize>::new().range(1..=64))]
        connections: usize,
        /// Measured seconds per phase: more than 0, at most 600.
        #[arg(long, default_value_t = 5.0, value_parser = parse_phase_seconds)]
        seconds: f64,
        /// Warm-up seconds before each phase, 0..=60.
        #[arg(long, default_value_t = 1.0, value_parser = parse_warmup_seconds)]
        warmup: f64,
        /// Rounds, 1..=50 (each measures every set-up once, in turn).
        #[arg(long, default_value_t = 2,
              value_parser = RangedU64ValueParser::<usize>::new().range(1..=50))]
        rounds: usize,
        /// HSM session pool per replica, 1..=256.
        #[arg(long, default_value_t = 8,
              value_parser = RangedU64ValueParser::<usize>::new().range(1..=256))]
        pool: usize,
        /// Key changes timed for the coherence figure, per round, 0..=1000.
        #[arg(long, default_value_t = 10,
              value_parser = RangedU64ValueParser::<usize>::new().range(0..=1000))]
        changes: usize,
    },
}

/// `demo --seconds` (also checked by `scripts/scaleout-demo.sh` before it builds).
const DEMO_SECONDS: std::ops::RangeInclusive<u64> = 20..=600;
/// `demo --workers` (also checked by `scripts/scaleout-demo.sh` before it builds).
const DEMO_WORKERS: std::ops::RangeInclusive<u64> = 1..=64;

/// Distinct replica counts, each 1..=8.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ReplicaCounts(Vec<usize>);

fn parse_replicas(s: &str) -> Result<ReplicaCounts, String> {
    let mut counts = Vec::new();
    for part in s.split(',') {
        let n: usize = part
            .trim()
            .parse()
            .map_err(|_| format!("`{part}` is not a replica count (1..=8)"))?;
        if !(1..=8).contains(&n) {
            return Err(format!("{n} replicas: each count must be 1..=8"));
        }
        if counts.contains(&n) {
            return Err(format!("{n} is given twice: the counts must be distinct"));
        }
        counts.push(n);
    }
    Ok(ReplicaCounts(counts))
}

/// Seconds as a finite number in `min..=max` (`min` itself excluded unless `min_included`).
fn parse_seconds(s: &str, min: f64, min_included: bool, max: f64) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    let above_min = if min_included { v >= min } else { v > min };
    if !v.is_finite() || !above_min || v > max {
        let low = if min_included {
            "at least"
        } else {
            "more than"
        };
        return Err(format!("{s} s: must be {low} {min} and at most {max}"));
    }
    Ok(v)
}

fn parse_phase_seconds(s: &str) -> Result<f64, String> {
    parse_seconds(s, 0.0, false, 600.0)
}

fn parse_warmup_seconds(s: &str) -> Result<f64, String> {
    parse_seconds(s, 0.0, true, 60.0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Before anything is started: from here on a signal stops and removes everything.
    stop_on_signals().context("install the signal handlers")?;
    let server_bin = softhsm_test::bench::server_bin(args.server_bin.as_deref())?;
    // The token (and SOFTHSM2_CONF of this process) first: the replicas inherit its conf.
    let _ = softhsm_test::token();
    // softhsm-test keeps its token folder for the life of the process: this run removes it
    // (at the end, or in an emergency stop).
    if let Some(dir) = softhsm_test::softhsm_conf().parent() {
        let ours = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("kms-softhsm-"));
        if ours {
            softhsm_test::cluster::track_dir(dir);
        }
    }
    let limit = Duration::from_secs(args.max_total_seconds);
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            std::thread::sleep(limit);
            eprintln!(
                "kms-scaleout: watchdog: run exceeded {} s; stopping everything",
                limit.as_secs()
            );
            stop_and_exit(3);
        })
        .context("start the watchdog")?;
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
    if softhsm_test::cluster::stopping() {
        // A watchdog or signal stop is under way (and may have made this run fail): it exits
        // the process with its own status once everything is stopped.
        loop {
            std::thread::park();
        }
    }
    // Whatever is still registered (the token folder; anything a failure left) goes now.
    softhsm_test::cluster::emergency_stop();
    outcome
}

/// Stops every child, removes every temporary folder and exits with `code`.
fn stop_and_exit(code: i32) -> ! {
    softhsm_test::cluster::emergency_stop();
    std::process::exit(code)
}

/// On the first `SIGINT`, `SIGTERM` or `SIGHUP`: [`stop_and_exit`] with 128 + the signal
/// number. On a thread of its own with its own runtime, so it acts whatever the run is doing.
fn stop_on_signals() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut int, mut term, mut hup) = {
        let _entered = rt.enter();
        (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        )
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let (name, code) = rt.block_on(async {
                tokio::select! {
                    _ = int.recv() => ("SIGINT", 130),
                    _ = term.recv() => ("SIGTERM", 143),
                    _ = hup.recv() => ("SIGHUP", 129),
                }
            });
            eprintln!(
                "kms-scaleout: {name}: stopping every replica and PostgreSQL, removing the temporary folders"
            );
            stop_and_exit(code);
        })?;
    Ok(())
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
    // The flags' ranges are clap's; these only keep a caller of this function honest.
    let replicas = &replicas.0;
    if replicas.is_empty() || *rounds == 0 || *pool == 0 || *concurrency == 0 || *connections == 0 {
        bail!(
            "--replicas, --rounds, --pool, --concurrency and --connections need positive numbers"
        );
    }
    let warmup = Duration::try_from_secs_f64(*warmup).context("--warmup")?;
    let measure = Duration::try_from_secs_f64(*seconds).context("--seconds")?;
    let pg = PrivatePostgres::start()?.context(
        "the benchmark needs PostgreSQL server binaries (initdb, pg_ctl): install postgresql",
    )?;
    let dir = softhsm_test::cluster::temp_dir("kms-scaleout-bench-")?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("kms-scaleout").chain(args.iter().copied()))
    }

    fn refused(args: &[&str]) {
        assert!(parse(args).is_err(), "accepted: {args:?}");
    }

    #[test]
    fn demo_defaults_and_bounds() {
        let Ok(Args {
            command:
                Cmd::Demo {
                    seconds,
                    workers,
                    max_ops,
                },
            max_total_seconds,
            ..
        }) = parse(&["demo"])
        else {
            panic!("demo defaults refused");
        };
        assert_eq!(
            (seconds, workers, max_ops, max_total_seconds),
            (40, 12, 20_000, 900)
        );
        for ok in [
            &["demo", "--seconds", "20", "--workers", "1"][..],
            &["demo", "--seconds", "600", "--workers", "64"],
            &["--max-total-seconds", "8", "demo", "--seconds", "20"],
        ] {
            assert!(parse(ok).is_ok(), "refused: {ok:?}");
        }
        for seconds in ["abc", "1.5", "-5", "19", "0", "601", "100000", ""] {
            refused(&["demo", "--seconds", seconds]);
        }
        for workers in ["0", "65", "-1", "2.5", "x"] {
            refused(&["demo", "--workers", workers]);
        }
        refused(&["demo", "--max-ops", "0"]);
        refused(&["--max-total-seconds", "0", "demo"]);
    }

    fn bench(args: &[&str]) -> Result<Cmd, clap::Error> {
        parse(&[&["bench"][..], args].concat()).map(|a| a.command)
    }

    #[test]
    fn bench_defaults() {
        let Ok(Cmd::Bench {
            replicas,
            concurrency,
            connections,
            seconds,
            warmup,
            rounds,
            pool,
            changes,
        }) = bench(&[])
        else {
            panic!("bench defaults refused");
        };
        assert_eq!(replicas, ReplicaCounts(vec![1, 2, 3]));
        assert_eq!(
            (concurrency, connections, rounds, pool, changes),
            (64, 2, 2, 8, 10)
        );
        assert_eq!((seconds, warmup), (5.0, 1.0));
    }

    #[test]
    fn bench_seconds_and_warmup_are_finite_and_bounded() {
        for ok in ["0.5", "600", "1e2"] {
            assert!(bench(&["--seconds", ok]).is_ok(), "refused --seconds {ok}");
        }
        for bad in ["nan", "NaN", "inf", "-inf", "1e30", "-1", "0", "600.5", "x"] {
            assert!(
                bench(&["--seconds", bad]).is_err(),
                "accepted --seconds {bad}"
            );
        }
        for ok in ["0", "60", "0.25"] {
            assert!(bench(&["--warmup", ok]).is_ok(), "refused --warmup {ok}");
        }
        for bad in ["inf", "nan", "-0.1", "61", "1e30"] {
            assert!(
                bench(&["--warmup", bad]).is_err(),
                "accepted --warmup {bad}"
            );
        }
    }

    #[test]
    fn bench_replicas_are_distinct_and_bounded() {
        match bench(&["--replicas", "3,1"]) {
            Ok(Cmd::Bench { replicas, .. }) => assert_eq!(replicas, ReplicaCounts(vec![3, 1])),
            other => panic!("--replicas 3,1: {other:?}"),
        }
        for bad in ["1,2,99", "0", "1,1", "2,3,2", "", "1,,2", "a", "9"] {
            assert!(
                bench(&["--replicas", bad]).is_err(),
                "accepted --replicas {bad}"
            );
        }
    }

    #[test]
    fn bench_counts_are_bounded() {
        for (flag, bad) in [
            ("--rounds", "0"),
            ("--rounds", "51"),
            ("--pool", "0"),
            ("--pool", "257"),
            ("--changes", "1001"),
            ("--changes", "-1"),
            ("--concurrency", "0"),
            ("--concurrency", "1025"),
            ("--connections", "0"),
            ("--connections", "65"),
        ] {
            assert!(bench(&[flag, bad]).is_err(), "accepted {flag} {bad}");
        }
        for (flag, ok) in [
            ("--rounds", "1"),
            ("--pool", "1"),
            ("--changes", "0"),
            ("--concurrency", "1024"),
            ("--connections", "64"),
        ] {
            assert!(bench(&[flag, ok]).is_ok(), "refused {flag} {ok}");
        }
    }
}
