//! The `ish build` flow, once for every transport: submit, follow the build's progress (one
//! line, rewritten on a terminal), cancel it on Ctrl-C or SIGTERM, report the result and the
//! failed atoms, and unpack results.zip.
use super::api::{BuildApi, BuildView};
use super::{BuildOptions, exit, unzip};
use ish_core::proto;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Runs the build through `api`; returns the process exit code.
pub(crate) async fn run<A: BuildApi>(api: &mut A, opts: &BuildOptions) -> anyhow::Result<i32> {
    let started = Instant::now();
    let id = api.submit(&opts.request).await?;
    eprintln!("Submitted build {id} to {}", api.target());
    let Some(last) = follow(api, id).await? else {
        eprintln!("\nInterrupted: canceling build {id}.");
        let _ = api.cancel(id).await;
        return Ok(exit::INTERRUPTED);
    };
    report(api, &last, started.elapsed(), opts).await
}

/// Shows progress until the build is final (`None`: interrupted first).
async fn follow<A: BuildApi>(api: &mut A, id: u64) -> anyhow::Result<Option<BuildView>> {
    let tty = std::io::stderr().is_terminal();
    let mut last_line = String::new();
    let mut last_print = Instant::now() - Duration::from_secs(10);
    let mut last_state = proto::BuildState::Unspecified;
    loop {
        let b = tokio::select! {
            b = api.next_state(id) => b?,
            _ = crate::shutdown_signal() => return Ok(None),
        };
        let line = b.progress_line();
        let final_state = b.is_final();
        if line != last_line {
            if tty {
                eprint!("\r\x1b[2K{line}");
                let _ = std::io::stderr().flush();
            } else if b.state != last_state
                || final_state
                || last_print.elapsed() > Duration::from_secs(2)
            {
                eprintln!("{line}");
                last_print = Instant::now();
            }
            last_line = line;
        }
        last_state = b.state;
        if final_state {
            if tty {
                eprintln!();
            }
            return Ok(Some(b));
        }
    }
}

async fn report<A: BuildApi>(
    api: &mut A,
    b: &BuildView,
    took: Duration,
    opts: &BuildOptions,
) -> anyhow::Result<i32> {
    let (id, secs) = (b.id, took.as_secs_f64());
    match b.state {
        proto::BuildState::Finished => {
            let counts = b
                .num_atoms
                .map(|n| format!(" ({n} atoms, {} failed)", b.failed.len()))
                .unwrap_or_default();
            eprintln!(
                "Build {id} finished in {secs:.1} s: {}{counts}",
                if b.passed { "NO_FAILURES" } else { "FAILURE" },
            );
            for a in &b.failed {
                eprintln!(
                    "  failed: artifact_{}_{} exit {} — {}",
                    a.subjob, a.atom, a.exit, a.command
                );
            }
            if !opts.no_download {
                let zip = api.results_zip(id).await?;
                let dir = opts.cfg.results_dir.clone();
                tokio::task::spawn_blocking(move || unzip(&zip, &dir)).await??;
                eprintln!("Results in {}/", opts.cfg.results_dir.display());
            }
            Ok(if b.passed { exit::OK } else { exit::FAILED })
        }
        proto::BuildState::Error => {
            eprintln!("Build {id} aborted due to error: {}", b.error);
            Ok(exit::FAILED)
        }
        _ => {
            eprintln!("Build {id} was canceled.");
            Ok(exit::FAILED)
        }
    }
}
