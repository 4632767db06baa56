//! Streaming ZIP writer whose memory does not grow with the number of entries.
//!
//! `zip::ZipWriter` keeps every entry's metadata (~250 bytes) until `finish`: 146 MB for a
//! 600k-entry `results.zip`. Here each central directory record goes to a scratch file as soon
//! as its entry is written and is copied behind the entries at the end, so the writer holds only
//! counters and a few reusable buffers (about twice [`SMALL_MAX`] at most).
//!
//! Format choices (APPNOTE 6.3):
//! - Every entry is a Unix regular file dated 1980-01-01 00:00:00, so the same inputs always
//!   give the same bytes.
//! - Non-empty entries are deflated; empty ones are stored, as Info-ZIP and Python do, since a
//!   deflate stream of nothing is two bytes of pure overhead.
//! - `out` cannot seek back, so entries up to [`SMALL_MAX`] are buffered to put the real CRC and
//!   sizes in the local header; larger ones are streamed and followed by a data descriptor.
//! - The UTF-8 flag (bit 11) is set only for names that are valid non-ASCII UTF-8. ASCII names
//!   read the same either way, and other bytes are written as given (readers fall back to
//!   CP437) rather than refused, because the name is the caller's business.
//! - Zip64 is used only where a field would overflow, so ordinary archives stay readable by
//!   tools without zip64 support.

use flate2::{Compress, Compression, Crc, FlushCompress, Status};
use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};

/// Largest entry buffered whole; bigger ones are streamed with a data descriptor. Most result
/// files are tiny, and buffering lets their local header carry the real sizes, which streaming
/// readers and repair tools prefer.
const SMALL_MAX: u64 = 1 << 20;
/// Entries up to this size are stored without trying deflate: it cannot shrink them (its block
/// headers outweigh any saving), and each attempt resets the compressor's tables — the bulk of
/// the cost of an archive of many small bookkeeping files.
const STORE_MAX: usize = 64;

/// Read and deflate chunk size for streamed entries.
const CHUNK: usize = 64 << 10;

/// Entries at least this long get zip64 sizes in their local header. The compressed size is
/// only known afterwards and deflate can expand incompressible input slightly (well under
/// 0.1%), so the margin below 4 GiB guarantees a 32-bit entry never overflows.
const ZIP64_LEN_THRESHOLD: u64 = SENTINEL_32 - (SENTINEL_32 >> 8);

/// Value of a 32-bit field that means "see the zip64 record"; a real value this large must
/// therefore go to zip64 as well.
const SENTINEL_32: u64 = 0xFFFF_FFFF;

/// Same as [`SENTINEL_32`] for the 16-bit entry counts of the end record.
const SENTINEL_16: u64 = 0xFFFF;

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const DESCRIPTOR_SIG: u32 = 0x0807_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;

/// 1980-01-01, the DOS epoch: a fixed time keeps archives reproducible.
const DOS_DATE: u16 = 0x0021;
const DOS_TIME: u16 = 0;

const VERSION_DEFAULT: u16 = 20;
const VERSION_ZIP64: u16 = 45;
/// High byte of "version made by": Unix, so readers honour the permission bits.
const HOST_UNIX: u16 = 3 << 8;

const FLAG_DESCRIPTOR: u16 = 1 << 3;
const FLAG_UTF8: u16 = 1 << 11;

const METHOD_STORED: u16 = 0;
const METHOD_DEFLATE: u16 = 8;

const ZIP64_EXTRA_ID: u16 = 0x0001;
const S_IFREG: u32 = 0o100_000;

/// Writes a ZIP archive entry by entry to a non-seekable `W`, in constant memory.
///
/// After any error the archive is incomplete: later calls fail too and the output must be
/// discarded.
pub struct ZipStream<W: Write, S: Read + Write + Seek = File> {
    out: Counted<W>,
    /// Central directory records, in entry order, until `finish` copies them to `out`.
    spill: BufWriter<S>,
    spill_len: u64,
    entries: u64,
    /// One deflate state for all entries: allocating it per entry would dominate the cost of
    /// the typical 2-50 byte entry.
    deflate: Compress,
    input: Vec<u8>,
    output: Vec<u8>,
    record: Vec<u8>,
    zip64_threshold: u64,
    failed: bool,
}

/// What the central directory needs to know about one written entry.
#[derive(Debug, Clone, Copy)]
struct Entry {
    crc: u32,
    compressed: u64,
    uncompressed: u64,
    offset: u64,
    method: u16,
    flags: u16,
    /// Sizes live in a zip64 extra field, in the local header and the central record alike.
    zip64_sizes: bool,
    mode: u32,
}

impl Entry {
    fn version_needed(&self) -> u16 {
        if self.zip64_sizes || self.offset >= SENTINEL_32 {
            VERSION_ZIP64
        } else {
            VERSION_DEFAULT
        }
    }

    fn streamed(&self) -> bool {
        self.flags & FLAG_DESCRIPTOR != 0
    }
}

impl<W: Write, S: Read + Write + Seek> ZipStream<W, S> {
    /// `out` receives the archive; `spill` is scratch space (e.g. a tempfile in the same dir,
    /// already opened read+write, empty) that holds the central directory until `finish`.
    ///
    /// `level` is the deflate level, 0-9 as in `flate2::Compression`.
    pub fn new(out: W, spill: S, level: u32) -> Self {
        Self {
            out: Counted { inner: out, pos: 0 },
            spill: BufWriter::with_capacity(CHUNK, spill),
            spill_len: 0,
            entries: 0,
            deflate: Compress::new(Compression::new(level), false),
            input: Vec::new(),
            output: Vec::new(),
            record: Vec::new(),
            zip64_threshold: ZIP64_LEN_THRESHOLD,
            failed: false,
        }
    }

    /// Lets tests exercise zip64 local headers without writing 4 GiB.
    #[cfg(test)]
    fn with_zip64_threshold(mut self, threshold: u64) -> Self {
        self.zip64_threshold = threshold;
        self
    }

    /// Adds a regular file. `len` is the exact number of bytes `data` yields (error if it yields
    /// fewer; stop reading at `len` if more).
    /// `mode` = unix permission bits (e.g. 0o644). `name` is the `/`-separated path as bytes.
    ///
    /// Bits of `mode` outside 0o7777 are ignored: the entry is always a regular file. `name`
    /// must be 1 to 65535 bytes; making it a safe relative path is up to the caller.
    pub fn add_file(
        &mut self,
        name: &[u8],
        mode: u32,
        len: u64,
        data: impl Read,
    ) -> io::Result<()> {
        self.check_usable()?;
        if name.is_empty() || name.len() > usize::from(u16::MAX) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "zip entry name must be 1 to 65535 bytes, got {}",
                    name.len()
                ),
            ));
        }
        let mut flags = 0;
        if !name.is_ascii() && std::str::from_utf8(name).is_ok() {
            flags |= FLAG_UTF8;
        }
        let entry = Entry {
            crc: 0,
            compressed: 0,
            uncompressed: 0,
            offset: self.out.pos,
            method: METHOD_DEFLATE,
            flags,
            zip64_sizes: len >= self.zip64_threshold,
            mode: mode & 0o7777,
        };
        let written = if len <= SMALL_MAX {
            self.write_buffered(name, len, data, entry)
        } else {
            self.write_streamed(name, len, data, entry)
        };
        let result = written.and_then(|entry| self.spill_central(name, &entry));
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    /// Writes the central directory (copied from the spill file), zip64 end records when needed,
    /// and the end record; returns `out`.
    ///
    /// `out` is flushed, so write errors surface here rather than when it is dropped.
    pub fn finish(self) -> io::Result<W> {
        self.check_usable()?;
        let Self {
            mut out,
            spill,
            spill_len,
            entries,
            mut record,
            ..
        } = self;
        let mut spill = spill.into_inner().map_err(io::IntoInnerError::into_error)?;
        spill.seek(SeekFrom::Start(0))?;
        let cd_offset = out.pos;
        let copied = io::copy(&mut spill.take(spill_len), &mut out)?;
        if copied != spill_len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("zip spill file holds {copied} bytes, expected {spill_len}"),
            ));
        }
        record.clear();
        end_records(&mut record, entries, cd_offset, spill_len);
        out.write_all(&record)?;
        out.flush()?;
        Ok(out.inner)
    }

    fn check_usable(&self) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::other(
                "zip stream failed earlier; the archive is incomplete",
            ));
        }
        Ok(())
    }

    fn write_buffered(
        &mut self,
        name: &[u8],
        len: u64,
        data: impl Read,
        mut entry: Entry,
    ) -> io::Result<Entry> {
        self.input.clear();
        // Exact capacity up front keeps `read_to_end` from doubling past `len`.
        self.input.reserve(usize::try_from(len).unwrap_or(0));
        data.take(len).read_to_end(&mut self.input)?;
        let got = self.input.len() as u64;
        if got < len {
            return Err(short_read(name, len, got));
        }
        let mut crc = Crc::new();
        crc.update(&self.input);
        // Stored when deflate cannot help (as Info-ZIP does): tiny entries without trying,
        // others when their deflated form is no smaller.
        let body: &[u8] = if self.input.len() <= STORE_MAX {
            entry.method = METHOD_STORED;
            &self.input
        } else {
            deflate_whole(&mut self.deflate, &self.input, &mut self.output)?;
            if self.output.len() < self.input.len() {
                &self.output
            } else {
                entry.method = METHOD_STORED;
                &self.input
            }
        };
        entry.crc = crc.sum();
        entry.uncompressed = len;
        entry.compressed = body.len() as u64;
        check_fits(name, &entry)?;
        local_header(&mut self.record, name, &entry);
        self.out.write_all(&self.record)?;
        self.out.write_all(body).map(|()| entry)
    }

    fn write_streamed(
        &mut self,
        name: &[u8],
        len: u64,
        data: impl Read,
        mut entry: Entry,
    ) -> io::Result<Entry> {
        entry.flags |= FLAG_DESCRIPTOR;
        local_header(&mut self.record, name, &entry);
        self.out.write_all(&self.record)?;
        let data_start = self.out.pos;
        self.deflate.reset();
        self.input.clear();
        self.input.resize(CHUNK, 0);
        self.output.clear();
        self.output.resize(CHUNK, 0);
        let mut reader = data.take(len);
        let mut crc = Crc::new();
        let mut got: u64 = 0;
        loop {
            let n = match reader.read(&mut self.input) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let chunk = &self.input[..n];
            crc.update(chunk);
            got += n as u64;
            deflate_chunk(
                &mut self.deflate,
                chunk,
                false,
                &mut self.output,
                &mut self.out,
            )?;
        }
        if got < len {
            return Err(short_read(name, len, got));
        }
        deflate_chunk(
            &mut self.deflate,
            &[],
            true,
            &mut self.output,
            &mut self.out,
        )?;
        entry.crc = crc.sum();
        entry.uncompressed = got;
        entry.compressed = self.out.pos - data_start;
        check_fits(name, &entry)?;
        self.record.clear();
        put32(&mut self.record, DESCRIPTOR_SIG);
        put32(&mut self.record, entry.crc);
        if entry.zip64_sizes {
            put64(&mut self.record, entry.compressed);
            put64(&mut self.record, entry.uncompressed);
        } else {
            put32(&mut self.record, low32(entry.compressed));
            put32(&mut self.record, low32(entry.uncompressed));
        }
        self.out.write_all(&self.record).map(|()| entry)
    }

    fn spill_central(&mut self, name: &[u8], entry: &Entry) -> io::Result<()> {
        central_record(&mut self.record, name, entry);
        self.spill.write_all(&self.record)?;
        self.spill_len += self.record.len() as u64;
        self.entries += 1;
        Ok(())
    }
}

impl<W: Write, S: Read + Write + Seek> fmt::Debug for ZipStream<W, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZipStream")
            .field("entries", &self.entries)
            .field("offset", &self.out.pos)
            .field("central_directory_len", &self.spill_len)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// `out` wrapper that knows its position, since entry offsets cannot be asked of a
/// non-seekable writer.
struct Counted<W> {
    inner: W,
    pos: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn short_read(name: &[u8], len: u64, got: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!(
            "zip entry {}: expected {len} bytes, source ended after {got}",
            String::from_utf8_lossy(name)
        ),
    )
}

/// Refuses to write an entry whose sizes overflow the 32-bit fields it was promised: the
/// local header is already out, so the archive could not be repaired afterwards anyway.
fn check_fits(name: &[u8], entry: &Entry) -> io::Result<()> {
    if !entry.zip64_sizes && (entry.compressed >= SENTINEL_32 || entry.uncompressed >= SENTINEL_32)
    {
        return Err(io::Error::other(format!(
            "zip entry {}: sizes exceed 4 GiB without zip64",
            String::from_utf8_lossy(name)
        )));
    }
    Ok(())
}

/// Deflates all of `input` into `output` in one go.
fn deflate_whole(deflate: &mut Compress, input: &[u8], output: &mut Vec<u8>) -> io::Result<()> {
    deflate.reset();
    output.clear();
    // Room for deflate's worst-case expansion, so one call nearly always suffices.
    output.reserve(input.len() + input.len() / 1024 + 64);
    let mut consumed = 0;
    loop {
        let before = deflate.total_in();
        let status = deflate.compress_vec(&input[consumed..], output, FlushCompress::Finish)?;
        consumed += (deflate.total_in() - before) as usize;
        if status == Status::StreamEnd {
            return Ok(());
        }
        output.reserve(output.capacity().max(64));
    }
}

/// Feeds `input` through `deflate`, writing whatever it emits to `out` via `buf`. With
/// `finish`, also drains the compressor and ends the stream.
fn deflate_chunk(
    deflate: &mut Compress,
    mut input: &[u8],
    finish: bool,
    buf: &mut [u8],
    out: &mut impl Write,
) -> io::Result<()> {
    let flush = if finish {
        FlushCompress::Finish
    } else {
        FlushCompress::None
    };
    loop {
        let (in_before, out_before) = (deflate.total_in(), deflate.total_out());
        let status = deflate.compress(input, buf, flush)?;
        let used = (deflate.total_in() - in_before) as usize;
        let produced = (deflate.total_out() - out_before) as usize;
        input = &input[used..];
        out.write_all(&buf[..produced])?;
        let done = if finish {
            status == Status::StreamEnd
        } else {
            input.is_empty()
        };
        if done {
            return Ok(());
        }
        if used == 0 && produced == 0 {
            return Err(io::Error::other("deflate made no progress"));
        }
    }
}

/// Local file header. A streamed entry has its CRC and sizes zeroed (they follow in the data
/// descriptor); with zip64 the 32-bit sizes are the sentinel and the extra field holds the
/// real (or, streamed, zero) values, as APPNOTE 4.5.3 requires both sizes there.
fn local_header(buf: &mut Vec<u8>, name: &[u8], entry: &Entry) {
    let streamed = entry.streamed();
    let (crc, compressed, uncompressed) = if streamed {
        (0, 0, 0)
    } else {
        (entry.crc, entry.compressed, entry.uncompressed)
    };
    buf.clear();
    put32(buf, LOCAL_SIG);
    put16(buf, entry.version_needed());
    put16(buf, entry.flags);
    put16(buf, entry.method);
    put16(buf, DOS_TIME);
    put16(buf, DOS_DATE);
    put32(buf, crc);
    if entry.zip64_sizes {
        put32(buf, low32(SENTINEL_32));
        put32(buf, low32(SENTINEL_32));
    } else {
        put32(buf, low32(compressed));
        put32(buf, low32(uncompressed));
    }
    put16(buf, name.len() as u16);
    put16(buf, if entry.zip64_sizes { 20 } else { 0 });
    buf.extend_from_slice(name);
    if entry.zip64_sizes {
        put16(buf, ZIP64_EXTRA_ID);
        put16(buf, 16);
        put64(buf, uncompressed);
        put64(buf, compressed);
    }
}

/// Central directory record. The zip64 extra field holds, in APPNOTE order, exactly the
/// values whose 32-bit field is the sentinel.
fn central_record(buf: &mut Vec<u8>, name: &[u8], entry: &Entry) {
    let big_offset = entry.offset >= SENTINEL_32;
    let mut zip64 = [0_u64; 3];
    let mut zip64_len = 0;
    if entry.zip64_sizes {
        zip64[0] = entry.uncompressed;
        zip64[1] = entry.compressed;
        zip64_len = 2;
    }
    if big_offset {
        zip64[zip64_len] = entry.offset;
        zip64_len += 1;
    }
    let sized = |value: u64| {
        if entry.zip64_sizes {
            low32(SENTINEL_32)
        } else {
            low32(value)
        }
    };
    let version = entry.version_needed();
    buf.clear();
    put32(buf, CENTRAL_SIG);
    put16(buf, HOST_UNIX | version);
    put16(buf, version);
    put16(buf, entry.flags);
    put16(buf, entry.method);
    put16(buf, DOS_TIME);
    put16(buf, DOS_DATE);
    put32(buf, entry.crc);
    put32(buf, sized(entry.compressed));
    put32(buf, sized(entry.uncompressed));
    put16(buf, name.len() as u16);
    let extra_len = if zip64_len == 0 {
        0
    } else {
        4 + 8 * zip64_len as u16
    };
    put16(buf, extra_len);
    put16(buf, 0); // comment length
    put16(buf, 0); // disk number start
    put16(buf, 0); // internal attributes
    put32(buf, (S_IFREG | entry.mode) << 16);
    put32(buf, low32(entry.offset.min(SENTINEL_32)));
    buf.extend_from_slice(name);
    if zip64_len > 0 {
        put16(buf, ZIP64_EXTRA_ID);
        put16(buf, 8 * zip64_len as u16);
        for value in &zip64[..zip64_len] {
            put64(buf, *value);
        }
    }
}

/// Zip64 end record and locator when a count, size or offset overflows the classic end
/// record, then the classic end record with each overflowing field set to its sentinel.
/// A count of exactly 0xFFFF already needs zip64, as the sentinel itself is ambiguous.
fn end_records(buf: &mut Vec<u8>, entries: u64, cd_offset: u64, cd_size: u64) {
    let zip64 = entries >= SENTINEL_16 || cd_offset >= SENTINEL_32 || cd_size >= SENTINEL_32;
    if zip64 {
        let zip64_eocd_offset = cd_offset + cd_size;
        put32(buf, ZIP64_EOCD_SIG);
        put64(buf, 44); // size of the rest of this record
        put16(buf, HOST_UNIX | VERSION_ZIP64);
        put16(buf, VERSION_ZIP64);
        put32(buf, 0); // this disk
        put32(buf, 0); // disk with the central directory
        put64(buf, entries);
        put64(buf, entries);
        put64(buf, cd_size);
        put64(buf, cd_offset);
        put32(buf, ZIP64_LOCATOR_SIG);
        put32(buf, 0); // disk with the zip64 end record
        put64(buf, zip64_eocd_offset);
        put32(buf, 1); // total disks
    }
    let count = entries.min(SENTINEL_16) as u16;
    put32(buf, EOCD_SIG);
    put16(buf, 0); // this disk
    put16(buf, 0); // disk with the central directory
    put16(buf, count);
    put16(buf, count);
    put32(buf, low32(cd_size.min(SENTINEL_32)));
    put32(buf, low32(cd_offset.min(SENTINEL_32)));
    put16(buf, 0); // comment length
}

/// Callers only pass values already checked or clamped to fit.
fn low32(value: u64) -> u32 {
    value as u32
}

fn put16(buf: &mut Vec<u8>, value: u16) {
    buf.extend_from_slice(&value.to_le_bytes());
}

fn put32(buf: &mut Vec<u8>, value: u32) {
    buf.extend_from_slice(&value.to_le_bytes());
}

fn put64(buf: &mut Vec<u8>, value: u64) {
    buf.extend_from_slice(&value.to_le_bytes());
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;
    use std::path::Path;

    const LEVEL: u32 = 6;

    /// Deterministic bytes that deflate cannot shrink, to exercise stored blocks.
    fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8
            })
            .collect()
    }

    fn binary() -> Vec<u8> {
        (0..=255_u8).chain((0..=255_u8).rev()).collect()
    }

    /// Over [`SMALL_MAX`], half text and half noise.
    fn large() -> Vec<u8> {
        let mut data: Vec<u8> = b"line of build output\n"
            .iter()
            .copied()
            .cycle()
            .take(1_600_000)
            .collect();
        data.extend(noise(1_600_000, 7));
        data
    }

    fn sample() -> Vec<(&'static str, u32, Vec<u8>)> {
        vec![
            ("a.txt", 0o644, b"hello zip\n".to_vec()),
            ("empty", 0o600, Vec::new()),
            ("bin/data.bin", 0o755, binary()),
            ("dir/sub/deeper/big.bin", 0o640, large()),
            ("dir/sub/after_big", 0o644, b"x".to_vec()),
            ("uni/caf\u{e9}.txt", 0o644, b"utf8 name".to_vec()),
            ("noise.bin", 0o644, noise(300, 7)),
        ]
    }

    fn write_entries<W: Write>(mut zip: ZipStream<W>, entries: &[(&str, u32, Vec<u8>)]) -> W {
        for (name, mode, data) in entries {
            zip.add_file(name.as_bytes(), *mode, data.len() as u64, data.as_slice())
                .expect("add_file");
        }
        zip.finish().expect("finish")
    }

    fn write_sample() -> Vec<u8> {
        let zip = ZipStream::new(Vec::new(), tempfile::tempfile().expect("spill"), LEVEL);
        write_entries(zip, &sample())
    }

    fn many_name(i: usize) -> String {
        format!("atoms/{}/f{i}.txt", i / 1000)
    }

    fn many_content(i: usize) -> String {
        format!("{i}\n")
    }

    const MANY: usize = 70_000;

    fn write_many(path: &Path) {
        let out = io::BufWriter::new(File::create(path).expect("create"));
        let mut zip = ZipStream::new(out, tempfile::tempfile().expect("spill"), LEVEL);
        for i in 0..MANY {
            let data = many_content(i);
            zip.add_file(
                many_name(i).as_bytes(),
                0o644,
                data.len() as u64,
                data.as_bytes(),
            )
            .expect("add_file");
        }
        zip.finish()
            .expect("finish")
            .into_inner()
            .map_err(io::IntoInnerError::into_error)
            .expect("flush");
    }

    fn read_all(archive: &mut zip::ZipArchive<impl Read + Seek>, name: &str) -> Vec<u8> {
        let mut file = archive.by_name(name).expect("entry present");
        let mut data = Vec::new();
        file.read_to_end(&mut data).expect("read entry");
        data
    }

    fn u16_at(bytes: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(bytes[at..at + 2].try_into().expect("2 bytes"))
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
    }

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
    }

    /// Tiny entries are stored; larger ones deflated unless that would not make them smaller.
    pub(crate) fn assert_stored_iff_deflate_cannot_help(
        file: &zip::read::ZipFile<'_, impl Read>,
        data: &[u8],
        name: &str,
    ) {
        let len = data.len();
        match file.compression() {
            zip::CompressionMethod::Stored if len > STORE_MAX => {
                let mut deflated = Vec::new();
                deflate_whole(
                    &mut Compress::new(Compression::default(), false),
                    data,
                    &mut deflated,
                )
                .unwrap();
                assert!(
                    deflated.len() >= len,
                    "{name}: {len} bytes stored, deflate shrinks them"
                );
            }
            zip::CompressionMethod::Stored => {}
            zip::CompressionMethod::Deflated => {
                assert!(len > STORE_MAX, "{name}: {len} bytes deflated");
                assert!(
                    file.compressed_size() < len as u64,
                    "{name}: deflate grew it"
                );
            }
            other => panic!("{name}: unexpected method {other:?}"),
        }
    }

    #[test]
    fn zipstream_round_trip_preserves_names_contents_modes() {
        let bytes = write_sample();
        let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).expect("valid zip");
        let entries = sample();
        assert_eq!(archive.len(), entries.len());
        for (i, (name, mode, data)) in entries.iter().enumerate() {
            {
                let file = archive.by_index(i).expect("by index");
                assert_eq!(file.name().expect("name"), *name, "entry order");
                assert_eq!(file.unix_mode(), Some(S_IFREG | mode), "{name}");
                assert_eq!(file.last_modified(), Some(zip::DateTime::DEFAULT), "{name}");
                assert_stored_iff_deflate_cannot_help(&file, data, name);
                assert_eq!(file.size(), data.len() as u64, "{name}");
            }
            assert_eq!(&read_all(&mut archive, name), data, "{name}");
        }
    }

    #[test]
    fn zipstream_large_entry_has_data_descriptor() {
        let data = large();
        let zip = ZipStream::new(Vec::new(), tempfile::tempfile().expect("spill"), LEVEL);
        let bytes = write_entries(zip, &[("big", 0o644, data.clone())]);
        assert_eq!(u32_at(&bytes, 0), LOCAL_SIG);
        assert_eq!(u16_at(&bytes, 4), VERSION_DEFAULT);
        assert_eq!(u16_at(&bytes, 6) & FLAG_DESCRIPTOR, FLAG_DESCRIPTOR);
        assert_eq!(u32_at(&bytes, 14), 0, "CRC deferred to the descriptor");
        assert_eq!(u16_at(&bytes, 28), 0, "no zip64 extra below the threshold");
        let mut archive = zip::ZipArchive::new(Cursor::new(bytes.clone())).expect("valid zip");
        let (crc, compressed) = {
            let file = archive.by_index(0).expect("entry");
            (file.crc32(), file.compressed_size())
        };
        let at = 30 + 3 + compressed as usize;
        assert_eq!(u32_at(&bytes, at), DESCRIPTOR_SIG);
        assert_eq!(u32_at(&bytes, at + 4), crc);
        assert_eq!(u64::from(u32_at(&bytes, at + 8)), compressed);
        assert_eq!(u64::from(u32_at(&bytes, at + 12)), data.len() as u64);
        assert_eq!(u32_at(&bytes, at + 16), CENTRAL_SIG);
        assert_eq!(read_all(&mut archive, "big"), data);
    }

    #[test]
    fn zipstream_zip64_local_header_and_descriptor() {
        let data = large();
        let zip = ZipStream::new(Vec::new(), tempfile::tempfile().expect("spill"), LEVEL)
            .with_zip64_threshold(SMALL_MAX + 1);
        let bytes = write_entries(
            zip,
            &[
                ("big", 0o644, data.clone()),
                ("small", 0o644, b"s".to_vec()),
            ],
        );
        assert_eq!(u16_at(&bytes, 4), VERSION_ZIP64);
        assert_eq!(u32_at(&bytes, 18), u32::MAX);
        assert_eq!(u32_at(&bytes, 22), u32::MAX);
        assert_eq!(u16_at(&bytes, 28), 20);
        assert_eq!(u16_at(&bytes, 33), ZIP64_EXTRA_ID);
        assert_eq!(u16_at(&bytes, 35), 16);
        let mut archive = zip::ZipArchive::new(Cursor::new(bytes.clone())).expect("valid zip");
        let (crc, compressed) = {
            let file = archive.by_index(0).expect("entry");
            (file.crc32(), file.compressed_size())
        };
        let at = 30 + 3 + 20 + compressed as usize;
        assert_eq!(u32_at(&bytes, at), DESCRIPTOR_SIG);
        assert_eq!(u32_at(&bytes, at + 4), crc);
        assert_eq!(u64_at(&bytes, at + 8), compressed);
        assert_eq!(u64_at(&bytes, at + 16), data.len() as u64);
        assert_eq!(u32_at(&bytes, at + 24), LOCAL_SIG, "next entry follows");
        assert_eq!(read_all(&mut archive, "big"), data);
        assert_eq!(read_all(&mut archive, "small"), b"s");
    }

    #[test]
    fn zipstream_output_is_deterministic() {
        assert_eq!(write_sample(), write_sample());
    }

    #[test]
    fn zipstream_many_entries_use_zip64_end_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("many.zip");
        write_many(&path);
        let bytes = std::fs::read(&path).expect("read archive");
        let eocd = bytes.len() - 22;
        assert_eq!(u32_at(&bytes, eocd), EOCD_SIG);
        assert_eq!(u16_at(&bytes, eocd + 10), 0xFFFF);
        let locator = eocd - 20;
        assert_eq!(u32_at(&bytes, locator), ZIP64_LOCATOR_SIG);
        let zip64_eocd = usize::try_from(u64_at(&bytes, locator + 8)).expect("offset");
        assert_eq!(zip64_eocd, locator - 56);
        assert_eq!(u32_at(&bytes, zip64_eocd), ZIP64_EOCD_SIG);
        assert_eq!(u64_at(&bytes, zip64_eocd + 32), MANY as u64);

        let mut archive =
            zip::ZipArchive::new(io::BufReader::new(File::open(&path).expect("open")))
                .expect("valid zip");
        assert_eq!(archive.len(), MANY);
        for i in [0, 1, 12_345, 65_534, 65_535, 65_536, MANY - 1] {
            assert_eq!(
                read_all(&mut archive, &many_name(i)),
                many_content(i).as_bytes()
            );
            let file = archive.by_index(i).expect("by index");
            assert_eq!(file.name().expect("name"), many_name(i));
        }
    }

    #[test]
    fn zipstream_small_archive_has_no_zip64_end_records() {
        let bytes = write_sample();
        let eocd = bytes.len() - 22;
        assert_eq!(u32_at(&bytes, eocd), EOCD_SIG);
        assert_eq!(usize::from(u16_at(&bytes, eocd + 10)), sample().len());
        assert_ne!(u32_at(&bytes, eocd - 20), ZIP64_LOCATOR_SIG);
    }

    #[test]
    fn zipstream_short_reader_is_an_error() {
        for (len, available) in [(10, 5), (SMALL_MAX + 10, SMALL_MAX as usize)] {
            let mut zip = ZipStream::new(Vec::new(), tempfile::tempfile().expect("spill"), LEVEL);
            let data = vec![b'z'; available];
            let err = zip
                .add_file(b"short", 0o644, len, data.as_slice())
                .expect_err("short source");
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "len {len}");
            zip.add_file(b"next", 0o644, 1, &b"n"[..])
                .expect_err("poisoned after error");
            zip.finish()
                .expect_err("finish refuses an incomplete archive");
        }
    }

    #[test]
    fn zipstream_long_reader_stops_at_len() {
        let mut zip = ZipStream::new(Vec::new(), tempfile::tempfile().expect("spill"), LEVEL);
        zip.add_file(b"small", 0o644, 3, &b"abcdef"[..])
            .expect("small");
        let big = large();
        let big_len = SMALL_MAX + 5;
        zip.add_file(b"big", 0o644, big_len, big.as_slice())
            .expect("big");
        let bytes = zip.finish().expect("finish");
        let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).expect("valid zip");
        assert_eq!(read_all(&mut archive, "small"), b"abc");
        assert_eq!(read_all(&mut archive, "big"), &big[..big_len as usize]);
    }

    #[test]
    fn zipstream_rejects_bad_names() {
        let mut zip = ZipStream::new(Vec::new(), tempfile::tempfile().expect("spill"), LEVEL);
        let long = vec![b'n'; 65_536];
        for name in [&b""[..], long.as_slice()] {
            let err = zip
                .add_file(name, 0o644, 0, io::empty())
                .expect_err("bad name");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
    }

    #[test]
    fn zipstream_central_record_with_offset_past_4_gib() {
        let entry = Entry {
            crc: 0x1234_5678,
            compressed: 7,
            uncompressed: 9,
            offset: 0x1_2345_6789,
            method: METHOD_DEFLATE,
            flags: 0,
            zip64_sizes: false,
            mode: 0o644,
        };
        let mut buf = Vec::new();
        central_record(&mut buf, b"n", &entry);
        assert_eq!(buf.len(), 46 + 1 + 12);
        assert_eq!(u16_at(&buf, 4), HOST_UNIX | VERSION_ZIP64);
        assert_eq!(u16_at(&buf, 6), VERSION_ZIP64);
        assert_eq!(u32_at(&buf, 20), 7, "sizes stay in the 32-bit fields");
        assert_eq!(u32_at(&buf, 24), 9);
        assert_eq!(u16_at(&buf, 30), 12);
        assert_eq!(u32_at(&buf, 38), 0o100_644 << 16);
        assert_eq!(u32_at(&buf, 42), u32::MAX);
        assert_eq!(u16_at(&buf, 47), ZIP64_EXTRA_ID);
        assert_eq!(u16_at(&buf, 49), 8);
        assert_eq!(u64_at(&buf, 51), 0x1_2345_6789);

        let mut end = Vec::new();
        end_records(&mut end, 3, 0x1_0000_0000, 100);
        assert_eq!(end.len(), 56 + 20 + 22);
        assert_eq!(u64_at(&end, 56 + 8), 0x1_0000_0000 + 100);
        assert_eq!(
            u16_at(&end, 76 + 10),
            3,
            "count fits, so it is not a sentinel"
        );
        assert_eq!(u32_at(&end, 76 + 12), 100);
        assert_eq!(u32_at(&end, 76 + 16), u32::MAX);
    }

    #[test]
    fn zipstream_python_zipfile_accepts_archives() {
        let script = "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); \
                      assert z.testzip() is None; print(len(z.namelist()))";
        if std::process::Command::new("python3")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("python3 not found; skipping the zipfile cross-check");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let many = dir.path().join("many.zip");
        write_many(&many);
        let sample_path = dir.path().join("sample.zip");
        std::fs::write(&sample_path, write_sample()).expect("write sample");
        let zip64_path = dir.path().join("zip64.zip");
        let zip = ZipStream::new(Vec::new(), tempfile::tempfile().expect("spill"), LEVEL)
            .with_zip64_threshold(SMALL_MAX + 1);
        let zip64 = write_entries(
            zip,
            &[("big", 0o644, large()), ("small", 0o644, b"s".to_vec())],
        );
        std::fs::write(&zip64_path, zip64).expect("write zip64 sample");
        for (path, count) in [
            (&many, MANY),
            (&sample_path, sample().len()),
            (&zip64_path, 2),
        ] {
            let output = std::process::Command::new("python3")
                .args(["-c", script])
                .arg(path)
                .output()
                .expect("run python3");
            assert!(
                output.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&output.stderr)
            );
            assert_eq!(
                String::from_utf8_lossy(&output.stdout).trim(),
                count.to_string(),
                "{}",
                path.display()
            );
        }
    }
}
