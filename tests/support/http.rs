//! HTTP for the suites that talk to a real gateway: one reqwest client setup, one `call`, and
//! the raw-socket requests reqwest will not send (a declared body held back for
//! `100 Continue`, malformed chunks, hostile Host headers). Every call goes to 127.0.0.1.
#![allow(dead_code)]

use super::resp::{DIGEST, Resp};
use reqwest::Method;
use std::net::SocketAddr;
use std::time::Duration;

/// An HTTP client that does not follow redirects and gives up on a call after `timeout`.
pub fn client(timeout: Duration) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .build()
        .unwrap()
}

/// One request; panics when the exchange itself fails.
pub async fn call(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<reqwest::Body>,
) -> Resp {
    let mut rb = http.request(method, url);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    if let Some(b) = body {
        rb = rb.body(b);
    }
    let r = rb.send().await.unwrap_or_else(|e| panic!("{url}: {e:?}"));
    Resp {
        status: r.status(),
        headers: r.headers().clone(),
        body: r.bytes().await.unwrap().to_vec(),
    }
}

/// [`call`] that reports a failed exchange instead of panicking.
pub async fn try_call(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: reqwest::Body,
) -> Result<Resp, String> {
    let mut rb = http.request(method, url).body(body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.map_err(|e| format!("{e:?}"))?;
    let status = r.status();
    let headers = r.headers().clone();
    let body = r.bytes().await.map_err(|e| format!("{e:?}"))?.to_vec();
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// The value of a Content-Length line in `head`, if any.
fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    })
}

/// Sends `request` as is on a new connection to `addr`; the answer's status line and body
/// (whatever arrived, as the status, when no whole answer came within `step`).
pub async fn raw(addr: SocketAddr, request: &[u8], step: Duration) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + step;
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n")
            && content_length(head).is_some_and(|n| body.len() >= n)
        {
            let status = head.lines().next().unwrap_or_default().to_string();
            return (status, body.to_string());
        }
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return (text, String::new()),
        }
    }
}

/// A raw HTTP/1.1 POST to `addr` that declares a body of `length` bytes and waits for
/// `100 Continue` before sending it (as curl does for large uploads): returns the status line
/// and body of the final answer, or `None` if the server asked for the body.
pub async fn expect_continue(
    addr: SocketAddr,
    path: &str,
    length: usize,
    digest: &str,
    step: Duration,
) -> Option<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {length}\r\n{DIGEST}: {digest}\r\nExpect: 100-continue\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + step;
    loop {
        let n = match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => 0,
        };
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if text.starts_with("HTTP/1.1 100") {
            return None;
        }
        if let Some((head, body)) = text.split_once("\r\n\r\n")
            && body.len() >= content_length(head).unwrap_or(0)
        {
            let status = head.lines().next().unwrap_or_default().to_string();
            return Some((status, body.to_string()));
        }
    }
    Some((String::from_utf8_lossy(&got).to_string(), String::new()))
}

/// application/x-www-form-urlencoded encoding of one value.
pub fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b' ' => "+".to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
