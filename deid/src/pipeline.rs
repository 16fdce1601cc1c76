//! The streaming pipeline of one line-based file (CSV, NDJSON): a reader thread cuts the input
//! into chunks of whole records, N worker threads transform chunks in parallel, and the calling
//! thread writes the results in input order.
//!
//! Why scoped `std::thread`s and bounded `std::sync::mpsc` channels rather than rayon: the job
//! is a three-stage pipeline whose output must stay in input order and whose memory must stay
//! bounded whatever the file size. A fixed number of chunk "permits" (a channel pre-filled with
//! tokens; the reader takes one per chunk, the writer returns it once that chunk is written)
//! bounds the chunks alive at once — in the channels, in the workers, and in the writer's
//! reorder buffer — to `2 × workers + 2`. rayon's `par_bridge` neither keeps order nor bounds
//! what is buffered, and scoped threads let the workers borrow the engine without `Arc`s.
//! Errors and a failed writer stop everything: closing a channel wakes every stage.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Duration;

use std::collections::HashMap;

use crate::csvfmt::Chunk;
use crate::error::RejectReason;
use crate::report::FieldStats;
use crate::DeidError;

/// What a worker made of a chunk.
pub(crate) struct ChunkOut {
    pub(crate) bytes: Vec<u8>,
    pub(crate) records: u64,
    /// (line, reason, raw bytes within the chunk).
    pub(crate) rejects: Vec<(u64, RejectReason, std::ops::Range<usize>)>,
    /// An unknown field under `unknown_fields = "error"`: (line, field).
    pub(crate) fatal: Option<(u64, String)>,
    pub(crate) stats: FieldStats,
    pub(crate) unknown: HashMap<String, u64>,
}

impl ChunkOut {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(capacity),
            records: 0,
            rejects: Vec::new(),
            fatal: None,
            stats: FieldStats::default(),
            unknown: HashMap::new(),
        }
    }
}

/// Transforms chunks; one `State` per worker (scratch buffers, caches).
pub(crate) trait Processor: Sync {
    type State;
    type Output: Send;
    fn state(&self) -> Self::State;
    fn process(&self, chunk: &Chunk, state: &mut Self::State) -> Self::Output;
}

/// Runs the pipeline: `read` yields chunks until an empty one; `write` takes outputs in order.
pub(crate) fn run<P, R, W>(
    workers: usize,
    processor: &P,
    mut read: R,
    mut write: W,
) -> Result<(), DeidError>
where
    P: Processor,
    R: FnMut() -> Result<Chunk, DeidError> + Send,
    W: FnMut(&Chunk, P::Output) -> Result<(), DeidError>,
{
    let workers = workers.max(1);
    let permits = 2 * workers + 2;
    let (permit_tx, permit_rx) = mpsc::sync_channel::<()>(permits);
    for _ in 0..permits {
        // The channel has room for exactly `permits` tokens.
        let _ = permit_tx.send(());
    }
    let (work_tx, work_rx) = mpsc::sync_channel::<(u64, Chunk)>(workers);
    let work_rx = Mutex::new(work_rx);
    let (done_tx, done_rx) = mpsc::sync_channel::<(u64, Chunk, P::Output)>(workers);
    let cancel = AtomicBool::new(false);

    std::thread::scope(|scope| {
        let reader = scope.spawn(|| -> Result<(), DeidError> {
            let work_tx = work_tx;
            let permit_rx = permit_rx;
            let mut seq = 0u64;
            loop {
                match permit_rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(()) => {}
                    // A panicked worker never returns its permit; `cancel` says so.
                    Err(RecvTimeoutError::Timeout) if !cancel.load(Ordering::Relaxed) => continue,
                    Err(_) => return Ok(()),
                }
                if cancel.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let chunk = read()?;
                if chunk.records.is_empty() {
                    return Ok(());
                }
                if work_tx.send((seq, chunk)).is_err() {
                    return Ok(());
                }
                seq += 1;
            }
        });
        let mut handles = Vec::with_capacity(workers);
        for _ in 0..workers {
            let done_tx = done_tx.clone();
            let work_rx = &work_rx;
            let cancel = &cancel;
            handles.push(scope.spawn(move || {
                let _guard = CancelOnPanic(cancel);
                let mut state = processor.state();
                while let Some((seq, chunk)) = next_job(work_rx) {
                    if cancel.load(Ordering::Relaxed) {
                        return;
                    }
                    let out = processor.process(&chunk, &mut state);
                    if done_tx.send((seq, chunk, out)).is_err() {
                        return;
                    }
                }
            }));
        }
        drop(done_tx);

        let mut result = Ok(());
        let mut next = 0u64;
        let mut pending: BTreeMap<u64, (Chunk, P::Output)> = BTreeMap::new();
        'outer: for (seq, chunk, out) in done_rx.iter() {
            pending.insert(seq, (chunk, out));
            while let Some((chunk, out)) = pending.remove(&next) {
                if let Err(e) = write(&chunk, out) {
                    result = Err(e);
                    break 'outer;
                }
                next += 1;
                // The reader may have stopped already; a closed channel is fine.
                let _ = permit_tx.send(());
            }
        }
        if result.is_err() {
            cancel.store(true, Ordering::Relaxed);
        }
        // Wake the reader (no more permits) and the workers (no more readers of results).
        drop(permit_tx);
        drop(done_rx);
        let mut panicked = false;
        for h in handles {
            panicked |= h.join().is_err();
        }
        // The reader may be blocked handing over a chunk nobody takes any more: take them
        // until it has stopped (it sees `cancel`, or the end of input).
        while next_job(&work_rx).is_some() {}
        let read_result = reader.join().unwrap_or(Err(DeidError::WorkerPanicked));
        if panicked {
            return Err(DeidError::WorkerPanicked);
        }
        // A read error is the cause of an early end; report it first.
        read_result?;
        result
    })
}

/// Sets `cancel` if the worker holding it panics, so the other stages stop.
struct CancelOnPanic<'a>(&'a AtomicBool);

impl Drop for CancelOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

fn next_job<T>(rx: &Mutex<Receiver<T>>) -> Option<T> {
    // A poisoned lock means another worker panicked; stop this one too.
    let guard = rx.lock().ok()?;
    guard.recv().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csvfmt::RawRecord;

    struct Double;

    impl Processor for Double {
        type State = ();
        type Output = u64;
        fn state(&self) {}
        fn process(&self, chunk: &Chunk, _: &mut ()) -> u64 {
            // Uneven work so chunks finish out of order.
            let n = chunk.records[0].line;
            std::thread::sleep(std::time::Duration::from_micros((n % 7) * 300));
            n * 2
        }
    }

    fn chunk(line: u64) -> Chunk {
        Chunk {
            data: Vec::new(),
            records: vec![RawRecord {
                raw: 0..0,
                line,
                fields: 0..0,
                fault: None,
            }],
            fields: Vec::new(),
        }
    }

    #[test]
    fn output_stays_in_order() {
        let mut n = 0;
        let mut seen = Vec::new();
        run(
            4,
            &Double,
            || {
                n += 1;
                Ok(if n > 200 { Chunk::default() } else { chunk(n) })
            },
            |_, out| {
                seen.push(out);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen, (1..=200).map(|n| n * 2).collect::<Vec<_>>());
    }

    struct Panics;

    impl Processor for Panics {
        type State = ();
        type Output = ();
        fn state(&self) {}
        fn process(&self, chunk: &Chunk, _: &mut ()) {
            assert!(chunk.records[0].line != 5, "worker bug");
        }
    }

    #[test]
    fn a_panicking_worker_fails_the_run_without_hanging() {
        let mut n = 0u64;
        let err = run(
            2,
            &Panics,
            || {
                n += 1;
                Ok(chunk(n))
            },
            |_, ()| Ok(()),
        );
        assert!(matches!(err, Err(DeidError::WorkerPanicked)));
    }

    #[test]
    fn a_writer_error_stops_the_reader() {
        let mut n = 0u64;
        let err = run(
            3,
            &Double,
            || {
                n += 1;
                Ok(chunk(n))
            },
            |_, out| {
                if out == 20 {
                    Err(DeidError::WorkerPanicked)
                } else {
                    Ok(())
                }
            },
        );
        assert!(matches!(err, Err(DeidError::WorkerPanicked)));
    }
}
