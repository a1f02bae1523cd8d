//! Lightning through the mints: invoice top-ups, Lightning refunds (asked and at expiry),
//! operator payouts of earnings, tokens from a foreign mint, and the node killed at each step of
//! a melt and of a mint. Real cdk mints with the fake Lightning backend (one trusted, one
//! foreign, one the refund recipient's), a local LNURL-pay server, and the built binary.

use std::time::{Duration, Instant};

use routstr_node::demo::lnurl_server::LnurlServer;
use routstr_node::demo::mint::{
    mint_invoice_source, mint_token, pending_invoice_source, redeem_token, start_test_mint, TestMint, TestMintConfig,
};
use serde_json::{json, Value};

use crate::harness::{chat, Answer, Harness, Options};

/// A Lightning wallet at its own mint, reachable by a Lightning address.
async fn recipient() -> (TestMint, LnurlServer) {
    let mint = start_test_mint(TestMintConfig::default()).await.expect("recipient mint");
    let server = LnurlServer::start(mint_invoice_source(mint.url.clone())).await.expect("LNURL server");
    (mint, server)
}

async fn lightning_node(name: &str, extra: Vec<(&'static str, String)>) -> Harness {
    let mut env = vec![("LIGHTNING_WATCH_SECONDS", "1".to_owned()), ("LNURL_ALLOW_PRIVATE_HOSTS", "true".to_owned())];
    env.extend(extra);
    Harness::start_with(name, Options { env, ..Default::default() }).await
}

/// Polls until `check` holds (or fails the test after `secs`).
async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn invoice(h: &Harness, sats: u64, key: Option<&str>) -> Answer {
    let purpose = if key.is_some() { "topup" } else { "create" };
    h.post("/v1/balance/lightning/invoice", key, &json!({ "amount_sats": sats, "purpose": purpose })).await
}

async fn status(h: &Harness, id: &str) -> Value {
    let a = h.get(&format!("/v1/balance/lightning/invoice/{id}/status"), None).await;
    assert_eq!(a.status, 200, "{}", a.json);
    a.json
}

async fn paid_status(h: &Harness, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = status(h, id).await;
        if s["status"] == "paid" {
            return s;
        }
        assert!(Instant::now() < deadline, "invoice never paid: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A request that may die with the node (a crash point): its answer, or `None`.
async fn try_post(h: &Harness, path: &str, headers: &[(&str, &str)], body: &Value) -> Option<u16> {
    let mut req = h.http.post(h.url(path)).json(body).timeout(Duration::from_secs(30));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.ok().map(|r| r.status().as_u16())
}

#[tokio::test]
async fn invoices_create_and_top_up_keys_once() {
    let mut h = lightning_node("ln-invoice", vec![]).await;

    let created = invoice(&h, 300, None).await;
    assert_eq!(created.status, 200, "{}", created.json);
    for field in ["invoice_id", "bolt11", "payment_hash", "expires_at"] {
        assert!(!created.json[field].is_null(), "{field} missing: {}", created.json);
    }
    assert_eq!(created.json["amount_sats"], 300);
    assert!(created.json["bolt11"].as_str().unwrap().starts_with("ln"));
    let id = created.json["invoice_id"].as_str().unwrap().to_owned();

    let paid = paid_status(&h, &id).await;
    h.paid_in_msat += 300_000;
    let key = paid["api_key"].as_str().expect("a create invoice shows its key").to_owned();
    assert!(key.starts_with("sk-"));
    assert_eq!(paid["msats"], 300_000);
    // Asked again: the same key, credited once.
    assert_eq!(status(&h, &id).await["api_key"], key.as_str());
    assert_eq!(h.balance(&key).await, (300_000, 0));

    // A top-up nobody polls: the watcher notices the payment and credits the key.
    let topup = invoice(&h, 200, Some(&key)).await;
    assert_eq!(topup.status, 200, "{}", topup.json);
    h.paid_in_msat += 200_000;
    let hk = key.clone();
    eventually(15, "the watcher credits the top-up", || {
        let (h, k) = (&h, &hk);
        async move { h.balance(k).await.0 == 500_000 }
    })
    .await;
    let topped = status(&h, topup.json["invoice_id"].as_str().unwrap()).await;
    assert_eq!((topped["status"].as_str(), topped["api_key"].is_null()), (Some("paid"), true), "{topped}");
    assert_eq!(h.balance(&key).await, (500_000, 0));

    // The key pays for requests like any other.
    assert_eq!(h.post("/v1/chat/completions", Some(&key), &chat(false)).await.status, 200);

    // Bad input: clear errors.
    assert_eq!(invoice(&h, 0, None).await.status, 400);
    let no_key = h.post("/v1/balance/lightning/invoice", None, &json!({ "amount_sats": 5, "purpose": "topup" })).await;
    assert_eq!(no_key.status, 401);
    assert_eq!(h.get("/v1/balance/lightning/invoice/0123abcd/status", None).await.status, 404);
    assert_eq!(h.get("/v1/balance/lightning/invoice", None).await.status, 405);
    assert_eq!(h.totals().invoices_credited_msat, 500_000);
    h.assert_conserved().await;
}

/// An invoice that expires unpaid shows as expired; paid late, it is still credited, once.
#[tokio::test]
async fn expired_invoices_are_still_credited_when_paid_late() {
    let env = vec![("LIGHTNING_WATCH_SECONDS", "1".to_owned())];
    let options = Options { env, mint_lightning: Some((4, 1)), ..Default::default() };
    let mut h = Harness::start_with("ln-expiry", options).await;
    let created = invoice(&h, 40, None).await;
    assert_eq!(created.status, 200, "{}", created.json);
    let id = created.json["invoice_id"].as_str().unwrap().to_owned();
    assert_eq!(status(&h, &id).await["status"], "pending");
    let hid = id.clone();
    eventually(10, "the unpaid invoice expires", || {
        let (h, id) = (&h, &hid);
        async move { status(h, id).await["status"] == "expired" }
    })
    .await;
    // The fake Lightning backend pays it 4 s after it was made: late, but credited.
    let paid = paid_status(&h, &id).await;
    h.paid_in_msat += 40_000;
    assert_eq!(h.balance(paid["api_key"].as_str().unwrap()).await, (40_000, 0));
    assert_eq!(status(&h, &id).await["msats"], 40_000);
    h.assert_conserved().await;
}

#[tokio::test]
async fn refunds_go_over_lightning_when_asked_and_at_expiry() {
    let (_recipient_mint, lnurl) = recipient().await;
    let mut h = lightning_node("ln-refund", vec![]).await;
    let address = lnurl.address("alice");

    // An address that is not one: refused before anything is stored.
    let key = h.key(100).await;
    let bad = h
        .post_with(
            "/v1/balance/refund",
            &[("authorization", &format!("Bearer {key}")), ("refund-lnurl", "not an address")],
            &json!({}),
        )
        .await;
    assert_eq!(bad.status, 400, "{}", bad.json);

    let refund = h
        .post_with(
            "/v1/balance/refund",
            &[("authorization", &format!("Bearer {key}")), ("refund-lnurl", &address)],
            &json!({}),
        )
        .await;
    assert_eq!(refund.status, 200, "{}", refund.json);
    assert_eq!(refund.json["status"], "paid");
    assert_eq!(refund.json["recipient"], address.as_str());
    let sent_msat = refund.json["msats"].as_u64().unwrap();
    let fee_msat = refund.json["fee_msats"].as_u64().unwrap();
    assert!(refund.json["fee_reserve_msats"].as_u64().unwrap() >= fee_msat);
    assert!(sent_msat >= 90_000, "most of the balance went out: {}", refund.json);
    let invoices = lnurl.invoices();
    assert_eq!(invoices.last().map(|i| i.1), Some(sent_msat), "the recipient's invoice was for what was sent");
    // What was not used of the fee reserve stays on the key.
    let (left, _) = h.balance(&key).await;
    assert_eq!(left + sent_msat + fee_msat, 100_000);

    // An expiry already past would make a key that can pay for nothing: refused, token untouched.
    let token = h.token(50, false).await;
    let past = h
        .post_with(
            "/v1/balance/create",
            &[("refund-lnurl", &address), ("key-expiry-time", "1000")],
            &json!({ "initial_balance_token": token }),
        )
        .await;
    assert_eq!(past.status, 400, "{}", past.json);

    // A key with an address and an expiry: refunded without being asked.
    let expiry =
        (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 2).to_string();
    let created = h
        .post_with(
            "/v1/balance/create",
            &[("refund-lnurl", &address), ("key-expiry-time", &expiry)],
            &json!({ "initial_balance_token": token }),
        )
        .await;
    assert_eq!(created.status, 200, "{}", created.json);
    h.paid_in_msat += 50_000;
    let key2 = created.json["api_key"].as_str().unwrap().to_owned();
    let before = lnurl.invoices().len();
    eventually(20, "the expired key is refunded", || {
        let (h, k) = (&h, &key2);
        async move { h.balance(k).await.0 < 10_000 && h.totals().payouts_open == 0 }
    })
    .await;
    assert_eq!(lnurl.invoices().len(), before + 1, "one refund, not several");
    assert_eq!(lnurl.invoices().last().map(|i| i.1), Some(47_000), "50 sat less the fee reserve and margin");
    h.assert_conserved().await;

    // Past its expiry the key pays for nothing (403, PROTOCOL.md §4) and takes no more money,
    // though what the refund left on it (less than a Lightning payment's minimum) still shows.
    let (left, _) = h.balance(&key2).await;
    assert!(left > 0, "the refund's unused fee reserve stays on the key");
    let refused = h.post("/v1/chat/completions", Some(&key2), &chat(false)).await;
    assert_eq!((refused.status, refused.error_code()), (403, "key_expired"), "{}", refused.json);
    let topup_token = h.token(5, false).await;
    let topup = h.post("/v1/balance/topup", Some(&key2), &json!({ "cashu_token": topup_token })).await;
    assert_eq!((topup.status, topup.error_code()), (403, "key_expired"), "{}", topup.json);
    assert_eq!(h.redeem(&topup_token).await, 5, "the refused top-up's token was not taken");
    let invoice = invoice(&h, 100, Some(&key2)).await;
    assert_eq!((invoice.status, invoice.error_code()), (403, "key_expired"), "{}", invoice.json);
    assert_eq!(h.balance(&key2).await.0, left, "nothing was charged or credited");
    h.assert_conserved().await;
}

/// A payment that stays in flight (a stuck HTLC) is never taken for failed: the balance stays
/// debited (not refunded twice), the watcher keeps asking, the books balance meanwhile.
#[tokio::test]
async fn refunds_in_flight_stay_pending() {
    let recipient_mint = start_test_mint(TestMintConfig::default()).await.expect("recipient mint");
    let lnurl = LnurlServer::start(pending_invoice_source(recipient_mint.url.clone())).await.expect("LNURL server");
    let mut h = lightning_node("ln-pending", vec![("MINT_TIMEOUT_SECONDS", "2".into())]).await;
    let key = h.key(60).await;
    let address = lnurl.address("carol");
    let auth = format!("Bearer {key}");
    let refund =
        h.post_with("/v1/balance/refund", &[("authorization", &auth), ("refund-lnurl", &address)], &json!({})).await;
    assert_eq!(refund.status, 202, "{}", refund.json);
    assert_eq!(refund.json["status"], "pending");
    let invoices = lnurl.invoices().len();
    // Several watcher passes later: still pending, still debited.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let t = h.totals();
    assert_eq!((t.payouts_open, t.balances_msat), (1, 0), "{t:?}");
    assert!(t.conserved(), "{t:?}");
    // Asking again shows the refund in flight instead of paying again.
    let again = h.post_with("/v1/balance/refund", &[("authorization", &auth)], &json!({})).await;
    assert_eq!((again.status, again.json["status"].as_str()), (202, Some("pending")), "{}", again.json);
    assert_eq!(lnurl.invoices().len(), invoices, "no second payment was started");
    h.assert_no_secrets_in_logs();
}

#[tokio::test]
async fn operator_payouts_take_earnings_only() {
    let (_recipient_mint, lnurl) = recipient().await;
    let mut h = lightning_node(
        "ln-payout",
        vec![
            ("RECEIVE_LN_ADDRESS", lnurl.address("operator")),
            ("MIN_PAYOUT_SAT", "10".into()),
            ("PAYOUT_INTERVAL_SECONDS", "2".into()),
        ],
    )
    .await;
    let key = h.key(300).await;
    // The operator's own money: earnings.
    let deposit = h.token(120, false).await;
    let out = h.node.cli(&["wallet", "receive", &deposit]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    h.operator_in_msat += 120_000;

    eventually(20, "the operator is paid", || {
        let h = &h;
        async move { h.totals().operator_paid_msat > 0 }
    })
    .await;
    let t = h.totals();
    assert!(t.operator_paid_msat + t.operator_fees_msat <= 120_000, "never more than the earnings: {t:?}");
    assert!(t.operator_paid_msat >= 100_000, "most of the earnings: {t:?}");
    assert_eq!(lnurl.invoices().last().map(|i| i.1), Some(t.operator_paid_msat));
    // Users' balances untouched, and still fully backed.
    assert_eq!(h.balance(&key).await, (300_000, 0));
    let t = h.assert_conserved().await;
    assert_eq!(t.balances_msat, 300_000);
}

#[tokio::test]
async fn tokens_from_a_foreign_mint_are_moved_to_a_trusted_one() {
    let foreign = start_test_mint(TestMintConfig::default()).await.expect("foreign mint");
    let mut h = lightning_node("ln-foreign", vec![]).await;

    let token = mint_token(&foreign.url, 100, false).await.unwrap();
    let created = h.post("/v1/balance/create", None, &json!({ "initial_balance_token": token })).await;
    assert_eq!(created.status, 200, "{}", created.json);
    h.paid_in_msat += 100_000;
    let key = created.json["api_key"].as_str().unwrap().to_owned();
    let credited = created.json["balance"].as_u64().unwrap();
    assert!((95_000..100_000).contains(&credited), "credited less the Lightning fees: {credited}");
    assert_eq!(created.json["fee_msats"].as_u64(), Some(100_000 - credited), "the fees are shown: {}", created.json);
    assert_eq!(h.post("/v1/chat/completions", Some(&key), &chat(false)).await.status, 200);

    // Stateless: a foreign token pays a request; the change comes from the trusted mint.
    let token = mint_token(&foreign.url, 60, false).await.unwrap();
    let paid = h.post_with("/v1/chat/completions", &[("x-cashu", &token)], &chat(false)).await;
    assert_eq!(paid.status, 200, "{}", paid.json);
    h.paid_in_msat += 60_000;
    let change = paid.header("x-cashu").expect("change").to_owned();
    assert!(h.redeem(&change).await > 0, "the change is a real token of the trusted mint");

    // The same foreign token again: already spent.
    let again = h.post_with("/v1/chat/completions", &[("x-cashu", &token)], &chat(false)).await;
    assert_eq!(again.status, 400, "{}", again.json);

    // A foreign token its owner already spent elsewhere: refused before any melt, nothing credited.
    let spent = mint_token(&foreign.url, 20, false).await.unwrap();
    redeem_token(&foreign.url, &spent).await.unwrap();
    let refused = h.post("/v1/balance/create", None, &json!({ "initial_balance_token": spent })).await;
    assert_eq!((refused.status, refused.error_code()), (400, "token_already_spent"), "{}", refused.json);
    h.assert_conserved().await;
}

/// The node is killed at each step of a melt (refund, foreign token) and of a mint (invoice,
/// foreign token), restarted, and the books are checked: every sat accounted for once.
#[tokio::test]
async fn crashes_at_every_lightning_step_lose_nothing() {
    let (_recipient_mint, lnurl) = recipient().await;
    let foreign = start_test_mint(TestMintConfig::default()).await.expect("foreign mint");
    let mut h = lightning_node("ln-crash", vec![]).await;
    let address = lnurl.address("bob");

    // Refunds: killed after the debit, after the melt quote is recorded, after the melt.
    for (point, should_pay) in
        [("refund:after-debit", false), ("refund:after-quote", false), ("refund:after-melt", true)]
    {
        let key = h.key(40).await;
        h.node.set_env("ROUTSTR_TEST_FAILPOINT", Some(point));
        h.node.restart().await;
        let auth = format!("Bearer {key}");
        let answer =
            try_post(&h, "/v1/balance/refund", &[("authorization", &auth), ("refund-lnurl", &address)], &json!({}))
                .await;
        assert_eq!(answer, None, "{point}: the node died mid-refund");
        h.node.set_env("ROUTSTR_TEST_FAILPOINT", None);
        h.node.restart().await;
        eventually(20, "the interrupted refund is settled", || {
            let h = &h;
            async move { h.totals().payouts_open == 0 }
        })
        .await;
        let (left, _) = h.balance(&key).await;
        if should_pay {
            assert!(left < 10_000, "{point}: the melt happened, so the refund stands (left {left})");
        } else {
            assert_eq!(left, 40_000, "{point}: no melt, the balance is restored");
        }
        h.assert_conserved().await;
    }

    // Foreign tokens: killed after the swap is recorded, after the melt, after the mint.
    for (point, credited) in [("swap:after-record", false), ("swap:after-melt", true), ("swap:after-mint", true)] {
        let token = mint_token(&foreign.url, 30, false).await.unwrap();
        h.node.set_env("ROUTSTR_TEST_FAILPOINT", Some(point));
        h.node.restart().await;
        let answer = try_post(&h, "/v1/balance/create", &[], &json!({ "initial_balance_token": token })).await;
        assert_eq!(answer, None, "{point}: the node died mid-swap");
        h.node.set_env("ROUTSTR_TEST_FAILPOINT", None);
        h.node.restart().await;
        eventually(20, "the interrupted swap is settled", || {
            let h = &h;
            async move { h.totals().pending_redemptions == 0 }
        })
        .await;
        if credited {
            h.paid_in_msat += 30_000;
            // The client retries with the same token: the same key, credited once.
            let retry = h.post("/v1/balance/create", None, &json!({ "initial_balance_token": token })).await;
            assert_eq!(retry.status, 200, "{point}: {}", retry.json);
            assert!(retry.json["balance"].as_u64().unwrap() > 25_000, "{point}: {}", retry.json);
        } else {
            // Never melted: the token is the client's, unspent.
            assert_eq!(redeem_token(&foreign.url, &token).await.expect("still spendable"), 30, "{point}");
        }
        h.assert_conserved().await;
    }

    // An invoice: killed after its proofs were minted, before the key was credited (the
    // watcher is slowed down so that the status poll is what reaches the crash point).
    h.node.set_env("ROUTSTR_TEST_FAILPOINT", Some("invoice:after-mint"));
    h.node.set_env("LIGHTNING_WATCH_SECONDS", Some("600"));
    h.node.restart().await;
    let created = invoice(&h, 70, None).await;
    assert_eq!(created.status, 200, "{}", created.json);
    let id = created.json["invoice_id"].as_str().unwrap().to_owned();
    let died = h.http.get(h.url(&format!("/v1/balance/lightning/invoice/{id}/status"))).send().await;
    assert!(died.is_err(), "invoice:after-mint: the node died while crediting");
    h.node.set_env("ROUTSTR_TEST_FAILPOINT", None);
    h.node.set_env("LIGHTNING_WATCH_SECONDS", Some("1"));
    h.node.restart().await;
    let paid = paid_status(&h, &id).await;
    h.paid_in_msat += 70_000;
    assert_eq!(paid["msats"], 70_000);
    assert_eq!(h.balance(paid["api_key"].as_str().unwrap()).await, (70_000, 0));
    let t = h.assert_conserved().await;
    assert_eq!(t.invoices_credited_msat, 70_000, "credited exactly once");
}
