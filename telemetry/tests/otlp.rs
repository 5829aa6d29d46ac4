//! With an OTLP endpoint, a span the binary records reaches the collector, named and attributed to the service.
//! The collector is a one-connection HTTP server that keeps what it is sent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::Duration;

use camelid_telemetry::{TelemetryArgs, init};

/// Accepts requests until one to `/v1/traces` arrives; sends its body.
fn collector() -> (String, mpsc::Receiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut length = 0;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                if header.trim().is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    length = value.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
                )
                .unwrap();
            if request_line.contains("/v1/traces") {
                tx.send(body).unwrap();
                return;
            }
        }
    });
    (format!("http://{addr}"), rx)
}

#[test]
fn spans_reach_the_collector_with_the_service_name() {
    let (endpoint, received) = collector();
    let args = TelemetryArgs {
        otlp_endpoint: Some(endpoint),
    };
    let guard = init("camelid-telemetry-test", &args);
    tracing::info_span!("reconcile", object = "ns/job-1").in_scope(|| tracing::info!("inside"));
    drop(guard); // flushes
    let body = received
        .recv_timeout(Duration::from_secs(20))
        .expect("no spans exported");
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("camelid-telemetry-test"), "service name missing");
    assert!(text.contains("reconcile"), "span name missing");
    assert!(text.contains("ns/job-1"), "span field missing");
}
