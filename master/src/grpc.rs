//! The master's gRPC services. Thin: each call becomes a typed call on the engine's [`MasterHandle`]; the only work
//! done here is moving bytes (console chunks and artifact uploads to disk, downloads from disk).
use crate::actor::MasterHandle;
use crate::command::{ConsoleLocation, UploadGrant};
use crate::error::MasterError;
use crate::ids::{AtomRef, AttemptId, BuildId, SlaveId};
use crate::results::{self, ArchiveKind, ArchiveSource};
use ish_core::proto::{self, slave_message::Msg as Up};
use ish_core::{console, paths};
use std::collections::HashMap;
use std::pin::Pin;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Bytes per message when streaming files to clients.
const DOWNLOAD_CHUNK: usize = 256 * 1024;
/// Shortest time between two updates of one watch stream (the final state waits at most this).
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// The slave link: sessions and artifact uploads.
#[derive(Debug, Clone)]
pub struct SlaveLinkService {
    handle: MasterHandle,
    queue_capacity: usize,
    max_atom_bytes: u64,
}

impl SlaveLinkService {
    /// A service over the core behind `handle`.
    pub fn new(handle: MasterHandle, queue_capacity: usize, max_atom_bytes: u64) -> Self {
        Self {
            handle,
            queue_capacity,
            max_atom_bytes,
        }
    }
}

/// Streamed consoles up to this size are held in memory for a moment (see [`ConsoleFiles`]).
const HELD_CONSOLE_BYTES: usize = 64 << 10;

/// How long a streamed console may stay in memory before it goes to its file (what live
/// readers see lags by at most this).
const HELD_CONSOLE_FOR: std::time::Duration = std::time::Duration::from_millis(200);

/// The streamed consoles of one slave's running atoms, keyed by attempt and atom, with the
/// bytes received so far (a slave may not stream more than `cap` bytes for one atom).
///
/// A short atom's console comes twice: streamed while it runs, and uploaded with its results.
/// So a streamed console is held in memory until it is larger than [`HELD_CONSOLE_BYTES`] or
/// older than [`HELD_CONSOLE_FOR`]; if the atom ends first and its upload brought the console,
/// the held copy is dropped and no file is made (each file made per atom costs an inode
/// allocation). Anything else (a long atom, no uploaded console, a session that ends) goes to
/// the live console file, as before.
struct ConsoleFiles {
    open: HashMap<(u64, u32), LiveConsole>,
    cap: u64,
}

struct LiveConsole {
    grant: UploadGrant,
    written: u64,
    since: std::time::Instant,
    held: Held,
}

enum Held {
    Memory(Vec<u8>),
    File(tokio::fs::File),
}

impl LiveConsole {
    /// Moves a console held in memory to its file.
    async fn spill(&mut self) -> Result<(), MasterError> {
        let Held::Memory(bytes) = &self.held else {
            return Ok(());
        };
        let path = &self.grant.live_console;
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| MasterError::io("creating console directory", e))?;
        }
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(|e| MasterError::io("opening console file", e))?;
        f.write_all(bytes)
            .await
            .map_err(|e| MasterError::io("writing console", e))?;
        self.held = Held::File(f);
        Ok(())
    }
}

impl ConsoleFiles {
    async fn append(
        &mut self,
        handle: &MasterHandle,
        slave: SlaveId,
        c: proto::ConsoleChunk,
    ) -> Result<(), MasterError> {
        let key = (c.attempt, c.atom_id);
        let live = match self.open.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let grant = handle
                    .upload_target(
                        slave,
                        AtomRef::new(c.build_id, c.subjob_id, c.atom_id),
                        AttemptId(c.attempt),
                    )
                    .await?;
                e.insert(LiveConsole {
                    grant,
                    written: 0,
                    since: std::time::Instant::now(),
                    held: Held::Memory(Vec::new()),
                })
            }
        };
        live.written += c.data.len() as u64;
        if live.written > self.cap {
            return Ok(());
        }
        match &mut live.held {
            Held::Memory(m) if m.len() + c.data.len() <= HELD_CONSOLE_BYTES => {
                m.extend_from_slice(&c.data);
                Ok(())
            }
            Held::Memory(_) => {
                live.spill().await?;
                live.write(&c.data).await
            }
            Held::File(_) => live.write(&c.data).await,
        }
    }

    /// Consoles held longer than [`HELD_CONSOLE_FOR`] go to their files (live readers see them).
    async fn spill_old(&mut self) {
        for live in self.open.values_mut() {
            if matches!(live.held, Held::Memory(_))
                && live.since.elapsed() >= HELD_CONSOLE_FOR
                && let Err(e) = live.spill().await
            {
                tracing::debug!(error = %e, "console kept in memory only");
            }
        }
    }

    /// Makes an atom's console complete on disk before its result is recorded — unless its
    /// upload brought it, in which case a held copy is simply dropped.
    async fn close(&mut self, attempt: u64, atom: u32) {
        let Some(mut live) = self.open.remove(&(attempt, atom)) else {
            return;
        };
        if matches!(live.held, Held::Memory(_))
            && tokio::fs::try_exists(live.grant.dir.join(results::CONSOLE_FILE))
                .await
                .unwrap_or(false)
        {
            return;
        }
        if let Err(e) = live.spill().await {
            tracing::debug!(error = %e, "streamed console lost");
        }
        if let Held::File(f) = &mut live.held {
            let _ = f.flush().await;
        }
    }

    /// The session ended: every held console goes to its file (an atom killed with its slave
    /// keeps what it printed).
    async fn close_all(&mut self) {
        let keys: Vec<(u64, u32)> = self.open.keys().copied().collect();
        for (attempt, atom) in keys {
            if let Some(mut live) = self.open.remove(&(attempt, atom)) {
                let _ = live.spill().await;
                if let Held::File(f) = &mut live.held {
                    let _ = f.flush().await;
                }
            }
        }
    }
}

impl LiveConsole {
    async fn write(&mut self, data: &[u8]) -> Result<(), MasterError> {
        if let Held::File(f) = &mut self.held {
            f.write_all(data)
                .await
                .map_err(|e| MasterError::io("writing console", e))?;
        }
        Ok(())
    }
}

/// The status for a file error while storing an upload: a full disk is named as such (the
/// build it hits is failed), anything else is an internal error.
fn io_status(context: &str, e: std::io::Error) -> Status {
    if e.kind() == std::io::ErrorKind::StorageFull {
        Status::resource_exhausted(format!("{context}: {DISK_FULL}: {e}"))
    } else {
        Status::from(MasterError::io(context, e))
    }
}

/// How a full disk is named in statuses and build errors.
const DISK_FULL: &str = "the master's disk is full";

impl SlaveLinkService {
    /// Writes the files of an upload into the attempt's directory, within the atom's and the
    /// build's byte budgets.
    async fn store_upload(
        &self,
        inbound: &mut Streaming<proto::ArtifactChunk>,
        grant: &UploadGrant,
        receipt: &mut proto::UploadReceipt,
        kept: &mut KeptManifest,
    ) -> Result<(), Status> {
        use proto::artifact_chunk::Msg;
        let mut current: Option<(String, tokio::fs::File)> = None;
        while let Some(chunk) = inbound.message().await? {
            let Some(Msg::File(f)) = chunk.msg else {
                return Err(Status::invalid_argument(
                    "only FileChunk may follow the header",
                ));
            };
            let total = receipt.bytes + f.data.len() as u64;
            if total > self.max_atom_bytes {
                return Err(Status::resource_exhausted(format!(
                    "the artifacts of one atom exceed {} bytes (max_artifact_bytes_per_atom)",
                    self.max_atom_bytes
                )));
            }
            if total > grant.budget {
                return Err(Status::resource_exhausted(
                    "the build's artifacts exceed max_artifact_bytes_per_build",
                ));
            }
            if f.path == results::UPLOAD_MANIFEST {
                // Kept in memory; a file only when the upload is not whole (see `settle`).
                if kept.manifest.is_none() {
                    receipt.files += 1;
                }
                kept.manifest
                    .get_or_insert_with(Vec::new)
                    .extend_from_slice(&f.data);
                receipt.bytes = total;
                continue;
            }
            let same = current.as_ref().is_some_and(|(p, _)| *p == f.path);
            if !same {
                let rel = paths::safe_relative_path(&f.path).ok_or_else(|| {
                    Status::invalid_argument(format!("unsafe artifact path {:?}", f.path))
                })?;
                let path = grant.dir.join(rel);
                if let Some(parent) = path.parent() {
                    tokio::fs::create_dir_all(parent)
                        .await
                        .map_err(|e| io_status("creating artifact directory", e))?;
                }
                let file = tokio::fs::File::create(&path)
                    .await
                    .map_err(|e| io_status("creating artifact file", e))?;
                receipt.files += 1;
                current = Some((f.path.clone(), file));
            }
            let (name, file) = current.as_mut().expect("set above");
            file.write_all(&f.data)
                .await
                .map_err(|e| io_status("writing artifact", e))?;
            *kept.written.entry(name.clone()).or_default() += f.data.len() as u64;
            receipt.bytes = total;
            if f.last {
                let (_, mut file) = current.take().expect("set above");
                file.flush()
                    .await
                    .map_err(|e| io_status("writing artifact", e))?;
            }
        }
        if let Some((_, mut file)) = current {
            file.flush()
                .await
                .map_err(|e| io_status("writing artifact", e))?;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl proto::slave_link_server::SlaveLink for SlaveLinkService {
    type SessionStream = BoxStream<proto::MasterMessage>;

    async fn session(
        &self,
        request: Request<Streaming<proto::SlaveMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let reg = match inbound.message().await? {
            Some(proto::SlaveMessage {
                msg: Some(Up::Register(r)),
            }) => r,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be Register",
                ));
            }
        };
        let (tx, rx) = mpsc::channel(self.queue_capacity);
        let sid = self.handle.slave_connected(reg, tx).await?;
        let handle = self.handle.clone();
        let console_cap = self.max_atom_bytes;
        tokio::spawn(async move {
            let mut consoles = ConsoleFiles {
                open: HashMap::new(),
                cap: console_cap,
            };
            let mut spill = tokio::time::interval(HELD_CONSOLE_FOR / 2);
            spill.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    _ = spill.tick() => {
                        consoles.spill_old().await;
                        continue;
                    }
                };
                let msg = match next {
                    Ok(Some(proto::SlaveMessage { msg: Some(m) })) => m,
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(slave = sid.0, error = %e, "slave stream failed");
                        break;
                    }
                };
                let forward = match msg {
                    Up::Console(c) => {
                        if let Err(e) = consoles.append(&handle, sid, c).await {
                            tracing::debug!(slave = sid.0, error = %e, "console chunk dropped");
                        }
                        None
                    }
                    Up::AtomResult(r) => {
                        consoles.close(r.attempt, r.atom_id).await;
                        Some(Up::AtomResult(r))
                    }
                    other => Some(other),
                };
                if let Some(m) = forward
                    && handle.from_slave(sid, m).await.is_err()
                {
                    break;
                }
            }
            consoles.close_all().await;
            let _ = handle.slave_disconnected(sid).await;
        });
        let out = ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(
            out, Ok,
        ))))
    }

    async fn upload_artifacts(
        &self,
        request: Request<Streaming<proto::ArtifactChunk>>,
    ) -> Result<Response<proto::UploadReceipt>, Status> {
        use proto::artifact_chunk::Msg;
        let mut inbound = request.into_inner();
        let header = match inbound.message().await? {
            Some(proto::ArtifactChunk {
                msg: Some(Msg::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of an upload must be UploadHeader",
                ));
            }
        };
        let grant = self
            .handle
            .upload_target(
                SlaveId(header.slave_id),
                AtomRef::new(header.build_id, header.subjob_id, header.atom_id),
                AttemptId(header.attempt),
            )
            .await?;
        let mut receipt = proto::UploadReceipt::default();
        let mut kept = KeptManifest::default();
        let result = self
            .store_upload(&mut inbound, &grant, &mut receipt, &mut kept)
            .await;
        kept.settle(&grant.dir, result.is_ok()).await;
        // What reached the disk counts against the build's budget, even when the upload failed.
        let _ = self
            .handle
            .artifact_bytes(BuildId(header.build_id), receipt.bytes)
            .await;
        if let Err(status) = &result
            && status.message().contains(DISK_FULL)
        {
            let msg = format!("Could not store artifacts: {}", status.message());
            let _ = self
                .handle
                .results_failed(BuildId(header.build_id), msg)
                .await;
        }
        result?;
        Ok(Response::new(receipt))
    }
}

/// An upload's manifest (every file it will send and its size), held in memory while the
/// upload runs. Written beside the files only when the upload is not whole, so that promotion
/// leaves out the files it cut short (`results::drop_cut_files`): a whole upload, the normal
/// case, makes no manifest file (each file made per atom costs an inode allocation).
#[derive(Debug, Default)]
struct KeptManifest {
    manifest: Option<Vec<u8>>,
    /// Bytes written per file name.
    written: HashMap<String, u64>,
}

impl KeptManifest {
    async fn settle(&self, dir: &std::path::Path, ended_ok: bool) {
        let Some(manifest) = &self.manifest else {
            return;
        };
        let listed: Vec<(String, u64)> = serde_json::from_slice(manifest).unwrap_or_default();
        let whole = ended_ok
            && !listed.is_empty()
            && listed
                .iter()
                .all(|(name, size)| self.written.get(name).copied().unwrap_or(0) == *size);
        let path = dir.join(results::UPLOAD_MANIFEST);
        if whole {
            // A manifest an earlier, interrupted upload of this attempt left is stale now.
            let _ = tokio::fs::remove_file(&path).await;
            return;
        }
        let written = async {
            tokio::fs::create_dir_all(dir).await?;
            tokio::fs::write(&path, manifest).await
        };
        if let Err(e) = written.await {
            tracing::warn!(error = %e, "could not keep an upload's manifest");
        }
    }
}

/// The client-facing build service.
#[derive(Debug, Clone)]
pub struct BuildsService {
    handle: MasterHandle,
    /// Archives being written for downloads at once: each deflates a whole archive on a thread,
    /// so more than the cores would only slow them all (and the rest of the master) down. Others
    /// wait their turn.
    archive_writers: std::sync::Arc<tokio::sync::Semaphore>,
}

impl BuildsService {
    /// A service over the core behind `handle`.
    pub fn new(handle: MasterHandle) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Self {
            handle,
            archive_writers: std::sync::Arc::new(tokio::sync::Semaphore::new(cores)),
        }
    }
}

/// Opens an atom's console wherever it is right now: a completed atom's file may still be in its
/// attempt directory until the results queue moves it (an atomic rename). None: the atom has
/// printed nothing. An open file stays readable whatever rename follows.
async fn open_console(loc: &ConsoleLocation) -> std::io::Result<Option<tokio::fs::File>> {
    // Moves are atomic renames toward `path`: looking at `path`, then where it comes from, then
    // at `path` again finds the file wherever it is.
    let candidates = std::iter::once(&loc.path)
        .chain(&loc.pending)
        .chain(std::iter::once(&loc.path));
    for p in candidates {
        match tokio::fs::File::open(p).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            other => return other.map(Some),
        }
    }
    Ok(None)
}

/// One page of a console, read from its file in bounded memory (one chunk and the page).
async fn console_page(
    loc: &ConsoleLocation,
    max_lines: u64,
    offset_line: Option<u64>,
) -> Result<console::ConsolePage, Status> {
    let io_error = |e| Status::from(MasterError::io("reading console", e));
    let Some(file) = open_console(loc).await.map_err(io_error)? else {
        return console::page(&[], max_lines, offset_line)
            .map_err(|e| Status::invalid_argument(e.to_string()));
    };
    let file = file.into_std().await;
    // Scanning a large console is many reads: off the async workers.
    let page = tokio::task::spawn_blocking(move || {
        let len = file.metadata()?.len();
        console::page_from(file, len, max_lines, offset_line, console::MAX_PAGE_BYTES)
    })
    .await
    .map_err(|e| Status::internal(format!("reading console: {e}")))?
    .map_err(io_error)?;
    page.map_err(|e| Status::invalid_argument(e.to_string()))
}

/// Sends a console's bytes from `offset` to its current end in DOWNLOAD_CHUNK messages, moving
/// `offset` along. False: the receiver is gone.
async fn send_console_from(
    loc: &ConsoleLocation,
    offset: &mut u64,
    tx: &mpsc::Sender<Result<proto::ConsoleData, Status>>,
) -> std::io::Result<bool> {
    let Some(mut file) = open_console(loc).await? else {
        return Ok(true);
    };
    file.seek(std::io::SeekFrom::Start(*offset)).await?;
    let mut buf = vec![0; DOWNLOAD_CHUNK];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(true);
        }
        *offset += n as u64;
        let data = buf[..n].to_vec();
        if tx.send(Ok(proto::ConsoleData { data })).await.is_err() {
            return Ok(false);
        }
    }
}

#[tonic::async_trait]
impl proto::builds_server::Builds for BuildsService {
    async fn submit(
        &self,
        request: Request<proto::SubmitBuildRequest>,
    ) -> Result<Response<proto::SubmitBuildResponse>, Status> {
        let req = request
            .into_inner()
            .request
            .ok_or_else(|| Status::invalid_argument("request is required"))?;
        let build_id = self.handle.submit(req).await?.0;
        Ok(Response::new(proto::SubmitBuildResponse { build_id }))
    }

    async fn get(
        &self,
        request: Request<proto::GetBuildRequest>,
    ) -> Result<Response<proto::Build>, Status> {
        let id = request.into_inner().build_id;
        Ok(Response::new(self.handle.get_build(BuildId(id)).await?))
    }

    async fn list(
        &self,
        request: Request<proto::ListBuildsRequest>,
    ) -> Result<Response<proto::ListBuildsResponse>, Status> {
        let q = request.into_inner();
        let resp = self
            .handle
            .list_builds(q.offset, q.limit, q.unfinished_only)
            .await?;
        Ok(Response::new(resp))
    }

    async fn cancel(
        &self,
        request: Request<proto::CancelBuildRequest>,
    ) -> Result<Response<proto::Build>, Status> {
        let id = request.into_inner().build_id;
        Ok(Response::new(self.handle.cancel(BuildId(id)).await?))
    }

    async fn list_subjobs(
        &self,
        request: Request<proto::ListSubjobsRequest>,
    ) -> Result<Response<proto::ListSubjobsResponse>, Status> {
        let q = request.into_inner();
        let resp = self
            .handle
            .list_subjobs(BuildId(q.build_id), q.offset, q.limit)
            .await?;
        Ok(Response::new(resp))
    }

    async fn get_console(
        &self,
        request: Request<proto::GetConsoleRequest>,
    ) -> Result<Response<proto::ConsolePage>, Status> {
        let q = request.into_inner();
        let loc = self
            .console_location(q.build_id, q.subjob_id, q.atom_id)
            .await?;
        let max_lines = if q.max_lines == 0 {
            console::DEFAULT_MAX_LINES
        } else {
            u64::from(q.max_lines)
        };
        let page = console_page(&loc, max_lines, q.offset_line).await?;
        Ok(Response::new(proto::ConsolePage {
            offset_line: page.offset_line,
            num_lines: page.num_lines,
            total_num_lines: page.total_num_lines,
            content: page.content,
        }))
    }

    type TailConsoleStream = BoxStream<proto::ConsoleData>;

    async fn tail_console(
        &self,
        request: Request<proto::TailConsoleRequest>,
    ) -> Result<Response<Self::TailConsoleStream>, Status> {
        let q = request.into_inner();
        let mut changes = self.handle.subscribe();
        let first = self
            .console_location(q.build_id, q.subjob_id, q.atom_id)
            .await?;
        let handle = self.handle.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut loc = first;
            let mut offset = 0u64;
            loop {
                match send_console_from(&loc, &mut offset, &tx).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::from(MasterError::io("reading console", e))))
                            .await;
                        return;
                    }
                }
                if loc.complete || !q.follow {
                    return;
                }
                // Wake on any change of the build, or poll: console bytes do not notify.
                let wait = async {
                    loop {
                        match changes.recv().await {
                            Ok(id) if id == q.build_id => return,
                            Ok(_) => continue,
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                            Err(_) => std::future::pending::<()>().await,
                        }
                    }
                };
                let _ = tokio::time::timeout(std::time::Duration::from_millis(200), wait).await;
                match handle
                    .console(AtomRef::new(q.build_id, q.subjob_id, q.atom_id))
                    .await
                {
                    // The atom completed: its file moved from the attempt dir; continue there.
                    Ok(next) => loc = next,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type WatchStream = BoxStream<proto::BuildUpdate>;

    async fn watch(
        &self,
        request: Request<proto::WatchBuildRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let id = request.into_inner().build_id;
        let mut changes = self.handle.subscribe();
        let first = self.handle.get_build(BuildId(id)).await?;
        let handle = self.handle.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut build = first;
            loop {
                let done = is_final(&build);
                let sent_at = tokio::time::Instant::now();
                if tx
                    .send(Ok(proto::BuildUpdate { build: Some(build) }))
                    .await
                    .is_err()
                    || done
                {
                    return;
                }
                loop {
                    match changes.recv().await {
                        Ok(changed) if changed == id => break,
                        Ok(_) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
                // A busy build changes thousands of times a second: send its latest state at
                // most every WATCH_INTERVAL, so watchers do not double the actor's work.
                tokio::time::sleep_until(sent_at + WATCH_INTERVAL).await;
                loop {
                    match changes.try_recv() {
                        Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::TryRecvError::Closed) => return,
                        Err(tokio::sync::broadcast::error::TryRecvError::Empty) => break,
                    }
                }
                match handle.get_build(BuildId(id)).await {
                    Ok(b) => build = b,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type DownloadArtifactsStream = BoxStream<proto::DataChunk>;

    async fn download_artifacts(
        &self,
        request: Request<proto::DownloadArtifactsRequest>,
    ) -> Result<Response<Self::DownloadArtifactsStream>, Status> {
        let q = request.into_inner();
        let kind = match proto::ArchiveFormat::try_from(q.format).unwrap_or_default() {
            proto::ArchiveFormat::TarGz => ArchiveKind::TarGz,
            _ => ArchiveKind::Zip,
        };
        let dir = self.handle.archive_dir(BuildId(q.build_id)).await?;
        let source = tokio::task::spawn_blocking(move || {
            results::archive_source(&dir, kind).map(|s| (dir, s))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::from(MasterError::io("reading the archive index", e)))?;
        let (dir, source) = source;
        let (file, total_size, crc) = match source {
            ArchiveSource::Generated(stat) => (None, stat.size, stat.crc),
            ArchiveSource::Stored(path) => {
                let file = tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| Status::from(MasterError::io("opening archive", e)))?;
                let size = file
                    .metadata()
                    .await
                    .map_err(|e| Status::from(MasterError::io("reading archive", e)))?
                    .len();
                (Some(file), size, 0)
            }
        };
        if q.offset > total_size {
            return Err(Status::out_of_range(format!(
                "offset {} is past the end ({total_size})",
                q.offset
            )));
        }
        let (tx, rx) = mpsc::channel(4);
        if q.size_only {
            let _ = tx
                .send(Ok(proto::DataChunk {
                    data: Vec::new(),
                    total_size,
                }))
                .await;
            return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
        }
        let mut left = if q.length == 0 {
            total_size - q.offset
        } else {
            q.length.min(total_size - q.offset)
        };
        let Some(mut file) = file else {
            let sink = RangeSink {
                skip: q.offset,
                left,
                total_size,
                written: 0,
                crc: flate2::Crc::new(),
                buf: Vec::with_capacity(DOWNLOAD_CHUNK),
                tx,
            };
            let writers = self.archive_writers.clone();
            tokio::spawn(async move {
                let Ok(_turn) = writers.acquire_owned().await else {
                    return;
                };
                let _ = tokio::task::spawn_blocking(move || sink.run(&dir, kind, crc)).await;
            });
            return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
        };
        file.seek(std::io::SeekFrom::Start(q.offset))
            .await
            .map_err(|e| Status::from(MasterError::io("reading archive", e)))?;
        tokio::spawn(async move {
            let mut buf = vec![0u8; DOWNLOAD_CHUNK];
            while left > 0 {
                let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                match file.read(&mut buf[..want]).await {
                    Ok(0) => return,
                    Ok(n) => {
                        left -= n as u64;
                        let chunk = proto::DataChunk {
                            data: buf[..n].to_vec(),
                            total_size,
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::from(MasterError::io("reading archive", e))))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The download of one byte range of an archive written again for it: the bytes before the
/// range are counted and dropped, those in it go out in `DOWNLOAD_CHUNK` messages, and the
/// writing stops once the range is sent (a writer error ends the archive writer early). When
/// the whole archive was written, its size and CRC-32 must be those measured at archive time,
/// or the last chunk is replaced by an error: a client never takes a changed archive for the
/// one it was promised (a results file changed on disk, or a new deflate library).
struct RangeSink {
    skip: u64,
    left: u64,
    total_size: u64,
    written: u64,
    crc: flate2::Crc,
    buf: Vec<u8>,
    tx: mpsc::Sender<Result<proto::DataChunk, Status>>,
}

/// The writer error that ends an archive once the range is sent.
#[derive(Debug)]
struct RangeSent;

impl std::fmt::Display for RangeSent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("range sent")
    }
}

impl std::error::Error for RangeSent {}

impl RangeSink {
    fn send(&mut self) -> std::io::Result<()> {
        let chunk = proto::DataChunk {
            data: std::mem::replace(&mut self.buf, Vec::with_capacity(DOWNLOAD_CHUNK)),
            total_size: self.total_size,
        };
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client gone"))
    }

    fn run(self, dir: &std::path::Path, kind: ArchiveKind, crc: u32) {
        let tx = self.tx.clone();
        let fail = |msg: String| {
            let _ = tx.blocking_send(Err(Status::internal(msg)));
        };
        match results::write_archive(dir, kind, self) {
            Ok(mut sink) => {
                if sink.written != sink.total_size || sink.crc.sum() != crc {
                    tracing::error!(
                        written = sink.written,
                        expected = sink.total_size,
                        "an archive written again differs from the one measured"
                    );
                    fail(format!(
                        "the archive written again ({} bytes) differs from the one measured when the build finished ({} bytes): its results changed on disk",
                        sink.written, sink.total_size
                    ));
                    return;
                }
                if !sink.buf.is_empty() {
                    let _ = sink.send();
                }
            }
            Err(e) if e.get_ref().is_some_and(|r| r.is::<RangeSent>()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            Err(e) => {
                tracing::error!(error = %e, "could not write an archive for a download");
                fail(format!("could not write the archive: {e}"));
            }
        }
    }
}

impl std::io::Write for RangeSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let skipped = usize::try_from(self.skip).map_or(data.len(), |s| s.min(data.len()));
        self.skip -= skipped as u64;
        let rest = &data[skipped..];
        if !rest.is_empty() && self.left == 0 {
            // Past the range: send what is held and stop the writer.
            if !self.buf.is_empty() {
                self.send()?;
            }
            return Err(std::io::Error::other(RangeSent));
        }
        let take = usize::try_from(self.left).map_or(rest.len(), |l| l.min(rest.len()));
        self.buf.extend_from_slice(&rest[..take]);
        self.left -= take as u64;
        self.written += data.len() as u64;
        self.crc.update(data);
        // The last chunk waits for the check at the end of the archive (see `run`).
        if self.buf.len() >= DOWNLOAD_CHUNK && (self.left > 0 || take < rest.len()) {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl BuildsService {
    async fn console_location(
        &self,
        build: u64,
        subjob: u32,
        atom: u32,
    ) -> Result<ConsoleLocation, Status> {
        Ok(self
            .handle
            .console(AtomRef::new(build, subjob, atom))
            .await?)
    }
}

fn is_final(b: &proto::Build) -> bool {
    matches!(
        proto::BuildState::try_from(b.state),
        Ok(proto::BuildState::Finished | proto::BuildState::Error | proto::BuildState::Canceled)
    )
}

/// Cluster operations.
#[derive(Debug, Clone)]
pub struct ClusterService {
    handle: MasterHandle,
}

impl ClusterService {
    /// A service over the core behind `handle`.
    pub fn new(handle: MasterHandle) -> Self {
        Self { handle }
    }
}

#[tonic::async_trait]
impl proto::cluster_server::Cluster for ClusterService {
    async fn list_slaves(
        &self,
        _request: Request<proto::ListSlavesRequest>,
    ) -> Result<Response<proto::ListSlavesResponse>, Status> {
        Ok(Response::new(self.handle.list_slaves().await?))
    }

    async fn drain_slaves(
        &self,
        request: Request<proto::DrainSlavesRequest>,
    ) -> Result<Response<proto::DrainSlavesResponse>, Status> {
        let q = request.into_inner();
        let ids = q.slave_ids.into_iter().map(SlaveId).collect();
        let slave_ids = self
            .handle
            .drain(ids, q.all)
            .await?
            .into_iter()
            .map(|s| s.0)
            .collect();
        Ok(Response::new(proto::DrainSlavesResponse { slave_ids }))
    }

    async fn list_events(
        &self,
        request: Request<proto::ListEventsRequest>,
    ) -> Result<Response<proto::ListEventsResponse>, Status> {
        let q = request.into_inner();
        let events = self
            .handle
            .list_events(q.since_id, q.since_timestamp)
            .await?;
        Ok(Response::new(proto::ListEventsResponse { events }))
    }

    async fn metrics(
        &self,
        _request: Request<proto::MetricsRequest>,
    ) -> Result<Response<proto::MetricsResponse>, Status> {
        let text = self.handle.metrics().await?;
        Ok(Response::new(proto::MetricsResponse { text }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(listed: &[(&str, u64)], written: &[(&str, u64)]) -> KeptManifest {
        KeptManifest {
            manifest: Some(serde_json::to_vec(listed).unwrap()),
            written: written.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
        }
    }

    /// A whole upload leaves no manifest file (and removes one an interrupted upload of the same
    /// attempt left); one that is not whole keeps it, for promotion to drop the cut files.
    #[tokio::test]
    async fn a_manifest_is_a_file_only_when_the_upload_is_not_whole() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("artifact_0_0");
        let file = at.join(results::UPLOAD_MANIFEST);
        let listed = [("a.txt", 3), ("clusterrunner_console_output", 0)];

        kept(&listed, &[("a.txt", 2)]).settle(&at, true).await;
        assert!(file.exists(), "a file came short");
        kept(
            &listed,
            &[("a.txt", 3), ("clusterrunner_console_output", 0)],
        )
        .settle(&at, false)
        .await;
        assert!(file.exists(), "the upload ended in an error");
        kept(
            &listed,
            &[("a.txt", 3), ("clusterrunner_console_output", 0)],
        )
        .settle(&at, true)
        .await;
        assert!(
            !file.exists(),
            "whole: no manifest, and the stale one is gone"
        );
        KeptManifest::default().settle(&at, false).await;
        assert!(!file.exists(), "no manifest sent: nothing to keep");
    }
}
