//! Throughput and latency of the tokenization transforms on one thread, each beside the raw
//! primitive it is built on, measured in the same run on the same inputs (the SSNs, names and
//! patient ids of the Synthea `patients.csv` in `shared/data`):
//!
//! - keyed pseudonyms ([`FieldTransformer`] with `kind = "pseudonym"`) beside HMAC-SHA256 of the
//!   `hmac` crate over the same bytes, keyed state prepared once like ours;
//! - deterministic encryption (`kind = "deterministic"`) beside the `aes-siv` crate's
//!   `Aes256Siv::encrypt_in_place_detached` with the same key, associated data and plaintext;
//! - FF1 on 9-digit SSNs (`kind = "fpe"`) beside the `fpe` crate's FF1 on the same digits, key
//!   and tweak (outputs checked equal), and beside the physical floor: the 10 AES-256 block
//!   encryptions, one after the other, that FF1 needs for a 9-digit value.
//!
//! Transformers are prepared once (keys derived once) and output buffers reused, as a
//! de-identification pipeline does. Each pair is measured interleaved (ours, raw, ours, raw …,
//! [`ROUNDS`] rounds of [`ROUND`]) so that background load hits both sides alike; throughput is
//! the median of the rounds, a ratio the median of the ratios of adjacent rounds. Latency is timed per call in a separate pass into an HDR histogram
//! and includes the clock's own cost (reported as "timer").
//!
//! `cargo bench -p tokenize --bench transforms` measures (about 35 s); without `--bench` (as
//! `cargo test --all-targets` runs it) it only checks that every case works and agrees with its
//! reference, in a few milliseconds. The targets are requirements; a miss makes the exit code 1.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark states its set-up with expect()

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes::cipher::{BlockEncrypt, KeyInit};
use aes::{Aes256, Block};
use aes_siv::siv::Aes256Siv;
use fpe::ff1::{FlexibleNumeralString, FF1};
use hdrhistogram::Histogram;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokenize::keys::Purpose;
use tokenize::{Alphabet, Context, DomainKey, FieldTransformer, Normalization, Outcome, Transform};
use zeroize::Zeroizing;

/// Rounds per case, interleaved with the other cases of its group.
const ROUNDS: usize = 11;
/// Length of one round.
const ROUND: Duration = Duration::from_millis(150);
/// Calls timed one by one for the latency histogram.
const LATENCY_SAMPLES: usize = 100_000;
/// Calls between two looks at the clock in a throughput round.
const BATCH: usize = 512;

const PATIENTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/data/synthea/csv/patients.csv"
);

const DOMAIN: &str = "bench-domain";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let measure = args.iter().any(|a| a == "--bench");
    // Other arguments select the groups whose name contains one of them (`-- FF1`).
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let inputs = Inputs::load();
    let domain = DomainKey::new(DOMAIN, 1, Zeroizing::new([0x6b; 32]));
    let mut groups = [
        pseudonym_group(
            &domain,
            "SSN (ssn)",
            "ssn",
            Normalization::Ssn,
            &inputs.ssns,
        ),
        pseudonym_group(
            &domain,
            "name (text)",
            "name",
            Normalization::Text,
            &inputs.names,
        ),
        pseudonym_group(
            &domain,
            "patient id (exact)",
            "patient_id",
            Normalization::Exact,
            &inputs.ids,
        ),
        siv_group(&domain, "patient id", "patient_id", &inputs.ids),
        siv_group(&domain, "name", "name", &inputs.names),
        ff1_group(&domain, &inputs.ssns),
    ];
    if !measure {
        for group in &mut groups {
            group.smoke();
        }
        println!("transforms: every case ran and agreed with its reference (run with `cargo bench` to measure)");
        return;
    }
    let timer = timer_overhead();
    println!("## Tokenization transforms: one thread\n");
    println!("{}", machine());
    println!(
        "Inputs: {} SSNs, names and patient ids of `synthea/csv/patients.csv`, cycled. Throughput: \
         median of {ROUNDS} interleaved rounds of {} ms; latency: {LATENCY_SAMPLES} calls timed one \
         by one (timer cost p50 {} ns included). Ratio = our time per field ÷ the reference's, median \
         over adjacent pairs of rounds.\n",
        inputs.ssns.len(),
        ROUND.as_millis(),
        timer
    );
    println!("| transform | case | fields/s | p50 | p99 | ratio to reference | target |");
    println!("|---|---|---:|---:|---:|---:|---|");
    let mut missed = Vec::new();
    for group in groups {
        if filters.is_empty() || filters.iter().any(|f| group.transform.contains(f.as_str())) {
            missed.extend(group.run());
        }
    }
    println!();
    if missed.is_empty() {
        println!("All targets met.");
    } else {
        for m in &missed {
            println!("MISSED: {m}");
        }
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs

struct Inputs {
    ssns: Vec<String>,
    names: Vec<String>,
    ids: Vec<String>,
}

impl Inputs {
    fn load() -> Self {
        let mut reader = csv::Reader::from_path(PATIENTS).expect("patients.csv");
        let headers = reader.headers().expect("header").clone();
        let column = |name: &str| headers.iter().position(|h| h == name).expect(name);
        let (id, ssn, first, last) = (column("Id"), column("SSN"), column("FIRST"), column("LAST"));
        let mut inputs = Inputs {
            ssns: Vec::new(),
            names: Vec::new(),
            ids: Vec::new(),
        };
        for record in reader.records() {
            let r = record.expect("record");
            inputs.ids.push(r[id].to_owned());
            inputs.ssns.push(r[ssn].to_owned());
            inputs.names.push(format!("{} {}", &r[first], &r[last]));
        }
        assert!(
            inputs.ssns.len() > 100,
            "patients.csv has the 113 Synthea patients"
        );
        assert!(inputs.ssns.iter().all(|s| s.len() == 11));
        inputs
    }
}

// ---------------------------------------------------------------------------------------------
// Cases and groups

/// One measured thing: a closure over the index of an input.
trait Case {
    fn label(&self) -> &str;
    /// Runs `count` calls from input `start` on, wrapping around; returns the next index.
    fn run(&mut self, start: usize, count: usize) -> usize;
}

struct Fields<F> {
    label: String,
    len: usize,
    f: F,
}

impl<F: FnMut(usize)> Case for Fields<F> {
    fn label(&self) -> &str {
        &self.label
    }

    fn run(&mut self, start: usize, count: usize) -> usize {
        let mut i = start;
        for _ in 0..count {
            (self.f)(i);
            i += 1;
            if i == self.len {
                i = 0;
            }
        }
        i
    }
}

fn case<'a>(label: &str, len: usize, f: impl FnMut(usize) + 'a) -> Box<dyn Case + 'a> {
    Box::new(Fields {
        label: label.to_owned(),
        len,
        f,
    })
}

/// Our transform, its references (the first is the one the ratio target applies to), and the
/// throughput target.
struct Group<'a> {
    transform: String,
    ours: Box<dyn Case + 'a>,
    references: Vec<Box<dyn Case + 'a>>,
    target: f64,
    /// Whether outputs were checked equal to a reference, for the report.
    agreement: Option<String>,
}

struct Measured {
    fields_per_s: f64,
    /// Per round: fields/s of this case.
    rounds: Vec<f64>,
    p50: u64,
    p99: u64,
}

impl Group<'_> {
    /// Runs every case over all inputs once (and a bit more), without timing.
    fn smoke(&mut self) {
        for c in std::iter::once(&mut self.ours).chain(self.references.iter_mut()) {
            c.run(0, 256);
        }
    }

    fn run(mut self) -> Vec<String> {
        let mut rounds: Vec<Vec<f64>> = vec![Vec::new(); 1 + self.references.len()];
        let mut next = vec![0usize; 1 + self.references.len()];
        for c in std::iter::once(&mut self.ours).chain(self.references.iter_mut()) {
            c.run(0, BATCH * 8); // warm-up
        }
        for _ in 0..ROUNDS {
            for (k, c) in std::iter::once(&mut self.ours)
                .chain(self.references.iter_mut())
                .enumerate()
            {
                let (rate, at) = throughput(c.as_mut(), next[k]);
                next[k] = at;
                rounds[k].push(rate);
            }
        }
        let mut results = Vec::new();
        for (k, c) in std::iter::once(&mut self.ours)
            .chain(self.references.iter_mut())
            .enumerate()
        {
            let (p50, p99) = latency(c.as_mut());
            results.push(Measured {
                fields_per_s: median(&mut rounds[k].clone()),
                rounds: rounds[k].clone(),
                p50,
                p99,
            });
        }
        let ours = &results[0];
        let mut missed = Vec::new();
        let meets = ours.fields_per_s >= self.target;
        println!(
            "| {} | **ours** ({}) | {} | {} | {} | | ≥ {}: **{}** |",
            self.transform,
            self.ours.label(),
            thousands(ours.fields_per_s),
            ns(ours.p50),
            ns(ours.p99),
            thousands(self.target),
            if meets { "met" } else { "MISSED" }
        );
        if !meets {
            missed.push(format!(
                "{}: {} fields/s < {}",
                self.transform,
                thousands(ours.fields_per_s),
                thousands(self.target)
            ));
        }
        for (k, reference) in self.references.iter().enumerate() {
            let r = &results[k + 1];
            // Each round of ours beside the reference's round right after it, so that a burst of
            // background load skews one ratio, not the median.
            let mut ratios: Vec<f64> = r
                .rounds
                .iter()
                .zip(&ours.rounds)
                .map(|(theirs, ours)| theirs / ours)
                .collect();
            let ratio = median(&mut ratios);
            let bound = if k == 0 {
                let within = ratio <= 2.0;
                if !within {
                    missed.push(format!(
                        "{}: {ratio:.2}× the time of {}",
                        self.transform,
                        reference.label()
                    ));
                }
                format!("≤ 2×: **{}**", if within { "met" } else { "MISSED" })
            } else {
                String::new()
            };
            println!(
                "| | {} | {} | {} | {} | {ratio:.2}× | {bound} |",
                reference.label(),
                thousands(r.fields_per_s),
                ns(r.p50),
                ns(r.p99),
            );
        }
        if let Some(agreement) = &self.agreement {
            println!("| | {agreement} | | | | | |");
        }
        missed
    }
}

/// Fields per second of one round, and where the next round starts.
fn throughput(c: &mut dyn Case, start: usize) -> (f64, usize) {
    let begin = Instant::now();
    let mut calls = 0usize;
    let mut at = start;
    loop {
        at = c.run(at, BATCH);
        calls += BATCH;
        let elapsed = begin.elapsed();
        if elapsed >= ROUND {
            return (calls as f64 / elapsed.as_secs_f64(), at);
        }
    }
}

/// p50 and p99 in nanoseconds of single calls.
fn latency(c: &mut dyn Case) -> (u64, u64) {
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram");
    let mut at = 0;
    for _ in 0..LATENCY_SAMPLES {
        let t = Instant::now();
        at = c.run(at, 1);
        h.saturating_record(t.elapsed().as_nanos() as u64);
    }
    (h.value_at_quantile(0.5), h.value_at_quantile(0.99))
}

/// p50 of timing nothing.
fn timer_overhead() -> u64 {
    let mut nothing = case("nothing", 1, |i| {
        black_box(i);
    });
    latency(nothing.as_mut()).0
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

// ---------------------------------------------------------------------------------------------
// The groups

fn prepared(domain: &DomainKey, field: &str, transform: Transform) -> FieldTransformer {
    FieldTransformer::new(domain, field, &transform).expect("transform")
}

fn apply(t: &FieldTransformer, value: &str, out: &mut String) {
    let outcome = t
        .apply_into(value, &Context::default(), out)
        .expect("apply");
    debug_assert_eq!(outcome, Outcome::Written);
}

fn pseudonym_group<'a>(
    domain: &DomainKey,
    what: &str,
    field: &str,
    normalize: Normalization,
    values: &'a [String],
) -> Group<'a> {
    let t = prepared(domain, field, Transform::Pseudonym { normalize });
    let mut out = String::with_capacity(64);
    let ours = case("FieldTransformer, v1.<base64url>", values.len(), move |i| {
        apply(&t, black_box(&values[i]), &mut out);
        black_box(&out);
    });
    let key = domain.derive::<32>(field, Purpose::Pseudonym);
    let keyed = <Hmac<Sha256> as Mac>::new_from_slice(key.as_slice()).expect("HMAC key");
    let raw = case(
        "hmac crate HMAC-SHA256, same bytes",
        values.len(),
        move |i| {
            let mut mac = keyed.clone();
            mac.update(black_box(values[i].as_bytes()));
            black_box(mac.finalize().into_bytes());
        },
    );
    Group {
        transform: format!("HMAC pseudonym, {what}"),
        ours,
        references: vec![raw],
        target: 2_000_000.0,
        agreement: None,
    }
}

fn siv_group<'a>(domain: &DomainKey, what: &str, field: &str, values: &'a [String]) -> Group<'a> {
    let t = prepared(
        domain,
        field,
        Transform::Deterministic {
            normalize: Normalization::Exact,
        },
    );
    let mut out = String::with_capacity(128);
    let ours = case("FieldTransformer, v1.<base64url>", values.len(), move |i| {
        apply(&t, black_box(&values[i]), &mut out);
        black_box(&out);
    });
    let key = domain.derive::<64>(field, Purpose::DeterministicEncryption);
    let mut siv = Aes256Siv::new_from_slice(key.as_slice()).expect("AES-SIV key");
    let ad = tokenize::siv::associated_data(DOMAIN, field, 1);
    let mut buf = [0u8; 256];
    let raw = case("aes-siv crate Aes256Siv, same AD", values.len(), move |i| {
        let v = black_box(values[i].as_bytes());
        let body = &mut buf[..v.len()];
        body.copy_from_slice(v);
        let tag = siv.encrypt_in_place_detached([&ad], body).expect("seal");
        black_box((tag, &body));
    });
    Group {
        transform: format!("AES-SIV deterministic, {what}"),
        ours,
        references: vec![raw],
        target: 1_000_000.0,
        agreement: None,
    }
}

fn ff1_group<'a>(domain: &DomainKey, ssns: &'a [String]) -> Group<'a> {
    let t = prepared(
        domain,
        "ssn",
        Transform::Fpe {
            alphabet: Alphabet::Digits,
            separators: "-".to_owned(),
            min_len: None,
            max_len: 9,
        },
    );
    let key = domain.derive::<32>("ssn", Purpose::Ff1);
    let tweak = tokenize::ff1::tweak(DOMAIN, "ssn");
    let numerals: Vec<Vec<u16>> = ssns
        .iter()
        .map(|s| {
            s.bytes()
                .filter(u8::is_ascii_digit)
                .map(|b| u16::from(b - b'0'))
                .collect()
        })
        .collect();
    let digits: Vec<FlexibleNumeralString> = numerals
        .iter()
        .map(|d| FlexibleNumeralString::from(d.clone()))
        .collect();
    let theirs = FF1::<Aes256>::new(key.as_slice(), 10).expect("fpe FF1");

    // The fpe crate and ours give the same ciphertext for every input.
    let mut out = String::new();
    for (s, d) in ssns.iter().zip(&digits) {
        apply(&t, s, &mut out);
        let c: Vec<u16> = theirs.encrypt(&tweak, d).expect("fpe encrypt").into();
        let c: String = c.iter().map(|&x| char::from(b'0' + x as u8)).collect();
        assert_eq!(out.replace('-', ""), c, "fpe and ours differ");
    }

    let mut out = String::with_capacity(16);
    let ours = case("FieldTransformer, ddd-dd-dddd", ssns.len(), move |i| {
        apply(&t, black_box(&ssns[i]), &mut out);
        black_box(&out);
    });
    let fpe = case(
        "fpe crate FF1<Aes256>, same digits, key, tweak",
        ssns.len(),
        move |i| {
            black_box(
                theirs
                    .encrypt(&tweak, black_box(&digits[i]))
                    .expect("fpe encrypt"),
            );
        },
    );
    let core = tokenize::ff1::Ff1::new(
        Aes256::new_from_slice(key.as_slice()).expect("AES key"),
        10,
        &tweak,
        6,
        9,
    )
    .expect("FF1");
    let mut buf = [0u16; 9];
    let ours_core = case(
        "ours: Ff1 alone on the digits (no text)",
        ssns.len(),
        move |i| {
            core.encrypt(black_box(&numerals[i]), &mut buf)
                .expect("FF1");
            black_box(&buf);
        },
    );
    let aes = Aes256::new_from_slice(key.as_slice()).expect("AES key");
    let floor = case("floor: 10 chained AES-256 blocks", ssns.len(), move |i| {
        let mut block = Block::default();
        block[..11].copy_from_slice(black_box(ssns[i].as_bytes()));
        for _ in 0..10 {
            aes.encrypt_block(&mut block);
        }
        black_box(block);
    });
    Group {
        transform: "FF1, 9-digit SSN".to_owned(),
        ours,
        references: vec![floor, fpe, ours_core],
        target: 300_000.0,
        agreement: Some(format!("fpe output = ours on all {} SSNs", ssns.len())),
    }
}

// ---------------------------------------------------------------------------------------------
// Report

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or("");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "Machine: {model}, {cores} CPUs (this bench uses one thread), AES-NI {}, SHA-NI {}.\n",
        if has("aes") { "yes" } else { "no" },
        if has("sha_ni") { "yes" } else { "no" }
    )
}

fn thousands(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ns(x: u64) -> String {
    if x >= 10_000 {
        format!("{:.1} µs", x as f64 / 1000.0)
    } else {
        format!("{x} ns")
    }
}
