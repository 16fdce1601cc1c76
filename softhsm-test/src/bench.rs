//! Measurement pieces shared by the load generators (`kms-bench`, `kms-scaleout bench`):
//! latency histograms merged over workers ([`Stats`]), a closed-loop RPC runner over a set of
//! clients ([`run_rpc`]), and the direct PKCS#11 loop on the same token that is the HSM limit
//! every KMS figure is compared with ([`HsmTarget`]).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use hdrhistogram::Histogram;
use sdk::KmsClient;

/// How long one RPC may take before the run is declared broken.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest latency the histograms hold (µs); larger values saturate.
pub const HIST_MAX_US: u64 = 60_000_000;

/// Calls, the measured window, and every call's latency in µs.
pub struct Stats {
    /// Calls completed inside the measured window.
    pub calls: u64,
    /// The window, in seconds.
    pub secs: f64,
    /// Every measured call's latency, µs.
    pub hist: Histogram<u64>,
}

impl Stats {
    /// Calls per second.
    pub fn per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.calls as f64 / self.secs
        } else {
            0.0
        }
    }
    /// Median latency, µs.
    pub fn p50(&self) -> u64 {
        self.hist.value_at_quantile(0.50)
    }
    /// 99th percentile latency, µs.
    pub fn p99(&self) -> u64 {
        self.hist.value_at_quantile(0.99)
    }
}

/// The kms-server binary a load generator starts: `explicit`, else `kms-server` beside the
/// running executable; an error naming how to build it if it is not there.
pub fn server_bin(explicit: Option<&std::path::Path>) -> anyhow::Result<std::path::PathBuf> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .context("current executable")?
            .parent()
            .context("executable without a directory")?
            .join("kms-server"),
    };
    if !path.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p kms-server` or pass --server-bin",
            path.display()
        );
    }
    Ok(path)
}

/// An empty latency histogram (µs, 3 significant digits).
pub fn new_hist() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).context("histogram")
}

/// What one worker (task or thread) measured.
pub struct Part {
    /// Its latencies, µs.
    pub hist: Histogram<u64>,
    /// Its measured calls.
    pub calls: u64,
    /// When its measured window began.
    pub measure_start: Instant,
    /// When its last call ended.
    pub finish: Instant,
}

/// Merges the workers' parts: throughput over the window from the earliest measured start to
/// the last finish (so a call that overran the deadline is counted with its full time).
pub fn merge(parts: Vec<Part>) -> anyhow::Result<Stats> {
    let mut hist = new_hist()?;
    let mut calls = 0;
    let mut start: Option<Instant> = None;
    let mut end: Option<Instant> = None;
    for p in parts {
        hist.add(&p.hist).context("merge histograms")?;
        calls += p.calls;
        start = Some(start.map_or(p.measure_start, |s| s.min(p.measure_start)));
        end = Some(end.map_or(p.finish, |e| e.max(p.finish)));
    }
    let secs = match (start, end) {
        (Some(s), Some(e)) => e.saturating_duration_since(s).as_secs_f64(),
        _ => 0.0,
    };
    Ok(Stats { calls, secs, hist })
}

/// `d` in whole microseconds, at least 1.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Runs `op` from `concurrency` tasks (task `i` uses client `i % clients.len()`), first for
/// `warmup` unrecorded, then for `measure` recorded. Any failed call fails the run.
pub async fn run_rpc<F, Fut>(
    clients: &[KmsClient],
    concurrency: usize,
    warmup: Duration,
    measure: Duration,
    op: F,
) -> anyhow::Result<Stats>
where
    F: Fn(KmsClient, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), sdk::Error>> + Send,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(concurrency));
    let seq = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let client = clients[i % clients.len()].clone();
        let op = op.clone();
        let barrier = Arc::clone(&barrier);
        let seq = Arc::clone(&seq);
        tasks.push(tokio::spawn(async move {
            let mut hist = new_hist()?;
            let mut calls = 0u64;
            barrier.wait().await;
            let measure_start = Instant::now() + warmup;
            let end = measure_start + measure;
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let n = seq.fetch_add(1, Ordering::Relaxed);
                tokio::time::timeout(CALL_TIMEOUT, op(client.clone(), n))
                    .await
                    .context("call timed out")?
                    .context("call failed")?;
                if t >= measure_start {
                    hist.saturating_record(micros(t.elapsed()));
                    calls += 1;
                }
            }
            anyhow::Ok(Part {
                hist,
                calls,
                measure_start,
                finish: Instant::now(),
            })
        }));
    }
    let mut parts = Vec::with_capacity(concurrency);
    for task in tasks {
        parts.push(task.await.context("bench task panicked")??);
    }
    merge(parts)
}

/// The HSM work of one KMS call, done directly.
#[derive(Debug, Clone, Copy)]
pub enum HsmWork {
    /// `C_GenerateRandom` 32 + 12 bytes, `C_Encrypt` (AES-GCM) of the 32 bytes.
    GenerateDataKey,
    /// `C_Decrypt` (AES-GCM) of a 32-byte data key sealed in the set-up.
    Decrypt,
}

/// A GCM nonce and `ciphertext || tag` of a data key, for the direct `C_Decrypt` loop.
pub type SealedDataKey = ([u8; 12], Vec<u8>);

/// The server's master key object on the run's token, reached from this process.
pub struct HsmTarget {
    pkcs11: Pkcs11,
    slot: Slot,
    handle: ObjectHandle,
    /// Kept open (and logged in) for the life of the target: SoftHSM2 invalidates the
    /// process's object handles and its login when the last session of a token closes.
    _anchor: Mutex<Session>,
}

impl HsmTarget {
    /// Finds the object labelled `object_label` (e.g. `kms:<key id>:v1`) on the token labelled
    /// `token_label`, with a logged-in session kept open.
    pub fn open(pkcs11: &Pkcs11, token_label: &str, object_label: &str) -> anyhow::Result<Self> {
        let slot = kms_server::hsm::find_token(pkcs11, token_label)
            .context("the run's token is not visible in this process")?;
        let session = user_session(pkcs11, slot)?;
        let found = session.find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(object_label.as_bytes().to_vec()),
        ])?;
        let handle = match found.as_slice() {
            [h] => *h,
            [] => bail!("no object labelled {object_label} in the token"),
            _ => bail!("several objects labelled {object_label}"),
        };
        Ok(HsmTarget {
            pkcs11: pkcs11.clone(),
            slot,
            handle,
            _anchor: Mutex::new(session),
        })
    }

    /// `threads` OS threads, each with its own logged-in session, loop `work`.
    pub fn run(
        &self,
        threads: usize,
        warmup: Duration,
        measure: Duration,
        work: HsmWork,
        aad: &[u8],
    ) -> anyhow::Result<Stats> {
        let barrier = Barrier::new(threads);
        let results: Vec<anyhow::Result<Part>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|_| scope.spawn(|| self.worker(&barrier, warmup, measure, work, aad)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("HSM thread panicked")))
                })
                .collect()
        });
        let parts = results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
        merge(parts)
    }

    fn worker(
        &self,
        barrier: &Barrier,
        warmup: Duration,
        measure: Duration,
        work: HsmWork,
        aad: &[u8],
    ) -> anyhow::Result<Part> {
        // Every thread reaches the barrier, even after a failed set-up, so none waits forever.
        let setup = self.setup(work, aad);
        barrier.wait();
        let (session, sealed) = setup?;
        let mut hist = new_hist()?;
        let mut calls = 0u64;
        let measure_start = Instant::now() + warmup;
        let end = measure_start + measure;
        loop {
            let t = Instant::now();
            if t >= end {
                break;
            }
            match work {
                HsmWork::GenerateDataKey => {
                    let mut data_key = zeroize::Zeroizing::new([0u8; 32]);
                    session.generate_random_slice(data_key.as_mut())?;
                    let mut nonce = [0u8; 12];
                    session.generate_random_slice(&mut nonce)?;
                    let params = GcmParams::new(&mut nonce, aad, 128.into())?;
                    let out = session.encrypt(
                        &Mechanism::AesGcm(params),
                        self.handle,
                        data_key.as_ref(),
                    )?;
                    if out.len() != 48 {
                        bail!("C_Encrypt returned {} bytes", out.len());
                    }
                }
                HsmWork::Decrypt => {
                    let (nonce, ciphertext) = &sealed;
                    let mut iv = *nonce;
                    let params = GcmParams::new(&mut iv, aad, 128.into())?;
                    let plain = zeroize::Zeroizing::new(session.decrypt(
                        &Mechanism::AesGcm(params),
                        self.handle,
                        ciphertext,
                    )?);
                    if plain.len() != 32 {
                        bail!("C_Decrypt returned {} bytes", plain.len());
                    }
                }
            }
            if t >= measure_start {
                hist.saturating_record(micros(t.elapsed()));
                calls += 1;
            }
        }
        Ok(Part {
            hist,
            calls,
            measure_start,
            finish: Instant::now(),
        })
    }

    /// A logged-in session and, for `Decrypt`, a nonce and ciphertext made with the key.
    fn setup(&self, work: HsmWork, aad: &[u8]) -> anyhow::Result<(Session, SealedDataKey)> {
        let session = user_session(&self.pkcs11, self.slot)?;
        let mut nonce = [0u8; 12];
        let mut ciphertext = Vec::new();
        if let HsmWork::Decrypt = work {
            let mut data_key = zeroize::Zeroizing::new([0u8; 32]);
            session.generate_random_slice(data_key.as_mut())?;
            session.generate_random_slice(&mut nonce)?;
            let mut iv = nonce;
            let params = GcmParams::new(&mut iv, aad, 128.into())?;
            ciphertext =
                session.encrypt(&Mechanism::AesGcm(params), self.handle, data_key.as_ref())?;
        }
        Ok((session, (nonce, ciphertext)))
    }
}

/// A session on `slot` logged in as the test token's user.
pub fn user_session(pkcs11: &Pkcs11, slot: Slot) -> anyhow::Result<Session> {
    let session = pkcs11.open_rw_session(slot).context("C_OpenSession")?;
    match session.login(UserType::User, Some(&AuthPin::from(crate::USER_PIN))) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(e) => Err(e).context("C_Login"),
    }
}
