//! The ledger: who holds how many msat, what is reserved, charged and paid out.
//!
//! Money only moves through these operations, each one atomic and durable before it returns:
//! - in: a token redemption is recorded `pending` before the swap, `credited` after it;
//! - reserve (a hold in memory, see `holds`: it moves nothing) → settle (charge what was used,
//!   release the rest) or release, exactly once;
//! - out: a payout (refund or change) debits the balance before the token is made, and keeps the
//!   token once made, so it can be handed out again if the first answer was lost.
//!
//! - remote spends (routing to discovered providers): a token from the node's own wallet is
//!   recorded `pending` before it is made, `sent` (with the token) before it is sent, and
//!   `settled` once its change is back in the wallet (or `recovering` until then).
//!
//! Conservation, checked by `totals()`: credited = balances + charged + paid out. The wallet
//! holds credited − paid out − payout fees − (remote sent − remote change returned), plus
//! whatever the operator put in or took out directly.

mod admin;
mod holds;
mod lightning;
mod retention;
mod schema;
mod store;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

pub use admin::*;
use holds::{Account, Admission, Ended, Holds};
pub use lightning::{Invoice, LightningPayout, OperatorPayout, Swap};
pub use store::open_reader;
use store::{Answer, Store, Undo};

use crate::config::LedgerSync;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("unknown API key")]
    KeyNotFound,
    #[error("this API key was revoked")]
    KeyRevoked,
    #[error("this API key has expired")]
    KeyExpired,
    #[error("insufficient balance: {required} msat required, {available} msat available")]
    Insufficient { required: u64, available: u64 },
    #[error("ledger storage error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("ledger schema: {0}")]
    Schema(String),
    #[error("ledger I/O: {0}")]
    Io(String),
    #[error("the ledger is shutting down")]
    Closed,
}

pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// A prepaid key (`sk-…`, or a Cashu token used as a key).
    Key,
    /// The balance of one stateless `X-Cashu` request, paid out as change when it ends.
    XCashu,
}

impl KeyKind {
    fn as_str(self) -> &'static str {
        match self {
            KeyKind::Key => "key",
            KeyKind::XCashu => "xcashu",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    pub balance_msat: u64,
    pub reserved_msat: u64,
    pub spent_msat: u64,
    pub requests: u64,
    pub mint_url: Option<String>,
    pub refund_address: Option<String>,
    pub expiry_time: Option<i64>,
    pub revoked: bool,
}

impl KeyInfo {
    pub fn available_msat(&self) -> u64 {
        self.balance_msat.saturating_sub(self.reserved_msat)
    }

    /// Whether the key may still pay or be topped up at `now` (Unix seconds): not revoked, not
    /// past its `Key-Expiry-Time`. Its balance can be read and refunded either way.
    pub fn usable(&self, now: i64) -> Result<(), LedgerError> {
        key_usable(self.revoked, self.expiry_time, now)
    }
}

/// Whether a key revoked or not, expiring at `expires_at` (Unix seconds), may pay at `now`: the one
/// rule for the keys' rows (`KeyInfo`) and their copies in memory (`holds`).
fn key_usable(revoked: bool, expires_at: Option<i64>, now: i64) -> Result<(), LedgerError> {
    if revoked {
        Err(LedgerError::KeyRevoked)
    } else if expires_at.is_some_and(|at| at <= now) {
        Err(LedgerError::KeyExpired)
    } else {
        Ok(())
    }
}

/// How a request's reservation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub charged_msat: u64,
    /// Part of the cost that exceeded the reservation and the free balance: not collected.
    pub uncollected_msat: u64,
    /// False when the reservation had already ended (settlement is idempotent).
    pub first_time: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedemptionState {
    /// Recorded now: the caller must swap the token, then complete or fail it.
    Started,
    /// This token was already redeemed into this key.
    Credited { key_hash: String },
    /// Another request is redeeming this token right now.
    InProgress,
    /// Its proofs were already redeemed here as part of another token.
    ProofsUsed,
    /// Its proofs are being redeemed right now as part of another token.
    ProofsBusy,
}

#[derive(Debug, Clone)]
pub struct PendingRedemption {
    pub token_hash: String,
    pub key_hash: String,
    pub mint_url: String,
    pub value_msat: u64,
    pub proof_ys: Vec<String>,
    pub kind: KeyKind,
}

#[derive(Debug, Clone)]
pub struct Payout {
    pub id: i64,
    pub key_hash: String,
    pub mint_url: String,
    pub debit_msat: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayoutLookup {
    Ready { token: String, amount_msat: u64 },
    Pending,
    NotFound,
}

/// Sums for the conservation check and the operator's view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub credited_msat: u64,
    pub redemption_fees_msat: u64,
    pub balances_msat: u64,
    pub reserved_msat: u64,
    pub charged_msat: u64,
    pub paid_out_debit_msat: u64,
    pub paid_out_msat: u64,
    pub payout_fees_msat: u64,
    pub open_reservations: u64,
    pub pending_redemptions: u64,
    /// The face value of those tokens from trusted mints: the wallet may hold their proofs
    /// already (the swap done, the credit not yet recorded), and they are users' money, not the
    /// operator's.
    pub pending_redemptions_msat: u64,
    /// Tokens our wallet sent to remote providers (value + fees), once made.
    pub remote_sent_msat: u64,
    /// Change from remote providers credited back into our wallet.
    pub remote_returned_msat: u64,
    /// Remote spends whose change is not settled yet (`pending`, `sent` or `recovering`).
    pub remote_open: u64,
    /// Lightning invoices paid and credited to keys (also in `credited_msat`).
    pub invoices_credited_msat: u64,
    /// Earnings the operator was paid over Lightning, and the fees of those payments.
    pub operator_paid_msat: u64,
    pub operator_fees_msat: u64,
    /// Operator payouts whose melt is not settled yet.
    pub operator_open: u64,
    /// Payouts (tokens or Lightning refunds) not finished yet, and what they debited.
    pub payouts_open: u64,
    pub payouts_open_debit_msat: u64,
}

impl Totals {
    /// credited = balances + charged + paid out (debited), to the msat.
    pub fn conserved(&self) -> bool {
        self.credited_msat as u128
            == self.balances_msat as u128 + self.charged_msat as u128 + self.paid_out_debit_msat as u128
    }

    /// What the wallet must hold for users: every balance, reserved or not, and what payouts
    /// still being made have debited (their proofs have not left the wallet yet).
    pub fn liabilities_msat(&self) -> u64 {
        self.balances_msat.saturating_add(self.payouts_open_debit_msat)
    }

    /// What of `held_msat` (the wallet) is the operator's: beyond users' balances, open payouts
    /// and tokens still being redeemed.
    pub fn earnings_msat(&self, held_msat: u64) -> u64 {
        held_msat.saturating_sub(self.liabilities_msat()).saturating_sub(self.pending_redemptions_msat)
    }

    /// Whether the wallet holds less than users' balances: `unspent_msat` spendable proofs plus
    /// `pending_msat` proofs in flight (a melt of a refund in progress still backs its debit).
    pub fn undercovered(&self, unspent_msat: u64, pending_msat: u64) -> bool {
        unspent_msat.saturating_add(pending_msat) < self.balances_msat
    }

    /// What the wallet gave for the operator's Lightning payouts.
    pub fn operator_out_msat(&self) -> u64 {
        self.operator_paid_msat.saturating_add(self.operator_fees_msat)
    }

    /// What remote providers kept: tokens sent minus change returned (includes change still
    /// being recovered).
    pub fn remote_net_msat(&self) -> u64 {
        self.remote_sent_msat.saturating_sub(self.remote_returned_msat)
    }
}

/// One token paid to a remote provider, as the ledger keeps it.
#[derive(Clone)]
pub struct RemoteSpend {
    pub id: i64,
    pub request_id: String,
    pub provider: String,
    pub url: String,
    pub mint_url: String,
    pub amount_msat: u64,
    pub token: Option<String>,
    pub change_token: Option<String>,
    pub state: String,
    pub attempts: u64,
}

impl std::fmt::Debug for RemoteSpend {
    // Tokens are bearer money: never in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSpend")
            .field("id", &self.id)
            .field("provider", &self.provider)
            .field("amount_msat", &self.amount_msat)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// A running request's hold on a key's balance, kept by the request and in memory (`holds`):
/// the request's record is written once, when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub request_id: String,
    pub key_hash: String,
    pub amount_msat: u64,
    model: String,
    created_at: i64,
}

#[derive(Clone)]
pub struct Ledger {
    store: Store,
    holds: Arc<Holds>,
}

impl Ledger {
    pub fn open(path: &Path, sync: LedgerSync) -> Result<Ledger, LedgerError> {
        Ledger::open_lingering(path, sync, store::BACKGROUND_LINGER)
    }

    /// `open`, with key holders' charges gathered for `background_linger` before their commit.
    fn open_lingering(path: &Path, sync: LedgerSync, background_linger: Duration) -> Result<Ledger, LedgerError> {
        let holds = Arc::new(Holds::default());
        let watched = holds.clone();
        let hooks = store::Hooks {
            after_job: Box::new(move |c: &Connection, changed: &[i64]| refresh_copies(c, &watched, changed)),
            write_deferred: Box::new(write_unwritten),
        };
        let store = Store::open(path, sync, hooks, background_linger)?;
        Ok(Ledger { store, holds })
    }

    /// A key's row, with what its running requests hold.
    pub async fn key_info(&self, key_hash: &str) -> Result<Option<KeyInfo>, LedgerError> {
        let (key_hash, holds) = (key_hash.to_owned(), self.holds.clone());
        self.store.run(move |c| Ok(read_key(c, &key_hash)?.map(|info| with_holds(info, &holds, &key_hash)))).await
    }

    /// Reserves `amount_msat` on a key for a request, never more than the key's balance leaves
    /// free whatever runs at the same time. Taken in memory against the key's copy (see `holds`);
    /// a key without one is read, and decided, on the writer. Holds are not written: a restart
    /// releases them all anyway.
    pub async fn reserve(
        &self,
        key_hash: &str,
        request_id: &str,
        amount_msat: u64,
        model: &str,
    ) -> Result<Reservation, LedgerError> {
        let reservation = Reservation {
            request_id: request_id.to_owned(),
            key_hash: key_hash.to_owned(),
            amount_msat,
            model: model.to_owned(),
            created_at: now_secs(),
        };
        match self.holds.try_reserve(key_hash, request_id, amount_msat, reservation.created_at) {
            Ok(Admission::Held) => return Ok(reservation),
            // Refused here, it may still fit once the ends queued before it ran (a client's
            // previous request, answered before its charge was taken): decided after them.
            Ok(Admission::Unknown) | Err(LedgerError::Insufficient { .. }) => {}
            Err(e) => return Err(e),
        }
        let (holds, key_hash, request_id) = (self.holds.clone(), key_hash.to_owned(), request_id.to_owned());
        let now = reservation.created_at;
        // Visible: nothing is written, and nobody waits on the commit.
        self.store
            .submit(Answer::Visible, move |c| {
                let account = read_account(c, &key_hash)?.ok_or(LedgerError::KeyNotFound)?;
                holds.load(&key_hash, account);
                match holds.try_reserve(&key_hash, &request_id, amount_msat, now)? {
                    Admission::Held => Ok(()),
                    Admission::Unknown => Err(LedgerError::Schema("a key read for a reservation has no copy".into())),
                }
            })
            .await?;
        Ok(reservation)
    }

    /// Ends a reservation by charging `cost_msat`: the reservation is released and the cost taken
    /// from the balance. A cost above the reservation is taken from the free balance as far as it
    /// goes; the rest is recorded as uncollected. Runs at most once per reservation.
    pub async fn settle(&self, reservation: &Reservation, cost_msat: u64, note: &str) -> Result<Settled, LedgerError> {
        self.end(reservation, Some(cost_msat), note).await
    }

    /// Ends a reservation charging nothing. Idempotent.
    pub async fn release(&self, reservation: &Reservation, note: &str) -> Result<Settled, LedgerError> {
        self.end(reservation, None, note).await
    }

    /// Ends a reservation (`Some(cost)` charges it, `None` releases it), queued NOW: every ledger
    /// job submitted after this call sees the result (and a reservation refused without it is
    /// decided again after it, see `reserve`), so a caller may answer its client before
    /// awaiting the returned future, which resolves once the change is durable.
    pub fn end(
        &self,
        reservation: &Reservation,
        cost_msat: Option<u64>,
        note: &str,
    ) -> impl std::future::Future<Output = Result<Settled, LedgerError>> + Send + 'static {
        let (reservation, note, holds) = (reservation.clone(), note.to_owned(), self.holds.clone());
        self.store.submit_with(Answer::Durable, Undo::FailStop, move |c| {
            end_reservation(c, &holds, &reservation, cost_msat, &note)
        })
    }

    /// `end`, for a caller that does not wait for the disk: `done` gets the outcome once it is
    /// durable (on a ledger thread). The future resolves once the job is queued (at once unless
    /// the queue is full); every job submitted after that sees its result.
    pub fn end_detached(
        &self,
        reservation: &Reservation,
        cost_msat: Option<u64>,
        note: &str,
        done: impl FnOnce(Result<Settled, LedgerError>) + Send + 'static,
    ) -> impl std::future::Future<Output = Result<(), LedgerError>> + Send + 'static {
        let (reservation, note, holds) = (reservation.clone(), note.to_owned(), self.holds.clone());
        self.store.submit_detached(
            Answer::Background,
            Undo::FailStop,
            move |c| end_reservation(c, &holds, &reservation, cost_msat, &note),
            done,
        )
    }

    /// Resolves once every job queued before it is durable (jobs commit in queue order).
    pub async fn flush(&self) -> Result<(), LedgerError> {
        self.store.run(|_| Ok(())).await
    }

    /// Records a redemption before the token is swapped. The token hash is the primary key, so the
    /// same token racing in many requests is redeemed once; a failed earlier attempt may retry.
    pub async fn begin_redemption(
        &self,
        token_hash: &str,
        key_hash: &str,
        mint_url: &str,
        value_msat: u64,
        proof_ys: &[String],
    ) -> Result<RedemptionState, LedgerError> {
        let (token_hash, key_hash, mint_url) = (token_hash.to_owned(), key_hash.to_owned(), mint_url.to_owned());
        let proof_ys = proof_ys.join(",");
        self.store
            .run(move |c| {
                let existing: Option<(String, String)> = c
                    .query_row(
                        "SELECT state, key_hash FROM redemptions WHERE token_hash = ?1",
                        [&token_hash],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                match existing {
                    Some((state, key)) if state == "credited" => return Ok(RedemptionState::Credited { key_hash: key }),
                    Some((state, _)) if state == "pending" => return Ok(RedemptionState::InProgress),
                    _ => {}
                }
                // The same proofs under another encoding: whatever that redemption's state, these
                // proofs are not ours to redeem again.
                for y in proof_ys.split(',').filter(|y| !y.is_empty()) {
                    let other: Option<String> = c
                        .query_row(
                            "SELECT r.state FROM redemption_proofs p JOIN redemptions r ON r.token_hash = p.token_hash
                             WHERE p.y = ?1 AND p.token_hash != ?2",
                            params![y, token_hash],
                            |r| r.get(0),
                        )
                        .optional()?;
                    match other.as_deref() {
                        Some("credited") => return Ok(RedemptionState::ProofsUsed),
                        Some("pending") => return Ok(RedemptionState::ProofsBusy),
                        _ => {}
                    }
                }
                let now = now_secs();
                c.execute(
                    "INSERT INTO redemptions (token_hash, key_hash, mint_url, value_msat, proof_ys, state, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6)
                     ON CONFLICT (token_hash) DO UPDATE SET state = 'pending', key_hash = ?2, updated_at = ?6",
                    params![token_hash, key_hash, mint_url, to_i64(value_msat), proof_ys, now],
                )?;
                for y in proof_ys.split(',').filter(|y| !y.is_empty()) {
                    c.execute(
                        "INSERT INTO redemption_proofs (y, token_hash) VALUES (?1, ?2)
                         ON CONFLICT (y) DO UPDATE SET token_hash = ?2",
                        params![y, token_hash],
                    )?;
                }
                Ok(RedemptionState::Started)
            })
            .await
    }

    /// The swap succeeded: credit the key (creating it if new) in the same transaction that marks
    /// the redemption credited. Idempotent. Returns the key's balance after.
    pub async fn complete_redemption(
        &self,
        token_hash: &str,
        kind: KeyKind,
        credited_msat: u64,
        fee_msat: u64,
    ) -> Result<u64, LedgerError> {
        let token_hash = token_hash.to_owned();
        self.store
            .run(move |c| {
                let row: Option<(String, String, String)> = c
                    .query_row(
                        "SELECT state, key_hash, COALESCE(swap_mint_url, mint_url) FROM redemptions WHERE token_hash = ?1",
                        [&token_hash],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()?;
                let Some((state, key_hash, mint_url)) = row else {
                    return Err(LedgerError::Schema("completing a redemption that was never begun".into()));
                };
                if state == "failed" {
                    return Err(LedgerError::Schema("completing a redemption that already failed".into()));
                }
                // Only the redemption that owns its proofs may be credited for them.
                let foreign: i64 = c.query_row(
                    "SELECT COUNT(*) FROM redemptions r, json_each('[\"' || REPLACE(r.proof_ys, ',', '\",\"') || '\"]') y
                     JOIN redemption_proofs p ON p.y = y.value
                     WHERE r.token_hash = ?1 AND p.token_hash != ?1",
                    [&token_hash],
                    |r| r.get(0),
                )?;
                if foreign > 0 {
                    return Err(LedgerError::Schema("the proofs of this redemption belong to another token".into()));
                }
                if state == "pending" {
                    c.execute(
                        "UPDATE redemptions SET state = 'credited', credited_msat = ?2, fee_msat = ?3, updated_at = ?4
                         WHERE token_hash = ?1",
                        params![token_hash, to_i64(credited_msat), to_i64(fee_msat), now_secs()],
                    )?;
                    c.execute(
                        "INSERT INTO keys (key_hash, kind, balance_msat, mint_url, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (key_hash) DO UPDATE SET balance_msat = balance_msat + ?3,
                             mint_url = COALESCE(mint_url, ?4)",
                        params![key_hash, kind.as_str(), to_i64(credited_msat), mint_url, now_secs()],
                    )?;
                }
                Ok(read_key(c, &key_hash)?.map(|k| k.balance_msat).unwrap_or(0))
            })
            .await
    }

    /// The swap did not happen (the token was refused): nothing was received.
    pub async fn fail_redemption(&self, token_hash: &str) -> Result<(), LedgerError> {
        let token_hash = token_hash.to_owned();
        self.store
            .run(move |c| {
                c.execute(
                    "UPDATE redemptions SET state = 'failed', updated_at = ?2 WHERE token_hash = ?1 AND state = 'pending'",
                    params![token_hash, now_secs()],
                )?;
                Ok(())
            })
            .await
    }

    pub async fn pending_redemptions(&self) -> Result<Vec<PendingRedemption>, LedgerError> {
        self.store
            .run(|c| {
                let mut stmt = c.prepare(
                    "SELECT r.token_hash, r.key_hash, r.mint_url, r.proof_ys, COALESCE(k.kind, 'key'), r.value_msat
                     FROM redemptions r LEFT JOIN keys k ON k.key_hash = r.key_hash WHERE r.state = 'pending'",
                )?;
                let rows = stmt.query_map([], |r| {
                    let ys: String = r.get(3)?;
                    let kind: String = r.get(4)?;
                    Ok(PendingRedemption {
                        token_hash: r.get(0)?,
                        key_hash: r.get(1)?,
                        mint_url: r.get(2)?,
                        value_msat: to_u64(r.get(5)?),
                        proof_ys: ys.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect(),
                        kind: if kind == "xcashu" { KeyKind::XCashu } else { KeyKind::Key },
                    })
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    /// Sets a key's Lightning refund address and expiry (acted on by the Lightning module).
    pub async fn set_refund_options(
        &self,
        key_hash: &str,
        refund_address: Option<String>,
        expiry_time: Option<i64>,
    ) -> Result<(), LedgerError> {
        let key_hash = key_hash.to_owned();
        self.store
            .run(move |c| {
                c.execute(
                    "UPDATE keys SET refund_address = COALESCE(?2, refund_address), expiry_time = COALESCE(?3, expiry_time)
                     WHERE key_hash = ?1",
                    params![key_hash, refund_address, expiry_time],
                )?;
                Ok(())
            })
            .await
    }

    /// Starts paying out a key's whole free balance: debits it now, before any token exists.
    /// `None` when there is nothing to pay.
    pub async fn begin_payout(
        &self,
        key_hash: &str,
        source_token_hash: Option<&str>,
        request_id: Option<&str>,
        only_if_idle: bool,
    ) -> Result<Option<Payout>, LedgerError> {
        let key_hash = key_hash.to_owned();
        let source = source_token_hash.map(str::to_owned);
        let request_id = request_id.map(str::to_owned);
        let holds = self.holds.clone();
        self.store
            .run(move |c| {
                debit_for_payout(c, &holds, &key_hash, source.as_deref(), request_id.as_deref(), only_if_idle)
            })
            .await
    }

    /// The payout's token exists: keep it (it is handed out from here, and again on request).
    /// `debit_msat` may be lowered when less could be paid; the difference returns to the key.
    pub async fn complete_payout(
        &self,
        id: i64,
        mint_url: &str,
        token: &str,
        debit_msat: u64,
        amount_msat: u64,
        fee_msat: u64,
    ) -> Result<(), LedgerError> {
        let (mint_url, token) = (mint_url.to_owned(), token.to_owned());
        self.store
            .run(move |c| {
                let (key_hash, old_debit): (String, i64) = c.query_row(
                    "SELECT key_hash, debit_msat FROM payouts WHERE id = ?1 AND state = 'pending'",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                let give_back = to_u64(old_debit).saturating_sub(debit_msat);
                c.execute(
                    "UPDATE payouts SET state = 'ready', token = ?2, debit_msat = ?3, amount_msat = ?4, fee_msat = ?5, updated_at = ?6,
                         mint_url = ?7
                     WHERE id = ?1",
                    params![id, token, to_i64(debit_msat), to_i64(amount_msat), to_i64(fee_msat), now_secs(), mint_url],
                )?;
                if give_back > 0 {
                    c.execute(
                        "UPDATE keys SET balance_msat = balance_msat + ?2 WHERE key_hash = ?1",
                        params![key_hash, to_i64(give_back)],
                    )?;
                }
                Ok(())
            })
            .await
    }

    /// The token could not be made: the debit returns to the key. Idempotent.
    pub async fn fail_payout(&self, id: i64) -> Result<(), LedgerError> {
        self.store.run(move |c| lightning::fail_pending_payout(c, id).map(|_| ())).await
    }

    /// Token payouts left `pending` by a crash: their tokens were never handed out. (Lightning
    /// payouts are not here: whether their melt happened is for the mint to say.)
    pub async fn pending_payouts(&self) -> Result<Vec<Payout>, LedgerError> {
        self.store
            .run(|c| {
                let mut stmt = c.prepare(
                    "SELECT id, key_hash, mint_url, debit_msat FROM payouts WHERE state = 'pending' AND method = 'cashu'",
                )?;
                let rows = stmt.query_map([], |r| {
                    Ok(Payout {
                        id: r.get(0)?,
                        key_hash: r.get(1)?,
                        mint_url: r.get(2)?,
                        debit_msat: to_u64(r.get(3)?),
                    })
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    /// The newest payout made for a key, or for an `X-Cashu` token (by the token's hash).
    pub async fn latest_payout(
        &self,
        key_hash: Option<&str>,
        source_token_hash: Option<&str>,
    ) -> Result<PayoutLookup, LedgerError> {
        let key_hash = key_hash.map(str::to_owned);
        let source = source_token_hash.map(str::to_owned);
        self.store
            .run(move |c| {
                let row: Option<(String, Option<String>, i64)> = c
                    .query_row(
                        "SELECT state, token, amount_msat FROM payouts
                         WHERE (?1 IS NOT NULL AND key_hash = ?1) OR (?2 IS NOT NULL AND source_token_hash = ?2)
                         ORDER BY CASE state WHEN 'failed' THEN 1 ELSE 0 END, id DESC LIMIT 1",
                        params![key_hash, source],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()?;
                Ok(match row {
                    Some((state, Some(token), amount)) if state == "ready" => {
                        PayoutLookup::Ready { token, amount_msat: to_u64(amount) }
                    }
                    Some((state, _, _)) if state == "pending" => PayoutLookup::Pending,
                    _ => PayoutLookup::NotFound,
                })
            })
            .await
    }

    /// The tokens of a key's Cashu refunds made since `since` (Unix seconds), oldest first, with
    /// their value: a refund paid in parts hands each part out once, and an answer lost on the
    /// way must not lose its token.
    pub async fn recent_refund_tokens(&self, key_hash: &str, since: i64) -> Result<Vec<(String, u64)>, LedgerError> {
        let key_hash = key_hash.to_owned();
        self.store
            .read(move |c| {
                let mut stmt = c.prepare(
                    "SELECT token, amount_msat FROM payouts
                     WHERE key_hash = ?1 AND method = 'cashu' AND state = 'ready' AND token IS NOT NULL AND created_at >= ?2
                     ORDER BY id",
                )?;
                let rows = stmt.query_map(params![key_hash, since], |r| Ok((r.get(0)?, to_u64(r.get(1)?))))?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    /// At start, before serving: holds a previous node recorded in the ledger are released (the
    /// request died with the process; what it used is unknowable, so the user is not charged).
    /// Returns how many requests were interrupted. (Holds live in memory now; only a ledger
    /// written by an older node has any.)
    pub async fn release_interrupted_reservations(&self) -> Result<u64, LedgerError> {
        self.store
            .run(|c| {
                // Records of open reservations, as ledgers written before schema 4 kept them.
                let legacy: Vec<(String, String, i64)> = {
                    let mut stmt =
                        c.prepare("SELECT request_id, key_hash, amount_msat FROM reservations WHERE state = 'open'")?;
                    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                    rows.collect::<Result<_, _>>()?
                };
                for (request_id, key_hash, amount) in &legacy {
                    c.execute(
                        "UPDATE reservations SET state = 'released', note = 'interrupted by restart', ended_at = ?2
                         WHERE request_id = ?1",
                        params![request_id, now_secs()],
                    )?;
                    c.execute(
                        "UPDATE keys SET reserved_msat = reserved_msat - ?2 WHERE key_hash = ?1",
                        params![key_hash, amount],
                    )?;
                }
                // Every other hold belongs to a request of the previous process.
                let interrupted: i64 =
                    c.query_row("SELECT COALESCE(SUM(open_requests), 0) FROM keys", [], |r| r.get(0))?;
                c.execute(
                    "UPDATE keys SET reserved_msat = 0, open_requests = 0 WHERE reserved_msat != 0 OR open_requests != 0",
                    [],
                )?;
                Ok(legacy.len() as u64 + to_u64(interrupted))
            })
            .await
    }

    /// X-Cashu balances left behind (change that could not be paid, or a crash) and older than
    /// `min_age_secs`: their keys.
    pub async fn unpaid_xcashu_keys(&self, min_age_secs: i64) -> Result<Vec<String>, LedgerError> {
        let holds = self.holds.clone();
        self.store
            .run(move |c| {
                let mut stmt = c.prepare(
                    "SELECT key_hash FROM keys
                     WHERE kind = 'xcashu' AND balance_msat > 0 AND reserved_msat = 0 AND created_at <= ?1",
                )?;
                let rows = stmt.query_map([now_secs() - min_age_secs], |r| r.get(0))?;
                let keys = rows.collect::<Result<Vec<String>, _>>()?;
                Ok(keys.into_iter().filter(|k| !holds.is_held(k)).collect())
            })
            .await
    }

    /// Folds the records of requests that began more than `retention` ago into the per-day
    /// roll-up and deletes them (see `retention`), a batch per writer job so payments interleave.
    /// Returns how many records were folded.
    pub async fn prune_records(&self, retention: Duration) -> Result<u64, LedgerError> {
        let retention = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
        let mut folded = 0;
        loop {
            let cutoff = now_secs().saturating_sub(retention);
            let batch = self.store.run(move |c| prune_batch(c, cutoff)).await?;
            folded += batch as u64;
            if batch < retention::BATCH {
                return Ok(folded);
            }
            tokio::task::yield_now().await;
        }
    }

    /// The conservation sums, with what running requests hold (a reader in another process,
    /// `read_totals` alone, cannot see those).
    pub async fn totals(&self) -> Result<Totals, LedgerError> {
        let holds = self.holds.clone();
        self.store
            .read(move |c| {
                let mut totals = read_totals(c)?;
                let (reserved, open) = holds.totals();
                totals.reserved_msat += reserved;
                totals.open_reservations += open;
                Ok(totals)
            })
            .await
    }

    /// Records a remote spend before its token is made (`pending`): a crash from here on cannot
    /// lose track of it.
    pub async fn begin_remote_spend(
        &self,
        request_id: &str,
        provider: &str,
        url: &str,
        mint_url: &str,
        amount_msat: u64,
    ) -> Result<i64, LedgerError> {
        let (request_id, provider, url, mint_url) =
            (request_id.to_owned(), provider.to_owned(), url.to_owned(), mint_url.to_owned());
        self.store
            .run(move |c| {
                c.execute(
                    "INSERT INTO remote_spends (request_id, provider, url, mint_url, amount_msat, state, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6)",
                    params![request_id, provider, url, mint_url, to_i64(amount_msat), now_secs()],
                )?;
                Ok(c.last_insert_rowid())
            })
            .await
    }

    /// The token exists (it left our wallet): kept before it is sent, so it can recover change.
    pub async fn remote_spend_sent(
        &self,
        id: i64,
        token: &str,
        amount_msat: u64,
        fee_msat: u64,
    ) -> Result<(), LedgerError> {
        let token = token.to_owned();
        self.store
            .run(move |c| {
                let updated = c.execute(
                    "UPDATE remote_spends SET state = 'sent', token = ?2, amount_msat = ?3, fee_msat = ?4, updated_at = ?5
                     WHERE id = ?1 AND state = 'pending'",
                    params![id, token, to_i64(amount_msat), to_i64(fee_msat), now_secs()],
                )?;
                if updated != 1 {
                    return Err(LedgerError::Schema(format!("remote spend {id} is not pending")));
                }
                Ok(())
            })
            .await
    }

    /// No token was made: nothing left the wallet.
    pub async fn fail_remote_spend(&self, id: i64, note: &str) -> Result<(), LedgerError> {
        let note = note.to_owned();
        self.store
            .run(move |c| {
                c.execute(
                    "UPDATE remote_spends SET state = 'failed', note = ?2, updated_at = ?3 WHERE id = ?1 AND state = 'pending'",
                    params![id, note, now_secs()],
                )?;
                Ok(())
            })
            .await
    }

    /// The change is in our wallet (`change_msat` credited, 0 when there was none): settled.
    /// Idempotent: a settled spend stays as it is.
    pub async fn settle_remote_spend(
        &self,
        id: i64,
        change_msat: u64,
        change_fee_msat: u64,
        note: &str,
    ) -> Result<(), LedgerError> {
        let note = note.to_owned();
        self.store
            .run(move |c| {
                c.execute(
                    "UPDATE remote_spends SET state = 'settled', change_msat = ?2, change_fee_msat = ?3, change_token = NULL,
                         note = ?4, updated_at = ?5
                     WHERE id = ?1 AND state IN ('sent', 'recovering')",
                    params![id, to_i64(change_msat), to_i64(change_fee_msat), note, now_secs()],
                )?;
                Ok(())
            })
            .await
    }

    /// The change could not be taken into our wallet now: recovered later, with the change
    /// token when we have one, else with the original token at the provider.
    pub async fn recovering_remote_spend(
        &self,
        id: i64,
        change_token: Option<&str>,
        note: &str,
    ) -> Result<(), LedgerError> {
        let (change_token, note) = (change_token.map(str::to_owned), note.to_owned());
        self.store
            .run(move |c| {
                c.execute(
                    "UPDATE remote_spends SET state = 'recovering', change_token = COALESCE(?2, change_token),
                         attempts = attempts + 1, note = ?3, updated_at = ?4
                     WHERE id = ?1 AND state IN ('sent', 'recovering')",
                    params![id, change_token, note, now_secs()],
                )?;
                Ok(())
            })
            .await
    }

    /// Remote spends whose change is still to be recovered, last touched at least
    /// `min_age_secs` ago.
    pub async fn remote_spends_to_recover(&self, min_age_secs: i64) -> Result<Vec<RemoteSpend>, LedgerError> {
        self.store
            .run(move |c| {
                let mut stmt = c.prepare(
                    "SELECT id, request_id, provider, url, mint_url, amount_msat, token, change_token, state, attempts
                     FROM remote_spends WHERE state = 'recovering' AND updated_at <= ?1 ORDER BY id",
                )?;
                let rows = stmt.query_map([now_secs() - min_age_secs], |r| {
                    Ok(RemoteSpend {
                        id: r.get(0)?,
                        request_id: r.get(1)?,
                        provider: r.get(2)?,
                        url: r.get(3)?,
                        mint_url: r.get(4)?,
                        amount_msat: to_u64(r.get(5)?),
                        token: r.get(6)?,
                        change_token: r.get(7)?,
                        state: r.get(8)?,
                        attempts: to_u64(r.get(9)?),
                    })
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    /// At start, before serving: a `pending` spend never sent its token (one made for it is
    /// taken back, see `Payments::revoke_abandoned_sends`), so it failed; a `sent` one died with its request, so its
    /// change is to be recovered. Returns how many were left `sent`.
    /// The wallet tags (`payout:<id>`, `remote:<id>`) of token payouts and provider payments
    /// recorded as failed in the last week: a token made for one of them never left the node.
    /// (Taking one back takes minutes, or as long as its mint is away; older ones are done with,
    /// and the wallet is not searched for them every minute.)
    pub async fn abandoned_send_tags(&self) -> Result<HashSet<String>, LedgerError> {
        const LOOK_BACK_SECS: i64 = 7 * 86_400;
        self.store
            .read(|c| {
                let since = now_secs() - LOOK_BACK_SECS;
                let mut tags = HashSet::new();
                let mut failed = c.prepare(
                    "SELECT id FROM payouts WHERE state = 'failed' AND method = 'cashu' AND updated_at >= ?1",
                )?;
                for id in failed.query_map([since], |r| r.get::<_, i64>(0))? {
                    tags.insert(format!("payout:{}", id?));
                }
                let mut failed =
                    c.prepare("SELECT id FROM remote_spends WHERE state = 'failed' AND updated_at >= ?1")?;
                for id in failed.query_map([since], |r| r.get::<_, i64>(0))? {
                    tags.insert(format!("remote:{}", id?));
                }
                Ok(tags)
            })
            .await
    }

    pub async fn recover_interrupted_remote_spends(&self) -> Result<u64, LedgerError> {
        self.store
            .run(|c| {
                let now = now_secs();
                c.execute(
                    "UPDATE remote_spends SET state = 'failed', note = 'interrupted before the token was made', updated_at = ?1
                     WHERE state = 'pending'",
                    [now],
                )?;
                let sent = c.execute(
                    "UPDATE remote_spends SET state = 'recovering', note = 'interrupted by restart', updated_at = ?1
                     WHERE state = 'sent'",
                    [now],
                )?;
                Ok(sent as u64)
            })
            .await
    }
}

/// Debits a key's whole free balance (what no running request holds) for a payout and records
/// it `pending`, in one step.
fn debit_for_payout(
    c: &Connection,
    holds: &Holds,
    key_hash: &str,
    source: Option<&str>,
    request_id: Option<&str>,
    only_if_idle: bool,
) -> Result<Option<Payout>, LedgerError> {
    let held = holds.seize(key_hash);
    if only_if_idle && held > 0 {
        return Ok(None);
    }
    let Some(key) = read_key(c, key_hash)? else {
        return Err(LedgerError::KeyNotFound);
    };
    let debit = key.available_msat().saturating_sub(held);
    if debit == 0 {
        return Ok(None);
    }
    let mint_url = key.mint_url.clone().unwrap_or_default();
    let updated = c.execute(
        "UPDATE keys SET balance_msat = balance_msat - ?2 WHERE key_hash = ?1 AND balance_msat - reserved_msat >= ?2",
        params![key_hash, to_i64(debit)],
    )?;
    if updated == 0 {
        return Ok(None);
    }
    let now = now_secs();
    c.execute(
        "INSERT INTO payouts (key_hash, source_token_hash, request_id, mint_url, debit_msat, state, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6)",
        params![key_hash, source, request_id, mint_url, to_i64(debit), now],
    )?;
    Ok(Some(Payout { id: c.last_insert_rowid(), key_hash: key_hash.to_owned(), mint_url, debit_msat: debit }))
}

/// One batch of `prune_records`: the oldest request records that began before `cutoff`, folded
/// into the roll-up and deleted in the job's savepoint. The dashboard's debits stay.
fn prune_batch(c: &Connection, cutoff: i64) -> Result<usize, LedgerError> {
    let requests = format!("request_id NOT LIKE '{ADMIN_ADJUST_PREFIX}%'");
    let records = {
        let mut stmt = c.prepare_cached(&format!(
            "SELECT rowid, created_at, COALESCE(model, ''), state, charged_msat, uncollected_msat
             FROM reservations WHERE {requests} ORDER BY rowid LIMIT ?1"
        ))?;
        let rows = stmt.query_map([retention::BATCH as i64], |r| {
            Ok(retention::Record {
                rowid: r.get(0)?,
                created_at: r.get(1)?,
                model: r.get(2)?,
                state: r.get(3)?,
                charged_msat: to_u64(r.get(4)?),
                uncollected_msat: to_u64(r.get(5)?),
            })
        })?;
        rows.collect::<Result<Vec<_>, _>>()?
    };
    let fold = retention::fold(records, cutoff);
    let Some(last_rowid) = fold.last_rowid else { return Ok(0) };
    let mut add = c.prepare_cached(
        "INSERT INTO reservations_rollup (day, model, charged, released, charged_msat, uncollected_msat)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (day, model) DO UPDATE SET
             charged = charged + excluded.charged,
             released = released + excluded.released,
             charged_msat = charged_msat + excluded.charged_msat,
             uncollected_msat = uncollected_msat + excluded.uncollected_msat",
    )?;
    for (group, n) in &fold.groups {
        add.execute(params![
            group.day,
            group.model,
            to_i64(n.charged),
            to_i64(n.released),
            to_i64(n.charged_msat),
            to_i64(n.uncollected_msat)
        ])?;
    }
    let deleted = c.execute(&format!("DELETE FROM reservations WHERE rowid <= ?1 AND {requests}"), [last_rowid])?;
    if deleted != fold.records {
        // Not the records the scan returned: roll the savepoint back.
        return Err(LedgerError::Schema(format!(
            "pruning deleted {deleted} records for {} folded; nothing pruned",
            fold.records
        )));
    }
    Ok(fold.records)
}

/// The conservation sums, from any connection (the node's writer, or a reader in another process).
pub fn read_totals(c: &Connection) -> Result<Totals, LedgerError> {
    let sum = |sql: &str| -> Result<u64, LedgerError> { Ok(to_u64(c.query_row(sql, [], |r| r.get::<_, i64>(0))?)) };
    // A reader (the CLI) may open a ledger the node has not migrated yet.
    let has_table = |name: &str| -> Result<bool, LedgerError> {
        let n: i64 =
            c.query_row("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1", [name], |r| r.get(0))?;
        Ok(n > 0)
    };
    let (has_remote, has_lightning) = (has_table("remote_spends")?, has_table("ln_invoices")?);
    let has_rollup = has_table("reservations_rollup")?;
    let has_open_requests: bool =
        c.query_row("SELECT COUNT(*) > 0 FROM pragma_table_info('keys') WHERE name = 'open_requests'", [], |r| {
            r.get(0)
        })?;
    let remote = |sql: &str| -> Result<u64, LedgerError> {
        if has_remote {
            sum(sql)
        } else {
            Ok(0)
        }
    };
    let lightning = |sql: &str| -> Result<u64, LedgerError> {
        if has_lightning {
            sum(sql)
        } else {
            Ok(0)
        }
    };
    let invoices_credited_msat =
        lightning("SELECT COALESCE(SUM(credited_msat), 0) FROM ln_invoices WHERE state = 'credited'")?;
    Ok(Totals {
        credited_msat: sum("SELECT COALESCE(SUM(credited_msat), 0) FROM redemptions WHERE state = 'credited'")?
            + invoices_credited_msat,
        redemption_fees_msat: sum("SELECT COALESCE(SUM(fee_msat), 0) FROM redemptions WHERE state = 'credited'")?,
        balances_msat: sum("SELECT COALESCE(SUM(balance_msat), 0) FROM keys")?,
        reserved_msat: sum("SELECT COALESCE(SUM(reserved_msat), 0) FROM keys")?,
        charged_msat: sum("SELECT COALESCE(SUM(charged_msat), 0) FROM reservations WHERE state = 'charged'")?
            + if has_rollup { sum("SELECT COALESCE(SUM(charged_msat), 0) FROM reservations_rollup")? } else { 0 },
        paid_out_debit_msat: sum(
            "SELECT COALESCE(SUM(debit_msat), 0) FROM payouts WHERE state IN ('pending', 'ready')",
        )?,
        paid_out_msat: sum("SELECT COALESCE(SUM(amount_msat), 0) FROM payouts WHERE state = 'ready'")?,
        payout_fees_msat: sum("SELECT COALESCE(SUM(fee_msat), 0) FROM payouts WHERE state = 'ready'")?,
        // Running requests (schema 4 counts them on the key), and open records of older ledgers.
        open_reservations: sum("SELECT COUNT(*) FROM reservations WHERE state = 'open'")?
            + if has_open_requests { sum("SELECT COALESCE(SUM(open_requests), 0) FROM keys")? } else { 0 },
        pending_redemptions: sum("SELECT COUNT(*) FROM redemptions WHERE state = 'pending'")?,
        // A foreign token's proofs reach the wallet only as the redemption completes (our invoice
        // paid, then minted): a foreign mint that never pays must not hold earnings back.
        pending_redemptions_msat: sum(if has_lightning {
            "SELECT COALESCE(SUM(value_msat), 0) FROM redemptions WHERE state = 'pending' AND swap_mint_url IS NULL"
        } else {
            "SELECT COALESCE(SUM(value_msat), 0) FROM redemptions WHERE state = 'pending'"
        })?,
        remote_sent_msat: remote(
            "SELECT COALESCE(SUM(amount_msat + fee_msat), 0) FROM remote_spends WHERE state IN ('sent', 'settled', 'recovering')",
        )?,
        remote_returned_msat: remote("SELECT COALESCE(SUM(change_msat), 0) FROM remote_spends WHERE state = 'settled'")?,
        remote_open: remote("SELECT COUNT(*) FROM remote_spends WHERE state IN ('pending', 'sent', 'recovering')")?,
        invoices_credited_msat,
        operator_paid_msat: lightning("SELECT COALESCE(SUM(amount_msat), 0) FROM operator_payouts WHERE state = 'paid'")?,
        operator_fees_msat: lightning("SELECT COALESCE(SUM(fee_msat), 0) FROM operator_payouts WHERE state = 'paid'")?,
        operator_open: lightning("SELECT COUNT(*) FROM operator_payouts WHERE state = 'pending'")?,
        payouts_open: sum("SELECT COUNT(*) FROM payouts WHERE state = 'pending'")?,
        payouts_open_debit_msat: sum("SELECT COALESCE(SUM(debit_msat), 0) FROM payouts WHERE state = 'pending'")?,
    })
}

/// A `KeyInfo` from eight columns starting at `first`: balance_msat, reserved_msat, spent_msat,
/// requests, mint_url, refund_address, expiry_time, revoked.
pub(crate) fn key_info_at(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<KeyInfo> {
    Ok(KeyInfo {
        balance_msat: to_u64(r.get(first)?),
        reserved_msat: to_u64(r.get(first + 1)?),
        spent_msat: to_u64(r.get(first + 2)?),
        requests: to_u64(r.get(first + 3)?),
        mint_url: r.get(first + 4)?,
        refund_address: r.get(first + 5)?,
        expiry_time: r.get(first + 6)?,
        revoked: r.get::<_, i64>(first + 7)? != 0,
    })
}

/// A key's row as the ledger file holds it: `reserved_msat` is only what an older node left there
/// (see `with_holds`).
fn read_key(c: &Connection, key_hash: &str) -> Result<Option<KeyInfo>, LedgerError> {
    Ok(c.prepare_cached(
        "SELECT balance_msat, reserved_msat, spent_msat, requests, mint_url, refund_address, expiry_time, revoked
         FROM keys WHERE key_hash = ?1",
    )?
    .query_row([key_hash], |r| key_info_at(r, 0))
    .optional()?)
}

/// A key's row with what its running requests hold.
fn with_holds(mut info: KeyInfo, holds: &Holds, key_hash: &str) -> KeyInfo {
    info.reserved_msat = info.reserved_msat.saturating_add(holds.reserved_of(key_hash));
    info
}

/// `rowid, balance_msat, reserved_msat, revoked, expiry_time`, from column `first` on, as the writer sees
/// the row: less the charges not yet written to it (see `UNWRITTEN`).
fn account_at(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Account> {
    let (rowid, balance, reserved): (i64, i64, i64) = (r.get(first)?, r.get(first + 1)?, r.get(first + 2)?);
    let unwritten = UNWRITTEN.with_borrow(|all| all.get(&rowid).map_or(0, |u| u.msat));
    Ok(Account {
        rowid,
        free_msat: to_u64(balance).saturating_sub(to_u64(reserved)).saturating_sub(unwritten),
        revoked: r.get::<_, i64>(first + 3)? != 0,
        expires_at: r.get(first + 4)?,
    })
}

/// What a reservation needs of a key's row.
fn read_account(c: &Connection, key_hash: &str) -> Result<Option<Account>, LedgerError> {
    Ok(c.prepare_cached(
        "SELECT rowid, balance_msat, reserved_msat, revoked, expiry_time FROM keys WHERE key_hash = ?1",
    )?
    .query_row([key_hash], |r| account_at(r, 0))
    .optional()?)
}

/// Charges to one key's row not yet written to it.
struct Unwritten {
    key_hash: String,
    msat: u64,
    requests: i64,
}

thread_local! {
    /// On the writer: the charges ended reservations took from their keys' copies, by row, not
    /// yet written to the rows. The store has them written (`write_unwritten`) before any job
    /// but another reservation's end, and before each commit, so a batch of charges to one key
    /// updates its row once; until then the writer reads a row less them (`account_at`).
    static UNWRITTEN: std::cell::RefCell<foldhash::HashMap<i64, Unwritten>> = Default::default();
}

/// Adds a charge to what its key's row is still to be written.
fn defer_charge(rowid: i64, key_hash: &str, msat: u64, counted: bool) {
    UNWRITTEN.with_borrow_mut(|all| {
        let entry =
            all.entry(rowid).or_insert_with(|| Unwritten { key_hash: key_hash.to_owned(), msat: 0, requests: 0 });
        entry.msat += msat;
        entry.requests += i64::from(counted);
    });
}

/// Writes the charges not yet written, one update per key's row. Each row is named by its id
/// and its key (the id came from the key's copy): any other outcome than one row changed means
/// a copy was not its row, and stops the node (see `store::Hooks`).
fn write_unwritten(c: &Connection) -> Result<(), LedgerError> {
    UNWRITTEN.with_borrow_mut(|all| {
        if all.is_empty() {
            return Ok(());
        }
        let mut update = c.prepare_cached(
            "UPDATE keys SET balance_msat = balance_msat - ?2, spent_msat = spent_msat + ?2, requests = requests + ?3
             WHERE rowid = ?1 AND key_hash = ?4",
        )?;
        for (rowid, charges) in all.drain() {
            let updated = update.execute(params![rowid, to_i64(charges.msat), charges.requests, charges.key_hash])?;
            if updated != 1 {
                return Err(rusqlite::Error::StatementChangedRows(updated).into());
            }
        }
        Ok(())
    })
}

/// After each job, on the writer: the copies of the keys it changed or seized follow their rows
/// (see `holds`). Should a row not read back, every copy is dropped and read again when needed.
fn refresh_copies(c: &Connection, holds: &Holds, changed: &[i64]) {
    let seized = holds.take_seized();
    // The usual job, a request's end, leaves its charge to be written later (`UNWRITTEN`): it
    // changed no row, and its copy is exact.
    if seized.is_empty() && changed.is_empty() {
        return;
    }
    let refreshed = (|| -> Result<(), LedgerError> {
        let mut by_rowid = c.prepare_cached(
            "SELECT key_hash, rowid, balance_msat, reserved_msat, revoked, expiry_time FROM keys WHERE rowid = ?1",
        )?;
        for rowid in changed {
            let row = by_rowid.query_row([rowid], |r| Ok((r.get::<_, String>(0)?, account_at(r, 1)?))).optional()?;
            if let Some((key_hash, account)) = row {
                holds.refresh(&key_hash, Some(account));
            }
        }
        for key_hash in &seized {
            holds.refresh(key_hash, read_account(c, key_hash)?);
        }
        Ok(())
    })();
    if let Err(e) = refreshed {
        tracing::warn!(error = %e, "ledger: keys changed by a job could not be read back; their copies are read again");
        holds.forget_copies();
    }
}

/// The charge recorded for a request that already ended, if it did.
fn ended_charge(c: &Connection, request_id: &str) -> Result<Option<u64>, LedgerError> {
    let charged: Option<i64> = c
        .prepare_cached("SELECT charged_msat FROM reservations WHERE request_id = ?1")?
        .query_row([request_id], |r| r.get(0))
        .optional()?;
    Ok(charged.map(to_u64))
}

/// Ends a reservation exactly once: `Some(cost)` charges, `None` releases. Runs without a
/// savepoint (`Undo::FailStop`): every check comes before its one write, the request's record.
/// The charge to the key's row is deferred (`UNWRITTEN`).
fn end_reservation(
    c: &Connection,
    holds: &Holds,
    r: &Reservation,
    cost: Option<u64>,
    note: &str,
) -> Result<Settled, LedgerError> {
    let already = |charged: u64| Settled { charged_msat: charged, uncollected_msat: 0, first_time: false };
    // The hold is released and the charge taken from the key's copy in one step (see `holds`);
    // the copy is the row as the writer left it, so the row is read only for a key without one.
    let ended = match holds.end(&r.key_hash, &r.request_id, r.amount_msat, None, cost) {
        Ended::NeedsRow => {
            let row = read_account(c, &r.key_hash)?.ok_or(LedgerError::KeyNotFound)?;
            holds.end(&r.key_hash, &r.request_id, r.amount_msat, Some(row), cost)
        }
        ended => ended,
    };
    let charge = match ended {
        Ended::Charged(charge) => charge,
        // Not held (any more): ended before, or never reserved.
        Ended::NotHeld | Ended::NeedsRow => {
            return match ended_charge(c, &r.request_id)? {
                Some(charged) => Ok(already(charged)),
                None => Err(LedgerError::Schema(format!("no reservation held for request {}", r.request_id))),
            };
        }
    };
    let (charged, uncollected) = (charge.charged_msat, charge.uncollected_msat);
    let recorded = c
        .prepare_cached(
            "INSERT INTO reservations (request_id, key_hash, amount_msat, state, charged_msat, uncollected_msat, model,
                 note, created_at, ended_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT (request_id) DO NOTHING",
        )?
        .execute(params![
            r.request_id,
            r.key_hash,
            to_i64(r.amount_msat),
            if cost.is_some() { "charged" } else { "released" },
            to_i64(charged),
            to_i64(uncollected),
            r.model,
            note,
            r.created_at,
            now_secs()
        ])?;
    if recorded == 0 {
        // A record under this request's id already (ids are the node's own, so not expected):
        // the first one stands; the copy, lowered by the charge, is read back from the row.
        holds.seize(&r.key_hash);
        return Ok(already(ended_charge(c, &r.request_id)?.unwrap_or(0)));
    }
    // `holds.end` lowered the copy by the charge; the row follows with the batch's other
    // charges to it, before anything else reads it.
    if charged > 0 || cost.is_some() {
        defer_charge(charge.rowid, &r.key_hash, charged, cost.is_some());
    }
    if uncollected > 0 {
        tracing::warn!(request_id = %r.request_id, uncollected_msat = uncollected, "cost exceeded what the key could pay");
    }
    Ok(Settled { charged_msat: charged, uncollected_msat: uncollected, first_time: true })
}

#[cfg(test)]
mod tests;
