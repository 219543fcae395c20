//! Logs and traces as an operator receives them.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::post;

use crate::harness::{TestDb, ocsync, output, stderr};

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let t = TestDb::empty().await;
    let mut cmd = ocsync();
    cmd.arg("migrate")
        .env("DATABASE_URL", t.url())
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info");
    let out = output(cmd).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stderr(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let done = lines
        .iter()
        .find(|l| l["message"] == "database migrated")
        .expect("a 'database migrated' event");
    assert_eq!(done["level"], "INFO");
    assert!(done["schema_version"].is_number(), "{done}");
}

#[tokio::test]
async fn spans_reach_an_otlp_collector_when_one_is_configured() {
    #[derive(Default)]
    struct Seen {
        requests: Vec<(String, Bytes)>,
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let app = Router::new().route(
        "/v1/traces",
        post({
            let seen = seen.clone();
            move |headers: HeaderMap, body: Bytes| {
                let seen = seen.clone();
                async move {
                    let ct = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    seen.lock().unwrap().requests.push((ct, body));
                    ""
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let t = TestDb::empty().await;
    let mut cmd = ocsync();
    cmd.arg("migrate")
        .env("DATABASE_URL", t.url())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_SERVICE_NAME", "ocsync-under-test");
    let out = output(cmd).await;
    assert!(out.status.success(), "{}", stderr(&out));
    server.abort();

    // The exporter flushes before the process exits, so the spans are here.
    let seen = seen.lock().unwrap();
    assert!(!seen.requests.is_empty(), "no OTLP export arrived");
    let (ct, body) = &seen.requests[0];
    assert_eq!(ct, "application/x-protobuf");
    let all: Vec<u8> = seen.requests.iter().flat_map(|(_, b)| b.to_vec()).collect();
    let has = |needle: &[u8]| all.windows(needle.len()).any(|w| w == needle);
    assert!(
        has(b"db.migrate"),
        "span name missing ({} bytes)",
        body.len()
    );
    assert!(has(b"ocsync-under-test"), "service.name missing");
}
