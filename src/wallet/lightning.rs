//! Lightning through the mints: mint quotes (NUT-04, money in) and melts (NUT-05, money out),
//! at trusted mints with our own proofs and at foreign mints with a token's proofs.
//!
//! These are single steps. The sagas that chain them (and survive crashes) live in
//! `crate::lightning`, which records each step in the ledger before taking it. Every call here
//! is bounded by the wallet's operation timeout; a melt whose outcome is unknown (timeout, lost
//! connection) is reported as [`MeltOutcome::Pending`], never as failed, so it is asked about
//! again instead of being retried or refunded.

use std::collections::HashMap;
use std::str::FromStr;

use cdk::amount::SplitTarget;
use cdk::nuts::{
    CheckStateRequest, CurrencyUnit, KeySetInfo, MeltQuoteState, MintQuoteState, PaymentMethod, State, Token,
};
use cdk::wallet::types::{KeysetLoadPolicy, TransactionDirection, TransactionStatus};
use cdk::wallet::{MeltConfirmOptions, Wallet, WalletBuilder};
use cdk::{Amount, Bolt11Invoice};

use super::{map_cdk, normalize_mint_url, parse_any_token, proxied_client, WalletError, WalletService};

/// A NUT-04 mint quote: an invoice that, once paid, lets us mint its amount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintQuoteInfo {
    pub id: String,
    pub bolt11: String,
    pub payment_hash: String,
    pub amount_msat: u64,
    /// Unix seconds.
    pub expiry: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MintQuoteStatus {
    Unpaid,
    Paid,
    /// Minted already: `issued_msat` landed in our wallet.
    Issued {
        issued_msat: u64,
    },
}

/// A NUT-05 melt quote: what paying an invoice costs at a mint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeltQuoteInfo {
    pub id: String,
    pub amount_msat: u64,
    pub fee_reserve_msat: u64,
    pub expiry: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeltOutcome {
    /// Paid: the wallet gave `amount_msat + fee_msat` (fee = what the inputs lost beyond the
    /// amount: Lightning fee and input fees; unused reserve came back as change).
    Paid { amount_msat: u64, fee_msat: u64 },
    /// Not known yet (in flight at the mint, or the mint did not answer): ask again later.
    Pending,
    /// Definitely not paid; the inputs are ours (or the token's owner's) again.
    Failed,
}

fn sat_msat(amount: Amount) -> u64 {
    u64::from(amount).saturating_mul(1000)
}

/// The payment hash of a bolt11 invoice, hex.
pub fn payment_hash(bolt11: &str) -> Result<String, WalletError> {
    Bolt11Invoice::from_str(bolt11.trim())
        .map(|i| i.payment_hash().to_string())
        .map_err(|e| WalletError::Other(format!("invalid bolt11 invoice: {e}")))
}

/// The amount of a bolt11 invoice in msat (`None` for an amountless invoice).
pub fn invoice_amount_msat(bolt11: &str) -> Result<Option<u64>, WalletError> {
    Bolt11Invoice::from_str(bolt11.trim())
        .map(|i| i.amount_milli_satoshis())
        .map_err(|e| WalletError::Other(format!("invalid bolt11 invoice: {e}")))
}

impl WalletService {
    /// The `sat` wallet for a mint, trusted or not (foreign wallets are made on first use; they
    /// share our database and seed, so their sagas recover like the others).
    fn any_wallet(&self, mint_url: &str) -> Result<Wallet, WalletError> {
        if let Ok(entry) = self.entry(mint_url) {
            return Ok(entry.sat.clone());
        }
        let url = normalize_mint_url(mint_url)?;
        let key = url.to_string();
        let mut foreign = self.inner.foreign.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = foreign.get(&key) {
            return Ok(w.clone());
        }
        let mut builder = WalletBuilder::new()
            .mint_url(url.clone())
            .unit(CurrencyUnit::Sat)
            .localstore(self.inner.db.clone())
            .seed(self.inner.seed)
            .without_rate_limiting();
        if let Some(client) = proxied_client(&url, self.inner.opts.proxy.as_deref())? {
            builder = builder.shared_client(client);
        }
        let wallet = builder.build().map_err(map_cdk)?;
        foreign.insert(key, wallet.clone());
        Ok(wallet)
    }

    /// Asks a trusted mint for an invoice of `amount_sat`.
    pub async fn create_mint_quote(&self, mint_url: &str, amount_sat: u64) -> Result<MintQuoteInfo, WalletError> {
        let wallet = self.entry(mint_url)?.sat.clone();
        let quote = self
            .timed("mint quote", wallet.mint_quote(PaymentMethod::BOLT11, Some(Amount::from(amount_sat)), None, None))
            .await?;
        Ok(MintQuoteInfo {
            payment_hash: payment_hash(&quote.request)?,
            id: quote.id,
            bolt11: quote.request,
            amount_msat: amount_sat.saturating_mul(1000),
            expiry: quote.expiry,
        })
    }

    /// Where a mint quote stands, asking the mint (and finishing a mint cdk had started).
    pub async fn mint_quote_status(&self, mint_url: &str, quote_id: &str) -> Result<MintQuoteStatus, WalletError> {
        let entry = self.entry(mint_url)?.clone();
        let _gate = entry.gate.read().await;
        let quote = self.timed("mint quote status", entry.sat.check_mint_quote_status(quote_id)).await?;
        // A mint cdk has not finished (its saga still holds the quote, e.g. the mint signed but
        // the answer was lost and restoring failed): neither issued to us yet nor free to mint.
        if quote.used_by_operation.is_some() {
            return Err(WalletError::MintUnavailable("a mint of this quote is still being finished".into()));
        }
        // "Issued" is the mint's word; what counts is what reached our wallet: the completed
        // incoming transaction cdk writes when it stores the minted proofs.
        if quote.amount_issued > Amount::ZERO || quote.state == MintQuoteState::Issued {
            return match self.minted_for(&entry.sat, quote_id).await? {
                Some(issued_msat) => Ok(MintQuoteStatus::Issued { issued_msat }),
                None => Err(WalletError::Other(
                    "the mint issued this quote, but the proofs are not in this wallet (yet)".into(),
                )),
            };
        }
        Ok(match quote.state {
            MintQuoteState::Paid => MintQuoteStatus::Paid,
            _ => MintQuoteStatus::Unpaid,
        })
    }

    /// Mints a paid quote into our wallet; returns what was issued for it (also when it was
    /// minted before, e.g. by a call cut short by a crash). `Ok(None)`: not paid yet.
    pub async fn mint_paid_quote(&self, mint_url: &str, quote_id: &str) -> Result<Option<u64>, WalletError> {
        match self.mint_quote_status(mint_url, quote_id).await? {
            MintQuoteStatus::Unpaid => return Ok(None),
            MintQuoteStatus::Issued { issued_msat } => return Ok(Some(issued_msat)),
            MintQuoteStatus::Paid => {}
        }
        let entry = self.entry(mint_url)?.clone();
        let minted = {
            let _gate = entry.gate.read().await;
            self.timed("mint", entry.sat.mint(quote_id, SplitTarget::default(), None)).await
        };
        match minted {
            Ok(proofs) => {
                let total = proofs.iter().fold(Amount::ZERO, |a, p| a + p.amount);
                Ok(Some(sat_msat(total)))
            }
            // Someone (a concurrent call, or a saga resumed by the status check) got there
            // first, or the outcome is unknown: the quote's own record says what was issued.
            Err(e) => match self.mint_quote_status(mint_url, quote_id).await? {
                MintQuoteStatus::Issued { issued_msat } => Ok(Some(issued_msat)),
                _ => Err(e),
            },
        }
    }

    /// Asks `mint_url` (trusted or foreign) what paying `bolt11` costs.
    pub async fn melt_quote(&self, mint_url: &str, bolt11: &str) -> Result<MeltQuoteInfo, WalletError> {
        let wallet = self.any_wallet(mint_url)?;
        let quote =
            self.timed("melt quote", wallet.melt_quote(PaymentMethod::BOLT11, bolt11.trim(), None, None)).await?;
        if quote.unit != CurrencyUnit::Sat {
            return Err(WalletError::UnsupportedUnit(quote.unit.to_string()));
        }
        Ok(MeltQuoteInfo {
            id: quote.id,
            amount_msat: sat_msat(quote.amount),
            fee_reserve_msat: sat_msat(quote.fee_reserve),
            expiry: quote.expiry,
        })
    }

    /// Pays a melt quote at a trusted mint with our proofs.
    pub async fn melt(&self, mint_url: &str, quote_id: &str) -> Result<MeltOutcome, WalletError> {
        let entry = self.entry(mint_url)?.clone();
        let prepared = {
            let _gate = entry.gate.read().await;
            self.timed("prepare melt", entry.sat.prepare_melt(quote_id, HashMap::new())).await
        };
        let prepared = match prepared {
            Ok(p) => p,
            // Nothing left our wallet: proofs were only being selected.
            Err(e @ WalletError::InsufficientFunds) => return Err(e),
            Err(e) => {
                tracing::warn!(mint = %entry.url, error = %e, "could not prepare a melt");
                // A prepare cut short may have left proofs reserved by its saga: release them now
                // if the mint answers (else the recovery at the next start does; nothing is lost,
                // and holding the mint's gate through more timeouts would stall its payments).
                if !matches!(e, WalletError::MintUnavailable(_)) {
                    self.recover_mint(&entry).await;
                }
                return Ok(MeltOutcome::Failed);
            }
        };
        let confirmed = {
            let _gate = entry.gate.read().await;
            tokio::time::timeout(
                self.inner.opts.op_timeout,
                Box::pin(prepared.confirm_with_options(MeltConfirmOptions::skip_swap())),
            )
            .await
        };
        self.melt_result(&entry.sat, quote_id, confirmed).await
    }

    /// Pays a melt quote at a foreign mint with the proofs of `token` (from that mint).
    pub async fn melt_token(&self, token: &str, quote_id: &str) -> Result<MeltOutcome, WalletError> {
        let (parsed, decoded, unit) = parse_any_token(token)?;
        if unit != CurrencyUnit::Sat {
            return Err(WalletError::UnsupportedUnit(unit.to_string()));
        }
        let wallet = self.any_wallet(&parsed.mint_url)?;
        let proofs = self.token_proofs(&wallet, &decoded).await?;
        let prepared =
            match self.timed("prepare melt", wallet.prepare_melt_proofs(quote_id, proofs, HashMap::new())).await {
                Ok(p) => p,
                Err(e @ (WalletError::InsufficientFunds | WalletError::InvalidToken(_))) => return Err(e),
                Err(e) => {
                    // The token's proofs were at most reserved in our database, never sent.
                    tracing::warn!(mint = %parsed.mint_url, error = %e, "could not prepare a melt of a foreign token");
                    return Ok(MeltOutcome::Failed);
                }
            };
        let confirmed = tokio::time::timeout(
            self.inner.opts.op_timeout,
            Box::pin(prepared.confirm_with_options(MeltConfirmOptions::skip_swap())),
        )
        .await;
        self.melt_result(&wallet, quote_id, confirmed).await
    }

    async fn melt_result(
        &self,
        wallet: &Wallet,
        quote_id: &str,
        confirmed: Result<Result<cdk::types::FinalizedMelt, cdk::Error>, tokio::time::error::Elapsed>,
    ) -> Result<MeltOutcome, WalletError> {
        match confirmed {
            Ok(Ok(done)) if done.state() == MeltQuoteState::Paid => {
                Ok(MeltOutcome::Paid { amount_msat: sat_msat(done.amount()), fee_msat: sat_msat(done.fee_paid()) })
            }
            // After the melt request went out, nothing is concluded from an error: only the
            // mint's own answer (through the saga) says failed; anything else is pending.
            Ok(Ok(done)) => {
                tracing::info!(state = %done.state(), "melt not settled yet");
                Ok(self.melt_status_of(wallet, quote_id).await.unwrap_or(MeltOutcome::Pending))
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "melt failed or its outcome is unknown; asking the mint");
                Ok(self.melt_status_of(wallet, quote_id).await.unwrap_or(MeltOutcome::Pending))
            }
            Err(_) => {
                tracing::warn!("melt timed out; its outcome is asked again later");
                Ok(MeltOutcome::Pending)
            }
        }
    }

    /// Where a melt stands (finishing cdk's saga for it when the mint has settled it).
    pub async fn melt_status(&self, mint_url: &str, quote_id: &str) -> Result<MeltOutcome, WalletError> {
        let wallet = self.any_wallet(mint_url)?;
        self.melt_status_of(&wallet, quote_id).await
    }

    async fn melt_status_of(&self, wallet: &Wallet, quote_id: &str) -> Result<MeltOutcome, WalletError> {
        let quote = match self.timed("melt status", wallet.check_melt_quote_status(quote_id)).await {
            Ok(q) => q,
            Err(e @ WalletError::MintUnavailable(_)) => {
                tracing::warn!(error = %e, "melt status unknown");
                return Ok(MeltOutcome::Pending);
            }
            Err(e) => return Err(e),
        };
        Ok(match quote.state {
            // Paid: believed with its fee once cdk has completed the melt's outgoing transaction
            // (change accounted). Until then (cdk wrote it pending with the whole reserve as the
            // fee), the saga is finished by recovery and the melt asked about again.
            MeltQuoteState::Paid => match self.melt_fee(wallet, quote_id).await? {
                Some(fee_msat) => MeltOutcome::Paid { amount_msat: sat_msat(quote.amount), fee_msat },
                None => {
                    if let Ok(entry) = self.entry(&wallet.mint_url.to_string()) {
                        self.recover_mint(entry).await;
                    }
                    match self.melt_fee(wallet, quote_id).await? {
                        Some(fee_msat) => MeltOutcome::Paid { amount_msat: sat_msat(quote.amount), fee_msat },
                        None => MeltOutcome::Pending,
                    }
                }
            },
            // A melt saga still holds the quote: cdk could not settle it (the mint says pending,
            // or did not answer) and kept the local state as it was. Not failed.
            _ if quote.used_by_operation.is_some() => MeltOutcome::Pending,
            MeltQuoteState::Pending | MeltQuoteState::Unknown => MeltOutcome::Pending,
            // No saga left, and the mint says unpaid or failed: our inputs are free again.
            _ => MeltOutcome::Failed,
        })
    }

    /// The fee of a finished melt: its completed outgoing transaction for that quote.
    async fn melt_fee(&self, wallet: &Wallet, quote_id: &str) -> Result<Option<u64>, WalletError> {
        let txs = wallet.list_transactions(Some(TransactionDirection::Outgoing)).await.map_err(map_cdk)?;
        Ok(txs
            .iter()
            .find(|t| t.quote_id.as_deref() == Some(quote_id) && t.status == TransactionStatus::Completed)
            .map(|t| sat_msat(t.fee)))
    }

    /// What a mint quote put in our wallet: its completed incoming transaction, if any.
    async fn minted_for(&self, wallet: &Wallet, quote_id: &str) -> Result<Option<u64>, WalletError> {
        let txs = wallet.list_transactions(Some(TransactionDirection::Incoming)).await.map_err(map_cdk)?;
        Ok(txs
            .iter()
            .find(|t| t.quote_id.as_deref() == Some(quote_id) && t.status == TransactionStatus::Completed)
            .map(|t| sat_msat(t.amount)))
    }

    /// Whether every proof (by its Y) is still unspent at `mint_url` (NUT-07), asked of the mint.
    pub async fn proofs_unspent(&self, mint_url: &str, proof_ys: &[String]) -> Result<bool, WalletError> {
        let wallet = self.any_wallet(mint_url)?;
        let ys = super::parse_ys(proof_ys)?;
        let states =
            self.timed("proof states", wallet.mint_connector().post_check_state(CheckStateRequest { ys })).await?;
        Ok(!states.states.is_empty() && states.states.iter().all(|s| s.state == State::Unspent))
    }

    /// The input fee (NUT-02) a foreign token's proofs cost to spend at their mint, in msat.
    pub async fn token_input_fee(&self, token: &str) -> Result<u64, WalletError> {
        let (parsed, decoded, _) = parse_any_token(token)?;
        let wallet = self.any_wallet(&parsed.mint_url)?;
        let proofs = self.token_proofs(&wallet, &decoded).await?;
        let fee = self.timed("input fee", wallet.get_proofs_fee(&proofs)).await?;
        Ok(sat_msat(fee.total))
    }

    async fn token_proofs(&self, wallet: &Wallet, token: &Token) -> Result<cdk::nuts::Proofs, WalletError> {
        let keysets = self.timed("keysets", wallet.keysets(KeysetLoadPolicy::default())).await?;
        let infos: Vec<KeySetInfo> = keysets
            .into_iter()
            .map(|k| KeySetInfo {
                id: k.id,
                unit: k.unit,
                active: k.active.unwrap_or(false),
                input_fee_ppk: k.input_fee_ppk,
                final_expiry: k.final_expiry,
            })
            .collect();
        token.proofs(&infos).map_err(|e| WalletError::InvalidToken(format!("token proofs: {e}")))
    }
}
