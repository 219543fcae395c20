//! [`content_hash`]: a fingerprint of what a subject maps to, so that
//! incremental sync never rewrites an unchanged subject.

use sha2::{Digest, Sha256};

use super::records::SubjectRecords;

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
