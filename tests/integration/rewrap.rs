//! Rewrap: batch calls with per-item results, and `kms-cli rewrap` of SDK-encrypted Synthea
//! files after a rotation, interrupted half-way and resumed.

use std::path::{Path, PathBuf};

use clap::Parser;

use crate::support::*;

async fn batches_report_each_item(db: TestDb) {
    let server = TestServer::start(&db).await.expect("server");
    let officer = officer(&server).await;
    let client = server.client().await.expect("client");
    let key = server.create_key_for_app("").await.expect("key");
    let other = server.create_key_for_app("").await.expect("other");
    let context = ctx(&[("record", "x")]);
    let good = client
        .encrypt(&key.key_id, b"good", &context)
        .await
        .expect("encrypt")
        .blob;
    let old = client
        .encrypt(&other.key_id, b"old", &context)
        .await
        .expect("encrypt")
        .blob;
    officer.rotate_key(&other.key_id).await.expect("rotate");
    officer
        .set_min_decryption_version(&other.key_id, 2)
        .await
        .expect("retire v1");
    let mut tampered = good.clone();
    tampered[40] ^= 1;
    let items = vec![
        (good.clone(), context.clone()),
        (tampered.clone(), context.clone()),
        (good.clone(), ctx(&[("record", "y")])),
        (old.clone(), context.clone()),
        (vec![1, 2, 3], context.clone()),
    ];
    let results = client
        .batch_decrypt(&items)
        .await
        .expect("the batch itself succeeds");
    assert_eq!(
        results[0].as_ref().expect("good item").plaintext.as_slice(),
        b"good"
    );
    let code = |r: &Result<sdk::Opened, sdk::Error>| r.as_ref().err().and_then(|e| e.code());
    assert_eq!(code(&results[1]), Some(tonic::Code::InvalidArgument));
    assert_eq!(code(&results[2]), Some(tonic::Code::InvalidArgument));
    assert_eq!(
        code(&results[3]),
        Some(tonic::Code::FailedPrecondition),
        "retired version is its own error"
    );
    assert_eq!(code(&results[4]), Some(tonic::Code::InvalidArgument));

    let move_item = |blob: &Vec<u8>| sdk::ReEncryptItem {
        blob: blob.clone(),
        source_context: context.clone(),
        destination_key: other.key_id.clone(),
        destination_context: context.clone(),
    };
    let moved = client
        .batch_re_encrypt(&[move_item(&good), move_item(&tampered)])
        .await
        .expect("batch");
    let sealed = moved[0].as_ref().expect("good item moved");
    assert_eq!(sealed.key_version, 2);
    assert_eq!(
        client
            .decrypt(&sealed.blob, &context, None)
            .await
            .expect("decrypt")
            .plaintext
            .as_slice(),
        b"good"
    );
    assert!(moved[1].is_err());

    for n in [0usize, 101] {
        let err = client
            .batch_decrypt(&vec![(good.clone(), context.clone()); n])
            .await
            .expect_err("batch size");
        assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{n} items");
    }
    server.stop().await.expect("stop");
}
on_both_stores!(batches_on, batches_report_each_item);

fn kms_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(kms_files(&path));
        } else if path.to_string_lossy().ends_with(".kms") {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn header_len_and_version(path: &Path) -> (usize, Option<u32>) {
    let header = sdk::envelope::Header::read_from(&mut std::io::BufReader::new(
        std::fs::File::open(path).expect("open"),
    ))
    .expect("header");
    (header.encoded().len(), header.wrapped_key_version())
}

#[tokio::test]
async fn rewrap_of_synthea_files_resumes_and_leaves_bodies_untouched() {
    let (_db, server) = sqlite_server().await;
    let client = server.client().await.expect("client");
    let endpoint = server.endpoint();
    let identity = server.identity("app-1");
    let run = |args: Vec<String>| {
        let endpoint = endpoint.clone();
        let identity = identity.clone();
        async move {
            let mut argv = vec![
                "kms-cli".to_string(),
                "--endpoint".into(),
                endpoint,
                "--identity".into(),
                identity,
                "--output".into(),
                "json".into(),
            ];
            argv.extend(args);
            let mut out = Vec::new();
            let result =
                kms_cli::run(kms_cli::Cli::try_parse_from(argv).expect("args"), &mut out).await;
            (
                result,
                serde_json::from_slice::<serde_json::Value>(&out).unwrap_or_default(),
            )
        }
    };
    server.create_key_for_app("rewrap-me").await.expect("key");
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/synthea");
    let work = tempfile::tempdir().expect("dir");
    let enc = work.path().join("enc");
    let s = |p: &Path| p.to_string_lossy().to_string();
    let (result, _) = run(vec![
        "encrypt".into(),
        "--key".into(),
        "rewrap-me".into(),
        "--context".into(),
        "study=s1".into(),
        "--in".into(),
        s(&sample),
        "--out".into(),
        s(&enc),
    ])
    .await;
    result.expect("encrypt");
    let files = kms_files(&enc);
    let bodies: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(f).expect("read")[header_len_and_version(f).0..].to_vec())
        .collect();

    let officer = officer(&server).await;
    officer.rotate_key("rewrap-me").await.expect("rotate");
    // "Interrupted half-way": only the first half gets rewrapped.
    let half = files.len() / 2;
    let envelope = sdk::Envelope::new(client.clone(), sdk::CachePolicy::disabled());
    for outcome in envelope.rewrap_files(&files[..half]).await {
        assert_eq!(outcome.expect("rewrapped").to_version, 2);
    }
    let (result, summary) = run(vec!["rewrap".into(), s(&enc)]).await;
    result.expect("resume");
    assert_eq!(
        summary["rewrapped"].as_u64(),
        Some((files.len() - half) as u64),
        "{summary}"
    );
    assert_eq!(
        summary["already_on_primary"].as_u64(),
        Some(half as u64),
        "{summary}"
    );
    assert_eq!(
        summary["versions_after"]["v2"].as_u64(),
        Some(files.len() as u64),
        "{summary}"
    );
    assert_eq!(
        summary["versions_before"]["v1"].as_u64(),
        Some((files.len() - half) as u64),
        "{summary}"
    );
    let (result, again) = run(vec!["rewrap".into(), s(&enc)]).await;
    result.expect("nothing left");
    assert_eq!(again["rewrapped"].as_u64(), Some(0));

    for (file, body) in files.iter().zip(&bodies) {
        let (len, version) = header_len_and_version(file);
        assert_eq!(version, Some(2));
        assert_eq!(
            &std::fs::read(file).expect("read")[len..],
            body.as_slice(),
            "body of {} changed",
            file.display()
        );
    }
    // Version 1 can now be retired without losing anything.
    officer
        .set_min_decryption_version("rewrap-me", 2)
        .await
        .expect("retire v1");
    let dec = work.path().join("dec");
    let (result, _) = run(vec![
        "decrypt".into(),
        "--context".into(),
        "study=s1".into(),
        "--in".into(),
        s(&enc),
        "--out".into(),
        s(&dec),
    ])
    .await;
    result.expect("decrypt after rewrap");
    let originals = kms_files(&enc).len();
    assert_eq!(originals, files.len());
    for file in std::fs::read_dir(sample.join("csv")).expect("csv") {
        let path = file.expect("entry").path();
        let restored = dec.join("csv").join(path.file_name().expect("name"));
        assert_eq!(
            std::fs::read(&path).expect("orig"),
            std::fs::read(&restored).expect("restored")
        );
    }
    assert!(!std::fs::read_dir(enc.join("csv")).expect("dir").any(|e| e
        .expect("e")
        .file_name()
        .to_string_lossy()
        .starts_with(".kms-partial-")));
}

/// Regression: one file whose key id is damaged failed the whole rewrap (and every re-run);
/// it is now one failed file among rewrapped ones.
#[tokio::test]
async fn a_damaged_file_fails_alone_in_a_rewrap() {
    let (_db, server) = sqlite_server().await;
    let client = server.client().await.expect("client");
    server.create_key_for_app("rw").await.expect("key");
    let envelope = sdk::Envelope::new(client.clone(), sdk::CachePolicy::default());
    let dir = tempfile::tempdir().expect("dir");
    for name in ["a", "b", "c"] {
        let message = envelope
            .encrypt("rw", &ctx(&[]), name.as_bytes())
            .await
            .expect("encrypt");
        std::fs::write(dir.path().join(format!("{name}.kms")), message).expect("write");
    }
    let damaged = dir.path().join("b.kms");
    let mut bytes = std::fs::read(&damaged).expect("read");
    bytes[10] ^= 1; // inside the key id text
    std::fs::write(&damaged, bytes).expect("write");
    officer(&server)
        .await
        .rotate_key("rw")
        .await
        .expect("rotate");
    let argv = [
        "kms-cli",
        "--endpoint",
        &server.endpoint(),
        "--identity",
        &server.identity("app-1"),
        "--output",
        "json",
        "rewrap",
        &dir.path().to_string_lossy(),
    ];
    let mut out = Vec::new();
    let result = kms_cli::run(kms_cli::Cli::try_parse_from(argv).expect("args"), &mut out).await;
    assert!(result.is_err(), "a failed file must make the command fail");
    let summary: serde_json::Value = serde_json::from_slice(&out).expect("summary printed");
    assert_eq!(summary["rewrapped"], 2, "{summary}");
    assert_eq!(summary["failed"], 1, "{summary}");
    assert_eq!(summary["already_on_primary"], 0, "{summary}");
    assert!(
        summary["failures"][0]
            .as_str()
            .expect("text")
            .contains("invalid ciphertext"),
        "{summary}"
    );
}
