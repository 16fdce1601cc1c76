//! The audit trail on a real SoftHSM2 token and real SQLite / PostgreSQL stores: records are
//! durable and verify; every kind of tampering with the stored rows (edit, delete, insert,
//! reorder, forged or orphaned checkpoint, truncation) is reported at the first bad record;
//! values are stored only as HMACs; group commit batches; a failing store fails closed and
//! the chain resumes; a restart continues the chain.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptoki::object::{Attribute, AttributeType};
use kms_server::audit::{
    Audit, AuditError, AuditEvent, AuditParams, AuditRecord, BadRecord, Outcome, Problem,
    RecordFilter, Severity,
};
use kms_server::hsm::Hsm;
use kms_server::store::{Backend, Store};
use softhsm_test::ManualClock;

use crate::support::*;

const T0: i64 = 1_800_000_000;

fn params(checkpoint_every: u32) -> AuditParams {
    AuditParams {
        checkpoint_every,
        checkpoint_interval: Duration::from_secs(3600),
        max_batch: 64,
    }
}

fn hsm() -> Hsm {
    Hsm::open(softhsm_test::pkcs11(), softhsm_test::hsm_params(4)).expect("hsm")
}

async fn open(db: &TestDb, params: AuditParams) -> (Store, Arc<ManualClock>, Audit) {
    let store = Store::connect(&db.url, 8).await.expect("store");
    let clock = ManualClock::new(T0);
    let audit = Audit::open(hsm(), store.clone(), clock.clone(), params)
        .await
        .expect("audit opens");
    (store, clock, audit)
}

fn event(i: usize) -> AuditEvent {
    let mut e = AuditEvent::new(
        format!("req-{i}"),
        "app-ehr",
        "app",
        "GenerateDataKey",
        Outcome::Ok,
    );
    e.key_id = Some("key-1".into());
    e.key_version = Some(1);
    e.context
        .insert("patient".into(), format!("patient-{i:04}"));
    e.identifiers.push(("mrn".into(), format!("MRN-{i:04}")));
    e.detail.insert("items".into(), "1".into());
    e
}

/// Records `n` events one after another (so checkpoints fall on known seqs).
async fn record_sequentially(audit: &Audit, range: std::ops::Range<usize>) {
    for i in range {
        audit.record(event(i)).await.expect("recorded");
    }
}

async fn exec(store: &Store, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn count(store: &Store) -> i64 {
    sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM audit_records")
        .fetch_one(store.pool())
        .await
        .expect("count")
}

async fn first_bad(audit: &Audit) -> Option<BadRecord> {
    audit.verify().await.expect("verify runs").first_bad
}

fn bad(seq: u64, problem: Problem) -> Option<BadRecord> {
    Some(BadRecord { seq, problem })
}

/// Records are written, chained, checkpointed and verify; seqs are consecutive.
async fn records_are_chained_and_verify(db: TestDb) {
    let (_store, _clock, audit) = open(&db, params(10)).await;
    record_sequentially(&audit, 0..25).await;
    let report = audit.verify().await.expect("verify");
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.records, 25);
    assert_eq!(report.last_seq, 25);
    assert_eq!(report.checkpoints, 2, "checkpoints at 10 and 20");
    assert_eq!(report.last_checkpoint_seq, 20);
    assert_eq!(report.unsealed, 5);

    let records = audit
        .records(0, 100, &RecordFilter::default())
        .await
        .expect("records");
    assert_eq!(records.len(), 25);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1);
        assert_eq!(r.request_id, format!("req-{i}"));
        assert_eq!(r.time, T0);
        if i > 0 {
            assert_eq!(r.prev_hash, records[i - 1].hash);
        }
    }
    assert_eq!(records[0].prev_hash, "0".repeat(64));
    assert_eq!(
        audit.checkpoint_now().await.expect("checkpoint"),
        Some(25),
        "seals the tail"
    );
    assert_eq!(audit.checkpoint_now().await.expect("checkpoint"), None);
    let report = audit.verify().await.expect("verify");
    assert!(report.is_ok() && report.unsealed == 0, "{report:?}");
    audit.shutdown().await;
}
on_both_stores!(
    records_are_chained_and_verify,
    records_are_chained_and_verify
);

/// Context values and identifiers are stored only as HMACs; `hash_identifier` finds them.
async fn values_are_stored_only_as_hmacs(db: TestDb) {
    let (store, _clock, audit) = open(&db, params(10)).await;
    record_sequentially(&audit, 0..12).await;

    // Nothing in any audit table contains a value in clear.
    for table in ["audit_records", "audit_checkpoints", "audit_key"] {
        let rows = sqlx::query(&format!("SELECT * FROM {table}"))
            .fetch_all(store.pool())
            .await
            .expect("rows");
        for row in &rows {
            use sqlx::Row;
            for i in 0..row.len() {
                if let Ok(Some(text)) = row.try_get::<Option<String>, _>(i) {
                    assert!(
                        !text.contains("patient-") && !text.contains("MRN-"),
                        "value in clear in {table}: {text}"
                    );
                }
            }
        }
    }

    // The auditor's `hash VALUE`: finds exactly the records about it, by context or identifier.
    let hash = audit.hash_identifier("patient-0007");
    assert_eq!(hash.len(), 64);
    let found = audit
        .records(
            0,
            100,
            &RecordFilter {
                identifier_hash: Some(hash.to_uppercase()),
                ..RecordFilter::default()
            },
        )
        .await
        .expect("records");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].request_id, "req-7");
    assert_eq!(found[0].context["patient"], hash);
    assert!(found[0].mentions(&hash));
    let mrn = audit.hash_identifier("MRN-0003");
    let found = audit
        .records(
            0,
            100,
            &RecordFilter {
                identifier_hash: Some(mrn.clone()),
                ..RecordFilter::default()
            },
        )
        .await
        .expect("records");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].identifiers, vec![("mrn".to_string(), mrn)]);

    // Debug of an event redacts the values.
    let debug = format!("{:?}", event(42));
    assert!(
        debug.contains("patient") && debug.contains("mrn"),
        "{debug}"
    );
    assert!(
        !debug.contains("patient-0042") && !debug.contains("MRN-0042"),
        "{debug}"
    );
    audit.shutdown().await;
}
on_both_stores!(
    values_are_stored_only_as_hmacs,
    values_are_stored_only_as_hmacs
);

/// An edited field is reported at its record, whichever field it is.
async fn edited_record_is_detected(db: TestDb) {
    let (store, _clock, audit) = open(&db, params(5)).await;
    record_sequentially(&audit, 0..20).await;
    for (column, value) in [
        ("principal", "'mallory'"),
        ("outcome", "'denied'"),
        ("context", "'{\"patient\":\"00\"}'"),
        ("key_version", "2"),
        ("recorded_at", "0"),
        ("break_glass", "'bg-forged'"),
    ] {
        exec(
            &store,
            "CREATE TABLE saved AS SELECT * FROM audit_records WHERE seq = 7",
        )
        .await;
        exec(
            &store,
            &format!("UPDATE audit_records SET {column} = {value} WHERE seq = 7"),
        )
        .await;
        assert_eq!(first_bad(&audit).await, bad(7, Problem::Edited), "{column}");
        exec(&store, "DELETE FROM audit_records WHERE seq = 7").await;
        exec(&store, "INSERT INTO audit_records SELECT * FROM saved").await;
        exec(&store, "DROP TABLE saved").await;
        assert_eq!(first_bad(&audit).await, None, "{column} restored");
    }
    // An edit of the stored hash itself breaks the next link.
    exec(
        &store,
        "UPDATE audit_records SET hash = (SELECT hash FROM audit_records WHERE seq = 3) WHERE seq = 7",
    )
    .await;
    assert_eq!(first_bad(&audit).await, bad(7, Problem::Edited));
    audit.shutdown().await;
}
on_both_stores!(edited_record_is_detected, edited_record_is_detected);

/// A deleted record is reported as missing at its seq; so is a deleted tail.
async fn deleted_record_is_detected(db: TestDb) {
    let (store, _clock, audit) = open(&db, params(5)).await;
    record_sequentially(&audit, 0..20).await;
    exec(&store, "DELETE FROM audit_records WHERE seq = 7").await;
    assert_eq!(first_bad(&audit).await, bad(7, Problem::Missing));
    audit.shutdown().await;
}
on_both_stores!(deleted_record_is_detected, deleted_record_is_detected);

/// Deleting the end of the trail: seen through a later checkpoint, or (after the last
/// checkpoint) by the running writer that knows its head.
async fn truncation_is_detected(db: TestDb) {
    let (store, _clock, audit) = open(&db, params(5)).await;
    record_sequentially(&audit, 0..23).await;
    // Records 21..23 are after the last checkpoint (20): only the live head knows of them.
    exec(&store, "DELETE FROM audit_records WHERE seq > 21").await;
    assert_eq!(first_bad(&audit).await, bad(22, Problem::Missing));
    // Beyond a checkpoint, the checkpoint shows it.
    exec(&store, "DELETE FROM audit_records WHERE seq > 12").await;
    assert_eq!(first_bad(&audit).await, bad(13, Problem::Missing));
    audit.shutdown().await;
}
on_both_stores!(truncation_is_detected, truncation_is_detected);

/// A forged record inserted in the middle, or appended at the end, is detected: the chain is
/// keyed, so a forger cannot compute a valid hash.
async fn inserted_record_is_detected(db: TestDb) {
    let (store, _clock, audit) = open(&db, params(5)).await;
    record_sequentially(&audit, 0..20).await;
    let forge = |seq: u64, from: u64| {
        format!(
            "INSERT INTO audit_records (seq, recorded_at, request_id, principal, role, operation,
               key_id, key_version, outcome, error_code, context, identifiers, break_glass,
               severity, detail, prev_hash, hash)
             SELECT {seq}, recorded_at, 'forged', principal, role, operation, key_id, key_version,
               outcome, error_code, context, identifiers, break_glass, severity, detail, hash, hash
             FROM audit_records WHERE seq = {from}"
        )
    };
    // At the end: linked to the real head, with a made-up hash.
    exec(&store, &forge(21, 20)).await;
    assert_eq!(first_bad(&audit).await, bad(21, Problem::Edited));
    exec(&store, "DELETE FROM audit_records WHERE seq = 21").await;
    assert_eq!(first_bad(&audit).await, None);
    // In the middle: later records renumbered to make room.
    exec(
        &store,
        "UPDATE audit_records SET seq = -seq - 1 WHERE seq >= 8",
    )
    .await;
    exec(&store, "UPDATE audit_records SET seq = -seq WHERE seq < 0").await;
    exec(&store, &forge(8, 7)).await;
    assert_eq!(first_bad(&audit).await, bad(8, Problem::Edited));
    audit.shutdown().await;
}
on_both_stores!(inserted_record_is_detected, inserted_record_is_detected);

/// Two records swapped (their seqs exchanged) are reported at the first of them.
async fn reordered_records_are_detected(db: TestDb) {
    let (store, _clock, audit) = open(&db, params(5)).await;
    record_sequentially(&audit, 0..20).await;
    exec(&store, "UPDATE audit_records SET seq = -7 WHERE seq = 7").await;
    exec(&store, "UPDATE audit_records SET seq = 7 WHERE seq = 8").await;
    exec(&store, "UPDATE audit_records SET seq = 8 WHERE seq = -7").await;
    assert_eq!(first_bad(&audit).await, bad(7, Problem::BrokenLink));
    audit.shutdown().await;
}
on_both_stores!(
    reordered_records_are_detected,
    reordered_records_are_detected
);

/// A checkpoint whose MAC or covered hash was altered is reported at its seq.
async fn forged_checkpoint_is_detected(db: TestDb) {
    let (store, _clock, audit) = open(&db, params(5)).await;
    record_sequentially(&audit, 0..20).await;
    exec(
        &store,
        "UPDATE audit_checkpoints SET mac = (SELECT mac FROM audit_checkpoints WHERE seq = 5) WHERE seq = 10",
    )
    .await;
    assert_eq!(first_bad(&audit).await, bad(10, Problem::CheckpointForged));
    exec(
        &store,
        "UPDATE audit_checkpoints SET mac = (SELECT mac FROM audit_checkpoints WHERE seq = 15) WHERE seq = 5",
    )
    .await;
    assert_eq!(first_bad(&audit).await, bad(5, Problem::CheckpointForged));
    exec(&store, "DELETE FROM audit_checkpoints WHERE seq IN (5, 10)").await;
    assert_eq!(first_bad(&audit).await, None);
    // Pointing a genuine checkpoint at another record: its MAC covers the seq.
    exec(
        &store,
        "UPDATE audit_checkpoints SET seq = 14 WHERE seq = 15",
    )
    .await;
    assert_eq!(first_bad(&audit).await, bad(14, Problem::CheckpointForged));
    audit.shutdown().await;
}
on_both_stores!(forged_checkpoint_is_detected, forged_checkpoint_is_detected);

/// 500 concurrent records take far fewer transactions than records, and all verify.
async fn group_commit_batches(db: TestDb) {
    let (_store, _clock, audit) = open(
        &db,
        AuditParams {
            max_batch: 256,
            ..params(100)
        },
    )
    .await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..500 {
        let audit = audit.clone();
        tasks.spawn(async move { audit.record(event(i)).await });
    }
    let mut seqs = Vec::new();
    while let Some(result) = tasks.join_next().await {
        seqs.push(result.expect("task").expect("recorded"));
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=500).collect::<Vec<u64>>(), "every seq once");
    let stats = audit.stats();
    assert_eq!(stats.records, 500);
    assert!(
        stats.flushes <= 50,
        "group commit: {} flushes for 500 records",
        stats.flushes
    );
    assert!((1..=5).contains(&stats.checkpoints), "{stats:?}");
    let report = audit.verify().await.expect("verify");
    assert!(report.is_ok() && report.records == 500, "{report:?}");
    audit.shutdown().await;
}
on_both_stores!(group_commit_batches, group_commit_batches);

/// A store that refuses audit inserts makes `record` fail (fail closed), leaves no partial
/// batch behind, and once it accepts them again the chain resumes and verifies.
async fn store_failure_fails_closed(db: TestDb) {
    let (store, _clock, audit) = open(&db, params(5)).await;
    record_sequentially(&audit, 0..3).await;
    let (block, unblock) = match store.backend() {
        Backend::Sqlite => (
            "CREATE TRIGGER audit_block BEFORE INSERT ON audit_records
             WHEN NEW.request_id = 'poison'
             BEGIN SELECT RAISE(ABORT, 'blocked'); END",
            "DROP TRIGGER audit_block",
        ),
        Backend::Postgres => (
            "CREATE FUNCTION audit_block() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF NEW.request_id = 'poison' THEN RAISE EXCEPTION 'blocked'; END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER audit_block BEFORE INSERT ON audit_records
             FOR EACH ROW EXECUTE FUNCTION audit_block()",
            "DROP TRIGGER audit_block ON audit_records",
        ),
    };
    exec(&store, block).await;

    // A poisoned record fails alone...
    let mut poison = event(99);
    poison.request_id = "poison".into();
    assert!(matches!(
        audit.record(poison.clone()).await,
        Err(AuditError::NotDurable)
    ));
    assert_eq!(count(&store).await, 3);
    // ...and with others in flight, whatever shared its batch fails with it; nothing that
    // failed is stored, everything that succeeded is.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let audit = audit.clone();
        let e = if i == 20 {
            poison.clone()
        } else {
            event(100 + i)
        };
        tasks.spawn(async move { (e.request_id.clone(), audit.record(e).await) });
    }
    let mut ok = Vec::new();
    let mut failed = 0;
    while let Some(result) = tasks.join_next().await {
        match result.expect("task") {
            (id, Ok(_)) => ok.push(id),
            (id, Err(e)) => {
                assert!(matches!(e, AuditError::NotDurable), "{id}: {e:?}");
                failed += 1;
            }
        }
    }
    assert!(failed >= 1 && !ok.contains(&"poison".to_string()));
    assert_eq!(count(&store).await, 3 + ok.len() as i64);
    let stored = audit
        .records(3, 100, &RecordFilter::default())
        .await
        .expect("records");
    let mut stored_ids: Vec<String> = stored.into_iter().map(|r| r.request_id).collect();
    stored_ids.sort();
    ok.sort();
    assert_eq!(
        stored_ids, ok,
        "exactly the acknowledged records are stored"
    );
    assert!(audit.stats().failed_flushes >= 2);
    assert!(audit.verify().await.expect("verify").is_ok());

    exec(&store, unblock).await;
    let seq = audit.record(poison).await.expect("recorded again");
    assert_eq!(seq, 4 + ok.len() as u64);
    record_sequentially(&audit, 200..210).await;
    let report = audit.verify().await.expect("verify");
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.last_seq, 14 + ok.len() as u64);
    audit.shutdown().await;
}
on_both_stores!(store_failure_fails_closed, store_failure_fails_closed);

/// Closing and reopening continues the chain with the same keys; shutdown seals the tail.
async fn restart_continues_the_chain(db: TestDb) {
    let (store, _clock, audit) = open(&db, params(100)).await;
    record_sequentially(&audit, 0..10).await;
    let hash = audit.hash_identifier("patient-0001");
    audit.shutdown().await;
    assert!(matches!(
        audit.record(event(10)).await,
        Err(AuditError::Closed)
    ));
    let checkpoints = audit.checkpoints(0, 10).await.expect("checkpoints");
    assert_eq!(checkpoints.len(), 1, "final checkpoint");
    assert_eq!(checkpoints[0].seq, 10);
    drop(audit);

    let clock = ManualClock::new(T0 + 10);
    let audit = Audit::open(hsm(), store.clone(), clock, params(100))
        .await
        .expect("reopens");
    assert_eq!(
        audit.hash_identifier("patient-0001"),
        hash,
        "same identifier key"
    );
    assert_eq!(audit.record(event(10)).await.expect("recorded"), 11);
    let report = audit.verify().await.expect("verify");
    assert!(report.is_ok() && report.last_seq == 11, "{report:?}");
    assert_eq!(report.checkpoints, 1);
    audit.shutdown().await;
}
on_both_stores!(restart_continues_the_chain, restart_continues_the_chain);

/// Two writers on one store (replicas) share one audit key and one chain: racing batches
/// are re-chained, never forked.
async fn two_writers_share_one_chain(db: TestDb) {
    let store = Store::connect(&db.url, 8).await.expect("store");
    let clock = ManualClock::new(T0);
    let (a, b) = tokio::join!(
        Audit::open(hsm(), store.clone(), clock.clone(), params(50)),
        Audit::open(hsm(), store.clone(), clock.clone(), params(50)),
    );
    let (a, b) = (a.expect("a"), b.expect("b"));
    assert_eq!(
        a.hash_identifier("x"),
        b.hash_identifier("x"),
        "one audit key"
    );
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let audit = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.spawn(async move { audit.record(event(i)).await });
    }
    while let Some(result) = tasks.join_next().await {
        result.expect("task").expect("recorded");
    }
    assert_eq!(count(&store).await, 200);
    assert!(
        a.stats().conflicts + b.stats().conflicts > 0,
        "the writers raced"
    );
    a.shutdown().await;
    b.shutdown().await;
    let c = Audit::open(hsm(), store.clone(), clock, params(50))
        .await
        .expect("c");
    let report = c.verify().await.expect("verify");
    assert!(report.is_ok() && report.last_seq == 200, "{report:?}");
    c.shutdown().await;
    // One registered key, and exactly one audit key object in the token for it.
    let registered: String = sqlx::query_scalar("SELECT hsm_object_id FROM audit_key")
        .fetch_one(store.pool())
        .await
        .expect("key row");
    let session = softhsm_test::user_session().expect("session");
    let found = session
        .find_objects(&[Attribute::Id(hex::decode(registered).expect("hex"))])
        .expect("find");
    assert_eq!(found.len(), 1);
}
on_both_stores!(two_writers_share_one_chain, two_writers_share_one_chain);

/// Break-glass uses are marked, loud, and listed by the report; other filters work.
async fn break_glass_report_and_filters(db: TestDb) {
    let (_store, clock, audit) = open(&db, params(100)).await;
    record_sequentially(&audit, 0..5).await;
    clock.advance(100);
    let mut e = event(5).under_break_glass("bg-1");
    e.principal = "dr-house".into();
    e.operation = "Decrypt".into();
    audit.record(e).await.expect("recorded");
    let mut denied = event(6);
    denied.outcome = Outcome::Denied;
    denied.error_code = Some("PERMISSION_DENIED".into());
    denied.key_id = Some("key-2".into());
    audit.record(denied).await.expect("recorded");
    let mut late = event(7).under_break_glass("bg-2");
    late.principal = "dr-house".into();
    audit.record(late).await.expect("recorded");

    let report = audit
        .records(0, 100, &RecordFilter::break_glass())
        .await
        .expect("report");
    let windows: Vec<_> = report.iter().map(|r| r.break_glass.clone()).collect();
    assert_eq!(windows, vec![Some("bg-1".into()), Some("bg-2".into())]);
    assert!(report.iter().all(|r| r.severity == Severity::High));

    let select = |filter: RecordFilter| {
        let audit = audit.clone();
        async move {
            audit
                .records(0, 100, &filter)
                .await
                .expect("records")
                .into_iter()
                .map(|r| r.seq)
                .collect::<Vec<_>>()
        }
    };
    let f = RecordFilter::default;
    assert_eq!(
        select(RecordFilter {
            break_glass_window: Some("bg-2".into()),
            ..f()
        })
        .await,
        vec![8]
    );
    assert_eq!(
        select(RecordFilter {
            principal: Some("dr-house".into()),
            operation: Some("Decrypt".into()),
            ..f()
        })
        .await,
        vec![6]
    );
    assert_eq!(
        select(RecordFilter {
            outcome: Some(Outcome::Denied),
            key_id: Some("key-2".into()),
            ..f()
        })
        .await,
        vec![7]
    );
    assert_eq!(
        select(RecordFilter {
            since: Some(T0 + 1),
            until: Some(T0 + 101),
            ..f()
        })
        .await,
        vec![6, 7, 8]
    );
    assert_eq!(audit.records(6, 1, &f()).await.expect("page").len(), 1);
    audit.shutdown().await;
}
on_both_stores!(
    break_glass_report_and_filters,
    break_glass_report_and_filters
);

/// Export writes one JSON line per record, which parses back to the same record.
async fn export_writes_json_lines(db: TestDb) {
    let (_store, _clock, audit) = open(&db, params(100)).await;
    record_sequentially(&audit, 0..30).await;
    let mut out = Vec::new();
    let n = audit
        .export(0, &RecordFilter::default(), &mut out)
        .await
        .expect("export");
    assert_eq!(n, 30);
    let text = String::from_utf8(out).expect("utf-8");
    let parsed: Vec<AuditRecord> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let stored = audit
        .records(0, 100, &RecordFilter::default())
        .await
        .expect("records");
    assert_eq!(parsed, stored);
    assert!(!text.contains("patient-"));
    let first: serde_json::Value =
        serde_json::from_str(text.lines().next().expect("line")).expect("json");
    assert_eq!(first["outcome"], "ok");
    assert_eq!(first["seq"], 1);
    audit.shutdown().await;
}
on_both_stores!(export_writes_json_lines, export_writes_json_lines);

/// A checkpoint is written once the interval has passed on the injected clock.
async fn checkpoint_after_interval(db: TestDb) {
    let (_store, clock, audit) = open(
        &db,
        AuditParams {
            checkpoint_interval: Duration::from_secs(60),
            ..params(1000)
        },
    )
    .await;
    record_sequentially(&audit, 0..3).await;
    assert_eq!(audit.stats().checkpoints, 0);
    clock.advance(61);
    record_sequentially(&audit, 3..4).await;
    // Written right after the batch's waiters were answered, off their path.
    let deadline = Instant::now() + Duration::from_secs(5);
    while audit.stats().checkpoints == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(audit.stats().checkpoints, 1);
    // By the timer tick (at 3) or after the next batch (at 4), whichever came first.
    let seq = audit.checkpoints(0, 10).await.expect("checkpoints")[0].seq;
    assert!(seq == 3 || seq == 4, "{seq}");
    // With nothing recorded, the timer alone seals the tail once the interval has passed.
    record_sequentially(&audit, 4..6).await;
    clock.advance(61);
    let deadline = Instant::now() + Duration::from_secs(5);
    while audit.stats().checkpoints < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        audit.checkpoints(0, 10).await.expect("checkpoints")[1].seq,
        6
    );
    audit.shutdown().await;
}
on_both_stores!(checkpoint_after_interval, checkpoint_after_interval);

/// The audit key is a sensitive, never-extractable HMAC key in the token; the start-up
/// self-test (which now includes HMAC-SHA256) passes.
#[tokio::test]
async fn audit_key_is_sensitive_and_self_test_passes() {
    let db = TestDb::new(StoreKind::Sqlite)
        .await
        .expect("db")
        .expect("sqlite");
    let (store, _clock, audit) = open(&db, params(10)).await;
    hsm().self_test().await.expect("self-test");
    let id: String = sqlx::query_scalar("SELECT hsm_object_id FROM audit_key")
        .fetch_one(store.pool())
        .await
        .expect("key row");
    let session = softhsm_test::user_session().expect("session");
    let found = session
        .find_objects(&[Attribute::Id(hex::decode(id).expect("hex"))])
        .expect("find");
    assert_eq!(found.len(), 1);
    let attrs = session
        .get_attributes(
            found[0],
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::NeverExtractable,
                AttributeType::Token,
                AttributeType::Private,
                AttributeType::Sign,
                AttributeType::Encrypt,
                AttributeType::Label,
            ],
        )
        .expect("attributes");
    for expected in [
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::NeverExtractable(true),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sign(true),
        Attribute::Encrypt(false),
        Attribute::Label(b"kms-audit-v1".to_vec()),
    ] {
        assert!(
            attrs.contains(&expected),
            "missing {expected:?} in {attrs:?}"
        );
    }
    audit.shutdown().await;
}

/// A store that names an audit key the token does not hold refuses to open (the trail could
/// neither be extended nor verified), rather than silently starting a new key.
#[tokio::test]
async fn missing_audit_key_refuses_to_open() {
    let db = TestDb::new(StoreKind::Sqlite)
        .await
        .expect("db")
        .expect("sqlite");
    let (store, clock, audit) = open(&db, params(10)).await;
    record_sequentially(&audit, 0..3).await;
    audit.shutdown().await;
    let id: String = sqlx::query_scalar("SELECT hsm_object_id FROM audit_key")
        .fetch_one(store.pool())
        .await
        .expect("key row");
    let session = softhsm_test::user_session().expect("session");
    for handle in session
        .find_objects(&[Attribute::Id(hex::decode(id).expect("hex"))])
        .expect("find")
    {
        session.destroy_object(handle).expect("destroy");
    }
    assert!(matches!(
        Audit::open(hsm(), store, clock, params(10)).await,
        Err(AuditError::KeyMissing)
    ));
}

/// The disabled trail (benchmark baseline only) records nothing and verifies nothing.
#[tokio::test]
async fn disabled_audit_records_nothing() {
    let audit = Audit::disabled();
    assert!(audit.is_disabled());
    assert_eq!(audit.record(event(1)).await.expect("no-op"), 0);
    assert!(matches!(audit.verify().await, Err(AuditError::Closed)));
    audit.shutdown().await;
}

/// Cost of `record()`: 10 000 records from 64 (`AUDIT_BENCH_CALLERS`) concurrent closed-loop
/// callers. Prints
/// records/s, flushes and latency percentiles. `cargo test -p tests --test integration
/// audit::throughput -- --ignored --nocapture`.
async fn throughput(db: TestDb) {
    let (_store, _clock, audit) = open(&db, AuditParams::default()).await;
    let callers: usize = std::env::var("AUDIT_BENCH_CALLERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let per_caller = 10_000 / callers + 1;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..callers {
        let audit = audit.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(per_caller);
            for i in 0..per_caller {
                let t = Instant::now();
                audit
                    .record(event(c * per_caller + i))
                    .await
                    .expect("recorded");
                latencies.push(t.elapsed());
            }
            latencies
        });
    }
    let mut latencies = Vec::new();
    while let Some(result) = tasks.join_next().await {
        latencies.extend(result.expect("task"));
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let stats = audit.stats();
    println!(
        "{:?}: {} records in {:.2?} = {:.0} records/s; {} flushes ({:.1} records/flush); \
         {} checkpoints; record() p50 {:.2?} p99 {:.2?} max {:.2?}",
        db.kind,
        stats.records,
        elapsed,
        stats.records as f64 / elapsed.as_secs_f64(),
        stats.flushes,
        stats.records as f64 / stats.flushes.max(1) as f64,
        stats.checkpoints,
        pct(0.50),
        pct(0.99),
        latencies[latencies.len() - 1],
    );
    let t = Instant::now();
    let report = audit.verify().await.expect("verify");
    println!(
        "verify: {} records, {} checkpoints in {:.2?}",
        report.records,
        report.checkpoints,
        t.elapsed()
    );
    assert!(report.is_ok());
    audit.shutdown().await;
}

mod throughput {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "measurement; run with --ignored --nocapture"]
    async fn sqlite() {
        let db = crate::support::TestDb::new(crate::support::StoreKind::Sqlite)
            .await
            .expect("db")
            .expect("sqlite");
        super::throughput(db).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "measurement; run with --ignored --nocapture"]
    async fn postgres() {
        if let Some(db) = crate::support::TestDb::new(crate::support::StoreKind::Postgres)
            .await
            .expect("db")
        {
            super::throughput(db).await;
        }
    }
}
