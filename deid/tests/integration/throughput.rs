//! Throughput on the Synthea CSV export, beside the floor of the same run: copying the files
//! (read, write, fsync — the I/O a run cannot avoid). Measured to disk and to tmpfs, where
//! fsync costs next to nothing, so the engine's own cost shows apart from the disk's.
//!
//! `cargo test --release -p deid --test integration throughput -- --ignored --nocapture`

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use deid::{Engine, Options};

use crate::common::*;

const ROUNDS: usize = 9;

/// CPU seconds (user + system) this process has used, from `/proc/self/stat` (Linux; 0
/// elsewhere). Clock ticks of 10 ms: a figure over many rounds, not one.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // After the command name (in parentheses) come field 3 (the state letter) onwards;
    // utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<i64> = rest
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    ticks as f64 / 100.0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn copy_all(from: &Path, to: &Path) {
    for p in entries(from) {
        let bytes = std::fs::read(&p).unwrap();
        let mut f = std::fs::File::create(to.join(p.file_name().unwrap())).unwrap();
        f.write_all(&bytes).unwrap();
        f.sync_all().unwrap();
    }
}

fn floor(input: &Path, out: &Path, place: &str, mb: f64) {
    let mut times = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        copy_all(input, out);
        times.push(t.elapsed());
    }
    let d = median(times);
    println!(
        "  copy + fsync to {place:<5}           {:>7.1} MB/s  ({:.1} ms)",
        mb / d.as_secs_f64(),
        d.as_secs_f64() * 1e3
    );
}

fn measure(engine: &Engine, input: &Path, out: &Path, place: &str, mb: f64, threads: usize) {
    let options = Options {
        threads: std::num::NonZeroUsize::new(threads),
        overwrite: true,
        ..Options::default()
    };
    let mut times = Vec::new();
    let mut records = 0;
    let cpu = cpu_seconds();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let report = run(engine, input, out, &options).unwrap();
        times.push(t.elapsed());
        records = report.records;
    }
    let cpu_per_round = (cpu_seconds() - cpu) / ROUNDS as f64;
    let d = median(times);
    println!(
        "  deid to {place:<5}, {threads} thread(s)       {:>7.1} MB/s  ({:.1} ms, {:.0} records/s; {:.0} MB per CPU-second)",
        mb / d.as_secs_f64(),
        d.as_secs_f64() * 1e3,
        records as f64 / d.as_secs_f64(),
        mb / cpu_per_round.max(1e-9)
    );
    assert!(records > 40_000);
}

#[test]
#[ignore = "benchmark; run with --release --ignored --nocapture"]
fn throughput_on_the_synthea_csv_export() {
    let input = Path::new(SYNTHEA_CSV);
    let bytes: u64 = entries(input)
        .iter()
        .map(|p| p.metadata().unwrap().len())
        .sum();
    let mb = bytes as f64 / 1e6;
    let engine = engine(CSV_PROFILE);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("Synthea CSV export: {mb:.2} MB, {cores} cores, median of {ROUNDS} rounds");
    let disk = tempfile::tempdir().unwrap();
    let shm = Path::new("/dev/shm");
    let tmpfs = shm.is_dir().then(|| tempfile::tempdir_in(shm).unwrap());
    let mut places = vec![("disk", disk.path())];
    if let Some(t) = &tmpfs {
        places.push(("tmpfs", t.path()));
    }
    for (place, dir) in places {
        floor(input, dir, place, mb);
        for threads in [1, cores] {
            measure(&engine, input, dir, place, mb, threads);
        }
    }
}
