//! Reservations in memory: the holds running requests have on keys' balances.
//!
//! A request's reservation is checked and taken here, on the request's own thread, against a
//! copy of its key's balance: no ledger job, no thread switch. (That round trip was about half of
//! what the node added to a request below saturation.) Holds were never durable anyway: a restart
//! releases every open reservation, so losing them with the process changes nothing.
//!
//! Only the ledger's writer thread changes balances, one job at a time, and the copies follow it:
//! - a job that takes money from a key (a payout, an operator's debit) *seizes* the key first:
//!   it reads the key's holds and drops the copy, so until the job is done a new reservation on
//!   that key is taken on the writer, after the job;
//! - after every job the writer refreshes the copy of each key row the job changed (or seized),
//!   from the row itself, so credits and undone changes are seen;
//! - ending a reservation (on the writer) releases the hold and takes the charge from the copy
//!   in one step. The copy is the row as the writer left it, so the job does not read the row
//!   (only a key without a copy is read first), and the charge is written to the row later,
//!   with the batch's other charges to it, before any other job reads it: until then the writer
//!   reads rows less their unwritten charges, so a copy read back is still exact.
//!
//! So a copy is never above what the writer has left on the key, and holds never exceed the
//! balance: whatever the interleaving, money held for a request cannot be paid out or charged to
//! another one.
//!
//! Pure bookkeeping, no I/O: the ledger reads the rows and calls in.

use std::sync::{Mutex, MutexGuard};

use super::LedgerError;

/// Most keys with a copy; past it, copies of keys without a running request are dropped (they
/// are read again on their next request). X-Cashu payments make a key per request.
const MAX_KEYS: usize = 16_384;

/// A key's row, as far as reservations care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Account {
    /// The row's id: its charge is written there without looking the key up again.
    pub rowid: i64,
    /// What the row leaves to spend: its balance, less any hold an older node recorded in it
    /// (those are released at start, before anything is served).
    pub free_msat: u64,
    pub revoked: bool,
    /// The key's `Key-Expiry-Time` (Unix seconds): from then on it pays for nothing.
    pub expires_at: Option<i64>,
}

#[derive(Debug, Default)]
struct KeyHolds {
    reserved_msat: u64,
    open: u64,
    /// The row as the writer left it: `None` until read, and while a job seized the key.
    account: Option<Account>,
}

/// Keys are hex SHA-256 digests and the node's own request ids: foldhash (seeded per process) is
/// enough against crafted collisions, at a fraction of SipHash's cost on 64-character keys
/// (each request hashes ≈ six times here).
type HashMap<K, V> = foldhash::HashMap<K, V>;

#[derive(Default)]
struct State {
    keys: HashMap<String, KeyHolds>,
    /// Running requests: their key and what each holds.
    requests: HashMap<String, (String, u64)>,
    reserved_msat: u64,
    /// Keys seized by the running job: refreshed once it is done.
    seized: Vec<String>,
}

#[derive(Default)]
pub(super) struct Holds {
    state: Mutex<State>,
}

/// Whether a reservation could be decided here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    Held,
    /// No copy of the key (never read, dropped, or seized): decide on the writer.
    Unknown,
}

/// What ending a hold takes from its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Charge {
    pub charged_msat: u64,
    pub uncollected_msat: u64,
    /// The key's row, to take the charge from.
    pub rowid: i64,
}

/// How ending a hold went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    Charged(Charge),
    /// The request holds nothing (it ended before, or never reserved).
    NotHeld,
    /// The key has no copy (dropped, or seized by a job): nothing was changed; end it again
    /// with the row read.
    NeedsRow,
}

impl Holds {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No critical section below can panic once it writes: a poisoned lock still holds
        // consistent books.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `amount_msat` of the key's free balance for a request at `now` (Unix seconds), if
    /// the copy can tell.
    pub fn try_reserve(
        &self,
        key_hash: &str,
        request_id: &str,
        amount_msat: u64,
        now: i64,
    ) -> Result<Admission, LedgerError> {
        let mut state = self.lock();
        let State { keys, requests, reserved_msat, .. } = &mut *state;
        let Some(key) = keys.get_mut(key_hash) else { return Ok(Admission::Unknown) };
        let Some(account) = key.account else { return Ok(Admission::Unknown) };
        super::key_usable(account.revoked, account.expires_at, now)?;
        let available = account.free_msat.saturating_sub(key.reserved_msat);
        if available < amount_msat {
            return Err(LedgerError::Insufficient { required: amount_msat, available });
        }
        if requests.contains_key(request_id) {
            return Err(LedgerError::Schema(format!("request {request_id} already holds a reservation")));
        }
        // Within the key's balance, so no sum below can overflow.
        key.reserved_msat += amount_msat;
        key.open += 1;
        *reserved_msat = reserved_msat.saturating_add(amount_msat);
        requests.insert(request_id.to_owned(), (key_hash.to_owned(), amount_msat));
        Ok(Admission::Held)
    }

    /// The writer read the key's row: keep it as the key's copy.
    pub fn load(&self, key_hash: &str, account: Account) {
        let mut state = self.lock();
        if state.keys.len() >= MAX_KEYS && !state.keys.contains_key(key_hash) {
            state.keys.retain(|_, k| k.open > 0);
        }
        state.keys.entry(key_hash.to_owned()).or_default().account = Some(account);
    }

    /// After a job changed (or seized) the key: its row now, `None` if unknown. Only keys with a
    /// copy or a hold are kept.
    pub fn refresh(&self, key_hash: &str, account: Option<Account>) {
        if let Some(key) = self.lock().keys.get_mut(key_hash) {
            key.account = account;
        }
    }

    /// Forgets every copy (their rows could not be read back): each is read again when needed.
    pub fn forget_copies(&self) {
        self.lock().keys.values_mut().for_each(|k| k.account = None);
    }

    /// For a job about to take money from the key: what running requests hold on it. Until the
    /// job is done, new reservations on the key wait for the writer.
    pub fn seize(&self, key_hash: &str) -> u64 {
        let mut state = self.lock();
        state.seized.push(key_hash.to_owned());
        match state.keys.get_mut(key_hash) {
            Some(key) => {
                key.account = None;
                key.reserved_msat
            }
            None => 0,
        }
    }

    /// The keys seized since the last call (the writer refreshes them after each job).
    pub fn take_seized(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().seized)
    }

    /// Ends a request's hold, on the writer. `cost` (None: release) is charged from the hold plus
    /// what no other request holds, of what the key's row leaves to spend: `row` when the caller
    /// read it, else the copy (the row as the writer left it). The copy is lowered by the charge
    /// in the same step.
    pub fn end(
        &self,
        key_hash: &str,
        request_id: &str,
        amount_msat: u64,
        row: Option<Account>,
        cost_msat: Option<u64>,
    ) -> Ended {
        let mut state = self.lock();
        let State { keys, requests, reserved_msat, .. } = &mut *state;
        match requests.get(request_id) {
            Some((key, amount)) if key == key_hash && *amount == amount_msat => {}
            _ => return Ended::NotHeld,
        }
        let Some(key) = keys.get_mut(key_hash) else { return Ended::NotHeld };
        let Some(account) = row.or(key.account) else { return Ended::NeedsRow };
        requests.remove(request_id);
        let others = key.reserved_msat.saturating_sub(amount_msat);
        let collectable = account.free_msat.saturating_sub(others);
        let wanted = cost_msat.unwrap_or(0);
        let charged_msat = wanted.min(collectable);
        key.reserved_msat = others;
        key.open = key.open.saturating_sub(1);
        *reserved_msat = reserved_msat.saturating_sub(amount_msat);
        // A seized key keeps no copy until the writer refreshes it.
        key.account = key.account.map(|_| Account { free_msat: account.free_msat - charged_msat, ..account });
        Ended::Charged(Charge { charged_msat, uncollected_msat: wanted - charged_msat, rowid: account.rowid })
    }

    /// What running requests hold on the key.
    pub fn reserved_of(&self, key_hash: &str) -> u64 {
        self.lock().keys.get(key_hash).map_or(0, |k| k.reserved_msat)
    }

    /// Whether a request on the key is running.
    pub fn is_held(&self, key_hash: &str) -> bool {
        self.lock().keys.get(key_hash).is_some_and(|k| k.open > 0)
    }

    /// Everything held, and by how many requests.
    pub fn totals(&self) -> (u64, u64) {
        let state = self.lock();
        (state.reserved_msat, state.requests.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn account(free_msat: u64) -> Account {
        Account { rowid: 7, free_msat, revoked: false, expires_at: None }
    }

    fn loaded(key: &str, free_msat: u64) -> Holds {
        let holds = Holds::default();
        holds.load(key, account(free_msat));
        holds
    }

    fn charged(ended: Ended) -> Charge {
        match ended {
            Ended::Charged(charge) => charge,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reserves_only_what_is_free() {
        let holds = loaded("k", 10_000);
        assert_eq!(holds.try_reserve("k", "r1", 6_000, NOW).unwrap(), Admission::Held);
        match holds.try_reserve("k", "r2", 5_000, NOW) {
            Err(LedgerError::Insufficient { required: 5_000, available: 4_000 }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(holds.try_reserve("k", "r2", 4_000, NOW).unwrap(), Admission::Held);
        assert_eq!(holds.totals(), (10_000, 2));
        assert!(matches!(holds.try_reserve("k", "r1", 0, NOW), Err(LedgerError::Schema(_))), "one hold per request");
        assert_eq!(holds.try_reserve("other", "r3", 1, NOW).unwrap(), Admission::Unknown);
    }

    #[test]
    fn a_revoked_key_reserves_nothing() {
        let holds = Holds::default();
        holds.load("k", Account { revoked: true, ..account(10_000) });
        assert!(matches!(holds.try_reserve("k", "r1", 1, NOW), Err(LedgerError::KeyRevoked)));
    }

    #[test]
    fn an_expired_key_reserves_nothing_from_its_expiry_on() {
        let holds = Holds::default();
        holds.load("k", Account { expires_at: Some(NOW + 1), ..account(10_000) });
        assert_eq!(holds.try_reserve("k", "r1", 1, NOW).unwrap(), Admission::Held);
        assert!(matches!(holds.try_reserve("k", "r2", 1, NOW + 1), Err(LedgerError::KeyExpired)));
        assert_eq!(holds.totals(), (1, 1), "the refused request holds nothing");
        // A running request still ends normally after the key expired.
        assert_eq!(charged(holds.end("k", "r1", 1, None, Some(1))).charged_msat, 1);
    }

    #[test]
    fn ending_charges_the_hold_and_what_no_one_else_holds() {
        let holds = loaded("k", 10_000);
        holds.try_reserve("k", "r1", 3_000, NOW).unwrap();
        holds.try_reserve("k", "r2", 5_000, NOW).unwrap();
        // r1 costs more than it held: it may take the 2,000 nobody holds, not r2's 5,000.
        // Taken from the copy: the row as the writer left it.
        let charge = charged(holds.end("k", "r1", 3_000, None, Some(9_000)));
        assert_eq!(charge, Charge { charged_msat: 5_000, uncollected_msat: 4_000, rowid: 7 });
        assert_eq!(holds.end("k", "r1", 3_000, Some(account(5_000)), Some(1)), Ended::NotHeld, "ends once");
        assert_eq!((holds.reserved_of("k"), holds.totals()), (5_000, (5_000, 1)));
        // The copy was lowered by the charge: nothing is free beside r2's hold.
        assert!(matches!(holds.try_reserve("k", "r3", 1, NOW), Err(LedgerError::Insufficient { available: 0, .. })));
        let released = charged(holds.end("k", "r2", 5_000, None, None));
        assert_eq!(released, Charge { charged_msat: 0, uncollected_msat: 0, rowid: 7 });
        assert_eq!((holds.totals(), holds.is_held("k")), ((0, 0), false));
        assert_eq!(holds.try_reserve("k", "r4", 5_000, NOW).unwrap(), Admission::Held);
    }

    #[test]
    fn an_end_must_match_its_reservation() {
        let holds = loaded("k", 10_000);
        holds.load("other", account(10_000));
        holds.try_reserve("k", "r1", 3_000, NOW).unwrap();
        assert_eq!(holds.end("k", "r1", 2_999, None, Some(1)), Ended::NotHeld);
        assert_eq!(holds.end("k", "nobody", 3_000, None, Some(1)), Ended::NotHeld);
        assert_eq!(holds.end("other", "r1", 3_000, None, Some(1)), Ended::NotHeld, "another key's hold");
        assert_eq!((holds.reserved_of("k"), holds.reserved_of("other")), (3_000, 0));
    }

    #[test]
    fn a_seized_key_is_decided_on_the_writer_until_refreshed() {
        let holds = loaded("k", 10_000);
        holds.try_reserve("k", "r1", 4_000, NOW).unwrap();
        assert_eq!(holds.seize("k"), 4_000);
        assert_eq!(holds.try_reserve("k", "r2", 1, NOW).unwrap(), Admission::Unknown);
        assert_eq!(holds.take_seized(), vec!["k".to_owned()]);
        assert!(holds.take_seized().is_empty());
        // The job paid out the 6,000 nobody held.
        holds.refresh("k", Some(account(4_000)));
        assert!(matches!(holds.try_reserve("k", "r2", 1, NOW), Err(LedgerError::Insufficient { available: 0, .. })));
        // The hold survives the seizure and still ends normally.
        let charge = charged(holds.end("k", "r1", 4_000, None, Some(1_000)));
        assert_eq!(charge.charged_msat, 1_000);
        holds.forget_copies();
        assert_eq!(holds.try_reserve("k", "r3", 1, NOW).unwrap(), Admission::Unknown);
    }

    #[test]
    fn idle_copies_are_dropped_past_the_limit_but_not_running_ones() {
        let holds = loaded("busy", 10_000);
        holds.try_reserve("busy", "r1", 1_000, NOW).unwrap();
        for i in 0..MAX_KEYS {
            holds.load(&format!("idle{i}"), account(1));
        }
        assert_eq!(holds.reserved_of("busy"), 1_000);
        assert!(holds.lock().keys.len() <= MAX_KEYS);
        // The running key kept its copy; dropped ones are read again.
        assert_eq!(holds.try_reserve("busy", "r2", 9_000, NOW).unwrap(), Admission::Held);
        assert_eq!(holds.try_reserve("idle0", "r3", 1, NOW).unwrap(), Admission::Unknown);
        assert_eq!(charged(holds.end("busy", "r1", 1_000, None, Some(10))).charged_msat, 10);
    }

    #[test]
    fn a_key_without_a_copy_is_ended_with_its_row_read() {
        let holds = loaded("k", 10_000);
        holds.try_reserve("k", "r1", 4_000, NOW).unwrap();
        holds.seize("k");
        // Nothing changes until the row is given.
        assert_eq!(holds.end("k", "r1", 4_000, None, Some(1_000)), Ended::NeedsRow);
        assert_eq!(holds.totals(), (4_000, 1));
        let row = Account { rowid: 9, ..account(6_000) };
        assert_eq!(
            charged(holds.end("k", "r1", 4_000, Some(row), Some(1_000))),
            Charge { charged_msat: 1_000, uncollected_msat: 0, rowid: 9 }
        );
        assert_eq!(holds.totals(), (0, 0));
        // The seized key is still without a copy: the writer's refresh sets it.
        assert_eq!(holds.try_reserve("k", "r2", 1, NOW).unwrap(), Admission::Unknown);
    }
}
