//! The node: its parts wired together, started, and stopped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use crate::catalog::{self, Catalog, PricePolicy};
use crate::config::Settings;
use crate::error::ApiError;
use crate::ledger::{Ledger, LedgerError};
use crate::payment::Payments;
use crate::pricing::{BtcRate, Markup, MsatPrices};
use crate::rates::RateFeed;
use crate::upstream::{self, Upstream, UpstreamConfigError, UpstreamSpec};
use crate::wallet::{WalletError, WalletOptions, WalletService};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Upstream(#[from] UpstreamConfigError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Wallet(#[from] WalletError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Paid requests whose settlement is still running; shutdown waits for them, so every
/// reservation is settled or released before the process exits.
#[derive(Default)]
pub struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

pub struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    pub fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.clone())
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until no request is in flight, or `deadline` passed. True when idle.
    pub async fn wait_idle(&self, deadline: Duration) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let notified = self.idle.notified();
            if self.count() == 0 {
                return true;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return self.count() == 0;
            }
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Everything a request handler needs.
pub struct Node {
    pub inflight: Arc<InFlight>,
    pub rate_limiter: crate::ratelimit::RateLimiter,
    /// `MAX_CONNECTIONS` client connections, clearnet and onion together.
    pub connection_slots: Arc<tokio::sync::Semaphore>,
    /// Set when shutdown gives up waiting: running streams end and settle.
    stopping: watch::Sender<bool>,
    pub settings: Settings,
    pub payments: Payments,
    /// The enabled upstreams as configured (environment + admin layer); requests use the
    /// catalog's snapshot ([`Node::upstreams`]), swapped with the routes at each refresh.
    configured: RwLock<Arc<Vec<Arc<Upstream>>>>,
    /// Environment upstreams, the admin layer over them, and admin price overrides.
    pub layers: std::sync::Mutex<crate::layers::Layers>,
    /// EXCHANGE_FEE, applied on top of every upstream's markup.
    exchange: Markup,
    /// One catalog refresh at a time, so a slow one cannot overwrite a newer one.
    refresh_lock: tokio::sync::Mutex<()>,
    pub policy: PricePolicy,
    pub rates: RateFeed,
    pub client: reqwest::Client,
    /// Model requests to upstreams and providers (plain HTTP without reqwest's layer).
    pub upstream_client: crate::proxy::client::UpstreamClient,
    catalog: RwLock<Arc<Catalog>>,
    /// Tor (onion service status, arti client), with ONION_SERVICE or TOR_OUTBOUND.
    pub tor: Option<Arc<crate::tor::Tor>>,
    /// The node's Nostr identity, announcement and discovery.
    pub nostr: Arc<crate::nostr::Nostr>,
    /// Routing to discovered providers: which ones failed recently.
    pub router: crate::proxy::remote::Router,
    /// The operator's dashboard, admin API and metrics.
    pub admin: crate::admin::Admin,
}

impl Node {
    pub fn ledger(&self) -> &Ledger {
        &self.payments.ledger
    }

    pub fn wallet(&self) -> &WalletService {
        &self.payments.wallet
    }

    /// Becomes true when running streams must end (shutdown deadline).
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.read().map(|c| c.clone()).unwrap_or_default()
    }

    /// The upstreams requests go to, consistent with the catalog's routes.
    pub fn upstreams(&self) -> Arc<Vec<Arc<Upstream>>> {
        self.catalog().upstreams().clone()
    }

    /// Changes the admin layer with `edit`, validates and saves it, swaps the upstreams and
    /// rebuilds the catalog. On any error nothing changes.
    pub async fn edit_layers<T>(
        &self,
        edit: impl FnOnce(&mut crate::layers::Layers) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let out = {
            let mut layers = self.layers.lock().map_err(|_| ApiError::Internal("layers lock".into()))?;
            let (admin, prices) = (layers.admin.clone(), layers.prices.clone());
            let result = edit(&mut layers).and_then(|t| {
                let built = layers.build(self.exchange).map_err(|e| ApiError::BadRequest(e.to_string()))?;
                layers.save().map_err(ApiError::Internal)?;
                Ok((t, built))
            });
            match result {
                Ok((t, built)) => {
                    if let Ok(mut c) = self.configured.write() {
                        *c = Arc::new(built);
                    }
                    t
                }
                Err(e) => {
                    layers.admin = admin;
                    layers.prices = prices;
                    return Err(e);
                }
            }
        };
        if let Err(e) = self.refresh_catalog().await {
            tracing::warn!(error = %e, "model refresh after an admin edit failed");
        }
        Ok(out)
    }

    /// Opens the ledger and wallet, loads upstreams and models. Does not listen yet.
    pub async fn build(settings: Settings) -> Result<Arc<Node>, NodeError> {
        std::fs::create_dir_all(&settings.data_dir)?;
        let ledger = Ledger::open(&settings.ledger_path(), settings.ledger_sync)?;
        let released = ledger.release_interrupted_reservations().await?;
        if released > 0 {
            tracing::warn!(released, "released reservations left open by the previous run");
        }
        let tor = match settings.onion_service || settings.tor_outbound {
            true => Some(crate::tor::Tor::start(&settings).await.map_err(NodeError::Config)?),
            false => None,
        };
        let wallet = WalletService::open_with_options(
            &settings.data_dir.join("wallet.sqlite"),
            &settings.data_dir.join("wallet.seed"),
            &settings.cashu_mints,
            WalletOptions {
                op_timeout: Duration::from_secs(settings.mint_timeout_seconds),
                proxy: tor.as_ref().and_then(|t| t.outbound_proxy_url()),
                ..WalletOptions::default()
            },
        )
        .await?;
        let secret = Payments::load_or_create_secret(&settings.data_dir.join("key-secret"))?;
        let lnurl = crate::lightning::lnurl_client(&settings, tor.as_ref().and_then(|t| t.outbound_proxy_url()))
            .map_err(NodeError::Config)?;
        let payments =
            Payments::new(ledger, wallet, secret, crate::lightning::LightningOptions::from_settings(&settings), lnurl);
        let failed = payments.fail_interrupted_payouts().await.map_err(|e| NodeError::Config(e.to_string()))?;
        if failed > 0 {
            tracing::warn!(failed, "payouts cut short by the previous run returned to their keys");
        }
        let interrupted = payments.ledger.recover_interrupted_remote_spends().await?;
        if interrupted > 0 {
            tracing::warn!(
                interrupted,
                "remote payments cut short by the previous run: their change will be recovered"
            );
        }

        let exchange = Markup::from_factor(settings.exchange_fee)
            .ok_or_else(|| NodeError::Config("EXCHANGE_FEE must be between 1.0 and 100".into()))?;
        let layers = crate::layers::Layers::load(&settings.data_dir, env_upstreams(&settings)?)
            .map_err(|e| NodeError::Config(format!("admin layer: {e}")))?;
        let upstreams = layers.build(exchange)?;
        layers.log();
        if upstreams.is_empty() {
            tracing::warn!(
                "no upstream configured (UPSTREAM_BASE_URL or UPSTREAMS_PATH): model requests are bought from providers discovered on Nostr (REMOTE_ROUTING), or fail"
            );
        }
        let client = crate::tor::route(reqwest::Client::builder(), tor.as_ref())
            .map_err(NodeError::Config)?
            .connect_timeout(settings.connect_timeout())
            .read_timeout(settings.idle_timeout())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| NodeError::Config(format!("HTTP client: {e}")))?;

        let upstream_client = crate::proxy::client::UpstreamClient::new(
            client.clone(),
            settings.connect_timeout(),
            settings.idle_timeout(),
            tor.clone(),
        );

        let rates = match settings.btc_usd_price {
            Some(usd) => RateFeed::fixed(
                BtcRate::from_usd(usd)
                    .ok_or_else(|| NodeError::Config(format!("BTC_USD_PRICE {usd} is not a price")))?,
            ),
            None => RateFeed::default(),
        };
        let policy = PricePolicy {
            fixed_only: settings.fixed_pricing,
            fixed: MsatPrices::fixed(
                settings.fixed_cost_per_request,
                settings.fixed_per_1k_input_tokens,
                settings.fixed_per_1k_output_tokens,
            ),
            default_max_completion_tokens: settings.default_max_completion_tokens,
        };
        let nostr = Arc::new(crate::nostr::Nostr::new(&settings, tor.as_ref()).map_err(NodeError::Config)?);
        let admin = crate::admin::Admin::open(&settings).map_err(NodeError::Config)?;
        let node = Arc::new(Node {
            inflight: Arc::default(),
            rate_limiter: crate::ratelimit::RateLimiter::new(settings.rate_limit_per_minute),
            connection_slots: Arc::new(tokio::sync::Semaphore::new(settings.max_connections.max(1))),
            stopping: watch::channel(false).0,
            settings,
            payments,
            configured: RwLock::new(Arc::new(upstreams)),
            layers: std::sync::Mutex::new(layers),
            exchange,
            refresh_lock: tokio::sync::Mutex::new(()),
            policy,
            rates,
            upstream_client,
            client,
            catalog: RwLock::new(Arc::new(Catalog::default())),
            tor,
            nostr,
            router: Default::default(),
            admin,
        });
        node.refresh_catalog().await?;
        Ok(node)
    }

    /// Reloads models and prices from the models file and every upstream.
    pub async fn refresh_catalog(&self) -> Result<(), NodeError> {
        let _one_at_a_time = self.refresh_lock.lock().await;
        let upstreams = self.configured.read().map(|u| u.clone()).unwrap_or_default();
        let file_models = match &self.settings.models_path {
            Some(path) => catalog::load_models_file(path).map_err(NodeError::Config)?,
            None => Vec::new(),
        };
        let listings =
            futures_util::future::join_all(upstreams.iter().map(|u| catalog::fetch_listing(&self.client, u))).await;
        let mut built = Catalog::build(&upstreams, &listings, &file_models);
        if let Ok(layers) = self.layers.lock() {
            built.apply_prices(&layers.prices);
        }
        let built = built.with_upstreams(upstreams);
        tracing::info!(models = built.len(), "model catalog loaded");
        if let Ok(mut c) = self.catalog.write() {
            *c = Arc::new(built);
        }
        Ok(())
    }

    /// Background duties: BTC/USD, model refresh, settling what a crash or a silent mint left.
    fn spawn_background(self: &Arc<Self>) {
        crate::nostr::Nostr::spawn(self);
        if self.settings.btc_usd_price.is_none() {
            self.rates.spawn_refresh(
                self.client.clone(),
                Duration::from_secs(self.settings.btc_price_refresh_seconds.max(10)),
            );
        }
        let node = self.clone();
        tokio::spawn(async move {
            let every = Duration::from_secs(node.settings.models_refresh_seconds.max(10));
            loop {
                // Retry soon while the catalog is empty (an upstream that was down at start).
                let wait = if node.catalog().is_empty() { Duration::from_secs(30).min(every) } else { every };
                tokio::time::sleep(wait).await;
                if let Err(e) = node.refresh_catalog().await {
                    tracing::warn!(error = %e, "model refresh failed");
                }
            }
        });
        let node = self.clone();
        tokio::spawn(async move {
            if let Err(e) = node.wallet().recover().await {
                tracing::warn!(error = %e, "wallet recovery at start failed");
            }
            loop {
                if let Err(e) = node.payments.reconcile_pending().await {
                    tracing::warn!(error = %e, "reconciliation failed");
                }
                if let Err(e) = node.payments.revoke_abandoned_sends().await {
                    tracing::warn!(error = %e, "taking back tokens that never left the node failed; will retry");
                }
                node.pay_stranded_change().await;
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        });
        // Lightning: invoices paid, melts in flight, keys past their expiry, operator payouts.
        if self.settings.lightning {
            let node = self.clone();
            tokio::spawn(async move {
                let every = node.payments.lightning.watch_interval;
                for pass in 0u64.. {
                    node.payments.lightning_tick(pass).await;
                    tokio::time::sleep(every).await;
                }
            });
            if self.settings.receive_ln_address.is_some() {
                let node = self.clone();
                tokio::spawn(async move {
                    let every = node.payments.lightning.payout_interval;
                    loop {
                        tokio::time::sleep(every).await;
                        let _earnings = node.admin.earnings_lock.lock().await;
                        match node.payments.pay_operator().await {
                            Ok(Some(p)) => {
                                tracing::info!(state = %p.state, amount_msat = p.amount_msat, "operator payout")
                            }
                            Ok(None) => {}
                            Err(e) => tracing::warn!(error = %e, "operator payout failed; retried next interval"),
                        }
                    }
                });
            }
        }
        // Records past the retention period: at start, then hourly.
        if let Some(retention) = self.settings.ledger_retention() {
            let node = self.clone();
            tokio::spawn(async move {
                loop {
                    match node.ledger().prune_records(retention).await {
                        Ok(0) => {}
                        Ok(folded) => {
                            tracing::info!(folded, "request records past the retention period folded into daily totals")
                        }
                        Err(e) => tracing::warn!(error = %e, "pruning request records failed; retried next hour"),
                    }
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
            });
        }
        // Change still held by remote providers (a mint down, a stream cut short, a restart).
        let node = self.clone();
        tokio::spawn(async move {
            let every = Duration::from_secs(node.settings.remote_recovery_seconds.max(1));
            loop {
                crate::proxy::remote::recover_all(&node, 5).await;
                tokio::time::sleep(every).await;
            }
        });
    }

    /// Change of `X-Cashu` requests that could not be paid when they ended (a mint was down):
    /// made now, kept for the client to collect with `/v1/balance/refund`.
    async fn pay_stranded_change(&self) {
        // Requests younger than this may still be paying their own change.
        const MIN_AGE_SECS: i64 = 120;
        let keys = match self.ledger().unpaid_xcashu_keys(MIN_AGE_SECS).await {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!(error = %e, "could not list unpaid change");
                return;
            }
        };
        for key in keys {
            if let Err(e) = self.payments.pay_stranded_change(&key).await {
                tracing::debug!(error = %e, "stranded change still cannot be paid");
            }
        }
    }
}

/// The upstreams the environment defines (UPSTREAMS_PATH, then UPSTREAM_BASE_URL as "default").
fn env_upstreams(settings: &Settings) -> Result<Vec<UpstreamSpec>, NodeError> {
    let mut specs = match &settings.upstreams_path {
        Some(path) => upstream::load_file(path)?,
        None => Vec::new(),
    };
    if let Some(base_url) = &settings.upstream_base_url {
        specs.push(UpstreamSpec {
            name: "default".into(),
            base_url: base_url.clone(),
            api_key: settings.upstream_api_key.clone().filter(|k| !k.is_empty()).map(|k| k.expose().to_owned()),
            api_key_env: None,
            models: Vec::new(),
            aliases: Default::default(),
            markup: settings.upstream_provider_fee,
        });
    }
    Ok(specs)
}

/// A node listening, as tests and the demo use it.
pub struct RunningNode {
    /// The clearnet listener's address; `None` with CLEARNET_LISTEN=false.
    pub addr: Option<SocketAddr>,
    pub node: Arc<Node>,
    shutdown: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

impl RunningNode {
    /// The clearnet URL (empty without a clearnet listener).
    pub fn url(&self) -> String {
        self.addr.map(|a| format!("http://{a}")).unwrap_or_default()
    }

    /// Stops accepting, lets in-flight requests finish (up to `grace`), then ends the streams
    /// still running, settles them, and returns.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.shutdown.send(true);
        if tokio::time::timeout(grace, &mut self.server).await.is_err() {
            self.node.stopping.send_replace(true);
            let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.server).await;
        }
        if !self.node.inflight.wait_idle(Duration::from_secs(10)).await {
            tracing::warn!(
                in_flight = self.node.inflight.count(),
                "requests still settling at the deadline; their reservations are released at the next start"
            );
        }
        // Key holders' charges are queued without anyone waiting for the disk: wait here.
        match tokio::time::timeout(Duration::from_secs(10), self.node.ledger().flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the ledger could not be flushed at shutdown"),
            Err(_) => tracing::error!("the ledger did not flush within 10 s at shutdown"),
        }
    }
}

/// Builds the node and serves it on `settings.host:settings.port` (port 0 picks one).
pub async fn start(settings: Settings) -> Result<RunningNode, NodeError> {
    if !settings.clearnet_listen && !settings.onion_service {
        return Err(NodeError::Config("CLEARNET_LISTEN=false needs ONION_SERVICE=true: nothing would serve".into()));
    }
    let listener = match settings.clearnet_listen {
        true => Some(TcpListener::bind((settings.host, settings.port)).await?),
        false => None,
    };
    let addr = listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let node = Node::build(settings).await?;
    node.spawn_background();
    let (shutdown, rx) = watch::channel(false);
    let onion = node.tor.clone().filter(|_| node.settings.onion_service);
    let onion = onion.map(|tor| crate::tor::spawn(node.clone(), tor, rx.clone()));
    let clearnet = listener.map(|l| tokio::spawn(crate::server::serve(l, node.clone(), rx)));
    let server = tokio::spawn(async move {
        for task in [clearnet, onion].into_iter().flatten() {
            let _ = task.await;
        }
    });
    match addr {
        Some(addr) => tracing::info!(%addr, "routstr-node listening"),
        None => tracing::info!("routstr-node serving without a clearnet listener (CLEARNET_LISTEN=false)"),
    }
    Ok(RunningNode { addr, node, shutdown, server })
}

/// Serves until Ctrl-C or SIGTERM.
pub async fn run(settings: Settings) -> Result<(), NodeError> {
    let running = start(settings).await?;
    wait_for_signal().await;
    tracing::info!("shutting down: finishing in-flight requests");
    running.shutdown(Duration::from_secs(30)).await;
    Ok(())
}

pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
