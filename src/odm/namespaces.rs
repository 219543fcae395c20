//! Namespace bindings in scope, resolved by URI, never by prefix.
//!
//! A file may bind ODM to `odm:` and the OpenClinica extension to `oc:`, or
//! re-bind the default namespace on any element; what counts is the URI a
//! prefix stands for where it is used. Bindings live in one byte arena and
//! a stack that grows only on elements that declare `xmlns` attributes, so
//! the usual document (all declarations on the root) costs nothing per
//! element.

use std::cell::Cell;
use std::ops::Range;

/// ODM 1.3.
pub const ODM_13: &str = "http://www.cdisc.org/ns/odm/v1.3";
/// The OpenClinica extension namespace of OpenClinica 3.1 and later.
pub const OC_EXT_V130: &str = "http://www.openclinica.org/ns/odm_ext_v130/v3.1";
/// The OpenClinica extension namespace of older exports.
pub const OC_EXT_V121: &str = "http://www.openclinica.org/ns/odm_ext_v121/v3.1";
/// The namespace the `xml` prefix is bound to by definition.
pub const XML: &str = "http://www.w3.org/XML/1998/namespace";
const XMLNS: &str = "http://www.w3.org/2000/xmlns/";

/// The namespaces the reader tells apart; everything else is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ns {
    /// No namespace (unprefixed attributes, or no default namespace).
    None,
    Odm,
    OcExt,
    Other,
}

impl Ns {
    fn of(uri: &[u8]) -> Ns {
        if uri == ODM_13.as_bytes() {
            Ns::Odm
        } else if uri == OC_EXT_V130.as_bytes() || uri == OC_EXT_V121.as_bytes() {
            Ns::OcExt
        } else if uri.is_empty() {
            Ns::None
        } else {
            Ns::Other
        }
    }
}

#[derive(Debug, Clone)]
struct Binding {
    prefix: Range<usize>,
    uri: Range<usize>,
    ns: Ns,
}

/// Why a declaration is refused (Namespaces in XML 1.0, §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeclError {
    /// `xmlns:p=""` (un-declaring a prefix is XML 1.1 only).
    EmptyPrefixedUri,
    /// `xmlns:xmlns=…`, or `xml` bound elsewhere, or another prefix bound to
    /// the `xml` or `xmlns` namespace.
    Reserved,
}

/// The bindings in scope, innermost last.
#[derive(Debug, Clone)]
pub(crate) struct Namespaces {
    arena: Vec<u8>,
    bindings: Vec<Binding>,
    /// The namespace unprefixed element names are in.
    default: Ns,
    /// The binding found by the last prefix lookup: documents use one or
    /// two prefixes over and over. Cleared whenever bindings change.
    last: Cell<Option<usize>>,
}

impl Default for Namespaces {
    fn default() -> Self {
        let mut ns = Namespaces {
            arena: Vec::new(),
            bindings: Vec::new(),
            default: Ns::None,
            last: Cell::new(None),
        };
        ns.push(b"xml", XML.as_bytes());
        ns
    }
}

impl Namespaces {
    /// A mark to [`truncate`](Self::truncate) back to when the element that
    /// is about to declare bindings ends.
    pub(crate) fn mark(&self) -> usize {
        self.bindings.len()
    }

    /// Drops the bindings made after `mark`.
    pub(crate) fn truncate(&mut self, mark: usize) {
        if mark < self.bindings.len() {
            let arena = self.bindings[mark].prefix.start;
            self.bindings.truncate(mark);
            self.arena.truncate(arena);
            self.last.set(None);
            self.default = self.lookup(b"").map_or(Ns::None, |b| b.ns);
        }
    }

    /// Declares `prefix` (empty for the default namespace) as `uri`.
    pub(crate) fn declare(&mut self, prefix: &[u8], uri: &[u8]) -> Result<(), DeclError> {
        if prefix == b"xmlns" || uri == XMLNS.as_bytes() {
            return Err(DeclError::Reserved);
        }
        if (prefix == b"xml") != (uri == XML.as_bytes()) {
            return Err(DeclError::Reserved);
        }
        if !prefix.is_empty() && uri.is_empty() {
            return Err(DeclError::EmptyPrefixedUri);
        }
        self.push(prefix, uri);
        Ok(())
    }

    fn push(&mut self, prefix: &[u8], uri: &[u8]) {
        let p = self.arena.len();
        self.arena.extend_from_slice(prefix);
        let u = self.arena.len();
        self.arena.extend_from_slice(uri);
        let ns = Ns::of(uri);
        self.last.set(None);
        self.bindings.push(Binding {
            prefix: p..u,
            uri: u..self.arena.len(),
            ns,
        });
        if prefix.is_empty() {
            self.default = ns;
        }
    }

    fn lookup(&self, prefix: &[u8]) -> Option<&Binding> {
        if let Some(i) = self.last.get() {
            let b = &self.bindings[i];
            if &self.arena[b.prefix.clone()] == prefix {
                return Some(b);
            }
        }
        let i = self
            .bindings
            .iter()
            .rposition(|b| &self.arena[b.prefix.clone()] == prefix)?;
        self.last.set(Some(i));
        Some(&self.bindings[i])
    }

    /// The namespace of unprefixed element names.
    #[inline]
    pub(crate) fn default_ns(&self) -> Ns {
        self.default
    }

    /// The URI of the default namespace, for error messages.
    pub(crate) fn default_uri(&self) -> &[u8] {
        self.lookup(b"").map_or(&[], |b| &self.arena[b.uri.clone()])
    }

    /// Resolves a non-empty prefix; `None` when it is not bound.
    #[inline]
    pub(crate) fn resolve(&self, prefix: &[u8]) -> Option<(Ns, &[u8])> {
        self.lookup(prefix)
            .filter(|b| !b.uri.is_empty())
            .map(|b| (b.ns, &self.arena[b.uri.clone()]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_resolve_to_the_innermost_binding() {
        let mut ns = Namespaces::default();
        assert_eq!(ns.default_ns(), Ns::None);
        ns.declare(b"", ODM_13.as_bytes()).unwrap();
        ns.declare(b"oc", OC_EXT_V121.as_bytes()).unwrap();
        assert_eq!(ns.default_ns(), Ns::Odm);
        let mark = ns.mark();
        ns.declare(b"", b"urn:other").unwrap();
        ns.declare(b"oc", ODM_13.as_bytes()).unwrap();
        assert_eq!(ns.default_ns(), Ns::Other);
        assert_eq!(ns.resolve(b"oc").map(|r| r.0), Some(Ns::Odm));
        ns.truncate(mark);
        assert_eq!(ns.default_ns(), Ns::Odm);
        assert_eq!(ns.resolve(b"oc").map(|r| r.0), Some(Ns::OcExt));
        assert_eq!(ns.resolve(b"xml").map(|r| r.0), Some(Ns::Other));
        assert!(ns.resolve(b"nope").is_none());
        ns.declare(b"", b"").unwrap();
        assert_eq!(ns.default_ns(), Ns::None);
    }

    #[test]
    fn reserved_declarations_are_refused() {
        let mut ns = Namespaces::default();
        assert_eq!(ns.declare(b"p", b""), Err(DeclError::EmptyPrefixedUri));
        assert_eq!(ns.declare(b"xmlns", b"urn:x"), Err(DeclError::Reserved));
        assert_eq!(ns.declare(b"xml", b"urn:x"), Err(DeclError::Reserved));
        assert_eq!(ns.declare(b"p", XML.as_bytes()), Err(DeclError::Reserved));
        assert_eq!(ns.declare(b"xml", XML.as_bytes()), Ok(()));
    }
}
