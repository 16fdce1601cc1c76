//! Keys and ciphertexts survive a server restart, on both stores.

use crate::support::*;

async fn survives_restart(db: TestDb) {
    let context = ctx(&[("dataset", "synthea-demo")]);
    let server = TestServer::start(&db).await.expect("server");
    let client = server.client().await.expect("client");
    let key = server.create_key_for_app("restart-me").await.expect("key");
    let sealed = client
        .encrypt("restart-me", b"persisted", &context)
        .await
        .expect("encrypt");
    let dk = client
        .generate_data_key(&key.key_id, &context)
        .await
        .expect("data key");
    drop(client);
    server.stop().await.expect("stop");

    let server = TestServer::start(&db).await.expect("second start");
    let client = server.client().await.expect("client");
    let described = client
        .describe_key("restart-me")
        .await
        .expect("alias survives");
    assert_eq!(described.key_id, key.key_id);
    assert_eq!(
        client
            .decrypt(&sealed.blob, &context, None)
            .await
            .expect("decrypt")
            .plaintext
            .as_slice(),
        b"persisted"
    );
    assert_eq!(
        client
            .decrypt(&dk.blob, &context, None)
            .await
            .expect("data key")
            .plaintext
            .as_slice(),
        dk.plaintext.as_slice()
    );
    server.stop().await.expect("stop");
}
on_both_stores!(survives_restart_on, survives_restart);
