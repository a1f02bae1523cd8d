//! The ledger's writer thread: one SQLite connection, jobs from a queue, group commit.
//!
//! Jobs run strictly in the order they were submitted, each seeing every earlier job's changes,
//! inside one open transaction (each job in its own savepoint, but for the hot-path one, ending
//! a request's reservation, see `Undo`). The transaction commits when the syncer is free to sync
//! it, so a busy node commits and fsyncs about once per fsync time (at most once a millisecond),
//! whatever the number of requests; one that holds nothing anyone waits for (only `Visible` jobs,
//! or `Background` ones: key holders' charges) waits for the next job that someone does, up to
//! `VISIBLE_LINGER` or `BACKGROUND_LINGER`.
//!
//! With `LEDGER_SYNC=full` the fsync is pipelined: SQLite commits without syncing
//! (`synchronous=NORMAL`) and a second thread, the syncer, fsyncs the write-ahead log and only
//! then answers the commit's `Durable` jobs. Meanwhile the writer runs the next jobs, so a request
//! never waits behind another request's fsync, and one fsync covers every commit made before it
//! began. The frames a commit wrote are in the WAL file before the syncer is told, so once its
//! fsync returns they are on disk: the same guarantee as `synchronous=FULL` (checkpoints sync the
//! WAL and the database themselves at that level).
//!
//! A `Durable` job is answered once its commit is on disk (to the `LEDGER_SYNC` level). A
//! `Visible` job is answered as soon as it ran: later jobs see its change, which reaches the disk
//! with its commit (a reservation reading a key's row is one; it writes nothing). Everything that
//! moves money is `Durable`, or `Background` when its caller does not wait for the disk. A
//! transaction is never rolled back behind an answered job: a storage error that would undo more
//! than one job's own savepoint, a failed commit or a failed fsync stops the process
//! (fail-stop), and the restart recovers from what the disk holds.
//!
//! Reads of whole tables (the admin's lists and sums, `/metrics`) do not run on the writer, where
//! every payment queued behind them would wait for their scan: `Store::read` runs them on a
//! read-only connection beside it, in one snapshot of the last commit.

use std::fs::File;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::LedgerError;
use crate::config::LedgerSync;

type Reply = Box<dyn FnOnce() + Send>;

/// What running a job gives: its answer, and whether it failed in storage with nothing to undo
/// it but the whole transaction.
struct Ran {
    reply: Reply,
    poisons: bool,
}

struct Job {
    run: Box<dyn FnOnce(&Connection) -> Ran + Send>,
    answer: Answer,
    /// Runs on writes the hot path deferred (see `Hooks::write_deferred`): an `Undo::FailStop`
    /// job, which only the hot path uses.
    on_deferred: bool,
}

/// How a job's partial changes are undone when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undo {
    /// The job runs in its own savepoint: an `Err` rolls back only its changes.
    Savepoint,
    /// No savepoint (two statements fewer and no page copies, for the hot path). The job must
    /// change nothing before it returns a logical error; a storage error (`LedgerError::Sqlite`)
    /// could leave it half done, so it stops the process (see the module docs). Such jobs run
    /// with the writes earlier ones deferred still pending (see `Hooks::write_deferred`).
    FailStop,
}

/// When a job's caller hears back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Once its commit is on disk.
    Durable,
    /// Once its commit is on disk, for a caller that does not wait for it (a key holder's
    /// charge, answered before it is durable): the commit may wait up to `BACKGROUND_LINGER`
    /// for others to join it.
    Background,
    /// As soon as it ran (its change is visible to later jobs, on disk with its commit).
    Visible,
}

/// Most jobs run before the writer looks again whether to commit (the syncer may be free).
const MAX_BATCH: usize = 256;
/// Most jobs waiting for the writer; callers wait for room beyond that (backpressure).
const QUEUE_DEPTH: usize = 8192;

/// `Hooks::after_job`.
pub type AfterJob = Box<dyn FnMut(&Connection, &[i64]) + Send>;
/// `Hooks::write_deferred`.
pub type WriteDeferred = Box<dyn FnMut(&Connection) -> Result<(), LedgerError> + Send>;

/// What the ledger does on the writer around its jobs.
pub struct Hooks {
    /// Told after every job (and before its caller is answered) which rows of `keys` the job
    /// changed: their rowids, changes the job undid included.
    pub after_job: AfterJob,
    /// Writes what the hot path's jobs (`Undo::FailStop`: ending reservations) deferred, so that
    /// a batch of them writes once what they would each have written. Run before every other
    /// job and before every commit, so that nothing else ever reads around what is deferred. Its
    /// changes to `keys` are not told to `after_job` (the deferring jobs accounted for them); an
    /// error stops the node.
    pub write_deferred: WriteDeferred,
}

#[derive(Clone)]
pub struct Store {
    jobs: mpsc::SyncSender<Job>,
    /// Woken for every job someone waits for; `Background` jobs let it sleep (see `writer_loop`).
    writer: std::thread::Thread,
    /// Where `read` runs; `None` without WAL journaling, where a reader would hold up the
    /// writer's commits (reads then run on the writer).
    reader: Option<Arc<Reader>>,
}

/// A read-only connection beside the writer, opened on first use and kept.
struct Reader {
    path: PathBuf,
    conn: Mutex<Option<Connection>>,
}

impl Reader {
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, LedgerError>) -> Result<T, LedgerError> {
        let mut slot = self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut conn = match slot.take() {
            Some(conn) => conn,
            None => open_reader(&self.path)?,
        };
        // One snapshot for all of `f`'s statements: its sums add up to one state of the books.
        let result = conn.transaction().map_err(LedgerError::from).and_then(|tx| f(&tx));
        // After a storage error the next read starts on a fresh connection.
        if result.is_ok() {
            *slot = Some(conn);
        }
        result
    }
}

impl Store {
    /// Opens the ledger; `Background` jobs linger `background_linger` (`BACKGROUND_LINGER`, but
    /// tests stretch it).
    pub fn open(
        path: &Path,
        sync: LedgerSync,
        hooks: Hooks,
        background_linger: Duration,
    ) -> Result<Store, LedgerError> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| LedgerError::Io(e.to_string()))?;
            }
        }
        let in_use = lock_exclusively(path)?;
        let conn = open_connection(path)?;
        let wal = wal_path(&conn)?;
        let reader = wal.is_some().then(|| Arc::new(Reader { path: path.to_owned(), conn: Mutex::new(None) }));
        if wal.is_none() || sync == LedgerSync::Normal {
            // Without WAL journaling (some file systems) SQLite must sync each commit itself.
            let level = if sync == LedgerSync::Full { "FULL" } else { "NORMAL" };
            conn.pragma_update(None, "synchronous", level)?;
        }
        super::schema::migrate(&conn)?;
        restrict_permissions(path);
        let durability = match (sync, wal) {
            (LedgerSync::Full, Some(wal)) => {
                // The WAL exists from the migrations' first write; this also syncs them.
                let wal = File::open(&wal)
                    .and_then(|f| f.sync_data().map(|()| f))
                    .map_err(|e| LedgerError::Io(format!("cannot open and sync the ledger's WAL: {e}")))?;
                Durability::Syncer(start_syncer(wal)?)
            }
            _ => Durability::AtCommit,
        };
        let watch = KeysWatch::install(&conn, hooks)?;
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE_DEPTH);
        let writer = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || {
                writer_loop(conn, rx, durability, watch, background_linger);
                drop(in_use);
            })
            .map_err(|e| LedgerError::Io(e.to_string()))?;
        Ok(Store { jobs: tx, writer: writer.thread().clone(), reader })
    }

    /// Runs `f` on a read-only connection beside the writer, once every job queued before this
    /// call is committed: it sees them, and jobs queued after it do not wait for it. For reads of
    /// whole tables, whatever their length.
    pub async fn read<T, F>(&self, f: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, LedgerError> + Send + 'static,
    {
        let Some(reader) = self.reader.clone() else { return self.run(f).await };
        self.run(|_| Ok(())).await?;
        tokio::task::spawn_blocking(move || reader.read(f)).await.map_err(|_| LedgerError::Closed)?
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
        self.submit_with(answer, Undo::Savepoint, f)
    }

    /// `submit`, choosing how a failure is undone.
    pub fn submit_with<T, F>(
        &self,
        answer: Answer,
        undo: Undo,
        f: F,
    ) -> impl std::future::Future<Output = Result<T, LedgerError>> + Send
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, LedgerError> + Send + 'static,
    {
        let (reply_tx, reply_rx) = oneshot::channel::<Result<T, LedgerError>>();
        let queued = self.submit_detached(answer, undo, f, move |result| {
            let _ = reply_tx.send(result);
        });
        async move {
            queued.await?;
            reply_rx.await.map_err(|_| LedgerError::Closed)?
        }
    }

    /// Queues `f` like `submit_with`, for a caller that does not wait for its answer: `done` gets
    /// the result when it would have been answered (on a ledger thread, so it must be quick), or
    /// `Closed` if the job is dropped unrun. The future resolves once the job is in the queue
    /// (at once unless the queue is full): from then on every later job sees it.
    pub fn submit_detached<T, F, D>(
        &self,
        answer: Answer,
        undo: Undo,
        f: F,
        done: D,
    ) -> impl std::future::Future<Output = Result<(), LedgerError>> + Send
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, LedgerError> + Send + 'static,
        D: FnOnce(Result<T, LedgerError>) + Send + 'static,
    {
        let done = Unanswered(Some(done), PhantomData);
        let queued = self.queue(job(answer, undo, f, move |result| done.answer(result)));
        async move {
            if let Some(send) = queued? {
                tokio::task::spawn_blocking(send).await.map_err(|_| LedgerError::Closed)??;
            }
            Ok(())
        }
    }

    /// Puts a job in the queue. The queue is bounded: when it is full, the send that waits for
    /// room is returned, to run where blocking is allowed (under such backpressure the order
    /// among those callers is not kept).
    #[allow(clippy::type_complexity)]
    fn queue(&self, job: Job) -> Result<Option<Box<dyn FnOnce() -> Result<(), LedgerError> + Send>>, LedgerError> {
        let writer = (job.answer != Answer::Background).then(|| self.writer.clone());
        match self.jobs.try_send(job) {
            Ok(()) => {
                writer.inspect(std::thread::Thread::unpark);
                Ok(None)
            }
            Err(mpsc::TrySendError::Full(job)) => {
                let jobs = self.jobs.clone();
                Ok(Some(Box::new(move || {
                    jobs.send(job).map_err(|_| LedgerError::Closed)?;
                    writer.inspect(std::thread::Thread::unpark);
                    Ok(())
                })))
            }
            Err(mpsc::TrySendError::Disconnected(_)) => Err(LedgerError::Closed),
        }
    }
}

/// A detached job's callback: called with `Closed` if the job is dropped without running.
struct Unanswered<T, D: FnOnce(Result<T, LedgerError>)>(Option<D>, PhantomData<fn(T)>);

impl<T, D: FnOnce(Result<T, LedgerError>)> Unanswered<T, D> {
    fn answer(mut self, result: Result<T, LedgerError>) {
        if let Some(done) = self.0.take() {
            done(result);
        }
    }
}

impl<T, D: FnOnce(Result<T, LedgerError>)> Drop for Unanswered<T, D> {
    fn drop(&mut self) {
        if let Some(done) = self.0.take() {
            done(Err(LedgerError::Closed));
        }
    }
}

/// A job running `f` (undone as `undo` says) whose result goes to `deliver` when `answer` says.
fn job<T, F, D>(answer: Answer, undo: Undo, f: F, deliver: D) -> Job
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, LedgerError> + Send + 'static,
    D: FnOnce(Result<T, LedgerError>) + Send + 'static,
{
    Job {
        run: Box::new(move |conn: &Connection| {
            let result = match undo {
                Undo::Savepoint => in_savepoint(conn, f),
                Undo::FailStop => f(conn),
            };
            let poisons = undo == Undo::FailStop && matches!(result, Err(LedgerError::Sqlite(_)));
            Ran { reply: Box::new(move || deliver(result)), poisons }
        }),
        answer,
        on_deferred: undo == Undo::FailStop,
    }
}

/// How long opening waits for another holder of the ledger to let go (a node restarting while
/// the previous one still closes its ledger).
pub(super) const LOCK_WAIT: Duration = Duration::from_secs(5);

/// One node per ledger file: running requests' holds live in the memory of the node that writes
/// it, so another process writing the same file could pay out money they hold. An exclusive lock
/// on `<ledger>.lock`, held until the writer has committed its last job; readers (the `wallet`
/// command) do not take it.
fn lock_exclusively(path: &Path) -> Result<File, LedgerError> {
    let lock_path = PathBuf::from(format!("{}.lock", path.display()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| LedgerError::Io(format!("cannot open {}: {e}", lock_path.display())))?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LedgerError::Io(format!(
                    "the ledger {} is in use by another node (it holds {})",
                    path.display(),
                    lock_path.display()
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(LedgerError::Io(format!("cannot lock {}: {e}", lock_path.display())))
            }
        }
    }
}

fn open_connection(path: &Path) -> Result<Connection, LedgerError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // Commits do not sync; `LEDGER_SYNC=full` syncs them on the syncer thread (see above).
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Each job runs in a savepoint; its sub-journal is better kept in memory than in a temp file.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // A checkpoint copies the WAL's pages into the database and syncs both: under load, fewer
    // and larger ones copy each often-changed page once (the WAL stays under about 16 MB).
    conn.pragma_update(None, "wal_autocheckpoint", 4096)?;
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
    // Cached statements: they run around nearly every job (all but the hot-path one).
    conn.prepare_cached("SAVEPOINT job")?.execute([])?;
    // Should the savepoint not close, the job's changes (or its half-done ones) would commit
    // with the transaction whatever its caller was told.
    match f(conn) {
        Ok(v) => {
            if let Err(e) = conn.prepare_cached("RELEASE job").and_then(|mut s| s.execute([])) {
                fail_stop(&format!("a job's savepoint could not be released: {e}"));
            }
            Ok(v)
        }
        Err(e) => {
            if let Err(undo) = conn.execute_batch("ROLLBACK TO job; RELEASE job") {
                fail_stop(&format!("a failed job could not be undone: {undo}"));
            }
            Err(e)
        }
    }
}

/// Which rows of `keys` each job changes (SQLite's update hook), handed to `Hooks::after_job`;
/// and what the hot path deferred, written when due.
struct KeysWatch {
    changed: Arc<Mutex<Vec<i64>>>,
    hooks: Hooks,
}

impl KeysWatch {
    fn install(conn: &Connection, hooks: Hooks) -> Result<KeysWatch, LedgerError> {
        let changed = Arc::new(Mutex::new(Vec::new()));
        let sink = changed.clone();
        conn.update_hook(Some(move |_: rusqlite::hooks::Action, _: &str, table: &str, rowid: i64| {
            if table == "keys" {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(rowid);
            }
        }))?;
        Ok(KeysWatch { changed, hooks })
    }

    fn job_done(&mut self, conn: &Connection) {
        let changed = std::mem::take(&mut *self.changed.lock().unwrap_or_else(|p| p.into_inner()));
        (self.hooks.after_job)(conn, &changed);
    }

    /// Before a job that does not run on deferred writes, and before a commit (the last job's
    /// changes were told already, so only the deferred writes' are dropped).
    fn write_deferred(&mut self, conn: &Connection) {
        if let Err(e) = (self.hooks.write_deferred)(conn) {
            fail_stop(&format!("deferred writes failed: {e}"));
        }
        self.changed.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// When a batch's `Durable` jobs are answered.
enum Durability {
    /// At commit (`LEDGER_SYNC=normal`: on disk at the next checkpoint).
    AtCommit,
    /// Once the syncer's fsync of the WAL, begun after the commit, returned.
    Syncer(Syncer),
}

/// The writer's end of the syncer thread.
struct Syncer {
    commits: mpsc::Sender<Vec<Reply>>,
    /// Commits handed over and not yet synced.
    unsynced: Arc<AtomicUsize>,
}

impl Syncer {
    fn idle(&self) -> bool {
        self.unsynced.load(Ordering::Acquire) == 0
    }

    fn hand_over(&self, replies: Vec<Reply>) {
        self.unsynced.fetch_add(1, Ordering::AcqRel);
        if self.commits.send(replies).is_err() {
            fail_stop("the syncer thread is gone");
        }
    }
}

/// Stops the process: the ledger can no longer tell what is on disk, and every caller of a job
/// it could not finish must not act on it. The restart recovers from what the disk holds (open
/// reservations released, pending redemptions and payouts settled).
fn fail_stop(why: &str) -> ! {
    tracing::error!("ledger: {why}; stopping");
    eprintln!("routstr-node: ledger: {why}; stopping");
    std::process::abort();
}

/// Where SQLite keeps the write-ahead log (`None` when it could not use WAL journaling here):
/// next to the database file SQLite resolved (symbolic links followed), not the configured path.
fn wal_path(conn: &Connection) -> Result<Option<PathBuf>, LedgerError> {
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(journal_mode = %mode, "the ledger could not use WAL journaling; every commit syncs in line");
        return Ok(None);
    }
    let db = conn.path().filter(|p| !p.is_empty()).ok_or_else(|| LedgerError::Io("the ledger has no file".into()))?;
    Ok(Some(PathBuf::from(format!("{db}-wal"))))
}

fn start_syncer(wal: File) -> Result<Syncer, LedgerError> {
    let (tx, rx) = mpsc::channel::<Vec<Reply>>();
    let unsynced = Arc::new(AtomicUsize::new(0));
    let counter = unsynced.clone();
    std::thread::Builder::new()
        .name("ledger-syncer".into())
        .spawn(move || syncer_loop(&wal, &rx, &counter))
        .map_err(|e| LedgerError::Io(e.to_string()))?;
    Ok(Syncer { commits: tx, unsynced })
}

fn syncer_loop(wal: &File, rx: &mpsc::Receiver<Vec<Reply>>, unsynced: &AtomicUsize) {
    while let Ok(first) = rx.recv() {
        // Every commit handed over before this fsync begins is covered by it.
        let mut waiting = vec![first];
        waiting.extend(rx.try_iter());
        if let Err(e) = wal.sync_data() {
            // After a failed fsync the kernel may drop the unwritten pages and report later
            // fsyncs as fine: nothing could be answered as durable again.
            fail_stop(&format!("fsync of the write-ahead log failed: {e}"));
        }
        let synced = waiting.len();
        waiting.into_iter().flatten().for_each(|reply| reply());
        unsynced.fetch_sub(synced, Ordering::AcqRel);
    }
}

/// How long the writer waits for a job before it looks again whether the syncer is free, while
/// it holds commits back.
const SYNCER_POLL: Duration = Duration::from_micros(500);

/// Most jobs one transaction holds while it waits for the syncer.
const MAX_TRANSACTION: usize = 4096;

/// Shortest time from one commit to the next. A commit writes every page its jobs changed, and
/// under load most of them are the same few pages (a key's row, the ends of the request record
/// and its index): gathering a millisecond of jobs writes each of them once, not once per few
/// requests. A quiet node commits a `Durable` job at once; nobody's answer waits on this but
/// `Durable` ones.
const COMMIT_INTERVAL: Duration = Duration::from_millis(1);

/// Longest a transaction holding only `Visible` jobs stays open. Nobody waits on its commit, so
/// it waits for a job that someone does (a request reading its key's row is followed by the job
/// that ends it): one commit per request instead of two on a quiet node.
pub(super) const VISIBLE_LINGER: Duration = Duration::from_millis(50);

/// Longest a transaction whose durable jobs nobody waits for (`Background`: key holders'
/// charges) stays open gathering more. A quiet node would otherwise write, commit and fsync once
/// per request, and wake two threads for it; this way one commit covers the requests of 3 ms.
/// (10 ms gathered ≈ 50 charges at a time at one busy connection, run at once on one of two cores:
/// the benchmark's p99 at one connection was ≈ 0.1–0.2 ms higher than with 3 ms.)
/// A job someone waits for (`Durable`) ends the wait: it commits with everything before it.
pub(super) const BACKGROUND_LINGER: Duration = Duration::from_millis(3);

/// How long a transaction stays open before it may commit, given what it holds.
fn linger(opened: Instant, hurried: bool, durable_jobs: bool, background: Duration) -> Duration {
    let linger = match (hurried, durable_jobs) {
        (true, _) => return Duration::ZERO,
        (false, true) => background,
        (false, false) => VISIBLE_LINGER,
    };
    linger.saturating_sub(opened.elapsed())
}

/// The writer: runs jobs as they come, in one open transaction, and commits it when the syncer
/// is free to sync it (at once with `LEDGER_SYNC=normal`) and `COMMIT_INTERVAL` has passed since
/// the last commit. While the syncer is busy with the previous commit there is nothing to gain
/// from committing, so jobs gather in the transaction: a busy node commits (and writes each
/// changed page) about once per fsync or interval, not once per batch. A transaction nobody
/// waits on commits after `VISIBLE_LINGER` (only `Visible` jobs) or `BACKGROUND_LINGER`, or with
/// the next job someone waits on. While `Background` jobs linger the writer sleeps: more of them
/// queue without waking it (each wake-up costs both threads a switch), and a job someone waits
/// for wakes it (`Store::queue`).
fn writer_loop(
    conn: Connection,
    rx: mpsc::Receiver<Job>,
    durability: Durability,
    mut watch: KeysWatch,
    background_linger: Duration,
) {
    let mut opened_at: Option<Instant> = None;
    let mut jobs_in_transaction = 0usize;
    let mut durable: Vec<Reply> = Vec::new();
    // Whether someone waits for this transaction's commit (a `Durable` job).
    let mut hurried = false;
    let mut last_commit: Option<Instant> = None;
    let interval_left =
        |last: Option<Instant>| last.map_or(Duration::ZERO, |t| COMMIT_INTERVAL.saturating_sub(t.elapsed()));
    loop {
        let first = match opened_at {
            None => match rx.recv() {
                Ok(job) => Some(job),
                Err(_) => break,
            },
            Some(opened)
                if !durable.is_empty() && !hurried && !linger(opened, false, true, background_linger).is_zero() =>
            {
                // Jobs already queued first (more than a batch, or one someone waits for whose
                // wake-up the last park used up); then sleep. A job queued after the look is
                // queued before its unpark, which then ends the sleep or prevents it.
                let job = match rx.try_recv() {
                    Err(mpsc::TryRecvError::Empty) => {
                        std::thread::park_timeout(linger(opened, false, true, background_linger));
                        rx.try_recv()
                    }
                    queued => queued,
                };
                match job {
                    Ok(job) => Some(job),
                    Err(mpsc::TryRecvError::Empty) => None,
                    Err(mpsc::TryRecvError::Disconnected) => break,
                }
            }
            Some(opened) => {
                let lingering = linger(opened, hurried, !durable.is_empty(), background_linger);
                let wait = if !lingering.is_zero() || durable.is_empty() {
                    lingering
                } else {
                    let left = interval_left(last_commit);
                    if left.is_zero() {
                        SYNCER_POLL
                    } else {
                        left
                    }
                };
                match rx.recv_timeout(wait) {
                    Ok(job) => Some(job),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        };
        if let Some(first) = first {
            if opened_at.is_none() {
                if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
                    // Dropped unanswered: its caller gets LedgerError::Closed, not a false Ok.
                    tracing::error!(error = %e, "ledger: cannot begin a transaction");
                    drop(first);
                    continue;
                }
                opened_at = Some(Instant::now());
            }
            let batch = std::iter::once(first).chain(rx.try_iter().take(MAX_BATCH - 1));
            for job in batch {
                hurried |= job.answer == Answer::Durable;
                run_job(&conn, job, &mut durable, &mut watch);
                jobs_in_transaction += 1;
            }
        }
        let Some(opened) = opened_at else { continue };
        let due = if !linger(opened, hurried, !durable.is_empty(), background_linger).is_zero() {
            false
        } else if durable.is_empty() {
            true
        } else {
            let free = match &durability {
                Durability::AtCommit => true,
                Durability::Syncer(syncer) => syncer.idle(),
            };
            free && interval_left(last_commit).is_zero()
        };
        if due || jobs_in_transaction >= MAX_TRANSACTION {
            last_commit = Some(Instant::now());
            watch.write_deferred(&conn);
            commit(&conn, &durability, std::mem::take(&mut durable));
            opened_at = None;
            hurried = false;
            jobs_in_transaction = 0;
        }
    }
    if opened_at.is_some() {
        watch.write_deferred(&conn);
        commit(&conn, &durability, durable);
    }
}

/// Runs one job inside the open transaction: a `Visible` job is answered at once, a `Durable`
/// one once its commit is on disk.
fn run_job(conn: &Connection, job: Job, durable: &mut Vec<Reply>, watch: &mut KeysWatch) {
    if !job.on_deferred {
        watch.write_deferred(conn);
    }
    let Ran { reply, poisons } = (job.run)(conn);
    if poisons || conn.is_autocommit() {
        // A storage error without a savepoint (its half-done changes cannot be told apart from
        // the transaction's), or one that made SQLite roll the transaction back by itself:
        // jobs already answered `Visible` from it would be undone behind their callers' backs.
        fail_stop("a storage error in the middle of a transaction");
    }
    watch.job_done(conn);
    if job.answer != Answer::Visible {
        durable.push(reply);
    } else {
        reply();
    }
}

fn commit(conn: &Connection, durability: &Durability, durable: Vec<Reply>) {
    if let Err(e) = conn.execute_batch("COMMIT") {
        fail_stop(&format!("commit failed: {e}"));
    }
    match durability {
        Durability::AtCommit => durable.into_iter().for_each(|reply| reply()),
        // Nobody waits for this commit: the next fsync covers it.
        Durability::Syncer(_) if durable.is_empty() => {}
        Durability::Syncer(syncer) => syncer.hand_over(durable),
    }
}
