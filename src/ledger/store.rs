//! The ledger's writer thread: one SQLite connection, jobs from a queue, group commit.
//!
//! Every job runs inside its own savepoint of a shared transaction; the transaction commits once
//! for the whole batch, so a busy node pays one fsync per batch instead of one per request.
//!
//! Jobs run strictly in the order they were submitted, and each sees every earlier job's
//! changes. A `Durable` job is answered after the batch committed: its caller knows the change is
//! on disk (to the `synchronous` level configured). A `Visible` job is answered as soon as it ran:
//! later jobs see its change, which reaches the disk with the batch. Reservations are `Visible`
//! (losing one to a crash is the same as releasing it at the next start, which happens to every
//! open reservation anyway); everything that moves money for good is `Durable`.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::LedgerError;
use crate::config::LedgerSync;

type Reply = Box<dyn FnOnce() + Send>;

struct Job {
    run: Box<dyn FnOnce(&Connection) -> Reply + Send>,
    durable: bool,
}

/// When a job's caller hears back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// After the batch's commit.
    Durable,
    /// As soon as the job ran (its change is visible to later jobs, durable with the batch).
    Visible,
}

/// Most jobs in one commit; bounds the latency of the first job of a batch.
const MAX_BATCH: usize = 256;
/// Most jobs waiting for the writer; callers wait for room beyond that (backpressure).
const QUEUE_DEPTH: usize = 8192;

#[derive(Clone)]
pub struct Store {
    jobs: mpsc::SyncSender<Job>,
}

impl Store {
    pub fn open(path: &Path, sync: LedgerSync) -> Result<Store, LedgerError> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| LedgerError::Io(e.to_string()))?;
            }
        }
        let conn = open_connection(path, sync)?;
        super::schema::migrate(&conn)?;
        restrict_permissions(path);
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE_DEPTH);
        std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|e| LedgerError::Io(e.to_string()))?;
        Ok(Store { jobs: tx })
    }

    /// Runs `f` on the writer thread in its own savepoint; resolves after the batch committed.
    /// An `Err` from `f` rolls back only `f`'s changes.
    pub async fn run<T, F>(&self, f: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, LedgerError> + Send + 'static,
    {
        self.submit(Answer::Durable, f).await
    }

    /// Queues `f` now (so its place in the order is fixed when this returns) and gives a future
    /// of its result, answered as `answer` says.
    pub fn submit<T, F>(&self, answer: Answer, f: F) -> impl std::future::Future<Output = Result<T, LedgerError>> + Send
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, LedgerError> + Send + 'static,
    {
        let (reply_tx, reply_rx) = oneshot::channel::<Result<T, LedgerError>>();
        let job = Job {
            run: Box::new(move |conn: &Connection| {
                let result = in_savepoint(conn, f);
                Box::new(move || {
                    let _ = reply_tx.send(result);
                }) as Reply
            }),
            durable: answer == Answer::Durable,
        };
        // The queue is bounded: a full queue blocks, so only then is the send handed to the
        // blocking pool (under such backpressure the order among those callers is not kept).
        let queued = match self.jobs.try_send(job) {
            Ok(()) => Ok(None),
            Err(mpsc::TrySendError::Full(job)) => Ok(Some((self.jobs.clone(), job))),
            Err(mpsc::TrySendError::Disconnected(_)) => Err(LedgerError::Closed),
        };
        async move {
            if let Some((jobs, job)) = queued? {
                tokio::task::spawn_blocking(move || jobs.send(job))
                    .await
                    .map_err(|_| LedgerError::Closed)?
                    .map_err(|_| LedgerError::Closed)?;
            }
            reply_rx.await.map_err(|_| LedgerError::Closed)?
        }
    }
}

fn open_connection(path: &Path, sync: LedgerSync) -> Result<Connection, LedgerError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let level = match sync {
        LedgerSync::Full => "FULL",
        LedgerSync::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", level)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Each job runs in a savepoint; its sub-journal is better kept in memory than in a temp file.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.set_prepared_statement_cache_capacity(128);
    Ok(conn)
}

/// Opens a second connection for a read-only look from another process (the `wallet` command).
pub fn open_reader(path: &Path) -> Result<Connection, LedgerError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

#[cfg(unix)]
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

#[cfg(not(unix))]
fn restrict_permissions(_path: &Path) {}

fn in_savepoint<T>(conn: &Connection, f: impl FnOnce(&Connection) -> Result<T, LedgerError>) -> Result<T, LedgerError> {
    // Cached statements: these run twice per job, on the hot path.
    conn.prepare_cached("SAVEPOINT job")?.execute([])?;
    match f(conn) {
        Ok(v) => {
            conn.prepare_cached("RELEASE job")?.execute([])?;
            Ok(v)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO job; RELEASE job");
            Err(e)
        }
    }
}

fn writer_loop(conn: Connection, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let replies = run_batch(&conn, batch);
        for reply in replies {
            reply();
        }
    }
}

fn run_batch(conn: &Connection, batch: Vec<Job>) -> Vec<Box<dyn FnOnce() + Send>> {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        tracing::error!(error = %e, "ledger: cannot begin a transaction");
        // The jobs are dropped unanswered: their callers get LedgerError::Closed, not a false Ok.
        return Vec::new();
    }
    let mut replies = Vec::with_capacity(batch.len());
    for job in batch {
        let reply = (job.run)(conn);
        if job.durable {
            replies.push(reply);
        } else {
            reply();
        }
    }
    match conn.execute_batch("COMMIT") {
        Ok(()) => replies,
        Err(e) => {
            tracing::error!(error = %e, "ledger: commit failed, batch rolled back");
            let _ = conn.execute_batch("ROLLBACK");
            Vec::new()
        }
    }
}
