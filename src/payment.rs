//! Payment: who pays for a request, and how money enters and leaves.
//!
//! Credentials (PROTOCOL.md §1): `Authorization: Bearer sk-…` (a prepaid key), `Bearer cashu…`
//! (a token used as a key: redeemed on first use into a balance that later uses of the same token
//! reach), and `X-Cashu: cashu…` (stateless: redeemed into a one-request balance whose rest comes
//! back as change).
//!
//! Keys are stored as SHA-256 hashes only. The key behind a token is an HMAC of the token under
//! the node's secret, so it is stable for the token's holder but cannot be derived by anyone who
//! merely saw the token.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use hyper::header::{HeaderMap, AUTHORIZATION};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::ledger::{KeyKind, Ledger, PayoutLookup, RedemptionState, Reservation};
use crate::lightning::LightningOptions;
use crate::lnurl::LnurlClient;
use crate::wallet::{ParsedToken, WalletError, WalletService};

pub const X_CASHU: &str = "x-cashu";

pub fn sha256_hex(data: &[u8]) -> String {
    prefixed_hex("", &Sha256::digest(data))
}

/// `prefix`, then `bytes` in lowercase hex, in one allocation (every request's key hash and id).
pub fn prefixed_hex(prefix: &str, bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = vec![0; prefix.len() + 2 * bytes.len()];
    let (head, digits) = text.split_at_mut(prefix.len());
    head.copy_from_slice(prefix.as_bytes());
    for (pair, &b) in digits.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
    // A `str` and hex digits: valid UTF-8, so never the empty default.
    String::from_utf8(text).unwrap_or_default()
}

/// The stored form of an API key.
pub fn hash_api_key(api_key: &str) -> String {
    sha256_hex(api_key.as_bytes())
}

/// The ledger's handle on a token (not a credential: knowing it gives nothing).
pub fn token_hash(token: &str) -> String {
    sha256_hex(format!("routstr-token:{token}").as_bytes())
}

fn xcashu_key_hash(token: &str) -> String {
    sha256_hex(format!("routstr-xcashu:{token}").as_bytes())
}

fn looks_like_token(s: &str) -> bool {
    s.starts_with("cashuA") || s.starts_with("cashuB")
}

/// A credential as the client sent it. Its `Debug` shows only the kind.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    ApiKey(&'a str),
    /// A token in `Authorization: Bearer` (a key).
    BearerToken(&'a str),
    /// A token in `X-Cashu` (one request).
    XCashu(&'a str),
}

impl std::fmt::Debug for Credential<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::ApiKey(_) => "ApiKey([redacted])",
            Credential::BearerToken(_) => "BearerToken([redacted])",
            Credential::XCashu(_) => "XCashu([redacted])",
        })
    }
}

/// Reads the credential; `X-Cashu` wins over `Authorization` when both are present.
pub fn credential(headers: &HeaderMap) -> Result<Option<Credential<'_>>, ApiError> {
    if let Some(v) = headers.get(X_CASHU) {
        let token = v.to_str().map_err(|_| ApiError::BadRequest("X-Cashu header is not text".into()))?.trim();
        if !looks_like_token(token) {
            return Err(WalletError::InvalidToken("X-Cashu must hold a cashuA… or cashuB… token".into()).into());
        }
        return Ok(Some(Credential::XCashu(token)));
    }
    let Some(v) = headers.get(AUTHORIZATION) else { return Ok(None) };
    let v = v.to_str().map_err(|_| ApiError::InvalidKey)?.trim();
    let bearer =
        v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).map(str::trim).ok_or(ApiError::InvalidKey)?;
    if looks_like_token(bearer) {
        Ok(Some(Credential::BearerToken(bearer)))
    } else if bearer.starts_with("sk-") && bearer.len() <= 256 {
        Ok(Some(Credential::ApiKey(bearer)))
    } else {
        Err(ApiError::InvalidKey)
    }
}

/// Who pays a request, once its reservation is made.
#[derive(Debug, Clone)]
pub struct Payer {
    /// The request's hold on the key's balance (and the key), ended by settlement.
    pub reservation: Reservation,
    /// Set for a stateless `X-Cashu` payment.
    pub xcashu: Option<StatelessPayment>,
}

#[derive(Debug, Clone)]
pub struct StatelessPayment {
    /// The token's hash, to find its change again.
    pub token_hash: String,
    /// What the token credited (after the mint's fee).
    pub funded_msat: u64,
}

impl StatelessPayment {
    /// Change is paid in whole sats: the sub-sat rest left after `charge_msat`.
    pub fn rounding_after(&self, charge_msat: u64) -> u64 {
        self.funded_msat.saturating_sub(charge_msat) % 1000
    }
}

/// Result of redeeming a token into a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redeemed {
    pub credited_msat: u64,
    /// What the move cost: the mint's input fee, or for a token from another mint the
    /// Lightning and mint fees of moving it (value − credited). 0 when not known.
    pub fee_msat: u64,
    pub balance_msat: u64,
    /// False when this token had already been redeemed into the same key earlier.
    pub new: bool,
}

/// A payout made: the token and what it is worth.
#[derive(Clone, PartialEq, Eq)]
pub struct PaidOut {
    pub token: String,
    pub amount_msat: u64,
}

impl std::fmt::Debug for PaidOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaidOut").field("amount_msat", &self.amount_msat).finish_non_exhaustive()
    }
}

/// `Refund-LNURL` and `Key-Expiry-Time`, checked (`Payments::refund_headers`).
#[derive(Debug, Default)]
pub struct RefundHeaders {
    refund: Option<String>,
    expiry: Option<i64>,
}

pub struct Payments {
    pub ledger: Ledger,
    pub wallet: WalletService,
    key_secret: Vec<u8>,
    /// One operation at a time per token, invoice, key refund… in this process (the ledger's
    /// conditional updates enforce it across processes).
    busy: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub(crate) lightning: LightningOptions,
    pub(crate) lnurl: LnurlClient,
}

impl Payments {
    pub fn new(
        ledger: Ledger,
        wallet: WalletService,
        key_secret: Vec<u8>,
        lightning: LightningOptions,
        lnurl: LnurlClient,
    ) -> Payments {
        Payments { ledger, wallet, key_secret, busy: Mutex::new(HashMap::new()), lightning, lnurl }
    }

    pub(crate) fn key_secret(&self) -> &[u8] {
        &self.key_secret
    }

    /// Loads the node's key-derivation secret, creating it (owner-only) on first start.
    pub fn load_or_create_secret(path: &Path) -> std::io::Result<Vec<u8>> {
        match std::fs::read_to_string(path) {
            Ok(text) => hex::decode(text.trim()).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret: [u8; 32] = rand::random();
                crate::fsutil::write_private(path, hex::encode(secret).as_bytes())?;
                Ok(secret.to_vec())
            }
            Err(e) => Err(e),
        }
    }

    /// The API key a token-funded balance answers to.
    pub fn api_key_for_token(&self, token: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key_secret).expect("HMAC takes any key length");
        mac.update(b"routstr-token-key:");
        mac.update(token.as_bytes());
        format!("sk-{}", hex::encode(mac.finalize().into_bytes()))
    }

    /// The key hash and the key itself (as the client may be shown it) for a key credential.
    pub fn key_of(&self, credential: Credential<'_>) -> Option<(String, String)> {
        match credential {
            Credential::ApiKey(k) => Some((hash_api_key(k), k.to_owned())),
            Credential::BearerToken(t) => {
                let key = self.api_key_for_token(t);
                Some((hash_api_key(&key), key))
            }
            Credential::XCashu(_) => None,
        }
    }

    /// Reserves `cost_msat` for a request from whoever pays it, redeeming a token first if needed.
    /// Redeeming and change (cdk futures, KBs in size) are boxed: the common case, a key with
    /// a balance, keeps a small future (see `clippy::large_futures`).
    pub async fn authorize(
        &self,
        headers: &HeaderMap,
        cost_msat: u64,
        request_id: &str,
        model: &str,
    ) -> Result<Payer, ApiError> {
        let Some(cred) = credential(headers)? else {
            return Err(ApiError::PaymentMissing { required_msat: cost_msat });
        };
        match cred {
            Credential::ApiKey(api_key) => {
                let key_hash = hash_api_key(api_key);
                // Before the reservation: a refused header must not leave it open.
                let refund = self.refund_headers(headers)?;
                self.apply_refund_headers(&key_hash, refund).await?;
                let reservation = self.ledger.reserve(&key_hash, request_id, cost_msat, model).await?;
                Ok(Payer { reservation, xcashu: None })
            }
            Credential::BearerToken(token) => {
                let key_hash = hash_api_key(&self.api_key_for_token(token));
                let reservation = match self.ledger.reserve(&key_hash, request_id, cost_msat, model).await {
                    Err(crate::ledger::LedgerError::KeyNotFound) => {
                        let refund = self.refund_headers_for_new_key(headers)?;
                        Box::pin(self.redeem(token, &key_hash, KeyKind::Key)).await?;
                        self.apply_refund_headers(&key_hash, refund).await?;
                        self.ledger.reserve(&key_hash, request_id, cost_msat, model).await?
                    }
                    other => other?,
                };
                Ok(Payer { reservation, xcashu: None })
            }
            Credential::XCashu(token) => {
                let parsed = self.parse_payable_token(token)?;
                if parsed.value_msat < cost_msat {
                    return Err(ApiError::InsufficientBalance {
                        required_msat: cost_msat,
                        available_msat: parsed.value_msat,
                    });
                }
                let key_hash = xcashu_key_hash(token);
                let redeemed = Box::pin(self.redeem(token, &key_hash, KeyKind::XCashu)).await?;
                let token_hash = token_hash(token);
                if !redeemed.new && !self.unused_stateless_balance(&key_hash, &token_hash).await? {
                    return Err(ApiError::Wallet(WalletError::AlreadySpent));
                }
                let reservation = match self.ledger.reserve(&key_hash, request_id, cost_msat, model).await {
                    Ok(reservation) => reservation,
                    Err(e) => {
                        // The mint's fee left too little: everything goes back as change.
                        let change = Box::pin(self.xcashu_change(&key_hash, &token_hash, Some(request_id))).await;
                        return Err(match (ApiError::from(e), change) {
                            (err, Ok(Some(paid))) => ApiError::ChangeReturned { inner: Box::new(err), change: paid },
                            (err, _) => err,
                        });
                    }
                };
                Ok(Payer {
                    reservation,
                    xcashu: Some(StatelessPayment { token_hash, funded_msat: redeemed.credited_msat }),
                })
            }
        }
    }

    /// `Refund-LNURL` / `Key-Expiry-Time` as the client sent them, checked before any money moves
    /// (a token is redeemed only once they are known to be usable).
    pub fn refund_headers(&self, headers: &HeaderMap) -> Result<RefundHeaders, ApiError> {
        // Without Lightning they mean nothing here: not kept (the key's info shows no refund
        // address), and refunds come as Cashu tokens, as docs/lightning.md says.
        if !self.lightning.enabled {
            return Ok(RefundHeaders::default());
        }
        let refund = headers.get("refund-lnurl").and_then(|v| v.to_str().ok()).map(|s| s.trim().to_owned());
        let expiry = headers
            .get("key-expiry-time")
            .and_then(|v| v.to_str().ok())
            .map(|s| {
                s.trim()
                    .parse::<i64>()
                    .map_err(|_| ApiError::BadRequest("Key-Expiry-Time must be a unix timestamp".into()))
            })
            .transpose()?;
        if let Some(address) = refund.as_deref() {
            self.lnurl.resolve_url(address).map_err(|e| ApiError::BadRequest(format!("Refund-LNURL: {e}")))?;
        }
        Ok(RefundHeaders { refund, expiry })
    }

    /// `refund_headers` for a key about to be paid into: an expiry already past would take the
    /// money into a key that can spend none of it.
    pub fn refund_headers_for_new_key(&self, headers: &HeaderMap) -> Result<RefundHeaders, ApiError> {
        let checked = self.refund_headers(headers)?;
        if checked.expiry.is_some_and(|at| at <= crate::ledger::now_secs()) {
            return Err(ApiError::BadRequest("Key-Expiry-Time is in the past: the key could pay for nothing".into()));
        }
        Ok(checked)
    }

    /// Stores checked refund headers on a key, if the client sent any.
    pub async fn apply_refund_headers(&self, key_hash: &str, headers: RefundHeaders) -> Result<(), ApiError> {
        if headers.refund.is_some() || headers.expiry.is_some() {
            self.ledger.set_refund_options(key_hash, headers.refund, headers.expiry).await?;
        }
        Ok(())
    }

    /// A token redeemed earlier for a request that never ran (the mint went silent mid-swap and
    /// the retry found the swap done): its balance is untouched and may pay this request.
    async fn unused_stateless_balance(&self, key_hash: &str, token_hash: &str) -> Result<bool, ApiError> {
        let Some(info) = self.ledger.key_info(key_hash).await? else { return Ok(false) };
        if info.requests > 0 || info.reserved_msat > 0 || info.balance_msat == 0 {
            return Ok(false);
        }
        Ok(self.ledger.latest_payout(Some(key_hash), Some(token_hash)).await? == PayoutLookup::NotFound)
    }

    /// The in-process lock of one named operation (`token_hash`, `invoice:<id>`, …).
    pub(crate) async fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, m| Arc::strong_count(m) > 1);
        map.entry(name.to_owned()).or_default().clone()
    }

    /// Redeems a token into `key_hash` (creating the key), exactly once per token: the same token
    /// in many parallel requests is swapped once and credited once.
    pub async fn redeem(&self, token: &str, key_hash: &str, kind: KeyKind) -> Result<Redeemed, ApiError> {
        let parsed = self.parse_payable_token(token)?;
        let token_hash = token_hash(token);
        let lock = self.lock_for(&token_hash).await;
        let _guard = lock.lock().await;
        for attempt in 0..2 {
            match self
                .ledger
                .begin_redemption(&token_hash, key_hash, &parsed.mint_url, parsed.value_msat, &parsed.proof_ys)
                .await?
            {
                RedemptionState::Started => break,
                RedemptionState::Credited { key_hash: owner } => {
                    if owner != key_hash {
                        return Err(WalletError::AlreadySpent.into());
                    }
                    let balance = self.ledger.key_info(key_hash).await?.map(|k| k.balance_msat).unwrap_or(0);
                    return Ok(Redeemed { credited_msat: 0, fee_msat: 0, balance_msat: balance, new: false });
                }
                RedemptionState::ProofsUsed => return Err(WalletError::AlreadySpent.into()),
                RedemptionState::ProofsBusy => {
                    return Err(ApiError::Conflict("the proofs of this token are being redeemed; retry shortly".into()))
                }
                RedemptionState::InProgress if attempt == 0 => {
                    // Left pending by a crash or a mint that went silent: settle it first.
                    self.reconcile_redemption(&token_hash, &parsed, kind).await?;
                }
                RedemptionState::InProgress => {
                    return Err(ApiError::Conflict("this token is still being redeemed; retry shortly".into()))
                }
            }
        }
        if !self.wallet.is_trusted(&parsed.mint_url) {
            return self.move_foreign_token(token, &token_hash, &parsed, kind).await;
        }
        match self.wallet.receive(token).await {
            Ok(received) => {
                let balance = self
                    .ledger
                    .complete_redemption(&token_hash, kind, received.credited_msat, received.fee_msat)
                    .await?;
                tracing::info!(mint = %received.mint_url, credited_msat = received.credited_msat, fee_msat = received.fee_msat, "token redeemed");
                Ok(Redeemed {
                    credited_msat: received.credited_msat,
                    fee_msat: received.fee_msat,
                    balance_msat: balance,
                    new: true,
                })
            }
            Err(e @ (WalletError::MintUnavailable(_) | WalletError::Other(_))) => {
                // The swap may or may not have happened: ask before deciding.
                tracing::warn!(error = %e, "redemption outcome unknown; reconciling");
                match self.reconcile_redemption(&token_hash, &parsed, kind).await {
                    Ok(Some(credited)) => {
                        let balance = self.ledger.key_info(key_hash).await?.map(|k| k.balance_msat).unwrap_or(0);
                        Ok(Redeemed { credited_msat: credited, fee_msat: 0, balance_msat: balance, new: true })
                    }
                    _ => Err(e.into()),
                }
            }
            Err(e) => {
                self.ledger.fail_redemption(&token_hash).await?;
                Err(e.into())
            }
        }
    }

    /// Settles a pending redemption by asking the wallet (or, for a foreign token, its mint)
    /// whether the swap happened. `Ok(Some(credited))` credited now, `Ok(None)` nothing was
    /// received (marked failed).
    async fn reconcile_redemption(
        &self,
        token_hash: &str,
        parsed: &ParsedToken,
        kind: KeyKind,
    ) -> Result<Option<u64>, ApiError> {
        if !self.wallet.is_trusted(&parsed.mint_url) {
            return self.reconcile_swap(token_hash, parsed, kind).await;
        }
        match self.wallet.received_by_us(&parsed.mint_url, &parsed.proof_ys).await {
            Ok(Some(credited)) => {
                self.ledger.complete_redemption(token_hash, kind, credited, 0).await?;
                Ok(Some(credited))
            }
            Ok(None) => {
                self.ledger.fail_redemption(token_hash).await?;
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A token this node can take: from a trusted mint, or (with `ACCEPT_FOREIGN_MINTS`) from
    /// any mint, to be moved to a trusted one over Lightning.
    pub fn parse_payable_token(&self, token: &str) -> Result<ParsedToken, ApiError> {
        match self.wallet.parse_token(token) {
            Err(WalletError::UntrustedMint { .. }) if self.lightning.accept_foreign_mints => {
                Ok(crate::wallet::parse_foreign_token(token)?)
            }
            other => Ok(other?),
        }
    }

    /// Settles every pending redemption it can (at start and periodically).
    pub async fn reconcile_pending(&self) -> Result<usize, ApiError> {
        let pending = self.ledger.pending_redemptions().await?;
        let mut settled = 0;
        for p in pending {
            let lock = self.lock_for(&p.token_hash).await;
            let _guard = lock.lock().await;
            let parsed = ParsedToken {
                mint_url: p.mint_url.clone(),
                unit: "sat".into(),
                value_msat: p.value_msat,
                proof_ys: p.proof_ys.clone(),
            };
            match self.reconcile_redemption(&p.token_hash, &parsed, p.kind).await {
                Ok(outcome) => {
                    settled += 1;
                    tracing::info!(credited = outcome.is_some(), "pending redemption reconciled");
                }
                Err(e) => tracing::warn!(error = %e, "pending redemption still unresolved"),
            }
        }
        Ok(settled)
    }

    /// At start, before serving: payouts left `pending` by the previous process never handed a
    /// token out, so their debit returns to the key; a token made for one is taken back into the
    /// wallet by `revoke_abandoned_sends`. Never while serving: a payout in flight is pending.
    pub async fn fail_interrupted_payouts(&self) -> Result<usize, ApiError> {
        let pending = self.ledger.pending_payouts().await?;
        for payout in &pending {
            self.ledger.fail_payout(payout.id).await?;
        }
        Ok(pending.len())
    }

    /// Takes back into the wallet the tokens made for payouts and provider payments that the
    /// ledger records as failed: none of them left the node (a process killed between making a
    /// token and keeping it). cdk's own recovery leaves such a send as it is: the token might be
    /// out there. Run at start and then every minute (the mint may be away).
    pub async fn revoke_abandoned_sends(&self) -> Result<u64, ApiError> {
        let abandoned = self.ledger.abandoned_send_tags().await?;
        if abandoned.is_empty() {
            return Ok(0);
        }
        Ok(self.wallet.revoke_abandoned_sends(&abandoned).await?)
    }

    /// Pays out a key's whole free balance as a token: debited first, token kept once made.
    /// Rounds up to whole sats (in the client's favour) when the wallet can cover it; otherwise
    /// pays the whole sats and leaves the sub-sat rest visibly on the key.
    pub async fn pay_out(
        &self,
        key_hash: &str,
        source_token_hash: Option<&str>,
        request_id: Option<&str>,
    ) -> Result<Option<PaidOut>, ApiError> {
        // A key's refund may come from any trusted mint; a stateless request's change comes from
        // the mint its token came from, the one its client's wallet knows.
        let any_mint = source_token_hash.is_none();
        match self.ledger.begin_payout(key_hash, source_token_hash, request_id, false).await? {
            Some(payout) => self.make_payout(payout, any_mint).await.map(Some),
            None => Ok(None),
        }
    }

    /// Pays out the change an `X-Cashu` request left behind (its mint was away when it ended),
    /// unless a request is using the key right now: a client retrying with its token is then
    /// spending that balance, and gets what is left as its own change.
    pub async fn pay_stranded_change(&self, key_hash: &str) -> Result<Option<PaidOut>, ApiError> {
        match self.ledger.begin_payout(key_hash, None, None, true).await? {
            Some(payout) => self.make_payout(payout, false).await.map(Some),
            None => Ok(None),
        }
    }

    /// Makes the token of a payout begun (debited) in the ledger, and keeps it there. From the
    /// key's own mint when it can; with `any_mint` (a key's refund) else from another trusted
    /// mint that can (a key topped up with tokens of several mints), else, when no mint holds it
    /// all, the part the fullest one holds: the rest goes back to the key, for the next refund
    /// (a token comes from one mint).
    async fn make_payout(&self, payout: crate::ledger::Payout, any_mint: bool) -> Result<PaidOut, ApiError> {
        let own = if payout.mint_url.is_empty() {
            self.wallet.trusted_mints().into_iter().next().unwrap_or_default()
        } else {
            payout.mint_url.clone()
        };
        let mut held = if any_mint { self.held_by_mint().await } else { Vec::new() };
        held.sort_by_key(|(mint, msat)| (*mint != own, std::cmp::Reverse(*msat)));
        if !held.iter().any(|(mint, _)| *mint == own) {
            held.insert(0, (own, 0));
        }
        let up = payout.debit_msat.div_ceil(1000) * 1000;
        let down = payout.debit_msat / 1000 * 1000;
        let mut tries: Vec<(&str, u64, u64)> = Vec::new();
        for (mint, _) in &held {
            tries.push((mint, up, payout.debit_msat));
            if down > 0 && down < up {
                tries.push((mint, down, down));
            }
        }
        if let Some((fullest, msat)) = held.iter().max_by_key(|(_, msat)| *msat) {
            // All it holds, or (at a mint that charges to redeem, which the token prepays) 1 % less.
            for part in [msat / 1000 * 1000, msat * 99 / 100 / 1000 * 1000] {
                if part > 0 && part < down && !tries.iter().any(|t| t.0 == fullest.as_str() && t.1 == part) {
                    tries.push((fullest, part, part));
                }
            }
        }
        let tag = format!("payout:{}", payout.id);
        let mut attempt = Err(WalletError::InsufficientFunds);
        for (mint, amount, debit) in tries {
            attempt = self.wallet.send_tagged(mint, amount, &tag).await.map(|s| (s, debit));
            // A mint that cannot pay now (too little, away, no longer trusted) leaves it to the next.
            let next = matches!(
                attempt,
                Err(WalletError::InsufficientFunds
                    | WalletError::MintUnavailable(_)
                    | WalletError::UntrustedMint { .. })
            );
            if !next {
                break;
            }
        }
        crate::failpoint::hit("payout:after-send");
        match attempt {
            Ok((sent, debit)) => {
                let ledger = &self.ledger;
                ledger
                    .complete_payout(payout.id, &sent.mint_url, &sent.token, debit, sent.amount_msat, sent.fee_msat)
                    .await?;
                Ok(PaidOut { token: sent.token, amount_msat: sent.amount_msat })
            }
            Err(e) => {
                self.ledger.fail_payout(payout.id).await?;
                Err(e.into())
            }
        }
    }

    /// What the wallet can spend at each trusted mint (none when its database cannot be read:
    /// the payout then tries the key's own mint only).
    async fn held_by_mint(&self) -> Vec<(String, u64)> {
        let mut held: Vec<(String, u64)> = Vec::new();
        for b in self.wallet.balances().await.unwrap_or_default() {
            match held.iter_mut().find(|(mint, _)| *mint == b.mint_url) {
                Some((_, msat)) => *msat += b.balance_msat,
                None => held.push((b.mint_url, b.balance_msat)),
            }
        }
        held
    }

    /// The tokens of the key's other refunds of the last hour (besides `paid`): a balance refunded
    /// in parts, one mint at a time, has several, and the answer carrying one may have been lost.
    pub async fn earlier_refunds(&self, key_hash: &str, paid: &PaidOut) -> Result<Vec<PaidOut>, ApiError> {
        const WINDOW_SECS: i64 = 3600;
        let recent = self.ledger.recent_refund_tokens(key_hash, crate::ledger::now_secs() - WINDOW_SECS).await?;
        Ok(recent
            .into_iter()
            .filter(|(token, _)| *token != paid.token)
            .map(|(token, amount_msat)| PaidOut { token, amount_msat })
            .collect())
    }

    /// `/v1/balance/refund` with a key: pays out the free balance, or hands out the last payout
    /// again when there is nothing left (the first answer may have been lost).
    pub async fn refund_key(&self, key_hash: &str) -> Result<PaidOut, ApiError> {
        if let Some(paid) = self.pay_out(key_hash, None, None).await? {
            return Ok(paid);
        }
        match self.ledger.latest_payout(Some(key_hash), None).await? {
            PayoutLookup::Ready { token, amount_msat } => Ok(PaidOut { token, amount_msat }),
            PayoutLookup::Pending => Err(ApiError::Conflict("a refund of this key is in progress".into())),
            PayoutLookup::NotFound => Err(ApiError::BadRequest("nothing to refund: the balance is empty".into())),
        }
    }

    /// The change of an `X-Cashu` request: paid now, or (when another path already paid it, e.g.
    /// the background payer of stranded change) the token that was made for it.
    pub async fn xcashu_change(
        &self,
        key_hash: &str,
        token_hash: &str,
        request_id: Option<&str>,
    ) -> Result<Option<PaidOut>, ApiError> {
        if let Some(paid) = self.pay_out(key_hash, Some(token_hash), request_id).await? {
            return Ok(Some(paid));
        }
        match self.ledger.latest_payout(Some(key_hash), Some(token_hash)).await? {
            PayoutLookup::Ready { token, amount_msat } => Ok(Some(PaidOut { token, amount_msat })),
            PayoutLookup::Pending => Err(ApiError::Conflict("the change of this request is being made".into())),
            PayoutLookup::NotFound => Ok(None),
        }
    }

    /// `/v1/balance/refund` with `X-Cashu: <original token>`: the change of that request.
    pub async fn recover_change(&self, token: &str) -> Result<PaidOut, ApiError> {
        let key_hash = xcashu_key_hash(token);
        let Some(info) = self.ledger.key_info(&key_hash).await? else {
            return Err(ApiError::NotFoundResource("no request was paid with this token here".into()));
        };
        if info.reserved_msat > 0 {
            return Err(ApiError::Conflict("the request paid with this token is still running".into()));
        }
        self.xcashu_change(&key_hash, &token_hash(token), None)
            .await?
            .ok_or_else(|| ApiError::NotFoundResource("this request left no change".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn key_hashes_keep_their_stored_form() {
        // Lowercase hex of SHA-256, as every ledger already holds them.
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(hash_api_key(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(prefixed_hex("req-", &[0x00, 0xab, 0xff]), "req-00abff");
        assert_eq!(prefixed_hex("", &[]), "");
    }

    #[test]
    fn reads_credentials() {
        let mut h = HeaderMap::new();
        assert_eq!(credential(&h).unwrap(), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer sk-abc"));
        assert_eq!(credential(&h).unwrap(), Some(Credential::ApiKey("sk-abc")));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer cashuBxyz"));
        assert_eq!(credential(&h).unwrap(), Some(Credential::BearerToken("cashuBxyz")));
        h.insert(X_CASHU, HeaderValue::from_static("cashuAq"));
        assert_eq!(credential(&h).unwrap(), Some(Credential::XCashu("cashuAq")));
        h.insert(X_CASHU, HeaderValue::from_static("garbage"));
        assert!(credential(&h).is_err());
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic xyz"));
        assert!(matches!(credential(&h), Err(ApiError::InvalidKey)));
    }

    #[test]
    fn hashes_are_domain_separated() {
        let t = "cashuBabc";
        assert_ne!(token_hash(t), xcashu_key_hash(t));
        assert_ne!(token_hash(t), hash_api_key(t));
        assert_eq!(hash_api_key("sk-1").len(), 64);
    }
}
