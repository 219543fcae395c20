//! ODM extract files: one file, or the newest file in a folder whose name
//! matches a pattern, as OpenClinica's scheduled dataset extracts leave them.
//!
//! "Newest" is by modification time, ties broken by the larger name (extract
//! names carry a timestamp). A file still being written would look newest:
//! the extract job should write under a name the pattern does not match
//! (`*.part`) and rename when done, which is also what OC's own jobs do.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::body::Body;
use super::config::FileConfig;
use super::error::OcError;

/// Reads whole files in chunks of this size.
const READ_BUFFER: usize = 256 * 1024;

pub(crate) struct Files {
    path: PathBuf,
    pattern: String,
}

impl Files {
    pub fn new(config: &FileConfig) -> Result<Self, OcError> {
        if config.pattern.is_empty() {
            return Err(OcError::Config(
                "file source pattern must not be empty".into(),
            ));
        }
        Ok(Self {
            path: config.path.clone(),
            pattern: config.pattern.clone(),
        })
    }

    pub fn describe(&self) -> String {
        format!("file {} ({})", self.path.display(), self.pattern)
    }

    /// The configured file, or the newest match in the configured folder.
    pub async fn resolve(&self) -> Result<PathBuf, OcError> {
        let meta = tokio::fs::metadata(&self.path)
            .await
            .map_err(|source| OcError::File {
                path: self.path.clone(),
                source,
            })?;
        if !meta.is_dir() {
            return Ok(self.path.clone());
        }
        let folder_error = |source| OcError::File {
            path: self.path.clone(),
            source,
        };
        let mut entries = tokio::fs::read_dir(&self.path)
            .await
            .map_err(folder_error)?;
        let mut best: Option<(SystemTime, String)> = None;
        while let Some(entry) = entries.next_entry().await.map_err(folder_error)? {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if !matches(&self.pattern, &name) {
                continue;
            }
            // metadata() follows symlinks: a link to an extract counts.
            let Ok(meta) = tokio::fs::metadata(entry.path()).await else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if best
                .as_ref()
                .is_none_or(|b| (modified, &name) > (b.0, &b.1))
            {
                best = Some((modified, name));
            }
        }
        match best {
            Some((_, name)) => Ok(self.path.join(name)),
            None => Err(OcError::NoMatchingFile {
                folder: self.path.clone(),
                pattern: self.pattern.clone(),
            }),
        }
    }

    /// The chosen file as a [`Body`].
    pub async fn open(&self) -> Result<Body, OcError> {
        let path = self.resolve().await?;
        tracing::debug!(file = %path.display(), "reading ODM extract");
        let file = open(&path).await?;
        Ok(Body::new(
            tokio::io::BufReader::with_capacity(READ_BUFFER, file),
            None,
        ))
    }
}

async fn open(path: &Path) -> Result<tokio::fs::File, OcError> {
    tokio::fs::File::open(path)
        .await
        .map_err(|source| OcError::File {
            path: path.to_owned(),
            source,
        })
}

/// Whether `name` matches `pattern`, where `*` is any run of characters
/// (also none) and `?` exactly one.
pub(crate) fn matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was, and where in `name` it started matching: on a
    // mismatch the star swallows one more character (linear backtracking).
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn wildcards() {
        let cases = [
            ("*.xml", "odm.xml", true),
            ("*.xml", "odm.xml.part", false),
            ("*.xml", ".xml", true),
            (
                "extract_*_S_DEMO.xml",
                "extract_2024-01-02_S_DEMO.xml",
                true,
            ),
            (
                "extract_*_S_DEMO.xml",
                "extract_2024-01-02_S_OTHER.xml",
                false,
            ),
            ("odm?.xml", "odm1.xml", true),
            ("odm?.xml", "odm12.xml", false),
            ("*", "", true),
            ("a*b*c", "aXXbYYbZc", true),
            ("a*b*c", "aXXbYYbZ", false),
            ("Odm.xml", "odm.xml", false),
        ];
        for (p, n, want) in cases {
            assert_eq!(matches(p, n), want, "{p} vs {n}");
        }
    }
}
