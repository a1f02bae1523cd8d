//! The command line: logging, and the operator's `wallet` commands.

use crate::config::{LogFormat, Settings, WalletCommand};
use crate::ledger::{open_reader, read_totals};
use crate::node::NodeError;
use crate::pricing::msat_to_sats;
use crate::wallet::{WalletOptions, WalletService};

/// Structured logs to stderr. `LOG_LEVEL` is a level or a full tracing directive.
pub fn init_logging(settings: &Settings) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&settings.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // The dashboard keeps the latest lines that name a request (admin::logs).
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let _ = match settings.log_format {
        LogFormat::Json => builder.json().finish().with(crate::admin::logs::CaptureLayer).try_init(),
        LogFormat::Text => builder.finish().with(crate::admin::logs::CaptureLayer).try_init(),
    };
}

async fn open_wallet(settings: &Settings) -> Result<WalletService, NodeError> {
    Ok(WalletService::open_with_options(
        &settings.data_dir.join("wallet.sqlite"),
        &settings.data_dir.join("wallet.seed"),
        &settings.cashu_mints,
        WalletOptions {
            op_timeout: std::time::Duration::from_secs(settings.mint_timeout_seconds),
            ..WalletOptions::default()
        },
    )
    .await?)
}

/// What users' balances claim, read from the ledger (another process may be running the node).
fn liabilities(settings: &Settings) -> Result<crate::ledger::Totals, NodeError> {
    let path = settings.ledger_path();
    if !path.exists() {
        return Ok(Default::default());
    }
    let mut conn = open_reader(&path)?;
    // One snapshot for all the sums, while the node may be committing.
    let snapshot = conn.transaction().map_err(crate::ledger::LedgerError::from)?;
    Ok(read_totals(&snapshot)?)
}

pub async fn wallet_command(settings: &Settings, command: WalletCommand) -> Result<(), NodeError> {
    let wallet = open_wallet(settings).await?;
    match command {
        WalletCommand::Balance => {
            let balances = wallet.balances().await?;
            let totals = liabilities(settings)?;
            let held: u64 = balances.iter().map(|b| b.balance_msat).sum();
            println!("{:<48} {:>6} {:>16} {:>16}", "mint", "unit", "balance (sat)", "pending (sat)");
            for b in &balances {
                println!(
                    "{:<48} {:>6} {:>16} {:>16}",
                    b.mint_url,
                    b.unit,
                    msat_to_sats(b.balance_msat),
                    msat_to_sats(b.pending_msat)
                );
            }
            println!();
            println!("wallet total:            {:>16} sat", msat_to_sats(held));
            // Running requests' holds live in the node's memory: the node's /admin shows them.
            println!("users' balances:         {:>16} sat", msat_to_sats(totals.balances_msat));
            println!("operator earnings:       {:>16} sat", msat_to_sats(totals.earnings_msat(held)));
            let in_flight: u64 = balances.iter().map(|b| b.pending_msat).sum();
            if totals.undercovered(held, in_flight) {
                println!("WARNING: the wallet holds less than users' balances claim");
            }
        }
        WalletCommand::Receive { token } => {
            let received = wallet.receive(&token).await?;
            println!(
                "received {} sat at {} (mint fee {} sat); it counts as operator earnings",
                msat_to_sats(received.credited_msat),
                received.mint_url,
                msat_to_sats(received.fee_msat)
            );
        }
        WalletCommand::Send { amount, mint } => {
            let amount_msat = amount.saturating_mul(1000);
            let balances = wallet.balances().await?;
            let held: u64 = balances.iter().map(|b| b.balance_msat).sum();
            let totals = liabilities(settings)?;
            let earnings = totals.earnings_msat(held);
            if amount_msat > earnings {
                return Err(NodeError::Config(format!(
                    "refused: {amount} sat is more than the operator's earnings ({} sat); the rest backs users' balances",
                    msat_to_sats(earnings)
                )));
            }
            let mint = match mint {
                Some(m) => m,
                None => balances
                    .iter()
                    .max_by_key(|b| b.balance_msat)
                    .map(|b| b.mint_url.clone())
                    .ok_or_else(|| NodeError::Config("the wallet is empty".into()))?,
            };
            // The mint's fees come out of the earnings too, never out of users' backing.
            let sent = wallet.send_within(&mint, amount_msat, earnings).await?;
            eprintln!("sent {} sat from {} (fee {} sat):", amount, sent.mint_url, msat_to_sats(sent.fee_msat));
            println!("{}", sent.token);
        }
    }
    Ok(())
}

/// Files of the data directory that are not databases: small, written once, copied as they are.
const SECRET_FILES: &[&str] = &[
    "wallet.seed",
    "key-secret",
    "nostr.key",
    "admin-password",
    "admin-sessions.json",
    crate::layers::UPSTREAMS_FILE,
    crate::layers::MODELS_FILE,
];

/// An online backup of the whole state: each SQLite database through `VACUUM INTO` (a
/// consistent snapshot while the node writes), the secrets and the Tor state by copy.
pub fn backup(settings: &Settings, dest: &std::path::Path) -> Result<(), NodeError> {
    if dest.exists() && std::fs::read_dir(dest)?.next().is_some() {
        return Err(NodeError::Config(format!("{} is not empty; choose a new directory", dest.display())));
    }
    std::fs::create_dir_all(dest)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o700))?;
    }
    let databases =
        [(settings.ledger_path(), "ledger.sqlite"), (settings.data_dir.join("wallet.sqlite"), "wallet.sqlite")];
    for (source, name) in databases {
        if !source.exists() {
            continue;
        }
        let conn = rusqlite::Connection::open_with_flags(&source, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| NodeError::Config(format!("cannot open {}: {e}", source.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(30)).map_err(|e| NodeError::Config(e.to_string()))?;
        let target = dest.join(name);
        conn.execute("VACUUM INTO ?1", [target.to_string_lossy()])
            .map_err(|e| NodeError::Config(format!("backup of {} failed: {e}", source.display())))?;
        println!("{name}: online snapshot written");
    }
    for name in SECRET_FILES {
        let source = settings.data_dir.join(name);
        if source.exists() {
            std::fs::copy(&source, dest.join(name))?;
            println!("{name}: copied");
        }
    }
    // The onion service's keys (its address), wherever TOR_STATE_DIR put them: restored with
    // DEST as DATA_DIR, they are found in DEST/tor.
    let tor = crate::tor::state_dir(settings);
    if tor.is_dir() {
        copy_dir(&tor, &dest.join("tor"))?;
        println!("tor/: copied from {}", tor.display());
    }
    println!("backup complete: start a node with DATA_DIR={} to restore it", dest.display());
    Ok(())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}
