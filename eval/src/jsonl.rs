//! JSON Lines files, read with errors that name the file and line, and appended one durable line at a time so a
//! run killed at any moment leaves every finished record on disk and at most one torn last line, which a resumed
//! run drops.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The longest line read: a judgment with two long answers and the judge's explanation fits many times over; a
/// file with a longer one is not ours to trust.
pub const MAX_LINE_BYTES: usize = 8 << 20;

/// Why a JSON Lines file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JsonlError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: {source}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}:{line}: a line longer than {MAX_LINE_BYTES} bytes", path.display())]
    TooLong { path: PathBuf, line: usize },
}

/// A record and the (1-based) line it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Line<T> {
    pub line: usize,
    pub record: T,
}

/// Every record of `path`; blank lines are skipped. With `tolerate_torn_tail`, a last line that does not parse
/// and has no newline after it (a write cut short by a kill) is dropped instead of refused.
pub fn read<T: DeserializeOwned>(path: &Path, tolerate_torn_tail: bool) -> Result<Vec<Line<T>>, JsonlError> {
    let io = |source| JsonlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(io)?);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut line = 0;
    loop {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(io)?;
        if n == 0 {
            return Ok(out);
        }
        line += 1;
        let terminated = buf.last() == Some(&b'\n');
        if buf.len() > MAX_LINE_BYTES && !terminated {
            return Err(JsonlError::TooLong {
                path: path.to_path_buf(),
                line,
            });
        }
        let text = String::from_utf8_lossy(&buf);
        if text.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(text.trim()) {
            Ok(record) => out.push(Line { line, record }),
            Err(_) if tolerate_torn_tail && !terminated => return Ok(out),
            Err(source) => {
                return Err(JsonlError::Parse {
                    path: path.to_path_buf(),
                    line,
                    source,
                });
            }
        }
    }
}

/// Appends records to a file, each as one line written and flushed to disk before the next.
#[derive(Debug)]
pub struct Appender {
    path: PathBuf,
    file: File,
}

impl Appender {
    /// Opens `path` for appending (creating it and its folder). A torn last line, left by a kill mid-write, is cut
    /// off first so the next record starts on a line of its own.
    pub fn open(path: &Path) -> Result<Self, JsonlError> {
        let io = |source| JsonlError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        cut_torn_tail(path).map_err(io)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Writes `record` as one line and syncs it.
    pub fn append<T: Serialize>(&mut self, record: &T) -> Result<(), JsonlError> {
        let io = |source| JsonlError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(record).map_err(|e| io(std::io::Error::other(e)))?;
        line.push(b'\n');
        self.file.write_all(&line).map_err(io)?;
        self.file.sync_data().map_err(io)
    }
}

/// Ends `path`'s last line: one that is whole JSON without its newline (a file edited by hand, or a kill
/// between the record and its newline) gets the newline, since [`read`] keeps it; anything else after the last
/// newline is a torn write and is cut off, since [`read`] drops it.
fn cut_torn_tail(path: &Path) -> std::io::Result<()> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if bytes.is_empty() || bytes.last() == Some(&b'\n') {
        return Ok(());
    }
    let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let tail = String::from_utf8_lossy(&bytes[keep..]);
    if serde_json::from_str::<serde::de::IgnoredAny>(tail.trim()).is_ok() {
        return OpenOptions::new().append(true).open(path)?.write_all(b"\n");
    }
    OpenOptions::new().write(true).open(path)?.set_len(keep as u64)
}

/// Writes `records` to `path` in one go, through a temporary file renamed over it, so readers never see half.
pub fn write_all<T: Serialize>(path: &Path, records: &[T]) -> Result<(), JsonlError> {
    let io = |source| JsonlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("jsonl.tmp");
    let mut out = Vec::new();
    for r in records {
        serde_json::to_writer(&mut out, r).map_err(|e| io(std::io::Error::other(e)))?;
        out.push(b'\n');
    }
    std::fs::write(&tmp, &out).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("camelid-jsonl-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("f.jsonl")
    }

    #[test]
    fn a_torn_tail_is_dropped_on_resume_and_cut_before_appending() {
        let path = temp("torn");
        let mut a = Appender::open(&path).unwrap_or_else(|e| panic!("{e}"));
        a.append(&serde_json::json!({"a": 1}))
            .unwrap_or_else(|e| panic!("{e}"));
        drop(a);
        let mut f = OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{e}"));
        f.write_all(b"{\"a\": 2").unwrap_or_else(|e| panic!("{e}"));
        assert!(read::<serde_json::Value>(&path, false).is_err());
        assert_eq!(
            read::<serde_json::Value>(&path, true).map(|v| v.len()).ok(),
            Some(1)
        );
        let mut a = Appender::open(&path).unwrap_or_else(|e| panic!("{e}"));
        a.append(&serde_json::json!({"a": 3}))
            .unwrap_or_else(|e| panic!("{e}"));
        let back: Vec<_> = read::<serde_json::Value>(&path, false).unwrap_or_default();
        assert_eq!(
            back.iter().map(|l| l.record["a"].as_i64()).collect::<Vec<_>>(),
            [Some(1), Some(3)]
        );
    }

    #[test]
    fn a_whole_last_record_without_its_newline_is_kept_by_reader_and_appender_alike() {
        let path = temp("unterminated");
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new("."))).unwrap_or_default();
        std::fs::write(&path, "{\"a\": 1}\n{\"a\": 2}").unwrap_or_default();
        assert_eq!(
            read::<serde_json::Value>(&path, true).map(|v| v.len()).ok(),
            Some(2)
        );
        let mut a = Appender::open(&path).unwrap_or_else(|e| panic!("{e}"));
        a.append(&serde_json::json!({"a": 3}))
            .unwrap_or_else(|e| panic!("{e}"));
        let back: Vec<_> = read::<serde_json::Value>(&path, false).unwrap_or_default();
        assert_eq!(
            back.iter().map(|l| l.record["a"].as_i64()).collect::<Vec<_>>(),
            [Some(1), Some(2), Some(3)]
        );
    }

    #[test]
    fn a_bad_line_is_named_by_file_and_line() {
        let path = temp("bad");
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new("."))).unwrap_or_default();
        std::fs::write(&path, "{\"a\": 1}\n\nnot json\n{\"a\": 2}\n").unwrap_or_default();
        let err = read::<serde_json::Value>(&path, true)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("f.jsonl:3:"), "{err}");
    }
}
