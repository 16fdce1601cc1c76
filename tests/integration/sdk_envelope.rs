//! SDK envelope encryption against a real server: sizes around the frame boundary, ~10 MB,
//! tampering of every kind, data-key caching, and atomic file output.

use std::ops::ControlFlow;

use sdk::{CachePolicy, Envelope};

use crate::support::*;

const FRAME: u32 = 4096;

async fn envelope_for(server: &TestServer, policy: CachePolicy) -> (Envelope, String) {
    let client = server.client().await.expect("client");
    let key = server.create_key_for_app("").await.expect("key");
    (
        Envelope::new(client, policy)
            .with_frame_size(FRAME)
            .expect("frame size"),
        key.key_id,
    )
}

#[tokio::test]
async fn sizes_around_the_frame_and_ten_megabytes_round_trip() {
    let (_db, server) = sqlite_server().await;
    let (envelope, key) = envelope_for(&server, CachePolicy::default()).await;
    let context = ctx(&[("record", "encounter")]);
    let f = FRAME as usize;
    for len in [0, 1, f - 1, f, f + 1, 10 * 1024 * 1024 + 7] {
        let plaintext: Vec<u8> = (0..len).map(|i| (i * 31 % 256) as u8).collect();
        let message = envelope
            .encrypt(&key, &context, &plaintext)
            .await
            .expect("encrypt");
        let opened = envelope.decrypt(&context, &message).await.expect("decrypt");
        assert_eq!(opened.as_slice(), plaintext.as_slice(), "length {len}");
    }
}

#[tokio::test]
async fn truncation_reordering_and_header_edits_are_detected() {
    let (_db, server) = sqlite_server().await;
    // No caching, so every decryption goes to the server and header edits reach it.
    let (envelope, key) = envelope_for(&server, CachePolicy::disabled()).await;
    let context = ctx(&[("record", "note")]);
    let plaintext = vec![0x5au8; 3 * FRAME as usize + 100];
    let message = envelope
        .encrypt(&key, &context, &plaintext)
        .await
        .expect("encrypt");
    let mut cursor = &message[..];
    let header_len = sdk::envelope::Header::read_from(&mut cursor)
        .expect("header")
        .encoded()
        .len();
    let frame_len = 5 + FRAME as usize + 16;

    let dropped_last = &message[..header_len + 3 * frame_len];
    assert!(matches!(
        envelope.decrypt(&context, dropped_last).await,
        Err(sdk::Error::InvalidCiphertext)
    ));
    let mut swapped = message[..header_len].to_vec();
    swapped.extend_from_slice(&message[header_len + frame_len..header_len + 2 * frame_len]);
    swapped.extend_from_slice(&message[header_len..header_len + frame_len]);
    swapped.extend_from_slice(&message[header_len + 2 * frame_len..]);
    assert!(matches!(
        envelope.decrypt(&context, &swapped).await,
        Err(sdk::Error::InvalidCiphertext)
    ));
    // Every single header byte, including the key id and the wrapped data key.
    for i in 0..header_len {
        let mut edited = message.clone();
        edited[i] ^= 0x01;
        let result = envelope.decrypt(&context, &edited).await;
        assert!(
            matches!(result, Err(sdk::Error::InvalidCiphertext)),
            "header byte {i}: {:?}",
            result.err()
        );
    }
    let wrong_context = ctx(&[("record", "other")]);
    assert!(matches!(
        envelope.decrypt(&wrong_context, &message).await,
        Err(sdk::Error::InvalidCiphertext)
    ));
    assert_eq!(
        envelope
            .decrypt(&context, &message)
            .await
            .expect("intact")
            .as_slice(),
        plaintext.as_slice()
    );
}

#[tokio::test]
async fn data_key_cache_saves_kms_calls_within_its_limits() {
    let (_db, server) = sqlite_server().await;
    let policy = CachePolicy {
        max_messages: 50,
        ..CachePolicy::default()
    };
    let (envelope, key) = envelope_for(&server, policy).await;
    let context = ctx(&[("batch", "observations")]);
    let before = envelope.client().calls_made();
    let mut messages = Vec::new();
    for i in 0..100u32 {
        messages.push(
            envelope
                .encrypt(&key, &context, format!("record {i}").as_bytes())
                .await
                .expect("encrypt"),
        );
    }
    assert_eq!(
        envelope.client().calls_made() - before,
        2,
        "100 messages at 50 per data key: 2 GenerateDataKey calls"
    );
    let before = envelope.client().calls_made();
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(
            envelope
                .decrypt(&context, m)
                .await
                .expect("decrypt")
                .as_slice(),
            format!("record {i}").as_bytes()
        );
    }
    assert_eq!(
        envelope.client().calls_made() - before,
        2,
        "two distinct wrapped keys: 2 Decrypt calls"
    );

    let (uncached, key) = envelope_for(&server, CachePolicy::disabled()).await;
    let before = uncached.client().calls_made();
    for _ in 0..5 {
        uncached
            .encrypt(&key, &context, b"x")
            .await
            .expect("encrypt");
    }
    assert_eq!(uncached.client().calls_made() - before, 5);
}

#[tokio::test]
async fn files_are_written_atomically_and_tampered_files_leave_nothing() {
    let (_db, server) = sqlite_server().await;
    let (envelope, key) = envelope_for(&server, CachePolicy::default()).await;
    let dir = tempfile::tempdir().expect("dir");
    let src = dir.path().join("patients.csv");
    std::fs::write(&src, "Id,BIRTHDATE\n1,1970-01-01\n".repeat(5000)).expect("write");
    let enc = dir.path().join("patients.csv.kms");
    let out = dir.path().join("patients.out.csv");
    let context = ctx(&[("file", "patients")]);
    let summary = envelope
        .encrypt_file(&key, &context, &src, &enc, |_| ControlFlow::Continue(()))
        .await
        .expect("encrypt file");
    assert_eq!(
        summary.plaintext_bytes,
        std::fs::metadata(&src).expect("meta").len()
    );
    envelope
        .decrypt_file(&context, &enc, &out, |_| ControlFlow::Continue(()))
        .await
        .expect("decrypt file");
    assert_eq!(
        std::fs::read(&src).expect("src"),
        std::fs::read(&out).expect("out")
    );

    let mut bytes = std::fs::read(&enc).expect("enc");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&enc, &bytes).expect("tamper");
    let target = dir.path().join("never.csv");
    assert!(matches!(
        envelope
            .decrypt_file(&context, &enc, &target, |_| ControlFlow::Continue(()))
            .await,
        Err(sdk::Error::InvalidCiphertext)
    ));
    assert!(!target.exists(), "no output for a tampered file");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".kms-partial-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind");
}

/// Regression: an interrupted decryption (Ctrl-C in the CLI cancels through the progress
/// callback) must not leave the partial plaintext behind in a temporary file.
#[tokio::test]
async fn a_cancelled_decryption_leaves_no_plaintext() {
    let (_db, server) = sqlite_server().await;
    let (envelope, key) = envelope_for(&server, CachePolicy::default()).await;
    let dir = tempfile::tempdir().expect("dir");
    let src = dir.path().join("big.csv");
    std::fs::write(&src, "0,John Doe,SSN 123-45-0000\n".repeat(100_000)).expect("write");
    let enc = dir.path().join("big.csv.kms");
    let context = ctx(&[]);
    envelope
        .encrypt_file(&key, &context, &src, &enc, |_| ControlFlow::Continue(()))
        .await
        .expect("encrypt");
    let out = dir.path().join("out").join("big.csv");
    std::fs::create_dir_all(out.parent().expect("parent")).expect("mkdir");
    let result = envelope
        .decrypt_file(&context, &enc, &out, |done| {
            if done > 200_000 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .await;
    assert!(matches!(result, Err(sdk::Error::Cancelled)), "{result:?}");
    let left: Vec<_> = std::fs::read_dir(out.parent().expect("parent"))
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let result = envelope
        .encrypt_file(&key, &context, &src, &dir.path().join("again.kms"), |_| {
            ControlFlow::Break(())
        })
        .await;
    assert!(matches!(result, Err(sdk::Error::Cancelled)));
    assert!(!dir.path().join("again.kms").exists());
}
