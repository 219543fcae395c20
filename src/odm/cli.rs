//! `ocsync odm stats` and `ocsync odm dump`: the contract other tools use.
//!
//! Both read the whole document before claiming anything: `stats` prints
//! its one line only after a clean end of document, and `dump` spools its
//! NDJSON (in memory up to [`SPOOL_MEMORY`], then in a temporary file) and
//! copies it to the output only once the document has parsed. On bad input
//! the output receives nothing and the error (with line and column) goes
//! back to the caller, who prints it and exits non-zero.
//!
//! JSON is written as Python's `json.dumps(obj, sort_keys=True)` writes it
//! (keys sorted, `", "` and `": "` separators, non-ASCII escaped as
//! `\uXXXX`), so the output compares byte for byte with independent tools.

use std::fmt::Write as _;
use std::io::{self, BufRead, BufWriter, Read, Seek, Write};

use super::error::OdmError;
use super::model::Record;
use super::reader::OdmReader;
use super::stats::count;

/// How much NDJSON `dump` keeps in memory before spilling to a temp file.
pub const SPOOL_MEMORY: usize = 8 << 20;

/// What can go wrong in a command: the document, or writing the output.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Odm(#[from] OdmError),
    #[error("writing the output failed: {0}")]
    Output(#[source] io::Error),
}

/// Prints the counts of the document as one JSON object.
pub fn stats<R: BufRead, W: Write>(input: R, mut out: W) -> Result<(), CliError> {
    let stats = count(input)?;
    out.write_all(stats.to_json_line().as_bytes())
        .and_then(|()| out.flush())
        .map_err(CliError::Output)
}

/// Prints one JSON object per `ItemData`, in document order.
pub fn dump<R: BufRead, W: Write>(input: R, out: W) -> Result<(), CliError> {
    dump_spooled(input, out, SPOOL_MEMORY)
}

/// [`dump`] with the in-memory part of the spool limited to `memory` bytes
/// (tests use a small limit to exercise the temp-file path).
pub fn dump_spooled<R: BufRead, W: Write>(
    input: R,
    mut out: W,
    memory: usize,
) -> Result<(), CliError> {
    let mut spool = Spool::Memory(Vec::new(), memory);
    let mut reader = OdmReader::new(input);
    let mut line = String::with_capacity(512);
    while let Some(record) = reader.next_record()? {
        let Record::Subject(subject) = record else {
            continue;
        };
        for (event, form, group, item) in subject.items() {
            line.clear();
            // Keys in sorted order.
            line.push_str("{\"event_oid\": ");
            json_string(&mut line, Some(&event.oid));
            line.push_str(", \"event_repeat_key\": ");
            json_string(&mut line, event.repeat_key.as_deref());
            line.push_str(", \"form_oid\": ");
            json_string(&mut line, Some(&form.oid));
            line.push_str(", \"item_group_oid\": ");
            json_string(&mut line, Some(&group.oid));
            line.push_str(", \"item_group_repeat_key\": ");
            json_string(&mut line, group.repeat_key.as_deref());
            line.push_str(", \"item_oid\": ");
            json_string(&mut line, Some(&item.oid));
            line.push_str(", \"study_oid\": ");
            json_string(&mut line, Some(&subject.study_oid));
            line.push_str(", \"subject_key\": ");
            json_string(&mut line, Some(&subject.subject_key));
            line.push_str(", \"value\": ");
            json_string(&mut line, item.value.as_deref());
            line.push_str("}\n");
            spool.write(line.as_bytes()).map_err(CliError::Output)?;
        }
    }
    spool.copy_to(&mut out).map_err(CliError::Output)?;
    out.flush().map_err(CliError::Output)
}

/// Output held back until the document is known to be good.
enum Spool {
    /// Bytes so far, and the most to hold in memory.
    Memory(Vec<u8>, usize),
    File(BufWriter<std::fs::File>),
}

impl Spool {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if let Spool::Memory(buf, limit) = self {
            if buf.len() + bytes.len() <= *limit {
                buf.extend_from_slice(bytes);
                return Ok(());
            }
            let mut file = BufWriter::new(tempfile::tempfile()?);
            file.write_all(buf)?;
            *self = Spool::File(file);
        }
        match self {
            Spool::File(file) => file.write_all(bytes),
            Spool::Memory(..) => Ok(()),
        }
    }

    fn copy_to<W: Write>(self, out: &mut W) -> io::Result<()> {
        match self {
            Spool::Memory(buf, _) => out.write_all(&buf),
            Spool::File(file) => {
                let mut file = file.into_inner().map_err(|e| e.into_error())?;
                file.rewind()?;
                io::copy(&mut (&mut file).take(u64::MAX), out).map(|_| ())
            }
        }
    }
}

/// Appends `s` as a JSON string (or `null`), escaped as Python's
/// `json.dumps` does with `ensure_ascii=True`.
pub fn json_string(out: &mut String, s: Option<&str>) {
    let Some(s) = s else {
        out.push_str("null");
        return;
    };
    out.push('"');
    if s.bytes()
        .all(|b| (0x20..0x7F).contains(&b) && b != b'"' && b != b'\\')
    {
        out.push_str(s);
    } else {
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                ' '..='~' => out.push(c),
                _ => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped_like_python() {
        let cases: &[(Option<&str>, &str)] = &[
            (None, "null"),
            (Some(""), "\"\""),
            (Some("41 "), "\"41 \""),
            (Some("a\"b\\c"), "\"a\\\"b\\\\c\""),
            (
                Some("\n\r\t\u{8}\u{c}\u{1}\u{7f}"),
                "\"\\n\\r\\t\\b\\f\\u0001\\u007f\"",
            ),
            (Some("é–😀"), "\"\\u00e9\\u2013\\ud83d\\ude00\""),
            (Some("a/b<>&'"), "\"a/b<>&'\""),
        ];
        for (input, want) in cases {
            let mut out = String::new();
            json_string(&mut out, *input);
            assert_eq!(out, *want, "{input:?}");
        }
    }
}
