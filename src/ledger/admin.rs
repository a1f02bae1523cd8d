//! What the operator's dashboard reads (keys, transactions, a request's history, usage over
//! time) and the two things it may change on a key: its balance (an adjustment) and whether it
//! is revoked. Tokens are never read here: a Cashu token is money.
//!
//! Adjustments keep the books conserved (credited = balances + charged + paid out):
//! - a credit is recorded as a redemption from the pseudo-mint `operator` (the operator gives
//!   part of its earnings to the key; the wallet is unchanged, so earnings shrink);
//! - a debit is recorded as a charged reservation `admin-adjust-…` (the key pays the operator).

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use serde_json::{json, Value};

use super::{holds::Holds, key_info_at, now_secs, to_i64, to_u64, KeyInfo, Ledger, LedgerError};

/// The `mint_url` of redemptions that are operator credits, not tokens.
pub const OPERATOR_CREDIT_MINT: &str = "operator";
/// Request ids of debits made from the dashboard start with this.
pub const ADMIN_ADJUST_PREFIX: &str = "admin-adjust-";

/// A key as the dashboard shows it (its hash only: the key itself is never stored).
#[derive(Debug, Clone, Serialize)]
pub struct KeyRow {
    pub key_hash: String,
    pub kind: String,
    #[serde(flatten)]
    pub info: KeyInfo,
    pub created_at: i64,
}

const KEY_COLUMNS: &str = "key_hash, kind, balance_msat, reserved_msat, spent_msat, requests, mint_url, refund_address,
     expiry_time, revoked, created_at";

fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRow> {
    Ok(KeyRow { key_hash: r.get(0)?, kind: r.get(1)?, info: key_info_at(r, 2)?, created_at: r.get(10)? })
}

impl KeyRow {
    fn with_holds(self, holds: &Holds) -> KeyRow {
        KeyRow { info: super::with_holds(self.info, holds, &self.key_hash), ..self }
    }
}

fn read_key_row(c: &Connection, key_hash: &str) -> Result<Option<KeyRow>, LedgerError> {
    Ok(c.query_row(&format!("SELECT {KEY_COLUMNS} FROM keys WHERE key_hash = ?1"), [key_hash], key_row).optional()?)
}

/// Usage of one model in one time bucket.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UsageBucket {
    pub start: i64,
    pub model: String,
    /// Requests that ended charged.
    pub charged: u64,
    /// Requests that ended released (upstream failure, refusal): nothing charged.
    pub released: u64,
    pub charged_msat: u64,
}

/// Totals per model since the ledger began, for `/metrics`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ModelTotals {
    pub model: String,
    pub charged: u64,
    pub released: u64,
    pub charged_msat: u64,
}

fn has_table(c: &Connection, name: &str) -> Result<bool, LedgerError> {
    let n: i64 =
        c.query_row("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1", [name], |r| r.get(0))?;
    Ok(n > 0)
}

impl Ledger {
    /// Keys whose hash starts with `prefix` (all when empty), newest first.
    pub async fn admin_keys(&self, prefix: String, limit: u32, offset: u32) -> Result<(Vec<KeyRow>, u64), LedgerError> {
        let holds = self.holds.clone();
        self.store
            .read(move |c| {
                let pattern = format!("{}%", prefix.replace(['%', '_'], ""));
                let total: i64 =
                    c.query_row("SELECT COUNT(*) FROM keys WHERE key_hash LIKE ?1", [&pattern], |r| r.get(0))?;
                let mut stmt = c.prepare(&format!(
                    "SELECT {KEY_COLUMNS} FROM keys WHERE key_hash LIKE ?1
                     ORDER BY created_at DESC, key_hash LIMIT ?2 OFFSET ?3"
                ))?;
                let rows = stmt.query_map(params![pattern, limit, offset], key_row)?;
                let rows = rows.map(|row| row.map(|row| row.with_holds(&holds)));
                Ok((rows.collect::<Result<Vec<_>, _>>()?, to_u64(total)))
            })
            .await
    }

    /// One key and its latest requests.
    pub async fn admin_key(&self, key_hash: String) -> Result<Option<(KeyRow, Vec<Value>)>, LedgerError> {
        let holds = self.holds.clone();
        self.store
            .read(move |c| {
                let Some(key) = read_key_row(c, &key_hash)? else { return Ok(None) };
                let key = key.with_holds(&holds);
                let mut stmt = c.prepare(
                    "SELECT request_id, model, state, amount_msat, charged_msat, note, created_at, ended_at
                     FROM reservations WHERE key_hash = ?1 ORDER BY created_at DESC LIMIT 50",
                )?;
                let rows = stmt.query_map([&key_hash], |r| {
                    Ok(json!({
                        "request_id": r.get::<_, String>(0)?,
                        "model": r.get::<_, Option<String>>(1)?,
                        "state": r.get::<_, String>(2)?,
                        "reserved_msat": r.get::<_, i64>(3)?,
                        "charged_msat": r.get::<_, i64>(4)?,
                        "note": r.get::<_, Option<String>>(5)?,
                        "created_at": r.get::<_, i64>(6)?,
                        "ended_at": r.get::<_, Option<i64>>(7)?,
                    }))
                })?;
                Ok(Some((key, rows.collect::<Result<Vec<_>, _>>()?)))
            })
            .await
    }

    /// Adds `delta_msat` to a key's balance (negative: takes it away, at most what is not
    /// reserved). The caller checks that a credit is covered by the operator's earnings.
    pub async fn admin_adjust(&self, key_hash: String, delta_msat: i64, note: String) -> Result<KeyRow, LedgerError> {
        let holds = self.holds.clone();
        self.store
            .run(move |c| {
                // Seized before it is read: a request reserving meanwhile waits for this job.
                let held = if delta_msat < 0 { holds.seize(&key_hash) } else { 0 };
                let key = read_key_row(c, &key_hash)?.ok_or(LedgerError::KeyNotFound)?;
                let now = now_secs();
                let id = format!("{ADMIN_ADJUST_PREFIX}{}", hex::encode(rand::random::<[u8; 8]>()));
                let amount = delta_msat.unsigned_abs();
                if delta_msat > 0 {
                    c.execute(
                        "INSERT INTO redemptions (token_hash, key_hash, mint_url, value_msat, fee_msat, credited_msat,
                             proof_ys, state, created_at, updated_at)
                         VALUES (?1, ?2, ?3, ?4, 0, ?4, '', 'credited', ?5, ?5)",
                        params![id, key_hash, OPERATOR_CREDIT_MINT, to_i64(amount), now],
                    )?;
                    c.execute(
                        "UPDATE keys SET balance_msat = balance_msat + ?2 WHERE key_hash = ?1",
                        params![key_hash, to_i64(amount)],
                    )?;
                } else if delta_msat < 0 {
                    let available = key.info.available_msat().saturating_sub(held);
                    if amount > available {
                        return Err(LedgerError::Insufficient { required: amount, available });
                    }
                    c.execute(
                        "INSERT INTO reservations (request_id, key_hash, amount_msat, state, charged_msat, model, note,
                             created_at, ended_at)
                         VALUES (?1, ?2, ?3, 'charged', ?3, NULL, ?4, ?5, ?5)",
                        params![id, key_hash, to_i64(amount), format!("admin adjustment: {note}"), now],
                    )?;
                    c.execute(
                        "UPDATE keys SET balance_msat = balance_msat - ?2 WHERE key_hash = ?1",
                        params![key_hash, to_i64(amount)],
                    )?;
                }
                Ok(read_key_row(c, &key_hash)?.ok_or(LedgerError::KeyNotFound)?.with_holds(&holds))
            })
            .await
    }

    /// Revokes (or restores) a key. A revoked key cannot pay for requests.
    pub async fn admin_set_revoked(&self, key_hash: String, revoked: bool) -> Result<KeyRow, LedgerError> {
        let holds = self.holds.clone();
        self.store
            .run(move |c| {
                c.execute("UPDATE keys SET revoked = ?2 WHERE key_hash = ?1", params![key_hash, i64::from(revoked)])?;
                Ok(read_key_row(c, &key_hash)?.ok_or(LedgerError::KeyNotFound)?.with_holds(&holds))
            })
            .await
    }

    /// The transaction history, newest first: money in (redemptions, operator credits),
    /// charges, payouts, remote spends. Never a token.
    pub async fn admin_transactions(&self, limit: u32, before: Option<i64>) -> Result<Vec<Value>, LedgerError> {
        self.store
            .read(move |c| {
                let remote = if has_table(c, "remote_spends")? {
                    "UNION ALL
                     SELECT 'remote', updated_at, NULL, request_id, provider, amount_msat, fee_msat, change_msat, state, note
                     FROM remote_spends"
                } else {
                    ""
                };
                let sql = format!(
                    "SELECT * FROM (
                       SELECT CASE WHEN mint_url = '{OPERATOR_CREDIT_MINT}' THEN 'credit' ELSE 'redemption' END AS kind,
                              updated_at AS at, key_hash AS key_hash, NULL AS request_id, mint_url AS detail,
                              credited_msat AS amount, fee_msat AS fee, 0 AS extra, state AS state, NULL AS note
                       FROM redemptions
                       UNION ALL
                       SELECT CASE WHEN request_id LIKE '{ADMIN_ADJUST_PREFIX}%' THEN 'debit' ELSE 'charge' END,
                              COALESCE(ended_at, created_at), key_hash, request_id, model, charged_msat, 0, amount_msat,
                              state, note
                       FROM reservations
                       UNION ALL
                       SELECT 'payout', updated_at, key_hash, request_id, mint_url, amount_msat, fee_msat, debit_msat, state, NULL
                       FROM payouts
                       {remote}
                     ) WHERE ?1 IS NULL OR at < ?1
                     ORDER BY at DESC LIMIT ?2"
                );
                let mut stmt = c.prepare(&sql)?;
                let rows = stmt.query_map(params![before, limit], |r| {
                    let kind: String = r.get(0)?;
                    let detail: Option<String> = r.get(4)?;
                    let detail_name = match kind.as_str() {
                        "charge" | "debit" => "model",
                        "remote" => "provider",
                        _ => "mint_url",
                    };
                    let extra_name = match kind.as_str() {
                        "charge" | "debit" => "reserved_msat",
                        "payout" => "debit_msat",
                        "remote" => "change_msat",
                        _ => "extra_msat",
                    };
                    Ok(json!({
                        "kind": kind,
                        "at": r.get::<_, i64>(1)?,
                        "key_hash": r.get::<_, Option<String>>(2)?,
                        "request_id": r.get::<_, Option<String>>(3)?,
                        detail_name: detail,
                        "amount_msat": r.get::<_, i64>(5)?,
                        "fee_msat": r.get::<_, i64>(6)?,
                        extra_name: r.get::<_, i64>(7)?,
                        "state": r.get::<_, String>(8)?,
                        "note": r.get::<_, Option<String>>(9)?,
                    }))
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    /// Everything the ledger knows about one request: its reservation, payouts (change) and
    /// remote spends. Never a token.
    pub async fn admin_request(&self, request_id: String) -> Result<Value, LedgerError> {
        self.store
            .read(move |c| {
                let reservation = c
                    .query_row(
                        "SELECT key_hash, model, state, amount_msat, charged_msat, uncollected_msat, note, created_at, ended_at
                         FROM reservations WHERE request_id = ?1",
                        [&request_id],
                        |r| {
                            Ok(json!({
                                "key_hash": r.get::<_, String>(0)?,
                                "model": r.get::<_, Option<String>>(1)?,
                                "state": r.get::<_, String>(2)?,
                                "reserved_msat": r.get::<_, i64>(3)?,
                                "charged_msat": r.get::<_, i64>(4)?,
                                "uncollected_msat": r.get::<_, i64>(5)?,
                                "note": r.get::<_, Option<String>>(6)?,
                                "created_at": r.get::<_, i64>(7)?,
                                "ended_at": r.get::<_, Option<i64>>(8)?,
                            }))
                        },
                    )
                    .optional()?;
                let mut stmt = c.prepare(
                    "SELECT id, key_hash, mint_url, debit_msat, amount_msat, fee_msat, state, created_at
                     FROM payouts WHERE request_id = ?1 ORDER BY id",
                )?;
                let payouts = stmt
                    .query_map([&request_id], |r| {
                        Ok(json!({
                            "id": r.get::<_, i64>(0)?,
                            "key_hash": r.get::<_, String>(1)?,
                            "mint_url": r.get::<_, String>(2)?,
                            "debit_msat": r.get::<_, i64>(3)?,
                            "amount_msat": r.get::<_, i64>(4)?,
                            "fee_msat": r.get::<_, i64>(5)?,
                            "state": r.get::<_, String>(6)?,
                            "created_at": r.get::<_, i64>(7)?,
                        }))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                let remote = if has_table(c, "remote_spends")? {
                    let mut stmt = c.prepare(
                        "SELECT provider, url, amount_msat, fee_msat, change_msat, state, attempts, note, created_at
                         FROM remote_spends WHERE request_id = ?1 ORDER BY id",
                    )?;
                    let rows = stmt.query_map([&request_id], |r| {
                        Ok(json!({
                            "provider": r.get::<_, String>(0)?,
                            "url": r.get::<_, String>(1)?,
                            "amount_msat": r.get::<_, i64>(2)?,
                            "fee_msat": r.get::<_, i64>(3)?,
                            "change_msat": r.get::<_, i64>(4)?,
                            "state": r.get::<_, String>(5)?,
                            "attempts": r.get::<_, i64>(6)?,
                            "note": r.get::<_, Option<String>>(7)?,
                            "created_at": r.get::<_, i64>(8)?,
                        }))
                    })?;
                    rows.collect::<Result<Vec<_>, _>>()?
                } else {
                    Vec::new()
                };
                Ok(json!({ "reservation": reservation, "payouts": payouts, "remote_spends": remote }))
            })
            .await
    }

    /// Requests and revenue per model in buckets of `bucket_secs` since `since` (ended
    /// requests; dashboard adjustments left out).
    pub async fn admin_usage(&self, since: i64, bucket_secs: i64) -> Result<Vec<UsageBucket>, LedgerError> {
        let bucket_secs = bucket_secs.max(1);
        self.store
            .read(move |c| {
                // Days past the retention period come from the roll-up: each whole, at its start,
                // when that is within the window.
                let mut stmt = c.prepare(&format!(
                    "SELECT b, model, SUM(charged), SUM(released), COALESCE(SUM(charged_msat), 0) FROM (
                       SELECT (created_at / ?2) * ?2 AS b, COALESCE(model, '') AS model,
                              state = 'charged' AS charged, state = 'released' AS released, charged_msat
                       FROM reservations
                       WHERE created_at >= ?1 AND state != 'open' AND request_id NOT LIKE '{ADMIN_ADJUST_PREFIX}%'
                       UNION ALL
                       SELECT (day / ?2) * ?2, model, charged, released, charged_msat
                       FROM reservations_rollup WHERE day >= ?1
                     ) GROUP BY b, model ORDER BY b, model"
                ))?;
                let rows = stmt.query_map(params![since, bucket_secs], |r| {
                    Ok(UsageBucket {
                        start: r.get(0)?,
                        model: r.get(1)?,
                        charged: to_u64(r.get(2)?),
                        released: to_u64(r.get(3)?),
                        charged_msat: to_u64(r.get(4)?),
                    })
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    /// Ended requests and msat charged per model, since the ledger began (pruned records
    /// included, through the roll-up).
    pub async fn admin_model_totals(&self) -> Result<Vec<ModelTotals>, LedgerError> {
        self.store
            .read(|c| {
                let mut stmt = c.prepare(&format!(
                    "SELECT model, SUM(charged), SUM(released), COALESCE(SUM(charged_msat), 0) FROM (
                       SELECT COALESCE(model, '') AS model, state = 'charged' AS charged, state = 'released' AS released,
                              charged_msat
                       FROM reservations
                       WHERE state != 'open' AND request_id NOT LIKE '{ADMIN_ADJUST_PREFIX}%'
                       UNION ALL
                       SELECT model, charged, released, charged_msat FROM reservations_rollup
                     ) GROUP BY model ORDER BY model"
                ))?;
                let rows = stmt.query_map([], |r| {
                    Ok(ModelTotals {
                        model: r.get(0)?,
                        charged: to_u64(r.get(1)?),
                        released: to_u64(r.get(2)?),
                        charged_msat: to_u64(r.get(3)?),
                    })
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }
}
