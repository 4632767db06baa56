//! The HTTP listener, bounded against connection floods (slowloris).
//!
//! `axum::serve` gives every connection a task and a descriptor for as long as the client keeps
//! it open, with no deadline on the request head: a few thousand connections that never finish
//! their headers exhaust the process's descriptors and the gateway stops answering anyone. Here
//! every connection has a deadline whenever it is not serving a request:
//!
//! * a new connection must deliver a complete request head within `header_read_timeout`
//!   (whatever it sends: nothing, half an HTTP/1.1 head, part of the HTTP/2 preface);
//! * once it has been served, it may stay idle for `idle_timeout`; the first byte of its next
//!   request starts the `header_read_timeout` again;
//! * while a request is being served (its body read, its response written) it has no deadline
//!   here: a large artifact download to a slow client is legitimate.
//!
//! At most `max_connections` connections are open. Accepting one more first closes the
//! connection that has waited longest without a request in progress (a flood's connections
//! never get one, a real client's head follows its connect at once), so real clients keep
//! being served even while a flood holds the cap; only when every connection is busy does the
//! listener stop accepting, and new clients wait in the kernel's accept queue, which costs this
//! process no descriptor.
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;

/// The listener's bounds (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: u32,
}

/// What a connection is doing: decides its deadline and whether it may be evicted.
#[derive(Debug)]
struct Activity {
    /// Requests being served (HTTP/2 may have several at once).
    in_flight: usize,
    /// When the connection was accepted.
    accepted: Instant,
    /// Whether any request has reached the router yet.
    served: bool,
    /// When the last request finished (or the connection was accepted).
    idle_since: Instant,
    /// When the first byte arrived after `idle_since`: a request head is on its way.
    reading_since: Option<Instant>,
}

#[derive(Debug)]
struct Conn {
    activity: Mutex<Activity>,
    evict: Notify,
    evicted: AtomicBool,
}

impl Conn {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            activity: Mutex::new(Activity {
                in_flight: 0,
                accepted: now,
                served: false,
                idle_since: now,
                reading_since: None,
            }),
            evict: Notify::new(),
            evicted: AtomicBool::new(false),
        }
    }

    fn activity(&self) -> std::sync::MutexGuard<'_, Activity> {
        // The data stays consistent even if a holder panicked: plain counters and instants.
        self.activity.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the connection is to be closed, `None` while it serves a request.
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        let a = self.activity();
        if a.in_flight > 0 {
            None
        } else if !a.served {
            Some(a.accepted + limits.header_read_timeout)
        } else if let Some(t) = a.reading_since {
            Some(t + limits.header_read_timeout)
        } else {
            Some(a.idle_since + limits.idle_timeout)
        }
    }

    /// Since when the connection has been waiting without a request in progress (`None`: busy).
    fn waiting_since(&self) -> Option<Instant> {
        let a = self.activity();
        (a.in_flight == 0).then(|| a.reading_since.unwrap_or(a.idle_since))
    }

    fn on_read(&self) {
        let mut a = self.activity();
        if a.in_flight == 0 && a.reading_since.is_none() {
            a.reading_since = Some(Instant::now());
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        let mut a = self.activity();
        a.in_flight += 1;
        a.served = true;
        a.reading_since = None;
        InFlight(self.clone())
    }
}

/// One request being served; dropped when its response body is finished (or abandoned).
struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut a = self.0.activity();
        a.in_flight -= 1;
        if a.in_flight == 0 {
            a.idle_since = Instant::now();
            a.reading_since = None;
        }
    }
}

/// The open connections, for eviction at the cap.
#[derive(Default)]
struct Registry {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// Woken whenever a connection has closed (its descriptor is free again).
    closed: Notify,
}

impl Registry {
    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(self: &Arc<Self>) -> (Registered, Arc<Conn>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn::new());
        self.conns().insert(id, conn.clone());
        (Registered(self.clone(), id), conn)
    }

    /// Closes the connection that has waited longest without a request in progress; false
    /// when every connection is busy.
    fn evict_one(&self) -> bool {
        let conns = self.conns();
        let victim = conns
            .values()
            .filter(|c| !c.evicted.load(Ordering::Relaxed))
            .filter_map(|c| Some((c.waiting_since()?, c)))
            .min_by_key(|(since, _)| *since);
        match victim {
            Some((_, c)) => {
                c.evicted.store(true, Ordering::Relaxed);
                c.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Removes a connection from the registry when its task ends.
struct Registered(Arc<Registry>, u64);

impl Drop for Registered {
    fn drop(&mut self) {
        self.0.conns().remove(&self.1);
        self.0.closed.notify_waiters();
    }
}

/// A socket that tells its connection when bytes arrive.
struct Watched {
    io: TcpStream,
    conn: Arc<Conn>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.on_read();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` completes, then lets the open
/// connections finish (idle and slow ones still close at their deadlines).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections as usize));
    let registry = Arc::new(Registry::default());
    let (stop_tx, stop_rx) = watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_error(e, &registry).await;
                    continue;
                }
            },
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => loop {
                let evicted = registry.evict_one();
                // An evicted connection returns its permit at once (the second is a fallback);
                // with none evictable, busy ones become so when their request ends: look again
                // soon.
                let retry = if evicted {
                    Duration::from_secs(1)
                } else {
                    Duration::from_millis(50)
                };
                tokio::select! {
                    () = &mut shutdown => return finish(listener, permits, limits, stop_tx).await,
                    p = permits.clone().acquire_owned() => break p.expect("the semaphore is never closed"),
                    () = tokio::time::sleep(retry) => {}
                }
            },
        };
        let (registered, conn) = registry.add();
        let router = router.clone();
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            serve_connection(stream, conn, router, limits, stop).await;
            drop(registered);
            drop(permit);
        });
    }
    finish(listener, permits, limits, stop_tx).await
}

async fn finish(
    listener: TcpListener,
    permits: Arc<Semaphore>,
    limits: Limits,
    stop: watch::Sender<()>,
) -> io::Result<()> {
    drop(listener);
    stop.send_replace(());
    // Every connection holds a permit until its task ends: all of them back means all done.
    let _all = permits
        .acquire_many(limits.max_connections)
        .await
        .expect("the semaphore is never closed");
    Ok(())
}

/// EMFILE and ENFILE (the same numbers on Linux, the BSDs and macOS).
fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23 | 24))
}

async fn accept_error(e: io::Error, registry: &Registry) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    // A client that gave up between SYN and accept: nothing to do.
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    // Out of descriptors below max_connections (the open-file limit is lower than the cap, or
    // other files use them): a waiting connection gives its descriptor to the new one, as at
    // the cap. Otherwise retrying at once would only spin.
    if out_of_descriptors(&e) {
        let mut closed = std::pin::pin!(registry.closed.notified());
        closed.as_mut().enable();
        if registry.evict_one() {
            tracing::warn!(error = %e, "out of file descriptors: closed a waiting HTTP connection; lower max_connections below the open-file limit");
            // Accept again once its descriptor is free, not before (that would evict another).
            let _ = tokio::time::timeout(Duration::from_millis(100), closed).await;
            return;
        }
    }
    tracing::error!(error = %e, "accepting an HTTP connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Raises the soft open-file limit to the hard one (the usual start-up step of a server: a
/// soft limit of 1024 is common and far below what a busy gateway can hold) and returns it.
pub(crate) fn raise_file_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}

async fn serve_connection(
    stream: TcpStream,
    conn: Arc<Conn>,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<()>,
) {
    let io = TokioIo::new(Watched {
        io: stream,
        conn: conn.clone(),
    });
    let svc_conn = conn.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let in_flight = svc_conn.begin();
        let router = router.clone();
        async move {
            use http_body_util::BodyExt;
            use tower::ServiceExt;
            let resp = router.oneshot(req).await?;
            // The request counts as in flight until hyper has sent (or dropped) the body.
            Ok::<_, Infallible>(resp.map(move |body| {
                axum::body::Body::new(body.map_frame(move |frame| {
                    let _keep = &in_flight;
                    frame
                }))
            }))
        }
    });
    let builder = Builder::new(TokioExecutor::new());
    let mut served = std::pin::pin!(builder.serve_connection(io, svc));
    let mut stopping = false;
    // How often a busy connection looks at its state again (its deadline starts when it idles).
    let recheck = limits.header_read_timeout.min(limits.idle_timeout);
    loop {
        let deadline = conn.deadline(&limits);
        let wake = deadline.unwrap_or_else(|| Instant::now() + recheck);
        tokio::select! {
            r = served.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(wake) => {
                if conn.deadline(&limits).is_some_and(|d| d <= Instant::now()) {
                    // Nothing is in flight: dropping the connection loses no answer.
                    tracing::debug!("closing an HTTP connection that sent no request in time");
                    return;
                }
            }
            () = conn.evict.notified() => {
                tracing::debug!("closing a waiting HTTP connection to admit a new one (max_connections)");
                return;
            }
            r = stop.changed(), if !stopping => {
                let _ = r;
                stopping = true;
                served.as_mut().graceful_shutdown();
            }
        }
    }
}
