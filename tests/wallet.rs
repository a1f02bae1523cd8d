//! Wallet + demo mint tests: a real cdk mint (fake Lightning) on loopback.
#![cfg(feature = "demo")]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use routstr_node::demo::mint::{mint_token, redeem_token, start_test_mint, TestMint, TestMintConfig};
use routstr_node::wallet::{WalletError, WalletOptions, WalletService};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temp directory removed when dropped.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir() -> TempDir {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("routstr-wallet-test-{}-{n}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    TempDir(dir)
}

async fn mint(fee_ppk: u64) -> TestMint {
    start_test_mint(TestMintConfig { input_fee_ppk: fee_ppk, ..Default::default() }).await.expect("start test mint")
}

async fn open(dir: &Path, mints: &[String]) -> WalletService {
    WalletService::open_with_options(
        &dir.join("wallet.sqlite"),
        &dir.join("seed.hex"),
        mints,
        WalletOptions { op_timeout: Duration::from_secs(8), ..Default::default() },
    )
    .await
    .expect("open wallet")
}

async fn sat_balance(w: &WalletService, mint_url: &str) -> (u64, u64) {
    let b = w.balances().await.expect("balances");
    let line = b.iter().find(|b| b.mint_url == mint_url && b.unit == "sat").expect("sat line");
    (line.balance_msat, line.pending_msat)
}

#[tokio::test]
async fn receive_v3_and_v4_then_double_spend_is_refused() {
    let m = mint(0).await;
    let dir = temp_dir();
    let w = open(&dir, &[format!("{}/", m.url)]).await; // trailing slash normalised
    assert_eq!(w.trusted_mints(), vec![m.url.clone()]);

    let t4 = mint_token(&m.url, 100, false).await.expect("mint v4");
    let t3 = mint_token(&m.url, 50, true).await.expect("mint v3");
    assert!(t4.starts_with("cashuB"));
    assert!(t3.starts_with("cashuA"));

    let p4 = w.parse_token(&t4).expect("parse v4");
    assert_eq!(p4.mint_url, m.url);
    assert_eq!(p4.unit, "sat");
    assert_eq!(p4.value_msat, 100_000);
    assert!(!p4.proof_ys.is_empty());
    assert_eq!(w.parse_token(&t3).expect("parse v3").value_msat, 50_000);

    // Never received yet.
    assert_eq!(w.received_by_us(&m.url, &p4.proof_ys).await.expect("rbu"), None);

    let r4 = w.receive(&t4).await.expect("receive v4");
    assert_eq!(r4.value_msat, 100_000);
    assert_eq!(r4.fee_msat, 0);
    assert_eq!(r4.credited_msat, 100_000);
    let r3 = w.receive(&t3).await.expect("receive v3");
    assert_eq!(r3.credited_msat, 50_000);
    assert_eq!(sat_balance(&w, &m.url).await, (150_000, 0));

    match w.receive(&t4).await {
        Err(WalletError::AlreadySpent) => {}
        other => panic!("expected AlreadySpent, got {other:?}"),
    }
    // The refused attempt left nothing behind: no pending, and reconciliation still says the
    // first receive happened (and only once).
    assert_eq!(sat_balance(&w, &m.url).await, (150_000, 0));
    assert_eq!(w.received_by_us(&m.url, &p4.proof_ys).await.expect("rbu"), Some(100_000));
    w.recover().await.expect("recover");
    assert_eq!(sat_balance(&w, &m.url).await, (150_000, 0));
    assert_eq!(w.received_by_us(&m.url, &p4.proof_ys).await.expect("rbu"), Some(100_000));

    // A token spent elsewhere (not by us) is AlreadySpent and never "received by us".
    let t = mint_token(&m.url, 7, false).await.expect("mint");
    let py = w.parse_token(&t).expect("parse").proof_ys;
    assert_eq!(redeem_token(&m.url, &t).await.expect("redeem elsewhere"), 7);
    assert!(matches!(w.receive(&t).await, Err(WalletError::AlreadySpent)));
    w.recover().await.expect("recover");
    assert_eq!(w.received_by_us(&m.url, &py).await.expect("rbu"), None);
    assert_eq!(sat_balance(&w, &m.url).await, (150_000, 0));
}

#[tokio::test]
async fn untrusted_mint_and_garbage_are_refused() {
    let trusted = mint(0).await;
    let other = mint(0).await;
    let dir = temp_dir();
    let w = open(&dir, std::slice::from_ref(&trusted.url)).await;

    let foreign = mint_token(&other.url, 10, false).await.expect("mint");
    for res in [w.parse_token(&foreign).map(|_| ()), w.receive(&foreign).await.map(|_| ())] {
        match res {
            Err(e @ WalletError::UntrustedMint { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&trusted.url), "message names accepted mint: {msg}");
                if let WalletError::UntrustedMint { mint, accepted } = e {
                    assert_eq!(mint, other.url);
                    assert_eq!(accepted, vec![trusted.url.clone()]);
                }
            }
            other => panic!("expected UntrustedMint, got {other:?}"),
        }
    }

    for garbage in [
        "",
        "hello",
        "cashuB",
        "cashuBnotbase64!!",
        "cashuAeyJ0b2tlbiI6W119", // {"token":[]}
        "cashuCabc",
    ] {
        match w.parse_token(garbage) {
            Err(WalletError::InvalidToken(_)) => {}
            other => panic!("{garbage:?}: expected InvalidToken, got {other:?}"),
        }
        assert!(matches!(w.receive(garbage).await, Err(WalletError::InvalidToken(_))));
    }
    assert!(matches!(w.received_by_us(&other.url, &[]).await, Err(WalletError::UntrustedMint { .. })));
}

#[tokio::test]
async fn send_change_and_redeem_it() {
    let m = mint(0).await;
    let dir = temp_dir();
    let w = open(&dir, std::slice::from_ref(&m.url)).await;
    let t = mint_token(&m.url, 100, false).await.expect("mint");
    w.receive(&t).await.expect("receive");

    let sent = w.send(&m.url, 30_000).await.expect("send");
    assert!(sent.token.starts_with("cashuB"));
    assert_eq!(sent.amount_msat, 30_000);
    assert_eq!(sent.fee_msat, 0);
    assert_eq!(sent.mint_url, m.url);
    assert!(!format!("{sent:?}").contains("cashuB"), "Debug must not leak the token");
    assert_eq!(w.parse_token(&sent.token).expect("parse").value_msat, 30_000);
    assert_eq!(sat_balance(&w, &m.url).await.0, 70_000);
    assert_eq!(redeem_token(&m.url, &sent.token).await.expect("redeem"), 30);

    let sent3 = w.send_with_version(&m.url, 5_000, true).await.expect("send v3");
    assert!(sent3.token.starts_with("cashuA"));
    assert_eq!(redeem_token(&m.url, &sent3.token).await.expect("redeem v3"), 5);
    assert_eq!(sat_balance(&w, &m.url).await.0, 65_000);

    assert!(matches!(w.send(&m.url, 1_500).await, Err(WalletError::UnsupportedUnit(_))));
    assert!(matches!(w.send(&m.url, 1_000_000).await, Err(WalletError::InsufficientFunds)));
    assert_eq!(sat_balance(&w, &m.url).await, (65_000, 0));

    // Persistence: reopen the same files.
    drop(w);
    let w2 = open(&dir, std::slice::from_ref(&m.url)).await;
    w2.recover().await.expect("recover");
    assert_eq!(sat_balance(&w2, &m.url).await.0, 65_000);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("seed.hex")).expect("seed").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let pr = w2.payment_request(21);
    assert!(pr.starts_with("creqA"));
    let decoded = <cdk::nuts::nut18::PaymentRequest as std::str::FromStr>::from_str(&pr).expect("creq");
    assert_eq!(decoded.amount, Some(cdk::Amount::from(21u64)));
    assert_eq!(decoded.unit, Some(cdk::nuts::CurrencyUnit::Sat));
    assert_eq!(decoded.mints.iter().map(|m| m.to_string()).collect::<Vec<_>>(), vec![m.url.clone()]);
}

#[tokio::test]
async fn same_token_twice_concurrently_and_msat_unit() {
    let m = mint(0).await;
    let dir = temp_dir();
    let w = open(&dir, std::slice::from_ref(&m.url)).await;
    let t = mint_token(&m.url, 30, false).await.expect("mint");
    let (a, b) = tokio::join!(w.receive(&t), w.receive(&t));
    let oks = [&a, &b].iter().filter(|r| r.is_ok()).count();
    assert_eq!(oks, 1, "exactly one redemption wins: {a:?} / {b:?}");
    for r in [&a, &b] {
        if let Err(e) = r {
            assert!(matches!(e, WalletError::Pending | WalletError::AlreadySpent), "{e:?}");
        }
    }
    assert_eq!(sat_balance(&w, &m.url).await, (30_000, 0));

    // A token claiming unit msat at a mint without msat keysets.
    let t = mint_token(&m.url, 8, false).await.expect("mint");
    let mut tok = <cdk::nuts::Token as std::str::FromStr>::from_str(&t).expect("token");
    if let cdk::nuts::Token::TokenV4(ref mut v4) = tok {
        v4.unit = cdk::nuts::CurrencyUnit::Msat;
    }
    let msat_token = tok.to_string();
    assert_eq!(w.parse_token(&msat_token).expect("parse").value_msat, 8);
    match w.receive(&msat_token).await {
        Err(WalletError::UnsupportedUnit(_)) => {}
        other => panic!("expected UnsupportedUnit, got {other:?}"),
    }
    assert_eq!(sat_balance(&w, &m.url).await, (30_000, 0));
    // The sat token itself is still good.
    assert_eq!(w.receive(&t).await.expect("receive").credited_msat, 8_000);
}

#[tokio::test]
async fn input_fees_are_accounted() {
    let m = mint(100).await; // 0.1 sat per input proof, rounded up per swap
    let dir = temp_dir();
    let w = open(&dir, std::slice::from_ref(&m.url)).await;
    let t = mint_token(&m.url, 100, false).await.expect("mint");
    let n_proofs = w.parse_token(&t).expect("parse").proof_ys.len() as u64;
    // NUT-02: fee = ceil(sum of input_fee_ppk / 1000) sat
    let expected_fee = (n_proofs * 100).div_ceil(1000) * 1000;
    let r = w.receive(&t).await.expect("receive");
    assert_eq!(r.value_msat, 100_000);
    assert_eq!(r.fee_msat, expected_fee);
    assert!(r.fee_msat > 0);
    assert_eq!(r.credited_msat, 100_000 - expected_fee);
    assert_eq!(sat_balance(&w, &m.url).await.0, r.credited_msat);

    let sent = w.send(&m.url, 10_000).await.expect("send");
    assert!(sent.fee_msat >= 1_000, "fee: {}", sent.fee_msat);
    // The receiver's redeem fee was included: they get the full 10 sat.
    assert_eq!(redeem_token(&m.url, &sent.token).await.expect("redeem"), 10);
    let (bal, pending) = sat_balance(&w, &m.url).await;
    assert_eq!(bal, r.credited_msat - 10_000 - sent.fee_msat);
    assert_eq!(pending, 0);

    // Within a budget that covers the amount but not the fee: nothing is sent or held.
    let refused = w.send_within(&m.url, 10_000, 10_000).await;
    assert!(matches!(refused, Err(WalletError::OverBudget(_))), "{refused:?}");
    assert_eq!(sat_balance(&w, &m.url).await, (bal, 0), "the prepared send was cancelled");
    let within = w.send_within(&m.url, 10_000, 20_000).await.expect("fee within the budget");
    assert!(within.amount_msat + within.fee_msat <= 20_000);
    assert_eq!(redeem_token(&m.url, &within.token).await.expect("redeem"), 10);
}

#[tokio::test]
async fn mint_down_is_unavailable_not_a_hang_and_recovers() {
    let m = mint(0).await;
    let dir = temp_dir();
    let w = open(&dir, std::slice::from_ref(&m.url)).await;
    w.receive(&mint_token(&m.url, 20, false).await.expect("mint")).await.expect("receive");
    let t = mint_token(&m.url, 40, false).await.expect("mint");
    let ys = w.parse_token(&t).expect("parse").proof_ys;

    m.stop().await;
    let start = Instant::now();
    match w.receive(&t).await {
        Err(WalletError::MintUnavailable(_)) => {}
        other => panic!("expected MintUnavailable, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
    // The interrupted swap is ambiguous until the mint answers again.
    assert!(matches!(w.received_by_us(&m.url, &ys).await, Err(WalletError::MintUnavailable(_))));
    w.recover().await.expect("recover never fails on a dead mint");

    // A wallet opened while the mint is down still opens.
    let dir2 = temp_dir();
    let w_down = open(&dir2, std::slice::from_ref(&m.url)).await;
    assert_eq!(sat_balance(&w_down, &m.url).await, (0, 0));

    m.restart().await.expect("restart");
    let r = w.receive(&t).await.expect("receive after restart");
    assert_eq!(r.credited_msat, 40_000);
    assert_eq!(sat_balance(&w, &m.url).await, (60_000, 0));
    assert_eq!(w.received_by_us(&m.url, &ys).await.expect("rbu"), Some(40_000));
    assert!(matches!(w.receive(&t).await, Err(WalletError::AlreadySpent)));
    assert_eq!(sat_balance(&w, &m.url).await, (60_000, 0));
}

#[tokio::test]
async fn concurrent_receives() {
    let m = mint(0).await;
    let dir = temp_dir();
    let w = open(&dir, std::slice::from_ref(&m.url)).await;
    let mut tokens = Vec::new();
    for i in 0..6 {
        tokens.push(mint_token(&m.url, 10 + i, i % 2 == 0).await.expect("mint"));
    }
    let mut handles = Vec::new();
    for t in tokens {
        let w = w.clone();
        handles.push(tokio::spawn(async move { w.receive(&t).await }));
    }
    let mut total = 0;
    for h in handles {
        total += h.await.expect("join").expect("receive").credited_msat;
    }
    assert_eq!(total, (10 + 11 + 12 + 13 + 14 + 15) * 1000);
    assert_eq!(sat_balance(&w, &m.url).await, (total, 0));
}
