use super::*;

fn temp_path(name: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("routstr-ledger-{name}-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("ledger.sqlite")
}

async fn funded(ledger: &Ledger, token: &str, key: &str, msat: u64) {
    let started = ledger.begin_redemption(token, key, "http://mint", msat, &["02ab".into()]).await.unwrap();
    assert_eq!(started, RedemptionState::Started);
    ledger.complete_redemption(token, KeyKind::Key, msat, 0).await.unwrap();
}

#[tokio::test]
async fn reserve_settle_release_conserve() {
    let ledger = Ledger::open(&temp_path("basic"), LedgerSync::Normal).unwrap();
    funded(&ledger, "t1", "k1", 10_000).await;

    let r1 = ledger.reserve("k1", "r1", 4_000, "m").await.unwrap();
    let info = ledger.key_info("k1").await.unwrap().unwrap();
    assert_eq!((info.balance_msat, info.reserved_msat, info.available_msat()), (10_000, 4_000, 6_000));

    let s = ledger.settle(&r1, 1_234, "ok").await.unwrap();
    assert_eq!(s, Settled { charged_msat: 1_234, uncollected_msat: 0, first_time: true });
    // Settlement is idempotent: a second end changes nothing.
    let again = ledger.settle(&r1, 9_999, "dup").await.unwrap();
    assert!(!again.first_time);
    assert!(!ledger.release(&r1, "dup").await.unwrap().first_time);

    let r2 = ledger.reserve("k1", "r2", 5_000, "m").await.unwrap();
    ledger.release(&r2, "upstream failed").await.unwrap();
    assert!(!ledger.settle(&r2, 1, "late").await.unwrap().first_time);

    let info = ledger.key_info("k1").await.unwrap().unwrap();
    assert_eq!((info.balance_msat, info.reserved_msat, info.spent_msat, info.requests), (8_766, 0, 1_234, 1));
    let t = ledger.totals().await.unwrap();
    assert!(t.conserved(), "{t:?}");
    assert_eq!(t.charged_msat, 1_234);
}

#[tokio::test]
async fn reservation_is_conditional() {
    let ledger = Ledger::open(&temp_path("cond"), LedgerSync::Normal).unwrap();
    funded(&ledger, "t1", "k1", 1_000).await;
    let err = ledger.reserve("k1", "r1", 1_001, "m").await.unwrap_err();
    assert!(matches!(err, LedgerError::Insufficient { required: 1_001, available: 1_000 }));
    assert!(matches!(ledger.reserve("nope", "r2", 1, "m").await.unwrap_err(), LedgerError::KeyNotFound));
}

#[tokio::test]
async fn parallel_reservations_never_exceed_balance() {
    let ledger = Ledger::open(&temp_path("parallel"), LedgerSync::Normal).unwrap();
    funded(&ledger, "t1", "k1", 10_000).await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move { ledger.reserve("k1", &format!("r{i}"), 300, "m").await.is_ok() }));
    }
    let mut granted = 0;
    for t in tasks {
        if t.await.unwrap() {
            granted += 1;
        }
    }
    assert_eq!(granted, 33);
    let info = ledger.key_info("k1").await.unwrap().unwrap();
    assert_eq!(info.reserved_msat, 9_900);
}

#[tokio::test]
async fn overrun_takes_free_balance_then_records_uncollected() {
    let ledger = Ledger::open(&temp_path("overrun"), LedgerSync::Normal).unwrap();
    funded(&ledger, "t1", "k1", 1_000).await;
    let r1 = ledger.reserve("k1", "r1", 600, "m").await.unwrap();
    let s = ledger.settle(&r1, 1_500, "overrun").await.unwrap();
    assert_eq!((s.charged_msat, s.uncollected_msat), (1_000, 500));
    assert!(ledger.totals().await.unwrap().conserved());
}

#[tokio::test]
async fn redemption_is_once_per_token() {
    let ledger = Ledger::open(&temp_path("redeem"), LedgerSync::Normal).unwrap();
    let ys = vec!["02aa".to_string()];
    assert_eq!(ledger.begin_redemption("t", "k", "m", 5_000, &ys).await.unwrap(), RedemptionState::Started);
    assert_eq!(ledger.begin_redemption("t", "k", "m", 5_000, &ys).await.unwrap(), RedemptionState::InProgress);
    assert_eq!(ledger.pending_redemptions().await.unwrap().len(), 1);
    ledger.complete_redemption("t", KeyKind::Key, 4_900, 100).await.unwrap();
    // Completing twice credits once.
    ledger.complete_redemption("t", KeyKind::Key, 4_900, 100).await.unwrap();
    assert_eq!(
        ledger.begin_redemption("t", "k", "m", 5_000, &ys).await.unwrap(),
        RedemptionState::Credited { key_hash: "k".into() }
    );
    assert_eq!(ledger.key_info("k").await.unwrap().unwrap().balance_msat, 4_900);
    // A failed attempt may be retried.
    let ys2 = vec!["02dd".to_string()];
    ledger.begin_redemption("t2", "k", "m", 1_000, &ys2).await.unwrap();
    ledger.fail_redemption("t2").await.unwrap();
    assert_eq!(ledger.begin_redemption("t2", "k", "m", 1_000, &ys2).await.unwrap(), RedemptionState::Started);
    let t = ledger.totals().await.unwrap();
    assert_eq!((t.credited_msat, t.redemption_fees_msat), (4_900, 100));
    assert!(t.conserved());
}

#[tokio::test]
async fn payouts_debit_first_and_can_be_replayed() {
    let ledger = Ledger::open(&temp_path("payout"), LedgerSync::Normal).unwrap();
    funded(&ledger, "t1", "k1", 2_500).await;
    let p = ledger.begin_payout("k1", Some("src"), None).await.unwrap().unwrap();
    assert_eq!(p.debit_msat, 2_500);
    assert_eq!(ledger.key_info("k1").await.unwrap().unwrap().balance_msat, 0);
    assert_eq!(ledger.latest_payout(None, Some("src")).await.unwrap(), PayoutLookup::Pending);
    assert!(ledger.totals().await.unwrap().conserved());
    // Only 2 whole sats could be paid: 500 msat return to the key, visibly.
    ledger.complete_payout(p.id, "cashuBxyz", 2_000, 2_000, 0).await.unwrap();
    assert_eq!(ledger.key_info("k1").await.unwrap().unwrap().balance_msat, 500);
    assert_eq!(
        ledger.latest_payout(Some("k1"), None).await.unwrap(),
        PayoutLookup::Ready { token: "cashuBxyz".into(), amount_msat: 2_000 }
    );
    let p2 = ledger.begin_payout("k1", None, None).await.unwrap().unwrap();
    ledger.fail_payout(p2.id).await.unwrap();
    ledger.fail_payout(p2.id).await.unwrap();
    assert_eq!(ledger.key_info("k1").await.unwrap().unwrap().balance_msat, 500);
    assert!(ledger.totals().await.unwrap().conserved());
}

#[tokio::test]
async fn open_reservations_survive_restart_and_are_released_once() {
    let path = temp_path("restart");
    {
        let ledger = Ledger::open(&path, LedgerSync::Full).unwrap();
        funded(&ledger, "t1", "k1", 3_000).await;
        ledger.reserve("k1", "r1", 2_000, "m").await.unwrap();
    }
    let ledger = Ledger::open(&path, LedgerSync::Full).unwrap();
    assert_eq!(ledger.key_info("k1").await.unwrap().unwrap().reserved_msat, 2_000);
    assert_eq!(ledger.release_interrupted_reservations().await.unwrap(), 1);
    assert_eq!(ledger.release_interrupted_reservations().await.unwrap(), 0);
    let info = ledger.key_info("k1").await.unwrap().unwrap();
    assert_eq!((info.balance_msat, info.reserved_msat), (3_000, 0));
    assert!(ledger.totals().await.unwrap().conserved());
}

#[tokio::test]
async fn open_records_of_older_ledgers_are_released_at_start_too() {
    let ledger = Ledger::open(&temp_path("legacy"), LedgerSync::Normal).unwrap();
    funded(&ledger, "t1", "k1", 5_000).await;
    let _running = ledger.reserve("k1", "r-new", 1_000, "m").await.unwrap();
    // What a ledger before schema 4 held for a running request: an 'open' row.
    ledger
        .store
        .run(|c| {
            c.execute(
                "INSERT INTO reservations (request_id, key_hash, amount_msat, state, created_at)
                 VALUES ('r-old', 'k1', 2000, 'open', 0)",
                [],
            )?;
            c.execute("UPDATE keys SET reserved_msat = reserved_msat + 2000 WHERE key_hash = 'k1'", [])?;
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(ledger.totals().await.unwrap().open_reservations, 2);
    assert_eq!(ledger.release_interrupted_reservations().await.unwrap(), 2);
    let info = ledger.key_info("k1").await.unwrap().unwrap();
    assert_eq!((info.balance_msat, info.reserved_msat), (5_000, 0));
    let t = ledger.totals().await.unwrap();
    assert_eq!((t.open_reservations, t.reserved_msat), (0, 0));
    assert!(t.conserved(), "{t:?}");
}

#[tokio::test]
async fn ending_a_reservation_never_held_is_an_error_and_changes_nothing() {
    let ledger = Ledger::open(&temp_path("unheld"), LedgerSync::Full).unwrap();
    funded(&ledger, "t1", "k1", 5_000).await;
    let r1 = ledger.reserve("k1", "r1", 1_000, "m").await.unwrap();
    ledger.release_interrupted_reservations().await.unwrap(); // as a restart would
    assert!(matches!(ledger.settle(&r1, 500, "late").await.unwrap_err(), LedgerError::Schema(_)));
    let info = ledger.key_info("k1").await.unwrap().unwrap();
    assert_eq!((info.balance_msat, info.reserved_msat, info.spent_msat), (5_000, 0, 0));
    assert!(ledger.totals().await.unwrap().conserved());
}

#[tokio::test]
async fn the_same_proofs_under_another_encoding_are_not_redeemed_twice() {
    let ledger = Ledger::open(&temp_path("ys"), LedgerSync::Normal).unwrap();
    let ys = vec!["02aa".to_string(), "02bb".to_string()];
    ledger.begin_redemption("cashuA-form", "k", "m", 2_000, &ys).await.unwrap();
    assert_eq!(
        ledger.begin_redemption("cashuB-form", "k", "m", 2_000, &ys).await.unwrap(),
        RedemptionState::ProofsBusy
    );
    ledger.complete_redemption("cashuA-form", KeyKind::Key, 2_000, 0).await.unwrap();
    assert_eq!(
        ledger.begin_redemption("cashuB-form", "k", "m", 2_000, &ys[1..]).await.unwrap(),
        RedemptionState::ProofsUsed
    );
    // A failed redemption frees its proofs.
    ledger.begin_redemption("t3", "k", "m", 1_000, &["02cc".to_string()]).await.unwrap();
    ledger.fail_redemption("t3").await.unwrap();
    assert_eq!(
        ledger.begin_redemption("t4", "k", "m", 1_000, &["02cc".to_string()]).await.unwrap(),
        RedemptionState::Started
    );
}

#[tokio::test]
async fn a_failed_or_foreign_redemption_is_never_credited() {
    let ledger = Ledger::open(&temp_path("foreign"), LedgerSync::Normal).unwrap();
    let ys = vec!["02ee".to_string()];
    // T1 (a bad re-encoding) fails; T2, the real token with the same proofs, is redeemed.
    ledger.begin_redemption("t1", "attacker", "m", 9_000, &ys).await.unwrap();
    ledger.fail_redemption("t1").await.unwrap();
    ledger.begin_redemption("t2", "owner", "m", 1_000, &ys).await.unwrap();
    ledger.complete_redemption("t2", KeyKind::Key, 1_000, 0).await.unwrap();
    // Completing the failed one must not credit anybody.
    assert!(ledger.complete_redemption("t1", KeyKind::Key, 1_000, 0).await.is_err());
    assert!(ledger.key_info("attacker").await.unwrap().is_none());
    let t = ledger.totals().await.unwrap();
    assert_eq!(t.credited_msat, 1_000);
    assert!(t.conserved());
}

#[tokio::test]
async fn invoices_credit_once_even_late() {
    let ledger = Ledger::open(&temp_path("invoice"), LedgerSync::Normal).unwrap();
    let invoice = Invoice {
        id: "inv1".into(),
        purpose: "create".into(),
        key_hash: "k1".into(),
        mint_url: "http://mint".into(),
        quote_id: "q1".into(),
        bolt11: "lnbc1".into(),
        payment_hash: "ph".into(),
        amount_msat: 5_000,
        credited_msat: 0,
        state: "unpaid".into(),
        created_at: 0,
        expires_at: now_secs() - 10,
    };
    ledger.add_invoice(invoice).await.unwrap();
    assert_eq!(ledger.open_invoices(3600).await.unwrap().len(), 1);
    // Expired, but paid late: still credited, exactly once.
    ledger.expire_invoice("inv1").await.unwrap();
    assert_eq!(ledger.open_invoices(3600).await.unwrap().len(), 1, "still watched within the grace period");
    assert!(ledger.open_invoices(0).await.unwrap().is_empty());
    assert_eq!(ledger.credit_invoice("inv1", 5_000).await.unwrap().state, "credited");
    assert_eq!(ledger.credit_invoice("inv1", 5_000).await.unwrap().credited_msat, 5_000);
    assert_eq!(ledger.key_info("k1").await.unwrap().unwrap().balance_msat, 5_000);
    let t = ledger.totals().await.unwrap();
    assert_eq!((t.credited_msat, t.invoices_credited_msat), (5_000, 5_000));
    assert!(t.conserved(), "{t:?}");
}

#[tokio::test]
async fn lightning_payouts_debit_first_and_return_the_unused_reserve() {
    let ledger = Ledger::open(&temp_path("ln-payout"), LedgerSync::Normal).unwrap();
    funded(&ledger, "t1", "k1", 10_500).await;
    let p = ledger.begin_lightning_payout("k1", "alice@example.com").await.unwrap().unwrap();
    assert_eq!(p.debit_msat, 10_500);
    assert!(ledger.begin_lightning_payout("k1", "alice@example.com").await.unwrap().is_none(), "nothing left");
    // Only token payouts are failed wholesale at start; a Lightning one waits for its mint.
    assert!(ledger.pending_payouts().await.unwrap().is_empty());
    ledger.quote_lightning_payout(p.id, "http://mint", "lnbc", "mq1", 8_000, 2_000).await.unwrap();
    let pending = ledger.pending_lightning_payouts().await.unwrap();
    assert_eq!((pending.len(), pending[0].quote_id.as_deref()), (1, Some("mq1")));
    assert!(ledger.totals().await.unwrap().conserved());
    // Paid with a 1 sat fee: the unused part of the debit (1.5 sat) returns to the key, once.
    ledger.complete_lightning_payout(p.id, 8_000, 1_000).await.unwrap();
    ledger.complete_lightning_payout(p.id, 8_000, 1_000).await.unwrap();
    assert_eq!(ledger.key_info("k1").await.unwrap().unwrap().balance_msat, 1_500);
    let t = ledger.totals().await.unwrap();
    assert_eq!((t.paid_out_msat, t.payout_fees_msat, t.paid_out_debit_msat, t.payouts_open), (8_000, 1_000, 9_000, 0));
    assert!(t.conserved(), "{t:?}");
    let last = ledger.latest_lightning_payout("k1").await.unwrap().unwrap();
    assert_eq!((last.state.as_str(), last.destination.as_str()), ("ready", "alice@example.com"));

    // A failed one gives the whole debit back; an expired key with a failed refund waits.
    ledger.set_refund_options("k1", Some("alice@example.com".into()), Some(now_secs() - 1)).await.unwrap();
    assert_eq!(ledger.expired_refundable_keys(1_000, 600).await.unwrap().len(), 1);
    let p2 = ledger.begin_lightning_payout("k1", "alice@example.com").await.unwrap().unwrap();
    ledger.fail_payout(p2.id).await.unwrap();
    assert_eq!(ledger.key_info("k1").await.unwrap().unwrap().balance_msat, 1_500);
    assert!(ledger.expired_refundable_keys(1_000, 600).await.unwrap().is_empty(), "backs off after a failure");
    assert!(ledger.totals().await.unwrap().conserved());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_full_sync_every_durable_answer_is_committed_and_concurrent_settlements_conserve() {
    let path = temp_path("fullsync");
    let ledger = Ledger::open(&path, LedgerSync::Full).unwrap();
    funded(&ledger, "t1", "k1", 1_000_000).await;
    // A durable answer means committed: another connection (another process) already sees it.
    let reader = open_reader(&path).unwrap();
    assert_eq!(read_totals(&reader).unwrap().credited_msat, 1_000_000);

    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            let r = ledger.reserve("k1", &format!("r{i}"), 1_000, "m").await.unwrap();
            if i % 4 == 0 {
                ledger.release(&r, "upstream failed").await.unwrap()
            } else {
                ledger.settle(&r, 500 + i, "ok").await.unwrap()
            }
        }));
    }
    let mut charged = 0;
    for t in tasks {
        let settled = t.await.unwrap();
        assert!(settled.first_time);
        charged += settled.charged_msat;
    }
    let t = read_totals(&reader).unwrap();
    assert_eq!((t.charged_msat, t.open_reservations, t.reserved_msat), (charged, 0, 0));
    assert_eq!(t.balances_msat, 1_000_000 - charged);
    assert!(t.conserved(), "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_ends_are_seen_at_once_and_on_disk_after_a_flush() {
    let path = temp_path("detached");
    let ledger = Ledger::open(&path, LedgerSync::Full).unwrap();
    funded(&ledger, "t1", "k1", 100_000).await;
    let reader = open_reader(&path).unwrap();

    // A reservation alone is not committed right away (nobody waits on it) ...
    let reserved_at = std::time::Instant::now();
    let r1 = ledger.reserve("k1", "r1", 10_000, "m").await.unwrap();
    let on_disk = read_totals(&reader).unwrap().reserved_msat;
    if reserved_at.elapsed() < store::VISIBLE_LINGER / 2 {
        assert_eq!(on_disk, 0, "committed before anything waited on it");
    }
    // ... and the charge that ends it is visible to the next job before anyone waits for it.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    ledger
        .end_detached(&r1, Some(2_500), "ok", move |result| {
            let _ = done_tx.send(result);
        })
        .await
        .unwrap();
    let info = ledger.key_info("k1").await.unwrap().unwrap();
    assert_eq!((info.balance_msat, info.reserved_msat), (97_500, 0));
    let settled = done_rx.await.unwrap().unwrap();
    assert_eq!(settled, Settled { charged_msat: 2_500, uncollected_msat: 0, first_time: true });

    // A flush resolves once every earlier job is on disk: another connection sees them.
    let r2 = ledger.reserve("k1", "r2", 10_000, "m").await.unwrap();
    ledger.end_detached(&r2, Some(1_000), "ok", |_| {}).await.unwrap();
    ledger.flush().await.unwrap();
    let t = read_totals(&reader).unwrap();
    assert_eq!((t.charged_msat, t.reserved_msat, t.open_reservations), (3_500, 0, 0));
    assert!(t.conserved(), "{t:?}");

    // A transaction holding only a reservation still commits after the linger.
    let _r3 = ledger.reserve("k1", "r3", 7_000, "m").await.unwrap();
    tokio::time::sleep(store::VISIBLE_LINGER * 4).await;
    assert_eq!(read_totals(&reader).unwrap().reserved_msat, 7_000);
}
