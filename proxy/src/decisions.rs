//! The decision log's sink: JSON lines handed over a bounded queue to one writer thread,
//! which writes them to stdout and/or appends them to a file.
//!
//! A request never waits for the log: a full queue (a slow disk, a blocked pipe) drops the
//! line and counts it (`palisade_decision_log_dropped_total`). The file is reopened on
//! `SIGUSR1`, so logrotate can move it away and signal (`postrotate`), as with nginx.
//! A thread, not a task: writes to files and pipes block.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;

/// Where the lines go.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// To stdout.
    pub stdout: bool,
    /// Appended to this file.
    pub file: Option<PathBuf>,
    /// Lines that may wait for the writer.
    pub queue: usize,
}

/// The sending side, shared by every request.
#[derive(Debug)]
pub struct DecisionSink {
    tx: SyncSender<String>,
    dropped: IntCounter,
}

impl DecisionSink {
    /// Starts the writer thread. `reopen` is set by the `SIGUSR1` handler; `written` and
    /// `dropped` count lines.
    pub fn start(
        config: SinkConfig,
        reopen: Arc<AtomicBool>,
        written: IntCounter,
        dropped: IntCounter,
    ) -> std::io::Result<DecisionSink> {
        let (tx, rx) = sync_channel(config.queue.max(1));
        std::thread::Builder::new()
            .name("decision-log".into())
            .spawn(move || writer(rx, config, reopen, written))?;
        Ok(DecisionSink { tx, dropped })
    }

    /// Queues a line; drops it (counted) when the writer is behind.
    pub fn send(&self, line: String) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

fn open(path: &PathBuf) -> Option<BufWriter<File>> {
    match OpenOptions::new().create(true).append(true).open(path) {
        Ok(f) => Some(BufWriter::new(f)),
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e,
                "cannot open the decision log file; lines for it are lost until SIGUSR1 reopens it");
            None
        }
    }
}

fn writer(rx: Receiver<String>, config: SinkConfig, reopen: Arc<AtomicBool>, written: IntCounter) {
    let mut file = config.file.as_ref().and_then(open);
    let stdout = std::io::stdout();
    loop {
        let first = match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if reopen.swap(false, Ordering::Relaxed) {
            if let Some(f) = file.as_mut() {
                let _ = f.flush();
            }
            file = config.file.as_ref().and_then(open);
            tracing::info!("decision log reopened (SIGUSR1)");
        }
        let Some(first) = first else { continue };
        // Whatever else is queued goes out in the same write.
        let mut out = stdout.lock();
        let mut line = Some(first);
        while let Some(l) = line {
            if config.stdout {
                let _ = out.write_all(l.as_bytes());
                let _ = out.write_all(b"\n");
            }
            if let Some(f) = file.as_mut() {
                let _ = f.write_all(l.as_bytes());
                let _ = f.write_all(b"\n");
            }
            written.inc();
            line = rx.try_recv().ok();
        }
        let _ = out.flush();
        if let Some(f) = file.as_mut() {
            if let Err(e) = f.flush() {
                tracing::warn!(error = %e, "decision log write failed");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn lines_reach_the_file_and_a_full_queue_drops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.log");
        let (written, dropped) = (
            IntCounter::new("w", "w").unwrap(),
            IntCounter::new("d", "d").unwrap(),
        );
        let sink = DecisionSink::start(
            SinkConfig {
                stdout: false,
                file: Some(path.clone()),
                queue: 4,
            },
            Arc::default(),
            written.clone(),
            dropped.clone(),
        )
        .unwrap();
        for i in 0..3 {
            sink.send(format!("{{\"n\":{i}}}"));
        }
        for _ in 0..100 {
            if written.get() == 3 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"n\":0}\n{\"n\":1}\n{\"n\":2}\n");
        assert_eq!(dropped.get(), 0);
    }
}
