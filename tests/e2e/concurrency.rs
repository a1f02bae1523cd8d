//! Many requests at once never spend more than a balance, and one token is credited once.

use futures_util::future::join_all;
use serde_json::json;

use crate::harness::{chat, Harness};

#[tokio::test]
async fn parallel_requests_never_overspend_a_key() {
    let mut h = Harness::start("parallel-key").await;
    let key = h.key(35).await;
    // Each request may cost up to ~10 sats (5,000 completion tokens × 2 msat): 3 fit at once.
    let body = json!({ "model": "gpt-test", "stream": true, "max_tokens": 5000,
                       "messages": [{ "role": "user", "content": "count" }] });
    let requests = (0..24).map(|_| {
        h.http
            .post(h.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .header("x-stand-in-delay-ms", "20")
            .json(&body)
            .send()
    });
    let answers = join_all(requests).await;
    let mut ok = 0;
    let mut refused = 0;
    for a in answers {
        let a = a.unwrap();
        match a.status().as_u16() {
            200 => {
                ok += 1;
                let _ = a.text().await;
            }
            402 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(ok >= 3, "at least the requests that fit were served ({ok})");
    assert!(refused > 0, "the rest were refused, not overdrawn ({ok} served)");
    h.wait_until_settled().await;
    let (balance, reserved) = h.balance(&key).await;
    assert_eq!(reserved, 0);
    assert_eq!(balance, 35_000 - ok * (1 + 8 * 2));
    h.assert_conserved().await;
}

#[tokio::test]
async fn one_token_in_parallel_requests_is_credited_once() {
    let mut h = Harness::start("parallel-token").await;

    // As X-Cashu: exactly one request is paid by it.
    let token = h.token(20, false).await;
    let body = chat(false);
    let headers = [("x-cashu", token.as_str())];
    let answers = join_all((0..12).map(|_| h.post_with("/v1/chat/completions", &headers, &body))).await;
    let paid = answers.iter().filter(|a| a.status == 200).count();
    assert_eq!(paid, 1, "{:?}", answers.iter().map(|a| a.status).collect::<Vec<_>>());
    assert!(answers.iter().all(|a| a.status == 200 || a.status == 400 || a.status == 409));
    h.paid_in_msat += 20_000;

    // As a bearer key: every request reaches the one balance, credited once.
    let token = h.token(50, false).await;
    let answers = join_all((0..12).map(|_| h.post("/v1/chat/completions", Some(&token), &body))).await;
    assert!(
        answers.iter().all(|a| a.status == 200 || a.status == 409),
        "{:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    h.paid_in_msat += 50_000;
    let served = answers.iter().filter(|a| a.status == 200).count() as u64;
    let info = h.get("/v1/balance/info", Some(&token)).await;
    assert_eq!(info.json["balance"].as_u64().unwrap(), 50_000 - served * (3 + 8 * 2));
    h.assert_conserved().await;
}
