//! The scale-out scenario, shared by `kms-server/tests/scaleout.rs` and `scripts/scaleout-demo.sh`
//! (through the `kms-scaleout` binary): three `kms-server` processes on one private PostgreSQL
//! database and one SoftHSM2 token, a bounded mixed load through all three, faults in the
//! middle of it, then the checks.
//!
//! **Load.** `workers` closed-loop clients for `duration` (or until `max_ops`), each call sent to
//! one replica and, on `UNAVAILABLE` (or a transport failure or a timeout), retried on the next
//! one for up to [`OP_DEADLINE`]: `GenerateDataKey` (every plaintext's SHA-256 and blob kept),
//! `Decrypt` of a blob received earlier (the plaintext must match), `Tokenize` in a
//! tokenization domain (a keyed pseudonym and a vaulted token; one value must always give the
//! same token, whichever replica answers), `RotateKey`, and grant approvals (officer-1 proposes
//! through one replica, officer-2 approves through the two others at the same moment). Every
//! answer's request id (`x-request-id`) is kept.
//!
//! **Faults.** At 20 % of the run replica 2 is killed with `SIGKILL` and at 35 % started again
//! (same port, no repair); at 55 % PostgreSQL is stopped (`pg_ctl stop -m fast`) for
//! [`PG_OUTAGE`] and started again. During the outage every replica is probed every 250 ms
//! without retries (data key and readiness).
//!
//! **Checks** (each a failure of the run): every blob decrypts through every replica to its
//! plaintext; every key's version history is the same through every replica, and each replica
//! encrypts under the current primary; `VerifyAudit` passes and every request id a client
//! received is in the trail; each approval executed exactly once (one grant per approval); a
//! tokenized value has one token; while PostgreSQL was down every probe failed with
//! `UNAVAILABLE` within [`FAIL_FAST`] and readiness said `NOT_SERVING`; afterwards every replica
//! served again within [`RESUME_WITHIN`] without a restart; the restarted replica served.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use proto::v1 as pb;
use proto::v1::key_management_client::KeyManagementClient;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

use crate::cluster::{Cluster, ClusterOptions, PrivatePostgres};

/// How long one call may take before it counts as failed (and is retried elsewhere).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one operation keeps retrying on other replicas.
pub const OP_DEADLINE: Duration = Duration::from_secs(40);
/// How long PostgreSQL stays down.
pub const PG_OUTAGE: Duration = Duration::from_secs(5);
/// Every call made while PostgreSQL is down must fail within this.
pub const FAIL_FAST: Duration = Duration::from_secs(3);
/// After PostgreSQL is back, every replica serves again within this.
pub const RESUME_WITHIN: Duration = Duration::from_secs(15);

/// The final checks (every data key through every replica, histories, the trail) take at
/// most this.
pub const CHECKS_WITHIN: Duration = Duration::from_secs(120);

/// Audit records per page when reading the trail back.
const AUDIT_PAGE: u32 = 5000;

/// The number of replicas.
pub const REPLICAS: usize = 3;
/// Master keys under load.
const KEYS: usize = 3;
/// The tokenization domain.
const DOMAIN: &str = "scaleout-study";
/// The values tokenized (synthetic, not PHI).
const VALUES: [&str; 6] = [
    "MRN-000101",
    "MRN-000102",
    "MRN-000103",
    "MRN-000104",
    "MRN-000105",
    "MRN-000106",
];
/// The transforms tokenized with.
const TRANSFORMS: [&str; 2] = [r#"{"kind":"pseudonym"}"#, r#"{"kind":"vault"}"#];

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `kms-server` binary.
    pub server_bin: PathBuf,
    /// Load duration (the faults happen at fixed fractions of it; at least 20 s).
    pub duration: Duration,
    /// Concurrent clients.
    pub workers: usize,
    /// Most operations in all.
    pub max_ops: u64,
    /// Progress lines on stderr.
    pub progress: bool,
}

type Rpc = KeyManagementClient<Channel>;

/// One client per replica for one identity.
#[derive(Clone)]
struct Clients {
    rpc: Vec<Rpc>,
    channels: Vec<Channel>,
}

/// The identities the scenario calls as.
#[derive(Clone)]
struct Callers {
    app: Clients,
    officer: Clients,
    approver: Clients,
    tokenizer: Clients,
    auditor: Clients,
}

/// A data key a client received.
#[derive(Clone)]
struct Received {
    key_version: u32,
    blob: Vec<u8>,
    digest: [u8; 32],
}

/// A call that did not answer (retried elsewhere).
#[derive(Debug, Clone)]
struct Failure {
    replica: usize,
    code: tonic::Code,
    latency: Duration,
}

/// A probe made while PostgreSQL was down or coming back.
#[derive(Debug, Clone)]
struct Probe {
    started: Instant,
    latency: Duration,
    replica: usize,
    outcome: Result<(), tonic::Code>,
}

/// Everything the load recorded.
#[derive(Default)]
struct Record {
    /// (operation, request id) of every answer received.
    acknowledged: Vec<(&'static str, String)>,
    /// Answers by operation and replica.
    answers: BTreeMap<(&'static str, usize), u64>,
    received: Vec<Received>,
    failures: Vec<Failure>,
    /// (transform, value) → token.
    tokens: HashMap<(usize, usize), String>,
    token_mismatches: Vec<String>,
    decrypt_mismatches: u64,
    approvals: Vec<(String, String)>,
    rotations: u64,
    /// Answers that should not happen (not retryable, not expected).
    unexpected: Vec<String>,
    /// Answers through replica 2 after its restart.
    after_restart: u64,
}

struct Shared {
    callers: Callers,
    app_principal: String,
    keys: Vec<String>,
    start: Instant,
    record: Mutex<Record>,
    ops: AtomicU64,
    stop: AtomicBool,
    restarted_at: Mutex<Option<Instant>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What happened, for the report.
#[derive(Debug, Default)]
pub struct Report {
    /// Operations attempted.
    pub operations: u64,
    /// Answers by operation.
    pub answers: BTreeMap<String, u64>,
    /// Answers by replica.
    pub answers_by_replica: Vec<u64>,
    /// Calls that failed and were retried elsewhere, by code.
    pub retried: BTreeMap<String, u64>,
    /// The longest a retried call took to fail, ms.
    pub slowest_retried_ms: f64,
    /// Data keys received, and how many decryptions the final check made.
    pub data_keys: usize,
    /// Decryptions in the final check (every data key through every replica).
    pub final_decrypts: usize,
    /// Rotations made under load.
    pub rotations: u64,
    /// Approvals raced under load.
    pub approvals: usize,
    /// Seconds from the `SIGKILL` to the restarted replica's first answer.
    pub replica_down_secs: f64,
    /// How long the restarted replica took to start.
    pub restart_secs: f64,
    /// Answers through the restarted replica after its restart.
    pub answers_after_restart: u64,
    /// Probes while PostgreSQL was down, and the slowest failure.
    pub outage_probes: usize,
    /// The slowest probe failure while PostgreSQL was down, ms.
    pub outage_max_fail_ms: f64,
    /// The median probe failure while PostgreSQL was down, ms.
    pub outage_median_fail_ms: f64,
    /// Per replica: how long after PostgreSQL's start its first probe succeeded, ms.
    pub resumed_ms: Vec<f64>,
    /// Per replica: whether readiness reported NOT_SERVING during the outage.
    pub not_serving_seen: Vec<bool>,
    /// Audit records in the trail at the end, and request ids checked against it.
    pub audit_records: u64,
    /// Request ids clients received, all found in the trail.
    pub request_ids_checked: usize,
    /// Key versions compared across replicas.
    pub key_versions: usize,
    /// Operations that found their key version in the token only after waiting (a version
    /// another replica had just made), and the longest wait, ms.
    pub late_versions: u64,
    /// See `late_versions`.
    pub late_max_ms: u64,
    /// Wall time of the whole scenario.
    pub total_secs: f64,
}

impl Report {
    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "## Scale-out scenario: {REPLICAS} replicas, one PostgreSQL, one token\n"
        );
        let _ = writeln!(s, "| figure | value |\n|---|---:|");
        let mut row = |k: &str, v: String| {
            let _ = writeln!(s, "| {k} | {v} |");
        };
        row("operations", self.operations.to_string());
        for (op, n) in &self.answers {
            row(&format!("answers: {op}"), n.to_string());
        }
        for (i, n) in self.answers_by_replica.iter().enumerate() {
            row(&format!("answers through replica-{}", i + 1), n.to_string());
        }
        for (code, n) in &self.retried {
            row(
                &format!("calls retried on another replica: {code}"),
                n.to_string(),
            );
        }
        row(
            "slowest call that failed and was retried",
            format!("{:.0} ms", self.slowest_retried_ms),
        );
        row("rotations under load", self.rotations.to_string());
        row(
            "approvals raced through two replicas",
            self.approvals.to_string(),
        );
        row(
            "replica-2: SIGKILL → answering again",
            format!(
                "{:.1} s (start-up {:.1} s)",
                self.replica_down_secs, self.restart_secs
            ),
        );
        row(
            "replica-2: answers after its restart",
            self.answers_after_restart.to_string(),
        );
        row(
            &format!("PostgreSQL down {} s: probes", PG_OUTAGE.as_secs()),
            self.outage_probes.to_string(),
        );
        row(
            "… failure latency median / max",
            format!(
                "{:.0} ms / {:.0} ms (bound {} ms)",
                self.outage_median_fail_ms,
                self.outage_max_fail_ms,
                FAIL_FAST.as_millis()
            ),
        );
        row(
            "… readiness NOT_SERVING seen",
            format!("{:?}", self.not_serving_seen),
        );
        row(
            "PostgreSQL back → each replica serving",
            self.resumed_ms
                .iter()
                .map(|ms| format!("{ms:.0} ms"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        row(
            "data keys received / final decryptions (all replicas)",
            format!("{} / {}", self.data_keys, self.final_decrypts),
        );
        row(
            "key versions compared across replicas",
            self.key_versions.to_string(),
        );
        row(
            "audit records / acknowledged request ids found",
            format!("{} / {}", self.audit_records, self.request_ids_checked),
        );
        row(
            "HSM calls that waited for a version made elsewhere / longest wait",
            format!("{} / {} ms", self.late_versions, self.late_max_ms),
        );
        row("total time", format!("{:.1} s", self.total_secs));
        s
    }
}

/// Runs the scenario; `Ok(None)` when it was skipped (no PostgreSQL server binaries and not
/// required). Every check that fails makes it an error.
pub async fn run(options: &Options) -> anyhow::Result<Option<Report>> {
    ensure!(
        options.duration >= Duration::from_secs(20),
        "the scenario needs at least 20 s of load (the faults are spread over it)"
    );
    let total = Instant::now();
    let say = |msg: &str| {
        if options.progress {
            eprintln!("[{:6.1} s] {msg}", total.elapsed().as_secs_f64());
        }
    };
    let Some(pg) = PrivatePostgres::start()? else {
        return Ok(None);
    };
    say(&format!("private PostgreSQL on 127.0.0.1:{}", pg.port()));
    pg.create_database("kms").await?;
    // Registered for an emergency stop (watchdog, signal) like the cluster's other folders.
    let dir = crate::cluster::temp_dir("kms-scaleout-")?;
    let mut cluster = Cluster::start(
        ClusterOptions {
            server_bin: options.server_bin.clone(),
            store_url: pg.url("kms"),
            dir: dir.path().to_path_buf(),
            session_pool: 4,
            store_connections: 8,
            check_interval_secs: 1,
            log_filter: "warn,kms_server::hsm=debug".into(),
            extra_env: Vec::new(),
        },
        REPLICAS,
    )
    .await?;
    say("3 replicas answer");
    let outcome = drive(options, &pg, &mut cluster, &say).await;
    let outcome = outcome.map(|mut report| {
        report.total_secs = total.elapsed().as_secs_f64();
        // How late replicas saw versions other replicas had made (the HSM port's debug line).
        for r in &cluster.replicas {
            for line in r.log().lines() {
                if let Some(ms) = line
                    .split("waited_ms=")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|ms| ms.parse::<u64>().ok())
                {
                    report.late_versions += 1;
                    report.late_max_ms = report.late_max_ms.max(ms);
                }
            }
        }
        Some(report)
    });
    if outcome.is_err() && crate::cluster::stopping() {
        // A watchdog or signal stop killed the run (and removes its folders): nothing to report.
        drop(cluster);
    } else if outcome.is_err() {
        eprintln!("{}", cluster.errors(20));
        eprintln!("--- postgres ---\n{}", crate::cluster::tail(&pg.log(), 15));
        drop(cluster);
        let kept = dir.keep();
        eprintln!("replica logs kept in {}", kept.display());
    } else {
        drop(cluster);
    }
    drop(pg);
    outcome
}

async fn drive(
    options: &Options,
    pg: &PrivatePostgres,
    cluster: &mut Cluster,
    say: &dyn Fn(&str),
) -> anyhow::Result<Report> {
    let callers = Callers {
        app: connect(cluster, "app-1").await?,
        officer: connect(cluster, "officer-1").await?,
        approver: connect(cluster, "officer-2").await?,
        tokenizer: connect(cluster, "tokenizer-1").await?,
        auditor: connect(cluster, "auditor-1").await?,
    };
    let keys = provision(cluster, &callers).await?;
    say(
        "provisioned: roles, keys, grants and a tokenization domain, visible through every replica",
    );

    let shared = Arc::new(Shared {
        callers: callers.clone(),
        app_principal: cluster.pki.principal("app-1"),
        keys: keys.clone(),
        start: Instant::now(),
        record: Mutex::new(Record::default()),
        ops: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        restarted_at: Mutex::new(None),
    });
    let mut workers = Vec::new();
    for w in 0..options.workers {
        let shared = Arc::clone(&shared);
        let max_ops = options.max_ops;
        workers.push(tokio::spawn(
            async move { worker(shared, w, max_ops).await },
        ));
    }

    // The faults, on the load's timeline.
    let d = options.duration;
    let at = |fraction: f64| shared.start + d.mul_f64(fraction);
    sleep_until(at(0.20)).await;
    cluster.replicas[1].kill();
    let killed = Instant::now();
    say("replica-2 killed (SIGKILL)");
    sleep_until(at(0.35)).await;
    let restart = cluster.start_replica(1).await?;
    let replica_down = killed.elapsed();
    *shared
        .restarted_at
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    say(&format!(
        "replica-2 restarted ({:.1} s to answer)",
        restart.as_secs_f64()
    ));

    sleep_until(at(0.55)).await;
    let probing = Arc::new(AtomicBool::new(true));
    let probes = tokio::spawn(probe_loop(
        callers.clone(),
        keys[0].clone(),
        Arc::clone(&probing),
    ));
    let stop_pg = tokio::task::block_in_place(|| pg.stop());
    stop_pg.context("stop PostgreSQL")?;
    let down_from = Instant::now();
    say("PostgreSQL stopped");
    tokio::time::sleep(PG_OUTAGE).await;
    let down_until = Instant::now();
    tokio::task::block_in_place(|| pg.start_server()).context("start PostgreSQL")?;
    let up_at = Instant::now();
    say("PostgreSQL started again");
    // Probing goes on until every replica served again (or the bound has passed).
    let resumed = wait_resumed(&callers, &keys[0], up_at).await;
    probing.store(false, Ordering::Relaxed);
    let (probes, not_serving) = probes.await.context("probe task")?;
    say("every replica serves again");

    sleep_until(shared.start + d).await;
    shared.stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.context("worker panicked")??;
    }
    say(&format!(
        "load done: {} operations",
        shared.ops.load(Ordering::Relaxed)
    ));

    let mut report = Report {
        operations: shared.ops.load(Ordering::Relaxed).min(options.max_ops),
        replica_down_secs: replica_down.as_secs_f64(),
        restart_secs: restart.as_secs_f64(),
        not_serving_seen: not_serving,
        ..Report::default()
    };
    check_outage(&mut report, &probes, down_from, down_until, up_at, &resumed)?;
    let checked = tokio::time::timeout(CHECKS_WITHIN, check_final(&mut report, &shared, say)).await;
    match checked {
        Ok(checked) => checked?,
        Err(_) => bail!("the final checks did not finish within {CHECKS_WITHIN:?}"),
    }
    Ok(report)
}

async fn connect(cluster: &Cluster, name: &str) -> anyhow::Result<Clients> {
    let tls = cluster.pki.client_tls(name)?;
    let mut clients = Clients {
        rpc: Vec::new(),
        channels: Vec::new(),
    };
    for r in &cluster.replicas {
        let channel = tls.channel(&r.endpoint()).await?;
        clients.rpc.push(KeyManagementClient::new(channel.clone()));
        clients.channels.push(channel);
    }
    Ok(clients)
}

fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

fn request_id(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get(kms_server::grpc::REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Whether a failed call may have been the replica's or the store's fault (retry elsewhere).
fn retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
    )
}

/// Roles, keys, grants and the domain, through replica 1; then waits until every replica
/// lets app-1 and tokenizer-1 use them.
async fn provision(cluster: &Cluster, c: &Callers) -> anyhow::Result<Vec<String>> {
    let pki = &cluster.pki;
    let mut officer = c.officer.rpc[0].clone();
    let approve = |id: String| {
        let mut approver = c.approver.rpc[0].clone();
        async move {
            let done = bounded(
                || "Approve".to_string(),
                approver.approve(request(pb::ApprovalId { approval_id: id })),
            )
            .await?;
            ensure!(
                done.state == "executed",
                "approval: {} {}",
                done.state,
                done.result
            );
            anyhow::Ok(())
        }
    };
    for (name, role) in [
        ("app-1", "app"),
        ("tokenizer-1", "tokenizer"),
        ("auditor-1", "auditor"),
    ] {
        let proposal = officer
            .propose_role_binding(request(pb::ProposeRoleBindingRequest {
                principal: pki.principal(name),
                role: role.to_string(),
                remove: false,
            }))
            .await?
            .into_inner();
        approve(proposal.approval_id).await?;
    }
    let mut keys = Vec::new();
    for i in 0..=KEYS {
        let key = officer
            .create_key(request(pb::CreateKeyRequest {
                alias: format!("scaleout-{i}"),
                description: "scale-out scenario".into(),
                ..Default::default()
            }))
            .await?
            .into_inner()
            .key_id;
        keys.push(key);
    }
    // The last key seals the tokenization domain.
    let research = keys.pop().context("keys")?;
    for key in &keys {
        let proposal = officer
            .propose_grant(request(pb::ProposeGrantRequest {
                principal: pki.principal("app-1"),
                key: key.clone(),
                operations: vec!["generate-data-key".into(), "decrypt".into()],
                ..Default::default()
            }))
            .await?
            .into_inner();
        approve(proposal.approval_id).await?;
    }
    officer
        .create_domain(request(pb::CreateDomainRequest {
            domain: DOMAIN.into(),
            key: research.clone(),
        }))
        .await?;
    let proposal = officer
        .propose_grant(request(pb::ProposeGrantRequest {
            principal: pki.principal("tokenizer-1"),
            key: research,
            operations: vec!["tokenize".into()],
            context_equals: [("kms:domain".to_string(), DOMAIN.to_string())].into(),
            ..Default::default()
        }))
        .await?
        .into_inner();
    approve(proposal.approval_id).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    for r in 0..REPLICAS {
        loop {
            let mut app = c.app.rpc[r].clone();
            let mut tokenizer = c.tokenizer.rpc[r].clone();
            let mut ok = true;
            for key in &keys {
                ok &= app
                    .generate_data_key(request(pb::GenerateDataKeyRequest {
                        key: key.clone(),
                        encryption_context: context(),
                    }))
                    .await
                    .is_ok();
            }
            ok &= tokenizer
                .tokenize(request(tokenize_request(0, 0)))
                .await
                .is_ok();
            if ok {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "replica-{} does not let app-1 and tokenizer-1 work after 20 s",
                r + 1
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(keys)
}

fn context() -> HashMap<String, String> {
    [("purpose".to_string(), "scaleout".to_string())].into()
}

fn tokenize_request(transform: usize, value: usize) -> pb::TokenizeRequest {
    pb::TokenizeRequest {
        domain: DOMAIN.into(),
        field: "mrn".into(),
        transform_json: TRANSFORMS[transform].into(),
        values: vec![VALUES[value].into()],
        patient_pseudonyms: Vec::new(),
    }
}

/// xorshift64*: the load's choices (no security role).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Sends `call` to replica `first`, then to the next ones while it fails retryably, for at
/// most [`OP_DEADLINE`]. Records every answer's request id (errors included) and every
/// retried failure. `Err` carries the last status (answered errors are not retried).
async fn call<T, F, Fut>(
    shared: &Shared,
    op: &'static str,
    clients: &Clients,
    first: usize,
    f: F,
) -> Result<(T, usize), tonic::Status>
where
    F: Fn(Rpc) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + OP_DEADLINE;
    let mut replica = first % REPLICAS;
    loop {
        let sent = Instant::now();
        let result = match tokio::time::timeout(CALL_TIMEOUT, f(clients.rpc[replica].clone())).await
        {
            Ok(result) => result,
            Err(_) => Err(tonic::Status::deadline_exceeded("client timeout")),
        };
        match result {
            Ok(response) => {
                let id = request_id(response.metadata());
                note_answer(shared, op, replica, id);
                return Ok((response.into_inner(), replica));
            }
            Err(status) if retryable(&status) => {
                let latency = sent.elapsed();
                shared.lock().failures.push(Failure {
                    replica,
                    code: status.code(),
                    latency,
                });
                if Instant::now() >= deadline {
                    return Err(status);
                }
                replica = (replica + 1) % REPLICAS;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => {
                let id = request_id(status.metadata());
                note_answer(shared, op, replica, id);
                return Err(status);
            }
        }
    }
}

fn note_answer(shared: &Shared, op: &'static str, replica: usize, id: Option<String>) {
    let restarted = *shared
        .restarted_at
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let mut record = shared.lock();
    *record.answers.entry((op, replica)).or_default() += 1;
    if replica == 1 && restarted.is_some() {
        record.after_restart += 1;
    }
    match id {
        Some(id) => record.acknowledged.push((op, id)),
        None => record.unexpected.push(format!(
            "{op}: an answer without {}",
            kms_server::grpc::REQUEST_ID_HEADER
        )),
    }
}

async fn worker(shared: Arc<Shared>, id: usize, max_ops: u64) -> anyhow::Result<()> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((id as u64 + 1) * 0x1000_0000_01B3));
    let c = shared.callers.clone();
    while !shared.stop.load(Ordering::Relaxed) {
        let n = shared.ops.fetch_add(1, Ordering::Relaxed);
        if n >= max_ops {
            break;
        }
        let first = rng.below(REPLICAS);
        // Per mille: 45 % data keys, 40 % decryptions, 10 % tokenization, 4.7 % raced
        // approvals, 0.3 % rotations (about one every two seconds across the cluster).
        let dice = rng.below(1000);
        let key = shared.keys[rng.below(shared.keys.len())].clone();
        let have_blobs = !shared.lock().received.is_empty();
        let outcome: Result<(), String> = if dice < 450 || (dice < 850 && !have_blobs) {
            let result = call(&shared, "GenerateDataKey", &c.app, first, |mut rpc| {
                let key = key.clone();
                async move {
                    rpc.generate_data_key(request(pb::GenerateDataKeyRequest {
                        key,
                        encryption_context: context(),
                    }))
                    .await
                }
            })
            .await;
            match result {
                Ok((r, _)) => {
                    shared.lock().received.push(Received {
                        key_version: r.key_version,
                        digest: Sha256::digest(&r.plaintext).into(),
                        blob: r.ciphertext_blob,
                    });
                    Ok(())
                }
                Err(s) => Err(format!("GenerateDataKey: {s:?}")),
            }
        } else if dice < 850 {
            let pick = {
                let record = shared.lock();
                let i = rng.below(record.received.len());
                record.received[i].clone()
            };
            let result = call(&shared, "Decrypt", &c.app, first, |mut rpc| {
                let blob = pick.blob.clone();
                async move {
                    rpc.decrypt(request(pb::DecryptRequest {
                        ciphertext_blob: blob,
                        encryption_context: context(),
                        key: String::new(),
                    }))
                    .await
                }
            })
            .await;
            match result {
                Ok((r, _)) => {
                    let digest: [u8; 32] = Sha256::digest(&r.plaintext).into();
                    if digest != pick.digest {
                        shared.lock().decrypt_mismatches += 1;
                    }
                    Ok(())
                }
                Err(s) => Err(format!("Decrypt: {s:?}")),
            }
        } else if dice < 950 {
            let (t, v) = (rng.below(TRANSFORMS.len()), rng.below(VALUES.len()));
            let result = call(
                &shared,
                "Tokenize",
                &c.tokenizer,
                first,
                |mut rpc| async move { rpc.tokenize(request(tokenize_request(t, v))).await },
            )
            .await;
            match result {
                Ok((r, replica)) => {
                    let token = r
                        .results
                        .first()
                        .map(|x| x.value.clone())
                        .unwrap_or_default();
                    let mut record = shared.lock();
                    let known = record.tokens.entry((t, v)).or_insert_with(|| token.clone());
                    if token.is_empty() || *known != token {
                        let msg = format!(
                            "{} of {} through replica-{}: {token:?}, earlier {known:?}",
                            TRANSFORMS[t],
                            VALUES[v],
                            replica + 1
                        );
                        record.token_mismatches.push(msg);
                    }
                    Ok(())
                }
                Err(s) => Err(format!("Tokenize: {s:?}")),
            }
        } else if dice >= 997 {
            let result = call(&shared, "RotateKey", &c.officer, first, |mut rpc| {
                let key = key.clone();
                async move { rpc.rotate_key(request(pb::KeyRequest { key })).await }
            })
            .await;
            match result {
                Ok(_) => {
                    shared.lock().rotations += 1;
                    Ok(())
                }
                Err(s) => Err(format!("RotateKey: {s:?}")),
            }
        } else {
            race_approval(&shared, &c, first, &key).await
        };
        if let Err(e) = outcome {
            shared.lock().unexpected.push(e);
        }
    }
    Ok(())
}

/// officer-1 proposes a grant through replica `first`; officer-2 approves it through the two
/// other replicas at the same moment. The request must end executed, once.
async fn race_approval(
    shared: &Shared,
    c: &Callers,
    first: usize,
    key: &str,
) -> Result<(), String> {
    let principal = shared.app_principal.clone();
    let proposal = call(shared, "ProposeGrant", &c.officer, first, |mut rpc| {
        let (principal, key) = (principal.clone(), key.to_string());
        async move {
            rpc.propose_grant(request(pb::ProposeGrantRequest {
                principal,
                key,
                operations: vec!["decrypt".into()],
                ..Default::default()
            }))
            .await
        }
    })
    .await
    .map_err(|s| format!("ProposeGrant: {s:?}"))?
    .0;
    let approve = |replica: usize| {
        let id = proposal.approval_id.clone();
        async move {
            call(shared, "Approve", &c.approver, replica, |mut rpc| {
                let id = id.clone();
                async move {
                    rpc.approve(request(pb::ApprovalId { approval_id: id }))
                        .await
                }
            })
            .await
        }
    };
    let (x, y) = tokio::join!(approve(first + 1), approve(first + 2));
    for outcome in [x, y] {
        match outcome {
            Ok(_) => {}
            // The loser of the race (or a retry after an answer that was lost).
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {}
            Err(s) => return Err(format!("Approve: {s:?}")),
        }
    }
    shared
        .lock()
        .approvals
        .push((proposal.approval_id, key.to_string()));
    Ok(())
}

/// While PostgreSQL is down and until every replica served again: every 250 ms, one data key
/// and one readiness check per replica, no retries. Returns the probes and, per replica,
/// whether readiness said NOT_SERVING.
async fn probe_loop(c: Callers, key: String, probing: Arc<AtomicBool>) -> (Vec<Probe>, Vec<bool>) {
    let mut probes = Vec::new();
    let mut not_serving = vec![false; REPLICAS];
    let mut health: Vec<_> = c
        .app
        .channels
        .iter()
        .map(|channel| tonic_health::pb::health_client::HealthClient::new(channel.clone()))
        .collect();
    while probing.load(Ordering::Relaxed) {
        for r in 0..REPLICAS {
            let mut rpc = c.app.rpc[r].clone();
            let started = Instant::now();
            let mut req = request(pb::GenerateDataKeyRequest {
                key: key.clone(),
                encryption_context: context(),
            });
            req.set_timeout(CALL_TIMEOUT);
            let outcome = match tokio::time::timeout(CALL_TIMEOUT, rpc.generate_data_key(req)).await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(s)) => Err(s.code()),
                Err(_) => Err(tonic::Code::DeadlineExceeded),
            };
            probes.push(Probe {
                started,
                latency: started.elapsed(),
                replica: r,
                outcome,
            });
            let check = health[r].check(tonic_health::pb::HealthCheckRequest {
                service: "kms.v1.KeyManagement".into(),
            });
            if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(2), check).await {
                if status.into_inner().status
                    == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
                {
                    not_serving[r] = true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    (probes, not_serving)
}

/// Per replica, how long after `up_at` a data key first succeeded (probing every 100 ms, at
/// most [`RESUME_WITHIN`] plus a margin).
async fn wait_resumed(c: &Callers, key: &str, up_at: Instant) -> Vec<Option<Duration>> {
    let mut resumed = vec![None; REPLICAS];
    let give_up = up_at + RESUME_WITHIN + Duration::from_secs(10);
    while resumed.iter().any(Option::is_none) && Instant::now() < give_up {
        for (r, done) in resumed.iter_mut().enumerate() {
            if done.is_some() {
                continue;
            }
            let mut rpc = c.app.rpc[r].clone();
            let ok = tokio::time::timeout(
                CALL_TIMEOUT,
                rpc.generate_data_key(request(pb::GenerateDataKeyRequest {
                    key: key.to_string(),
                    encryption_context: context(),
                })),
            )
            .await
            .is_ok_and(|r| r.is_ok());
            if ok {
                *done = Some(up_at.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    resumed
}

fn check_outage(
    report: &mut Report,
    probes: &[Probe],
    down_from: Instant,
    down_until: Instant,
    up_at: Instant,
    resumed: &[Option<Duration>],
) -> anyhow::Result<()> {
    // Probes sent after the stop completed and answered before the start began.
    let during: Vec<&Probe> = probes
        .iter()
        .filter(|p| p.started >= down_from && p.started + p.latency <= down_until)
        .collect();
    report.outage_probes = during.len();
    let timeline = || {
        probes
            .iter()
            .map(|p| {
                let at = |t: Instant| t.saturating_duration_since(down_from).as_millis() as i64;
                let start = if p.started >= down_from {
                    at(p.started)
                } else {
                    -(down_from.saturating_duration_since(p.started).as_millis() as i64)
                };
                format!(
                    "r{} +{start}ms {}ms {:?}",
                    p.replica + 1,
                    p.latency.as_millis(),
                    p.outcome
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    ensure!(
        during.len() >= REPLICAS,
        "too few probes while PostgreSQL was down ({}; down for {} ms): {}",
        during.len(),
        down_until.saturating_duration_since(down_from).as_millis(),
        timeline()
    );
    for p in &during {
        ensure!(
            p.outcome == Err(tonic::Code::Unavailable),
            "replica-{} answered {:?} while PostgreSQL was down",
            p.replica + 1,
            p.outcome
        );
    }
    let mut latencies: Vec<Duration> = during.iter().map(|p| p.latency).collect();
    latencies.sort();
    let max = latencies.last().copied().unwrap_or_default();
    report.outage_max_fail_ms = max.as_secs_f64() * 1e3;
    report.outage_median_fail_ms = latencies[latencies.len() / 2].as_secs_f64() * 1e3;
    ensure!(
        max <= FAIL_FAST,
        "a call took {max:?} to fail while PostgreSQL was down (bound {FAIL_FAST:?})"
    );
    for (r, seen) in report.not_serving_seen.iter().enumerate() {
        ensure!(
            *seen,
            "replica-{} never reported NOT_SERVING while PostgreSQL was down",
            r + 1
        );
    }
    let _ = up_at;
    for (r, resumed) in resumed.iter().enumerate() {
        let Some(after) = resumed else {
            bail!(
                "replica-{} did not serve again after PostgreSQL came back",
                r + 1
            );
        };
        ensure!(
            *after <= RESUME_WITHIN,
            "replica-{} served again only {after:?} after PostgreSQL came back",
            r + 1
        );
        report.resumed_ms.push(after.as_secs_f64() * 1e3);
    }
    Ok(())
}

async fn check_final(
    report: &mut Report,
    shared: &Shared,
    say: &dyn Fn(&str),
) -> anyhow::Result<()> {
    let c = &shared.callers;
    let record = std::mem::take(&mut *shared.lock());
    ensure!(
        record.unexpected.is_empty(),
        "unexpected answers under load ({}): {:?}",
        record.unexpected.len(),
        &record.unexpected[..record.unexpected.len().min(10)]
    );
    ensure!(
        record.decrypt_mismatches == 0,
        "{} decryptions gave another plaintext",
        record.decrypt_mismatches
    );
    ensure!(
        record.token_mismatches.is_empty(),
        "tokens differ: {:?}",
        record.token_mismatches
    );
    ensure!(
        record.after_restart > 0,
        "the restarted replica answered nothing"
    );
    report.answers_after_restart = record.after_restart;
    report.rotations = record.rotations;
    report.approvals = record.approvals.len();
    report.data_keys = record.received.len();
    report.answers_by_replica = vec![0; REPLICAS];
    for ((op, replica), n) in &record.answers {
        *report.answers.entry(op.to_string()).or_default() += n;
        report.answers_by_replica[*replica] += n;
    }
    for f in &record.failures {
        let what = format!("{:?} from replica-{}", f.code, f.replica + 1);
        *report.retried.entry(what).or_default() += 1;
        report.slowest_retried_ms = report.slowest_retried_ms.max(f.latency.as_secs_f64() * 1e3);
    }
    // Give the caches their bound before asking every replica.
    tokio::time::sleep(kms_server::service::KEY_CACHE_MAX_AGE).await;

    // Every data key decrypts through every replica, to its plaintext.
    say(&format!(
        "checking: {} data keys through each of {REPLICAS} replicas",
        record.received.len()
    ));
    let received = Arc::new(record.received);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (received, next, app) = (Arc::clone(&received), Arc::clone(&next), c.app.clone());
        tasks.spawn(async move {
            let mut checked = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(item) = received.get(i) else {
                    return anyhow::Ok(checked);
                };
                for r in 0..REPLICAS {
                    let mut rpc = app.rpc[r].clone();
                    let opened = bounded(
                        || {
                            format!(
                                "data key {i} (v{}) through replica-{}",
                                item.key_version,
                                r + 1
                            )
                        },
                        rpc.decrypt(request(pb::DecryptRequest {
                            ciphertext_blob: item.blob.clone(),
                            encryption_context: context(),
                            key: String::new(),
                        })),
                    )
                    .await?;
                    let digest: [u8; 32] = Sha256::digest(&opened.plaintext).into();
                    ensure!(
                        digest == item.digest,
                        "data key {i} through replica-{}: other plaintext",
                        r + 1
                    );
                    checked += 1;
                }
            }
        });
    }
    // The first failure ends the check (the other tasks are dropped with the set).
    while let Some(checked) = tasks.join_next().await {
        report.final_decrypts += checked.context("decrypt check")??;
    }

    // Version histories agree, and every replica encrypts under the primary.
    say("checking: version histories through every replica");
    for key in &shared.keys {
        let mut histories = Vec::new();
        for r in 0..REPLICAS {
            let mut auditor = c.auditor.rpc[r].clone();
            let k = bounded(
                || format!("describe {key} through replica-{}", r + 1),
                auditor.describe_key(request(pb::DescribeKeyRequest { key: key.clone() })),
            )
            .await?;
            let versions: Vec<(u32, i64)> = k
                .versions
                .iter()
                .map(|v| (v.version, v.created_at))
                .collect();
            let mut app = c.app.rpc[r].clone();
            let used = bounded(
                || format!("data key under {key} through replica-{}", r + 1),
                app.generate_data_key(request(pb::GenerateDataKeyRequest {
                    key: key.clone(),
                    encryption_context: context(),
                })),
            )
            .await?
            .key_version;
            ensure!(
                used == k.primary_version,
                "replica-{} encrypts {key} under v{used}, the primary is v{}",
                r + 1,
                k.primary_version
            );
            histories.push((k.primary_version, k.min_decryption_version, versions));
        }
        ensure!(
            histories.windows(2).all(|w| w[0] == w[1]),
            "{key}: version histories differ between replicas: {histories:?}"
        );
        report.key_versions += histories[0].2.len();
    }

    // Each raced approval executed once.
    say("checking: each raced approval executed once");
    for (approval_id, key) in &record.approvals {
        let mut officer = c.officer.rpc[0].clone();
        let state = bounded(
            || format!("approval {approval_id}"),
            officer.get_approval(request(pb::ApprovalId {
                approval_id: approval_id.clone(),
            })),
        )
        .await?
        .state;
        ensure!(state == "executed", "approval {approval_id}: {state}");
        let grants = bounded(
            || format!("grants of {key}"),
            officer.list_grants(request(pb::ListGrantsRequest {
                principal: String::new(),
                key: key.clone(),
            })),
        )
        .await?
        .grants;
        let made = grants
            .iter()
            .filter(|g| g.approval_id == *approval_id)
            .count();
        ensure!(made == 1, "approval {approval_id} made {made} grants");
    }

    // The trail verifies and holds every request id a client received.
    say("checking: the audit trail verifies and holds every acknowledged request");
    let mut auditor = c.auditor.rpc[2].clone();
    let verified = bounded(
        || "VerifyAudit".to_string(),
        auditor.verify_audit(request(pb::VerifyAuditRequest {})),
    )
    .await?;
    ensure!(
        verified.intact,
        "audit trail broken at seq {}: {}",
        verified.first_bad_seq,
        verified.problem
    );
    let mut ids = HashSet::new();
    let mut after = 0;
    loop {
        let page = bounded(
            || format!("audit records after {after}"),
            auditor.list_audit_records(request(pb::ListAuditRecordsRequest {
                after_seq: after,
                page_size: AUDIT_PAGE,
                ..Default::default()
            })),
        )
        .await?;
        for line in &page.records_json {
            let r: kms_server::audit::AuditRecord =
                serde_json::from_str(line).context("audit record JSON")?;
            ids.insert(r.request_id);
        }
        // A short page is the end: every request (these included) adds a record, so "until
        // empty" would never end.
        if page.records_json.len() < AUDIT_PAGE as usize || page.last_seq <= after {
            break;
        }
        after = page.last_seq;
    }
    report.audit_records = ids.len() as u64;
    let missing: Vec<&(&str, String)> = record
        .acknowledged
        .iter()
        .filter(|(_, id)| !ids.contains(id))
        .collect();
    ensure!(
        missing.is_empty(),
        "{} acknowledged requests have no audit record, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    report.request_ids_checked = record.acknowledged.len();
    Ok(())
}

/// `call`'s answer within [`CALL_TIMEOUT`]: an error, or no answer in time, fails the run
/// (a check never hangs).
async fn bounded<T>(
    what: impl FnOnce() -> String,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => bail!("{}: {status:?}", what()),
        Err(_) => bail!("{}: no answer within {CALL_TIMEOUT:?}", what()),
    }
}

async fn sleep_until(t: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await;
}
