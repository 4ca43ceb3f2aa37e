//! HTTP/1 connections as raw TCP: a connection gives its empty read and write buffers back
//! between requests (`vendor/actix-http`), so what follows a pause must still be read whole.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use testkit::app::spawn_app;

/// Reads one response: its status and its body (by `Content-Length`).
fn read_response(reader: &mut BufReader<TcpStream>) -> (u16, String) {
    let mut status_line = String::new();
    reader.read_line(&mut status_line).expect("a status line");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("a status in {status_line:?}"));
    let mut length = 0;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).expect("a header line");
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().expect("a length");
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).expect("the body");
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[actix_web::test]
async fn a_keep_alive_connection_reads_a_large_body_and_pipelined_requests_after_a_pause() {
    let app = spawn_app().await;
    let host = app.address.trim_start_matches("http://").to_string();
    let token = app.token(1, false);
    let answers = tokio::task::spawn_blocking(move || {
        let stream = TcpStream::connect(&host).expect("the daemon listens");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let health = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let mut answers = Vec::new();

        writer.write_all(health.as_bytes()).unwrap();
        answers.push(read_response(&mut reader));
        // The connection has answered and waits with its buffers given back; now a body of
        // five buffers' worth, in two writes.
        let body = format!(
            r#"{{"userId": 1, "couponId": 1, "note": "{}"}}"#,
            "x".repeat(40_000)
        );
        let head = format!(
            "POST /coupons/issue HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        writer.write_all(head.as_bytes()).unwrap();
        writer.write_all(body.as_bytes()).unwrap();
        answers.push(read_response(&mut reader));
        // Two requests in one write: the second waits in the read buffer while the first is
        // answered.
        writer
            .write_all(format!("{health}{health}").as_bytes())
            .unwrap();
        answers.push(read_response(&mut reader));
        answers.push(read_response(&mut reader));
        answers
    })
    .await
    .unwrap();

    let statuses: Vec<u16> = answers.iter().map(|(status, _)| *status).collect();
    assert_eq!(statuses, [200, 400, 200, 200], "{answers:?}");
    assert!(
        answers[1].1.contains("\"error\""),
        "the unknown field is refused with the JSON error body: {}",
        answers[1].1
    );
}
