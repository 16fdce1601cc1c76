//! A strict, streaming RFC 4180 reader and the matching writer.
//!
//! Why not the `csv` crate for reading: it is deliberately lenient — `ab"c` and `"ab"c` are
//! accepted as data, and an unclosed quote silently swallows the rest of the file — while a
//! de-identification run must *report* malformed records with their line and keep the rest
//! aligned. This reader is a byte state machine that
//! - accepts LF and CRLF line ends, quoted fields with `""` escapes and embedded line breaks;
//! - flags a quote inside an unquoted field, text after a closing quote, an unterminated quote
//!   and a bare CR, and resynchronizes at the end of that line (a quote opens a quoted field
//!   only at the start of a field, so one stray quote costs one record, not the file);
//! - records field boundaries while it scans, so the worker threads only slice and unescape.
//!
//! The reader thread cuts the input into chunks of whole records (positions relative to the
//! chunk) that the workers process in parallel.

use std::io::Read;
use std::ops::Range;

use crate::error::RejectReason;

/// Target size of one chunk.
pub(crate) const CHUNK_BYTES: usize = 1 << 20;
/// Most records in one chunk.
pub(crate) const CHUNK_RECORDS: usize = 8192;
const READ_BYTES: usize = 256 << 10;

/// A field's content within the chunk (quotes excluded) and whether it holds `""` escapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FieldSpan {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) escaped: bool,
}

/// One record of a chunk: its raw bytes, first line, fields and fault.
#[derive(Debug, Clone)]
pub(crate) struct RawRecord {
    pub(crate) raw: Range<usize>,
    pub(crate) line: u64,
    pub(crate) fields: Range<usize>,
    pub(crate) fault: Option<RejectReason>,
}

/// Whole records cut from the input.
#[derive(Debug, Default)]
pub(crate) struct Chunk {
    pub(crate) data: Vec<u8>,
    pub(crate) records: Vec<RawRecord>,
    pub(crate) fields: Vec<FieldSpan>,
}

impl Chunk {
    pub(crate) fn fields_of(&self, record: &RawRecord) -> &[FieldSpan] {
        &self.fields[record.fields.clone()]
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    FieldStart,
    Unquoted,
    Quoted,
    /// A quote inside a quoted field: closing, or the first half of `""`.
    QuoteInQuoted,
}

/// Bytes that end a run of plain bytes in an unquoted field, and in a quoted one.
const UNQUOTED_SPECIAL: [bool; 256] = special(b",\"\r\n");
const QUOTED_SPECIAL: [bool; 256] = special(b"\"\n");

const fn special(bytes: &[u8]) -> [bool; 256] {
    let mut table = [false; 256];
    let mut i = 0;
    while i < bytes.len() {
        table[bytes[i] as usize] = true;
        i += 1;
    }
    table
}

/// Result of scanning one record from `buf[pos..]`.
struct Scanned {
    end: usize,
    lines: u64,
    fault: Option<RejectReason>,
}

/// Scans one record starting at `pos`, pushing its fields. `None`: the buffer ends inside the
/// record and more input is needed (fields pushed so far are removed again).
fn scan(buf: &[u8], pos: usize, eof: bool, fields: &mut Vec<FieldSpan>) -> Option<Scanned> {
    let first_field = fields.len();
    let mut state = State::FieldStart;
    let mut field_start = pos;
    let mut escaped = false;
    let mut fault: Option<RejectReason> = None;
    let mut lines = 0u64;
    let mut i = pos;
    let push = |fields: &mut Vec<FieldSpan>, start: usize, end: usize, escaped: bool| {
        fields.push(FieldSpan {
            start,
            end: end.max(start),
            escaped,
        });
    };
    loop {
        // Runs of plain bytes inside a field need no state change: skip them in a tight loop.
        let table = match state {
            State::Unquoted => Some(&UNQUOTED_SPECIAL),
            State::Quoted => Some(&QUOTED_SPECIAL),
            State::FieldStart | State::QuoteInQuoted => None,
        };
        if let Some(table) = table {
            while buf.get(i).is_some_and(|&b| !table[usize::from(b)]) {
                i += 1;
            }
        }
        let Some(&b) = buf.get(i) else {
            if !eof {
                fields.truncate(first_field);
                return None;
            }
            match state {
                State::Quoted => {
                    fault.get_or_insert(RejectReason::UnterminatedQuote);
                    push(fields, field_start, i, escaped);
                }
                State::QuoteInQuoted => push(fields, field_start, i - 1, escaped),
                State::FieldStart | State::Unquoted => push(fields, field_start, i, false),
            }
            return Some(Scanned {
                end: i,
                lines,
                fault,
            });
        };
        // A line end outside quotes: LF, or CRLF.
        let line_end = match b {
            b'\n' => Some(1),
            b'\r' if state != State::Quoted => match buf.get(i + 1) {
                Some(b'\n') => Some(2),
                Some(_) => None,
                None if !eof => {
                    fields.truncate(first_field);
                    return None;
                }
                None => Some(1),
            },
            _ => None,
        };
        match state {
            State::FieldStart | State::Unquoted | State::QuoteInQuoted if line_end.is_some() => {
                let end = if state == State::QuoteInQuoted {
                    i - 1
                } else {
                    i
                };
                push(
                    fields,
                    field_start,
                    end,
                    escaped && state == State::QuoteInQuoted,
                );
                return Some(Scanned {
                    end: i + line_end.unwrap_or(1),
                    lines: lines + 1,
                    fault,
                });
            }
            State::FieldStart => match b {
                b'"' => {
                    state = State::Quoted;
                    field_start = i + 1;
                    escaped = false;
                }
                b',' => {
                    push(fields, i, i, false);
                    field_start = i + 1;
                }
                b'\r' => {
                    fault.get_or_insert(RejectReason::BareCarriageReturn);
                    state = State::Unquoted;
                }
                _ => state = State::Unquoted,
            },
            State::Unquoted => match b {
                b',' => {
                    push(fields, field_start, i, false);
                    field_start = i + 1;
                    state = State::FieldStart;
                }
                b'"' => {
                    fault.get_or_insert(RejectReason::QuoteInUnquotedField);
                }
                b'\r' => {
                    fault.get_or_insert(RejectReason::BareCarriageReturn);
                }
                _ => {}
            },
            State::Quoted => match b {
                b'"' => state = State::QuoteInQuoted,
                b'\n' => lines += 1,
                _ => {}
            },
            State::QuoteInQuoted => match b {
                b'"' => {
                    escaped = true;
                    state = State::Quoted;
                }
                b',' => {
                    push(fields, field_start, i - 1, escaped);
                    field_start = i + 1;
                    state = State::FieldStart;
                }
                _ => {
                    // Resynchronize: the rest up to the next comma or line end is this field.
                    fault.get_or_insert(RejectReason::TextAfterClosingQuote);
                    state = State::Unquoted;
                }
            },
        }
        i += 1;
    }
}

/// Cuts a byte stream into chunks of whole CSV records.
pub(crate) struct CsvReader<R> {
    input: R,
    buf: Vec<u8>,
    eof: bool,
    line: u64,
    max_record: usize,
    /// Discarding the rest of an over-long record up to its line end.
    skipping: bool,
}

impl<R: Read> CsvReader<R> {
    pub(crate) fn new(input: R, max_record: usize) -> Self {
        Self {
            input,
            buf: Vec::with_capacity(CHUNK_BYTES + READ_BYTES),
            eof: false,
            line: 1,
            max_record,
            skipping: false,
        }
    }

    fn fill(&mut self) -> std::io::Result<()> {
        let start = self.buf.len();
        self.buf.resize(start + READ_BYTES, 0);
        let n = loop {
            match self.input.read(&mut self.buf[start..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.buf.truncate(start);
                    return Err(e);
                }
            }
        };
        self.buf.truncate(start + n);
        if n == 0 {
            self.eof = true;
        }
        Ok(())
    }

    /// The next chunk of at most `max_records` records; an empty chunk at the end of input.
    /// Blank lines are skipped (they carry no field).
    pub(crate) fn next_chunk(&mut self, max_records: usize) -> std::io::Result<Chunk> {
        let mut chunk = Chunk::default();
        let mut pos = 0;
        loop {
            if self.skipping {
                match self.buf[pos..].iter().position(|&b| b == b'\n') {
                    Some(n) => {
                        self.skipping = false;
                        self.line += 1;
                        // Keep the skipped bytes out of the chunk's data.
                        self.buf.drain(pos..pos + n + 1);
                    }
                    None if self.eof => {
                        self.buf.truncate(pos);
                        self.skipping = false;
                    }
                    None => {
                        self.buf.truncate(pos);
                        self.fill()?;
                        continue;
                    }
                }
            }
            if chunk.records.len() >= max_records || pos >= CHUNK_BYTES {
                break;
            }
            // Blank lines.
            while let Some(n) = blank_line(&self.buf[pos..]) {
                self.buf.drain(pos..pos + n);
                self.line += 1;
            }
            if pos == self.buf.len() && self.eof {
                break;
            }
            let first_field = chunk.fields.len();
            match scan(&self.buf, pos, self.eof, &mut chunk.fields) {
                Some(s) => {
                    let fault = if s.end - pos > self.max_record {
                        Some(RejectReason::RecordTooLong {
                            limit: self.max_record,
                        })
                    } else {
                        s.fault
                    };
                    chunk.records.push(RawRecord {
                        raw: pos..s.end,
                        line: self.line,
                        fields: first_field..chunk.fields.len(),
                        fault,
                    });
                    self.line += s.lines;
                    pos = s.end;
                }
                None if self.buf.len() - pos > self.max_record => {
                    // Keep the first max_record bytes for the reject file, drop the rest of
                    // the physical line.
                    let end = pos + self.max_record;
                    chunk.records.push(RawRecord {
                        raw: pos..end,
                        line: self.line,
                        fields: first_field..first_field,
                        fault: Some(RejectReason::RecordTooLong {
                            limit: self.max_record,
                        }),
                    });
                    self.line += count_newlines(&self.buf[pos..end]);
                    pos = end;
                    self.skipping = true;
                }
                None => self.fill()?,
            }
        }
        let rest = self.buf.split_off(pos);
        chunk.data = std::mem::replace(&mut self.buf, rest);
        Ok(chunk)
    }
}

fn blank_line(buf: &[u8]) -> Option<usize> {
    match buf {
        [b'\n', ..] => Some(1),
        [b'\r', b'\n', ..] => Some(2),
        _ => None,
    }
}

fn count_newlines(buf: &[u8]) -> u64 {
    buf.iter().filter(|&&b| b == b'\n').count() as u64
}

/// The text of a field: UTF-8 checked, `""` unescaped into `scratch` when needed.
pub(crate) fn field_text<'a>(
    data: &'a [u8],
    span: FieldSpan,
    scratch: &'a mut String,
) -> Option<&'a str> {
    let bytes = data.get(span.start..span.end)?;
    let text = std::str::from_utf8(bytes).ok()?;
    if !span.escaped {
        return Some(text);
    }
    scratch.clear();
    let mut rest = text;
    while let Some(i) = rest.find("\"\"") {
        scratch.push_str(&rest[..=i]);
        rest = &rest[i + 2..];
    }
    scratch.push_str(rest);
    Some(scratch.as_str())
}

/// The text of a field of a record already checked as UTF-8 (`record` starts at byte `base`
/// of the chunk); `""` unescaped into `scratch` when needed. Field bounds are at ASCII
/// delimiters, so they are character boundaries.
pub(crate) fn field_in<'a>(
    record: &'a str,
    base: usize,
    span: FieldSpan,
    scratch: &'a mut String,
) -> Option<&'a str> {
    let text = record.get(span.start - base..span.end - base)?;
    if !span.escaped {
        return Some(text);
    }
    scratch.clear();
    let mut rest = text;
    while let Some(i) = rest.find("\"\"") {
        scratch.push_str(&rest[..=i]);
        rest = &rest[i + 2..];
    }
    scratch.push_str(rest);
    Some(scratch.as_str())
}

/// Appends `value` as one CSV field (quoted when it holds a comma, quote or line break).
pub(crate) fn write_field(out: &mut Vec<u8>, value: &str) {
    if value
        .bytes()
        .any(|b| matches!(b, b',' | b'"' | b'\n' | b'\r'))
    {
        out.push(b'"');
        for b in value.bytes() {
            if b == b'"' {
                out.push(b'"');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        out.extend_from_slice(value.as_bytes());
    }
}

/// Cuts a byte stream into chunks of whole lines (NDJSON), one record per non-blank line.
pub(crate) struct LineReader<R> {
    input: R,
    buf: Vec<u8>,
    eof: bool,
    line: u64,
    max_record: usize,
    skipping: bool,
}

impl<R: Read> LineReader<R> {
    pub(crate) fn new(input: R, max_record: usize) -> Self {
        Self {
            input,
            buf: Vec::with_capacity(CHUNK_BYTES + READ_BYTES),
            eof: false,
            line: 1,
            max_record,
            skipping: false,
        }
    }

    fn fill(&mut self) -> std::io::Result<()> {
        let start = self.buf.len();
        self.buf.resize(start + READ_BYTES, 0);
        let n = loop {
            match self.input.read(&mut self.buf[start..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.buf.truncate(start);
                    return Err(e);
                }
            }
        };
        self.buf.truncate(start + n);
        if n == 0 {
            self.eof = true;
        }
        Ok(())
    }

    /// The next chunk of at most `max_records` lines; an empty chunk at the end of input.
    pub(crate) fn next_chunk(&mut self, max_records: usize) -> std::io::Result<Chunk> {
        let mut chunk = Chunk::default();
        let mut pos = 0;
        let mut scanned = 0;
        loop {
            if self.skipping {
                match self.buf[pos..].iter().position(|&b| b == b'\n') {
                    Some(n) => {
                        self.skipping = false;
                        self.line += 1;
                        self.buf.drain(pos..pos + n + 1);
                    }
                    None if self.eof => {
                        self.buf.truncate(pos);
                        self.skipping = false;
                    }
                    None => {
                        self.buf.truncate(pos);
                        self.fill()?;
                        continue;
                    }
                }
                scanned = pos;
            }
            if chunk.records.len() >= max_records || pos >= CHUNK_BYTES {
                break;
            }
            match self.buf[scanned..].iter().position(|&b| b == b'\n') {
                Some(n) => {
                    let end = scanned + n + 1;
                    if !self.buf[pos..end].iter().all(u8::is_ascii_whitespace) {
                        chunk.records.push(RawRecord {
                            raw: pos..end,
                            line: self.line,
                            fields: 0..0,
                            fault: (end - pos > self.max_record).then_some(
                                RejectReason::RecordTooLong {
                                    limit: self.max_record,
                                },
                            ),
                        });
                    }
                    self.line += 1;
                    pos = end;
                    scanned = end;
                }
                None if self.buf.len() - pos > self.max_record => {
                    let end = pos + self.max_record;
                    chunk.records.push(RawRecord {
                        raw: pos..end,
                        line: self.line,
                        fields: 0..0,
                        fault: Some(RejectReason::RecordTooLong {
                            limit: self.max_record,
                        }),
                    });
                    pos = end;
                    self.skipping = true;
                }
                None if self.eof => {
                    if !self.buf[pos..].iter().all(u8::is_ascii_whitespace) {
                        chunk.records.push(RawRecord {
                            raw: pos..self.buf.len(),
                            line: self.line,
                            fields: 0..0,
                            fault: None,
                        });
                    }
                    pos = self.buf.len();
                    break;
                }
                None => {
                    scanned = self.buf.len();
                    self.fill()?;
                }
            }
        }
        let rest = self.buf.split_off(pos);
        chunk.data = std::mem::replace(&mut self.buf, rest);
        Ok(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All records of `input` as (line, fields or fault).
    fn read(input: &str) -> Vec<(u64, Result<Vec<String>, RejectReason>)> {
        let mut r = CsvReader::new(input.as_bytes(), 64);
        let mut out = Vec::new();
        loop {
            let chunk = r.next_chunk(3).unwrap();
            if chunk.records.is_empty() {
                break;
            }
            for rec in &chunk.records {
                let v = match &rec.fault {
                    Some(f) => Err(f.clone()),
                    None => Ok(chunk
                        .fields_of(rec)
                        .iter()
                        .map(|&s| {
                            let mut scratch = String::new();
                            field_text(&chunk.data, s, &mut scratch).unwrap().to_owned()
                        })
                        .collect()),
                };
                out.push((rec.line, v));
            }
        }
        out
    }

    fn ok(fields: &[&str]) -> Result<Vec<String>, RejectReason> {
        Ok(fields.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn quoting_line_ends_and_line_numbers() {
        let got = read("a,b\r\n\"x,1\",\"say \"\"hi\"\"\"\n\"multi\nline\",z\n\n,\nlast,\"\"");
        assert_eq!(
            got,
            vec![
                (1, ok(&["a", "b"])),
                (2, ok(&["x,1", "say \"hi\""])),
                (3, ok(&["multi\nline", "z"])),
                (6, ok(&["", ""])),
                (7, ok(&["last", ""])),
            ]
        );
    }

    #[test]
    fn faults_resynchronize_at_the_line_end() {
        let got = read("a,b\nab\"c,d\n\"ab\"c,d\nok,1\n\"open,2\n");
        assert_eq!(got[0], (1, ok(&["a", "b"])));
        assert_eq!(got[1], (2, Err(RejectReason::QuoteInUnquotedField)));
        assert_eq!(got[2], (3, Err(RejectReason::TextAfterClosingQuote)));
        assert_eq!(got[3], (4, ok(&["ok", "1"])));
        assert_eq!(got[4], (5, Err(RejectReason::UnterminatedQuote)));
        assert_eq!(got.len(), 5);
    }

    #[test]
    fn over_long_records_are_cut_and_skipped() {
        let long = "x".repeat(200);
        let got = read(&format!("a\n{long}\nb\n"));
        assert_eq!(got[1], (2, Err(RejectReason::RecordTooLong { limit: 64 })));
        assert_eq!(got[2], (3, ok(&["b"])));
    }

    #[test]
    fn lines_skip_blanks_and_cut_long_ones() {
        let long = "y".repeat(100);
        let input = format!("{{\"a\":1}}\n\n  \n{long}\n{{\"b\":2}}");
        let mut r = LineReader::new(input.as_bytes(), 64);
        let chunk = r.next_chunk(10).unwrap();
        let got: Vec<(u64, bool)> = chunk
            .records
            .iter()
            .map(|r| (r.line, r.fault.is_some()))
            .collect();
        assert_eq!(got, vec![(1, false), (4, true), (5, false)]);
        assert_eq!(&chunk.data[chunk.records[2].raw.clone()], b"{\"b\":2}");
        assert!(r.next_chunk(10).unwrap().records.is_empty());
    }

    #[test]
    fn writer_quotes_only_when_needed() {
        let mut out = Vec::new();
        for v in ["plain", "a,b", "say \"hi\"", "two\nlines", ""] {
            write_field(&mut out, v);
            out.push(b'|');
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "plain|\"a,b\"|\"say \"\"hi\"\"\"|\"two\nlines\"||"
        );
    }
}
