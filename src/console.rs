//! Console output paging (spec §11.3).
//!
//! An atom's console output may still be growing while it is read, so only
//! `\n`-terminated lines are treated as complete; a trailing partial line is
//! "still being written". The semantics, including the way a partial line is
//! counted in `total_num_lines`, follow ClusterRunner's `ConsoleOutput`
//! exactly because clients page through output using those numbers.
//!
//! Pages are read from a seekable source (the console file) in fixed-size chunks: a console can
//! be hundreds of megabytes and most requests want 50 lines of it, so memory is one chunk plus
//! the page, never the whole output. A tail read scans forward once to count lines, then back
//! from the end only as far as the page goes.

use std::io::{Read, Seek, SeekFrom};

/// Default page size when a request gives no `max_lines`.
pub const DEFAULT_MAX_LINES: u64 = 50;

/// Most bytes of console text one page may hold. Beyond it the caller asks for fewer lines or
/// streams the console: a page is one message and lives in memory while it is answered.
pub const MAX_PAGE_BYTES: u64 = 8 << 20;

/// Bytes read at a time while scanning.
const CHUNK: usize = 64 << 10;

/// One page of an atom's console output, as returned by the console endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsolePage {
    /// Index of the first returned line (the requested offset when one was given).
    pub offset_line: u64,
    /// Number of lines in `content`.
    pub num_lines: u64,
    /// Number of lines in the whole output; see [`page`] for how a trailing
    /// partial line is counted.
    pub total_num_lines: u64,
    /// The returned lines, each with its `\n`, UTF-8 decoded with replacement.
    pub content: String,
}

/// Why a console page could not be produced.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConsoleError {
    /// `offset_line` lies beyond the end of the output. The message is the
    /// original ClusterRunner one, which clients may display verbatim.
    #[error("offset {offset_line} is higher than the total number of lines: {total_lines}")]
    OffsetPastEnd {
        /// The requested offset.
        offset_line: u64,
        /// Number of lines (a trailing partial line included) in the output.
        total_lines: u64,
    },
    /// `max_lines` was 0, which can never return anything useful.
    #[error("max_lines must be a positive integer")]
    BadMaxLines,
    /// The page would hold more than one answer may carry.
    #[error(
        "the page would hold more than {max_bytes} bytes of console: ask for fewer lines \
         (max_lines, with offset_line to go on), or stream the whole console (TailConsole)"
    )]
    PageTooLarge {
        /// The limit that was hit.
        max_bytes: u64,
    },
}

/// Returns a page of `data` (the full console output bytes), without a size limit.
///
/// * `offset_line == None` (tail mode): the last `max_lines` complete lines;
///   `offset_line` of the page is the index of the first returned line and
///   `total_num_lines` counts complete lines only (a trailing partial line is
///   ignored entirely).
/// * `offset_line == Some(o)`: skips `o` lines (a trailing partial line counts
///   as a line while skipping), failing with [`ConsoleError::OffsetPastEnd`]
///   if the output ends first; then returns up to `max_lines` complete lines,
///   stopping early at a partial line. `total_num_lines` = lines skipped +
///   lines returned + all lines after the page, where the trailing partial line
///   is counted only if the page stopped because `max_lines` was reached.
///
/// `max_lines == 0` is rejected with [`ConsoleError::BadMaxLines`].
pub fn page(
    data: &[u8],
    max_lines: u64,
    offset_line: Option<u64>,
) -> Result<ConsolePage, ConsoleError> {
    let source = std::io::Cursor::new(data);
    page_from(source, data.len() as u64, max_lines, offset_line, u64::MAX)
        .expect("reading memory cannot fail")
}

/// [`page`] over the first `len` bytes of a seekable source (a console file, of which `len` is
/// the size when it was opened: a live console may grow meanwhile). A page of more than
/// `max_bytes` is [`ConsoleError::PageTooLarge`]. Memory: one chunk and the page.
pub fn page_from<R: Read + Seek>(
    source: R,
    len: u64,
    max_lines: u64,
    offset_line: Option<u64>,
    max_bytes: u64,
) -> std::io::Result<Result<ConsolePage, ConsoleError>> {
    page_in_chunks(source, len, max_lines, offset_line, max_bytes, CHUNK)
}

/// [`page_from`] with the chunk size as a parameter, so tests cross chunk boundaries often.
pub(crate) fn page_in_chunks<R: Read + Seek>(
    source: R,
    len: u64,
    max_lines: u64,
    offset_line: Option<u64>,
    max_bytes: u64,
    chunk: usize,
) -> std::io::Result<Result<ConsolePage, ConsoleError>> {
    if max_lines == 0 {
        return Ok(Err(ConsoleError::BadMaxLines));
    }
    let mut src = Source {
        r: source,
        len,
        buf: vec![0; chunk.max(1)],
    };
    match offset_line {
        None => tail(&mut src, max_lines, max_bytes),
        Some(offset) => from_offset(&mut src, max_lines, offset, max_bytes),
    }
}

fn tail<R: Read + Seek>(
    src: &mut Source<R>,
    max_lines: u64,
    max_bytes: u64,
) -> std::io::Result<Result<ConsolePage, ConsoleError>> {
    let mut total = 0_u64;
    let mut last_newline = None;
    src.forward(0, |nl| {
        total += 1;
        last_newline = Some(nl);
        true
    })?;
    let Some(last) = last_newline else {
        return Ok(Ok(ConsolePage {
            offset_line: 0,
            num_lines: 0,
            total_num_lines: 0,
            content: String::new(),
        }));
    };
    let wanted = total.min(max_lines);
    let end = last + 1;
    // Back from the last line's '\n' over the other wanted - 1 line ends: the next '\n' before
    // them ends the line before the page.
    let mut seen = 0_u64;
    let mut too_large = false;
    let before = src.backward(last, |nl| {
        if end - (nl + 1) > max_bytes {
            too_large = true;
            return false;
        }
        seen += 1;
        seen < wanted
    })?;
    let start = match before {
        Some(nl) if !too_large => nl + 1,
        _ => 0,
    };
    if too_large || end - start > max_bytes {
        return Ok(Err(ConsoleError::PageTooLarge { max_bytes }));
    }
    Ok(Ok(ConsolePage {
        offset_line: total - wanted,
        num_lines: wanted,
        total_num_lines: total,
        content: decode(src.read(start, end)?),
    }))
}

fn from_offset<R: Read + Seek>(
    src: &mut Source<R>,
    max_lines: u64,
    offset: u64,
    max_bytes: u64,
) -> std::io::Result<Result<ConsolePage, ConsoleError>> {
    // Skip `offset` lines, each up to its '\n' (a trailing partial line counts as one).
    let start = if offset == 0 {
        0
    } else {
        let mut skipped = 0_u64;
        match src.forward(0, |_| {
            skipped += 1;
            skipped < offset
        })? {
            Some(nl) => nl + 1,
            None => {
                let ends_partial = src.len > 0 && !src.ends_with_newline()?;
                let available = skipped + u64::from(ends_partial);
                if offset > available {
                    return Ok(Err(ConsoleError::OffsetPastEnd {
                        offset_line: offset,
                        total_lines: available,
                    }));
                }
                src.len
            }
        }
    };

    // Up to max_lines complete lines; the page stops early at a partial line.
    let mut num_lines = 0_u64;
    let mut end = start;
    let mut hit_max = num_lines == max_lines;
    if !hit_max {
        src.forward(start, |nl| {
            num_lines += 1;
            end = nl + 1;
            hit_max = num_lines == max_lines;
            !hit_max && end - start <= max_bytes
        })?;
    }
    if end - start > max_bytes {
        return Ok(Err(ConsoleError::PageTooLarge { max_bytes }));
    }

    // The original keeps counting with readline() only after a full page; if it stopped at a
    // partial line, that line was already consumed and is not counted.
    let after = if hit_max {
        let mut newlines = 0_u64;
        src.forward(end, |_| {
            newlines += 1;
            true
        })?;
        let partial = src.len > end && !src.ends_with_newline()?;
        newlines + u64::from(partial)
    } else {
        0
    };
    Ok(Ok(ConsolePage {
        offset_line: offset,
        num_lines,
        total_num_lines: offset + num_lines + after,
        content: decode(src.read(start, end)?),
    }))
}

/// The first `len` bytes of a seekable source, scanned one chunk at a time.
struct Source<R> {
    r: R,
    len: u64,
    buf: Vec<u8>,
}

impl<R: Read + Seek> Source<R> {
    /// Reads `n` bytes at `pos` into the buffer's front.
    fn fill(&mut self, pos: u64, n: usize) -> std::io::Result<&[u8]> {
        self.r.seek(SeekFrom::Start(pos))?;
        self.r.read_exact(&mut self.buf[..n])?;
        Ok(&self.buf[..n])
    }

    /// Calls `on_newline` with the position of each '\n' from `from` on, in order, until it
    /// returns false; returns that newline's position, or None at the end.
    fn forward(
        &mut self,
        from: u64,
        mut on_newline: impl FnMut(u64) -> bool,
    ) -> std::io::Result<Option<u64>> {
        let mut pos = from;
        while pos < self.len {
            let n = (self.len - pos).min(self.buf.len() as u64) as usize;
            let chunk = self.fill(pos, n)?;
            for i in memchr::memchr_iter(b'\n', chunk) {
                let nl = pos + i as u64;
                if !on_newline(nl) {
                    return Ok(Some(nl));
                }
            }
            pos += n as u64;
        }
        Ok(None)
    }

    /// Like [`Source::forward`], toward the start, over the '\n's before `before`.
    fn backward(
        &mut self,
        before: u64,
        mut on_newline: impl FnMut(u64) -> bool,
    ) -> std::io::Result<Option<u64>> {
        let mut end = before.min(self.len);
        while end > 0 {
            let n = end.min(self.buf.len() as u64) as usize;
            let pos = end - n as u64;
            let chunk = self.fill(pos, n)?;
            for i in memchr::memrchr_iter(b'\n', chunk) {
                let nl = pos + i as u64;
                if !on_newline(nl) {
                    return Ok(Some(nl));
                }
            }
            end = pos;
        }
        Ok(None)
    }

    fn ends_with_newline(&mut self) -> std::io::Result<bool> {
        Ok(self.len > 0 && self.fill(self.len - 1, 1)?[0] == b'\n')
    }

    /// The bytes in `start..end` (bounded by the caller).
    fn read(&mut self, start: u64, end: u64) -> std::io::Result<Vec<u8>> {
        let mut out = vec![0; (end - start) as usize];
        self.r.seek(SeekFrom::Start(start))?;
        self.r.read_exact(&mut out)?;
        Ok(out)
    }
}

/// UTF-8 with replacement, without a copy when the bytes are valid.
fn decode(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ten_lines() -> Vec<u8> {
        (0..10)
            .map(|i| format!("line_{i}\n"))
            .collect::<String>()
            .into_bytes()
    }

    /// Nine complete lines plus `line_9` still being written.
    fn nine_lines_and_partial() -> Vec<u8> {
        let mut data = ten_lines();
        data.pop();
        data
    }

    fn lines(range: std::ops::Range<u32>) -> String {
        range.map(|i| format!("line_{i}\n")).collect()
    }

    fn ok(data: &[u8], max: u64, off: Option<u64>) -> ConsolePage {
        page(data, max, off).expect("page should succeed")
    }

    #[test]
    fn offset_zero_max_five() {
        let p = ok(&ten_lines(), 5, Some(0));
        assert_eq!(
            p,
            ConsolePage {
                offset_line: 0,
                num_lines: 5,
                total_num_lines: 10,
                content: lines(0..5),
            }
        );
    }

    #[test]
    fn offset_four_max_three() {
        let p = ok(&ten_lines(), 3, Some(4));
        assert_eq!(p.content, "line_4\nline_5\nline_6\n");
        assert_eq!(p.num_lines, 3);
        assert_eq!(p.offset_line, 4);
        assert_eq!(p.total_num_lines, 10);
    }

    #[test]
    fn offset_seven_max_five_returns_rest() {
        let p = ok(&ten_lines(), 5, Some(7));
        assert_eq!(p.num_lines, 3);
        assert_eq!(p.offset_line, 7);
        assert_eq!(p.total_num_lines, 10);
        assert_eq!(p.content, lines(7..10));
    }

    #[test]
    fn tail_five() {
        let p = ok(&ten_lines(), 5, None);
        assert_eq!(
            p,
            ConsolePage {
                offset_line: 5,
                num_lines: 5,
                total_num_lines: 10,
                content: lines(5..10),
            }
        );
    }

    #[test]
    fn tail_one() {
        let p = ok(&ten_lines(), 1, None);
        assert_eq!(p.offset_line, 9);
        assert_eq!(p.num_lines, 1);
        assert_eq!(p.total_num_lines, 10);
        assert_eq!(p.content, "line_9\n");
    }

    #[test]
    fn tail_more_than_available() {
        let p = ok(&ten_lines(), 200, None);
        assert_eq!(p.offset_line, 0);
        assert_eq!(p.num_lines, 10);
        assert_eq!(p.total_num_lines, 10);
        assert_eq!(p.content, lines(0..10));
    }

    #[test]
    fn partial_offset_five_max_fifteen() {
        let p = ok(&nine_lines_and_partial(), 15, Some(5));
        assert_eq!(p.num_lines, 4);
        assert_eq!(p.offset_line, 5);
        assert_eq!(p.total_num_lines, 9);
        assert_eq!(p.content, lines(5..9));
    }

    #[test]
    fn partial_tail_fifteen() {
        let p = ok(&nine_lines_and_partial(), 15, None);
        assert_eq!(p.num_lines, 9);
        assert_eq!(p.offset_line, 0);
        assert_eq!(p.total_num_lines, 9);
        assert_eq!(p.content, lines(0..9));
    }

    #[test]
    fn partial_tail_four() {
        let p = ok(&nine_lines_and_partial(), 4, None);
        assert_eq!(p.num_lines, 4);
        assert_eq!(p.offset_line, 5);
        assert_eq!(p.total_num_lines, 9);
        assert_eq!(p.content, lines(5..9));
    }

    #[test]
    fn partial_line_counted_only_when_page_is_full() {
        // Page stops because of max_lines: the unfinished line_9 is counted.
        let p = ok(&nine_lines_and_partial(), 2, Some(5));
        assert_eq!(p.num_lines, 2);
        assert_eq!(p.total_num_lines, 10);
        assert_eq!(p.content, "line_5\nline_6\n");
    }

    #[test]
    fn offset_past_end_is_an_error() {
        let err = page(&ten_lines(), 5, Some(155)).expect_err("offset past end");
        assert_eq!(
            err,
            ConsoleError::OffsetPastEnd {
                offset_line: 155,
                total_lines: 10
            }
        );
        assert_eq!(
            err.to_string(),
            "offset 155 is higher than the total number of lines: 10"
        );
    }

    #[test]
    fn offset_at_end_is_an_empty_page() {
        let p = ok(&ten_lines(), 5, Some(10));
        assert_eq!(p.num_lines, 0);
        assert_eq!(p.total_num_lines, 10);
        assert_eq!(p.content, "");
        assert!(page(&ten_lines(), 5, Some(11)).is_err());
    }

    #[test]
    fn zero_max_lines_is_rejected() {
        assert_eq!(page(&ten_lines(), 0, None), Err(ConsoleError::BadMaxLines));
        assert_eq!(
            page(&ten_lines(), 0, Some(1)),
            Err(ConsoleError::BadMaxLines)
        );
    }

    #[test]
    fn empty_and_partial_only_output() {
        let p = ok(b"", DEFAULT_MAX_LINES, None);
        assert_eq!((p.offset_line, p.num_lines, p.total_num_lines), (0, 0, 0));
        assert_eq!(p.content, "");

        let p = ok(b"still writing", DEFAULT_MAX_LINES, None);
        assert_eq!((p.offset_line, p.num_lines, p.total_num_lines), (0, 0, 0));

        let p = ok(b"still writing", DEFAULT_MAX_LINES, Some(0));
        assert_eq!((p.num_lines, p.total_num_lines), (0, 0));
        assert_eq!(p.content, "");
    }

    #[test]
    fn empty_lines_are_lines() {
        let p = ok(b"\n\n\n", 2, None);
        assert_eq!((p.offset_line, p.num_lines, p.total_num_lines), (1, 2, 3));
        assert_eq!(p.content, "\n\n");
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let p = ok(b"ok\n\xff\xfebad\n", 10, None);
        assert_eq!(p.content, "ok\n\u{fffd}\u{fffd}bad\n");
    }

    #[test]
    fn large_output_tail_and_offset() {
        let n = 200_000_u32;
        let data: Vec<u8> = (0..n)
            .map(|i| format!("line_{i}\n"))
            .collect::<String>()
            .into_bytes();
        let p = ok(&data, 3, None);
        assert_eq!(p.offset_line, u64::from(n) - 3);
        assert_eq!(p.total_num_lines, u64::from(n));
        assert_eq!(p.content, lines(n - 3..n));

        let p = ok(&data, 2, Some(150_000));
        assert_eq!(p.content, lines(150_000..150_002));
        assert_eq!(p.total_num_lines, u64::from(n));
    }
}
