//! One connection to the master: register (reporting what the slave holds), then relay.
//!
//! Down: every master message goes to [`Worker::handle`], in order; nothing here waits on work.
//! Up: a pump moves the worker's outbox onto the stream; heartbeats go straight on it. When the
//! stream ends the session ends, but the worker's work goes on: the next session reports it.
//!
//! Leaving: on shutdown (SIGTERM) or a Drain from the master the slave tells the master it is
//! draining, lets running work finish (within `shutdown_grace_ms` on shutdown), stops the rest,
//! says GoingAway, tears its builds down and ends.
use crate::link::GrpcLink;
use crate::worker::{Live, Worker};
use ish_core::proto::{self, master_message::Msg as Down, slave_message::Msg as Up};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Why a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The slave was told to stop (SIGTERM): it left cleanly.
    Shutdown,
    /// The master drained this slave: it finished its work and left.
    Drained,
    /// The master refused this slave (wrong secret, bad registration). Retrying will not help.
    Refused(String),
    /// The connection failed or ended; try again.
    Lost(String),
}

/// How the session is leaving, once it started to.
#[derive(Debug, Clone, Copy)]
enum Leaving {
    /// Shutdown: running work gets until the deadline.
    Shutdown(Instant),
    /// Drained by the master: running work finishes.
    Drain,
}

/// Connects, registers and serves one session until it ends.
pub async fn run_session(
    worker: &Arc<Worker>,
    tasks: &mut JoinSet<()>,
    epoch: u64,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let cfg = &worker.shared.cfg;
    let endpoint = match Channel::from_shared(cfg.master.clone()) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20)),
        Err(e) => return SessionEnd::Refused(format!("invalid master URL {:?}: {e}", cfg.master)),
    };
    let channel = tokio::select! {
        c = endpoint.connect() => match c {
            Ok(c) => c,
            Err(e) => return SessionEnd::Lost(format!("cannot reach the master at {}: {e}", cfg.master)),
        },
        _ = shutdown.cancelled() => return SessionEnd::Shutdown,
    };
    let mut link = proto::slave_link_client::SlaveLinkClient::with_interceptor(
        channel,
        worker.shared.auth.clone(),
    )
    // The master's limit: a build of many atoms is one large Build message.
    .max_decoding_message_size(ish_core::MAX_MESSAGE_BYTES)
    .max_encoding_message_size(ish_core::MAX_MESSAGE_BYTES);
    // Between the outbox and the wire: small, the outbox is where messages wait.
    let (tx, rx) = mpsc::channel::<proto::SlaveMessage>(64);
    let (attempts, builds) = worker.report();
    let held = attempts.len();
    let register = proto::SlaveMessage {
        msg: Some(Up::Register(proto::Register {
            name: worker.shared.name.clone(),
            executors: cfg.executors,
            labels: cfg.labels.clone(),
            version: ish_core::VERSION.into(),
            session_id: worker.shared.session_id.clone(),
            attempts,
            builds,
        })),
    };
    let _ = tx.send(register).await;
    let refused = |s: &tonic::Status| {
        matches!(
            s.code(),
            tonic::Code::Unauthenticated | tonic::Code::InvalidArgument
        )
    };
    let mut inbound = match link.session(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(s) if refused(&s) => return SessionEnd::Refused(s.message().to_string()),
        Err(s) => return SessionEnd::Lost(format!("session refused: {}", s.message())),
    };
    let registered = match inbound.message().await {
        Ok(Some(proto::MasterMessage {
            msg: Some(Down::Registered(r)),
        })) => r,
        Ok(_) => return SessionEnd::Lost("the master did not answer the registration".into()),
        Err(s) if refused(&s) => return SessionEnd::Refused(s.message().to_string()),
        Err(s) => return SessionEnd::Lost(format!("registration failed: {}", s.message())),
    };
    tracing::info!(slave_id = registered.slave_id, master = %cfg.master, held_attempts = held, "registered with the master");
    worker.set_live(Some(Live {
        epoch,
        slave_id: registered.slave_id,
        link: Arc::new(GrpcLink(link)),
    }));
    // The pump owns the outbox for the life of the session (and gives it back when aborted).
    let pump = {
        let worker = worker.clone();
        let tx = tx.clone();
        AbortOnDrop(tokio::spawn(async move {
            let mut outbox = worker.outbox_rx.lock().await;
            while let Some(msg) = outbox.recv().await {
                if tx
                    .send(proto::SlaveMessage { msg: Some(msg) })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }))
    };
    let heartbeat_every =
        Duration::from_millis(registered.heartbeat_interval_ms.clamp(100, 60_000));
    let master_timeout = Duration::from_millis(cfg.master_timeout_ms);
    let mut beat = tokio::time::interval(heartbeat_every);
    let mut last_heard = Instant::now();
    let mut leaving: Option<Leaving> = None;
    let mut check = tokio::time::interval(Duration::from_millis(50));
    let end = loop {
        tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(proto::MasterMessage { msg: Some(msg) })) => {
                    last_heard = Instant::now();
                    if matches!(msg, Down::Drain(_)) && leaving.is_none() {
                        tracing::info!("drained by the master: finishing current work, then leaving");
                        leaving = Some(Leaving::Drain);
                    }
                    worker.handle(tasks, msg);
                }
                Ok(Some(_)) => last_heard = Instant::now(),
                Ok(None) => break SessionEnd::Lost("the master ended the session".into()),
                Err(s) => break SessionEnd::Lost(format!("the session failed: {}", s.message())),
            },
            _ = beat.tick() => {
                if last_heard.elapsed() > master_timeout {
                    break SessionEnd::Lost(format!("no word from the master for {master_timeout:?}"));
                }
                let hb = Up::Heartbeat(proto::Heartbeat { sent_at: ish_core::now_epoch() });
                if tx.send(proto::SlaveMessage { msg: Some(hb) }).await.is_err() {
                    break SessionEnd::Lost("the session's send queue closed".into());
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = shutdown.cancelled(), if leaving.is_none() => {
                let grace = Duration::from_millis(cfg.shutdown_grace_ms);
                tracing::info!(?grace, "shutting down: finishing current work, then leaving");
                let draining = Up::Draining(proto::Draining { reason: "shutting down".into() });
                let _ = tx.send(proto::SlaveMessage { msg: Some(draining) }).await;
                leaving = Some(Leaving::Shutdown(Instant::now() + grace));
            }
            _ = check.tick(), if leaving.is_some() => {
                let out_of_time = matches!(leaving, Some(Leaving::Shutdown(t)) if Instant::now() >= t);
                if worker.idle() || out_of_time {
                    break leave(worker, tasks, &tx, leaving.expect("checked")).await;
                }
            }
        }
    };
    worker.set_live(None);
    drop(pump);
    end
}

/// Stops what still runs, says goodbye (after every queued result), tears builds down.
async fn leave(
    worker: &Arc<Worker>,
    tasks: &mut JoinSet<()>,
    tx: &mpsc::Sender<proto::SlaveMessage>,
    how: Leaving,
) -> SessionEnd {
    if !worker.idle() {
        tracing::warn!("grace period over: stopping the remaining work; the master re-queues it");
        worker.cancel_all();
    }
    let grace = Duration::from_millis(worker.shared.cfg.kill_grace_ms) + Duration::from_secs(5);
    let _ = tokio::time::timeout(grace, async {
        while !worker.idle() {
            tokio::select! {
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    })
    .await;
    // Results queued by the finished work go up before the goodbye.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !worker.outbox_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reason = match how {
        Leaving::Shutdown(_) => "shutting down",
        Leaving::Drain => "drained",
    };
    let _ = tx
        .send(proto::SlaveMessage {
            msg: Some(Up::GoingAway(proto::GoingAway {
                reason: reason.into(),
            })),
        })
        .await;
    let budget = Duration::from_millis(worker.shared.cfg.shutdown_teardown_ms);
    let _ = tokio::time::timeout(budget, worker.teardown_all()).await;
    match how {
        Leaving::Shutdown(_) => SessionEnd::Shutdown,
        Leaving::Drain => SessionEnd::Drained,
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
