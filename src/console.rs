//! Console output paging (spec §11.3).
//!
//! An atom's console output may still be growing while it is read, so only
//! `\n`-terminated lines are treated as complete; a trailing partial line is
//! "still being written". The semantics, including the way a partial line is
//! counted in `total_num_lines`, follow ClusterRunner's `ConsoleOutput`
//! exactly because clients page through output using those numbers.
//!
//! The functions work on the whole byte content but never split it into a
//! vector of lines: outputs can be hundreds of megabytes and most requests
//! want only a few lines of them.

/// Default page size when a request gives no `max_lines`.
pub const DEFAULT_MAX_LINES: u64 = 50;

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
}

/// Returns a page of `data` (the full console output bytes).
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
    if max_lines == 0 {
        return Err(ConsoleError::BadMaxLines);
    }
    match offset_line {
        None => Ok(tail(data, max_lines)),
        Some(offset) => from_offset(data, max_lines, offset),
    }
}

fn tail(data: &[u8], max_lines: u64) -> ConsolePage {
    let complete = match data.iter().rposition(|&b| b == b'\n') {
        Some(last) => &data[..=last],
        None => &data[..0],
    };
    let total = count_newlines(complete);
    let wanted = total.min(max_lines);

    // Walk back line by line from the end so the work is proportional to the
    // returned content, not to the whole output.
    let mut start = complete.len();
    for _ in 0..wanted {
        // complete[start - 1] is the '\n' ending the line we are stepping over.
        start = complete[..start - 1]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
    }

    ConsolePage {
        offset_line: total - wanted,
        num_lines: wanted,
        total_num_lines: total,
        content: decode(&complete[start..]),
    }
}

fn from_offset(data: &[u8], max_lines: u64, offset: u64) -> Result<ConsolePage, ConsoleError> {
    let mut pos = 0_usize;
    for skipped in 0..offset {
        if pos >= data.len() {
            return Err(ConsoleError::OffsetPastEnd {
                offset_line: offset,
                total_lines: skipped,
            });
        }
        pos = next_line_start(data, pos);
    }

    let start = pos;
    let mut num_lines = 0_u64;
    let mut hit_max = false;
    loop {
        if num_lines == max_lines {
            hit_max = true;
            break;
        }
        match find_newline(data, pos) {
            Some(nl) => {
                pos = nl + 1;
                num_lines += 1;
            }
            // End of data or a line still being written.
            None => break,
        }
    }
    let content = decode(&data[start..pos]);

    // The original keeps counting with readline() only after a full page; if
    // it stopped at a partial line, that line was already consumed and is not
    // counted.
    let after = if hit_max {
        count_lines(&data[pos..])
    } else {
        0
    };

    Ok(ConsolePage {
        offset_line: offset,
        num_lines,
        total_num_lines: offset + num_lines + after,
        content,
    })
}

fn find_newline(data: &[u8], from: usize) -> Option<usize> {
    data[from..]
        .iter()
        .position(|&b| b == b'\n')
        .map(|p| from + p)
}

/// Start of the line after the one starting at `from`, like one `readline()`.
fn next_line_start(data: &[u8], from: usize) -> usize {
    find_newline(data, from).map_or(data.len(), |nl| nl + 1)
}

fn count_newlines(data: &[u8]) -> u64 {
    // A plain filter/count loop vectorises well; it is the only full scan tail mode needs.
    data.iter().filter(|&&b| b == b'\n').count() as u64
}

/// Lines as `readline()` would return them: terminated ones plus a non-empty tail.
fn count_lines(data: &[u8]) -> u64 {
    let partial = u64::from(data.last().is_some_and(|&b| b != b'\n'));
    count_newlines(data) + partial
}

fn decode(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
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
