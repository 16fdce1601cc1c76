//! Enforced rotation: usage limits with durable, reserved counters (across a restart), the
//! period scheduler on a moved clock, and exactly-once rotation by two servers on one store.

use std::collections::BTreeMap;
use std::sync::Arc;

use kms_server::config::RotationParams;
use kms_server::service::UsagePolicy;
use softhsm_test::ManualClock;

use crate::support::*;

const LIMIT: u64 = 1000;

fn rotation(block: u64) -> RotationParams {
    RotationParams {
        usage: UsagePolicy {
            max_per_version: 1 << 31,
            block,
        },
        ..RotationParams::default()
    }
}

/// Encrypts `n` data keys at concurrency 8 and counts the blobs per key version.
async fn generate(
    client: &sdk::KmsClient,
    key: &str,
    n: usize,
    per_version: &mut BTreeMap<u32, u64>,
) {
    let mut tasks = Vec::new();
    for chunk in 0..8 {
        let (c, key) = (client.clone(), key.to_string());
        let count = n / 8 + usize::from(chunk < n % 8);
        tasks.push(tokio::spawn(async move {
            let mut versions = Vec::with_capacity(count);
            for _ in 0..count {
                versions.push(
                    c.generate_data_key_without_plaintext(&key, &ctx(&[]))
                        .await
                        .expect("data key")
                        .key_version,
                );
            }
            versions
        }));
    }
    for t in tasks {
        for v in t.await.expect("join") {
            *per_version.entry(v).or_default() += 1;
        }
    }
}

/// No version ever encrypts more than its limit, also when the server restarts half-way (its
/// in-memory reservations are lost; the durable counter only over-counts).
async fn usage_limit_forces_rotation(db: TestDb) {
    let clock = ManualClock::new(1_800_000_000);
    let (server, _) = TestServer::start_custom(&db, clock.clone(), rotation(100))
        .await
        .expect("server");
    let client = server.client().await.expect("client");
    let key = server.create_key_for_app("").await.expect("key");
    let policy = officer(&server)
        .await
        .set_rotation_policy(&key.key_id, 0, LIMIT)
        .await
        .expect("policy");
    assert_eq!(policy.usage_limit, LIMIT);

    let mut per_version = BTreeMap::new();
    generate(&client, &key.key_id, 1_450, &mut per_version).await;
    server.stop().await.expect("stop half-way");
    let (server, _) = TestServer::start_custom(&db, clock, rotation(100))
        .await
        .expect("restart");
    let client = server.client().await.expect("client");
    generate(&client, &key.key_id, 1_450, &mut per_version).await;

    let described = officer(&server)
        .await
        .describe_key(&key.key_id)
        .await
        .expect("describe");
    assert!(
        described.primary_version >= 3,
        "2,900 encryptions at 1,000 per version: {per_version:?}"
    );
    for (version, count) in &per_version {
        assert!(
            *count <= LIMIT,
            "version {version} encrypted {count} > {LIMIT}"
        );
        let durable = described
            .versions
            .iter()
            .find(|v| v.version == *version)
            .expect("version")
            .usage;
        assert!(
            durable >= *count,
            "version {version}: durable counter {durable} under-counts {count}"
        );
        assert!(
            durable <= LIMIT,
            "version {version}: reserved {durable} past the limit"
        );
    }
    assert_eq!(per_version.values().sum::<u64>(), 2_900);
    server.stop().await.expect("stop");
}
on_both_stores!(usage_limit_on, usage_limit_forces_rotation);

/// The scheduler rotates a key when its period has passed on the injected clock, once.
async fn period_rotation_on_a_moved_clock(db: TestDb) {
    let clock = ManualClock::new(1_800_000_000);
    let (server, service) = TestServer::start_custom(&db, clock.clone(), RotationParams::default())
        .await
        .expect("server");
    let client = officer(&server).await;
    let key = server.create_key_for_app("").await.expect("key");
    let idle = server
        .create_key_for_app("")
        .await
        .expect("key without a period");
    client
        .set_rotation_policy(&key.key_id, 90 * 86_400, 0)
        .await
        .expect("90 days");

    clock.advance(89 * 86_400);
    assert!(
        service.rotate_due().await.expect("check").is_empty(),
        "not due yet"
    );
    clock.advance(86_400);
    let rotated = service.rotate_due().await.expect("check");
    assert_eq!(rotated.len(), 1);
    assert_eq!(rotated[0].1, 2);
    assert!(
        service.rotate_due().await.expect("check").is_empty(),
        "the new version restarts the period"
    );
    assert_eq!(
        client
            .describe_key(&key.key_id)
            .await
            .expect("describe")
            .primary_version,
        2
    );
    assert_eq!(
        client
            .describe_key(&idle.key_id)
            .await
            .expect("describe")
            .primary_version,
        1
    );

    for (period, limit) in [(60, 0), (3599, 0), (0, 1 << 40), (u64::MAX, 0)] {
        let err = client
            .set_rotation_policy(&key.key_id, period, limit)
            .await
            .expect_err("refused");
        assert_eq!(
            err.code(),
            Some(tonic::Code::InvalidArgument),
            "{period} {limit}"
        );
    }
    server.stop().await.expect("stop");
}
on_both_stores!(period_rotation_on, period_rotation_on_a_moved_clock);

/// Two servers on one store and one token check a due key at the same moment: exactly one
/// rotation happens.
async fn two_servers_rotate_a_due_key_once(db: TestDb) {
    let clock = ManualClock::new(1_800_000_000);
    let (a, service_a) = TestServer::start_custom(&db, clock.clone(), RotationParams::default())
        .await
        .expect("a");
    let (b, service_b) = TestServer::start_custom(&db, clock.clone(), RotationParams::default())
        .await
        .expect("b");
    let client = officer(&a).await;
    let mut keys = Vec::new();
    for _ in 0..5 {
        let key = a.create_key_for_app("").await.expect("key");
        client
            .set_rotation_policy(&key.key_id, 3600, 0)
            .await
            .expect("policy");
        keys.push(key.key_id);
    }
    clock.advance(3600);
    let (ra, rb) = tokio::join!(
        {
            let s = Arc::clone(&service_a);
            async move { s.rotate_due().await }
        },
        {
            let s = Arc::clone(&service_b);
            async move { s.rotate_due().await }
        }
    );
    let (ra, rb) = (ra.expect("a checks"), rb.expect("b checks"));
    assert_eq!(
        ra.len() + rb.len(),
        5,
        "each due key rotated exactly once: {ra:?} {rb:?}"
    );
    for key in &keys {
        // Through b, as an officer (who sees every key): b does not see app-1's grants made
        // through a until it reloads its authorization cache.
        let described = officer(&b).await.describe_key(key).await.expect("describe");
        assert_eq!(described.primary_version, 2, "{key}");
    }
    a.stop().await.expect("stop a");
    b.stop().await.expect("stop b");
}
on_both_stores!(two_servers_on, two_servers_rotate_a_due_key_once);
