//! Log files of the processes tests start: a directory for them that `VOLT_TEST_KEEP=1` keeps,
//! the tail of a log, a check that no log shows a panic, and colour codes taken out of text
//! logs.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Whether `VOLT_TEST_KEEP` asks to keep what the tests write (set, not empty, not `0`).
pub fn keep_requested() -> bool {
    std::env::var_os("VOLT_TEST_KEEP").is_some_and(|v| !v.is_empty() && v != "0")
}

/// A temporary directory for logs (`volt-<name>-XXXX` in the temp dir), removed when dropped,
/// or kept (and its path printed) when `VOLT_TEST_KEEP` is set.
pub struct LogDir {
    path: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl LogDir {
    pub fn new(name: &str) -> LogDir {
        let dir = tempfile::Builder::new().prefix(&format!("volt-{name}-")).tempdir().expect("a log directory");
        if keep_requested() {
            let path = dir.keep();
            eprintln!("[kit] {name}: logs kept in {}", path.display());
            return LogDir { path, _dir: None };
        }
        LogDir { path: dir.path().to_path_buf(), _dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `<dir>/<file>`.
    pub fn join(&self, file: impl AsRef<Path>) -> PathBuf {
        self.path.join(file)
    }
}

/// The last `lines` lines of a file (reading at most its last 64 KiB), or why it cannot be read.
pub fn tail(path: &Path, lines: usize) -> String {
    let read = || -> io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read: {e})"),
    }
}

/// Panics, with the lines, if one of the logs shows a panic (a line containing `panicked`).
pub fn assert_no_panic(logs: &[PathBuf]) {
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let panics: Vec<&str> = text.lines().filter(|l| l.contains("panicked")).collect();
        assert!(panics.is_empty(), "{} shows a panic: {panics:#?}", log.display());
    }
}

/// `text` without ANSI colour codes (`--log-format text` colours levels and field names).
pub fn strip_ansi(text: &str) -> String {
    let ansi = regex::Regex::new("\x1b\\[[0-9;]*m").expect("regex");
    ansi.replace_all(text, "").into_owned()
}
