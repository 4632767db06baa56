//! B3 master scale: simulated slaves against a master process: dispatches/s, latency, RSS.
use super::common::*;
use super::procs::*;
use anyhow::{Context, bail};
use ish_core::proto;
use std::time::{Duration, Instant};

/// B3: many simulated slaves (in-process stream clients) against a master process, in two
/// phases on the same cluster:
/// - saturation: zero-work atoms, every executor asks for more at once: the most dispatches/s
///   the master sustains. Here every executor waits its turn at the master, so the wait is
///   executors ÷ rate (Little's law), whatever the master's own latency is;
/// - offered load of 20,000 atoms/s: simulated atoms take executors ÷ 20,000 s on average
///   (spread over 0.5–1.5 × that), so the cluster asks for 20,000 dispatches/s; the wait between an executor reporting its atom done
///   and receiving the next one is the master's dispatch latency under that load.
pub async fn b3(scale: Scale) -> anyhow::Result<Vec<Row>> {
    use ish_core::proto::{master_message::Msg as Down, slave_message::Msg as Up};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    let (slaves, atoms, loaded_atoms) = if scale.quick {
        (20usize, 2_000usize, 2_000usize)
    } else {
        (1_000, 200_000, 100_000)
    };
    let executors = 4u32;
    let offered_rate = 20_000.0;
    let tmp = TempDir::new("b3")?;
    let secret = ish_core::auth::generate_secret();
    let conf = format!(
        "max_atoms_per_build = {atoms}\nheartbeat_timeout_ms = 120000\nmax_concurrent_streams = 1024\n"
    );
    let (master, url) = master_process(&tmp.0, &secret, &conf).await?;
    let auth = ish_core::auth::SecretInterceptor::new(&secret)?;
    // Sessions share a few HTTP/2 connections, as many slaves behind one proxy would.
    let per_channel = 100;
    let mut channels = Vec::new();
    for _ in 0..slaves.div_ceil(per_channel) {
        channels.push(
            tonic::transport::Channel::from_shared(url.clone())?
                .connect()
                .await?,
        );
    }
    /// What the simulated slaves observe, shared by all of them.
    #[derive(Default)]
    struct Observed {
        /// Executor freed by a finished subjob → next work arrived.
        latencies: Vec<Duration>,
        /// Setup done → first work of each executor: every executor of the fleet is freed at
        /// once when a build starts, so this is the start-up wave, reported apart.
        ramp: Vec<Duration>,
        first_dispatch: Option<Instant>,
        last_done: Option<Instant>,
    }
    let observed = Arc::new(Mutex::new(Observed::default()));
    // Simulated time per atom, in microseconds (0: answer at once).
    let work_us = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..slaves {
        let mut link = proto::slave_link_client::SlaveLinkClient::with_interceptor(
            channels[i / per_channel].clone(),
            auth.clone(),
        )
        .max_decoding_message_size(ish_core::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(ish_core::MAX_MESSAGE_BYTES);
        let (observed, work_us) = (observed.clone(), work_us.clone());
        tasks.push(tokio::spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<proto::SlaveMessage>(1024);
            let send = |m: Up| proto::SlaveMessage { msg: Some(m) };
            tx.send(send(Up::Register(proto::Register {
                name: format!("sim-{i}"),
                executors,
                ..Default::default()
            })))
            .await?;
            let mut inbound = link
                .session(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            // When each executor slot became free (the latency of the next dispatch to it), and
            // whether by a finished subjob (steady state) or by the build's setup (start-up).
            let free_since = Arc::new(Mutex::new(vec![
                (Instant::now(), false);
                executors as usize
            ]));
            while let Some(m) = inbound.message().await? {
                match m.msg {
                    Some(Down::Prepare(p)) => {
                        let job = proto::JobConfig {
                            name: "B3".into(),
                            commands: "true".into(),
                            ..Default::default()
                        };
                        tx.send(send(Up::Prepared(proto::PrepareResult {
                            build_id: p.build_id,
                            job: Some(job),
                            atoms: p.atoms_override,
                            ..Default::default()
                        })))
                        .await?;
                    }
                    Some(Down::Setup(s)) => {
                        tx.send(send(Up::Setup(proto::SetupResult {
                            build_id: s.build_id,
                            ok: true,
                            error: String::new(),
                        })))
                        .await?;
                        free_since
                            .lock()
                            .expect("poisoned")
                            .fill((Instant::now(), false));
                    }
                    Some(Down::RunSubjob(r)) => {
                        let now = Instant::now();
                        let slot = r.executor_index as usize % executors as usize;
                        {
                            let (since, steady) = free_since.lock().expect("poisoned")[slot];
                            let mut o = observed.lock().expect("poisoned");
                            o.first_dispatch.get_or_insert(now);
                            let waited = now.duration_since(since);
                            if steady {
                                o.latencies.push(waited);
                            } else {
                                o.ramp.push(waited);
                            }
                        }
                        // Atom times spread evenly over 0.5–1.5 × the mean (deterministic), so
                        // executors do not all finish in the same instant wave after wave.
                        let spread = 0.5 + (f64::from(r.subjob_id) * 0.618_033_988_7).fract();
                        let work =
                            Duration::from_micros(work_us.load(Ordering::Relaxed)).mul_f64(spread);
                        let (tx, free_since, observed) =
                            (tx.clone(), free_since.clone(), observed.clone());
                        let run = async move {
                            if !work.is_zero() {
                                tokio::time::sleep(work).await;
                            }
                            for a in &r.atoms {
                                tx.send(send(Up::AtomResult(proto::AtomResult {
                                    build_id: r.build_id,
                                    subjob_id: r.subjob_id,
                                    atom_id: a.atom_id,
                                    attempt: r.attempt,
                                    exit_code: 0,
                                    seconds: work.as_secs_f64(),
                                    artifact_files: 0,
                                    tries: 1,
                                    timed_out: false,
                                })))
                                .await?;
                            }
                            let done = Instant::now();
                            free_since.lock().expect("poisoned")[slot] = (done, true);
                            tx.send(send(Up::SubjobDone(proto::SubjobDone {
                                build_id: r.build_id,
                                subjob_id: r.subjob_id,
                                attempt: r.attempt,
                            })))
                            .await?;
                            let mut o = observed.lock().expect("poisoned");
                            o.last_done = Some(o.last_done.map_or(done, |l| l.max(done)));
                            Ok::<(), anyhow::Error>(())
                        };
                        if work.is_zero() {
                            run.await?;
                        } else {
                            tokio::spawn(run);
                        }
                    }
                    Some(Down::Teardown(t)) => {
                        tx.send(send(Up::TeardownDone(proto::TeardownDone {
                            build_id: t.build_id,
                            ok: true,
                            error: String::new(),
                        })))
                        .await?;
                    }
                    _ => {}
                }
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    let (mut b, mut cl) = crate::local::connect(&url, &secret, Duration::from_secs(10)).await?;
    wait_for_slaves(&mut cl, slaves, Duration::from_secs(120)).await?;
    let project = tmp.0.join("project");
    std::fs::create_dir_all(&project)?;
    // Each phase has atoms of its own (`var`): no timing history, so one atom per dispatch,
    // the dispatch engine's worst case (history would batch these zero-time atoms).
    let mut phase = async |var: &str,
                           n: usize,
                           work: Duration|
           -> anyhow::Result<(f64, Vec<Duration>, Vec<Duration>, f64)> {
        *observed.lock().expect("poisoned") = Observed::default();
        work_us.store(work.as_micros() as u64, Ordering::Relaxed);
        let mut req = dir_request(&project);
        req.atoms_override = (0..n).map(|i| format!("export {var}=\"{i}\";")).collect();
        let (build, _) = run_build(&mut b, req).await?;
        let finished = Instant::now();
        if build.completed_atoms as usize != n {
            bail!("B3: {} of {n} atoms completed", build.completed_atoms);
        }
        let o = std::mem::take(&mut *observed.lock().expect("poisoned"));
        let start = o.first_dispatch.context("no dispatch seen")?;
        // Dispatching ends with the last subjob done; the archives are written after it.
        let end = o.last_done.context("no subjob done")?;
        let seen = o.latencies.len() + o.ramp.len();
        if seen != n {
            bail!("B3: {seen} dispatches seen for {n} atoms");
        }
        let rate = n as f64 / end.duration_since(start).as_secs_f64();
        let (mut lat, mut ramp) = (o.latencies, o.ramp);
        lat.sort();
        ramp.sort();
        let archive_s = finished.duration_since(end).as_secs_f64();
        Ok((rate, lat, ramp, archive_s))
    };
    let (rate, lat, _, archive_s) = phase("A", atoms, Duration::ZERO).await?;
    // The phases are separate experiments: the second starts once the master has finished the
    // first's background work (sled writing out 200,000 results, freeing the build), which
    // otherwise shares the 2 CPUs with the measured dispatches.
    master.wait_idle(Duration::from_secs(60)).await;
    let total_executors = slaves as f64 * f64::from(executors);
    let work = Duration::from_secs_f64(total_executors / offered_rate);
    let (loaded_rate, loaded_lat, ramp, _) = phase("B", loaded_atoms, work).await?;
    let rss = master.peak_rss_mib();
    drop(master);
    for t in tasks {
        t.abort();
    }
    let p = |lat: &[Duration], q: f64| {
        lat.get(((q / 100.0) * (lat.len().max(1) - 1) as f64).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    Ok(vec![
        Row::new(
            format!(
                "B3 {slaves} simulated slaves × {executors}, {atoms} zero-work atoms: dispatches/s"
            ),
            format!("{rate:.0}"),
            "≥ 20000",
            Some(rate >= 20_000.0),
        ),
        Row::new(
            "B3 saturated: executor free → next work, p50 / p99 (≈ executors ÷ rate)",
            format!("{:.1} / {:.1} ms", p(&lat, 50.0), p(&lat, 99.0)),
            "",
            None,
        ),
        Row::new(
            "B3 saturated: last atom done → build finished (archives of every atom)",
            format!("{archive_s:.1} s"),
            "",
            None,
        ),
        Row::new(
            format!(
                "B3 offered {offered_rate:.0} atoms/s ({loaded_atoms} atoms of {:.0} ms): achieved dispatches/s",
                work.as_secs_f64() * 1e3
            ),
            format!("{loaded_rate:.0}"),
            "",
            None,
        ),
        Row::new(
            "B3 offered load: dispatch latency p50",
            format!("{:.2} ms", p(&loaded_lat, 50.0)),
            "",
            None,
        ),
        Row::new(
            "B3 offered load: dispatch latency p99",
            format!("{:.2} ms", p(&loaded_lat, 99.0)),
            "< 20 ms",
            Some(p(&loaded_lat, 99.0) < 20.0),
        ),
        Row::new(
            format!(
                "B3 offered load: start-up wave, setup → first work of all {} executors, p50 / p99",
                total_executors
            ),
            format!("{:.1} / {:.1} ms", p(&ramp, 50.0), p(&ramp, 99.0)),
            "",
            None,
        ),
        Row::new(
            "B3 master peak RSS",
            format!("{rss:.0} MiB"),
            "< 300 MiB",
            Some(rss < 300.0),
        ),
    ])
}
