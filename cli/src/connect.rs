//! From `--url`/`--prefix` to a [`LockManager`], and the messages the tool prints.

use distlock::{LockManager, LockOptions};

use crate::cli::Global;

/// Connects to one primary, or to several (Redlock) when `--url` was repeated.
pub async fn manager(global: &Global, defaults: LockOptions) -> distlock::Result<LockManager> {
    let builder = LockManager::builder()
        .with_prefix(global.prefix.as_bytes())
        .with_default_options(defaults);
    match global.urls.as_slice() {
        [one] => builder.connect(one).await,
        many => {
            builder
                .connect_redlock(many.iter().map(String::as_str))
                .await
        }
    }
}

/// Where the tool's own lines go: stderr, prefixed with `distlock:`, notices silenced by
/// `--quiet`.
#[derive(Debug, Clone, Copy)]
pub struct Say {
    quiet: bool,
}

impl Say {
    /// Notices are printed unless `quiet`.
    pub fn new(quiet: bool) -> Self {
        Say { quiet }
    }

    /// An error line: always printed, it explains the exit status.
    pub fn error(&self, line: impl AsRef<str>) {
        eprintln!("distlock: {}", line.as_ref());
    }

    /// A notice (busy lock, a warning): printed unless `--quiet`.
    pub fn notice(&self, line: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("distlock: {}", line.as_ref());
        }
    }
}
