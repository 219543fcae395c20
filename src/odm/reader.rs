//! The pull reader: one state machine, driven by a blocking loop over
//! [`BufRead`] and by an async loop over [`AsyncBufRead`].
//!
//! quick-xml cuts the bytes into events; [`Core`] checks each event against
//! XML 1.0 and Namespaces in XML (see [`super::xml`]), keeps the element
//! stack, recognises ODM elements by namespace URI and place, counts them,
//! and (unless it only counts) builds one [`Subject`] or [`Study`] at a time.
//! Nothing else of the document is held: memory is the largest subject or
//! study plus one event's bytes, and a single event is capped at
//! [`MAX_TOKEN`] bytes so hostile input cannot make it grow without bound.
//!
//! Where ODM elements are recognised: `Study` and `ClinicalData` under the
//! root `ODM`; the metadata definitions under `Study/MetaDataVersion`; the
//! clinical data only as `ClinicalData/SubjectData/StudyEventData/FormData/
//! ItemGroupData/ItemData`. Any other element (OpenClinica audit logs and
//! discrepancy notes, `Annotation`, `Signature`, unknown extensions, an ODM
//! element out of place) is skipped with everything inside it, though still
//! checked for well-formedness. `OpenClinica:AuditLog` entries under a
//! subject are read for their `ID` and `DateTimeStamp` only.

use std::io::{self, BufRead};
use std::pin::Pin;
use std::task::{Context, Poll};

use quick_xml::events::Event;
use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};

use super::error::{OdmError, Position};
use super::model::{
    CodeList, CodeListItem, Form, FormDef, Item, ItemDef, ItemGroup, ItemGroupDef, MetaDataVersion,
    Record, Study, StudyEvent, StudyEventDef, Subject,
};
use super::namespaces::{DeclError, Namespaces, Ns};
use super::stats::Stats;
use super::xml::{self, Discard, Fault, Issue, RawAttr};

/// The largest single tag, text run, comment or declaration accepted, in
/// bytes. ODM tags are a few hundred bytes; this only stops runaway input.
pub const MAX_TOKEN: usize = 32 << 20;

/// The deepest element nesting accepted. ODM needs about a dozen levels.
pub const MAX_DEPTH: usize = 4096;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// What an element is, decided from its namespace, local name and parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Odm,
    Study,
    GlobalVariables,
    StudyName,
    ProtocolName,
    MetaDataVersion,
    StudyEventDef,
    FormRef,
    FormDef,
    FormDetails,
    ItemGroupRef,
    ItemGroupDef,
    ItemRef,
    ItemDef,
    CodeListRef,
    CodeList,
    CodeListItem,
    Decode,
    TranslatedText,
    ClinicalData,
    SubjectData,
    StudyEventData,
    FormData,
    ItemGroupData,
    ItemData,
    AuditLogs,
    AuditLog,
    /// Not data: skipped with all it holds.
    Skip,
}

impl Kind {
    /// The child kind of an element named `local` in namespace `ns` inside
    /// an element of kind `self`.
    fn child(self, ns: Ns, local: &[u8]) -> Kind {
        use Kind::*;
        match (self, ns) {
            (Skip, _) => Skip,
            (Odm, Ns::Odm) => match local {
                b"Study" => Study,
                b"ClinicalData" => ClinicalData,
                _ => Skip,
            },
            (Study, Ns::Odm) => match local {
                b"GlobalVariables" => GlobalVariables,
                b"MetaDataVersion" => MetaDataVersion,
                _ => Skip,
            },
            (GlobalVariables, Ns::Odm) => match local {
                b"StudyName" => StudyName,
                b"ProtocolName" => ProtocolName,
                _ => Skip,
            },
            (MetaDataVersion, Ns::Odm) => match local {
                b"StudyEventDef" => StudyEventDef,
                b"FormDef" => FormDef,
                b"ItemGroupDef" => ItemGroupDef,
                b"ItemDef" => ItemDef,
                b"CodeList" => CodeList,
                _ => Skip,
            },
            (StudyEventDef, Ns::Odm) if local == b"FormRef" => FormRef,
            (FormDef, Ns::Odm) if local == b"ItemGroupRef" => ItemGroupRef,
            (FormDef, Ns::OcExt) if local == b"FormDetails" => FormDetails,
            (ItemGroupDef, Ns::Odm) if local == b"ItemRef" => ItemRef,
            (ItemDef, Ns::Odm) if local == b"CodeListRef" => CodeListRef,
            (CodeList, Ns::Odm) if local == b"CodeListItem" || local == b"EnumeratedItem" => {
                CodeListItem
            }
            (CodeListItem, Ns::Odm) if local == b"Decode" => Decode,
            (Decode, Ns::Odm) if local == b"TranslatedText" => TranslatedText,
            (ClinicalData, Ns::Odm) if local == b"SubjectData" => SubjectData,
            (SubjectData, Ns::Odm) if local == b"StudyEventData" => StudyEventData,
            (StudyEventData, Ns::Odm) if local == b"FormData" => FormData,
            (FormData, Ns::Odm) if local == b"ItemGroupData" => ItemGroupData,
            (ItemGroupData, Ns::Odm) if local == b"ItemData" => ItemData,
            (SubjectData | StudyEventData | FormData | ItemGroupData | ItemData, Ns::OcExt)
                if local == b"AuditLogs" =>
            {
                AuditLogs
            }
            (AuditLogs, Ns::OcExt) if local == b"AuditLog" => AuditLog,
            _ => Skip,
        }
    }

    /// The element name, for error messages.
    fn name(self) -> &'static str {
        use Kind::*;
        match self {
            Odm => "ODM",
            Study => "Study",
            GlobalVariables => "GlobalVariables",
            StudyName => "StudyName",
            ProtocolName => "ProtocolName",
            MetaDataVersion => "MetaDataVersion",
            StudyEventDef => "StudyEventDef",
            FormRef => "FormRef",
            FormDef => "FormDef",
            FormDetails => "OpenClinica:FormDetails",
            ItemGroupRef => "ItemGroupRef",
            ItemGroupDef => "ItemGroupDef",
            ItemRef => "ItemRef",
            ItemDef => "ItemDef",
            CodeListRef => "CodeListRef",
            CodeList => "CodeList",
            CodeListItem => "CodeListItem",
            Decode => "Decode",
            TranslatedText => "TranslatedText",
            ClinicalData => "ClinicalData",
            SubjectData => "SubjectData",
            StudyEventData => "StudyEventData",
            FormData => "FormData",
            ItemGroupData => "ItemGroupData",
            ItemData => "ItemData",
            AuditLogs => "OpenClinica:AuditLogs",
            AuditLog => "OpenClinica:AuditLog",
            Skip => "element",
        }
    }

    /// The attribute without which the element's data cannot be keyed.
    fn required(self) -> Option<&'static str> {
        use Kind::*;
        Some(match self {
            Study | MetaDataVersion | StudyEventDef | FormDef | ItemGroupDef | ItemDef
            | CodeList => "OID",
            FormRef => "FormOID",
            ItemGroupRef => "ItemGroupOID",
            ItemRef => "ItemOID",
            CodeListRef => "CodeListOID",
            CodeListItem => "CodedValue",
            ClinicalData => "StudyOID",
            SubjectData => "SubjectKey",
            StudyEventData => "StudyEventOID",
            FormData => "FormOID",
            ItemGroupData => "ItemGroupOID",
            ItemData => "ItemOID",
            _ => return None,
        })
    }

    /// Elements whose text content is kept.
    fn keeps_text(self) -> bool {
        matches!(
            self,
            Kind::StudyName | Kind::ProtocolName | Kind::TranslatedText
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the root element.
    Prolog,
    /// Inside the root element.
    Body,
    /// After the root element.
    Epilog,
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    kind: Kind,
    /// Start of the element's qualified name in `Core::names`.
    name: usize,
    /// Namespace bindings to restore at the end tag.
    ns_mark: usize,
}

/// What the drivers do after an event.
pub(crate) enum Step {
    Continue,
    Record(Record),
    End,
}

/// The state machine shared by both drivers.
pub(crate) struct Core {
    /// Build records (otherwise only count).
    build: bool,
    /// Bytes consumed before quick-xml saw the input (a BOM).
    base: u64,
    /// Line number at the start of the current event.
    line: u64,
    /// Offset of the first byte of that line.
    line_start: u64,
    /// The declaration said US-ASCII.
    ascii_only: bool,
    seen_event: bool,
    /// Where the XML declaration may be: after the BOM, if any.
    prolog_start: u64,
    phase: Phase,
    names: Vec<u8>,
    frames: Vec<Frame>,
    ns: Namespaces,
    attrs: Vec<RawAttr>,
    attr_ns: Vec<Ns>,
    stats: Stats,
    /// Text of the current text-keeping element.
    text: String,
    study: Option<Study>,
    clinical_study: String,
    clinical_mdv: Option<String>,
    subject: Option<Subject>,
}

/// Line accounting of one event, applied once the event is accepted.
struct Lines {
    count: u64,
    last_start: Option<u64>,
}

impl Lines {
    const NONE: Lines = Lines {
        count: 0,
        last_start: None,
    };

    /// Line breaks in `bytes` (at absolute offset `start`), when it is only
    /// spaces, tabs and line feeds (the text between tags); `None` otherwise.
    #[inline]
    fn of_blank(bytes: &[u8], start: u64) -> Option<Lines> {
        let mut lines = Lines::NONE;
        for (i, &b) in bytes.iter().enumerate() {
            match b {
                b' ' | b'\t' => {}
                b'\n' => {
                    lines.count += 1;
                    lines.last_start = Some(start + i as u64 + 1);
                }
                _ => return None,
            }
        }
        Some(lines)
    }
}

impl Core {
    pub(crate) fn new(build: bool) -> Self {
        Core {
            build,
            base: 0,
            line: 1,
            line_start: 0,
            ascii_only: false,
            seen_event: false,
            prolog_start: 0,
            phase: Phase::Prolog,
            names: Vec::new(),
            frames: Vec::new(),
            ns: Namespaces::default(),
            attrs: Vec::new(),
            attr_ns: Vec::new(),
            stats: Stats::default(),
            text: String::new(),
            study: None,
            clinical_study: String::new(),
            clinical_mdv: None,
            subject: None,
        }
    }

    /// The position of absolute offset `at`, which lies in or just after
    /// `bytes`, a slice starting at absolute offset `start` on the current
    /// line.
    fn locate(&self, bytes: &[u8], start: u64, at: u64) -> Position {
        let within = at.saturating_sub(start).min(bytes.len() as u64) as usize;
        let (lines, last) = xml::count_lines(&bytes[..within]);
        let line_start = last.map_or(self.line_start, |l| start + l as u64);
        Position {
            line: self.line + lines,
            column: at.saturating_sub(line_start) + 1,
            offset: at,
        }
    }

    /// Position of an absolute offset before or at the current event start.
    fn here(&self, at: u64) -> Position {
        self.locate(&[], at, at)
    }

    /// Turns a [`Fault`] inside `bytes` (at absolute `start`) into an error.
    fn fault(&self, fault: Fault, bytes: &[u8], start: u64) -> OdmError {
        let at = self.locate(bytes, start, start + fault.at as u64);
        match fault.issue {
            // NUL in the first two bytes: UTF-16 (or UTF-32) that the first
            // read was too short to recognise.
            Issue::IllegalChar(0) if at.offset < 2 => OdmError::Utf16 { at: self.here(0) },
            Issue::Syntax { expected, found } => OdmError::Syntax {
                at,
                expected,
                found,
            },
            Issue::UnknownEntity => OdmError::UnknownEntity { at },
            Issue::BadCharRef => OdmError::BadCharRef { at },
            Issue::IllegalChar(code) => OdmError::IllegalChar { at, code },
            Issue::NonAscii => OdmError::NonAscii { at },
        }
    }

    /// Checks the characters of an event's bytes and works out its lines.
    #[inline]
    fn scan(&self, text: &str, start: u64) -> Result<Lines, OdmError> {
        let bytes = text.as_bytes();
        let scan = xml::scan(bytes);
        if scan.suspicious {
            if start == 0 && bytes.starts_with(BOM) {
                // A BOM quick-xml saw (the first read was too short for us
                // to strip it); legal here and only here.
                xml::check_chars(&text[3..], self.ascii_only)
                    .map_err(|f| self.fault(Fault { at: f.at + 3, ..f }, bytes, start))?;
            } else {
                xml::check_chars(text, self.ascii_only).map_err(|f| self.fault(f, bytes, start))?;
            }
            let (count, last) = xml::count_lines(bytes);
            return Ok(Lines {
                count,
                last_start: last.map(|l| start + l as u64),
            });
        }
        if scan.line_feeds == 0 {
            return Ok(Lines {
                count: 0,
                last_start: None,
            });
        }
        let last = memchr::memrchr(b'\n', bytes).map(|l| start + l as u64 + 1);
        Ok(Lines {
            count: scan.line_feeds as u64,
            last_start: last,
        })
    }

    fn commit(&mut self, lines: Lines) {
        self.line += lines.count;
        if let Some(start) = lines.last_start {
            self.line_start = start;
        }
    }

    /// Handles one event. `pos` is quick-xml's offset before the event.
    pub(crate) fn event(&mut self, event: Event<'_>, pos: u64) -> Result<Step, OdmError> {
        let pos = pos + self.base;
        if let Event::Text(t) = &event
            && pos == 0
            && t.as_bytes() == BOM
        {
            // A BOM that reached quick-xml (the first read was too short to
            // strip it): the declaration may still follow it.
            self.prolog_start = 3;
            self.line_start = 0;
            return Ok(Step::Continue);
        }
        let first = !self.seen_event;
        self.seen_event = true;
        let (lines, step) = match event {
            Event::Start(e) => self.start(&e, pos + 1, pos, false)?,
            Event::Empty(e) => self.start(&e, pos + 1, pos, true)?,
            Event::End(e) => self.end(&e, pos + 2, pos)?,
            Event::Text(t) => {
                let (lines, blank) = match Lines::of_blank(t.as_bytes(), pos) {
                    Some(lines) => (lines, true),
                    None => (self.scan(&t, pos)?, false),
                };
                self.text_event(&t, pos, blank)?;
                (lines, Step::Continue)
            }
            Event::GeneralRef(r) => {
                let lines = self.scan(&r, pos + 1)?;
                self.reference(r.as_bytes(), pos)?;
                (lines, Step::Continue)
            }
            Event::CData(c) => {
                let lines = self.scan(&c, pos + 9)?;
                if self.phase != Phase::Body {
                    return Err(self.outside_root(pos, "a CDATA section"));
                }
                if self.keeps_text() {
                    xml::push_text(&c, &mut self.text);
                }
                (lines, Step::Continue)
            }
            Event::Comment(c) => {
                let lines = self.scan(&c, pos + 4)?;
                let bytes = c.as_bytes();
                if let Some(i) = memchr::memmem::find(bytes, b"--") {
                    return Err(self.fault(
                        Fault {
                            at: i,
                            issue: Issue::Syntax {
                                expected: "a comment without '--'",
                                found: "'--'".to_owned(),
                            },
                        },
                        bytes,
                        pos + 4,
                    ));
                }
                if bytes.last() == Some(&b'-') {
                    return Err(self.fault(
                        Fault {
                            at: bytes.len() - 1,
                            issue: Issue::Syntax {
                                expected: "'-->' after a character other than '-'",
                                found: "'--->'".to_owned(),
                            },
                        },
                        bytes,
                        pos + 4,
                    ));
                }
                (lines, Step::Continue)
            }
            Event::PI(p) => {
                let lines = self.scan(&p, pos + 2)?;
                self.processing_instruction(p.as_bytes(), pos + 2)?;
                (lines, Step::Continue)
            }
            Event::Decl(d) => {
                let lines = self.scan(&d, pos + 2)?;
                if !first || pos != self.prolog_start {
                    return Err(OdmError::Syntax {
                        at: self.here(pos),
                        expected: "the XML declaration only at the very start of the document",
                        found: "'<?xml'".to_owned(),
                    });
                }
                self.declaration(d.as_bytes(), pos + 2)?;
                (lines, Step::Continue)
            }
            Event::DocType(_) => return Err(OdmError::Doctype { at: self.here(pos) }),
            Event::Eof => return self.eof(pos),
        };
        self.commit(lines);
        Ok(step)
    }

    fn keeps_text(&self) -> bool {
        self.build && self.frames.last().is_some_and(|f| f.kind.keeps_text())
    }

    fn outside_root(&self, pos: u64, found: &str) -> OdmError {
        OdmError::Syntax {
            at: self.here(pos),
            expected: if self.phase == Phase::Prolog {
                "the root element ODM"
            } else {
                "end of document (after the root element only comments and processing instructions)"
            },
            found: found.to_owned(),
        }
    }

    fn eof(&mut self, pos: u64) -> Result<Step, OdmError> {
        match self.phase {
            Phase::Epilog => Ok(Step::End),
            Phase::Prolog => Err(OdmError::UnexpectedEof {
                at: self.here(pos),
                expected: "the root element ODM".to_owned(),
            }),
            Phase::Body => {
                let top = self.frames.last().map_or(0, |f| f.name);
                Err(OdmError::UnexpectedEof {
                    at: self.here(pos),
                    expected: format!("</{}>", String::from_utf8_lossy(&self.names[top..])),
                })
            }
        }
    }

    fn text_event(&mut self, text: &str, pos: u64, blank: bool) -> Result<(), OdmError> {
        let bytes = text.as_bytes();
        if blank {
            if self.keeps_text() {
                xml::push_text(text, &mut self.text);
            }
            return Ok(());
        }
        if self.phase != Phase::Body {
            let skip = if pos == 0 && bytes.starts_with(BOM) {
                3
            } else {
                0
            };
            if let Some(i) = bytes[skip..].iter().position(|&b| !xml::is_space(b)) {
                let at = self.locate(bytes, pos, pos + (skip + i) as u64);
                return Err(OdmError::Syntax {
                    at,
                    expected: if self.phase == Phase::Prolog {
                        "the root element ODM"
                    } else {
                        "end of document (after the root element only comments and processing instructions)"
                    },
                    found: "text".to_owned(),
                });
            }
            return Ok(());
        }
        if memchr::memchr(b'>', bytes).is_some()
            && let Some(i) = xml::find_cdata_end(bytes)
        {
            return Err(self.fault(
                Fault {
                    at: i,
                    issue: Issue::Syntax {
                        expected: "character data without ']]>'",
                        found: "']]>'".to_owned(),
                    },
                },
                bytes,
                pos,
            ));
        }
        if self.keeps_text() {
            xml::push_text(text, &mut self.text);
        }
        Ok(())
    }

    fn reference(&mut self, name: &[u8], pos: u64) -> Result<(), OdmError> {
        if self.phase != Phase::Body {
            return Err(self.outside_root(pos, "a reference"));
        }
        let c = xml::resolve_reference(name)
            .map_err(|issue| self.fault(Fault { at: 0, issue }, &[], pos))?;
        if self.keeps_text() {
            self.text.push(c);
        }
        Ok(())
    }

    fn processing_instruction(&self, content: &[u8], start: u64) -> Result<(), OdmError> {
        let end = content
            .iter()
            .position(|&b| xml::is_space(b))
            .unwrap_or(content.len());
        let target = &content[..end];
        const EXPECTED: &str = "a processing instruction target name";
        match xml::check_qname(target) {
            Ok(None) => {}
            Ok(Some(colon)) => {
                return Err(self.fault(Fault::syntax(colon, EXPECTED, content), content, start));
            }
            Err(f) => return Err(self.fault(f, content, start)),
        }
        if target.eq_ignore_ascii_case(b"xml") {
            return Err(self.fault(
                Fault {
                    at: 0,
                    issue: Issue::Syntax {
                        expected: "a processing instruction target other than 'xml'",
                        found: "'xml'".to_owned(),
                    },
                },
                content,
                start,
            ));
        }
        Ok(())
    }

    /// `<?xml version="1.0" encoding="…" standalone="…"?>`, in that order.
    fn declaration(&mut self, content: &[u8], start: u64) -> Result<(), OdmError> {
        let mut attrs = Vec::new();
        xml::parse_attributes(content, 3, &mut attrs).map_err(|f| self.fault(f, content, start))?;
        let wrong = |core: &Core, at: usize, expected: &'static str| {
            core.fault(Fault::syntax(at, expected, content), content, start)
        };
        let mut it = attrs.iter().peekable();
        let mut next_named = |name: &[u8]| {
            it.next_if(|a| &content[a.name.clone()] == name)
                .map(|a| (a.value.start, &content[a.value.clone()]))
        };
        let Some((at, version)) = next_named(b"version") else {
            return Err(wrong(
                self,
                3,
                "version=\"1.0\" first in the XML declaration",
            ));
        };
        let version_ok = version.len() >= 3
            && version.starts_with(b"1.")
            && version[2..].iter().all(u8::is_ascii_digit);
        if !version_ok {
            return Err(wrong(self, at, "XML version 1.0"));
        }
        if let Some((at, encoding)) = next_named(b"encoding") {
            if encoding.eq_ignore_ascii_case(b"US-ASCII") || encoding.eq_ignore_ascii_case(b"ASCII")
            {
                self.ascii_only = true;
            } else if !encoding.eq_ignore_ascii_case(b"UTF-8") {
                let encoding = String::from_utf8_lossy(encoding);
                return Err(OdmError::UnsupportedEncoding {
                    at: self.locate(content, start, start + at as u64),
                    encoding: encoding.chars().take(40).collect(),
                });
            }
        }
        if let Some((at, standalone)) = next_named(b"standalone")
            && standalone != b"yes"
            && standalone != b"no"
        {
            return Err(wrong(self, at, "standalone=\"yes\" or \"no\""));
        }
        if let Some(extra) = it.next() {
            return Err(wrong(
                self,
                extra.name.start,
                "only version, encoding and standalone in the XML declaration",
            ));
        }
        Ok(())
    }

    fn start(
        &mut self,
        tag: &str,
        start: u64,
        pos: u64,
        empty: bool,
    ) -> Result<(Lines, Step), OdmError> {
        let bytes = tag.as_bytes();
        let (name_end, colon, plain_name) = match xml::fast_qname(bytes, 0) {
            Some((end, colon)) if end == bytes.len() || xml::is_space(bytes[end]) => {
                (end, colon, true)
            }
            _ => {
                // An unusual name: characters first (a bad one is the
                // earlier error), then the thorough name check.
                self.scan(tag, start)?;
                let end = bytes
                    .iter()
                    .position(|&b| xml::is_space(b))
                    .unwrap_or(bytes.len());
                let colon =
                    xml::check_qname(&bytes[..end]).map_err(|f| self.fault(f, bytes, start))?;
                (end, colon, false)
            }
        };
        let name = &bytes[..name_end];
        if self.phase == Phase::Epilog {
            return Err(OdmError::Syntax {
                at: self.here(pos),
                expected: "end of document (one root element only)",
                found: format!("<{}>", short(name)),
            });
        }
        if self.frames.len() >= MAX_DEPTH {
            return Err(OdmError::TooDeep {
                at: self.here(pos),
                limit: MAX_DEPTH,
            });
        }
        self.attrs.clear();
        let info = match xml::parse_attributes(bytes, name_end, &mut self.attrs) {
            Ok(info) => info,
            Err(f) => {
                self.scan(tag, start)?;
                return Err(self.fault(f, bytes, start));
            }
        };
        // A tag of printable ASCII and spaces has no line break and no
        // character to check: skip the scan.
        let lines = if plain_name && info.clean {
            Lines::NONE
        } else {
            self.scan(tag, start)?
        };

        let ns_mark = self.ns.mark();
        self.attributes(tag, start, info.declares)?;

        let (ns, local) = match colon {
            None => (self.ns.default_ns(), name),
            Some(c) => match self.ns.resolve(&name[..c]) {
                Some((ns, _)) => (ns, &name[c + 1..]),
                None => {
                    return Err(OdmError::UndeclaredPrefix {
                        at: self.here(pos),
                        prefix: String::from_utf8_lossy(&name[..c]).into_owned(),
                    });
                }
            },
        };

        let kind = match self.frames.last() {
            Some(parent) => parent.kind.child(ns, local),
            None => self.root(tag, start, pos, ns, local, colon)?,
        };
        self.frames.push(Frame {
            kind,
            name: self.names.len(),
            ns_mark,
        });
        self.names.extend_from_slice(name);
        if kind != Kind::Skip {
            self.open(kind, tag, start, pos)?;
        }
        if empty {
            return Ok((lines, self.close()));
        }
        Ok((lines, Step::Continue))
    }

    /// Checks the root element is ODM 1.3.
    fn root(
        &mut self,
        tag: &str,
        start: u64,
        pos: u64,
        ns: Ns,
        local: &[u8],
        colon: Option<usize>,
    ) -> Result<Kind, OdmError> {
        let bytes = tag.as_bytes();
        if ns != Ns::Odm || local != b"ODM" {
            let uri = match colon {
                None => self.ns.default_uri().to_vec(),
                Some(c) => self
                    .ns
                    .resolve(&bytes[..c])
                    .map_or(Vec::new(), |(_, uri)| uri.to_vec()),
            };
            let local = String::from_utf8_lossy(local);
            let found = if uri.is_empty() {
                format!("{local} in no namespace")
            } else {
                format!("{local} in namespace {}", String::from_utf8_lossy(&uri))
            };
            return Err(OdmError::NotOdm13 {
                at: self.here(pos),
                found,
            });
        }
        if let Some(i) = self.find(bytes, Ns::None, b"ODMVersion") {
            let version = self.value(tag, i, start)?;
            if !(version == "1.3" || version.starts_with("1.3.")) {
                let at = self.here(start + self.attrs[i].value.start as u64);
                return Err(OdmError::NotOdm13 {
                    at,
                    found: "ODMVersion other than 1.3".to_owned(),
                });
            }
        }
        self.phase = Phase::Body;
        Ok(Kind::Odm)
    }

    /// Namespace declarations, attribute prefixes, duplicate attributes and
    /// references in values: everything about attributes XML requires.
    fn attributes(&mut self, tag: &str, start: u64, declares: bool) -> Result<(), OdmError> {
        let bytes = tag.as_bytes();
        // Declarations first: they apply to the element's own name and to
        // its other attributes.
        for i in 0..if declares { self.attrs.len() } else { 0 } {
            let a = &self.attrs[i];
            let name = &bytes[a.name.clone()];
            if !name.starts_with(b"xmlns") {
                continue;
            }
            let prefix: &[u8] = match a.colon {
                None if name == b"xmlns" => b"",
                Some(5) => &name[6..],
                _ => continue,
            };
            let value = self.value(tag, i, start)?;
            let a = &self.attrs[i];
            if let Err(e) = self.ns.declare(prefix, value.as_bytes()) {
                return Err(OdmError::Syntax {
                    at: self.locate(bytes, start, start + a.name.start as u64),
                    expected: match e {
                        DeclError::EmptyPrefixedUri => {
                            "a namespace URI (a prefix cannot be bound to \"\")"
                        }
                        DeclError::Reserved => {
                            "a namespace declaration that leaves the reserved prefixes xml and xmlns alone"
                        }
                    },
                    found: short(name),
                });
            }
        }
        self.attr_ns.clear();
        for a in &self.attrs {
            let name = &bytes[a.name.clone()];
            let ns = match a.colon {
                None => Ns::None,
                Some(5) if name.starts_with(b"xmlns:") => Ns::Other,
                Some(c) => match self.ns.resolve(&name[..c]) {
                    Some((ns, _)) => ns,
                    None => {
                        return Err(OdmError::UndeclaredPrefix {
                            at: self.locate(bytes, start, start + a.name.start as u64),
                            prefix: String::from_utf8_lossy(&name[..c]).into_owned(),
                        });
                    }
                },
            };
            self.attr_ns.push(ns);
            if a.special && memchr::memchr(b'&', &bytes[a.value.clone()]).is_some() {
                let raw = &tag[a.value.clone()];
                xml::normalize_value(raw, &mut Discard).map_err(|f| {
                    self.fault(
                        Fault {
                            at: f.at + a.value.start,
                            ..f
                        },
                        bytes,
                        start,
                    )
                })?;
            }
        }
        if self.attrs.len() > 1 {
            self.duplicates(bytes, start)?;
        }
        Ok(())
    }

    /// Two attributes with the same name, or with prefixes bound to the same
    /// URI and the same local name, are an error.
    fn duplicates(&self, bytes: &[u8], start: u64) -> Result<(), OdmError> {
        let attrs = &self.attrs;
        let report = |core: &Core, a: &RawAttr| OdmError::DuplicateAttribute {
            at: core.locate(bytes, start, start + a.name.start as u64),
            name: short(&bytes[a.name.clone()]),
        };
        // Same raw name: compare cheap fingerprints pairwise (elements have
        // a handful of attributes), names only when fingerprints agree.
        if attrs.len() <= 16 {
            let mut fps = [0u64; 16];
            for (j, a) in attrs.iter().enumerate() {
                let name = &bytes[a.name.clone()];
                let fp = fingerprint(name);
                for (i, &other) in fps[..j].iter().enumerate() {
                    if other == fp && bytes[attrs[i].name.clone()] == *name {
                        return Err(report(self, a));
                    }
                }
                fps[j] = fp;
            }
        } else {
            let mut seen = std::collections::HashSet::with_capacity(attrs.len());
            for a in attrs {
                if !seen.insert(&bytes[a.name.clone()]) {
                    return Err(report(self, a));
                }
            }
        }
        // Same namespace and local name under different prefixes: only
        // possible when two different prefixes are used.
        let prefix = |a: &RawAttr| a.colon.map(|c| &bytes[a.name.start..a.name.start + c]);
        let mut prefixes = attrs.iter().filter_map(prefix).filter(|p| *p != b"xmlns");
        let first = prefixes.next();
        if prefixes.all(|p| Some(p) == first) {
            return Ok(());
        }
        let expanded = |a: &RawAttr| -> Option<(&[u8], &[u8])> {
            let c = a.colon?;
            let name = &bytes[a.name.clone()];
            if name.starts_with(b"xmlns:") {
                return None;
            }
            let uri = self.ns.resolve(&name[..c]).map_or(&[][..], |(_, u)| u);
            Some((uri, &name[c + 1..]))
        };
        for (j, b) in attrs.iter().enumerate() {
            let Some(eb) = expanded(b) else { continue };
            if attrs[..j].iter().any(|a| expanded(a) == Some(eb)) {
                return Err(report(self, b));
            }
        }
        Ok(())
    }

    /// Index of the attribute `local` in namespace `ns` (no namespace for
    /// unprefixed names; OpenClinica's for `OpenClinica:…` whatever the
    /// prefix).
    #[inline]
    fn find(&self, bytes: &[u8], ns: Ns, local: &[u8]) -> Option<usize> {
        self.attrs.iter().zip(&self.attr_ns).position(|(a, &a_ns)| {
            a_ns == ns
                && match a.colon {
                    None => &bytes[a.name.clone()] == local,
                    Some(c) => &bytes[a.name.start + c + 1..a.name.end] == local,
                }
        })
    }

    /// The normalised value of attribute `i`.
    fn value(&self, tag: &str, i: usize, start: u64) -> Result<String, OdmError> {
        let a = &self.attrs[i];
        let raw = &tag[a.value.clone()];
        if !a.special {
            return Ok(raw.to_owned());
        }
        let mut out = String::with_capacity(raw.len());
        xml::normalize_value(raw, &mut out).map_err(|f| {
            self.fault(
                Fault {
                    at: f.at + a.value.start,
                    ..f
                },
                tag.as_bytes(),
                start,
            )
        })?;
        Ok(out)
    }

    fn get(&self, tag: &str, start: u64, ns: Ns, local: &[u8]) -> Result<Option<String>, OdmError> {
        match self.find(tag.as_bytes(), ns, local) {
            Some(i) => self.value(tag, i, start).map(Some),
            None => Ok(None),
        }
    }

    fn opt(&self, tag: &str, start: u64, local: &[u8]) -> Result<Option<String>, OdmError> {
        self.get(tag, start, Ns::None, local)
    }

    fn oc(&self, tag: &str, start: u64, local: &[u8]) -> Result<Option<String>, OdmError> {
        self.get(tag, start, Ns::OcExt, local)
    }

    fn yes(&self, tag: &str, start: u64, local: &[u8]) -> Result<bool, OdmError> {
        Ok(self.opt(tag, start, local)?.as_deref() == Some("Yes"))
    }

    /// Counts the element and, when building, starts its record.
    fn open(&mut self, kind: Kind, tag: &str, start: u64, pos: u64) -> Result<(), OdmError> {
        let bytes = tag.as_bytes();
        let required = match kind.required() {
            Some(attr) => match self.find(bytes, Ns::None, attr.as_bytes()) {
                Some(i) => Some(i),
                None => {
                    return Err(OdmError::MissingAttribute {
                        at: self.here(pos),
                        element: kind.name(),
                        attribute: attr,
                    });
                }
            },
            None => None,
        };
        match kind {
            Kind::SubjectData => self.stats.subjects += 1,
            Kind::StudyEventData => self.stats.study_events += 1,
            Kind::FormData => self.stats.forms += 1,
            Kind::ItemGroupData => self.stats.item_groups += 1,
            Kind::ItemData => {
                self.stats.items += 1;
                if let Some(i) = self.find(bytes, Ns::None, b"IsNull") {
                    let a = &self.attrs[i];
                    let is_null = if a.special {
                        self.value(tag, i, start)? == "Yes"
                    } else {
                        &bytes[a.value.clone()] == b"Yes"
                    };
                    if is_null {
                        self.stats.null_items += 1;
                    }
                }
            }
            Kind::AuditLog => self.stats.audit_logs += 1,
            _ => {}
        }
        if !self.build {
            return Ok(());
        }
        let key = match required {
            Some(i) => self.value(tag, i, start)?,
            None => String::new(),
        };
        match kind {
            Kind::ClinicalData => {
                self.clinical_study = key;
                self.clinical_mdv = self.opt(tag, start, b"MetaDataVersionOID")?;
            }
            Kind::SubjectData => {
                self.subject = Some(Subject {
                    study_oid: self.clinical_study.clone(),
                    metadata_version_oid: self.clinical_mdv.clone(),
                    subject_key: key,
                    study_subject_id: self.oc(tag, start, b"StudySubjectID")?,
                    unique_identifier: self.oc(tag, start, b"UniqueIdentifier")?,
                    secondary_id: self.oc(tag, start, b"SecondaryID")?,
                    status: self.oc(tag, start, b"Status")?,
                    sex: self.oc(tag, start, b"Sex")?,
                    date_of_birth: self.oc(tag, start, b"DateOfBirth")?,
                    year_of_birth: self.oc(tag, start, b"YearOfBirth")?,
                    enrollment_date: self.oc(tag, start, b"EnrollmentDate")?,
                    events: Vec::new(),
                    audit: Default::default(),
                });
            }
            Kind::StudyEventData => {
                let event = StudyEvent {
                    oid: key,
                    repeat_key: self.opt(tag, start, b"StudyEventRepeatKey")?,
                    start_date: self.oc(tag, start, b"StartDate")?,
                    end_date: self.oc(tag, start, b"EndDate")?,
                    status: self.oc(tag, start, b"Status")?,
                    forms: Vec::new(),
                };
                if let Some(s) = &mut self.subject {
                    s.events.push(event);
                }
            }
            Kind::FormData => {
                let form = Form {
                    oid: key,
                    version: self.oc(tag, start, b"Version")?,
                    status: self.oc(tag, start, b"Status")?,
                    interview_date: self.oc(tag, start, b"InterviewDate")?,
                    interviewer_name: self.oc(tag, start, b"InterviewerName")?,
                    created_date: self.oc(tag, start, b"CreatedDate")?,
                    updated_date: self.oc(tag, start, b"UpdatedDate")?,
                    item_groups: Vec::new(),
                };
                if let Some(e) = self.subject.as_mut().and_then(|s| s.events.last_mut()) {
                    e.forms.push(form);
                }
            }
            Kind::ItemGroupData => {
                let group = ItemGroup {
                    oid: key,
                    repeat_key: self.opt(tag, start, b"ItemGroupRepeatKey")?,
                    transaction_type: self.opt(tag, start, b"TransactionType")?,
                    items: Vec::new(),
                };
                if let Some(f) = self.current_form() {
                    f.item_groups.push(group);
                }
            }
            Kind::ItemData => {
                let value = if self.yes(tag, start, b"IsNull")? {
                    None
                } else {
                    self.opt(tag, start, b"Value")?
                };
                let item = Item {
                    oid: key,
                    value,
                    reason_for_null: self.oc(tag, start, b"ReasonForNull")?,
                };
                if let Some(g) = self.current_form().and_then(|f| f.item_groups.last_mut()) {
                    g.items.push(item);
                }
            }
            Kind::AuditLog => {
                let id = self.opt(tag, start, b"ID")?;
                let timestamp = self.opt(tag, start, b"DateTimeStamp")?;
                if let Some(s) = &mut self.subject {
                    s.audit.record(id, timestamp);
                }
            }
            Kind::Study => {
                self.study = Some(Study {
                    oid: key,
                    ..Study::default()
                });
            }
            Kind::MetaDataVersion => {
                let mdv = MetaDataVersion {
                    oid: key,
                    name: self.opt(tag, start, b"Name")?,
                    ..MetaDataVersion::default()
                };
                if let Some(s) = &mut self.study {
                    s.metadata_versions.push(mdv);
                }
            }
            Kind::StudyEventDef => {
                let def = StudyEventDef {
                    oid: key,
                    name: self.opt(tag, start, b"Name")?,
                    repeating: self.yes(tag, start, b"Repeating")?,
                    event_type: self.opt(tag, start, b"Type")?,
                    form_oids: Vec::new(),
                };
                if let Some(m) = self.current_mdv() {
                    m.study_event_defs.push(def);
                }
            }
            Kind::FormRef => {
                if let Some(d) = self
                    .current_mdv()
                    .and_then(|m| m.study_event_defs.last_mut())
                {
                    d.form_oids.push(key);
                }
            }
            Kind::FormDef => {
                let def = FormDef {
                    oid: key,
                    name: self.opt(tag, start, b"Name")?,
                    repeating: self.yes(tag, start, b"Repeating")?,
                    parent_form_oid: None,
                    item_group_oids: Vec::new(),
                };
                if let Some(m) = self.current_mdv() {
                    m.form_defs.push(def);
                }
            }
            Kind::FormDetails => {
                let parent = self.opt(tag, start, b"ParentFormOID")?;
                if let Some(d) = self.current_mdv().and_then(|m| m.form_defs.last_mut()) {
                    d.parent_form_oid = parent;
                }
            }
            Kind::ItemGroupRef => {
                if let Some(d) = self.current_mdv().and_then(|m| m.form_defs.last_mut()) {
                    d.item_group_oids.push(key);
                }
            }
            Kind::ItemGroupDef => {
                let def = ItemGroupDef {
                    oid: key,
                    name: self.opt(tag, start, b"Name")?,
                    repeating: self.yes(tag, start, b"Repeating")?,
                    item_oids: Vec::new(),
                };
                if let Some(m) = self.current_mdv() {
                    m.item_group_defs.push(def);
                }
            }
            Kind::ItemRef => {
                if let Some(d) = self
                    .current_mdv()
                    .and_then(|m| m.item_group_defs.last_mut())
                {
                    d.item_oids.push(key);
                }
            }
            Kind::ItemDef => {
                let def = ItemDef {
                    oid: key,
                    name: self.opt(tag, start, b"Name")?,
                    data_type: self.opt(tag, start, b"DataType")?,
                    length: self.opt(tag, start, b"Length")?,
                    code_list_oid: None,
                };
                if let Some(m) = self.current_mdv() {
                    m.item_defs.push(def);
                }
            }
            Kind::CodeListRef => {
                if let Some(d) = self.current_mdv().and_then(|m| m.item_defs.last_mut()) {
                    d.code_list_oid = Some(key);
                }
            }
            Kind::CodeList => {
                let list = CodeList {
                    oid: key,
                    name: self.opt(tag, start, b"Name")?,
                    data_type: self.opt(tag, start, b"DataType")?,
                    items: Vec::new(),
                };
                if let Some(m) = self.current_mdv() {
                    m.code_lists.push(list);
                }
            }
            Kind::CodeListItem => {
                if let Some(l) = self.current_mdv().and_then(|m| m.code_lists.last_mut()) {
                    l.items.push(CodeListItem {
                        coded_value: key,
                        decode: None,
                    });
                }
            }
            Kind::StudyName | Kind::ProtocolName | Kind::TranslatedText => self.text.clear(),
            _ => {}
        }
        Ok(())
    }

    fn current_form(&mut self) -> Option<&mut Form> {
        self.subject
            .as_mut()
            .and_then(|s| s.events.last_mut())
            .and_then(|e| e.forms.last_mut())
    }

    fn current_mdv(&mut self) -> Option<&mut MetaDataVersion> {
        self.study
            .as_mut()
            .and_then(|s| s.metadata_versions.last_mut())
    }

    fn end(&mut self, tag: &str, start: u64, pos: u64) -> Result<(Lines, Step), OdmError> {
        let bytes = tag.as_bytes();
        let matched = self.frames.last().and_then(|frame| {
            let expected = &self.names[frame.name..];
            let rest = bytes.strip_prefix(expected)?;
            if rest.is_empty() {
                Some(Lines::NONE)
            } else if rest.iter().all(|&b| xml::is_space(b)) {
                let (count, last) = xml::count_lines(bytes);
                Some(Lines {
                    count,
                    last_start: last.map(|l| start + l as u64),
                })
            } else {
                None
            }
        });
        if let Some(lines) = matched {
            return Ok((lines, self.close()));
        }
        self.scan(tag, start)?;
        let trimmed = bytes
            .iter()
            .rposition(|&b| !xml::is_space(b))
            .map_or(0, |p| p + 1);
        let name = &bytes[..trimmed];
        match self.frames.last() {
            None if self.phase == Phase::Prolog => Err(OdmError::Syntax {
                at: self.here(pos),
                expected: "the root element ODM",
                found: format!("</{}>", short(name)),
            }),
            None => Err(OdmError::UnmatchedEndTag {
                at: self.here(pos),
                found: short(name),
            }),
            Some(frame) => Err(OdmError::MismatchedEndTag {
                at: self.here(pos),
                expected: short(&self.names[frame.name..]),
                found: short(name),
            }),
        }
    }

    fn close(&mut self) -> Step {
        let Some(frame) = self.frames.pop() else {
            return Step::Continue;
        };
        self.names.truncate(frame.name);
        self.ns.truncate(frame.ns_mark);
        if self.frames.is_empty() {
            self.phase = Phase::Epilog;
        }
        if !self.build {
            return Step::Continue;
        }
        match frame.kind {
            Kind::SubjectData => {
                if let Some(s) = self.subject.take() {
                    return Step::Record(Record::Subject(Box::new(s)));
                }
            }
            Kind::Study => {
                if let Some(s) = self.study.take() {
                    return Step::Record(Record::Study(Box::new(s)));
                }
            }
            Kind::StudyName => {
                let text = std::mem::take(&mut self.text);
                if let Some(s) = &mut self.study {
                    s.name = Some(text);
                }
            }
            Kind::ProtocolName => {
                let text = std::mem::take(&mut self.text);
                if let Some(s) = &mut self.study {
                    s.protocol_name = Some(text);
                }
            }
            Kind::TranslatedText => {
                let text = std::mem::take(&mut self.text);
                if let Some(item) = self
                    .current_mdv()
                    .and_then(|m| m.code_lists.last_mut())
                    .and_then(|l| l.items.last_mut())
                    && item.decode.is_none()
                {
                    item.decode = Some(text);
                }
            }
            Kind::ClinicalData => {
                self.clinical_study.clear();
                self.clinical_mdv = None;
            }
            _ => {}
        }
        Step::Continue
    }

    /// Turns a quick-xml error into ours. `buf` holds the bytes quick-xml
    /// read for the failed event, starting at `pos`; `err_pos` is where
    /// quick-xml places the error.
    pub(crate) fn xml_error(
        &self,
        err: quick_xml::Error,
        buf: &[u8],
        pos: u64,
        err_pos: u64,
        token_limit_hit: bool,
        at_eof: bool,
    ) -> OdmError {
        use quick_xml::errors::{IllFormedError, SyntaxError};
        let pos = pos + self.base;
        let err_pos = err_pos + self.base;
        let at = |offset: u64| self.locate(buf, pos, offset);
        let eof = |expected: &str| OdmError::UnexpectedEof {
            at: at(pos + buf.len() as u64),
            expected: expected.to_owned(),
        };
        match err {
            quick_xml::Error::Io(_) if token_limit_hit => OdmError::TokenTooLarge {
                at: at(pos),
                limit: MAX_TOKEN,
            },
            quick_xml::Error::Io(e) => OdmError::Io {
                at: at(pos + buf.len() as u64),
                source: std::sync::Arc::try_unwrap(e)
                    .unwrap_or_else(|e| io::Error::new(e.kind(), e.to_string())),
            },
            quick_xml::Error::Encoding(quick_xml::encoding::EncodingError::Utf8(_))
                if pos == 0 && matches!(sniff(buf), Sniff::Wide) =>
            {
                OdmError::Utf16 { at: at(0) }
            }
            quick_xml::Error::Encoding(quick_xml::encoding::EncodingError::Utf8(e)) => {
                OdmError::InvalidUtf8 {
                    at: at(pos + e.valid_up_to() as u64),
                }
            }
            quick_xml::Error::Syntax(s) => match s {
                SyntaxError::UnclosedTag => eof("'>' closing the tag"),
                SyntaxError::UnclosedSingleQuotedAttributeValue => {
                    eof("\"'\" closing the attribute value")
                }
                SyntaxError::UnclosedDoubleQuotedAttributeValue => {
                    eof("'\"' closing the attribute value")
                }
                SyntaxError::UnclosedComment => eof("'-->' closing the comment"),
                SyntaxError::UnclosedCData => eof("']]>' closing the CDATA section"),
                SyntaxError::UnclosedPI | SyntaxError::UnclosedXmlDecl => {
                    eof("'?>' closing the processing instruction")
                }
                SyntaxError::UnclosedDoctype => OdmError::Doctype { at: at(err_pos) },
                SyntaxError::InvalidBangMarkup => {
                    if at_eof {
                        eof("'--' or '[CDATA[' after '<!'")
                    } else {
                        OdmError::Syntax {
                            at: at(err_pos),
                            expected: "'<!--' or '<![CDATA['",
                            found: "'<!'".to_owned(),
                        }
                    }
                }
            },
            quick_xml::Error::IllFormed(IllFormedError::UnclosedReference) => OdmError::Syntax {
                at: at(err_pos),
                expected: "';' ending the reference",
                found: "'<', '&' or end of input".to_owned(),
            },
            quick_xml::Error::IllFormed(IllFormedError::MissingDoctypeName) => {
                OdmError::Doctype { at: at(err_pos) }
            }
            other => OdmError::Syntax {
                at: at(err_pos),
                expected: "well-formed XML",
                found: other.to_string(),
            },
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        self.stats
    }
}

/// A cheap summary of a name (length and four of its bytes): equal names
/// give equal fingerprints.
#[inline]
fn fingerprint(name: &[u8]) -> u64 {
    let n = name.len();
    match name {
        [] => 0,
        [first, ..] => {
            (n as u64) << 32
                | u64::from(*first) << 24
                | u64::from(name[n / 2]) << 16
                | u64::from(name[n - 1]) << 8
                | u64::from(name[n.saturating_sub(3)])
        }
    }
}

/// A name for an error message, bounded.
fn short(name: &[u8]) -> String {
    let s = String::from_utf8_lossy(name);
    if s.chars().count() > 80 {
        s.chars().take(80).chain("…".chars()).collect()
    } else {
        s.into_owned()
    }
}

/// How many of the document's first bytes are read ahead to tell its
/// encoding: a UTF-8 byte order mark and the start of a second one.
const HEAD: usize = 6;

/// Counts bytes consumed since the last event and refuses to hand out more
/// once a single event exceeds [`MAX_TOKEN`]. It also holds the document's
/// first bytes, read ahead (whatever the input's buffer size) so the
/// encoding is told from the same bytes every time, and hands them out
/// before the rest.
pub(crate) struct Guard<R> {
    inner: R,
    used: usize,
    tripped: bool,
    head: [u8; HEAD],
    head_len: usize,
    head_pos: usize,
}

impl<R> Guard<R> {
    fn new(inner: R) -> Self {
        Guard {
            inner,
            used: 0,
            tripped: false,
            head: [0; HEAD],
            head_len: 0,
            head_pos: 0,
        }
    }

    /// The read-ahead bytes not yet handed out.
    fn head_rest(&self) -> &[u8] {
        &self.head[self.head_pos..self.head_len]
    }

    /// Takes up to `buf.len()` read-ahead bytes; 0 once they are gone.
    fn take_head(&mut self, buf: &mut [u8]) -> usize {
        let rest = self.head_rest();
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.head_pos += n;
        n
    }

    fn reset(&mut self) {
        self.used = 0;
    }

    fn over(&mut self) -> bool {
        if self.used > MAX_TOKEN {
            self.tripped = true;
        }
        self.tripped
    }
}

fn too_large() -> io::Error {
    io::Error::other("token too large")
}

impl<R: io::Read> io::Read for Guard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.take_head(buf) {
            0 => self.inner.read(buf),
            n => Ok(n),
        }
    }
}

impl<R: BufRead> BufRead for Guard<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.over() {
            return Err(too_large());
        }
        if self.head_pos < self.head_len {
            return Ok(&self.head[self.head_pos..self.head_len]);
        }
        self.inner.fill_buf()
    }

    fn consume(&mut self, amt: usize) {
        self.used += amt;
        // `fill_buf` hands out read-ahead bytes alone, so a consume covers
        // either those or the inner buffer, never both.
        if self.head_pos < self.head_len {
            self.head_pos += amt;
        } else {
            self.inner.consume(amt);
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Guard<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.head_pos < this.head_len {
            let rest = this.head_rest();
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.head_pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<R: AsyncBufRead + Unpin> AsyncBufRead for Guard<R> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        if this.over() {
            return Poll::Ready(Err(too_large()));
        }
        if this.head_pos < this.head_len {
            return Poll::Ready(Ok(&this.head[this.head_pos..this.head_len]));
        }
        Pin::new(&mut this.inner).poll_fill_buf(cx)
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        this.used += amt;
        if this.head_pos < this.head_len {
            this.head_pos += amt;
        } else {
            Pin::new(&mut this.inner).consume(amt);
        }
    }
}

/// What the first bytes say about the encoding.
enum Sniff {
    Plain,
    Bom,
    Wide,
}

fn sniff(head: &[u8]) -> Sniff {
    if head.starts_with(BOM) {
        Sniff::Bom
    } else if head.starts_with(b"\xFF\xFE")
        || head.starts_with(b"\xFE\xFF")
        || head.starts_with(b"\x00\x00")
        || head.starts_with(b"\x00<")
        || head.starts_with(b"<\x00")
    {
        Sniff::Wide
    } else {
        Sniff::Plain
    }
}

/// Streams [`Record`]s out of an ODM 1.3 document.
///
/// Over a blocking [`BufRead`] use [`next_record`](Self::next_record) or the
/// [`Iterator`]; over a tokio [`AsyncBufRead`] (an HTTP body) use
/// [`next_record_async`](Self::next_record_async). Both run the same state
/// machine and give the same records and errors.
///
/// `Ok(None)` means the whole document was read and is well-formed. After an
/// error the reader is finished; records already yielded came from a
/// document that turned out to be broken, and the caller must not treat
/// them as a complete, successful read.
pub struct OdmReader<R> {
    xml: quick_xml::Reader<Guard<R>>,
    buf: Vec<u8>,
    core: Core,
    started: bool,
    finished: bool,
}

macro_rules! next_record_impl {
    ($self:ident, $read:ident, $fill:ident $(, $await:ident)?) => {{
        if $self.finished {
            return Ok(None);
        }
        if !$self.started {
            $self.started = true;
            let guard = $self.xml.get_mut();
            // Read the first bytes ahead, across as many reads as a small
            // buffer needs, so the encoding is told the same way whatever
            // the input's buffer size.
            while guard.head_len < HEAD {
                let chunk = match guard.inner.$fill() $(.$await)? {
                    Ok(chunk) => chunk,
                    Err(source) => {
                        $self.finished = true;
                        return Err(OdmError::Io {
                            at: Position { line: 1, column: 1, offset: guard.head_len as u64 },
                            source,
                        });
                    }
                };
                if chunk.is_empty() {
                    break;
                }
                let n = chunk.len().min(HEAD - guard.head_len);
                let start = guard.head_len;
                guard.head[start..start + n].copy_from_slice(&chunk[..n]);
                guard.head_len += n;
                guard.inner.consume(n);
            }
            let head = &guard.head[..guard.head_len];
            match sniff(head) {
                Sniff::Plain => {}
                Sniff::Wide => {
                    $self.finished = true;
                    return Err(OdmError::Utf16 { at: Position { line: 1, column: 1, offset: 0 } });
                }
                Sniff::Bom => {
                    // quick-xml strips one more BOM if it finds one; a second
                    // BOM is text before the root, so refuse it here.
                    if head[3..].starts_with(BOM) {
                        $self.finished = true;
                        return Err(OdmError::Syntax {
                            at: Position { line: 1, column: 4, offset: 3 },
                            expected: "the root element ODM",
                            found: "a second byte order mark".to_owned(),
                        });
                    }
                    guard.head_pos = 3;
                    $self.core.base = 3;
                    $self.core.prolog_start = 3;
                }
            }
        }
        loop {
            $self.buf.clear();
            $self.xml.get_mut().reset();
            let pos = $self.xml.buffer_position();
            let step = match $self.xml.$read(&mut $self.buf) $(.$await)? {
                // The whole event may have come in one read (a slice as
                // input): the size limit still applies.
                Ok(_) if $self.xml.get_ref().used > MAX_TOKEN => Err(OdmError::TokenTooLarge {
                    at: $self.core.here(pos + $self.core.base),
                    limit: MAX_TOKEN,
                }),
                Ok(event) => $self.core.event(event, pos),
                Err(err) => {
                    // After `<!` quick-xml does not say whether a wrong
                    // character or the end of input followed.
                    let eof = matches!(
                        err,
                        quick_xml::Error::Syntax(quick_xml::errors::SyntaxError::InvalidBangMarkup)
                    ) && $self.xml.get_mut().$fill() $(.$await)?.is_ok_and(|b| b.is_empty());
                    Err($self.core.xml_error(
                        err,
                        &$self.buf,
                        pos,
                        $self.xml.error_position(),
                        $self.xml.get_ref().tripped,
                        eof,
                    ))
                }
            };
            match step {
                Ok(Step::Continue) => {}
                Ok(Step::Record(record)) => return Ok(Some(record)),
                Ok(Step::End) => {
                    $self.finished = true;
                    return Ok(None);
                }
                Err(e) => {
                    $self.finished = true;
                    return Err(e);
                }
            }
        }
    }};
}

impl<R> OdmReader<R> {
    /// A reader that builds typed records.
    pub fn new(input: R) -> Self {
        Self::with_core(input, Core::new(true))
    }

    /// A reader that only counts (used by [`super::count`]): it yields no
    /// records and allocates nothing per element.
    pub(crate) fn counting(input: R) -> Self {
        Self::with_core(input, Core::new(false))
    }

    fn with_core(input: R, core: Core) -> Self {
        let mut xml = quick_xml::Reader::from_reader(Guard::new(input));
        let config = xml.config_mut();
        // Our own stack checks end tags (with our messages and without the
        // trimming that would hide line breaks from our line count).
        config.check_end_names = false;
        config.allow_unmatched_ends = true;
        config.trim_markup_names_in_closing_tags = false;
        config.check_comments = false;
        config.expand_empty_elements = false;
        config.trim_text(false);
        OdmReader {
            xml,
            buf: Vec::with_capacity(4096),
            core,
            started: false,
            finished: false,
        }
    }

    /// Counts of the ODM elements read so far.
    pub fn stats(&self) -> Stats {
        self.core.stats()
    }
}

impl<R: BufRead> OdmReader<R> {
    /// The next record, `Ok(None)` at the well-formed end of the document.
    pub fn next_record(&mut self) -> Result<Option<Record>, OdmError> {
        next_record_impl!(self, read_event_into, fill_buf)
    }
}

impl<R: BufRead> Iterator for OdmReader<R> {
    type Item = Result<Record, OdmError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

impl<R: AsyncBufRead + Unpin> OdmReader<R> {
    /// The next record, `Ok(None)` at the well-formed end of the document.
    pub async fn next_record_async(&mut self) -> Result<Option<Record>, OdmError> {
        use tokio::io::AsyncBufReadExt;
        next_record_impl!(self, read_event_into_async, fill_buf, await)
    }
}
