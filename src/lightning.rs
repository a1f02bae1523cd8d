//! Lightning, through the trusted mints' own Lightning (NUT-04 mint quotes, NUT-05 melts):
//! invoice top-ups (RIP-08), Lightning refunds to a key's `Refund-LNURL` (also automatically at
//! its `Key-Expiry-Time`), the operator's payouts of earnings, and tokens from mints the node
//! does not trust (melted at their mint to pay an invoice of a trusted one).
//!
//! Every one of these is a saga whose state the ledger records *before* each step that moves
//! money: the invoice before it is shown, the debit before an invoice is asked for, the melt
//! quote before the melt. A restart (or the watcher) then only has to ask the mint where the
//! recorded step stands: a melt is paid (finish), failed (undo) or pending (ask again later);
//! a paid mint quote is minted (cdk's own saga makes that idempotent) and credited once.
//! See docs/lightning.md.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::Settings;
use crate::error::ApiError;
use crate::ledger::{now_secs, Invoice, KeyKind, LightningPayout, OperatorPayout, Swap};
use crate::lnurl::{LnurlClient, LnurlError, LnurlOptions};
use crate::payment::{hash_api_key, Payments, Redeemed};
use crate::wallet::{MeltOutcome, MintQuoteStatus, ParsedToken, WalletError};

/// How long one poll waits for a just-paid invoice of ours to show as paid at the trusted mint.
const MINT_SETTLE_WAIT: Duration = Duration::from_secs(5);

/// How long an expired key whose Lightning refund failed waits before the next attempt.
const EXPIRED_REFUND_RETRY_SECS: i64 = 600;

/// Expired invoices are asked about on one watcher pass in this many.
const EXPIRED_INVOICE_EVERY: u64 = 12;
/// Open invoices asked about at once on a watcher pass.
const INVOICE_CHECKS_AT_ONCE: usize = 8;
/// Most invoices waiting to be paid; more are refused until some are paid or expire (anyone may
/// ask for one, and each is asked about on every watcher pass).
pub const MAX_UNPAID_INVOICES: u64 = 1000;

/// Lightning settings (from [`Settings`]).
#[derive(Debug, Clone)]
pub struct LightningOptions {
    pub enabled: bool,
    pub accept_foreign_mints: bool,
    pub min_invoice_sat: u64,
    pub max_invoice_sat: u64,
    pub invoice_grace_secs: i64,
    pub receive_ln_address: Option<String>,
    pub min_payout_sat: u64,
    pub payout_interval: Duration,
    pub watch_interval: Duration,
}

impl LightningOptions {
    pub fn from_settings(s: &Settings) -> LightningOptions {
        LightningOptions {
            enabled: s.lightning,
            accept_foreign_mints: s.lightning && s.accept_foreign_mints,
            min_invoice_sat: s.min_invoice_sat.max(1),
            max_invoice_sat: s.max_invoice_sat,
            invoice_grace_secs: i64::try_from(s.invoice_grace_seconds).unwrap_or(i64::MAX),
            receive_ln_address: s.receive_ln_address.clone().filter(|a| !a.trim().is_empty()),
            min_payout_sat: s.min_payout_sat.max(1),
            payout_interval: Duration::from_secs(s.payout_interval_seconds.max(1)),
            watch_interval: Duration::from_secs(s.lightning_watch_seconds.max(1)),
        }
    }

    pub fn lnurl_options(s: &Settings, proxy: Option<String>) -> LnurlOptions {
        LnurlOptions { allow_private_hosts: s.lnurl_allow_private_hosts, proxy, ..LnurlOptions::default() }
    }
}

impl Default for LightningOptions {
    fn default() -> Self {
        LightningOptions {
            enabled: false,
            accept_foreign_mints: false,
            min_invoice_sat: 1,
            max_invoice_sat: 1_000_000,
            invoice_grace_secs: 86_400,
            receive_ln_address: None,
            min_payout_sat: 210,
            payout_interval: Duration::from_secs(86_400),
            watch_interval: Duration::from_secs(5),
        }
    }
}

/// What `POST /v1/balance/lightning/invoice` answers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InvoiceCreated {
    pub invoice_id: String,
    pub bolt11: String,
    pub amount_sats: u64,
    pub expires_at: i64,
    pub payment_hash: String,
    pub purpose: String,
}

/// Where an invoice stands, for its status endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvoiceStatus {
    Pending {
        expires_at: i64,
    },
    Expired,
    /// Credited; `api_key` only for `create` invoices (a top-up's client has its key).
    Paid {
        credited_msat: u64,
        api_key: Option<String>,
        balance_msat: u64,
    },
}

/// A Lightning refund, as shown to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LightningRefund {
    pub recipient: String,
    pub amount_msat: u64,
    pub fee_reserve_msat: u64,
    /// Known once paid.
    pub fee_msat: u64,
    pub paid: bool,
}

impl From<LnurlError> for ApiError {
    fn from(e: LnurlError) -> Self {
        match e {
            LnurlError::Unreachable(_) => ApiError::Unavailable(e.to_string()),
            other => ApiError::BadRequest(other.to_string()),
        }
    }
}

fn whole_sats(msat: u64) -> u64 {
    msat / 1000
}

/// A melt's input fee is unknown until proofs are picked; this much margin (in sat) is kept for
/// it when sizing an invoice. Anything the melt costs beyond the debit is the operator's loss,
/// never the user's (see `complete_lightning_payout`).
fn input_fee_margin_sat(amount_sat: u64) -> u64 {
    // Enough for ~ one proof per power of two at 1000 ppk, rounded up.
    u64::from(64 - amount_sat.leading_zeros()).div_ceil(4).max(1)
}

impl Payments {
    fn lightning_on(&self) -> Result<(), ApiError> {
        if self.lightning.enabled {
            Ok(())
        } else {
            Err(ApiError::Unavailable("Lightning is not enabled on this node".into()))
        }
    }

    fn first_trusted_mint(&self) -> Result<String, ApiError> {
        self.wallet
            .trusted_mints()
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::Unavailable("this node trusts no mint".into()))
    }

    /// The API key of a `create` invoice: derived from its id under the node's secret, so the
    /// status endpoint can show it every time without the key being stored.
    pub fn api_key_for_invoice(&self, invoice_id: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.key_secret()).expect("HMAC takes any key length");
        mac.update(b"routstr-invoice-key:");
        mac.update(invoice_id.as_bytes());
        format!("sk-{}", hex::encode(mac.finalize().into_bytes()))
    }

    /// `POST /v1/balance/lightning/invoice`: an invoice of `amount_sat` at the first trusted
    /// mint; `topup_key` is the key to credit (`None`: a new key, `create`).
    pub async fn create_invoice(&self, amount_sat: u64, topup_key: Option<String>) -> Result<InvoiceCreated, ApiError> {
        self.lightning_on()?;
        let o = &self.lightning;
        if amount_sat < o.min_invoice_sat || amount_sat > o.max_invoice_sat {
            return Err(ApiError::BadRequest(format!(
                "amount_sats must be between {} and {}",
                o.min_invoice_sat, o.max_invoice_sat
            )));
        }
        // Every unpaid invoice is asked about each pass: their number is bounded.
        if self.ledger.unpaid_invoices().await? >= MAX_UNPAID_INVOICES {
            return Err(ApiError::Unavailable(
                "too many Lightning invoices are waiting to be paid here; try again later or pay with a Cashu token"
                    .into(),
            ));
        }
        let id = hex::encode(rand::random::<[u8; 16]>());
        let (purpose, key_hash) = match topup_key {
            Some(key_hash) => {
                let key = self.ledger.key_info(&key_hash).await?.ok_or(ApiError::InvalidKey)?;
                key.usable(now_secs())?;
                ("topup", key_hash)
            }
            None => ("create", hash_api_key(&self.api_key_for_invoice(&id))),
        };
        let mint = self.first_trusted_mint()?;
        let quote = self.wallet.create_mint_quote(&mint, amount_sat).await?;
        let expires_at = match i64::try_from(quote.expiry) {
            Ok(t) if t > 0 => t,
            _ => now_secs() + 3600,
        };
        // Recorded before it is shown: a payment to it can never go unnoticed.
        self.ledger
            .add_invoice(Invoice {
                id: id.clone(),
                purpose: purpose.into(),
                key_hash,
                mint_url: mint,
                quote_id: quote.id,
                bolt11: quote.bolt11.clone(),
                payment_hash: quote.payment_hash.clone(),
                amount_msat: quote.amount_msat,
                credited_msat: 0,
                state: "unpaid".into(),
                created_at: now_secs(),
                expires_at,
            })
            .await?;
        tracing::info!(amount_sat, purpose, "Lightning invoice created");
        Ok(InvoiceCreated {
            invoice_id: id,
            bolt11: quote.bolt11,
            amount_sats: amount_sat,
            expires_at,
            payment_hash: quote.payment_hash,
            purpose: purpose.into(),
        })
    }

    /// `GET /v1/balance/lightning/invoice/{id}/status`: settles the invoice if it was paid.
    pub async fn invoice_status(&self, id: &str) -> Result<InvoiceStatus, ApiError> {
        self.lightning_on()?;
        let invoice =
            self.ledger.invoice(id).await?.ok_or_else(|| ApiError::NotFoundResource("no such invoice".into()))?;
        let invoice = match self.settle_invoice(invoice).await {
            Ok(i) => i,
            Err(e) => {
                // The mint is unreachable: the client simply polls again.
                tracing::warn!(error = %e, "invoice status unknown for now");
                self.ledger.invoice(id).await?.ok_or_else(|| ApiError::NotFoundResource("no such invoice".into()))?
            }
        };
        Ok(match invoice.state.as_str() {
            "credited" => InvoiceStatus::Paid {
                credited_msat: invoice.credited_msat,
                api_key: (invoice.purpose == "create").then(|| self.api_key_for_invoice(&invoice.id)),
                balance_msat: self.ledger.key_info(&invoice.key_hash).await?.map(|k| k.available_msat()).unwrap_or(0),
            },
            "expired" => InvoiceStatus::Expired,
            _ => InvoiceStatus::Pending { expires_at: invoice.expires_at },
        })
    }

    /// Mints a paid invoice and credits its key, once (one at a time per invoice here; cdk's
    /// mint saga and the ledger's conditional update make a replay harmless anyway).
    async fn settle_invoice(&self, invoice: Invoice) -> Result<Invoice, ApiError> {
        if invoice.state == "credited" {
            return Ok(invoice);
        }
        let lock = self.lock_for(&format!("invoice:{}", invoice.id)).await;
        let _guard = lock.lock().await;
        let Some(invoice) = self.ledger.invoice(&invoice.id).await? else {
            return Err(ApiError::NotFoundResource("no such invoice".into()));
        };
        if invoice.state == "credited" {
            return Ok(invoice);
        }
        match self.wallet.mint_paid_quote(&invoice.mint_url, &invoice.quote_id).await? {
            Some(minted_msat) => {
                crate::failpoint::hit("invoice:after-mint");
                let credited = self.ledger.credit_invoice(&invoice.id, minted_msat).await?;
                tracing::info!(credited_msat = minted_msat, purpose = %invoice.purpose, "Lightning invoice paid and credited");
                Ok(credited)
            }
            None if now_secs() > invoice.expires_at && invoice.state == "unpaid" => {
                self.ledger.expire_invoice(&invoice.id).await?;
                Ok(self.ledger.invoice(&invoice.id).await?.unwrap_or(invoice))
            }
            None => Ok(invoice),
        }
    }

    /// Refunds a key's free balance over Lightning to `destination`, or reports the refund in
    /// progress / last made when there is nothing left to pay.
    pub async fn refund_lightning(&self, key_hash: &str, destination: &str) -> Result<LightningRefund, ApiError> {
        self.lightning_on()?;
        let lock = self.lock_for(&format!("refund:{key_hash}")).await;
        let _guard = lock.lock().await;
        let Some(payout) = self.ledger.begin_lightning_payout(key_hash, destination).await? else {
            return match self.ledger.latest_lightning_payout(key_hash).await? {
                Some(p) if p.state != "failed" => Ok(refund_view(&p)),
                _ => Err(ApiError::BadRequest("nothing to refund: the balance is empty".into())),
            };
        };
        crate::failpoint::hit("refund:after-debit");
        let mint = if payout.mint_url.is_empty() { self.first_trusted_mint()? } else { payout.mint_url.clone() };
        match self.quote_payout(&mint, destination, payout.debit_msat).await {
            Ok((bolt11, quote)) => {
                self.ledger
                    .quote_lightning_payout(
                        payout.id,
                        &mint,
                        &bolt11,
                        &quote.id,
                        quote.amount_msat,
                        quote.fee_reserve_msat,
                    )
                    .await?;
                crate::failpoint::hit("refund:after-quote");
                self.melt_payout(payout.id, &mint, &quote.id).await?;
            }
            Err(e) => {
                self.ledger.fail_payout(payout.id).await?;
                return Err(e);
            }
        }
        let done = self
            .ledger
            .latest_lightning_payout(key_hash)
            .await?
            .ok_or_else(|| ApiError::Internal("payout vanished".into()))?;
        match done.state.as_str() {
            "failed" => {
                Err(ApiError::Unavailable("the Lightning payment failed; nothing was taken from the balance".into()))
            }
            _ => Ok(refund_view(&done)),
        }
    }

    /// Gets an invoice from `destination` that `budget_msat` can pay at `mint` with its fees,
    /// and the mint's melt quote for it.
    async fn quote_payout(
        &self,
        mint: &str,
        destination: &str,
        budget_msat: u64,
    ) -> Result<(String, crate::wallet::MeltQuoteInfo), ApiError> {
        let budget_sat = whole_sats(budget_msat);
        let mut amount_sat = budget_sat.saturating_sub(input_fee_margin_sat(budget_sat) + budget_sat / 100 + 1);
        let mut best = None;
        // A first guess at the fee reserve, then the largest amount the mint's quoted reserve
        // allows (a larger amount may need a larger reserve: then the last fitting quote stands).
        for _ in 0..3 {
            if amount_sat == 0 {
                break;
            }
            let bolt11 = self.lnurl.invoice(destination, amount_sat * 1000).await?;
            let quote = self.wallet.melt_quote(mint, &bolt11).await?;
            let reserve_sat = whole_sats(quote.fee_reserve_msat.div_ceil(1000) * 1000);
            let ideal_sat = budget_sat.saturating_sub(reserve_sat + input_fee_margin_sat(budget_sat));
            if quote.amount_msat == amount_sat * 1000 && amount_sat <= ideal_sat {
                best = Some((bolt11, quote));
                if ideal_sat == amount_sat {
                    break;
                }
            }
            amount_sat = ideal_sat;
        }
        best.ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{budget_sat} sat is too little to pay over Lightning once the mint's fees are reserved"
            ))
        })
    }

    /// The melt of a recorded Lightning payout, and its bookkeeping. Leaves it pending when the
    /// outcome is not known yet.
    async fn melt_payout(&self, id: i64, mint: &str, quote_id: &str) -> Result<(), ApiError> {
        let outcome = match self.wallet.melt(mint, quote_id).await {
            Ok(o) => o,
            Err(WalletError::InsufficientFunds) => MeltOutcome::Failed,
            Err(e) => {
                tracing::warn!(error = %e, payout = id, "Lightning payout outcome unknown");
                MeltOutcome::Pending
            }
        };
        crate::failpoint::hit("refund:after-melt");
        self.record_payout_outcome(id, outcome).await
    }

    async fn record_payout_outcome(&self, id: i64, outcome: MeltOutcome) -> Result<(), ApiError> {
        match outcome {
            MeltOutcome::Paid { amount_msat, fee_msat } => {
                self.ledger.complete_lightning_payout(id, amount_msat, fee_msat).await?;
                tracing::info!(payout = id, amount_msat, fee_msat, "Lightning refund paid");
            }
            MeltOutcome::Failed => {
                self.ledger.fail_payout(id).await?;
                tracing::warn!(payout = id, "Lightning refund failed; the balance was restored");
            }
            MeltOutcome::Pending => tracing::info!(payout = id, "Lightning refund in flight"),
        }
        Ok(())
    }

    /// Finishes Lightning payouts a restart or a slow mint left pending.
    async fn reconcile_lightning_payouts(&self) -> Result<(), ApiError> {
        for p in self.ledger.pending_lightning_payouts().await? {
            let lock = self.lock_for(&format!("refund:{}", p.key_hash)).await;
            let _guard = lock.lock().await;
            let still: Vec<LightningPayout> = self.ledger.pending_lightning_payouts().await?;
            let Some(p) = still.into_iter().find(|q| q.id == p.id) else { continue };
            let settled = match p.quote_id.as_deref() {
                // Never got as far as a melt: nothing left the wallet.
                None => self.ledger.fail_payout(p.id).await.map_err(ApiError::from),
                Some(quote) => match self.wallet.melt_status(&p.mint_url, quote).await {
                    Ok(outcome) => self.record_payout_outcome(p.id, outcome).await,
                    Err(e) => Err(e.into()),
                },
            };
            // One payout the mint cannot answer for must not hold up the others.
            if let Err(e) = settled {
                tracing::warn!(payout = p.id, error = %e, "Lightning refund still unresolved");
            }
        }
        Ok(())
    }

    /// Keys past their `Key-Expiry-Time` with a refund address get their balance refunded.
    async fn refund_expired_keys(&self) -> Result<(), ApiError> {
        for (key_hash, destination) in self.ledger.expired_refundable_keys(1000, EXPIRED_REFUND_RETRY_SECS).await? {
            match self.refund_lightning(&key_hash, &destination).await {
                Ok(r) => {
                    tracing::info!(amount_msat = r.amount_msat, paid = r.paid, "expired key refunded over Lightning")
                }
                Err(e) => {
                    tracing::warn!(error = %e, host = %crate::lnurl::destination_host(&destination), "expired key refund failed; retried later")
                }
            }
        }
        Ok(())
    }

    /// Redeems a token from a mint the node does not trust: its proofs are melted at their mint
    /// to pay an invoice of the first trusted mint, which then mints the same value (less the
    /// fees, which the user sees as the credit) for us. The redemption was begun by the caller.
    pub(crate) async fn move_foreign_token(
        &self,
        token: &str,
        token_hash: &str,
        parsed: &ParsedToken,
        kind: KeyKind,
    ) -> Result<Redeemed, ApiError> {
        match self.start_swap(token, token_hash, parsed).await {
            Ok(swap) => {
                crate::failpoint::hit("swap:after-record");
                let outcome = match self.wallet.melt_token(token, &swap.melt_quote).await {
                    Ok(o) => o,
                    Err(e @ (WalletError::InsufficientFunds | WalletError::InvalidToken(_))) => {
                        self.ledger.fail_redemption(token_hash).await?;
                        return Err(e.into());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "foreign token melt outcome unknown");
                        MeltOutcome::Pending
                    }
                };
                crate::failpoint::hit("swap:after-melt");
                self.finish_swap(token_hash, parsed, &swap, outcome, kind).await
            }
            Err(e) => {
                // Nothing was melted: the token is still the client's.
                self.ledger.fail_redemption(token_hash).await?;
                Err(e)
            }
        }
    }

    /// Sizes, quotes and records the swap of a foreign token (before its melt).
    async fn start_swap(&self, token: &str, token_hash: &str, parsed: &ParsedToken) -> Result<Swap, ApiError> {
        if parsed.unit != "sat" {
            return Err(WalletError::UnsupportedUnit("tokens from other mints must be in sat".into()).into());
        }
        // The token names the host the node is asked to contact: the same fences as LNURL.
        self.lnurl.check_user_host(&parsed.mint_url).await.map_err(|e| {
            ApiError::Wallet(WalletError::UntrustedMint {
                mint: format!("{} ({e})", parsed.mint_url),
                accepted: self.wallet.trusted_mints(),
            })
        })?;
        // A token already spent is refused before anything is asked of either mint.
        if !self.wallet.proofs_unspent(&parsed.mint_url, &parsed.proof_ys).await? {
            return Err(WalletError::AlreadySpent.into());
        }
        let to_mint = self.first_trusted_mint()?;
        let value_sat = whole_sats(parsed.value_msat);
        let input_fee_sat = whole_sats(self.wallet.token_input_fee(token).await?.div_ceil(1000) * 1000);
        let mut amount_sat = value_sat.saturating_sub(input_fee_sat + 1 + value_sat / 100);
        let mut best = None;
        // As for payouts: a first guess at the reserve, then the most the quoted reserve allows.
        for _ in 0..3 {
            if amount_sat == 0 {
                break;
            }
            let invoice = self.wallet.create_mint_quote(&to_mint, amount_sat).await?;
            let melt = self.wallet.melt_quote(&parsed.mint_url, &invoice.bolt11).await?;
            let reserve_sat = whole_sats(melt.fee_reserve_msat.div_ceil(1000) * 1000);
            let ideal_sat = value_sat.saturating_sub(input_fee_sat + reserve_sat);
            if melt.amount_msat == amount_sat * 1000 && amount_sat <= ideal_sat {
                best = Some((invoice, melt));
                if ideal_sat == amount_sat {
                    break;
                }
            }
            amount_sat = ideal_sat;
        }
        let Some((invoice, melt)) = best else {
            return Err(ApiError::BadRequest(format!(
                "this {value_sat} sat token from {} is too small to move to a trusted mint once fees are paid; it was not spent",
                parsed.mint_url
            )));
        };
        let swap =
            Swap { mint_url: to_mint, mint_quote: invoice.id, melt_quote: melt.id, amount_msat: invoice.amount_msat };
        self.ledger.record_swap(token_hash, swap.clone()).await?;
        tracing::info!(
            value_msat = parsed.value_msat,
            amount_msat = swap.amount_msat,
            fee_reserve_msat = melt.fee_reserve_msat,
            "moving a foreign-mint token to a trusted mint"
        );
        Ok(swap)
    }

    /// After the foreign melt: mint at the trusted mint and credit, or undo, or wait.
    async fn finish_swap(
        &self,
        token_hash: &str,
        parsed: &ParsedToken,
        swap: &Swap,
        outcome: MeltOutcome,
        kind: KeyKind,
    ) -> Result<Redeemed, ApiError> {
        // While the foreign mint cannot say (down, or the payment in flight), our own invoice at
        // the trusted mint is the other witness: nobody but that melt knows it, so once it is
        // paid the token was melted for it. (A definite "failed" from the foreign mint is taken
        // as is: its melt saga is gone and the proofs were not spent.)
        let outcome = match outcome {
            MeltOutcome::Pending => self.our_invoice_witness(swap).await,
            // "Failed" from a mint we do not trust is believed only if the token's proofs are
            // unspent there (so the token is still its owner's). Spent, or unknown: it was melted
            // despite the answer (or spent elsewhere by its owner); our invoice decides, and an
            // unpaid one is asked about again rather than given up.
            MeltOutcome::Failed => match self.wallet.proofs_unspent(&parsed.mint_url, &parsed.proof_ys).await {
                Ok(true) => MeltOutcome::Failed,
                Ok(false) => self.our_invoice_witness(swap).await,
                Err(e) => {
                    tracing::warn!(error = %e, "a foreign token's proofs could not be checked for now");
                    self.our_invoice_witness(swap).await
                }
            },
            paid => paid,
        };
        match outcome {
            MeltOutcome::Paid { .. } => {
                let deadline = tokio::time::Instant::now() + MINT_SETTLE_WAIT;
                loop {
                    if let Some(minted) = self.wallet.mint_paid_quote(&swap.mint_url, &swap.mint_quote).await? {
                        crate::failpoint::hit("swap:after-mint");
                        let fee = parsed.value_msat.saturating_sub(minted);
                        let balance = self.ledger.complete_redemption(token_hash, kind, minted, fee).await?;
                        tracing::info!(credited_msat = minted, fee_msat = fee, "foreign-mint token moved and credited");
                        return Ok(Redeemed { credited_msat: minted, fee_msat: fee, balance_msat: balance, new: true });
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(ApiError::Conflict(
                            "your token was paid over Lightning and is being credited; retry shortly".into(),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            MeltOutcome::Failed => {
                self.ledger.fail_redemption(token_hash).await?;
                Err(ApiError::Unavailable(format!(
                    "could not move this token from {} over Lightning; it was not spent",
                    parsed.mint_url
                )))
            }
            MeltOutcome::Pending => {
                Err(ApiError::Conflict("moving your token over Lightning is in progress; retry shortly".into()))
            }
        }
    }

    /// Our invoice at the trusted mint, as a witness of a foreign melt: paid (the melt happened),
    /// or pending (not known to have happened).
    async fn our_invoice_witness(&self, swap: &Swap) -> MeltOutcome {
        match self.wallet.mint_quote_status(&swap.mint_url, &swap.mint_quote).await {
            Ok(MintQuoteStatus::Paid | MintQuoteStatus::Issued { .. }) => {
                MeltOutcome::Paid { amount_msat: swap.amount_msat, fee_msat: 0 }
            }
            Ok(MintQuoteStatus::Unpaid) => MeltOutcome::Pending,
            Err(e) => {
                tracing::warn!(error = %e, "our side of a foreign token's move is unknown for now");
                MeltOutcome::Pending
            }
        }
    }

    /// A pending redemption of a foreign token (a crash, or a melt still in flight): ask its
    /// mint and finish it. `Ok(Some(credited))` when credited now.
    pub(crate) async fn reconcile_swap(
        &self,
        token_hash: &str,
        parsed: &ParsedToken,
        kind: KeyKind,
    ) -> Result<Option<u64>, ApiError> {
        let Some(swap) = self.ledger.swap_of(token_hash).await? else {
            // Stopped before the melt was recorded: it never happened.
            self.ledger.fail_redemption(token_hash).await?;
            return Ok(None);
        };
        let outcome = self.wallet.melt_status(&parsed.mint_url, &swap.melt_quote).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "a foreign token's melt is unknown for now");
            MeltOutcome::Pending
        });
        match self.finish_swap(token_hash, parsed, &swap, outcome, kind).await {
            Ok(r) => Ok(Some(r.credited_msat)),
            Err(ApiError::Conflict(_)) => Err(ApiError::Conflict("still in flight".into())),
            Err(ApiError::Unavailable(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Pays the operator's earnings above `MIN_PAYOUT_SAT` to `RECEIVE_LN_ADDRESS` from the
    /// mint holding most, never touching what backs users' balances. The caller serialises
    /// this with every other use of earnings.
    pub async fn pay_operator(&self) -> Result<Option<OperatorPayout>, ApiError> {
        self.lightning_on()?;
        let Some(destination) = self.lightning.receive_ln_address.clone() else { return Ok(None) };
        let lock = self.lock_for("operator-payout").await;
        let _guard = lock.lock().await;
        let balances = self.wallet.balances().await?;
        let held: u64 = balances.iter().map(|b| b.balance_msat).sum();
        let totals = self.ledger.totals().await?;
        let earnings = totals.earnings_msat(held);
        let Some(richest) = balances.iter().filter(|b| b.unit == "sat").max_by_key(|b| b.balance_msat) else {
            return Ok(None);
        };
        let budget = earnings.min(richest.balance_msat);
        if whole_sats(budget) < self.lightning.min_payout_sat {
            tracing::debug!(earnings_msat = earnings, "earnings below MIN_PAYOUT_SAT; no payout");
            return Ok(None);
        }
        let id = self.ledger.begin_operator_payout(&richest.mint_url, &destination).await?;
        let (bolt11, quote) = match self.quote_payout(&richest.mint_url, &destination, budget).await {
            Ok(q) => q,
            Err(e) => {
                self.ledger.finish_operator_payout(id, None, &e.to_string()).await?;
                return Err(e);
            }
        };
        self.ledger.quote_operator_payout(id, &bolt11, &quote.id, quote.amount_msat, quote.fee_reserve_msat).await?;
        let outcome = match self.wallet.melt(&richest.mint_url, &quote.id).await {
            Ok(o) => o,
            Err(WalletError::InsufficientFunds) => MeltOutcome::Failed,
            Err(e) => {
                tracing::warn!(error = %e, "operator payout outcome unknown");
                MeltOutcome::Pending
            }
        };
        self.record_operator_outcome(id, outcome).await?;
        Ok(self.ledger.operator_payouts(1).await?.into_iter().next())
    }

    async fn record_operator_outcome(&self, id: i64, outcome: MeltOutcome) -> Result<(), ApiError> {
        match outcome {
            MeltOutcome::Paid { amount_msat, fee_msat } => {
                self.ledger.finish_operator_payout(id, Some((amount_msat, fee_msat)), "paid").await?;
                tracing::info!(amount_msat, fee_msat, "operator payout paid");
            }
            MeltOutcome::Failed => {
                self.ledger.finish_operator_payout(id, None, "the mint could not pay the invoice").await?;
                tracing::warn!("operator payout failed");
            }
            MeltOutcome::Pending => tracing::info!("operator payout in flight"),
        }
        Ok(())
    }

    async fn reconcile_operator_payouts(&self) -> Result<(), ApiError> {
        let lock = self.lock_for("operator-payout").await;
        let _guard = lock.lock().await;
        for p in self.ledger.pending_operator_payouts().await? {
            let settled = match p.quote_id.as_deref() {
                None => self
                    .ledger
                    .finish_operator_payout(p.id, None, "interrupted before the melt")
                    .await
                    .map_err(ApiError::from),
                Some(quote) => match self.wallet.melt_status(&p.mint_url, quote).await {
                    Ok(outcome) => self.record_operator_outcome(p.id, outcome).await,
                    Err(e) => Err(e.into()),
                },
            };
            if let Err(e) = settled {
                tracing::warn!(payout = p.id, error = %e, "operator payout still unresolved");
            }
        }
        Ok(())
    }

    /// One pass of the Lightning watcher: open invoices, melts in flight, expired keys.
    /// `pass` counts the passes: expired invoices (watched for a late payment) are only asked
    /// about every [`EXPIRED_INVOICE_EVERY`]th pass, so a pile of abandoned invoices costs the
    /// mint little.
    pub async fn lightning_tick(&self, pass: u64) {
        if !self.lightning.enabled {
            return;
        }
        // Money already on its way out first: however many invoices are open, a refund in
        // flight is looked at every pass.
        if let Err(e) = self.reconcile_lightning_payouts().await {
            tracing::warn!(error = %e, "Lightning refunds still unresolved");
        }
        if let Err(e) = self.reconcile_operator_payouts().await {
            tracing::warn!(error = %e, "operator payouts still unresolved");
        }
        match self.ledger.open_invoices(self.lightning.invoice_grace_secs).await {
            Ok(invoices) => {
                let expired_too = pass.is_multiple_of(EXPIRED_INVOICE_EVERY);
                let open = invoices.into_iter().filter(|i| expired_too || i.state == "unpaid");
                futures_util::StreamExt::for_each_concurrent(
                    futures_util::stream::iter(open),
                    INVOICE_CHECKS_AT_ONCE,
                    |invoice| async move {
                        if let Err(e) = self.settle_invoice(invoice).await {
                            tracing::debug!(error = %e, "open invoice not settled yet");
                        }
                    },
                )
                .await;
            }
            Err(e) => tracing::warn!(error = %e, "could not list open invoices"),
        }
        if let Err(e) = self.refund_expired_keys().await {
            tracing::warn!(error = %e, "expired keys not refunded yet");
        }
    }
}

fn refund_view(p: &LightningPayout) -> LightningRefund {
    LightningRefund {
        recipient: p.destination.clone(),
        amount_msat: p.amount_msat,
        fee_reserve_msat: p.fee_reserve_msat,
        fee_msat: p.fee_msat,
        paid: p.state == "ready",
    }
}

/// A new LNURL client for the node (its errors are configuration errors).
pub fn lnurl_client(s: &Settings, proxy: Option<String>) -> Result<LnurlClient, String> {
    LnurlClient::new(LightningOptions::lnurl_options(s, proxy)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_fee_margin_grows_slowly() {
        assert_eq!(input_fee_margin_sat(1), 1);
        assert_eq!(input_fee_margin_sat(1000), 3);
        assert_eq!(input_fee_margin_sat(1_000_000), 5);
        assert_eq!(whole_sats(1999), 1);
    }
}
