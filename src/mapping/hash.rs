//! Two fingerprints, so that incremental sync neither rewrites nor maps an
//! unchanged subject:
//! - [`content_hash`]: what a subject maps to (what was written);
//! - [`input_fingerprint`]: what it is mapped from (its ODM as read, under
//!   one CP configuration, one metadata and one ocsync version, see
//!   [`InputKey`]). Equal inputs map to equal records, so a subject whose
//!   input fingerprint is the one stored at its last write is skipped
//!   without mapping.

use std::hash::Hash;

use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::Xxh3;

use super::records::SubjectRecords;
use crate::cp::CpConfig;
use crate::odm::{Study, Subject};

/// Everything besides the subject that its records depend on: the CP's
/// configuration, the study's metadata, and the version of ocsync (whose
/// mapping may change between releases).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputKey(u128);

impl InputKey {
    pub fn new(cp: &CpConfig, study: &Study) -> Self {
        let mut h = Xxh3::new();
        "ocsync input fingerprint 1".hash(&mut h);
        env!("CARGO_PKG_VERSION").hash(&mut h);
        // The configuration as stored (its canonical JSON); the metadata
        // as parsed.
        match serde_json::to_vec(cp) {
            Ok(json) => json.hash(&mut h),
            Err(_) => "unserialisable".hash(&mut h),
        }
        study.hash(&mut h);
        Self(h.digest128())
    }
}

/// xxh3-128 of the subject as read (every attribute and value, in document
/// order, with the `ClinicalData` it came in), keyed by `key`; 32 hex
/// digits. Not a defence against forgery (no one gains by forging one):
/// a fast fingerprint whose accidental collisions are out of reach.
pub fn input_fingerprint(key: InputKey, subject: &Subject) -> String {
    let mut h = Xxh3::new();
    key.0.hash(&mut h);
    subject.hash(&mut h);
    format!("{:032x}", h.digest128())
}

/// SHA-256 of the records' canonical JSON, as 64 lower-case hex digits.
///
/// Stable across runs, processes and platforms: the records hold only
/// strings, enums, `Vec`s in document order and `BTreeMap`s (sorted keys),
/// and `serde_json` writes struct fields in declaration order. Adding a
/// field to a record changes every hash once, which makes the next
/// incremental run rewrite everything: the safe direction.
pub fn content_hash(records: &SubjectRecords) -> String {
    let mut hasher = Sha256::new();
    // Writing into a hasher cannot fail, and these types always serialise.
    if serde_json::to_writer(HashWriter(&mut hasher), records).is_err() {
        hasher.update(b"\0unserialisable");
    }
    let digest = hasher.finalize();
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push(char::from(HEX[usize::from(byte >> 4)]));
        hex.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    hex
}

const HEX: &[u8; 16] = b"0123456789abcdef";

struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
