//! `--metrics-listen ADDR`: the Prometheus text format over plain HTTP for a scraper on the
//! same host (`GET /metrics`). Loopback addresses only: the figures are about studies and
//! sites, and this endpoint has no TLS or client certificates, so it is refused on any
//! other address (the operator's error). Used by both daemons; `render` is called per
//! scrape. The `metrics.prom` textfile stays.
//!
//! What it does not do: anything but `GET /metrics` (404 for other paths, 405 for other
//! methods), keep-alive, or requests over 8 KiB (431).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// The largest request (line and headers) read.
const MAX_REQUEST: usize = 8 * 1024;
/// How long a scraper has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` (loopback only). The error is the operator's.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    if !addr.ip().is_loopback() {
        return Err(format!(
            "--metrics-listen {addr}: only loopback addresses are allowed (the metrics endpoint has no TLS; scrape it from the same host)"
        ));
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("--metrics-listen {addr}: {e}"))
}

/// Serves scrapes on `listener` until `shutdown` turns true; each answer is `render()`.
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    render: F,
    mut shutdown: watch::Receiver<bool>,
) where
    F: Fn() -> String + Send + Sync + Clone + 'static,
{
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let render = render.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, render).await {
                        tracing::debug!(error = %e, "metrics scrape failed");
                    }
                });
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// The status line and body for a request's first line.
pub fn respond(request_line: &str, render: impl Fn() -> String) -> (&'static str, String) {
    let mut parts = request_line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => ("200 OK", render()),
        (Some("GET"), Some(_)) => ("404 Not Found", "only /metrics is served\n".into()),
        (Some(_), Some(_)) => ("405 Method Not Allowed", "only GET\n".into()),
        _ => ("400 Bad Request", "malformed request\n".into()),
    }
}

async fn answer(
    mut stream: tokio::net::TcpStream,
    render: impl Fn() -> String + Send + 'static,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            if buf.len() >= MAX_REQUEST {
                return Ok(false);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(true)
    };
    let (status, body) = match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
        Err(_) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(false)) => ("431 Request Header Fields Too Large", String::new()),
        Ok(Ok(true)) => {
            let line = String::from_utf8_lossy(&buf)
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
            // Rendering may read a database: off the async workers.
            tokio::task::spawn_blocking(move || respond(&line, render))
                .await
                .unwrap_or(("500 Internal Server Error", String::new()))
        }
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        let r = || "fedpriv_rounds_completed_total 3\n".to_string();
        assert_eq!(respond("GET /metrics HTTP/1.1", r).0, "200 OK");
        assert_eq!(respond("GET /metrics HTTP/1.1", r).1, r());
        assert_eq!(respond("GET / HTTP/1.1", r).0, "404 Not Found");
        assert_eq!(
            respond("POST /metrics HTTP/1.1", r).0,
            "405 Method Not Allowed"
        );
        assert_eq!(respond("", r).0, "400 Bad Request");
    }

    #[tokio::test]
    async fn a_scraper_gets_the_text_and_other_hosts_are_refused() {
        assert!(bind("0.0.0.0:0".parse().unwrap()).await.is_err());
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let server = tokio::spawn(serve(listener, || "x_total 1\n".to_string(), stop_rx));
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        conn.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(reply.ends_with("\r\n\r\nx_total 1\n"), "{reply}");
        stop.send(true).unwrap();
        server.await.unwrap();
    }
}
