//! Settings: command-line flags, each backed by an environment variable. Names follow Routstr
//! Core where it has one, so an operator's existing `.env` keeps working.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "routstr-node",
    version,
    about = "A Nostr-native provider node for paid AI: an OpenAI-compatible proxy paid with Cashu eCash.",
    long_about = "routstr-node sits in front of an OpenAI-compatible upstream and sells access to it for \
Bitcoin eCash (Cashu). Clients pay per request (X-Cashu header) or from a prepaid key \
(Authorization: Bearer sk-… or Bearer cashu…); the node reserves the request's maximum cost, \
forwards it, meters the usage the upstream reports, charges that and returns the rest.\n\n\
Run without a subcommand to serve. Every option can also be set by the environment variable \
shown next to it (names compatible with Routstr Core). `routstr-node demo` runs the whole paid \
flow offline with an embedded test mint and a stand-in upstream."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the node (the default when no subcommand is given).
    Serve,
    /// Run the whole paid flow offline: an embedded Cashu test mint (fake Lightning), a stand-in
    /// upstream, and the node; pays a request with a freshly minted token and prints each step.
    #[cfg(feature = "demo")]
    Demo {
        /// Keep serving after the walkthrough (Ctrl-C to stop) so you can try it with curl.
        #[arg(long)]
        serve: bool,
    },
    /// Operate the node's Cashu wallet (safe while the node runs).
    #[command(subcommand)]
    Wallet(WalletCommand),
    /// Copy all state (ledger, wallet, secrets, the onion service's keys from TOR_STATE_DIR) to
    /// DEST while the node runs, using SQLite's online backup (`VACUUM INTO`), not a file copy.
    /// Restore by using DEST as DATA_DIR (without TOR_STATE_DIR, or pointing it at DEST/tor).
    Backup {
        /// A directory that does not exist yet (or is empty).
        dest: PathBuf,
    },
    /// Providers announced on Nostr, ranked: healthy first, then (with --model) cheapest, then
    /// fastest. Without --node, runs a one-shot discovery on the read relays (RELAYS, RELAYS_PATH
    /// or the built-in list) and health-checks each provider; with --node, asks that running
    /// node's GET /v1/providers.
    Providers {
        /// Only providers offering this model, ranked by its price (sats for 1k prompt + 1k
        /// completion tokens).
        #[arg(long)]
        model: Option<String>,
        /// A running node's URL, e.g. http://127.0.0.1:8000.
        #[arg(long)]
        node: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum WalletCommand {
    /// Balance per mint, next to what users' balances and open reservations claim.
    Balance,
    /// Receive a Cashu token into the operator's earnings.
    Receive {
        /// The token (cashuA… or cashuB…).
        token: String,
    },
    /// Take AMOUNT sats out of the operator's earnings as a Cashu token. Refuses to touch what
    /// backs users' balances (the mint's fees are paid out of the earnings too).
    Send {
        /// Amount in sats.
        amount: u64,
        /// Mint to send from (default: the one the wallet holds the most at).
        #[arg(long)]
        mint: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LedgerSync {
    /// fsync every commit (survives power loss).
    Full,
    /// fsync at WAL checkpoints (survives a process crash, not a power loss).
    Normal,
}

#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Address to listen on.
    #[arg(long, env = "HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// Port to listen on.
    #[arg(long, env = "PORT", default_value_t = 8000)]
    pub port: u16,
    /// Directory for all state: ledger, wallet, secrets.
    #[arg(long, env = "DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// The ledger's SQLite file. Accepts a path or Routstr Core's `sqlite+aiosqlite:///path` form.
    /// Default: DATA_DIR/ledger.sqlite.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// How hard the ledger syncs each commit.
    #[arg(long, env = "LEDGER_SYNC", value_enum, default_value_t = LedgerSync::Full)]
    pub ledger_sync: LedgerSync,
    /// Days each request's own record (id, key, model, charge) is kept. Older ones are folded
    /// into per-day, per-model totals (balances and all-time sums stay exact). 0 keeps them all.
    #[arg(long, env = "LEDGER_RETENTION_DAYS", default_value_t = 30)]
    pub ledger_retention_days: u64,

    /// Base URL of the OpenAI-compatible upstream, e.g. https://api.openai.com/v1.
    #[arg(long, env = "UPSTREAM_BASE_URL")]
    pub upstream_base_url: Option<String>,
    /// API key sent to that upstream.
    #[arg(long, env = "UPSTREAM_API_KEY", hide_env_values = true)]
    pub upstream_api_key: Option<crate::secret::Secret>,
    /// TOML file listing several upstreams (see README); the UPSTREAM_* pair adds one more.
    #[arg(long, env = "UPSTREAMS_PATH")]
    pub upstreams_path: Option<PathBuf>,
    /// Markup on the env-configured upstream's prices (Routstr Core's name; 1.05 = +5 %).
    #[arg(long, env = "UPSTREAM_PROVIDER_FEE", default_value_t = 1.05)]
    pub upstream_provider_fee: f64,
    /// Extra markup covering BTC/USD conversion risk, applied on every upstream (1.005 = +0.5 %).
    #[arg(long, env = "EXCHANGE_FEE", default_value_t = 1.005)]
    pub exchange_fee: f64,

    /// Trusted Cashu mints, comma separated.
    #[arg(long, env = "CASHU_MINTS", value_delimiter = ',', default_value = "https://mint.minibits.cash/Bitcoin")]
    pub cashu_mints: Vec<String>,

    /// Node name shown in /v1/info and announcements.
    #[arg(long, env = "NAME", default_value = "routstr-node")]
    pub name: String,
    /// Node description.
    #[arg(long, env = "DESCRIPTION", default_value = "A Routstr provider node")]
    pub description: String,
    /// Public clearnet URL of this node.
    #[arg(long, env = "HTTP_URL")]
    pub http_url: Option<String>,
    /// Public onion URL of this node (`http://<56 characters>.onion`), when a Tor sidecar serves
    /// it; the node's own onion service announces its address itself.
    #[arg(long, env = "ONION_URL", value_parser = onion_url)]
    pub onion_url: Option<String>,

    /// Charge fixed prices instead of per-model prices.
    #[arg(long, env = "FIXED_PRICING", default_value_t = false, action = clap::ArgAction::Set)]
    pub fixed_pricing: bool,
    /// Fixed fee per request, in sats.
    #[arg(long, env = "FIXED_COST_PER_REQUEST", default_value_t = 1.0)]
    pub fixed_cost_per_request: f64,
    /// Fixed price per 1,000 input tokens, in sats.
    #[arg(long, env = "FIXED_PER_1K_INPUT_TOKENS", default_value_t = 0.0)]
    pub fixed_per_1k_input_tokens: f64,
    /// Fixed price per 1,000 output tokens, in sats.
    #[arg(long, env = "FIXED_PER_1K_OUTPUT_TOKENS", default_value_t = 0.0)]
    pub fixed_per_1k_output_tokens: f64,
    /// JSON file of models in the OpenRouter schema; overrides the upstream's /v1/models.
    #[arg(long, env = "MODELS_PATH")]
    pub models_path: Option<PathBuf>,
    /// How often to refresh models and prices from the upstreams, in seconds.
    #[arg(long, env = "MODELS_REFRESH_SECONDS", default_value_t = 3600)]
    pub models_refresh_seconds: u64,
    /// Fix the BTC/USD rate (the node then makes no exchange requests and runs offline).
    #[arg(long, env = "BTC_USD_PRICE")]
    pub btc_usd_price: Option<f64>,
    /// How often to refresh BTC/USD from the exchanges, in seconds.
    #[arg(long, env = "BTC_PRICE_REFRESH_SECONDS", default_value_t = 300)]
    pub btc_price_refresh_seconds: u64,
    /// Completion tokens reserved when a request gives no max_tokens and the model no limit.
    #[arg(long, env = "DEFAULT_MAX_COMPLETION_TOKENS", default_value_t = 4096)]
    pub default_max_completion_tokens: u64,
    /// Write the model's listed completion limit (the one the node reserved for) into requests
    /// that give none (`max_completion_tokens` on chat completions, `max_tokens` on completions
    /// and messages, `max_output_tokens` on responses), so that no answer costs more than was
    /// reserved. Turn off only for an upstream that refuses these fields.
    #[arg(long, env = "CAP_COMPLETION_TOKENS", default_value_t = true, action = clap::ArgAction::Set)]
    pub cap_completion_tokens: bool,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Most simultaneous client connections; more wait in the accept queue.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Seconds a client connection may stay open with no request on it (and the longest wait
    /// for a request's headers); then it is closed, so silent connections cannot hold every slot.
    #[arg(long, env = "CLIENT_IDLE_TIMEOUT_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub client_idle_timeout_seconds: u64,
    /// Upstream connect timeout, in seconds.
    #[arg(long, env = "UPSTREAM_CONNECT_TIMEOUT_SECONDS", default_value_t = 10)]
    pub upstream_connect_timeout_seconds: u64,
    /// Longest silence from the upstream (before the first byte or between chunks), in seconds.
    #[arg(long, env = "UPSTREAM_IDLE_TIMEOUT_SECONDS", default_value_t = 120)]
    pub upstream_idle_timeout_seconds: u64,
    /// Consecutive failures after which an upstream cools down.
    #[arg(long, env = "UPSTREAM_FAILURE_THRESHOLD", default_value_t = 3)]
    pub upstream_failure_threshold: u32,
    /// How long a failing upstream cools down, in seconds.
    #[arg(long, env = "UPSTREAM_COOLDOWN_SECONDS", default_value_t = 30)]
    pub upstream_cooldown_seconds: u64,
    /// Timeout for each request to a Cashu mint, in seconds.
    #[arg(long, env = "MINT_TIMEOUT_SECONDS", default_value_t = 20)]
    pub mint_timeout_seconds: u64,

    /// Requests per minute allowed from one clearnet client IP (0: no limit). Behind a reverse
    /// proxy every client shares the proxy's IP: raise it or limit at the proxy.
    #[arg(long, env = "RATE_LIMIT_PER_MINUTE", default_value_t = 1200)]
    pub rate_limit_per_minute: u32,
    /// Allowed CORS origins, comma separated ("*" for any).
    #[arg(long, env = "CORS_ORIGINS", value_delimiter = ',', default_value = "*")]
    pub cors_origins: Vec<String>,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    // --- Tor ---
    /// Host the node's onion service in process (arti). Clearnet keeps serving while Tor
    /// bootstraps; the onion address shows in /v1/info once the keys exist.
    #[arg(long, env = "ONION_SERVICE", default_value_t = false, action = clap::ArgAction::Set)]
    pub onion_service: bool,
    /// Tor state: the onion service's keys (so its address survives restarts) and arti's caches.
    /// Created owner-only. Default: DATA_DIR/tor.
    #[arg(long, env = "TOR_STATE_DIR")]
    pub tor_state_dir: Option<PathBuf>,
    /// An arti TOML file merged into the Tor client's configuration (authorities, fallback
    /// caches, timing…): how tests point the node at a private Tor network.
    #[arg(long, env = "ARTI_CONFIG")]
    pub arti_config: Option<PathBuf>,
    /// Listen on HOST:PORT. `false` switches the clearnet listener off entirely (onion-only node).
    #[arg(long, env = "CLEARNET_LISTEN", default_value_t = true, action = clap::ArgAction::Set)]
    pub clearnet_listen: bool,
    /// Most streams one onion circuit may hold open at once; more and arti tears the circuit down.
    #[arg(long, env = "ONION_MAX_STREAMS_PER_CIRCUIT", default_value_t = 16)]
    pub onion_max_streams_per_circuit: u32,
    /// Most new onion circuits (rendezvous requests) accepted per window; more are dropped.
    #[arg(long, env = "ONION_MAX_NEW_CIRCUITS", default_value_t = 120)]
    pub onion_max_new_circuits: u32,
    /// The window for ONION_MAX_NEW_CIRCUITS, in seconds.
    #[arg(long, env = "ONION_CIRCUIT_WINDOW_SECONDS", default_value_t = 60)]
    pub onion_circuit_window_seconds: u64,
    /// Introductions per second the introduction points let through (arti's intro-point DoS
    /// limit, sent to the relays); 0 leaves it off.
    #[arg(long, env = "ONION_INTRO_RATE", default_value_t = 25)]
    pub onion_intro_rate: u32,
    /// Burst allowed above ONION_INTRO_RATE at the introduction points.
    #[arg(long, env = "ONION_INTRO_BURST", default_value_t = 200)]
    pub onion_intro_burst: u32,
    /// Send the node's own outbound traffic (upstreams, price feeds, model listings, mints,
    /// Nostr relays) through Tor; `.onion` upstreams then work. Loopback destinations stay direct.
    #[arg(long, env = "TOR_OUTBOUND", default_value_t = false, action = clap::ArgAction::Set)]
    pub tor_outbound: bool,

    // --- Nostr ---
    /// The node's Nostr secret key (nsec1… or hex). Default: generated on first start and kept
    /// in DATA_DIR/nostr.key (owner-only). Its npub shows in /v1/info.
    #[arg(long, env = "NSEC", hide_env_values = true)]
    pub nsec: Option<crate::secret::Secret>,
    /// Nostr relays, comma separated, each read and written (Routstr Core's name). Overrides
    /// RELAYS_PATH and the built-in relays.toml.
    #[arg(long, env = "RELAYS", value_delimiter = ',')]
    pub relays: Vec<String>,
    /// A relays file in relays.toml's format (`[[relay]]` with url, read, write). Default: the
    /// relays.toml built into the binary.
    #[arg(long, env = "RELAYS_PATH")]
    pub relays_path: Option<PathBuf>,
    /// The provider id: the `d` tag of the announcement. Default: the `d` of our newest
    /// announcement on the relays, else the first 12 hex characters of the public key.
    #[arg(long, env = "PROVIDER_ID")]
    pub provider_id: Option<String>,
    /// Nostr at all: announcement, price list and discovery.
    #[arg(long, env = "NOSTR_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub nostr_enabled: bool,
    /// Discover other providers on the read relays (GET /v1/providers).
    #[arg(long, env = "NOSTR_DISCOVERY", default_value_t = true, action = clap::ArgAction::Set)]
    pub nostr_discovery: bool,
    /// How often the announcement and price list are compared with what was published, seconds.
    #[arg(long, env = "NOSTR_CHECK_SECONDS", default_value_t = 60)]
    pub nostr_check_seconds: u64,
    /// Re-publish unchanged events after this long, seconds (at least 60).
    #[arg(long, env = "NOSTR_REFRESH_SECONDS", default_value_t = 86400)]
    pub nostr_refresh_seconds: u64,
    /// Re-publish the price list when a price moves more than this fraction (0.05 = 5 %).
    #[arg(long, env = "NOSTR_PRICE_THRESHOLD", default_value_t = 0.05)]
    pub nostr_price_threshold: f64,
    /// Never re-publish the price list more often than this, seconds.
    #[arg(long, env = "NOSTR_MODELS_MIN_INTERVAL_SECONDS", default_value_t = 600)]
    pub nostr_models_min_interval_seconds: u64,
    /// How often discovered providers are health-checked, seconds.
    #[arg(long, env = "NOSTR_HEALTH_SECONDS", default_value_t = 300)]
    pub nostr_health_seconds: u64,
    /// Bound on each relay query or publish, and on each provider health request, seconds.
    #[arg(long, env = "NOSTR_TIMEOUT_SECONDS", default_value_t = 10)]
    pub nostr_timeout_seconds: u64,

    // --- Routing ---
    /// Buy from providers discovered on Nostr when no local upstream serves a model (or all
    /// failed before answering), paying them from the node's own wallet. A node without an
    /// upstream of its own and a funded wallet is thereby a personal router.
    #[arg(long, env = "REMOTE_ROUTING", default_value_t = true, action = clap::ArgAction::Set)]
    pub remote_routing: bool,
    /// The most the node pays a remote provider for one request, in sats (the token sent up
    /// front; the provider returns the unused part as change). Dearer providers are skipped.
    #[arg(long, env = "MAX_REMOTE_PRICE_SATS", default_value_t = 1000)]
    pub max_remote_price_sats: u64,
    /// What the client pays on top of what a remote provider kept (1.1 = +10 %).
    #[arg(long, env = "REMOTE_MARKUP", default_value_t = 1.1)]
    pub remote_markup: f64,
    /// Most remote providers tried for one request.
    #[arg(long, env = "REMOTE_MAX_ATTEMPTS", default_value_t = 3)]
    pub remote_max_attempts: usize,
    /// How often change still held by a remote provider is asked back, seconds.
    #[arg(long, env = "REMOTE_RECOVERY_SECONDS", default_value_t = 60)]
    pub remote_recovery_seconds: u64,

    // --- Lightning ---
    /// Offer Lightning invoice top-ups (`/v1/balance/lightning/invoice`), Lightning refunds to a
    /// key's `Refund-LNURL`, and the swap of tokens from mints the node does not trust (melted at
    /// their mint to pay an invoice of a trusted one). All go through the trusted mints' Lightning.
    #[arg(long, env = "LIGHTNING", default_value_t = true, action = clap::ArgAction::Set)]
    pub lightning: bool,
    /// Accept tokens from any mint by moving them to the first trusted mint over Lightning (fees
    /// shown to the user). Off: such tokens are refused with a clear error.
    #[arg(long, env = "ACCEPT_FOREIGN_MINTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub accept_foreign_mints: bool,
    /// Smallest and largest Lightning top-up invoice, in sats.
    #[arg(long, env = "MIN_INVOICE_SAT", default_value_t = 1)]
    pub min_invoice_sat: u64,
    #[arg(long, env = "MAX_INVOICE_SAT", default_value_t = 1_000_000)]
    pub max_invoice_sat: u64,
    /// How long a paid-but-late invoice is still watched after its expiry, in seconds.
    #[arg(long, env = "INVOICE_GRACE_SECONDS", default_value_t = 86_400)]
    pub invoice_grace_seconds: u64,
    /// How often the Lightning watcher checks open invoices, melts in flight, expired keys and
    /// operator payouts, in seconds.
    #[arg(long, env = "LIGHTNING_WATCH_SECONDS", default_value_t = 5)]
    pub lightning_watch_seconds: u64,
    /// The operator's Lightning address (or LNURL): earnings above MIN_PAYOUT_SAT are paid there
    /// every PAYOUT_INTERVAL_SECONDS. Unset: no automatic payouts.
    #[arg(long, env = "RECEIVE_LN_ADDRESS")]
    pub receive_ln_address: Option<String>,
    /// Smallest automatic payout, in sats (earnings below it wait).
    #[arg(long, env = "MIN_PAYOUT_SAT", default_value_t = 210)]
    pub min_payout_sat: u64,
    /// How often earnings are paid out to RECEIVE_LN_ADDRESS, in seconds.
    #[arg(long, env = "PAYOUT_INTERVAL_SECONDS", default_value_t = 86_400)]
    pub payout_interval_seconds: u64,
    /// Let LNURL hosts and the mints of foreign tokens be loopback or private addresses (for tests
    /// and private networks only: users choose both, so this would let them point the node at its
    /// own network).
    #[arg(long, env = "LNURL_ALLOW_PRIVATE_HOSTS", default_value_t = false, action = clap::ArgAction::Set)]
    pub lnurl_allow_private_hosts: bool,
    /// Let discovered providers be at loopback or private addresses (tests and private networks
    /// only: announcements are anyone's, so this lets strangers point the node at its own network).
    #[arg(long, env = "NOSTR_ALLOW_PRIVATE_HOSTS", default_value_t = false, action = clap::ArgAction::Set)]
    pub nostr_allow_private_hosts: bool,

    // --- Admin ---
    /// The admin dashboard's password. Unset: one is generated at first start and printed once
    /// to stderr. Only its argon2 hash is stored (DATA_DIR/admin-password); changing this
    /// variable replaces the password and ends every admin session.
    #[arg(long, env = "ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<crate::secret::Secret>,
    /// Serve the dashboard, the admin API and /metrics on the onion service too (behind the same
    /// login; /metrics needs none). Clearnet serves them to loopback clients only.
    #[arg(long, env = "ADMIN_ONION", default_value_t = false, action = clap::ArgAction::Set)]
    pub admin_onion: bool,
    /// Client IPs besides loopback allowed to reach /admin and /metrics (comma separated, e.g. a
    /// Prometheus host or a Docker bridge gateway).
    #[arg(long, env = "ADMIN_ALLOW_IPS", value_delimiter = ',')]
    pub admin_allow_ips: Vec<IpAddr>,
    /// How long an admin login lasts, in hours (sessions survive restarts).
    #[arg(long, env = "ADMIN_SESSION_HOURS", default_value_t = 168)]
    pub admin_session_hours: u64,
    /// Login attempts allowed per client per minute (wrong or right); more get 429.
    #[arg(long, env = "ADMIN_LOGIN_ATTEMPTS_PER_MINUTE", default_value_t = 5)]
    pub admin_login_attempts_per_minute: u32,
}

impl Settings {
    /// Parses settings from the environment only (no command line), as tests and embedders do.
    pub fn from_env() -> Result<Self, clap::Error> {
        Cli::try_parse_from(["routstr-node"]).map(|cli| cli.settings)
    }

    pub fn ledger_path(&self) -> PathBuf {
        match &self.database_url {
            Some(url) => PathBuf::from(strip_sqlite_scheme(url)),
            None => self.data_dir.join("ledger.sqlite"),
        }
    }

    /// How long request records are kept; `None`: for good.
    pub fn ledger_retention(&self) -> Option<Duration> {
        (self.ledger_retention_days > 0).then(|| Duration::from_secs(self.ledger_retention_days.saturating_mul(86_400)))
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.upstream_connect_timeout_seconds)
    }

    pub fn client_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.client_idle_timeout_seconds)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.upstream_idle_timeout_seconds)
    }
}

/// `sqlite+aiosqlite:///./keys.db` → `./keys.db`; `sqlite:////abs/x.db` → `/abs/x.db`.
fn strip_sqlite_scheme(url: &str) -> &str {
    match url.split_once("://") {
        Some((scheme, rest)) if scheme.starts_with("sqlite") => rest.strip_prefix('/').unwrap_or(rest),
        _ => url,
    }
}

/// `ONION_URL`: empty, or an http(s) URL whose host is a v3 onion address (56 base32 characters).
fn onion_url(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Ok(String::new());
    }
    let rest = text.strip_prefix("http://").or_else(|| text.strip_prefix("https://"));
    let host = rest.map(|r| r.split(['/', ':']).next().unwrap_or_default());
    match host.and_then(|h| h.strip_suffix(".onion")) {
        Some(id) if id.len() == 56 && id.bytes().all(|b| matches!(b, b'a'..=b'z' | b'2'..=b'7')) => Ok(text.to_owned()),
        _ => Err(format!("{text} is not http://<56 characters>.onion")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_in_days_and_zero_keeps_everything() {
        let mut s = Settings::from_env().unwrap();
        assert_eq!(s.ledger_retention(), Some(Duration::from_secs(30 * 86_400)));
        s.ledger_retention_days = 0;
        assert_eq!(s.ledger_retention(), None);
    }

    #[test]
    fn onion_urls_are_v3_addresses() {
        let id = "a".repeat(52) + "2345";
        for good in [format!("http://{id}.onion"), format!("http://{id}.onion:8080/"), String::new()] {
            assert_eq!(onion_url(&good).as_deref(), Ok(good.as_str()));
        }
        for bad in [
            format!("{id}.onion"),
            "http://short.onion".into(),
            format!("http://{id}.com"),
            format!("http://{}.onion", id.to_uppercase()),
        ] {
            assert!(onion_url(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn database_url_forms() {
        assert_eq!(strip_sqlite_scheme("sqlite+aiosqlite:///./keys.db"), "./keys.db");
        assert_eq!(strip_sqlite_scheme("sqlite:////var/lib/x.db"), "/var/lib/x.db");
        assert_eq!(strip_sqlite_scheme("/plain/path.db"), "/plain/path.db");
    }

    /// Every setting is in README.md's configuration table and in .env.example.
    #[test]
    fn every_setting_is_documented() {
        let source = include_str!("config.rs");
        let readme = include_str!("../README.md");
        let example = include_str!("../.env.example");
        let names: Vec<&str> = source.split("env = \"").skip(1).filter_map(|rest| rest.split('"').next()).collect();
        assert!(names.len() > 40, "found the settings");
        for name in names {
            assert!(readme.contains(&format!("`{name}`")), "{name} is missing from README.md's configuration table");
            assert!(example.contains(&format!("{name}=")), "{name} is missing from .env.example");
        }
    }

    #[test]
    fn defaults_parse() {
        let cli = Cli::try_parse_from(["routstr-node"]).expect("defaults parse");
        assert_eq!(cli.settings.port, 8000);
        assert!(cli.command.is_none());
    }
}
