//! A real, in-process Cashu mint for the demo, the tests and the benchmark.
//!
//! It is cdk's own mint (`cdk::mint::Mint`) with cdk's fake Lightning backend
//! (`cdk-fake-wallet`: every invoice the mint issues pays itself at once), served over HTTP by
//! `cdk-axum` exactly like `cdk-mintd` serves it. Unit `sat`, keysets v2 (`01…` ids, so cashuB
//! tokens carry short keyset ids). Only loopback is used; nothing leaves the machine.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cdk::amount::SplitTarget;
use cdk::mint::{Mint, MintBuilder, MintMeltLimits};
use cdk::mint_url::MintUrl;
use cdk::nuts::{CurrencyUnit, MintQuoteState, PaymentMethod, Token};
use cdk::types::{FeeReserve, QuoteTTL};
use cdk::wallet::{ReceiveOptions, Wallet, WalletBuilder};
use cdk::Amount;
use cdk_fake_wallet::FakeWallet;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Error type of this module (no anyhow in the node).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone)]
pub struct TestMintConfig {
    /// Where to listen; `127.0.0.1:0` picks a free port.
    pub listen: SocketAddr,
    /// NUT-02 input fee, parts per thousand per input proof.
    pub input_fee_ppk: u64,
    /// `None`: in-memory mint DB. `Some(path)`: sqlite file, plus `<path>.seed` holding the
    /// mint's key seed so that keysets survive a restart of the process.
    pub db_path: Option<PathBuf>,
    /// Seconds before the fake backend pays an invoice (and takes to pay one). 0: at once.
    pub payment_delay_secs: u64,
    /// Lifetime of mint and melt quotes, seconds.
    pub quote_ttl_secs: u64,
}

impl Default for TestMintConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            input_fee_ppk: 0,
            db_path: None,
            payment_delay_secs: 0,
            quote_ttl_secs: 10_000,
        }
    }
}

struct Server {
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// A running test mint. Dropping it stops the HTTP server and the mint's background tasks.
pub struct TestMint {
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    addr: SocketAddr,
    mint: Arc<Mint>,
    router: axum::Router,
    server: Mutex<Option<Server>>,
}

impl std::fmt::Debug for TestMint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestMint").field("url", &self.url).finish()
    }
}

fn spawn_server(listener: TcpListener, router: axum::Router) -> Server {
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let res = axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
        if let Err(e) = res {
            tracing::warn!(error = %e, "test mint HTTP server ended with an error");
        }
    });
    Server { shutdown: tx, task }
}

fn load_or_create_mint_seed(path: &std::path::Path) -> Result<Vec<u8>, BoxError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(hex::decode(s.trim())?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let seed: [u8; 64] = rand::random();
            std::fs::write(path, hex::encode(seed))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            }
            Ok(seed.to_vec())
        }
        Err(e) => Err(e.into()),
    }
}

/// Start a mint (unit sat, fake Lightning) and serve it on `cfg.listen`.
pub async fn start_test_mint(cfg: TestMintConfig) -> Result<TestMint, BoxError> {
    let listener = TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}");

    let (db, seed) = match &cfg.db_path {
        None => {
            let seed: [u8; 64] = rand::random();
            (cdk_sqlite::mint::memory::empty().await?, seed.to_vec())
        }
        Some(path) => {
            if let Some(parent) = path.parent() {
                if !parent.as_os_str().is_empty() {
                    std::fs::create_dir_all(parent)?;
                }
            }
            let mut seed_path = path.clone().into_os_string();
            seed_path.push(".seed");
            let seed = load_or_create_mint_seed(std::path::Path::new(&seed_path))?;
            (cdk_sqlite::MintSqliteDatabase::new(path.clone()).await?, seed)
        }
    };
    let db = Arc::new(db);

    let mut builder = MintBuilder::new(db.clone());
    let fake = FakeWallet::new(
        FeeReserve { min_fee_reserve: 1.into(), percent_fee_reserve: 0.0 },
        HashMap::default(),
        HashSet::default(),
        cfg.payment_delay_secs, // 0: invoices pay themselves immediately
        CurrencyUnit::Sat,
    );
    builder
        .add_payment_processor(
            CurrencyUnit::Sat,
            PaymentMethod::BOLT11,
            MintMeltLimits::new(1, 100_000_000),
            Arc::new(fake),
        )
        .await?;
    if cfg.input_fee_ppk > 0 {
        builder.set_unit_fee(&CurrencyUnit::Sat, cfg.input_fee_ppk)?;
    }
    let builder = builder
        .with_name("routstr demo mint".to_string())
        .with_description("in-process cdk mint with a fake Lightning backend".to_string())
        .with_urls(vec![url.clone()]);

    let mint = builder.build_with_seed(db.clone(), &seed).await?;
    mint.set_quote_ttl(QuoteTTL::new(cfg.quote_ttl_secs, cfg.quote_ttl_secs)).await?;
    mint.start().await?;
    let mint = Arc::new(mint);

    // "bolt11" must be listed, or the router has no mint/melt quote routes.
    let router = cdk_axum::create_mint_router(mint.clone(), vec!["bolt11".to_string()]).await?;
    let server = spawn_server(listener, router.clone());

    Ok(TestMint { url, addr, mint, router, server: Mutex::new(Some(server)) })
}

impl TestMint {
    /// The socket address the mint listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The cdk mint itself (for tests that need to inspect it).
    pub fn mint(&self) -> Arc<Mint> {
        self.mint.clone()
    }

    /// Whether the HTTP server is currently running.
    pub fn is_running(&self) -> bool {
        self.server.lock().map(|s| s.is_some()).unwrap_or(false)
    }

    /// Stop serving HTTP (the mint's state is kept): clients now get "connection refused",
    /// as with a mint that went down. Open keep-alive connections are closed too.
    pub async fn stop(&self) {
        let server = match self.server.lock() {
            Ok(mut s) => s.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(server) = server {
            let _ = server.shutdown.send(());
            let mut task = server.task;
            if tokio::time::timeout(Duration::from_secs(5), &mut task).await.is_err() {
                task.abort();
            }
        }
    }

    /// Serve again on the same address after [`Self::stop`].
    pub async fn restart(&self) -> Result<(), BoxError> {
        if self.is_running() {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "rebinding test mint, retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let server = spawn_server(listener, self.router.clone());
        match self.server.lock() {
            Ok(mut s) => *s = Some(server),
            Err(p) => *p.into_inner() = Some(server),
        }
        Ok(())
    }

    /// Stop the HTTP server and the mint's background tasks.
    pub async fn shutdown(self) {
        self.stop().await;
        if let Err(e) = self.mint.stop().await {
            tracing::debug!(error = %e, "stopping test mint");
        }
    }
}

impl Drop for TestMint {
    fn drop(&mut self) {
        let server = match self.server.lock() {
            Ok(mut s) => s.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(server) = server {
            let _ = server.shutdown.send(());
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let mint = self.mint.clone();
            handle.spawn(async move {
                let _ = mint.stop().await;
            });
        }
    }
}

/// A throwaway wallet (in-memory DB, random seed, no client-side rate limiting).
async fn throwaway_wallet(mint_url: &str) -> Result<Wallet, BoxError> {
    let db = Arc::new(cdk_sqlite::wallet::memory::empty().await?);
    let seed: [u8; 64] = rand::random();
    Ok(WalletBuilder::new()
        .mint_url(MintUrl::from_str(mint_url)?)
        .unit(CurrencyUnit::Sat)
        .localstore(db)
        .seed(seed)
        .without_rate_limiting()
        .build()?)
}

/// Mint `amount_sat` at `mint_url` (the fake backend pays the invoice) and return the proofs
/// as a token: `cashuA` (v3, full keyset ids) if `v3`, else `cashuB` (v4).
pub async fn mint_token(mint_url: &str, amount_sat: u64, v3: bool) -> Result<String, BoxError> {
    let wallet = throwaway_wallet(mint_url).await?;
    let quote = wallet.mint_quote(PaymentMethod::BOLT11, Some(Amount::from(amount_sat)), None, None).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let q = wallet.check_mint_quote_status(&quote.id).await?;
        if matches!(q.state, MintQuoteState::Paid | MintQuoteState::Issued) {
            break;
        }
        if Instant::now() > deadline {
            return Err("mint quote was not paid within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let proofs = wallet.mint(&quote.id, SplitTarget::default(), None).await?;
    if v3 {
        Ok(crate::wallet::encode_token_v3(&wallet.mint_url, proofs, CurrencyUnit::Sat, None)?)
    } else {
        Ok(Token::new(wallet.mint_url.clone(), proofs, None, CurrencyUnit::Sat).to_string())
    }
}

/// Redeem `token` into a throwaway wallet at `mint_url`; returns the sats received (after the
/// mint's input fee). Proves that a token we handed out is real and unspent.
pub async fn redeem_token(mint_url: &str, token: &str) -> Result<u64, BoxError> {
    let wallet = throwaway_wallet(mint_url).await?;
    let amount = wallet.receive(token.trim(), ReceiveOptions::default()).await?;
    Ok(u64::from(amount))
}

/// Invoices of the mint at `mint_url` (its NUT-04 quotes, which the fake backend pays at once),
/// as a Lightning wallet there would hand them out: the invoice source of a test LNURL server.
pub fn mint_invoice_source(mint_url: String) -> crate::demo::lnurl_server::InvoiceSource {
    invoice_source(mint_url, None)
}

/// Like [`mint_invoice_source`], but a mint with the fake backend that is asked to pay these
/// invoices leaves the payment pending forever (a stuck HTLC, as with a hold invoice).
pub fn pending_invoice_source(mint_url: String) -> crate::demo::lnurl_server::InvoiceSource {
    let stuck = cdk_fake_wallet::FakeInvoiceDescription {
        pay_invoice_state: cdk::nuts::MeltQuoteState::Pending,
        check_payment_state: cdk::nuts::MeltQuoteState::Pending,
        pay_err: false,
        check_err: false,
    };
    invoice_source(mint_url, serde_json::to_string(&stuck).ok())
}

fn invoice_source(mint_url: String, description: Option<String>) -> crate::demo::lnurl_server::InvoiceSource {
    Arc::new(move |amount_msat: u64| {
        let (mint_url, description) = (mint_url.clone(), description.clone());
        Box::pin(async move {
            if amount_msat == 0 || !amount_msat.is_multiple_of(1000) {
                return Err(format!("{amount_msat} msat is not a whole number of sats"));
            }
            let wallet = throwaway_wallet(&mint_url).await.map_err(|e| e.to_string())?;
            let quote = wallet
                .mint_quote(PaymentMethod::BOLT11, Some(Amount::from(amount_msat / 1000)), description, None)
                .await
                .map_err(|e| e.to_string())?;
            Ok(quote.request)
        })
    })
}
