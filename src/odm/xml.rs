//! The XML 1.0 rules quick-xml leaves to its caller.
//!
//! quick-xml splits the input into tags, text, references, comments and so
//! on, and checks UTF-8 and tag balance. What XML 1.0 (Fifth Edition) and
//! Namespaces in XML 1.0 further require is checked here, on byte slices of
//! one event: legal characters, names, attribute syntax, references (only
//! the five predefined entities; there is no DTD), attribute-value
//! normalisation and end-of-line handling.
//!
//! Functions here report a [`Fault`] with the byte index inside the slice
//! they were given; the reader turns it into a line and column. They are
//! written so that the common case (ASCII, no references, no whitespace
//! inside values) is a single pass with no allocation.

use std::ops::Range;

/// What is wrong, without any position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Issue {
    Syntax {
        expected: &'static str,
        found: String,
    },
    UnknownEntity,
    BadCharRef,
    IllegalChar(u32),
    NonAscii,
}

/// An [`Issue`] at a byte index of the slice being checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fault {
    pub at: usize,
    pub issue: Issue,
}

impl Fault {
    pub(crate) fn syntax(at: usize, expected: &'static str, bytes: &[u8]) -> Self {
        Fault {
            at,
            issue: Issue::Syntax {
                expected,
                found: describe(bytes, at),
            },
        }
    }
}

/// Names the markup found at `at`, for an error message. Only called at
/// places where markup (never a value) was expected.
pub(crate) fn describe(bytes: &[u8], at: usize) -> String {
    match bytes.get(at..).and_then(|rest| rest.utf8_chunks().next()) {
        None => "end of tag".to_owned(),
        Some(chunk) => match chunk.valid().chars().next() {
            Some(c) if c == ' ' || c == '\t' || c == '\n' || c == '\r' => "whitespace".to_owned(),
            Some(c) if c.is_ascii_graphic() => format!("'{c}'"),
            Some(c) => format!("character U+{:04X}", c as u32),
            None => "end of tag".to_owned(),
        },
    }
}

/// XML `S`.
#[inline]
pub(crate) fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// XML 1.0 `Char`.
#[inline]
pub(crate) fn is_xml_char(c: u32) -> bool {
    matches!(c, 0x9 | 0xA | 0xD | 0x20..=0xD7FF | 0xE000..=0xFFFD | 0x10000..=0x10FFFF)
}

/// The result of the fast pass over an event's bytes.
pub(crate) struct Scan {
    /// Line feeds in the slice.
    pub line_feeds: usize,
    /// The slice holds a byte that needs a closer look: non-ASCII, a
    /// carriage return or a control character.
    pub suspicious: bool,
}

/// One branch-free pass, vectorised by the compiler: counts line feeds and
/// flags any byte that is not plain printable ASCII, tab or line feed.
#[inline]
pub(crate) fn scan(bytes: &[u8]) -> Scan {
    let mut line_feeds = 0usize;
    let mut odd = 0u8;
    let mut chunks = bytes.chunks_exact(32);
    for chunk in &mut chunks {
        let mut lf = 0u8;
        for &b in chunk {
            lf += u8::from(b == b'\n');
            odd |= u8::from(b >= 0x80 || (b < 0x20 && b != b'\n' && b != b'\t'));
        }
        line_feeds += usize::from(lf);
    }
    for &b in chunks.remainder() {
        line_feeds += usize::from(b == b'\n');
        odd |= u8::from(b >= 0x80 || (b < 0x20 && b != b'\n' && b != b'\t'));
    }
    Scan {
        line_feeds,
        suspicious: odd != 0,
    }
}

/// The slow pass for a suspicious slice: finds the first character XML
/// forbids (or, in a US-ASCII document, the first non-ASCII byte).
pub(crate) fn check_chars(text: &str, ascii_only: bool) -> Result<(), Fault> {
    for (i, c) in text.char_indices() {
        let code = c as u32;
        if code < 0x20 {
            if !matches!(code, 0x9 | 0xA | 0xD) {
                return Err(Fault {
                    at: i,
                    issue: Issue::IllegalChar(code),
                });
            }
        } else if code >= 0x80 {
            if ascii_only {
                return Err(Fault {
                    at: i,
                    issue: Issue::NonAscii,
                });
            }
            if !is_xml_char(code) {
                return Err(Fault {
                    at: i,
                    issue: Issue::IllegalChar(code),
                });
            }
        }
    }
    Ok(())
}

/// Counts line breaks (LF, CRLF, lone CR) in `bytes` and returns the count
/// and the index just after the last one.
pub(crate) fn count_lines(bytes: &[u8]) -> (u64, Option<usize>) {
    let mut lines = 0;
    let mut last = None;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\n' => {
                lines += 1;
                last = Some(i + 1);
            }
            b'\r' if bytes.get(i + 1) != Some(&b'\n') => {
                lines += 1;
                last = Some(i + 1);
            }
            _ => {}
        }
    }
    (lines, last)
}

#[inline]
fn is_name_start_ascii(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b == b':'
}

#[inline]
fn is_name_ascii(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'-' | b'.')
}

fn is_name_start_char(c: char) -> bool {
    matches!(c as u32,
        0x3A | 0x41..=0x5A | 0x5F | 0x61..=0x7A | 0xC0..=0xD6 | 0xD8..=0xF6
        | 0xF8..=0x2FF | 0x370..=0x37D | 0x37F..=0x1FFF | 0x200C..=0x200D
        | 0x2070..=0x218F | 0x2C00..=0x2FEF | 0x3001..=0xD7FF | 0xF900..=0xFDCF
        | 0xFDF0..=0xFFFD | 0x10000..=0xEFFFF)
}

fn is_name_char(c: char) -> bool {
    is_name_start_char(c)
        || matches!(c as u32, 0x2D | 0x2E | 0x30..=0x39 | 0xB7 | 0x300..=0x36F | 0x203F..=0x2040)
}

/// Checks that `name` is a `QName` (`NCName` or `NCName:NCName`) and returns
/// the index of its colon, if any.
pub(crate) fn check_qname(name: &[u8]) -> Result<Option<usize>, Fault> {
    const EXPECTED: &str = "a name (a letter, '_' or ':' then letters, digits, '.', '-', '_')";
    let Some(&first) = name.first() else {
        return Err(Fault::syntax(0, EXPECTED, name));
    };
    if name.is_ascii() {
        if !is_name_start_ascii(first) {
            return Err(Fault::syntax(0, EXPECTED, name));
        }
        for (i, &b) in name.iter().enumerate().skip(1) {
            if !is_name_ascii(b) {
                return Err(Fault::syntax(i, EXPECTED, name));
            }
        }
        return check_colons(name, memchr::memchr(b':', name));
    }
    // Non-ASCII: check characters one by one.
    let text =
        std::str::from_utf8(name).map_err(|e| Fault::syntax(e.valid_up_to(), EXPECTED, name))?;
    for (i, c) in text.char_indices() {
        let ok = if i == 0 {
            is_name_start_char(c)
        } else {
            is_name_char(c)
        };
        if !ok {
            return Err(Fault::syntax(i, EXPECTED, name));
        }
    }
    check_colons(name, memchr::memchr(b':', name))
}

/// Namespaces in XML: at most one colon, with a name on both sides.
fn check_colons(name: &[u8], colon: Option<usize>) -> Result<Option<usize>, Fault> {
    const EXPECTED: &str = "a qualified name (prefix:local, one colon)";
    if let Some(c) = colon {
        if c == 0 || c + 1 == name.len() {
            return Err(Fault::syntax(c, EXPECTED, name));
        }
        if let Some(second) = memchr::memchr(b':', &name[c + 1..]) {
            return Err(Fault::syntax(c + 1 + second, EXPECTED, name));
        }
        // The local part must start like a name too (`a:1b` is not a QName).
        let local_first = name[c + 1];
        if local_first.is_ascii() && !is_name_start_ascii(local_first) {
            return Err(Fault::syntax(c + 1, EXPECTED, name));
        }
        if !local_first.is_ascii()
            && let Some(ch) = std::str::from_utf8(&name[c + 1..])
                .ok()
                .and_then(|s| s.chars().next())
            && !is_name_start_char(ch)
        {
            return Err(Fault::syntax(c + 1, EXPECTED, name));
        }
    }
    Ok(colon)
}

/// One attribute of a start tag, as byte ranges into the tag's content.
#[derive(Debug, Clone)]
pub(crate) struct RawAttr {
    pub name: Range<usize>,
    /// Index of the colon inside the name, relative to `name.start`.
    pub colon: Option<usize>,
    /// The value between the quotes, not yet normalised.
    pub value: Range<usize>,
    /// The value holds `&`, or a tab, line feed or carriage return, and so
    /// needs the slow normalisation path.
    pub special: bool,
}

/// What [`parse_attributes`] learnt about the tag besides the attributes.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TagInfo {
    /// Every byte after the element name is printable ASCII or a space:
    /// no line break to count and no character to check.
    pub clean: bool,
    /// Some attribute name starts with `xmlns`.
    pub declares: bool,
}

/// Byte classes for the tag scanner, one table lookup per byte.
const NAME_START: u8 = 1; // A-Z a-z _
const NAME_CHAR: u8 = 2; // name start, digits, '.', '-'
const COLON: u8 = 4;
const V_STOP: u8 = 8; // '<', '"', '\'' inside a value
const V_AMP: u8 = 16;
const V_WS: u8 = 32; // tab, line feed, carriage return
const V_ODD: u8 = 64; // other control characters, non-ASCII

const CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        let mut k = 0;
        if c.is_ascii_alphabetic() || c == b'_' {
            k |= NAME_START | NAME_CHAR;
        }
        if c.is_ascii_digit() || c == b'.' || c == b'-' {
            k |= NAME_CHAR;
        }
        if c == b':' {
            k |= COLON;
        }
        if c == b'<' || c == b'"' || c == b'\'' {
            k |= V_STOP;
        }
        if c == b'&' {
            k |= V_AMP;
        }
        if c == b'\t' || c == b'\n' || c == b'\r' {
            k |= V_WS;
        } else if c < 0x20 || c >= 0x80 {
            k |= V_ODD;
        }
        t[b] = k;
        b += 1;
    }
    t
};

/// The fast path for a name at `tag[i..]`: ASCII letters, digits, `_`,
/// `.`, `-`, at most one colon with a name start on both sides. Returns the
/// end and the colon's index relative to `i`, or `None` when the name needs
/// the thorough check ([`check_qname`]).
#[inline]
pub(crate) fn fast_qname(tag: &[u8], i: usize) -> Option<(usize, Option<usize>)> {
    let first = *tag.get(i)?;
    if CLASS[first as usize] & NAME_START == 0 {
        return None;
    }
    let mut j = i + 1;
    let mut colon = None;
    while j < tag.len() {
        let k = CLASS[tag[j] as usize];
        if k & NAME_CHAR != 0 {
            j += 1;
        } else if k & COLON != 0 {
            let after = *tag.get(j + 1)?;
            if colon.is_some() || CLASS[after as usize] & NAME_START == 0 {
                return None;
            }
            colon = Some(j - i);
            j += 2;
        } else if tag[j] >= 0x80 {
            return None;
        } else {
            break;
        }
    }
    Some((j, colon))
}

/// Parses `S Name Eq AttValue` pairs from `start` to the end of `tag` (the
/// content of a start tag or XML declaration without `<`, `>` and `/`), in
/// one pass that also classifies every byte (see [`TagInfo`]).
pub(crate) fn parse_attributes(
    tag: &[u8],
    start: usize,
    out: &mut Vec<RawAttr>,
) -> Result<TagInfo, Fault> {
    let len = tag.len();
    let mut i = start;
    let mut info = TagInfo {
        clean: true,
        declares: false,
    };
    loop {
        let space_start = i;
        while i < len && is_space(tag[i]) {
            info.clean &= tag[i] == b' ';
            i += 1;
        }
        if i == len {
            return Ok(info);
        }
        if i == space_start {
            return Err(Fault::syntax(
                i,
                "whitespace before the next attribute",
                tag,
            ));
        }
        let name_start = i;
        let (name_end, colon) = match fast_qname(tag, i) {
            Some((end, colon)) if end == len || is_space(tag[end]) || tag[end] == b'=' => {
                (end, colon)
            }
            _ => {
                // Unusual name: find where it ends and check it thoroughly
                // (this also gives the precise error).
                while i < len && !is_space(tag[i]) && tag[i] != b'=' {
                    i += 1;
                }
                let colon = check_qname(&tag[name_start..i]).map_err(|f| Fault {
                    at: f.at + name_start,
                    ..f
                })?;
                info.clean = false;
                (i, colon)
            }
        };
        i = name_end;
        info.declares |= tag[name_start..].starts_with(b"xmlns");
        let name = name_start..i;
        while i < len && is_space(tag[i]) {
            info.clean &= tag[i] == b' ';
            i += 1;
        }
        if i == len || tag[i] != b'=' {
            return Err(Fault::syntax(i, "'=' after the attribute name", tag));
        }
        i += 1;
        while i < len && is_space(tag[i]) {
            info.clean &= tag[i] == b' ';
            i += 1;
        }
        let quote = match tag.get(i) {
            Some(&q @ (b'"' | b'\'')) => q,
            _ => return Err(Fault::syntax(i, "a quoted attribute value", tag)),
        };
        i += 1;
        let value_start = i;
        // One pass over the value: find the closing quote, refuse `<`, and
        // note references, whitespace to normalise and odd bytes.
        let mut seen = 0u8;
        loop {
            let Some(&b) = tag.get(i) else {
                return Err(Fault::syntax(
                    len,
                    "the closing quote of the attribute value",
                    tag,
                ));
            };
            let k = CLASS[b as usize];
            if k & V_STOP != 0 {
                if b == quote {
                    break;
                }
                if b == b'<' {
                    return Err(Fault {
                        at: i,
                        issue: Issue::Syntax {
                            expected: "an attribute value without '<' (escape it as &lt;)",
                            found: "'<'".to_owned(),
                        },
                    });
                }
            }
            seen |= k;
            i += 1;
        }
        info.clean &= seen & (V_WS | V_ODD) == 0;
        out.push(RawAttr {
            name,
            colon,
            value: value_start..i,
            special: seen & (V_AMP | V_WS) != 0,
        });
        i += 1;
    }
}

/// Where the decoded characters of a value go: a `String` when the value is
/// kept, nowhere when it is only checked.
pub(crate) trait Sink {
    fn push_str(&mut self, s: &str);
    fn push(&mut self, c: char);
}

impl Sink for String {
    #[inline]
    fn push_str(&mut self, s: &str) {
        String::push_str(self, s);
    }
    #[inline]
    fn push(&mut self, c: char) {
        String::push(self, c);
    }
}

/// Checks without keeping anything.
pub(crate) struct Discard;

impl Sink for Discard {
    #[inline]
    fn push_str(&mut self, _: &str) {}
    #[inline]
    fn push(&mut self, _: char) {}
}

/// Resolves the reference whose name (between `&` and `;`) is `name`.
pub(crate) fn resolve_reference(name: &[u8]) -> Result<char, Issue> {
    match name {
        b"lt" => Ok('<'),
        b"gt" => Ok('>'),
        b"amp" => Ok('&'),
        b"apos" => Ok('\''),
        b"quot" => Ok('"'),
        [b'#', b'x', hex @ ..] => char_ref(hex, 16),
        [b'#', dec @ ..] => char_ref(dec, 10),
        _ => Err(Issue::UnknownEntity),
    }
}

fn char_ref(digits: &[u8], radix: u32) -> Result<char, Issue> {
    if digits.is_empty() {
        return Err(Issue::BadCharRef);
    }
    let mut code: u32 = 0;
    for &d in digits {
        let v = (d as char).to_digit(radix).ok_or(Issue::BadCharRef)?;
        // Saturate instead of overflowing: anything this large is illegal.
        code = code.saturating_mul(radix).saturating_add(v).min(0x11_0000);
    }
    if !is_xml_char(code) {
        return Err(Issue::IllegalChar(code));
    }
    char::from_u32(code).ok_or(Issue::IllegalChar(code))
}

/// Normalises an attribute value as XML 1.0 §3.3.3 requires for CDATA
/// attributes (every attribute, as there is no DTD): end-of-line handling
/// first (CRLF and lone CR become LF), then every literal tab, line feed and
/// carriage return becomes a space, and references are replaced by their
/// character, which is *not* normalised (`&#10;` stays a line feed).
pub(crate) fn normalize_value<S: Sink>(raw: &str, out: &mut S) -> Result<(), Fault> {
    let bytes = raw.as_bytes();
    let mut i = 0;
    let mut run = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\t' | b'\n' | b'\r' => {
                out.push_str(&raw[run..i]);
                out.push(' ');
                // CRLF is one line break, so one space.
                i += if b == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                run = i;
            }
            b'&' => {
                out.push_str(&raw[run..i]);
                let Some(len) = memchr::memchr(b';', &bytes[i + 1..]) else {
                    return Err(Fault {
                        at: i,
                        issue: Issue::Syntax {
                            expected: "';' ending the reference",
                            found: "end of the attribute value".to_owned(),
                        },
                    });
                };
                let c = resolve_reference(&bytes[i + 1..i + 1 + len])
                    .map_err(|issue| Fault { at: i, issue })?;
                out.push(c);
                i += len + 2;
                run = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&raw[run..]);
    Ok(())
}

/// Appends character data with XML end-of-line handling (CRLF and lone CR
/// become LF). `]]>` is checked separately by the caller.
pub(crate) fn push_text(text: &str, out: &mut String) {
    if memchr::memchr(b'\r', text.as_bytes()).is_none() {
        out.push_str(text);
        return;
    }
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\r' {
            if chars.peek() == Some(&'\n') {
                chars.next();
            }
            out.push('\n');
        } else {
            out.push(c);
        }
    }
}

/// Finds `]]>` in character data, where XML forbids it.
pub(crate) fn find_cdata_end(text: &[u8]) -> Option<usize> {
    memchr::memmem::find(text, b"]]>")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(raw: &str) -> Result<String, Fault> {
        let mut s = String::new();
        normalize_value(raw, &mut s).map(|()| s)
    }

    #[test]
    fn attribute_values_are_normalised_as_xml_1_0_says() {
        let cases: &[(&str, &str)] = &[
            ("plain", "plain"),
            ("a\tb", "a b"),
            ("a\nb", "a b"),
            ("a\r\nb", "a b"),
            ("a\rb", "a b"),
            ("a\r\rb", "a  b"),
            ("a&#10;b", "a\nb"),
            ("a&#13;b", "a\rb"),
            ("a&#9;b", "a\tb"),
            ("a&#xD;&#xA;b", "a\r\nb"),
            ("&lt;&gt;&amp;&apos;&quot;", "<>&'\""),
            ("&#x10FFFF;", "\u{10FFFF}"),
            ("  41 ", "  41 "),
            ("", ""),
        ];
        for (raw, want) in cases {
            assert_eq!(norm(raw).as_deref(), Ok(*want), "{raw:?}");
        }
    }

    #[test]
    fn bad_references_fail_at_the_ampersand() {
        let cases: &[(&str, usize, Issue)] = &[
            ("x&nbsp;", 1, Issue::UnknownEntity),
            ("&#0;", 0, Issue::IllegalChar(0)),
            ("ab&#xFFFE;", 2, Issue::IllegalChar(0xFFFE)),
            ("&#xD800;", 0, Issue::IllegalChar(0xD800)),
            ("&#;", 0, Issue::BadCharRef),
            ("&#x;", 0, Issue::BadCharRef),
            ("&#12a;", 0, Issue::BadCharRef),
            ("&#99999999999999999999;", 0, Issue::IllegalChar(0x11_0000)),
        ];
        for (raw, at, issue) in cases {
            let fault = norm(raw).unwrap_err();
            assert_eq!((fault.at, &fault.issue), (*at, issue), "{raw:?}");
        }
        assert_eq!(norm("a&b").unwrap_err().at, 1);
    }

    #[test]
    fn qualified_names() {
        assert_eq!(check_qname(b"ItemData"), Ok(None));
        assert_eq!(check_qname(b"OpenClinica:Status"), Ok(Some(11)));
        assert_eq!(check_qname(b"\xc3\xa9t\xc3\xa9"), Ok(None));
        for bad in [
            &b""[..],
            b"1a",
            b"a:",
            b":a",
            b"a:b:c",
            b"a b",
            b"a:1",
            b"-a",
        ] {
            assert!(check_qname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn attribute_syntax() {
        let mut out = Vec::new();
        let info = parse_attributes(b"e a='1' b = \"x&amp;\" ", 1, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert!(out[1].special && info.clean && !info.declares);
        out.clear();
        let info = parse_attributes(b"e\txmlns:a='1\n'", 1, &mut out).unwrap();
        assert!(out[0].special && !info.clean && info.declares);
        assert_eq!(out[0].colon, Some(5));
        assert_eq!(fast_qname(b"oc:Status", 0), Some((9, Some(2))));
        assert_eq!(fast_qname(b"Item.Data-1 x", 0), Some((11, None)));
        for slow in [&b"1a"[..], b":a", b"a:", b"a:b:c", b"a:1", b"\xc3\xa9"] {
            assert_eq!(fast_qname(slow, 0), None, "{slow:?}");
        }
        for (tag, at) in [
            (&b"e a='1'b='2'"[..], 7),
            (b"e a", 3),
            (b"e a=1", 4),
            (b"e a='<'", 5),
        ] {
            out.clear();
            assert_eq!(
                parse_attributes(tag, 1, &mut out).unwrap_err().at,
                at,
                "{tag:?}"
            );
        }
    }

    #[test]
    fn scan_counts_line_feeds_and_flags_odd_bytes() {
        let s = scan("a\nb\n".repeat(40).as_bytes());
        assert_eq!((s.line_feeds, s.suspicious), (80, false));
        assert!(scan(b"a\rb").suspicious);
        assert!(scan("é".as_bytes()).suspicious);
        assert!(!scan(b"a\tb").suspicious);
        assert_eq!(count_lines(b"a\r\nb\rc\nd"), (3, Some(7)));
    }
}
