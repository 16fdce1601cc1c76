//! Round trips and every way a blob can be wrong.

use crate::support::*;

async fn round_trips(db: TestDb) {
    let server = TestServer::start(&db).await.expect("server");
    let client = server.client().await.expect("client");
    let a = server.create_key_for_app("ward-a").await.expect("key a");
    let b = server.create_key_for_app("").await.expect("key b");
    let context = ctx(&[("patient_ref", "p-7f3a"), ("record", "lab-result")]);

    // Data key: generate, then decrypt the wrapped copy back to the same bytes.
    let dk = client
        .generate_data_key("ward-a", &context)
        .await
        .expect("data key");
    assert_eq!(dk.key_id, a.key_id);
    assert_eq!(dk.key_version, 1);
    let opened = client
        .decrypt(&dk.blob, &context, None)
        .await
        .expect("decrypt data key");
    assert_eq!(opened.plaintext.as_slice(), dk.plaintext.as_slice());
    assert_eq!(opened.key_id, a.key_id);

    let without = client
        .generate_data_key_without_plaintext(&a.key_id, &context)
        .await
        .expect("without plaintext");
    assert_eq!(
        client
            .decrypt(&without.blob, &context, Some("ward-a"))
            .await
            .expect("decrypt")
            .plaintext
            .len(),
        32
    );

    // Direct encryption.
    let sealed = client
        .encrypt(&a.key_id, b"allergy: penicillin", &context)
        .await
        .expect("encrypt");
    assert_eq!(
        client
            .decrypt(&sealed.blob, &context, None)
            .await
            .expect("decrypt")
            .plaintext
            .as_slice(),
        b"allergy: penicillin"
    );
    let empty = client
        .encrypt(&a.key_id, b"", &ctx(&[]))
        .await
        .expect("empty payload");
    assert!(client
        .decrypt(&empty.blob, &ctx(&[]), None)
        .await
        .expect("decrypt empty")
        .plaintext
        .is_empty());

    // Re-encrypt from key A / context X to key B / context Y.
    let other = ctx(&[("purpose", "archive")]);
    let moved = client
        .re_encrypt(&sealed.blob, &context, &b.key_id, &other)
        .await
        .expect("re-encrypt");
    assert_eq!(moved.key_id, b.key_id);
    let back = client
        .decrypt(&moved.blob, &other, Some(&b.key_id))
        .await
        .expect("decrypt moved");
    assert_eq!(back.plaintext.as_slice(), b"allergy: penicillin");
    assert_invalid_ciphertext(
        client.decrypt(&moved.blob, &context, None).await,
        "moved blob under the old context",
    );
    assert_invalid_ciphertext(
        client
            .re_encrypt(&sealed.blob, &other, &b.key_id, &other)
            .await,
        "re-encrypt with wrong source context",
    );
    server.stop().await.expect("stop");
}
on_both_stores!(round_trips_on, round_trips);

#[tokio::test]
async fn wrong_missing_or_extra_context_fails() {
    let (_db, server) = sqlite_server().await;
    let client = server.client().await.expect("client");
    let key = server.create_key_for_app("").await.expect("key");
    let context = ctx(&[("patient_ref", "p-1"), ("record", "note")]);
    let sealed = client
        .encrypt(&key.key_id, b"note", &context)
        .await
        .expect("encrypt");
    for (what, wrong) in [
        (
            "wrong value",
            ctx(&[("patient_ref", "p-2"), ("record", "note")]),
        ),
        ("missing entry", ctx(&[("patient_ref", "p-1")])),
        (
            "extra entry",
            ctx(&[("patient_ref", "p-1"), ("record", "note"), ("x", "y")]),
        ),
        ("no context", ctx(&[])),
        (
            "renamed key",
            ctx(&[("patient_ref", "p-1"), ("recorD", "note")]),
        ),
    ] {
        assert_invalid_ciphertext(client.decrypt(&sealed.blob, &wrong, None).await, what);
    }
    assert!(client.decrypt(&sealed.blob, &context, None).await.is_ok());
}

#[tokio::test]
async fn every_byte_flip_and_truncation_is_the_generic_error() {
    let (_db, server) = sqlite_server().await;
    let client = server.client().await.expect("client");
    let key = server.create_key_for_app("").await.expect("key");
    let context = ctx(&[("k", "v")]);
    let blob = client
        .generate_data_key_without_plaintext(&key.key_id, &context)
        .await
        .expect("blob")
        .blob;
    for i in 0..blob.len() {
        for mask in [0x01u8, 0x80] {
            let mut bad = blob.clone();
            bad[i] ^= mask;
            assert_invalid_ciphertext(
                client.decrypt(&bad, &context, None).await,
                &format!("flip {mask:#x} at byte {i}"),
            );
        }
    }
    for cut in 0..blob.len() {
        assert_invalid_ciphertext(
            client.decrypt(&blob[..cut], &context, None).await,
            &format!("truncated to {cut}"),
        );
    }
    let mut extended = blob.clone();
    extended.push(0);
    assert_invalid_ciphertext(
        client.decrypt(&extended, &context, None).await,
        "one byte appended",
    );
    // The server is still healthy and the untouched blob still decrypts.
    assert!(client.decrypt(&blob, &context, None).await.is_ok());
}

#[tokio::test]
async fn a_blob_of_key_a_presented_for_key_b_fails() {
    let (_db, server) = sqlite_server().await;
    let client = server.client().await.expect("client");
    let a = server.create_key_for_app("").await.expect("a");
    let b = server.create_key_for_app("").await.expect("b");
    let sealed = client
        .encrypt(&a.key_id, b"x", &ctx(&[]))
        .await
        .expect("encrypt");
    assert_invalid_ciphertext(
        client
            .decrypt(&sealed.blob, &ctx(&[]), Some(&b.key_id))
            .await,
        "blob of A for B",
    );
    // Splicing B's id into A's blob is also refused (the id is authenticated).
    let mut spliced = sealed.blob.clone();
    spliced[3..19].copy_from_slice(uuid::Uuid::parse_str(&b.key_id).expect("uuid").as_bytes());
    assert_invalid_ciphertext(
        client.decrypt(&spliced, &ctx(&[]), None).await,
        "A's blob relabelled as B's",
    );
}
