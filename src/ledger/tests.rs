use super::*;

/// A ledger file in a folder of its own, removed when the test passes (kept, to look at, when
/// it fails). Declared before the ledger, so that it outlives it.
struct TempLedger {
    dir: std::path::PathBuf,
    path: std::path::PathBuf,
}

fn temp_ledger(name: &str) -> TempLedger {
    let dir =
        std::env::temp_dir().join(format!("routstr-ledger-{name}-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    TempLedger { path: dir.join("ledger.sqlite"), dir }
}

impl Drop for TempLedger {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs `f` on the writer as a reservation's end does (no savepoint, nothing deferred written
/// first), answered as soon as it ran.
async fn on_the_hot_path<T: Send + 'static>(
    ledger: &Ledger,
    f: impl FnOnce(&Connection) -> Result<T, LedgerError> + Send + 'static,
) -> T {
    ledger.store.submit_with(Answer::Visible, Undo::FailStop, f).await.unwrap()
}

/// Credits `key` with a token of its own proofs (named after the token, so a ledger can be
/// funded by several).
async fn funded(ledger: &Ledger, token: &str, key: &str, msat: u64) {
    let proof = format!("02{}", hex::encode(token));
    let started = ledger.begin_redemption(token, key, "http://mint", msat, &[proof]).await.unwrap();
    assert_eq!(started, RedemptionState::Started);
    ledger.complete_redemption(token, KeyKind::Key, msat, 0).await.unwrap();
}

#[tokio::test]
async fn reserve_settle_release_conserve() {
    let temp = temp_ledger("basic");
    let ledger = Ledger::open(&temp.path, LedgerSync::Normal).unwrap();
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
async fn an_expired_key_pays_for_nothing_but_keeps_its_balance() {
    let temp = temp_ledger("expiry");
    let ledger = Ledger::open(&temp.path, LedgerSync::Normal).unwrap();
    funded(&ledger, "t1", "k1", 10_000).await;
    ledger.set_refund_options("k1", None, Some(now_secs() + 3600)).await.unwrap();
    // Before its expiry it pays as any key, and its copy is now in memory.
    let running = ledger.reserve("k1", "r1", 1_000, "m").await.unwrap();
    // The expiry moves to the past while a request runs: the copy follows the row.
    ledger.set_refund_options("k1", None, Some(now_secs() - 1)).await.unwrap();
    assert!(matches!(ledger.reserve("k1", "r2", 1, "m").await, Err(LedgerError::KeyExpired)));
    // The running request still ends and is charged; nothing else moves.
    assert_eq!(ledger.settle(&running, 400, "ok").await.unwrap().charged_msat, 400);
    let info = ledger.key_info("k1").await.unwrap().unwrap();
    assert_eq!((info.balance_msat, info.reserved_msat), (9_600, 0));
    assert!(matches!(info.usable(now_secs()), Err(LedgerError::KeyExpired)));
    // Read from its row too (a ledger opened again has no copies).
    drop(ledger);
    let ledger = Ledger::open(&temp.path, LedgerSync::Normal).unwrap();
    assert!(matches!(ledger.reserve("k1", "r3", 1, "m").await, Err(LedgerError::KeyExpired)));
    assert!(ledger.totals().await.unwrap().conserved());
}

#[tokio::test]
async fn reservation_is_conditional() {
    let temp = temp_ledger("cond");
    let ledger = Ledger::open(&temp.path, LedgerSync::Normal).unwrap();
    funded(&ledger, "t1", "k1", 1_000).await;
    let err = ledger.reserve("k1", "r1", 1_001, "m").await.unwrap_err();
    assert!(matches!(err, LedgerError::Insufficient { required: 1_001, available: 1_000 }));
    assert!(matches!(ledger.reserve("nope", "r2", 1, "m").await.unwrap_err(), LedgerError::KeyNotFound));
}

#[tokio::test]
async fn parallel_reservations_never_exceed_balance() {
    let temp = temp_ledger("parallel");
    let ledger = Ledger::open(&temp.path, LedgerSync::Normal).unwrap();
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
    let temp = temp_ledger("overrun");
    let ledger = Ledger::open(&temp.path, LedgerSync::Normal).unwrap();
    funded(&ledger, "t1", "k1", 1_000).await;
    let r1 = ledger.reserve("k1", "r1", 600, "m").await.unwrap();
    let s = ledger.settle(&r1, 1_500, "overrun").await.unwrap();
    assert_eq!((s.charged_msat, s.uncollected_msat), (1_000, 500));
    assert!(ledger.totals().await.unwrap().conserved());
}

#[tokio::test]
async fn redemption_is_once_per_token() {
    let temp = temp_ledger("redeem");
    let ledger = Ledger::open(&temp.path, LedgerSync::Normal).unwrap();
    let ys = vec!["02aa".to_string()];
    assert_eq!(ledger.begin_redemption("t", "k", "m", 5_000, &ys).await.unwrap(), RedemptionState::Started);
    assert_eq!(ledger.begin_redemption("t", "k", "m", 5_000, &ys).await.unwrap(), RedemptionState::InProgress);
    assert_eq!(ledger.pending_redemptions().await.unwrap().len(), 1);
    // The wallet may hold the token's proofs before the credit is recorded: they are not earnings.
    let pending = ledger.totals().await.unwrap();
    assert_eq!((pending.pending_redemptions_msat, pending.earnings_msat(5_000)), (5_000, 0));
    ledger.complete_redemption("t", KeyKind::Key, 4_900, 100).await.unwrap();
    let credited = ledger.totals().await.unwrap();
    assert_eq!((credited.pending_redemptions_msat, credited.earnings_msat(5_000)), (0, 100));
    // A foreign token being moved over Lightning: its proofs come only with its completion, so
    // a foreign mint that never pays holds no earnings back.
    let foreign_ys = vec!["02bb".to_string()];
    ledger.begin_redemption("f", "k2", "https://foreign", 7_000, &foreign_ys).await.unwrap();
    let swap = crate::ledger::lightning::Swap {
        mint_url: "m".into(),
        mint_quote: "q1".into(),
        melt_quote: "q2".into(),
        amount_msat: 6_000,
    };
    ledger.record_swap("f", swap).await.unwrap();
    assert_eq!(ledger.totals().await.unwrap().pending_redemptions_msat, 0);
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
    let temp = temp_ledger("payout");
    let ledger = Ledger::open(&temp.path, LedgerSync::Normal).unwrap();
    funded(&ledger, "t1", "k1", 2_500).await;
    let p = ledger.begin_payout("k1", Some("src"), None, false).await.unwrap().unwrap();
    assert_eq!(p.debit_msat, 2_500);
    assert_eq!(ledger.key_info("k1").await.unwrap().unwrap().balance_msat, 0);
    assert_eq!(ledger.latest_payout(None, Some("src")).await.unwrap(), PayoutLookup::Pending);
    assert!(ledger.totals().await.unwrap().conserved());
    // Only 2 whole sats could be paid: 500 msat return to the key, visibly.
    ledger.complete_payout(p.id, "http://mint", "cashuBxyz", 2_000, 2_000, 0).await.unwrap();
    assert_eq!(ledger.key_info("k1").await.unwrap().unwrap().balance_msat, 500);
    assert_eq!(
        ledger.latest_payout(Some("k1"), None).await.unwrap(),
        PayoutLookup::Ready { token: "cashuBxyz".into(), amount_msat: 2_000 }
    );
    let p2 = ledger.begin_payout("k1", None, None, false).await.unwrap().unwrap();
    ledger.fail_payout(p2.id).await.unwrap();
    ledger.fail_payout(p2.id).await.unwrap();
    assert_eq!(ledger.key_info("k1").await.unwrap().unwrap().balance_msat, 500);
    assert!(ledger.totals().await.unwrap().conserved());
    assert!(ledger.abandoned_send_tags().await.unwrap().contains(&format!("payout:{}", p2.id)));
}

#[tokio::test]
async fn stranded_change_is_not_paid_while_a_request_uses_the_key() {
    let temp = temp_ledger("stranded");
    let ledger = Ledger::open(&temp.path, LedgerSync::Normal).unwrap();
    funded(&ledger, "t1", "k1", 3_000).await;
    let r = ledger.reserve("k1", "r1", 1_000, "m").await.unwrap();
    assert!(ledger.begin_payout("k1", None, None, true).await.unwrap().is_none(), "a request holds part of it");
    ledger.settle(&r, 400, "usage").await.unwrap();
    let p = ledger.begin_payout("k1", None, None, true).await.unwrap().expect("idle now");
    assert_eq!(p.debit_msat, 2_600);
    assert!(ledger.totals().await.unwrap().conserved());
}

#[tokio::test]
async fn holds_end_with_the_process_and_nothing_is_charged_for_them() {
    let temp = temp_ledger("restart");
    let path = temp.path.clone();
    let interrupted = {
        let ledger = Ledger::open(&path, LedgerSync::Full).unwrap();
        funded(&ledger, "t1", "k1", 3_000).await;
        let r1 = ledger.reserve("k1", "r1", 2_000, "m").await.unwrap();
        assert_eq!(ledger.totals().await.unwrap().open_reservations, 1);
        r1
    };
    let ledger = Ledger::open(&path, LedgerSync::Full).unwrap();
    assert_eq!(ledger.release_interrupted_reservations().await.unwrap(), 0, "nothing was written for it");
    let info = ledger.key_info("k1").await.unwrap().unwrap();
    assert_eq!((info.balance_msat, info.reserved_msat), (3_000, 0));
    // The request of the old process cannot end here: this one never held it.
    assert!(matches!(ledger.settle(&interrupted, 500, "late").await.unwrap_err(), LedgerError::Schema(_)));
    let t = ledger.totals().await.unwrap();
    assert_eq!((t.open_reservations, t.charged_msat), (0, 0));
    assert!(t.conserved(), "{t:?}");
}

/// A request already recorded (not expected: ids are the node's own) is not charged again, and
/// its key's copy, read back, still has the charges waiting to be written.
#[tokio::test]
async fn a_request_recorded_before_is_not_charged_again_while_charges_wait() {
    let temp = temp_ledger("recorded");
    let ledger = Ledger::open_lingering(&temp.path, LedgerSync::Normal, Duration::from_secs(30)).unwrap();
    funded(&ledger, "t1", "k1", 10_000).await;
    let r0 = ledger.reserve("k1", "r0", 1_000, "m").await.unwrap();
    let r1 = ledger.reserve("k1", "r1", 1_000, "m").await.unwrap();
    ledger.end_detached(&r0, Some(400), "ok", |_| {}).await.unwrap();
    // r1's record appears behind the ledger's back, between the two ends (a hot-path job: the
    // charge to r0 stays unwritten).
    on_the_hot_path(&ledger, |c| {
        c.execute(
            "INSERT INTO reservations (request_id, key_hash, amount_msat, state, charged_msat, created_at)
                 VALUES ('r1', 'k1', 1000, 'charged', 0, 0)",
            [],
        )?;
        Ok(())
    })
    .await;
    let s = ledger.settle(&r1, 700, "again").await.unwrap();
    assert_eq!((s.charged_msat, s.first_time), (0, false));
    // The copy was read back less r0's charge: all of the rest can be reserved, and no more.
    let all = ledger.reserve("k1", "r2", 9_600, "m").await.unwrap();
    assert!(matches!(ledger.reserve("k1", "r3", 1, "m").await, Err(LedgerError::Insufficient { .. })));
    ledger.release(&all, "done").await.unwrap();
    let info = ledger.key_info("k1").await.unwrap().unwrap();
    assert_eq!((info.balance_msat, info.spent_msat), (9_600, 400));
}

/// Charges still unwritten when the ledger closes are written with its last commit.
#[tokio::test]
async fn a_closing_ledger_writes_its_unwritten_charges() {
    let temp = temp_ledger("closing");
    let path = temp.path.clone();
    {
        // The writer notices the ledger closed when its linger ends: shorter than opening's
        // wait for the lock (`LOCK_WAIT`).
        let ledger = Ledger::open_lingering(&path, LedgerSync::Full, Duration::from_secs(2)).unwrap();
        funded(&ledger, "t1", "k1", 10_000).await;
        for i in 0..5 {
            let r = ledger.reserve("k1", &format!("r{i}"), 1_000, "m").await.unwrap();
            ledger.end_detached(&r, Some(300), "ok", |_| {}).await.unwrap();
        }
        let on_disk = read_totals(&open_reader(&path).unwrap()).unwrap().charged_msat;
        assert_eq!(on_disk, 0, "committed before the ledger closed");
    }
    // Opening waits for the closing writer's last commit.
    let ledger = Ledger::open(&path, LedgerSync::Full).unwrap();
    let info = ledger.key_info("k1").await.unwrap().unwrap();
    assert_eq!((info.balance_msat, info.spent_msat, info.requests), (8_500, 1_500, 5));
    let t = ledger.totals().await.unwrap();
    assert_eq!(t.charged_msat, 1_500);
    assert!(t.conserved(), "{t:?}");
}

#[tokio::test]
async fn open_records_of_older_ledgers_are_released_at_start_too() {
    let temp = temp_ledger("legacy");
    let ledger = Ledger::open(&temp.path, LedgerSync::Normal).unwrap();
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
    let t = ledger.totals().await.unwrap();
    assert_eq!((t.open_reservations, t.reserved_msat), (2, 3_000));
    // The old hold counts against the key until released: 2,000 are free beside both.
    assert!(matches!(
        ledger.reserve("k1", "r-more", 2_001, "m").await.unwrap_err(),
        LedgerError::Insufficient { available: 2_000, .. }
    ));
    // (A node releases old holds at start, before any request runs; released here beside a
    // running one, to show the two kinds apart.)
    assert_eq!(ledger.release_interrupted_reservations().await.unwrap(), 1);
    let info = ledger.key_info("k1").await.unwrap().unwrap();
    assert_eq!((info.balance_msat, info.reserved_msat), (5_000, 1_000), "the running request still holds");
    ledger.reserve("k1", "r-more", 4_000, "m").await.unwrap();
    let t = ledger.totals().await.unwrap();
    assert_eq!((t.open_reservations, t.reserved_msat), (2, 5_000));
    assert!(t.conserved(), "{t:?}");
}

#[tokio::test]
async fn ending_a_reservation_never_held_is_an_error_and_changes_nothing() {
    let temp = temp_ledger("unheld");
    let ledger = Ledger::open(&temp.path, LedgerSync::Full).unwrap();
    funded(&ledger, "t1", "k1", 5_000).await;
    let mut r1 = ledger.reserve("k1", "r1", 1_000, "m").await.unwrap();
    r1.request_id = "never-reserved".into();
    assert!(matches!(ledger.settle(&r1, 500, "late").await.unwrap_err(), LedgerError::Schema(_)));
    let info = ledger.key_info("k1").await.unwrap().unwrap();
    assert_eq!((info.balance_msat, info.reserved_msat, info.spent_msat), (5_000, 1_000, 0));
    assert!(ledger.totals().await.unwrap().conserved());
}

#[tokio::test]
async fn the_same_proofs_under_another_encoding_are_not_redeemed_twice() {
    let temp = temp_ledger("ys");
    let ledger = Ledger::open(&temp.path, LedgerSync::Normal).unwrap();
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
    let temp = temp_ledger("foreign");
    let ledger = Ledger::open(&temp.path, LedgerSync::Normal).unwrap();
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
    let temp = temp_ledger("invoice");
    let ledger = Ledger::open(&temp.path, LedgerSync::Normal).unwrap();
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
    let temp = temp_ledger("ln-payout");
    let ledger = Ledger::open(&temp.path, LedgerSync::Normal).unwrap();
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
    let temp = temp_ledger("fullsync");
    let path = temp.path.clone();
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
    let temp = temp_ledger("detached");
    let path = temp.path.clone();
    let ledger = Ledger::open(&path, LedgerSync::Full).unwrap();
    funded(&ledger, "t1", "k1", 100_000).await;
    let reader = open_reader(&path).unwrap();

    // A reservation is held in memory, never written ...
    let r1 = ledger.reserve("k1", "r1", 10_000, "m").await.unwrap();
    assert_eq!(read_totals(&reader).unwrap().reserved_msat, 0);
    assert_eq!(ledger.totals().await.unwrap().reserved_msat, 10_000);
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

    // A transaction holding only `Visible` jobs still commits after the linger.
    ledger.store.submit(store::Answer::Visible, |c| Ok(c.execute("UPDATE keys SET requests = 99", [])?)).await.unwrap();
    tokio::time::sleep(store::VISIBLE_LINGER * 4).await;
    let requests: i64 = reader.query_row("SELECT requests FROM keys", [], |r| r.get(0)).unwrap();
    assert_eq!(requests, 99);
}

/// A small deterministic generator (xorshift64*), so a failing sequence can be replayed.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

#[derive(Default)]
struct ModelKey {
    balance: u64,
    holds: std::collections::BTreeMap<String, u64>,
    revoked: bool,
}

impl ModelKey {
    fn held(&self) -> u64 {
        self.holds.values().sum()
    }

    fn free(&self) -> u64 {
        self.balance - self.held()
    }
}

/// What a reservation should give, by the model.
fn expected_reservation(key: Option<&ModelKey>, amount: u64) -> Result<(), String> {
    match key {
        None => Err("KeyNotFound".into()),
        Some(k) if k.revoked => Err("KeyRevoked".into()),
        Some(k) if k.free() < amount => Err(format!("Insufficient({amount}, {})", k.free())),
        Some(_) => Ok(()),
    }
}

fn outcome<T>(result: Result<T, LedgerError>) -> Result<T, String> {
    result.map_err(|e| match e {
        LedgerError::KeyNotFound => "KeyNotFound".into(),
        LedgerError::KeyRevoked => "KeyRevoked".into(),
        LedgerError::Insufficient { required, available } => format!("Insufficient({required}, {available})"),
        other => panic!("unexpected ledger error: {other}"),
    })
}

#[tokio::test]
async fn random_money_moves_match_a_reference_model() {
    for seed in 1..=3u64 {
        let temp = temp_ledger("model");
        let ledger = Ledger::open(&temp.path, LedgerSync::Normal).unwrap();
        let mut dice = Dice(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let keys = ["ka", "kb", "kc"];
        let mut model: std::collections::HashMap<&str, ModelKey> = Default::default();
        let mut running: Vec<Reservation> = Vec::new();
        for step in 0..300u64 {
            let key = keys[dice.below(3) as usize];
            let what = dice.below(9);
            match what {
                0 => {
                    let (token, value) = (format!("t{step}"), 1 + dice.below(5_000));
                    ledger.begin_redemption(&token, key, "http://mint", value, &[format!("y{step}")]).await.unwrap();
                    ledger.complete_redemption(&token, KeyKind::Key, value, 0).await.unwrap();
                    model.entry(key).or_default().balance += value;
                }
                1 | 2 => {
                    let (id, amount) = (format!("r{step}"), dice.below(3_000));
                    let got = outcome(ledger.reserve(key, &id, amount, "m").await);
                    assert_eq!(
                        got.as_ref().map(|_| ()).map_err(String::clone),
                        expected_reservation(model.get(key), amount),
                        "step {step}"
                    );
                    if let Ok(r) = got {
                        model.get_mut(key).unwrap().holds.insert(id, amount);
                        running.push(r);
                    }
                }
                3 | 4 if !running.is_empty() => {
                    let r = running.swap_remove(dice.below(running.len() as u64) as usize);
                    let cost = (dice.below(3) > 0).then(|| dice.below(2 * r.amount_msat + 2));
                    let k = model.get_mut(r.key_hash.as_str()).unwrap();
                    let amount = k.holds.remove(&r.request_id).unwrap();
                    let collectable = k.balance - k.held();
                    let charged = cost.unwrap_or(0).min(collectable);
                    k.balance -= charged;
                    let settled = ledger.end(&r, cost, "model").await.unwrap();
                    let want = Settled {
                        charged_msat: charged,
                        uncollected_msat: cost.unwrap_or(0) - charged,
                        first_time: true,
                    };
                    assert_eq!(settled, want, "step {step}: hold {amount}, cost {cost:?}");
                    assert!(!ledger.settle(&r, 1, "again").await.unwrap().first_time);
                }
                5 => {
                    let got = outcome(ledger.begin_payout(key, None, None, false).await);
                    let Some(k) = model.get_mut(key) else {
                        assert_eq!(got.err().as_deref(), Some("KeyNotFound"));
                        continue;
                    };
                    let payout = got.unwrap();
                    assert_eq!(payout.as_ref().map_or(0, |p| p.debit_msat), k.free(), "step {step}: pays what is free");
                    let Some(p) = payout else { continue };
                    k.balance -= p.debit_msat;
                    if dice.below(2) == 0 {
                        ledger.fail_payout(p.id).await.unwrap();
                        k.balance += p.debit_msat;
                    } else {
                        let give_back = dice.below(p.debit_msat + 1);
                        let debit = p.debit_msat - give_back;
                        ledger.complete_payout(p.id, "http://mint", "cashuB-test", debit, debit, 0).await.unwrap();
                        k.balance += give_back;
                    }
                }
                6 => {
                    let amount = 1 + dice.below(3_000);
                    let got = outcome(ledger.admin_adjust(key.into(), -(amount as i64), "model".into()).await);
                    let want = match model.get(key) {
                        None => Err("KeyNotFound".to_string()),
                        Some(k) if k.free() < amount => Err(format!("Insufficient({amount}, {})", k.free())),
                        Some(_) => Ok(()),
                    };
                    assert_eq!(got.as_ref().map(|_| ()).map_err(String::clone), want, "step {step}");
                    if got.is_ok() {
                        model.get_mut(key).unwrap().balance -= amount;
                    }
                }
                7 => {
                    let revoked = !model.get(key).is_some_and(|k| k.revoked);
                    let got = outcome(ledger.admin_set_revoked(key.into(), revoked).await);
                    match model.get_mut(key) {
                        Some(k) => {
                            assert!(got.is_ok(), "step {step}");
                            k.revoked = revoked;
                        }
                        None => assert!(got.is_err(), "step {step}"),
                    }
                }
                _ => {}
            }
            for key in keys {
                let info = ledger.key_info(key).await.unwrap();
                let seen = info.map(|i| (i.balance_msat, i.reserved_msat, i.revoked));
                let want = model.get(key).map(|k| (k.balance, k.held(), k.revoked));
                assert_eq!(seen, want, "seed {seed}, step {step} ({what}): key {key}");
            }
            let t = ledger.totals().await.unwrap();
            assert!(t.conserved(), "seed {seed}, step {step}: {t:?}");
            assert_eq!(t.open_reservations, running.len() as u64);
            assert_eq!(t.reserved_msat, model.values().map(ModelKey::held).sum::<u64>());
        }
    }
}

/// Requests, payouts, operator debits and credits on the same keys at once: a request charged
/// within its hold is always paid in full (nothing else can take held money), and every msat is
/// accounted for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_money_is_never_taken_by_anything_running_at_the_same_time() {
    let temp = temp_ledger("contend");
    let ledger = Ledger::open(&temp.path, LedgerSync::Full).unwrap();
    let keys = ["ka", "kb"];
    for key in keys {
        let token = format!("seed-{key}");
        ledger.begin_redemption(&token, key, "http://mint", 200_000, std::slice::from_ref(&token)).await.unwrap();
        ledger.complete_redemption(&token, KeyKind::Key, 200_000, 0).await.unwrap();
    }
    let mut tasks = Vec::new();
    for task in 0..8u64 {
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            let (mut held, mut paid) = (0, 0);
            let mut dice = Dice(0x5151_0000 + task);
            for step in 0..150u64 {
                let key = ["ka", "kb"][dice.below(2) as usize];
                match dice.below(10) {
                    0 => {
                        if let Some(p) = ledger.begin_payout(key, None, None, false).await.unwrap() {
                            paid += 1;
                            if dice.below(2) == 0 {
                                ledger.fail_payout(p.id).await.unwrap();
                            } else {
                                ledger
                                    .complete_payout(p.id, "http://mint", "cashuB-test", p.debit_msat, p.debit_msat, 0)
                                    .await
                                    .unwrap();
                            }
                        }
                    }
                    1 => {
                        let _ = ledger.admin_adjust(key.into(), -(1 + dice.below(5_000) as i64), "x".into()).await;
                    }
                    2 => {
                        let token = format!("top-{task}-{step}");
                        ledger
                            .begin_redemption(&token, key, "http://mint", 20_000, std::slice::from_ref(&token))
                            .await
                            .unwrap();
                        ledger.complete_redemption(&token, KeyKind::Key, 20_000, 0).await.unwrap();
                    }
                    _ => {
                        let amount = 1 + dice.below(4_000);
                        let r = match ledger.reserve(key, &format!("r-{task}-{step}"), amount, "m").await {
                            Ok(r) => r,
                            Err(LedgerError::Insufficient { .. }) => continue,
                            Err(e) => panic!("{e}"),
                        };
                        held += 1;
                        tokio::task::yield_now().await;
                        let cost = dice.below(amount + 1);
                        let settled = ledger.settle(&r, cost, "ok").await.unwrap();
                        assert_eq!((settled.charged_msat, settled.uncollected_msat), (cost, 0), "held money was taken");
                    }
                }
                let info = ledger.key_info(key).await.unwrap().unwrap();
                assert!(info.reserved_msat <= info.balance_msat, "{info:?}");
            }
            (held, paid)
        }));
    }
    let (mut held, mut paid) = (0, 0);
    for t in tasks {
        let (h, p) = t.await.unwrap();
        (held, paid) = (held + h, paid + p);
    }
    // Both sides ran, many times over, for the race to mean something.
    assert!(held > 200 && paid > 20, "{held} requests held, {paid} payouts");
    let t = ledger.totals().await.unwrap();
    assert_eq!((t.open_reservations, t.reserved_msat, t.payouts_open), (0, 0, 0));
    assert!(t.conserved(), "{t:?}");
}

/// The interleaving the contention test can only hit by chance, made to happen: a request
/// reserving while a payout of the same key runs is decided after the payout, never against the
/// balance the payout is taking.
#[tokio::test]
async fn a_reservation_during_a_payout_waits_for_it() {
    let temp = temp_ledger("seize");
    let ledger = Ledger::open(&temp.path, LedgerSync::Normal).unwrap();
    funded(&ledger, "t1", "k1", 10_000).await;
    let running = ledger.reserve("k1", "r1", 4_000, "m").await.unwrap();
    let holds = ledger.holds.clone();
    let payout = ledger
        .store
        .run(move |c| {
            let payout = debit_for_payout(c, &holds, "k1", None, None, false)?.expect("6,000 are free");
            // Mid-job, as a request on another thread would see it.
            assert_eq!(holds.try_reserve("k1", "r2", 1, now_secs())?, Admission::Unknown);
            Ok(payout)
        })
        .await
        .unwrap();
    assert_eq!(payout.debit_msat, 6_000);
    // After the job the copy is back, lowered by the payout: decided in memory again.
    assert!(matches!(
        ledger.holds.try_reserve("k1", "r2", 1, now_secs()),
        Err(LedgerError::Insufficient { required: 1, available: 0 })
    ));
    let settled = ledger.settle(&running, 4_000, "ok").await.unwrap();
    assert_eq!((settled.charged_msat, settled.uncollected_msat), (4_000, 0));
    assert!(ledger.totals().await.unwrap().conserved());
}

#[tokio::test]
async fn one_node_per_ledger_file() {
    let temp = temp_ledger("exclusive");
    let path = temp.path.clone();
    let ledger = Ledger::open(&path, LedgerSync::Normal).unwrap();
    let started = std::time::Instant::now();
    let Err(LedgerError::Io(why)) = Ledger::open(&path, LedgerSync::Normal) else { panic!("opened twice") };
    assert!(why.contains("in use by another node"), "{why}");
    assert!(started.elapsed() >= store::LOCK_WAIT);
    // Let go once its writer is done: a restart in the same process opens it again.
    drop(ledger);
    Ledger::open(&path, LedgerSync::Normal).unwrap();
}

/// A key holder's answer leaves once its charge is queued, before it ran: the client's next
/// request must not be refused for a hold that charge is about to release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_request_sees_a_queued_charge() {
    let temp = temp_ledger("next");
    let ledger = Ledger::open(&temp.path, LedgerSync::Full).unwrap();
    funded(&ledger, "t1", "k1", 10_000).await;
    for round in 0..50u64 {
        let available = ledger.key_info("k1").await.unwrap().unwrap().available_msat();
        let r = ledger.reserve("k1", &format!("a{round}"), available, "m").await.unwrap();
        ledger.end_detached(&r, Some(100), "ok", |_| {}).await.unwrap();
        let next = ledger.reserve("k1", &format!("b{round}"), available - 100, "m").await.unwrap();
        ledger.release(&next, "done").await.unwrap();
    }
    let info = ledger.key_info("k1").await.unwrap().unwrap();
    assert_eq!((info.balance_msat, info.reserved_msat), (5_000, 0));
}

/// A charge is taken from the key's copy, not from a row read in its job: credits and debits
/// made while the request ran are in the copy it is taken from, and with a key whose copy was
/// dropped the row is read instead.
#[tokio::test]
async fn a_charge_sees_every_change_made_while_its_request_ran() {
    let temp = temp_ledger("copy");
    let ledger = Ledger::open(&temp.path, LedgerSync::Normal).unwrap();
    funded(&ledger, "t1", "k1", 1_000).await;
    funded(&ledger, "t2", "k2", 1_000).await;
    let r1 = ledger.reserve("k1", "r1", 600, "m").await.unwrap();
    // A top-up while r1 runs: r1's overrun may take it.
    funded(&ledger, "t3", "k1", 5_000).await;
    let s = ledger.settle(&r1, 4_000, "overrun").await.unwrap();
    assert_eq!((s.charged_msat, s.uncollected_msat), (4_000, 0));
    // An operator debit while r2 runs: r2 may not take what it took.
    let r2 = ledger.reserve("k1", "r2", 500, "m").await.unwrap();
    ledger.admin_adjust("k1".into(), -1_400, "debit".into()).await.unwrap();
    let s = ledger.settle(&r2, 900, "overrun").await.unwrap();
    assert_eq!((s.charged_msat, s.uncollected_msat), (600, 300));
    // Without a copy (as after a failed read-back), the row is read.
    let r3 = ledger.reserve("k2", "r3", 300, "m").await.unwrap();
    ledger.holds.forget_copies();
    let s = ledger.settle(&r3, 250, "ok").await.unwrap();
    assert_eq!((s.charged_msat, s.uncollected_msat), (250, 0));
    let (k1, k2) = (ledger.key_info("k1").await.unwrap().unwrap(), ledger.key_info("k2").await.unwrap().unwrap());
    assert_eq!((k1.balance_msat, k1.spent_msat, k1.requests), (0, 4_600, 2));
    assert_eq!((k2.balance_msat, k2.spent_msat, k2.requests), (750, 250, 1));
    assert!(ledger.totals().await.unwrap().conserved());
}

/// Reads of whole tables run beside the writer: they see every job queued before them, in one
/// snapshot, and payments queued after them do not wait for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_reads_do_not_hold_up_payments() {
    let temp = temp_ledger("reader");
    let ledger = Ledger::open(&temp.path, LedgerSync::Full).unwrap();
    funded(&ledger, "t1", "k1", 10_000).await;
    let r1 = ledger.reserve("k1", "r1", 1_000, "m").await.unwrap();
    ledger.end_detached(&r1, Some(400), "queued", |_| {}).await.unwrap();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let store = ledger.store.clone();
    let slow_read = tokio::spawn(async move {
        store
            .read(move |c| {
                let first = read_totals(c)?;
                let _ = started_tx.send(());
                std::thread::sleep(Duration::from_secs(3));
                Ok((first, read_totals(c)?))
            })
            .await
    });
    started_rx.await.unwrap();
    // While the read holds its snapshot, a payment runs and is durable.
    let began = std::time::Instant::now();
    let r2 = ledger.reserve("k1", "r2", 1_000, "m").await.unwrap();
    ledger.settle(&r2, 700, "ok").await.unwrap();
    // Behind the read it would take its 3 s; the margin is for a slow disk's fsync.
    assert!(began.elapsed() < Duration::from_millis(2_500), "waited {:?} behind a read", began.elapsed());
    let (first, last) = slow_read.await.unwrap().unwrap();
    // The read saw the charge queued before it, not the one made during it, in both sums.
    assert_eq!((first.charged_msat, last.charged_msat), (400, 400));
    assert_eq!(ledger.totals().await.unwrap().charged_msat, 1_100);
    assert!(ledger.totals().await.unwrap().conserved());
}

/// A batch of charges to one key is written to its row together, before anything else reads
/// the row: a debit queued behind them sees every one, and so does the row on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_charges_to_a_key_is_written_together_before_anything_reads_it() {
    let temp = temp_ledger("deferred");
    let path = temp.path.clone();
    let ledger = Ledger::open_lingering(&path, LedgerSync::Full, Duration::from_secs(30)).unwrap();
    funded(&ledger, "t1", "k1", 100_000).await;
    let reader = open_reader(&path).unwrap();
    let key_on_disk = |key: &str| {
        reader
            .query_row("SELECT balance_msat, spent_msat, requests FROM keys WHERE key_hash = ?1", [key], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
            })
            .unwrap()
    };
    // Charges and a release, lingering in one transaction.
    for i in 0..20 {
        let r = ledger.reserve("k1", &format!("r{i}"), 1_000, "m").await.unwrap();
        ledger.end_detached(&r, if i == 19 { None } else { Some(700) }, "ok", |_| {}).await.unwrap();
    }
    // On the writer, in the open transaction, the row itself has none of them yet (a hot-path
    // job, like the ends: nothing deferred is written before it).
    let row_in_transaction = on_the_hot_path(&ledger, |c| {
        Ok(c.query_row("SELECT balance_msat, spent_msat, requests FROM keys WHERE key_hash = 'k1'", [], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        })?)
    })
    .await;
    assert_eq!(row_in_transaction, (100_000, 0, 0));
    assert_eq!(key_on_disk("k1"), (100_000, 0, 0), "committed before the linger, with nobody waiting");
    // A debit of all that is left: possible only once the row has every charge.
    let debited = ledger.admin_adjust("k1".into(), -(100_000 - 19 * 700), "all".into()).await.unwrap();
    assert_eq!(debited.info.balance_msat, 0);
    assert_eq!(key_on_disk("k1"), (0, 19 * 700, 19));
}

/// A key whose copy is gone while charges to it wait to be written is read less them.
#[tokio::test]
async fn a_key_read_while_its_charges_wait_is_read_less_them() {
    let temp = temp_ledger("deferred-read");
    let ledger = Ledger::open_lingering(&temp.path, LedgerSync::Normal, Duration::from_secs(30)).unwrap();
    funded(&ledger, "t1", "k1", 1_000).await;
    let r1 = ledger.reserve("k1", "r1", 600, "m").await.unwrap();
    let r2 = ledger.reserve("k1", "r2", 300, "m").await.unwrap();
    ledger.end_detached(&r1, Some(600), "ok", |_| {}).await.unwrap();
    // Between the two ends, on the writer (a hot-path job: nothing deferred is written first).
    let holds = ledger.holds.clone();
    on_the_hot_path(&ledger, move |_| {
        holds.forget_copies();
        Ok(())
    })
    .await;
    // r2's overrun may take only what r1's charge left.
    let s = ledger.settle(&r2, 500, "overrun").await.unwrap();
    assert_eq!((s.charged_msat, s.uncollected_msat), (400, 100));
    let k1 = ledger.key_info("k1").await.unwrap().unwrap();
    assert_eq!((k1.balance_msat, k1.spent_msat, k1.requests), (0, 1_000, 2));
    assert!(ledger.totals().await.unwrap().conserved());
}

/// A refused operator debit seizes the key too: its copy is back after the job.
#[tokio::test]
async fn a_refused_debit_gives_the_key_its_copy_back() {
    let temp = temp_ledger("refused");
    let ledger = Ledger::open(&temp.path, LedgerSync::Normal).unwrap();
    funded(&ledger, "t1", "k1", 10_000).await;
    let running = ledger.reserve("k1", "r1", 4_000, "m").await.unwrap();
    let refused = ledger.admin_adjust("k1".into(), -6_001, "too much".into()).await.unwrap_err();
    assert!(matches!(refused, LedgerError::Insufficient { required: 6_001, available: 6_000 }));
    assert_eq!(ledger.holds.try_reserve("k1", "r2", 6_000, now_secs()).unwrap(), Admission::Held);
    ledger.settle(&running, 4_000, "ok").await.unwrap();
}

/// Key holders' charges (nobody waits for their commit) gather before one commit covers them
/// all; a job that waits for the disk commits them at once, however many are queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_charges_share_a_commit_unless_someone_waits() {
    let temp = temp_ledger("background");
    let path = temp.path.clone();
    let ledger = Ledger::open_lingering(&path, LedgerSync::Full, Duration::from_secs(30)).unwrap();
    funded(&ledger, "t1", "k1", 1_000_000).await;
    let reader = open_reader(&path).unwrap();
    let charged_on_disk = || read_totals(&reader).unwrap().charged_msat;

    // One, to put the writer to sleep; then more than a batch (the writer takes 256 jobs at a
    // time) queue behind it.
    for i in 0..301 {
        let r = ledger.reserve("k1", &format!("r{i}"), 1_000, "m").await.unwrap();
        ledger.end_detached(&r, Some(100), "ok", |_| {}).await.unwrap();
        if i == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(charged_on_disk(), 0, "committed before the linger, with nobody waiting");
    let flushed_at = std::time::Instant::now();
    ledger.flush().await.unwrap();
    assert!(flushed_at.elapsed() < Duration::from_secs(5), "the flush waited out the linger");
    assert_eq!(charged_on_disk(), 30_100);
    drop(ledger);

    // With the node's linger, charges alone reach the disk soon after.
    let temp = temp_ledger("background-default");
    let path = temp.path.clone();
    let ledger = Ledger::open(&path, LedgerSync::Full).unwrap();
    funded(&ledger, "t1", "k1", 100_000).await;
    let reader = open_reader(&path).unwrap();
    let r = ledger.reserve("k1", "r", 1_000, "m").await.unwrap();
    ledger.end_detached(&r, Some(100), "ok", |_| {}).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while read_totals(&reader).unwrap().charged_msat != 100 {
        assert!(std::time::Instant::now() < deadline, "a lone charge never committed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn records_past_retention_are_folded_and_every_sum_stays() {
    const DAY: i64 = retention::DAY_SECS;
    let temp = temp_ledger("retention");
    let ledger = Ledger::open(&temp.path, LedgerSync::Normal).unwrap();
    funded(&ledger, "t1", "k1", 1_000_000).await;
    for (i, model) in ["gpt", "gpt", "llama", "gpt", "llama", "gpt", "gpt"].into_iter().enumerate() {
        let r = ledger.reserve("k1", &format!("r{i}"), 10_000, model).await.unwrap();
        ledger.settle(&r, 1_000 + i as u64, "ok").await.unwrap();
    }
    let released = ledger.reserve("k1", "r-released", 10_000, "llama").await.unwrap();
    ledger.release(&released, "upstream failed").await.unwrap();
    ledger.admin_adjust("k1".into(), -5_000, "debit".into()).await.unwrap();
    for i in 7..9 {
        let r = ledger.reserve("k1", &format!("r{i}"), 10_000, "gpt").await.unwrap();
        ledger.settle(&r, 3_000, "ok").await.unwrap();
    }
    // All but the last two records began 40 or 41 days ago.
    ledger
        .store
        .run(move |c| {
            Ok(c.execute(
                "UPDATE reservations SET created_at = created_at - ?1 - (rowid % 2) * ?2
                 WHERE rowid <= (SELECT MAX(rowid) - 2 FROM reservations)",
                [40 * DAY, DAY],
            )?)
        })
        .await
        .unwrap();
    let sums = |ledger: Ledger| async move {
        (
            ledger.totals().await.unwrap(),
            ledger.admin_model_totals().await.unwrap(),
            ledger.admin_usage(0, DAY).await.unwrap(),
            ledger.key_info("k1").await.unwrap(),
        )
    };
    let before = sums(ledger.clone()).await;
    assert!(before.0.conserved(), "{:?}", before.0);

    // Eight requests' records fold; the dashboard's debit stays on record.
    assert_eq!(ledger.prune_records(Duration::from_secs(30 * 86_400)).await.unwrap(), 8);
    assert_eq!(sums(ledger.clone()).await, before, "sums over all time are unchanged");
    let pruned = ledger.admin_request("r0".into()).await.unwrap();
    assert!(pruned["reservation"].is_null(), "{pruned}");
    let kept = ledger.admin_request("r8".into()).await.unwrap();
    assert_eq!(kept["reservation"]["charged_msat"], 3_000);
    let (left, days) = ledger
        .store
        .run(|c| {
            let left: i64 = c.query_row("SELECT COUNT(*) FROM reservations", [], |r| r.get(0))?;
            let days: i64 = c.query_row("SELECT COUNT(DISTINCT day) FROM reservations_rollup", [], |r| r.get(0))?;
            Ok((left, days))
        })
        .await
        .unwrap();
    assert_eq!((left, days), (3, 2));
    let history = ledger.admin_transactions(100, None).await.unwrap();
    let kinds: Vec<&str> = history.iter().filter_map(|t| t["kind"].as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "debit").count(), 1, "{history:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "charge").count(), 2, "{history:?}");
    // Nothing left to fold; the next requests are recorded and counted as before.
    assert_eq!(ledger.prune_records(Duration::from_secs(30 * 86_400)).await.unwrap(), 0);
    let r = ledger.reserve("k1", "r9", 10_000, "gpt").await.unwrap();
    ledger.settle(&r, 500, "ok").await.unwrap();
    let after = ledger.totals().await.unwrap();
    assert!(after.conserved(), "{after:?}");
    assert_eq!(after.charged_msat, before.0.charged_msat + 500);
}

#[tokio::test]
async fn pruning_a_long_history_goes_in_batches_and_keeps_the_charged_sum() {
    let temp = temp_ledger("retention-batches");
    let ledger = Ledger::open(&temp.path, LedgerSync::Normal).unwrap();
    funded(&ledger, "t1", "k1", 1_000).await;
    let records = 2 * retention::BATCH as i64 + 500;
    // A long history written directly (3 msat a record; a ledger this old has its own credits,
    // so only the charged sum is compared).
    ledger
        .store
        .run(move |c| {
            Ok(c.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
                 INSERT INTO reservations (request_id, key_hash, amount_msat, state, charged_msat, model, created_at, ended_at)
                 SELECT 'old-' || i, 'k1', 10, 'charged', 3, 'm' || (i % 3), 1000000 + i * 600, 1000000 + i * 600 FROM n",
                [records],
            )?)
        })
        .await
        .unwrap();
    let charged = ledger.totals().await.unwrap().charged_msat;
    assert_eq!(charged, 3 * records as u64);
    let models = ledger.admin_model_totals().await.unwrap();
    assert_eq!(ledger.prune_records(Duration::from_secs(86_400)).await.unwrap(), records as u64);
    assert_eq!(ledger.totals().await.unwrap().charged_msat, charged);
    assert_eq!(ledger.admin_model_totals().await.unwrap(), models);
}

#[tokio::test]
async fn a_fold_stops_at_a_record_too_young_and_passes_over_debits() {
    let temp = temp_ledger("retention-order");
    let ledger = Ledger::open(&temp.path, LedgerSync::Normal).unwrap();
    funded(&ledger, "t1", "k1", 1_000).await;
    // In write order: old, a debit, old, young (a request that began late), old.
    ledger
        .store
        .run(|c| {
            for (id, created_at) in
                [("old-1", 1_000), ("admin-adjust-x", 1_100), ("old-2", 1_200), ("young", now_secs()), ("old-3", 1_300)]
            {
                c.execute(
                    "INSERT INTO reservations (request_id, key_hash, amount_msat, state, charged_msat, model, created_at, ended_at)
                     VALUES (?1, 'k1', 10, 'charged', 2, 'm', ?2, ?2)",
                    params![id, created_at],
                )?;
            }
            Ok(())
        })
        .await
        .unwrap();
    let charged = ledger.totals().await.unwrap().charged_msat;
    assert_eq!(ledger.prune_records(Duration::from_secs(86_400)).await.unwrap(), 2);
    let left: Vec<String> = ledger
        .store
        .run(|c| {
            let mut stmt = c.prepare("SELECT request_id FROM reservations ORDER BY rowid")?;
            let ids = stmt.query_map([], |r| r.get(0))?.collect::<Result<Vec<_>, _>>()?;
            Ok(ids)
        })
        .await
        .unwrap();
    assert_eq!(left, ["admin-adjust-x", "young", "old-3"]);
    assert_eq!(ledger.totals().await.unwrap().charged_msat, charged);
}
