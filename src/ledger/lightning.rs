//! Ledger records of Lightning sagas (see `crate::lightning`). Each function is one durable
//! step; every state change is conditional on the state before it, so replaying a step (after a
//! crash, or by the background watcher racing a client's poll) changes nothing the second time.

use rusqlite::{params, Connection, OptionalExtension};

use super::{now_secs, read_key, to_i64, to_u64, Ledger, LedgerError, Payout};

/// A Lightning invoice that tops up (or creates) a key once paid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invoice {
    pub id: String,
    pub purpose: String,
    pub key_hash: String,
    pub mint_url: String,
    pub quote_id: String,
    pub bolt11: String,
    pub payment_hash: String,
    pub amount_msat: u64,
    pub credited_msat: u64,
    /// `unpaid`, `credited` or `expired`.
    pub state: String,
    pub created_at: i64,
    pub expires_at: i64,
}

/// A Lightning payout (refund of a key) as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LightningPayout {
    pub id: i64,
    pub key_hash: String,
    pub mint_url: String,
    pub destination: String,
    pub debit_msat: u64,
    pub quote_id: Option<String>,
    pub amount_msat: u64,
    pub fee_reserve_msat: u64,
    pub fee_msat: u64,
    /// `pending`, `ready` (paid) or `failed`.
    pub state: String,
}

/// An operator payout of earnings over Lightning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorPayout {
    pub id: i64,
    pub mint_url: String,
    pub destination: String,
    pub quote_id: Option<String>,
    pub amount_msat: u64,
    pub fee_reserve_msat: u64,
    pub fee_msat: u64,
    pub state: String,
    pub created_at: i64,
}

/// A foreign token being moved to a trusted mint, as recorded on its pending redemption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swap {
    pub mint_url: String,
    pub mint_quote: String,
    pub melt_quote: String,
    pub amount_msat: u64,
}

fn invoice_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Invoice> {
    Ok(Invoice {
        id: r.get(0)?,
        purpose: r.get(1)?,
        key_hash: r.get(2)?,
        mint_url: r.get(3)?,
        quote_id: r.get(4)?,
        bolt11: r.get(5)?,
        payment_hash: r.get(6)?,
        amount_msat: to_u64(r.get(7)?),
        credited_msat: to_u64(r.get(8)?),
        state: r.get(9)?,
        created_at: r.get(10)?,
        expires_at: r.get(11)?,
    })
}

const INVOICE_COLUMNS: &str = "id, purpose, key_hash, mint_url, quote_id, bolt11, payment_hash, amount_msat,
     credited_msat, state, created_at, expires_at";

fn lightning_payout_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LightningPayout> {
    Ok(LightningPayout {
        id: r.get(0)?,
        key_hash: r.get(1)?,
        mint_url: r.get(2)?,
        destination: r.get::<_, Option<String>>(3)?.unwrap_or_default(),
        debit_msat: to_u64(r.get(4)?),
        quote_id: r.get(5)?,
        amount_msat: to_u64(r.get(6)?),
        fee_reserve_msat: to_u64(r.get(7)?),
        fee_msat: to_u64(r.get(8)?),
        state: r.get(9)?,
    })
}

const LIGHTNING_PAYOUT_COLUMNS: &str =
    "id, key_hash, mint_url, destination, debit_msat, quote_id, amount_msat, fee_reserve_msat, fee_msat, state";

fn operator_payout_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OperatorPayout> {
    Ok(OperatorPayout {
        id: r.get(0)?,
        mint_url: r.get(1)?,
        destination: r.get(2)?,
        quote_id: r.get(3)?,
        amount_msat: to_u64(r.get(4)?),
        fee_reserve_msat: to_u64(r.get(5)?),
        fee_msat: to_u64(r.get(6)?),
        state: r.get(7)?,
        created_at: r.get(8)?,
    })
}

const OPERATOR_PAYOUT_COLUMNS: &str =
    "id, mint_url, destination, quote_id, amount_msat, fee_reserve_msat, fee_msat, state, created_at";

fn read_invoice(c: &Connection, id: &str) -> Result<Option<Invoice>, LedgerError> {
    Ok(c.query_row(&format!("SELECT {INVOICE_COLUMNS} FROM ln_invoices WHERE id = ?1"), [id], invoice_row)
        .optional()?)
}

/// Returns a Lightning payout's debit to its key, once (`pending` → `failed`).
pub(super) fn fail_pending_payout(c: &Connection, id: i64) -> Result<bool, LedgerError> {
    let row: Option<(String, i64)> = c
        .query_row("SELECT key_hash, debit_msat FROM payouts WHERE id = ?1 AND state = 'pending'", [id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let Some((key_hash, debit)) = row else { return Ok(false) };
    c.execute("UPDATE payouts SET state = 'failed', updated_at = ?2 WHERE id = ?1", params![id, now_secs()])?;
    c.execute("UPDATE keys SET balance_msat = balance_msat + ?2 WHERE key_hash = ?1", params![key_hash, debit])?;
    Ok(true)
}

impl Ledger {
    /// Records an invoice handed to a client (before it is shown, so a payment is never unknown).
    pub async fn add_invoice(&self, invoice: Invoice) -> Result<(), LedgerError> {
        self.store
            .run(move |c| {
                let now = now_secs();
                c.execute(
                    "INSERT INTO ln_invoices (id, purpose, key_hash, mint_url, quote_id, bolt11, payment_hash, amount_msat,
                         state, created_at, expires_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'unpaid', ?9, ?10, ?9)",
                    params![
                        invoice.id,
                        invoice.purpose,
                        invoice.key_hash,
                        invoice.mint_url,
                        invoice.quote_id,
                        invoice.bolt11,
                        invoice.payment_hash,
                        to_i64(invoice.amount_msat),
                        now,
                        invoice.expires_at
                    ],
                )?;
                Ok(())
            })
            .await
    }

    pub async fn invoice(&self, id: &str) -> Result<Option<Invoice>, LedgerError> {
        let id = id.to_owned();
        self.store.run(move |c| read_invoice(c, &id)).await
    }

    /// The invoice was paid and its proofs minted: credit its key (creating it for `create`),
    /// exactly once. Returns the invoice after.
    pub async fn credit_invoice(&self, id: &str, minted_msat: u64) -> Result<Invoice, LedgerError> {
        let id = id.to_owned();
        self.store
            .run(move |c| {
                let invoice = read_invoice(c, &id)?.ok_or_else(|| LedgerError::Schema(format!("no invoice {id}")))?;
                if invoice.state == "credited" {
                    return Ok(invoice);
                }
                let now = now_secs();
                c.execute(
                    "UPDATE ln_invoices SET state = 'credited', credited_msat = ?2, updated_at = ?3
                     WHERE id = ?1 AND state IN ('unpaid', 'expired')",
                    params![id, to_i64(minted_msat), now],
                )?;
                c.execute(
                    "INSERT INTO keys (key_hash, kind, balance_msat, mint_url, created_at) VALUES (?1, 'key', ?2, ?3, ?4)
                     ON CONFLICT (key_hash) DO UPDATE SET balance_msat = balance_msat + ?2,
                         mint_url = COALESCE(mint_url, ?3)",
                    params![invoice.key_hash, to_i64(minted_msat), invoice.mint_url, now],
                )?;
                read_invoice(c, &id)?.ok_or_else(|| LedgerError::Schema(format!("no invoice {id}")))
            })
            .await
    }

    /// Marks an unpaid invoice expired (it is still watched for a late payment for a while).
    pub async fn expire_invoice(&self, id: &str) -> Result<(), LedgerError> {
        let id = id.to_owned();
        self.store
            .run(move |c| {
                c.execute(
                    "UPDATE ln_invoices SET state = 'expired', updated_at = ?2 WHERE id = ?1 AND state = 'unpaid'",
                    params![id, now_secs()],
                )?;
                Ok(())
            })
            .await
    }

    /// How many invoices wait to be paid.
    pub async fn unpaid_invoices(&self) -> Result<u64, LedgerError> {
        self.store
            .read(|c| {
                let n: i64 =
                    c.query_row("SELECT COUNT(*) FROM ln_invoices WHERE state = 'unpaid'", [], |r| r.get(0))?;
                Ok(u64::try_from(n).unwrap_or(0))
            })
            .await
    }

    /// Invoices still worth asking about: unpaid ones, and expired ones within `grace_secs` of
    /// their expiry (a payment can land late).
    pub async fn open_invoices(&self, grace_secs: i64) -> Result<Vec<Invoice>, LedgerError> {
        self.store
            .run(move |c| {
                let mut stmt = c.prepare(&format!(
                    "SELECT {INVOICE_COLUMNS} FROM ln_invoices
                     WHERE state = 'unpaid' OR (state = 'expired' AND expires_at >= ?1) ORDER BY created_at"
                ))?;
                let rows = stmt.query_map([now_secs() - grace_secs], invoice_row)?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    /// Starts a Lightning refund of a key's whole free balance: debited now, before any invoice
    /// is asked for. `None` when there is nothing to pay.
    pub async fn begin_lightning_payout(
        &self,
        key_hash: &str,
        destination: &str,
    ) -> Result<Option<Payout>, LedgerError> {
        let (key_hash, destination, holds) = (key_hash.to_owned(), destination.to_owned(), self.holds.clone());
        self.store
            .run(move |c| {
                let Some(payout) = super::debit_for_payout(c, &holds, &key_hash, None, None, false)? else {
                    return Ok(None);
                };
                c.execute(
                    "UPDATE payouts SET method = 'lightning', destination = ?2 WHERE id = ?1",
                    params![payout.id, destination],
                )?;
                Ok(Some(payout))
            })
            .await
    }

    /// The invoice and melt quote of a Lightning payout, recorded before the melt.
    pub async fn quote_lightning_payout(
        &self,
        id: i64,
        mint_url: &str,
        bolt11: &str,
        quote_id: &str,
        amount_msat: u64,
        fee_reserve_msat: u64,
    ) -> Result<(), LedgerError> {
        let (mint_url, bolt11, quote_id) = (mint_url.to_owned(), bolt11.to_owned(), quote_id.to_owned());
        self.store
            .run(move |c| {
                let updated = c.execute(
                    "UPDATE payouts SET mint_url = ?7, bolt11 = ?2, quote_id = ?3, amount_msat = ?4, fee_reserve_msat = ?5,
                         updated_at = ?6
                     WHERE id = ?1 AND state = 'pending' AND method = 'lightning'",
                    params![id, bolt11, quote_id, to_i64(amount_msat), to_i64(fee_reserve_msat), now_secs(), mint_url],
                )?;
                if updated != 1 {
                    return Err(LedgerError::Schema(format!("Lightning payout {id} is not pending")));
                }
                Ok(())
            })
            .await
    }

    /// The melt was paid: the key keeps `debit - amount - fee` (unused fee reserve). Idempotent.
    pub async fn complete_lightning_payout(&self, id: i64, amount_msat: u64, fee_msat: u64) -> Result<(), LedgerError> {
        self.store
            .run(move |c| {
                let row: Option<(String, i64)> = c
                    .query_row(
                        "SELECT key_hash, debit_msat FROM payouts WHERE id = ?1 AND state = 'pending' AND method = 'lightning'",
                        [id],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let Some((key_hash, debit)) = row else { return Ok(()) };
                let debit = to_u64(debit);
                let spent = amount_msat.saturating_add(fee_msat);
                // The mint may take more than the reserve only if it misbehaves; the key never
                // pays more than it was debited, the operator absorbs the rest.
                let kept = spent.min(debit);
                if spent > debit {
                    tracing::warn!(payout = id, over_msat = spent - debit, "melt cost more than the key's debit");
                }
                c.execute(
                    "UPDATE payouts SET state = 'ready', debit_msat = ?2, amount_msat = ?3, fee_msat = ?4, updated_at = ?5
                     WHERE id = ?1",
                    params![id, to_i64(kept), to_i64(amount_msat), to_i64(fee_msat), now_secs()],
                )?;
                if debit > kept {
                    c.execute(
                        "UPDATE keys SET balance_msat = balance_msat + ?2 WHERE key_hash = ?1",
                        params![key_hash, to_i64(debit - kept)],
                    )?;
                }
                Ok(())
            })
            .await
    }

    /// Lightning payouts not finished: what the watcher (and the start) asks the mint about.
    pub async fn pending_lightning_payouts(&self) -> Result<Vec<LightningPayout>, LedgerError> {
        self.store
            .run(|c| {
                let mut stmt = c.prepare(&format!(
                    "SELECT {LIGHTNING_PAYOUT_COLUMNS} FROM payouts WHERE state = 'pending' AND method = 'lightning'"
                ))?;
                let rows = stmt.query_map([], lightning_payout_row)?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    /// The newest Lightning payout of a key (to answer a repeated refund request).
    pub async fn latest_lightning_payout(&self, key_hash: &str) -> Result<Option<LightningPayout>, LedgerError> {
        let key_hash = key_hash.to_owned();
        self.store
            .run(move |c| {
                Ok(c.query_row(
                    &format!(
                        "SELECT {LIGHTNING_PAYOUT_COLUMNS} FROM payouts WHERE key_hash = ?1 AND method = 'lightning'
                         ORDER BY id DESC LIMIT 1"
                    ),
                    [key_hash],
                    lightning_payout_row,
                )
                .optional()?)
            })
            .await
    }

    /// Keys whose `Key-Expiry-Time` has passed with money left and a refund address: to be
    /// refunded over Lightning. Keys with a request running or a refund in progress wait, and so
    /// do keys whose last Lightning refund failed less than `retry_after_secs` ago.
    pub async fn expired_refundable_keys(
        &self,
        min_msat: u64,
        retry_after_secs: i64,
    ) -> Result<Vec<(String, String)>, LedgerError> {
        let holds = self.holds.clone();
        self.store
            .run(move |c| {
                let mut stmt = c.prepare(
                    "SELECT k.key_hash, k.refund_address FROM keys k
                     WHERE k.refund_address IS NOT NULL AND k.expiry_time IS NOT NULL AND k.expiry_time <= ?1
                       AND k.revoked = 0 AND k.reserved_msat = 0 AND k.balance_msat >= ?2
                       AND NOT EXISTS (SELECT 1 FROM payouts p WHERE p.key_hash = k.key_hash AND (p.state = 'pending'
                           OR (p.method = 'lightning' AND p.state = 'failed' AND p.updated_at > ?3)))",
                )?;
                let now = now_secs();
                let rows = stmt.query_map(params![now, to_i64(min_msat), now - retry_after_secs], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
                let keys = rows.collect::<Result<Vec<(String, String)>, _>>()?;
                Ok(keys.into_iter().filter(|(key_hash, _)| !holds.is_held(key_hash)).collect())
            })
            .await
    }

    /// Starts an operator payout (before anything is asked of the recipient or the mint).
    pub async fn begin_operator_payout(&self, mint_url: &str, destination: &str) -> Result<i64, LedgerError> {
        let (mint_url, destination) = (mint_url.to_owned(), destination.to_owned());
        self.store
            .run(move |c| {
                let now = now_secs();
                c.execute(
                    "INSERT INTO operator_payouts (mint_url, destination, state, created_at, updated_at)
                     VALUES (?1, ?2, 'pending', ?3, ?3)",
                    params![mint_url, destination, now],
                )?;
                Ok(c.last_insert_rowid())
            })
            .await
    }

    pub async fn quote_operator_payout(
        &self,
        id: i64,
        bolt11: &str,
        quote_id: &str,
        amount_msat: u64,
        fee_reserve_msat: u64,
    ) -> Result<(), LedgerError> {
        let (bolt11, quote_id) = (bolt11.to_owned(), quote_id.to_owned());
        self.store
            .run(move |c| {
                c.execute(
                    "UPDATE operator_payouts SET bolt11 = ?2, quote_id = ?3, amount_msat = ?4, fee_reserve_msat = ?5,
                         updated_at = ?6
                     WHERE id = ?1 AND state = 'pending'",
                    params![id, bolt11, quote_id, to_i64(amount_msat), to_i64(fee_reserve_msat), now_secs()],
                )?;
                Ok(())
            })
            .await
    }

    /// Ends an operator payout: `Some((amount, fee))` paid, `None` failed. Idempotent.
    pub async fn finish_operator_payout(
        &self,
        id: i64,
        paid: Option<(u64, u64)>,
        note: &str,
    ) -> Result<(), LedgerError> {
        let note = note.to_owned();
        self.store
            .run(move |c| {
                match paid {
                    Some((amount, fee)) => c.execute(
                        "UPDATE operator_payouts SET state = 'paid', amount_msat = ?2, fee_msat = ?3, note = ?4, updated_at = ?5
                         WHERE id = ?1 AND state = 'pending'",
                        params![id, to_i64(amount), to_i64(fee), note, now_secs()],
                    )?,
                    None => c.execute(
                        "UPDATE operator_payouts SET state = 'failed', note = ?2, updated_at = ?3 WHERE id = ?1 AND state = 'pending'",
                        params![id, note, now_secs()],
                    )?,
                };
                Ok(())
            })
            .await
    }

    pub async fn operator_payouts(&self, limit: u32) -> Result<Vec<OperatorPayout>, LedgerError> {
        self.store
            .run(move |c| {
                let mut stmt = c.prepare(&format!(
                    "SELECT {OPERATOR_PAYOUT_COLUMNS} FROM operator_payouts ORDER BY id DESC LIMIT ?1"
                ))?;
                let rows = stmt.query_map([limit], operator_payout_row)?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    pub async fn pending_operator_payouts(&self) -> Result<Vec<OperatorPayout>, LedgerError> {
        self.store
            .run(|c| {
                let mut stmt = c.prepare(&format!(
                    "SELECT {OPERATOR_PAYOUT_COLUMNS} FROM operator_payouts WHERE state = 'pending' ORDER BY id"
                ))?;
                let rows = stmt.query_map([], operator_payout_row)?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    /// Records how a pending redemption of a foreign token is moved (before the melt).
    pub async fn record_swap(&self, token_hash: &str, swap: Swap) -> Result<(), LedgerError> {
        let token_hash = token_hash.to_owned();
        self.store
            .run(move |c| {
                let updated = c.execute(
                    "UPDATE redemptions SET swap_mint_url = ?2, swap_mint_quote = ?3, swap_melt_quote = ?4,
                         swap_amount_msat = ?5, updated_at = ?6
                     WHERE token_hash = ?1 AND state = 'pending'",
                    params![
                        token_hash,
                        swap.mint_url,
                        swap.mint_quote,
                        swap.melt_quote,
                        to_i64(swap.amount_msat),
                        now_secs()
                    ],
                )?;
                if updated != 1 {
                    return Err(LedgerError::Schema("recording a swap for a redemption that is not pending".into()));
                }
                Ok(())
            })
            .await
    }

    /// The swap recorded on a redemption, if any.
    pub async fn swap_of(&self, token_hash: &str) -> Result<Option<Swap>, LedgerError> {
        let token_hash = token_hash.to_owned();
        self.store
            .run(move |c| {
                Ok(c.query_row(
                    "SELECT swap_mint_url, swap_mint_quote, swap_melt_quote, swap_amount_msat FROM redemptions
                     WHERE token_hash = ?1 AND swap_melt_quote IS NOT NULL",
                    [token_hash],
                    |r| {
                        Ok(Swap {
                            mint_url: r.get(0)?,
                            mint_quote: r.get(1)?,
                            melt_quote: r.get(2)?,
                            amount_msat: to_u64(r.get(3)?),
                        })
                    },
                )
                .optional()?)
            })
            .await
    }

    /// A key's balance (0 when it does not exist).
    pub async fn balance_of(&self, key_hash: &str) -> Result<u64, LedgerError> {
        let key_hash = key_hash.to_owned();
        self.store.run(move |c| Ok(read_key(c, &key_hash)?.map(|k| k.balance_msat).unwrap_or(0))).await
    }
}
