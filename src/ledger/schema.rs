//! Ledger schema and migrations. Migrations only ever add; they run at start inside one
//! transaction, so an upgrade never loses data and a failed one changes nothing.

use rusqlite::Connection;

use super::LedgerError;

const MIGRATIONS: &[&str] = &[
    // 1: keys, redemptions (money in), reservations (charges), payouts (money out).
    r#"
    CREATE TABLE keys (
        key_hash        TEXT PRIMARY KEY,
        kind            TEXT NOT NULL DEFAULT 'key',           -- key | xcashu
        balance_msat    INTEGER NOT NULL DEFAULT 0 CHECK (balance_msat >= 0),
        reserved_msat   INTEGER NOT NULL DEFAULT 0 CHECK (reserved_msat >= 0 AND reserved_msat <= balance_msat),
        spent_msat      INTEGER NOT NULL DEFAULT 0,
        requests        INTEGER NOT NULL DEFAULT 0,
        mint_url        TEXT,
        refund_address  TEXT,
        expiry_time     INTEGER,
        revoked         INTEGER NOT NULL DEFAULT 0,
        created_at      INTEGER NOT NULL
    );
    CREATE TABLE redemptions (
        token_hash      TEXT PRIMARY KEY,
        key_hash        TEXT NOT NULL,
        mint_url        TEXT NOT NULL,
        value_msat      INTEGER NOT NULL,
        fee_msat        INTEGER NOT NULL DEFAULT 0,
        credited_msat   INTEGER NOT NULL DEFAULT 0,
        proof_ys        TEXT NOT NULL,
        state           TEXT NOT NULL,                          -- pending | credited | failed
        created_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL
    );
    -- Each proof (by its Y) belongs to one redemption: a token re-encoded differently is the
    -- same money and is not credited twice.
    CREATE TABLE redemption_proofs (
        y               TEXT PRIMARY KEY,
        token_hash      TEXT NOT NULL REFERENCES redemptions(token_hash)
    );
    CREATE TABLE reservations (
        request_id      TEXT PRIMARY KEY,
        key_hash        TEXT NOT NULL REFERENCES keys(key_hash),
        amount_msat     INTEGER NOT NULL CHECK (amount_msat >= 0),
        state           TEXT NOT NULL,                          -- open | charged | released
        charged_msat    INTEGER NOT NULL DEFAULT 0,
        uncollected_msat INTEGER NOT NULL DEFAULT 0,
        model           TEXT,
        note            TEXT,
        created_at      INTEGER NOT NULL,
        ended_at        INTEGER
    );
    CREATE INDEX reservations_open ON reservations(state) WHERE state = 'open';
    CREATE TABLE payouts (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        key_hash        TEXT NOT NULL REFERENCES keys(key_hash),
        source_token_hash TEXT,
        request_id      TEXT,
        mint_url        TEXT NOT NULL,
        debit_msat      INTEGER NOT NULL CHECK (debit_msat > 0),
        amount_msat     INTEGER NOT NULL DEFAULT 0,
        fee_msat        INTEGER NOT NULL DEFAULT 0,
        token           TEXT,
        state           TEXT NOT NULL,                          -- pending | ready | failed
        created_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL
    );
    CREATE INDEX payouts_source ON payouts(source_token_hash);
    CREATE INDEX payouts_key ON payouts(key_hash);
    "#,
    // 2: remote spends: tokens from our wallet paying discovered providers (routing), recorded
    // before the token is made and kept until its change is back in our wallet.
    r#"
    CREATE TABLE remote_spends (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id      TEXT NOT NULL,
        provider        TEXT NOT NULL,                          -- the provider's pubkey (hex)
        url             TEXT NOT NULL,                          -- its base URL, for recovery
        mint_url        TEXT NOT NULL,
        amount_msat     INTEGER NOT NULL DEFAULT 0,             -- the token's value
        fee_msat        INTEGER NOT NULL DEFAULT 0,             -- what making it cost on top
        token           TEXT,                                   -- the token sent (recovers change)
        change_token    TEXT,                                   -- change not yet in our wallet
        change_msat     INTEGER NOT NULL DEFAULT 0,             -- change credited to our wallet
        change_fee_msat INTEGER NOT NULL DEFAULT 0,
        state           TEXT NOT NULL,                          -- pending | sent | settled | recovering | failed
        attempts        INTEGER NOT NULL DEFAULT 0,
        note            TEXT,
        created_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL
    );
    CREATE INDEX remote_spends_open ON remote_spends(state) WHERE state IN ('pending', 'sent', 'recovering');
    "#,
    // 3: Lightning. Invoices that top up keys (mint quotes at trusted mints), Lightning refunds
    // of keys (payouts paid by a melt), the operator's payouts of earnings, and tokens from
    // foreign mints moved to a trusted mint (a redemption paid by a melt there and a mint here).
    // Each row is written before the step it describes, so a restart knows what to ask the mint.
    r#"
    CREATE TABLE ln_invoices (
        id              TEXT PRIMARY KEY,                       -- invoice_id given to the client
        purpose         TEXT NOT NULL,                          -- create | topup
        key_hash        TEXT NOT NULL,                          -- the key credited once paid
        mint_url        TEXT NOT NULL,
        quote_id        TEXT NOT NULL,
        bolt11          TEXT NOT NULL,
        payment_hash    TEXT NOT NULL,
        amount_msat     INTEGER NOT NULL CHECK (amount_msat > 0),
        credited_msat   INTEGER NOT NULL DEFAULT 0,
        state           TEXT NOT NULL,                          -- unpaid | credited | expired
        created_at      INTEGER NOT NULL,
        expires_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL
    );
    CREATE INDEX ln_invoices_open ON ln_invoices(state) WHERE state IN ('unpaid', 'expired');
    ALTER TABLE payouts ADD COLUMN method TEXT NOT NULL DEFAULT 'cashu';      -- cashu | lightning
    ALTER TABLE payouts ADD COLUMN destination TEXT;                          -- lightning: the address
    ALTER TABLE payouts ADD COLUMN bolt11 TEXT;
    ALTER TABLE payouts ADD COLUMN quote_id TEXT;                             -- the melt quote
    ALTER TABLE payouts ADD COLUMN fee_reserve_msat INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE operator_payouts (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        mint_url        TEXT NOT NULL,
        destination     TEXT NOT NULL,
        bolt11          TEXT,
        quote_id        TEXT,
        amount_msat     INTEGER NOT NULL DEFAULT 0,
        fee_reserve_msat INTEGER NOT NULL DEFAULT 0,
        fee_msat        INTEGER NOT NULL DEFAULT 0,
        state           TEXT NOT NULL,                          -- pending | paid | failed
        note            TEXT,
        created_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL
    );
    ALTER TABLE redemptions ADD COLUMN swap_mint_url TEXT;     -- foreign token: the trusted mint it moves to
    ALTER TABLE redemptions ADD COLUMN swap_mint_quote TEXT;   -- our invoice there
    ALTER TABLE redemptions ADD COLUMN swap_melt_quote TEXT;   -- the foreign mint's quote paying it
    ALTER TABLE redemptions ADD COLUMN swap_amount_msat INTEGER NOT NULL DEFAULT 0;
    "#,
    // 4: a running request's reservation is counted on its key and recorded once it ends (one
    // row written per request instead of a row inserted and then updated).
    r#"
    ALTER TABLE keys ADD COLUMN open_requests INTEGER NOT NULL DEFAULT 0;
    "#,
    // 5: retention. Records of requests past the retention period are folded into one row per
    // day (UTC, when the requests began) and model, and deleted (see `retention`).
    r#"
    CREATE TABLE reservations_rollup (
        day             INTEGER NOT NULL,                       -- Unix seconds of 00:00 UTC
        model           TEXT NOT NULL,                          -- '' when none
        charged         INTEGER NOT NULL DEFAULT 0,             -- requests charged
        released        INTEGER NOT NULL DEFAULT 0,             -- requests released uncharged
        charged_msat    INTEGER NOT NULL DEFAULT 0,
        uncollected_msat INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (day, model)
    ) WITHOUT ROWID;
    "#,
];

pub fn migrate(conn: &Connection) -> Result<(), LedgerError> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let current: i64 = conn.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_version", [], |r| r.get(0))?;
    if current as usize > MIGRATIONS.len() {
        return Err(LedgerError::Schema(format!(
            "the ledger is at schema version {current}, newer than this binary knows ({}); refusing to run an older binary on it",
            MIGRATIONS.len()
        )));
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = index + 1;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let applied = conn
            .execute_batch(sql)
            .and_then(|_| conn.execute("INSERT INTO schema_version (version) VALUES (?1)", [version as i64]));
        match applied {
            Ok(_) => conn.execute_batch("COMMIT")?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(LedgerError::Schema(format!("migration {version} failed: {e}")));
            }
        }
    }
    Ok(())
}
