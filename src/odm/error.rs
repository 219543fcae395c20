//! The one error type of the ODM reader.
//!
//! Policy: every error names the place in the document (line, column and
//! byte offset, all counted from the start of the input, BOM included) and
//! what the reader expected there. An error never quotes an attribute value
//! or text content: those are clinical data and must not reach logs. What it
//! may quote is markup: element and attribute names, entity names, namespace
//! URIs and the declared encoding.
//!
//! Columns count bytes from 1 (ODM exports are ASCII in practice, where
//! bytes and characters agree). Lines count line feeds, a lone carriage
//! return counting as one, as XML 1.0 end-of-line handling does.

use std::fmt;

/// Where in the input something went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Line number, from 1.
    pub line: u64,
    /// Column in bytes, from 1.
    pub column: u64,
    /// Byte offset from the start of the input, from 0.
    pub offset: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}, column {} (byte {})",
            self.line, self.column, self.offset
        )
    }
}

/// Everything that can go wrong while reading an ODM document.
///
/// A reader that returned an error is finished: the document is rejected as a
/// whole and nothing read before the error may be reported as a success.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OdmError {
    /// The underlying reader (file, HTTP body) failed.
    #[error("{at}: reading the input failed: {source}")]
    Io {
        at: Position,
        #[source]
        source: std::io::Error,
    },

    /// The bytes are not UTF-8.
    #[error("{at}: invalid UTF-8: expected a UTF-8 encoded document")]
    InvalidUtf8 { at: Position },

    /// A byte above 0x7F in a document that declares US-ASCII.
    #[error("{at}: non-ASCII byte in a document that declares encoding US-ASCII")]
    NonAscii { at: Position },

    /// The XML declaration names an encoding this reader does not read.
    #[error("{at}: unsupported encoding \"{encoding}\": expected UTF-8 or US-ASCII")]
    UnsupportedEncoding { at: Position, encoding: String },

    /// The document starts with a UTF-16 (or UTF-32) byte order mark or looks
    /// like UTF-16 without one.
    #[error("{at}: the document is UTF-16 encoded: expected UTF-8 or US-ASCII")]
    Utf16 { at: Position },

    /// A DOCTYPE declaration. It is refused, never expanded: it is the door
    /// to entity bombs and external entities, and ODM does not use one.
    #[error("{at}: a DOCTYPE declaration is not accepted (entities are never expanded)")]
    Doctype { at: Position },

    /// A character that XML 1.0 does not allow (control characters, U+FFFE,
    /// U+FFFF), written literally or as a character reference.
    #[error("{at}: character U+{code:04X} is not allowed in XML 1.0")]
    IllegalChar { at: Position, code: u32 },

    /// `&name;` where name is not one of the five predefined entities. The
    /// name is not quoted: inside a value it could be part of the data.
    #[error(
        "{at}: unknown entity reference: expected &lt; &gt; &amp; &apos; &quot; or a character reference (no DTD is read)"
    )]
    UnknownEntity { at: Position },

    /// A malformed character reference (`&#;`, `&#x;`, `&#12a;`).
    #[error("{at}: malformed character reference: expected &#DIGITS; or &#xHEXDIGITS;")]
    BadCharRef { at: Position },

    /// A tag whose end does not match the open element.
    #[error("{at}: expected </{expected}>, found </{found}>")]
    MismatchedEndTag {
        at: Position,
        expected: String,
        found: String,
    },

    /// An end tag with no open element.
    #[error("{at}: expected end of document, found </{found}>")]
    UnmatchedEndTag { at: Position, found: String },

    /// The input ended inside the document.
    #[error("{at}: unexpected end of input: expected {expected}")]
    UnexpectedEof { at: Position, expected: String },

    /// Any other violation of XML 1.0 or Namespaces in XML 1.0 syntax.
    #[error("{at}: expected {expected}, found {found}")]
    Syntax {
        at: Position,
        expected: &'static str,
        found: String,
    },

    /// The same attribute twice on one element (by name, or by namespace URI
    /// and local name).
    #[error("{at}: duplicate attribute {name}")]
    DuplicateAttribute { at: Position, name: String },

    /// A prefix used on an element or attribute but never bound by `xmlns:`.
    #[error("{at}: namespace prefix \"{prefix}\" is not declared")]
    UndeclaredPrefix { at: Position, prefix: String },

    /// The root element is not `ODM` in the ODM 1.3 namespace.
    #[error(
        "{at}: expected root element ODM in namespace http://www.cdisc.org/ns/odm/v1.3, found {found}"
    )]
    NotOdm13 { at: Position, found: String },

    /// An ODM element lacks an attribute the reader needs to key its data.
    #[error("{at}: expected attribute {attribute} on {element}")]
    MissingAttribute {
        at: Position,
        element: &'static str,
        attribute: &'static str,
    },

    /// Nesting deeper than the reader accepts (ODM needs about a dozen).
    #[error("{at}: elements nested more than {limit} deep")]
    TooDeep { at: Position, limit: usize },

    /// A single tag, text run, comment or declaration larger than the
    /// reader buffers (this bounds memory on hostile input).
    #[error("{at}: a single tag or text run is longer than {limit} bytes")]
    TokenTooLarge { at: Position, limit: usize },
}

impl OdmError {
    /// Where the error is in the input.
    pub fn position(&self) -> Position {
        match self {
            Self::Io { at, .. }
            | Self::InvalidUtf8 { at }
            | Self::NonAscii { at }
            | Self::UnsupportedEncoding { at, .. }
            | Self::Utf16 { at }
            | Self::Doctype { at }
            | Self::IllegalChar { at, .. }
            | Self::UnknownEntity { at }
            | Self::BadCharRef { at }
            | Self::MismatchedEndTag { at, .. }
            | Self::UnmatchedEndTag { at, .. }
            | Self::UnexpectedEof { at, .. }
            | Self::Syntax { at, .. }
            | Self::DuplicateAttribute { at, .. }
            | Self::UndeclaredPrefix { at, .. }
            | Self::NotOdm13 { at, .. }
            | Self::MissingAttribute { at, .. }
            | Self::TooDeep { at, .. }
            | Self::TokenTooLarge { at, .. } => *at,
        }
    }

    /// Whether trying again may succeed: only a failing input stream (a
    /// dropped HTTP body) is; a malformed document stays malformed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Io { .. })
    }
}
