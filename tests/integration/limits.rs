//! Oversize requests are refused and the server keeps serving; only loopback addresses are
//! served; health and reflection are served (over mutual TLS).

use crate::support::*;

#[tokio::test]
async fn oversize_requests_are_rejected_and_the_server_keeps_serving() {
    let (_db, server) = sqlite_server().await;
    let client = server.client().await.expect("client");
    let key = server.create_key_for_app("").await.expect("key");

    let ok = client.encrypt(&key.key_id, &[1u8; 4096], &ctx(&[])).await;
    assert!(ok.is_ok(), "4 KiB is allowed");
    let err = client
        .encrypt(&key.key_id, &[1u8; 4097], &ctx(&[]))
        .await
        .expect_err("4 KiB + 1");
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));

    // Past the transport limit (64 KiB) the request is refused before it is decoded.
    let err = client
        .decrypt(&vec![0u8; 1 << 20], &ctx(&[]), None)
        .await
        .expect_err("1 MiB blob");
    assert!(
        matches!(
            err.code(),
            Some(
                tonic::Code::OutOfRange
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::InvalidArgument
            )
        ),
        "{err:?}"
    );
    let huge_context = ctx(&[("k", &"v".repeat(2000))]);
    let err = client
        .generate_data_key(&key.key_id, &huge_context)
        .await
        .expect_err("value over 1 KiB");
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));

    client.ping().await.expect("still serving");
    let sealed = client
        .encrypt(&key.key_id, b"after", &ctx(&[]))
        .await
        .expect("still encrypting");
    assert_eq!(
        client
            .decrypt(&sealed.blob, &ctx(&[]), None)
            .await
            .expect("decrypt")
            .plaintext
            .as_slice(),
        b"after"
    );
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let (_db, server) = sqlite_server().await;
    let channel = crate::tls::channel(&server, "app-1").await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "kms.v1.KeyManagement".into(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn reflection_lists_the_api() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let (_db, server) = sqlite_server().await;
    let channel = crate::tls::channel(&server, "app-1").await;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("stream")
        .expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("not a service list")
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"kms.v1.KeyManagement".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
}

/// The server speaks only mutual TLS: an http:// endpoint must be refused by the SDK rather
/// than tried in cleartext.
#[tokio::test]
async fn http_endpoints_are_refused() {
    let (_db, server) = sqlite_server().await;
    let http = format!("http://{}", server.addr);
    let tls = server.pki().client_tls("app-1").expect("tls");
    match sdk::KmsClient::connect(&http, &tls).await {
        Err(sdk::Error::Connect { reason, .. }) => assert!(reason.contains("https://"), "{reason}"),
        Err(other) => panic!("wrong error {other:?}"),
        Ok(_) => panic!("http endpoint accepted"),
    }
}
