//! The master's TCP listener, in bounds: a flood of connections must not take the file
//! descriptors the master needs for its database, consoles and archives.
//!
//! Every gRPC peer speaks HTTP/2, whose first bytes are a fixed 24-byte preface. A connection is
//! handed to the gRPC server only once its preface has arrived:
//! - at most `max_connections` connections are open at once (pending and established);
//! - a connection that has not sent its preface within `handshake_timeout` is closed;
//! - at the cap, the oldest connection still waiting for its preface is closed to make room
//!   (a real client sends its preface within a round trip, so a flood of silent connections
//!   cannot keep one out); with none waiting, the new connection is closed at once.
//!
//! Established connections that go silent are closed by HTTP/2 keep-alive (the server's pings
//! go unanswered). Authentication is per call (the secret interceptor), after all of this.
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Descriptors kept for everything but connections when the cap is derived from the file limit.
const AUTO_SHARE: u64 = 2;

/// Bounds of the listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Time a new connection has to send the HTTP/2 preface.
    pub handshake_timeout: Duration,
}

/// The connection cap for a `max_connections` setting: the setting itself, or with 0, half the
/// process's file limit (the other half is for the database, consoles, uploads and archives).
pub fn connection_cap(setting: usize) -> usize {
    if setting > 0 {
        return setting;
    }
    let soft = raise_file_limit();
    usize::try_from(soft / AUTO_SHARE)
        .unwrap_or(usize::MAX)
        .max(16)
}

/// Raises the soft file limit to the hard one (a server's usual start-up step: the default soft
/// limit of 1024 is far below what a master with many slaves holds) and returns it.
fn raise_file_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// Counts of what the listener turned away, for logs.
#[derive(Debug, Default)]
struct Refusals {
    /// Closed at the cap with no connection waiting for its preface.
    at_cap: AtomicU64,
    /// Closed to make room for a newer one while waiting for its preface.
    evicted: AtomicU64,
    /// Closed for not sending the preface in time (or sending something else).
    no_preface: AtomicU64,
}

/// Accepts on `listener` within `limits`; yields connections that have sent their preface.
/// The accept loop ends when the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    limits: Limits,
) -> ReceiverStream<Result<Admitted, io::Error>> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(accept_loop(listener, limits, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    limits: Limits,
    tx: mpsc::Sender<Result<Admitted, io::Error>>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Refusals::default());
    // Connections waiting for their preface, oldest first (finished ones are cancelled and
    // skipped; entries live at most one handshake timeout).
    let mut waiting: VecDeque<CancellationToken> = VecDeque::new();
    let mut last_report = Instant::now();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = tx.closed() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors (or another transient error): wait instead of spinning;
                // connections closing free them.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while waiting.front().is_some_and(CancellationToken::is_cancelled) {
            waiting.pop_front();
        }
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => loop {
                match waiting.pop_front() {
                    Some(done) if done.is_cancelled() => continue,
                    Some(oldest) => {
                        oldest.cancel();
                        refusals.evicted.fetch_add(1, Ordering::Relaxed);
                        // The evicted task drops its slot as soon as it runs.
                        let wait = slots.clone().acquire_owned();
                        break tokio::time::timeout(Duration::from_secs(1), wait)
                            .await
                            .ok()
                            .and_then(Result::ok);
                    }
                    None => break None,
                }
            },
        };
        let Some(slot) = slot else {
            refusals.at_cap.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            report(&refusals, &mut last_report, limits.max_connections);
            continue;
        };
        let token = CancellationToken::new();
        waiting.push_back(token.clone());
        tokio::spawn(handshake(
            stream,
            slot,
            token,
            limits.handshake_timeout,
            tx.clone(),
            refusals.clone(),
        ));
        report(&refusals, &mut last_report, limits.max_connections);
    }
}

/// Waits (bounded) for the preface, then hands the connection to the server.
async fn handshake(
    mut stream: TcpStream,
    slot: OwnedSemaphorePermit,
    token: CancellationToken,
    timeout: Duration,
    tx: mpsc::Sender<Result<Admitted, io::Error>>,
    refusals: Arc<Refusals>,
) {
    let mut preface = [0u8; 24];
    let got = tokio::select! {
        r = tokio::time::timeout(timeout, stream.read_exact(&mut preface)) => {
            matches!(r, Ok(Ok(_))) && &preface == PREFACE
        }
        () = token.cancelled() => return,
    };
    // No longer waiting: an eviction skips it from now on.
    token.cancel();
    if !got {
        refusals.no_preface.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // Small messages (a dispatch, a result) must not wait for Nagle + delayed ACK (40 ms).
    let _ = stream.set_nodelay(true);
    let _ = tx
        .send(Ok(Admitted {
            stream,
            replay: 0,
            _slot: slot,
        }))
        .await;
}

/// Logs what was turned away, at most every 10 s.
fn report(refusals: &Refusals, last: &mut Instant, cap: usize) {
    if last.elapsed() < Duration::from_secs(10) {
        return;
    }
    let at_cap = refusals.at_cap.swap(0, Ordering::Relaxed);
    let evicted = refusals.evicted.swap(0, Ordering::Relaxed);
    let no_preface = refusals.no_preface.swap(0, Ordering::Relaxed);
    if at_cap + evicted + no_preface > 0 {
        tracing::warn!(
            cap,
            at_cap,
            evicted,
            no_preface,
            "connections closed before the gRPC handshake (a flood, or clients that are not gRPC)"
        );
    }
    *last = Instant::now();
}

/// A connection let through: the stream, the preface bytes still to give to the server, and its
/// place under the cap (freed when the server drops the connection).
#[derive(Debug)]
pub struct Admitted {
    stream: TcpStream,
    /// Bytes of [`PREFACE`] already given back to the reader.
    replay: usize,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // The preface was read to check it: the server reads it first, as if it never had been.
        if self.replay < PREFACE.len() {
            let rest = &PREFACE[self.replay..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.replay += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Admitted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio_stream::StreamExt;

    async fn listen(
        limits: Limits,
    ) -> (std::net::SocketAddr, ReceiverStream<io::Result<Admitted>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (addr, incoming(l, limits))
    }

    /// True when the peer closed `s` (read returns 0 or an error) within `within`.
    async fn closed(s: &mut TcpStream, within: Duration) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(within, s.read(&mut b)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn a_connection_is_admitted_after_its_preface_which_the_server_still_reads() {
        let (addr, mut inc) = listen(Limits {
            max_connections: 4,
            handshake_timeout: Duration::from_secs(5),
        })
        .await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(PREFACE).await.unwrap();
        c.write_all(b"more").await.unwrap();
        let mut a = inc.next().await.unwrap().unwrap();
        let mut got = vec![0u8; PREFACE.len() + 4];
        a.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..24], PREFACE);
        assert_eq!(&got[24..], b"more");
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_after_the_handshake_timeout() {
        let (addr, _inc) = listen(Limits {
            max_connections: 4,
            handshake_timeout: Duration::from_millis(200),
        })
        .await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut c, Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn something_else_than_http2_is_closed() {
        let (addr, _inc) = listen(Limits {
            max_connections: 4,
            handshake_timeout: Duration::from_secs(5),
        })
        .await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(closed(&mut c, Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn at_the_cap_the_oldest_silent_connection_makes_room_for_a_new_client() {
        let (addr, mut inc) = listen(Limits {
            max_connections: 3,
            handshake_timeout: Duration::from_secs(60),
        })
        .await;
        let mut silent = Vec::new();
        for _ in 0..3 {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        // Let the listener take all three in before the client comes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(PREFACE).await.unwrap();
        let admitted = tokio::time::timeout(Duration::from_secs(5), inc.next())
            .await
            .expect("the client is admitted at the cap");
        assert!(admitted.unwrap().is_ok());
        assert!(
            closed(&mut silent[0], Duration::from_secs(5)).await,
            "oldest evicted"
        );
        assert!(!closed(&mut silent[1], Duration::from_millis(200)).await);
    }

    #[tokio::test]
    async fn at_the_cap_with_every_connection_established_a_new_one_is_closed() {
        let (addr, mut inc) = listen(Limits {
            max_connections: 2,
            handshake_timeout: Duration::from_secs(60),
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(PREFACE).await.unwrap();
            held.push((c, inc.next().await.unwrap().unwrap()));
        }
        let mut extra = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut extra, Duration::from_secs(5)).await);
        // A slot frees when an established connection ends.
        drop(held.pop());
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(PREFACE).await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), inc.next()).await;
        assert!(matches!(next, Ok(Some(Ok(_)))));
    }
}
