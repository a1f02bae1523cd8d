//! The node's embedded Cashu wallet.
//!
//! One cdk [`Wallet`] per trusted mint and unit (`sat`, plus `msat` for mints that offer it),
//! all persisted in a single cdk-sqlite database file. Every mint gets its own wallet objects
//! and its own gate, so a slow or dead mint never holds up payments at another one.
//!
//! Money handled here is always reported in **msat** (see PROTOCOL.md: all internal money is
//! integer msat): a `sat` amount is multiplied by 1000, an `msat` amount is taken as is.
//!
//! Why the extra bookkeeping around cdk's own sagas:
//! - cdk 0.18 treats a mint's "already spent" (11001) / "pending" (11002) answer to a swap as
//!   *ambiguous* and leaves the receive saga, its pending proofs and a `Pending` incoming
//!   transaction behind. Left alone, the next saga recovery finds the inputs spent, cannot
//!   restore any outputs, and marks that transaction `Completed` — a double-spend attempt would
//!   then look like a payment we received. Those answers are definitive rejections of *our*
//!   swap (the mint signs nothing), so [`WalletService::receive`] rolls that saga back itself.
//! - Recovering sagas while other operations of the same mint are in flight would let recovery
//!   replay or compensate a live saga, so recovery takes the mint's gate exclusively and normal
//!   operations take it shared.
//! - Two concurrent redemptions of the same token would overwrite each other's proof
//!   reservations in cdk's store, so proofs being redeemed are tracked in-process and a second
//!   concurrent redemption is answered with [`WalletError::Pending`].

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cdk::cdk_database::{self, WalletDatabase};
use cdk::mint_url::MintUrl;
use cdk::nuts::nut00::token::TokenV3Token;
use cdk::nuts::nut00::ProofV3;
use cdk::nuts::nut02::ShortKeysetId;
use cdk::nuts::nut18::PaymentRequest;
use cdk::nuts::{CurrencyUnit, Proofs, PublicKey, State, Token, TokenV3};
use cdk::wallet::types::{ReceiveSagaState, TransactionDirection, TransactionId, TransactionStatus, WalletSagaState};
use cdk::wallet::{ReceiveOptions, SendOptions, Wallet, WalletBuilder};
use cdk::Amount;
use cdk_sqlite::WalletSqliteDatabase;

mod lightning;
pub use lightning::*;

/// Errors of the embedded wallet. `Display` texts are meant for API clients and logs; they
/// never contain token strings or secrets.
#[derive(Debug, thiserror::Error)]
pub enum WalletError {
    /// Garbage, bad base64/CBOR/JSON, no proofs, unsupported token version.
    #[error("invalid Cashu token: {0}")]
    InvalidToken(String),
    /// The token's mint is not one the operator trusts.
    #[error("token is from mint {mint}, which this node does not accept; accepted mints: {}", .accepted.join(", "))]
    UntrustedMint { mint: String, accepted: Vec<String> },
    /// Mint error 11001: the proofs were already spent.
    #[error("token already spent")]
    AlreadySpent,
    /// Mint error 11002 (or a concurrent redemption of the same token here).
    #[error("token proofs are pending (being spent right now); try again later")]
    Pending,
    #[error("unsupported unit: {0}")]
    UnsupportedUnit(String),
    /// Connection refused, timeout, 5xx from the mint.
    #[error("mint unavailable: {0}")]
    MintUnavailable(String),
    #[error("insufficient funds in the node wallet")]
    InsufficientFunds,
    /// A send whose token and fees would cost more than it may (`send_within`): nothing sent.
    #[error("{0}")]
    OverBudget(String),
    #[error("wallet error: {0}")]
    Other(String),
}

/// A token parsed without any I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToken {
    /// Normalised mint URL (as in [`WalletService::trusted_mints`]).
    pub mint_url: String,
    /// `sat` or `msat`.
    pub unit: String,
    pub value_msat: u64,
    /// Hex (compressed point) `Y = hash_to_curve(secret)` of each proof, for reconciliation.
    pub proof_ys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub mint_url: String,
    pub value_msat: u64,
    /// Input fee the mint charged for the swap.
    pub fee_msat: u64,
    /// `value_msat - fee_msat`: what actually landed in our wallet.
    pub credited_msat: u64,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Sent {
    pub token: String,
    pub mint_url: String,
    pub amount_msat: u64,
    /// What we paid on top of `amount_msat`: swap fee plus the redeem fee we pre-paid for the
    /// receiver.
    pub fee_msat: u64,
}

impl std::fmt::Debug for Sent {
    // The token is bearer money: keep it out of debug output / logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sent")
            .field("token", &"[REDACTED]")
            .field("mint_url", &self.mint_url)
            .field("amount_msat", &self.amount_msat)
            .field("fee_msat", &self.fee_msat)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintBalance {
    pub mint_url: String,
    pub unit: String,
    /// Spendable (unspent proofs).
    pub balance_msat: u64,
    /// In flight: proofs pending at the mint (e.g. a receive awaiting recovery) or reserved for
    /// a send being prepared. Tokens we already handed out (unclaimed change) are not counted.
    pub pending_msat: u64,
}

/// Tunables of [`WalletService`].
#[derive(Debug, Clone)]
pub struct WalletOptions {
    /// Upper bound for any single operation that talks to a mint. cdk's HTTP client has no
    /// timeout of its own, so without this a hung mint would hang the request.
    pub op_timeout: Duration,
    /// Target number of proofs of each denomination cdk keeps (cdk default 3).
    pub target_proof_count: usize,
    /// HTTP proxy for mint requests (TOR_OUTBOUND: the node's Tor proxy). Loopback mints stay
    /// direct.
    pub proxy: Option<String>,
}

impl Default for WalletOptions {
    fn default() -> Self {
        Self { op_timeout: Duration::from_secs(20), target_proof_count: 3, proxy: None }
    }
}

/// Wallets for one trusted mint.
/// The key, in a send's metadata (cdk keeps it with the send's transaction), of what the
/// send paid for.
const SEND_TAG: &str = "routstr";

/// How [`WalletService::send_as`] makes a token: its version, its tag, its most total cost.
#[derive(Default)]
struct SendSpec<'a> {
    v3: bool,
    tag: Option<&'a str>,
    budget_msat: Option<u64>,
}

struct MintEntry {
    url: MintUrl,
    sat: Wallet,
    /// Built eagerly (it costs no I/O); only useful if the mint has msat keysets.
    msat: Wallet,
    /// Shared by normal operations, exclusive for saga recovery (see module docs).
    gate: tokio::sync::RwLock<()>,
}

impl MintEntry {
    fn wallet(&self, unit: &CurrencyUnit) -> Option<&Wallet> {
        match unit {
            CurrencyUnit::Sat => Some(&self.sat),
            CurrencyUnit::Msat => Some(&self.msat),
            _ => None,
        }
    }

    fn wallets(&self) -> [&Wallet; 2] {
        [&self.sat, &self.msat]
    }
}

struct Inner {
    db: Arc<dyn WalletDatabase<cdk_database::Error> + Send + Sync>,
    /// Keyed by normalised URL string.
    mints: HashMap<String, Arc<MintEntry>>,
    /// Trusted mints in configuration order (normalised).
    order: Vec<String>,
    /// Ys of proofs currently being redeemed by this process.
    in_flight: Mutex<HashSet<String>>,
    opts: WalletOptions,
    /// For wallets at mints we do not trust, made on demand to melt tokens from them.
    seed: [u8; 64],
    foreign: Mutex<HashMap<String, Wallet>>,
}

/// The node's wallet. Cheap to clone.
#[derive(Clone)]
pub struct WalletService {
    inner: Arc<Inner>,
}

/// Removes the Ys of a redemption from the in-flight set when the redemption ends (also when
/// its future is dropped).
struct InFlightGuard<'a> {
    set: &'a Mutex<HashSet<String>>,
    ys: Vec<String>,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        let mut set = match self.set.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        for y in &self.ys {
            set.remove(y);
        }
    }
}

/// msat per unit of `unit`.
fn unit_factor(unit: &CurrencyUnit) -> Result<u64, WalletError> {
    match unit {
        CurrencyUnit::Sat => Ok(1000),
        CurrencyUnit::Msat => Ok(1),
        other => Err(WalletError::UnsupportedUnit(other.to_string())),
    }
}

fn to_msat(amount: Amount, unit: &CurrencyUnit) -> Result<u64, WalletError> {
    u64::from(amount)
        .checked_mul(unit_factor(unit)?)
        .ok_or_else(|| WalletError::Other("amount overflows u64 msat".into()))
}

/// Normalise a mint URL the way cdk does (lower-case scheme and host, no trailing slash), and
/// additionally drop a default port so `https://m:443/` and `https://m` are the same mint.
/// A mint client through `proxy`, unless the mint is on loopback.
fn proxied_client(
    url: &MintUrl,
    proxy: Option<&str>,
) -> Result<Option<Arc<dyn cdk::wallet::MintConnector + Send + Sync>>, WalletError> {
    let Some(proxy) = proxy else { return Ok(None) };
    let host = url.to_string().parse::<reqwest::Url>().ok().and_then(|u| u.host_str().map(str::to_owned));
    if matches!(host.as_deref(), Some("localhost" | "127.0.0.1" | "[::1]")) {
        return Ok(None);
    }
    let proxy = proxy.parse::<reqwest::Url>().map_err(|e| WalletError::Other(format!("proxy URL: {e}")))?;
    let client = cdk::wallet::HttpClient::with_proxy(url.clone(), proxy, None, false).map_err(map_cdk)?;
    Ok(Some(Arc::new(client)))
}

pub fn normalize_mint_url(url: &str) -> Result<MintUrl, WalletError> {
    let trimmed = url.trim();
    let parsed = MintUrl::from_str(trimmed).map_err(|_| WalletError::Other(format!("invalid mint URL: {trimmed}")))?;
    let s = parsed.to_string();
    let fixed = if let Some(rest) = s.strip_prefix("https://") {
        strip_port(rest, ":443").map(|r| format!("https://{r}"))
    } else if let Some(rest) = s.strip_prefix("http://") {
        strip_port(rest, ":80").map(|r| format!("http://{r}"))
    } else {
        None
    };
    match fixed {
        Some(f) => MintUrl::from_str(&f).map_err(|_| WalletError::Other(format!("invalid mint URL: {trimmed}"))),
        None => Ok(parsed),
    }
}

fn strip_port(rest: &str, port: &str) -> Option<String> {
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    host.strip_suffix(port).map(|h| format!("{h}{path}"))
}

/// Map a cdk error to ours. Kept in one place so the classification is consistent.
fn map_cdk(err: cdk::Error) -> WalletError {
    use cdk::Error as E;
    match err {
        E::TokenAlreadySpent => WalletError::AlreadySpent,
        E::TokenPending => WalletError::Pending,
        E::UnsupportedUnit | E::UnitMismatch | E::MultipleUnits => WalletError::UnsupportedUnit(err.to_string()),
        E::InsufficientFunds => WalletError::InsufficientFunds,
        E::Timeout | E::CouldNotGetMintInfo => WalletError::MintUnavailable(err.to_string()),
        E::HttpError(None, ref msg) => WalletError::MintUnavailable(format!("network error: {msg}")),
        E::HttpError(Some(status), ref msg) if status >= 500 || status == 429 => {
            WalletError::MintUnavailable(format!("HTTP {status}: {msg}"))
        }
        E::UnknownKeySet | E::KeysetUnknown(_) | E::NUT02(_) => {
            WalletError::InvalidToken(format!("unknown keyset: {err}"))
        }
        E::NUT00(_)
        | E::DuplicateInputs
        | E::MultiMintTokenNotSupported
        | E::DHKE(_)
        | E::TransactionUnbalanced(..)
        | E::NUT11(_)
        | E::NUT14(_) => WalletError::InvalidToken(err.to_string()),
        other => WalletError::Other(other.to_string()),
    }
}

/// Parses a token from a mint that is not trusted (to be moved to a trusted one). No I/O.
pub fn parse_foreign_token(token: &str) -> Result<ParsedToken, WalletError> {
    parse_any_token(token).map(|(parsed, _, _)| parsed)
}

/// Parses a `cashuA` / `cashuB` token from any mint (trusted or not); unit `sat` or `msat`. No I/O.
pub(crate) fn parse_any_token(token: &str) -> Result<(ParsedToken, Token, CurrencyUnit), WalletError> {
    let decoded = decode_token(token)?;
    if let Token::TokenV3(v3) = &decoded {
        if v3.is_multi_mint() {
            return Err(WalletError::InvalidToken("tokens spanning several mints are not supported".into()));
        }
    }
    let secrets = decoded.token_secrets();
    if secrets.is_empty() {
        return Err(WalletError::InvalidToken("token holds no proofs".into()));
    }
    let mint = decoded.mint_url().map_err(|e| WalletError::InvalidToken(format!("mint URL: {e}")))?;
    let mint = normalize_mint_url(&mint.to_string()).map_err(|_| WalletError::InvalidToken("bad mint URL".into()))?;
    let mint_key = mint.to_string();
    let unit = decoded.unit().unwrap_or(CurrencyUnit::Sat);
    let factor = match unit {
        CurrencyUnit::Sat | CurrencyUnit::Msat => unit_factor(&unit)?,
        ref other => return Err(WalletError::UnsupportedUnit(other.to_string())),
    };
    let value = decoded.value().map_err(|e| WalletError::InvalidToken(e.to_string()))?;
    let value_msat = u64::from(value)
        .checked_mul(factor)
        .ok_or_else(|| WalletError::InvalidToken("token value overflows".into()))?;
    if value_msat == 0 {
        return Err(WalletError::InvalidToken("token has zero value".into()));
    }
    let mut proof_ys = Vec::with_capacity(secrets.len());
    for s in secrets {
        let y = cdk::dhke::hash_to_curve(s.as_bytes())
            .map_err(|e| WalletError::InvalidToken(format!("proof secret: {e}")))?;
        proof_ys.push(y.to_hex());
    }
    Ok((ParsedToken { mint_url: mint_key, unit: unit.to_string(), value_msat, proof_ys }, decoded, unit))
}

fn decode_token(token: &str) -> Result<Token, WalletError> {
    let token = token.trim();
    let token = token.strip_prefix("cashu:").unwrap_or(token);
    if !(token.starts_with("cashuA") || token.starts_with("cashuB")) {
        return Err(WalletError::InvalidToken("expected a cashuA (v3) or cashuB (v4) token".into()));
    }
    Token::from_str(token).map_err(|e| WalletError::InvalidToken(e.to_string()))
}

/// Encode proofs as a v3 (`cashuA`) token carrying **full** keyset ids. cdk's own v3 encoding
/// (`Token::to_v3_string`) writes the truncated v4 short ids, which only wallets that can map
/// short ids back (cdk) understand; full ids are what the v3 spec and other wallets expect.
pub fn encode_token_v3(
    mint_url: &MintUrl,
    proofs: Proofs,
    unit: CurrencyUnit,
    memo: Option<String>,
) -> Result<String, WalletError> {
    if proofs.is_empty() {
        return Err(WalletError::Other("cannot encode a token without proofs".into()));
    }
    let mut v3_proofs = Vec::with_capacity(proofs.len());
    for p in proofs {
        let full_id = ShortKeysetId::from_bytes(&p.keyset_id.to_bytes())
            .map_err(|e| WalletError::Other(format!("keyset id: {e}")))?;
        let mut v3 = ProofV3::from(p);
        v3.keyset_id = full_id;
        v3_proofs.push(v3);
    }
    let token =
        TokenV3 { token: vec![TokenV3Token { mint: mint_url.clone(), proofs: v3_proofs }], memo, unit: Some(unit) };
    Ok(token.to_string())
}

impl WalletService {
    /// Opens (creates) the wallet DB at `db_path` and the seed file at `seed_path` (64 random
    /// bytes as hex, created on first start with 0600 permissions), one wallet per trusted
    /// mint. Does no network I/O: keysets are fetched lazily, so the node starts while a mint
    /// is down.
    pub async fn open(db_path: &Path, seed_path: &Path, trusted_mints: &[String]) -> Result<Self, WalletError> {
        Self::open_with_options(db_path, seed_path, trusted_mints, WalletOptions::default()).await
    }

    /// [`Self::open`] with explicit [`WalletOptions`].
    pub async fn open_with_options(
        db_path: &Path,
        seed_path: &Path,
        trusted_mints: &[String],
        opts: WalletOptions,
    ) -> Result<Self, WalletError> {
        let seed = load_or_create_seed(seed_path)?;

        if let Some(parent) = db_path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| WalletError::Other(format!("cannot create {}: {e}", parent.display())))?;
            }
        }
        let db_str = db_path
            .to_str()
            .ok_or_else(|| WalletError::Other(format!("wallet DB path is not UTF-8: {}", db_path.display())))?;
        let db = WalletSqliteDatabase::new(db_str)
            .await
            .map_err(|e| WalletError::Other(format!("cannot open wallet DB: {e}")))?;
        restrict_permissions(db_path);
        let db: Arc<dyn WalletDatabase<cdk_database::Error> + Send + Sync> = Arc::new(db);

        let mut mints = HashMap::new();
        let mut order = Vec::new();
        for raw in trusted_mints {
            let url = normalize_mint_url(raw)?;
            let key = url.to_string();
            if mints.contains_key(&key) {
                continue;
            }
            let mut sat = WalletBuilder::new()
                .mint_url(url.clone())
                .unit(CurrencyUnit::Sat)
                .localstore(db.clone())
                .seed(seed)
                .target_proof_count(opts.target_proof_count)
                // cdk paces requests (20 burst + 20/min) by default; a payment node would
                // queue behind that in seconds. The mint's own limits still apply.
                .without_rate_limiting();
            if let Some(client) = proxied_client(&url, opts.proxy.as_deref())? {
                sat = sat.shared_client(client);
            }
            let sat = sat.build().map_err(map_cdk)?;
            let msat = WalletBuilder::new()
                .mint_url(url.clone())
                .unit(CurrencyUnit::Msat)
                .localstore(db.clone())
                .seed(seed)
                .target_proof_count(opts.target_proof_count)
                .shared_client(sat.mint_connector())
                .metadata_cache(sat.metadata_cache.clone())
                .without_rate_limiting()
                .build()
                .map_err(map_cdk)?;
            mints.insert(key.clone(), Arc::new(MintEntry { url, sat, msat, gate: tokio::sync::RwLock::new(()) }));
            order.push(key);
        }

        Ok(Self {
            inner: Arc::new(Inner {
                db,
                mints,
                order,
                in_flight: Mutex::new(HashSet::new()),
                opts,
                seed,
                foreign: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Trusted mint URLs, normalised, in configuration order.
    pub fn trusted_mints(&self) -> Vec<String> {
        self.inner.order.clone()
    }

    fn entry(&self, mint_url: &str) -> Result<&Arc<MintEntry>, WalletError> {
        let url = normalize_mint_url(mint_url)?;
        self.inner
            .mints
            .get(&url.to_string())
            .ok_or_else(|| WalletError::UntrustedMint { mint: url.to_string(), accepted: self.trusted_mints() })
    }

    /// Parse a `cashuA` (v3) or `cashuB` (v4) token, check its mint is trusted and its unit is
    /// `sat` or `msat`. No I/O.
    pub fn parse_token(&self, token: &str) -> Result<ParsedToken, WalletError> {
        let (parsed, _, _) = self.parse_inner(token)?;
        Ok(parsed)
    }

    fn parse_inner(&self, token: &str) -> Result<(ParsedToken, Token, CurrencyUnit), WalletError> {
        let parsed = parse_any_token(token)?;
        if !self.inner.mints.contains_key(&parsed.0.mint_url) {
            return Err(WalletError::UntrustedMint { mint: parsed.0.mint_url, accepted: self.trusted_mints() });
        }
        Ok(parsed)
    }

    /// Whether `mint_url` is one of the trusted mints.
    pub fn is_trusted(&self, mint_url: &str) -> bool {
        normalize_mint_url(mint_url).is_ok_and(|u| self.inner.mints.contains_key(&u.to_string()))
    }

    fn claim_in_flight(&self, ys: &[String]) -> Result<InFlightGuard<'_>, WalletError> {
        let mut set = match self.inner.in_flight.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if ys.iter().any(|y| set.contains(y)) {
            return Err(WalletError::Pending);
        }
        for y in ys {
            set.insert(y.clone());
        }
        Ok(InFlightGuard { set: &self.inner.in_flight, ys: ys.to_vec() })
    }

    fn timed<'a, T, F>(&self, what: &'a str, fut: F) -> impl std::future::Future<Output = Result<T, WalletError>> + 'a
    where
        F: std::future::Future<Output = Result<T, cdk::Error>> + 'a,
    {
        // cdk's futures run to KBs; boxed here, every future awaiting one of ours (a paid
        // request's among them) stays small instead of carrying them inline.
        let fut = Box::pin(fut);
        let limit = self.inner.opts.op_timeout;
        async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(r) => r.map_err(map_cdk),
                Err(_) => Err(WalletError::MintUnavailable(format!("{what} timed out after {limit:?}"))),
            }
        }
    }

    /// Swap the token at its mint into our wallet, so nobody else can spend it. `fee_msat` is
    /// the input fee the mint charged; `credited_msat = value_msat - fee_msat`.
    ///
    /// If an earlier redemption of the same token was interrupted (mint unreachable mid-swap,
    /// timeout, crash), this first resolves it through cdk's saga recovery; if that shows the
    /// earlier swap went through, the token is reported as received now (the earlier call
    /// returned an error, so nothing was credited for it).
    pub async fn receive(&self, token: &str) -> Result<Received, WalletError> {
        let (parsed, decoded, unit) = self.parse_inner(token)?;
        let entry = self.entry(&parsed.mint_url)?.clone();
        let wallet = entry.wallet(&unit).ok_or_else(|| WalletError::UnsupportedUnit(unit.to_string()))?.clone();
        let _in_flight = self.claim_in_flight(&parsed.proof_ys)?;
        let ys = parse_ys(&parsed.proof_ys)?;

        // An earlier, unresolved redemption of these proofs?
        if self.stale_receive_saga(&ys).await?.is_some() {
            tracing::info!(mint = %entry.url, "resolving an interrupted earlier redemption of this token");
            self.recover_mint(&entry).await;
            if self.stale_receive_saga(&ys).await?.is_some() {
                return Err(WalletError::MintUnavailable(
                    "an earlier redemption of this token is still unresolved at the mint".into(),
                ));
            }
            if let Some(tx) = self.find_incoming(&entry, &ys).await? {
                if tx.status == TransactionStatus::Completed {
                    let credited_msat = to_msat(tx.amount, &tx.unit)?;
                    let fee_msat = to_msat(tx.fee, &tx.unit)?;
                    return Ok(Received {
                        mint_url: parsed.mint_url,
                        value_msat: credited_msat + fee_msat,
                        fee_msat,
                        credited_msat,
                    });
                }
            }
        }

        // cdk compares the token's mint URL with the wallet's exactly; if only our extra
        // normalisation (default port) made them equal, hand cdk the canonical URL.
        let token_for_cdk = match decoded.mint_url() {
            Ok(u) if u == entry.url => token.trim().trim_start_matches("cashu:").to_string(),
            _ => retarget_token(decoded, &entry.url)?,
        };

        let _gate = entry.gate.read().await;
        let result = self.timed("receive", wallet.receive(&token_for_cdk, ReceiveOptions::default())).await;
        match result {
            Ok(amount) => {
                let credited_msat = to_msat(amount, &unit)?;
                let fee_msat = parsed.value_msat.saturating_sub(credited_msat);
                Ok(Received { mint_url: parsed.mint_url, value_msat: parsed.value_msat, fee_msat, credited_msat })
            }
            Err(e @ (WalletError::AlreadySpent | WalletError::Pending)) => {
                // The mint definitively refused our swap; undo cdk's leftovers.
                if let Err(ce) = self.roll_back_rejected_receive(&wallet, &ys).await {
                    tracing::warn!(mint = %entry.url, error = %ce, "could not roll back a rejected receive; recovery will retry");
                }
                Err(e)
            }
            Err(WalletError::InvalidToken(m)) if m.starts_with("unknown keyset") => {
                if unit == CurrencyUnit::Msat {
                    Err(WalletError::UnsupportedUnit(format!("mint {} has no msat keyset", parsed.mint_url)))
                } else {
                    Err(WalletError::InvalidToken(m))
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The receive saga (if any) that currently holds any of `ys` as pending proofs.
    async fn stale_receive_saga(
        &self,
        ys: &[PublicKey],
    ) -> Result<Option<cdk::wallet::types::WalletSaga>, WalletError> {
        let infos = self
            .inner
            .db
            .get_proofs_by_ys(ys.to_vec())
            .await
            .map_err(|e| WalletError::Other(format!("wallet DB: {e}")))?;
        for info in infos {
            if info.state != State::Pending {
                continue;
            }
            if let Some(op) = info.used_by_operation {
                let saga =
                    self.inner.db.get_saga(&op).await.map_err(|e| WalletError::Other(format!("wallet DB: {e}")))?;
                if let Some(saga) = saga {
                    if matches!(saga.state, WalletSagaState::Receive(_)) {
                        return Ok(Some(saga));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Undo the receive saga cdk leaves behind when the mint answers our swap with 11001/11002:
    /// drop the pending input proofs, mark its transaction failed, delete the saga.
    async fn roll_back_rejected_receive(&self, wallet: &Wallet, ys: &[PublicKey]) -> Result<(), WalletError> {
        let db = &self.inner.db;
        let dberr = |e: cdk_database::Error| WalletError::Other(format!("wallet DB: {e}"));
        let Some(saga) = self.stale_receive_saga(ys).await? else {
            return Ok(()); // cdk already compensated (e.g. failure before the swap request)
        };
        if saga.mint_url != wallet.mint_url
            || !matches!(
                saga.state,
                WalletSagaState::Receive(ReceiveSagaState::SwapRequested)
                    | WalletSagaState::Receive(ReceiveSagaState::ProofsPending)
            )
        {
            return Ok(());
        }
        let held: Vec<PublicKey> =
            db.get_reserved_proofs(&saga.id).await.map_err(dberr)?.into_iter().map(|p| p.y).collect();
        if let Some(mut tx) = db.get_transaction(TransactionId::from_saga_id(saga.id)).await.map_err(dberr)? {
            if tx.status == TransactionStatus::Pending {
                tx.status = TransactionStatus::Failed;
                db.add_transaction(tx).await.map_err(dberr)?;
            }
        }
        db.update_proofs(vec![], held).await.map_err(dberr)?;
        db.delete_saga(&saga.id).await.map_err(dberr)?;
        Ok(())
    }

    /// The incoming transaction of this mint (any unit) whose input Ys include all of `ys`,
    /// preferring a completed one.
    async fn find_incoming(
        &self,
        entry: &MintEntry,
        ys: &[PublicKey],
    ) -> Result<Option<cdk::wallet::types::Transaction>, WalletError> {
        let mut best: Option<cdk::wallet::types::Transaction> = None;
        for w in entry.wallets() {
            let txs = self
                .inner
                .db
                .list_transactions(Some(entry.url.clone()), Some(TransactionDirection::Incoming), Some(w.unit.clone()))
                .await
                .map_err(|e| WalletError::Other(format!("wallet DB: {e}")))?;
            for tx in txs {
                let tx_ys: HashSet<&PublicKey> = tx.ys.iter().collect();
                if !ys.iter().all(|y| tx_ys.contains(y)) {
                    continue;
                }
                let better = match &best {
                    None => true,
                    Some(b) => rank(&tx.status) > rank(&b.status),
                };
                if better {
                    best = Some(tx);
                }
            }
        }
        Ok(best)
    }

    /// Make a token of `amount_msat` from our proofs at `mint_url`, in v4 (`cashuB`) form.
    pub async fn send(&self, mint_url: &str, amount_msat: u64) -> Result<Sent, WalletError> {
        self.send_as(mint_url, amount_msat, SendSpec::default()).await
    }

    /// [`Self::send`] for what `tag` names in the ledger (`payout:<id>`, `remote:<id>`), kept with
    /// the send in the wallet: if the ledger later records it as failed (its token never left the
    /// node: the process died before the token was kept), [`Self::revoke_abandoned_sends`] takes
    /// the proofs back.
    pub async fn send_tagged(&self, mint_url: &str, amount_msat: u64, tag: &str) -> Result<Sent, WalletError> {
        self.send_as(mint_url, amount_msat, SendSpec { tag: Some(tag), ..SendSpec::default() }).await
    }

    /// [`Self::send`] only if the token and its fees come to at most `budget_msat` (the
    /// operator's earnings): otherwise nothing is sent.
    pub async fn send_within(&self, mint_url: &str, amount_msat: u64, budget_msat: u64) -> Result<Sent, WalletError> {
        self.send_as(mint_url, amount_msat, SendSpec { budget_msat: Some(budget_msat), ..SendSpec::default() }).await
    }

    /// Takes back the proofs of sends whose tag is in `abandoned` (see [`Self::send_tagged`]) and
    /// whose token nobody has claimed. Returns the msat that came back.
    pub async fn revoke_abandoned_sends(&self, abandoned: &HashSet<String>) -> Result<u64, WalletError> {
        let mut reclaimed = 0u64;
        for key in &self.inner.order {
            let Some(entry) = self.inner.mints.get(key) else {
                continue;
            };
            let _gate = entry.gate.read().await;
            for wallet in entry.wallets() {
                let pending = wallet.get_pending_sends().await.map_err(map_cdk)?;
                if pending.is_empty() {
                    continue;
                }
                let sends = wallet.list_transactions(Some(TransactionDirection::Outgoing)).await.map_err(map_cdk)?;
                for operation in pending {
                    let tag = sends
                        .iter()
                        .find(|t| t.saga_id == Some(operation))
                        .and_then(|t| t.metadata.get(SEND_TAG))
                        .filter(|tag| abandoned.contains(*tag));
                    let Some(tag) = tag else { continue };
                    // One send that cannot be taken back now does not hold up the others.
                    let revoked = async {
                        if self.timed("send status", wallet.check_send_status(operation)).await? {
                            return Ok(0);
                        }
                        let back = self.timed("revoke", wallet.revoke_send(operation)).await?;
                        to_msat(back, &wallet.unit)
                    };
                    match revoked.await {
                        Ok(0) => {}
                        Ok(back_msat) => {
                            tracing::info!(%tag, msat = back_msat, "took back the proofs of a token that never left the node");
                            reclaimed = reclaimed.saturating_add(back_msat);
                        }
                        Err(e) => {
                            tracing::warn!(%tag, error = %e, "a token that never left the node is not taken back yet")
                        }
                    }
                }
            }
        }
        Ok(reclaimed)
    }

    /// [`Self::send`], with `v3 = true` producing a `cashuA` token (full keyset ids).
    ///
    /// The redeem fee the receiver's swap will cost is included in the token
    /// (`SendOptions::include_fee`), so the receiver ends up with the full `amount_msat`; it is
    /// reported in `fee_msat` together with any swap fee we paid to make exact change.
    pub async fn send_with_version(&self, mint_url: &str, amount_msat: u64, v3: bool) -> Result<Sent, WalletError> {
        self.send_as(mint_url, amount_msat, SendSpec { v3, ..SendSpec::default() }).await
    }

    async fn send_as(&self, mint_url: &str, amount_msat: u64, spec: SendSpec<'_>) -> Result<Sent, WalletError> {
        let SendSpec { v3, tag, budget_msat } = spec;
        let entry = self.entry(mint_url)?.clone();
        if amount_msat == 0 {
            return Err(WalletError::Other("cannot send a zero amount".into()));
        }
        let (wallet, amount) = if amount_msat.is_multiple_of(1000) {
            (&entry.sat, amount_msat / 1000)
        } else {
            let msat_balance = u64::from(entry.msat.total_balance().await.map_err(map_cdk)?);
            if msat_balance < amount_msat {
                return Err(WalletError::UnsupportedUnit(format!(
                    "{amount_msat} msat is not a whole number of sats and there is no msat balance at {}",
                    entry.url
                )));
            }
            (&entry.msat, amount_msat)
        };
        let unit = wallet.unit.clone();
        let metadata = tag.map(|t| HashMap::from([(SEND_TAG.to_owned(), t.to_owned())])).unwrap_or_default();
        let opts = SendOptions { include_fee: true, metadata, ..Default::default() };

        let _gate = entry.gate.read().await;
        let factor = unit_factor(&unit)?;
        let (token, fee) = self
            .timed("send", async {
                let prepared = wallet.prepare_send(Amount::from(amount), opts).await?;
                let fee = prepared.fee();
                let total_msat = amount.saturating_add(u64::from(fee)).saturating_mul(factor);
                if budget_msat.is_some_and(|budget| total_msat > budget) {
                    prepared.cancel().await?;
                    return Ok(None);
                }
                let token = prepared.confirm(None).await?;
                Ok(Some((token, fee)))
            })
            .await?
            .ok_or_else(|| {
                WalletError::OverBudget(format!(
                    "refused: {amount_msat} msat and the mint's fee come to more than the {} msat allowed",
                    budget_msat.unwrap_or_default()
                ))
            })?;
        let token = if v3 {
            let infos = self
                .inner
                .db
                .get_mint_keysets(entry.url.clone())
                .await
                .map_err(|e| WalletError::Other(format!("wallet DB: {e}")))?
                .unwrap_or_default();
            let proofs = token.proofs(&infos).map_err(|e| WalletError::Other(e.to_string()))?;
            encode_token_v3(&entry.url, proofs, unit.clone(), None)?
        } else {
            token.to_string()
        };
        Ok(Sent { token, mint_url: entry.url.to_string(), amount_msat, fee_msat: to_msat(fee, &unit)? })
    }

    /// Balances per trusted mint: always a `sat` line, an `msat` line only when non-zero.
    /// Reads the local DB only.
    pub async fn balances(&self) -> Result<Vec<MintBalance>, WalletError> {
        let mut out = Vec::new();
        for key in &self.inner.order {
            let Some(entry) = self.inner.mints.get(key) else {
                continue;
            };
            for w in entry.wallets() {
                let proofs = self
                    .inner
                    .db
                    .get_proofs(
                        Some(entry.url.clone()),
                        Some(w.unit.clone()),
                        Some(vec![State::Unspent, State::Pending, State::Reserved]),
                        None,
                    )
                    .await
                    .map_err(|e| WalletError::Other(format!("wallet DB: {e}")))?;
                let mut balance = 0u64;
                let mut pending = 0u64;
                for p in proofs {
                    let v = u64::from(p.proof.amount);
                    match p.state {
                        State::Unspent => balance = balance.saturating_add(v),
                        _ => pending = pending.saturating_add(v),
                    }
                }
                if w.unit == CurrencyUnit::Msat && balance == 0 && pending == 0 {
                    continue;
                }
                let f = unit_factor(&w.unit)?;
                out.push(MintBalance {
                    mint_url: key.clone(),
                    unit: w.unit.to_string(),
                    balance_msat: balance.saturating_mul(f),
                    pending_msat: pending.saturating_mul(f),
                });
            }
        }
        Ok(out)
    }

    /// Startup recovery, per mint: finish or roll back interrupted cdk sagas
    /// (`Wallet::recover_incomplete_sagas`) and settle orphaned pending proofs with the mint.
    /// Failures are logged per mint and never fatal: a mint that is down is retried next time.
    pub async fn recover(&self) -> Result<(), WalletError> {
        for key in &self.inner.order {
            if let Some(entry) = self.inner.mints.get(key) {
                self.recover_mint(entry).await;
            }
        }
        Ok(())
    }

    async fn recover_mint(&self, entry: &MintEntry) {
        // cdk's futures are boxed (as in `timed`), so those awaiting this one stay small.
        let _gate = entry.gate.write().await;
        for w in entry.wallets() {
            match tokio::time::timeout(self.inner.opts.op_timeout, Box::pin(w.recover_incomplete_sagas())).await {
                Ok(Ok(report)) if !report.is_empty() => tracing::info!(
                    mint = %entry.url, unit = %w.unit,
                    recovered = report.recovered, compensated = report.compensated,
                    skipped = report.skipped, failed = report.failed,
                    "wallet saga recovery"
                ),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(mint = %entry.url, unit = %w.unit, error = %e, "wallet saga recovery failed")
                }
                Err(_) => {
                    tracing::warn!(mint = %entry.url, unit = %w.unit, "wallet saga recovery timed out")
                }
            }
            match tokio::time::timeout(self.inner.opts.op_timeout, Box::pin(w.check_all_pending_proofs())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(mint = %entry.url, unit = %w.unit, error = %e, "pending proof check failed")
                }
                Err(_) => {
                    tracing::warn!(mint = %entry.url, unit = %w.unit, "pending proof check timed out")
                }
            }
        }
    }

    /// Crash reconciliation: did our wallet receive the proofs with these Ys (from
    /// [`ParsedToken::proof_ys`])?
    ///
    /// cdk's receive saga records an `Incoming` transaction holding the Ys of the *input*
    /// proofs, written `Pending` before the swap request and `Completed` once the new proofs
    /// are stored. So: first let saga recovery resolve any receive still holding these proofs
    /// (it replays the swap or restores our outputs from the mint), then look the Ys up.
    /// - `Ok(Some(credited_msat))`: a completed incoming transaction has them.
    /// - `Ok(None)`: we did not receive them (never swapped, or our swap was refused / rolled
    ///   back; the token may or may not still be spendable elsewhere).
    /// - `Err(_)`: still unresolved (mint unreachable during recovery) — ask again later.
    ///
    /// Scans the mint's incoming transactions; meant for startup reconciliation, not hot paths.
    pub async fn received_by_us(&self, mint_url: &str, proof_ys: &[String]) -> Result<Option<u64>, WalletError> {
        let entry = self.entry(mint_url)?.clone();
        if proof_ys.is_empty() {
            return Err(WalletError::InvalidToken("no proof Ys given".into()));
        }
        let ys = parse_ys(proof_ys)?;
        if self.stale_receive_saga(&ys).await?.is_some() {
            self.recover_mint(&entry).await;
            if self.stale_receive_saga(&ys).await?.is_some() {
                return Err(WalletError::MintUnavailable(
                    "receive of these proofs is still unresolved (mint unreachable?)".into(),
                ));
            }
        }
        match self.find_incoming(&entry, &ys).await? {
            Some(tx) if tx.status == TransactionStatus::Completed => Ok(Some(to_msat(tx.amount, &tx.unit)?)),
            Some(tx) if tx.status == TransactionStatus::Pending => {
                Err(WalletError::Other("receive transaction still pending".into()))
            }
            _ => Ok(None),
        }
    }

    /// NUT-18 payment request (`creqA…`) for `amount_sat` sat at any of our trusted mints, for
    /// the `X-Cashu` header of NUT-24 402 responses. No transport: the payment is delivered
    /// in-band by retrying the HTTP request with the token.
    pub fn payment_request(&self, amount_sat: u64) -> String {
        let mints: Vec<MintUrl> =
            self.inner.order.iter().filter_map(|k| self.inner.mints.get(k).map(|e| e.url.clone())).collect();
        PaymentRequest::builder()
            .amount(Amount::from(amount_sat))
            .unit(CurrencyUnit::Sat)
            .mints(mints)
            .build()
            .to_string()
    }

    /// Database handle, for callers that need cdk's store directly (tests, diagnostics).
    pub fn database(&self) -> Arc<dyn WalletDatabase<cdk_database::Error> + Send + Sync> {
        self.inner.db.clone()
    }

    /// The cdk wallet for `mint_url` and `unit` ("sat" / "msat").
    pub fn cdk_wallet(&self, mint_url: &str, unit: &str) -> Result<Wallet, WalletError> {
        let entry = self.entry(mint_url)?;
        let unit = CurrencyUnit::from_str(unit).map_err(|_| WalletError::UnsupportedUnit(unit.to_string()))?;
        entry.wallet(&unit).cloned().ok_or_else(|| WalletError::UnsupportedUnit(unit.to_string()))
    }
}

fn rank(s: &TransactionStatus) -> u8 {
    match s {
        TransactionStatus::Completed => 3,
        TransactionStatus::Pending => 2,
        _ => 1,
    }
}

fn parse_ys(ys: &[String]) -> Result<Vec<PublicKey>, WalletError> {
    ys.iter().map(|y| PublicKey::from_hex(y).map_err(|_| WalletError::InvalidToken("bad proof Y".into()))).collect()
}

/// Re-encode `token` with `mint` as its mint URL (same proofs, same version).
fn retarget_token(token: Token, mint: &MintUrl) -> Result<String, WalletError> {
    Ok(match token {
        Token::TokenV4(mut t) => {
            t.mint_url = mint.clone();
            t.to_string()
        }
        Token::TokenV3(mut t) => {
            for tt in &mut t.token {
                tt.mint = mint.clone();
            }
            t.to_string()
        }
    })
}

/// Keep the seed file private. Best effort on non-unix.
fn load_or_create_seed(path: &Path) -> Result<[u8; 64], WalletError> {
    let io = |e: std::io::Error| WalletError::Other(format!("seed file {}: {e}", path.display()));
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let bytes = hex::decode(s.trim())
                .map_err(|_| WalletError::Other(format!("seed file {} is not hex", path.display())))?;
            bytes.try_into().map_err(|_| WalletError::Other(format!("seed file {} must hold 64 bytes", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use rand::RngCore;
            use std::io::Write;
            if let Some(parent) = path.parent() {
                if !parent.as_os_str().is_empty() {
                    std::fs::create_dir_all(parent).map_err(io)?;
                }
            }
            let mut seed = [0u8; 64];
            rand::rng().fill_bytes(&mut seed);
            let mut oo = std::fs::OpenOptions::new();
            oo.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                oo.mode(0o600);
            }
            let mut f = oo.open(path).map_err(io)?;
            f.write_all(hex::encode(seed).as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok(seed)
        }
        Err(e) => Err(io(e)),
    }
}

/// The wallet DB holds bearer proofs: make it owner-only. Best effort.
fn restrict_permissions(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if path.exists() {
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}
