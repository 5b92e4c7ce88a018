//! Local mode's step cache: one small JSON file per result under the user's cache directory
//! (`$XDG_CACHE_HOME/volt-operator/local-cache`, else `~/.cache/volt-operator/local-cache`),
//! so a second run on this machine hits it.
//!
//! Keys are [`crate::cache::step_key`]s (a SHA-256 of the step kind and its rendered work, and
//! for agent steps of the model, instructions and parameters of the agents that may serve it),
//! the same keys the cluster's cache uses. The store sits behind [`StepCache`], as the
//! cluster's [`crate::cache::CacheManager`] does, and the run pass uses either.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;

pub use crate::cache::{DEFAULT_TTL, Entry, StepCache};

/// The default cache directory, from `XDG_CACHE_HOME` or `HOME`.
pub fn default_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("volt-operator").join("local-cache"))
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// Results as files `<key>.json` in one directory.
#[derive(Debug)]
pub struct DiskCache {
    dir: PathBuf,
    seq: AtomicU64,
}

impl DiskCache {
    /// A cache in `dir` (created on first write). Expired entries are removed on open.
    pub fn open(dir: PathBuf) -> Self {
        let cache = Self { dir, seq: AtomicU64::new(0) };
        cache.prune();
        cache
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &str) -> Option<PathBuf> {
        // Keys are hex digests; anything else never names a file.
        (!key.is_empty() && key.len() <= 128 && key.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| self.dir.join(format!("{key}.json")))
    }

    /// Reads an entry; expired or unreadable entries are removed and missed.
    pub fn read(&self, key: &str) -> Option<Entry> {
        let path = self.path(key)?;
        let bytes = std::fs::read(&path).ok()?;
        match serde_json::from_slice::<Entry>(&bytes) {
            Ok(e) if e.expires_ms > now_ms() => Some(e),
            _ => {
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Writes an entry atomically (a temporary file renamed over the old one).
    pub fn write(&self, key: &str, mut entry: Entry, ttl: Duration) -> std::io::Result<()> {
        let Some(path) = self.path(key) else { return Ok(()) };
        entry.expires_ms = now_ms().saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        std::fs::create_dir_all(&self.dir)?;
        let tmp =
            self.dir.join(format!(".{key}.{}.{}.tmp", std::process::id(), self.seq.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&tmp, serde_json::to_vec(&entry).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, &path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }

    /// Removes expired entries.
    pub fn prune(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(key) = name.strip_suffix(".json") {
                let _ = self.read(key);
            }
        }
    }
}

/// Keys already hold the namespace (see [`crate::cache::step_key`]).
impl StepCache for DiskCache {
    fn get<'a>(&'a self, _namespace: &'a str, key: &'a str) -> BoxFuture<'a, Option<Entry>> {
        Box::pin(async move { self.read(key) })
    }
    fn put<'a>(&'a self, _namespace: &'a str, key: String, entry: Entry, ttl: Option<Duration>) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Err(e) = self.write(&key, entry, ttl.unwrap_or(DEFAULT_TTL)) {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot write the local step cache");
            }
        })
    }
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}

/// No cache (`--no-cache`): every step runs.
#[derive(Debug, Default)]
pub struct NoCache;

impl StepCache for NoCache {
    fn get<'a>(&'a self, _namespace: &'a str, _key: &'a str) -> BoxFuture<'a, Option<Entry>> {
        Box::pin(async { None })
    }
    fn put<'a>(&'a self, _: &'a str, _: String, _: Entry, _: Option<Duration>) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
    fn describe(&self) -> String {
        "off".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_expiry_and_bad_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = DiskCache::open(dir.path().join("c"));
        let entry = Entry { value: "out".into(), tokens: Some((1, 2)), ..Default::default() };
        cache.write("abc123", entry.clone(), Duration::from_secs(60)).expect("write");
        let got = cache.read("abc123").expect("hit");
        assert_eq!((got.value.as_str(), got.tokens), ("out", Some((1, 2))));
        cache.write("dead", entry.clone(), Duration::ZERO).expect("write");
        assert!(cache.read("dead").is_none());
        assert!(!cache.dir().join("dead.json").exists(), "expired entries are removed");
        // Not a hex key: never a path.
        cache.write("../x", entry, Duration::from_secs(60)).expect("ignored");
        assert!(cache.read("../x").is_none());
        assert!(!dir.path().join("x.json").exists());
    }

    #[test]
    fn corrupt_entries_are_misses() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("beef.json"), b"{not json").expect("write");
        let cache = DiskCache::open(dir.path().to_path_buf());
        assert!(cache.read("beef").is_none());
    }
}
