//! Bad input, failing upstreams, a silent mint, disconnects and crashes: clear errors, and the
//! books still balance.

use std::time::Duration;

use routstr_node::demo::mint::{start_test_mint, TestMintConfig};
use routstr_node::demo::upstream::{Behavior, StandInConfig, StandInUpstream};
use serde_json::json;

use crate::harness::{chat, raw_http, Harness, Options, ScratchDir};

#[tokio::test]
async fn bad_input_gets_clear_errors_and_costs_nothing() {
    let mut h = Harness::start_with(
        "errors",
        Options {
            env: vec![("MAX_BODY_BYTES", "4000".into()), ("ACCEPT_FOREIGN_MINTS", "false".into())],
            ..Default::default()
        },
    )
    .await;
    let key = h.key(50).await;

    let garbage = h.post_with("/v1/chat/completions", &[("x-cashu", "cashuBnot-a-token")], &chat(false)).await;
    assert_eq!((garbage.status, garbage.error_code()), (400, "invalid_token"));
    assert!(garbage.json["request_id"].as_str().unwrap().starts_with("req-"));

    let resp = h
        .http
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("JSON"));

    let unknown =
        h.post("/v1/chat/completions", Some(&key), &json!({ "model": "no-such-model", "messages": [] })).await;
    assert_eq!((unknown.status, unknown.error_code()), (404, "model_not_found"));
    let no_model = h.post("/v1/chat/completions", Some(&key), &json!({ "messages": [] })).await;
    assert_eq!(no_model.status, 400);

    let bad_key = h.post("/v1/chat/completions", Some("sk-0000"), &chat(false)).await;
    assert_eq!((bad_key.status, bad_key.error_code()), (401, "invalid_api_key"));

    let big = json!({ "model": "gpt-test", "messages": [{ "role": "user", "content": "x".repeat(5000) }] });
    let too_big = h.post("/v1/chat/completions", Some(&key), &big).await;
    assert_eq!((too_big.status, too_big.error_code()), (413, "body_too_large"));

    // Asking for more than the balance can cover: 402 with the amount, before anything is forwarded.
    let huge =
        json!({ "model": "gpt-test", "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 1_000_000 });
    let short = h.post("/v1/chat/completions", Some(&key), &huge).await;
    assert_eq!((short.status, short.error_code()), (402, "insufficient_balance"));
    assert!(short.header("x-cashu").unwrap().starts_with("creqA"));

    // A token from a mint this node does not trust (and may not move over Lightning here):
    // refused, naming the accepted mint.
    let other = start_test_mint(TestMintConfig::default()).await.unwrap();
    let foreign = routstr_node::demo::mint::mint_token(&other.url, 10, false).await.unwrap();
    let refused = h.post_with("/v1/chat/completions", &[("x-cashu", &foreign)], &chat(false)).await;
    assert_eq!((refused.status, refused.error_code()), (400, "untrusted_mint"));
    assert!(refused.json["error"]["message"].as_str().unwrap().contains(&h.mint.url));

    // A token already spent at the mint.
    let spent = h.token(10, false).await;
    h.redeem(&spent).await;
    let double = h.post_with("/v1/chat/completions", &[("x-cashu", &spent)], &chat(false)).await;
    assert_eq!((double.status, double.error_code()), (400, "token_already_spent"));

    assert_eq!(h.get("/v1/balance/topup", Some(&key)).await.status, 405);
    assert_eq!(h.get("/nope", None).await.status, 404);

    // A path that would leave the upstream's base URL (`/v1/../x` is the upstream's `/x`, called
    // with the operator's credentials): refused before anything is paid or forwarded. Sent raw:
    // client libraries would normalise it away.
    let body = serde_json::to_string(&chat(false)).unwrap();
    for path in ["/v1/../admin/keys", "/v1/%2e%2E/admin", "/v1/chat/..%2F..%2Fx"] {
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: node\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let answer = raw_http(h.node.port, &request).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains("'..'"), "{path}: {answer}");
    }

    // OpenAI's `models.retrieve`, and Routstr Core's `GET /v1/balance/`: answered by the node.
    let model = h.get("/v1/models/gpt-test", None).await;
    assert_eq!((model.status, model.json["id"].as_str()), (200, Some("gpt-test")), "{}", model.text);
    assert!(model.json["sats_pricing"]["max_cost"].is_number());
    let missing = h.get("/v1/models/no-such-model", None).await;
    assert_eq!((missing.status, missing.error_code()), (404, "model_not_found"));
    let info = h.get("/v1/balance/", Some(&key)).await;
    assert_eq!((info.status, info.json["balance"].as_u64()), (200, Some(50_000)), "{}", info.text);

    // A token paying as a bearer key with an unusable Refund-LNURL: refused before it is
    // redeemed, so the token still pays a request of its own afterwards.
    let token = h.token(5, false).await;
    let refused = h
        .post_with(
            "/v1/chat/completions",
            &[("authorization", &format!("Bearer {token}")), ("refund-lnurl", "not an address")],
            &chat(false),
        )
        .await;
    assert_eq!(refused.status, 400, "{}", refused.text);
    assert_eq!(h.redeem(&token).await, 5, "the token was not spent");

    // A browser's preflight gets the headers it asks for (SDKs add their own).
    let preflight = h
        .http
        .request(reqwest::Method::OPTIONS, h.url("/v1/chat/completions"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization, x-stainless-os")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);
    let allowed = preflight.headers().get("access-control-allow-headers").and_then(|v| v.to_str().ok());
    assert_eq!(allowed, Some("authorization, x-stainless-os"));

    assert_eq!(h.upstream.requests(), 0, "no bad request reached the upstream");
    assert_eq!(h.balance(&key).await, (50_000, 0));
    h.assert_conserved().await;
}

#[tokio::test]
async fn without_lightning_refund_headers_are_ignored() {
    let mut h =
        Harness::start_with("no-lightning", Options { env: vec![("LIGHTNING", "false".into())], ..Default::default() })
            .await;
    let token = h.token(20, false).await;
    let created = h
        .post_with(
            "/v1/balance/create",
            &[("refund-lnurl", "alice@example.com"), ("key-expiry-time", "1")],
            &json!({ "initial_balance_token": token }),
        )
        .await;
    assert_eq!(created.status, 200, "{}", created.text);
    h.paid_in_msat += 20_000;
    let key = created.json["api_key"].as_str().unwrap().to_owned();
    let info = h.get("/v1/balance/info", Some(&key)).await;
    assert_eq!(
        (info.json["refund_address"].is_null(), info.json["expiry_time"].is_null()),
        (true, true),
        "{}",
        info.text
    );
    // Refunds come as a Cashu token.
    let refund = h.post_with("/v1/balance/refund", &[("authorization", &format!("Bearer {key}"))], &json!({})).await;
    assert_eq!(refund.status, 200, "{}", refund.text);
    assert_eq!(h.redeem(refund.json["token"].as_str().unwrap()).await, 20);
    h.assert_conserved().await;
}

#[tokio::test]
async fn failing_upstream_charges_nothing_and_returns_xcashu_in_full() {
    let mut h = Harness::start_with(
        "upstream-errors",
        Options { env: vec![("UPSTREAM_IDLE_TIMEOUT_SECONDS", "1".into())], ..Default::default() },
    )
    .await;
    let key = h.key(100).await;

    let failed = h
        .post_with(
            "/v1/chat/completions",
            &[("authorization", &format!("Bearer {key}")), ("x-stand-in-behavior", "500")],
            &chat(false),
        )
        .await;
    assert_eq!(failed.status, 502, "an upstream 500 is a gateway error here: {}", failed.text);
    assert!(failed.json["error"].is_object());
    assert_eq!(h.balance(&key).await, (100_000, 0));

    // The upstream refusing the node's credentials is not the client's key being bad: 502, and
    // the upstream's words about its key stay out. A client error of its own passes as it is.
    for (upstream, shown, code) in
        [("401", 502, "upstream_error"), ("403", 502, "forbidden"), ("400", 400, "invalid_request")]
    {
        let refused = h
            .post_with(
                "/v1/chat/completions",
                &[("authorization", &format!("Bearer {key}")), ("x-stand-in-behavior", upstream)],
                &chat(false),
            )
            .await;
        assert_eq!((refused.status, refused.error_code()), (shown, code), "upstream {upstream}: {}", refused.text);
        assert!(!refused.text.contains("invalid_api_key"), "{}", refused.text);
        assert_eq!(h.balance(&key).await, (100_000, 0));
    }

    let stalled = h
        .post_with(
            "/v1/chat/completions",
            &[("authorization", &format!("Bearer {key}")), ("x-stand-in-behavior", "stall")],
            &chat(false),
        )
        .await;
    assert_eq!((stalled.status, stalled.error_code()), (504, "upstream_timeout"));
    assert_eq!(h.balance(&key).await, (100_000, 0));

    // Half an answer, then silence: the idle timeout also bounds each read of the body.
    let half = h
        .post_with(
            "/v1/chat/completions",
            &[("authorization", &format!("Bearer {key}")), ("x-stand-in-behavior", "stall-mid-stream")],
            &chat(false),
        )
        .await;
    assert_eq!((half.status, half.error_code()), (504, "upstream_timeout"));
    assert_eq!(h.balance(&key).await, (100_000, 0));
    let started = std::time::Instant::now();
    let half_stream = h
        .post_with(
            "/v1/chat/completions",
            &[("authorization", &format!("Bearer {key}")), ("x-stand-in-behavior", "stall-mid-stream")],
            &chat(true),
        )
        .await;
    assert_eq!(half_stream.status, 200);
    assert!(!half_stream.sse_data().is_empty(), "what flowed reached the client");
    assert!(started.elapsed() < Duration::from_secs(10), "the stalled stream was ended by the idle timeout");
    h.wait_until_settled().await;
    let (balance, reserved) = h.balance(&key).await;
    assert_eq!(reserved, 0);
    assert!(balance < 100_000, "what flowed is charged");

    let token = h.token(40, false).await;
    let failed =
        h.post_with("/v1/chat/completions", &[("x-cashu", &token), ("x-stand-in-behavior", "429")], &chat(false)).await;
    assert_eq!(failed.status, 429);
    h.paid_in_msat += 40_000;
    assert_eq!(h.redeem(failed.header("x-cashu").expect("the whole token back as change")).await, 40);
    h.assert_conserved().await;
}

#[tokio::test]
async fn missing_usage_is_not_free() {
    let mut h = Harness::start("no-usage").await;
    let key = h.key(100).await;
    let auth = format!("Bearer {key}");
    let json_answer = h
        .post_with(
            "/v1/chat/completions",
            &[("authorization", &auth), ("x-stand-in-behavior", "no-usage")],
            &chat(false),
        )
        .await;
    assert_eq!(json_answer.status, 200);
    let charged = json_answer.header("x-routstr-cost-msats").unwrap().parse::<u64>().unwrap();
    assert!(charged > 0, "an estimate is charged");

    let streamed = h
        .post_with(
            "/v1/chat/completions",
            &[("authorization", &auth), ("x-stand-in-behavior", "no-usage")],
            &chat(true),
        )
        .await;
    assert_eq!(streamed.status, 200);
    let cost = streamed.sse_data().last().unwrap()["usage"]["cost"]["total_msats"].as_u64().unwrap();
    assert!(cost > 0);

    // The upstream breaks off mid-stream: what flowed is charged, the stream ends cleanly.
    let broken = h
        .post_with(
            "/v1/chat/completions",
            &[("authorization", &auth), ("x-stand-in-behavior", "disconnect")],
            &chat(true),
        )
        .await;
    assert_eq!(broken.status, 200);
    h.wait_until_settled().await;
    let (balance, reserved) = h.balance(&key).await;
    assert_eq!(reserved, 0);
    assert!(balance < 100_000 - charged - cost, "the broken stream was charged too");
    h.assert_conserved().await;
}

#[tokio::test]
async fn client_disconnect_mid_stream_settles() {
    let mut h = Harness::start("client-gone").await;
    let key = h.key(100).await;
    let body = json!({ "model": "gpt-test", "stream": true, "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 1000 });
    let mut resp = h.slow_stream(&key, &body).await;
    // Streaming is real: the first chunks arrive long before the 10 s the whole answer takes.
    let first = tokio::time::timeout(Duration::from_secs(2), resp.chunk()).await.expect("first chunk in time").unwrap();
    assert!(first.is_some());
    let (_, reserved) = h.balance(&key).await;
    assert!(reserved > 0, "the stream holds its reservation");
    drop(resp);
    h.wait_until_settled().await;
    let (balance, reserved) = h.balance(&key).await;
    assert_eq!(reserved, 0);
    assert!(balance < 100_000, "output flowed, so the estimate is charged");
    assert!(balance > 100_000 - 2_100, "but not the whole reservation");
    h.assert_conserved().await;
}

#[tokio::test]
async fn client_leaving_before_the_answer_still_settles() {
    let mut h = Harness::start("client-gone-early").await;
    let key = h.key(100).await;
    // The upstream takes a second; the client gives up after a fifth of it. The request's work
    // goes on without it: the answer the upstream gives is charged, and the hold released.
    let gave_up = h
        .http
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header(routstr_node::demo::upstream::ANSWER_DELAY_HEADER, "1000000")
        .timeout(Duration::from_millis(200))
        .json(&chat(false))
        .send()
        .await;
    assert!(gave_up.is_err_and(|e| e.is_timeout()));
    let (_, reserved) = h.balance(&key).await;
    assert!(reserved > 0, "the request still holds its reservation");
    h.wait_until_settled().await;
    let (balance, reserved) = h.balance(&key).await;
    assert_eq!(reserved, 0);
    assert!(balance < 100_000, "the upstream's answer is charged");
    h.assert_conserved().await;
}

#[tokio::test]
async fn fails_over_to_the_next_upstream_and_cools_down() {
    let broken = StandInUpstream::start(StandInConfig::default()).await.unwrap();
    broken.set_behavior(Behavior::Status(503));
    let healthy = StandInUpstream::start(StandInConfig::default()).await.unwrap();
    let dir = ScratchDir::new("failover-config");
    let file = dir.join("upstreams.toml");
    std::fs::write(
        &file,
        format!(
            "[[upstream]]\nname = \"broken\"\nbase_url = \"{}\"\n\n[[upstream]]\nname = \"healthy\"\nbase_url = \"{}\"\n[upstream.aliases]\nfast = \"gpt-test\"\n",
            broken.base_url, healthy.base_url
        ),
    )
    .unwrap();
    let mut h = Harness::start_with(
        "failover",
        Options {
            env: vec![
                ("UPSTREAMS_PATH", file.display().to_string()),
                ("UPSTREAM_FAILURE_THRESHOLD", "2".into()),
                ("UPSTREAM_COOLDOWN_SECONDS", "600".into()),
            ],
            ..Default::default()
        },
    )
    .await;
    let key = h.key(100).await;
    for _ in 0..3 {
        let answer = h.post("/v1/chat/completions", Some(&key), &chat(false)).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
    }
    assert_eq!(broken.requests(), 2, "after two failures the broken upstream cools down");
    assert_eq!(healthy.requests(), 3);
    // An alias maps to the upstream's model name.
    let aliased = h
        .post(
            "/v1/chat/completions",
            Some(&key),
            &json!({ "model": "fast", "messages": [{ "role": "user", "content": "a" }] }),
        )
        .await;
    assert_eq!(aliased.status, 200, "{}", aliased.text);
    assert_eq!(healthy.last_request().unwrap().body["model"], "gpt-test");
    h.assert_conserved().await;
}

#[tokio::test]
async fn unreachable_mint_is_a_clear_error_and_nothing_is_lost() {
    let mut h = Harness::start_with(
        "mint-down",
        Options { env: vec![("MINT_TIMEOUT_SECONDS", "3".into())], ..Default::default() },
    )
    .await;
    let token = h.token(30, false).await;
    h.mint.stop().await;
    let down = h.post_with("/v1/chat/completions", &[("x-cashu", &token)], &chat(false)).await;
    assert_eq!((down.status, down.error_code()), (503, "mint_unavailable"), "{}", down.text);
    assert_eq!(h.upstream.requests(), 0);
    h.mint.restart().await.unwrap();
    let ok = h.post_with("/v1/chat/completions", &[("x-cashu", &token)], &chat(false)).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    h.paid_in_msat += 30_000;
    assert_eq!(h.redeem(ok.header("x-cashu").unwrap()).await, 29);
    h.assert_conserved().await;
}

#[tokio::test]
async fn a_killed_node_releases_its_reservations_on_restart() {
    let mut h = Harness::start("crash").await;
    let key = h.key(100).await;
    let mut resp = h.slow_stream(&key, &chat(true)).await;
    resp.chunk().await.unwrap();
    // The stream holds part of the balance (in the node's memory: nothing of it is on disk).
    let (_, reserved) = h.balance(&key).await;
    assert!(reserved > 0);
    assert_eq!(h.totals().open_reservations, 0);
    h.node.restart().await;
    let (balance, reserved) = h.balance(&key).await;
    assert_eq!((balance, reserved), (100_000, 0));
    // And the node still serves.
    assert_eq!(h.post("/v1/chat/completions", Some(&key), &chat(false)).await.status, 200);
    h.assert_conserved().await;
}

#[tokio::test]
async fn sigterm_stops_cleanly_with_the_books_closed() {
    let mut h = Harness::start("sigterm").await;
    let key = h.key(20).await;
    assert_eq!(h.post("/v1/chat/completions", Some(&key), &chat(true)).await.status, 200);
    h.node.stop().await;
    h.assert_conserved().await;
}

#[tokio::test]
async fn sigterm_right_after_an_answer_keeps_its_charge() {
    let mut h = Harness::start("sigterm-charge").await;
    let key = h.key(20).await;
    // A key holder's answer goes out before its charge is on disk; the shutdown waits for it.
    let answer = h.post("/v1/chat/completions", Some(&key), &chat(false)).await;
    assert_eq!(answer.status, 200);
    let cost: u64 = answer.header("x-routstr-cost-msats").unwrap().parse().unwrap();
    assert!(cost > 0);
    h.node.stop().await;
    // Read straight from the file of a stopped node: nothing more can land.
    let t = h.totals();
    assert_eq!((t.charged_msat, t.open_reservations), (cost, 0), "{t:?}");
    assert!(t.conserved(), "{t:?}");
}

#[tokio::test]
async fn clearnet_clients_are_rate_limited() {
    let h = Harness::start_with(
        "rate-limit",
        Options { env: vec![("RATE_LIMIT_PER_MINUTE", "3".into())], ..Default::default() },
    )
    .await;
    for _ in 0..3 {
        assert_eq!(h.get("/v1/info", None).await.status, 200);
    }
    let limited = h.get("/v1/info", None).await;
    assert_eq!((limited.status, limited.error_code()), (429, "rate_limited"));
    assert!(limited.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
}

#[tokio::test]
async fn sigterm_during_a_stream_ends_it_cleanly_and_settles() {
    let mut h = Harness::start("sigterm-stream").await;
    let key = h.key(100).await;
    let resp = h
        .http
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-stand-in-chunks", "20")
        .header("x-stand-in-delay-ms", "100")
        .json(&chat(true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let reader = tokio::spawn(async move { resp.text().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.node.stop().await;
    // The 2 s stream fits in the drain time: it completes, with its cost, before the exit.
    let text = reader.await.unwrap().expect("the stream ends cleanly");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(text.contains("\"cost\""));
    let t = h.assert_conserved().await;
    assert_eq!(t.charged_msat, 3 + 20 * 2);
}

#[tokio::test]
async fn silent_connections_are_closed_and_slow_answers_are_not() {
    let mut h = Harness::start_with(
        "idle-connections",
        Options {
            env: vec![("MAX_CONNECTIONS", "2".into()), ("CLIENT_IDLE_TIMEOUT_SECONDS", "1".into())],
            ..Default::default()
        },
    )
    .await;
    // Connections the node closes after a second idle must not be picked from a pool just then.
    h.http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let key = h.key(100).await;

    // Two connections that never send a request (one stops inside HTTP/2's preface) would hold
    // both slots for good: they are closed, and a new client gets in.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", h.node.port)).await.unwrap();
    let mut half_preface = tokio::net::TcpStream::connect(("127.0.0.1", h.node.port)).await.unwrap();
    half_preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let health = tokio::time::timeout(Duration::from_secs(8), h.http.get(h.url("/health")).send()).await;
    assert_eq!(health.expect("a free slot within the idle timeout").unwrap().status(), 200);
    for stream in [&mut silent, &mut half_preface] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the node closed the silent connection: {read:?}");
    }

    // A request waiting longer than the idle timeout for its answer, and a stream with gaps
    // longer than it, are open requests: they run to their end.
    let auth = format!("Bearer {key}");
    let slow = h
        .post_with(
            "/v1/chat/completions",
            &[("authorization", &auth), ("x-stand-in-answer-delay-us", "2500000")],
            &chat(false),
        )
        .await;
    assert_eq!(slow.status, 200, "{}", slow.text);
    let gappy = h
        .post_with(
            "/v1/chat/completions",
            &[("authorization", &auth), ("x-stand-in-chunks", "3"), ("x-stand-in-delay-ms", "1500")],
            &chat(true),
        )
        .await;
    assert_eq!(gappy.status, 200);
    assert!(gappy.text.contains("[DONE]"), "{}", gappy.text);
    h.wait_until_settled().await;
    h.assert_conserved().await;
}

#[tokio::test]
async fn a_payout_killed_after_its_token_was_made_returns_to_the_wallet() {
    let mut h = Harness::start("payout-crash").await;
    let key = h.key(40).await;
    let auth = format!("Bearer {key}");

    // The refund's token is made, and the node dies before keeping it: nobody has the token.
    h.node.set_env("ROUTSTR_TEST_FAILPOINT", Some("payout:after-send"));
    h.node.restart().await;
    let died = h.http.post(h.url("/v1/balance/refund")).header("authorization", &auth).json(&json!({})).send().await;
    assert!(died.is_err(), "the node died mid-payout: {died:?}");
    h.node.set_env("ROUTSTR_TEST_FAILPOINT", None);
    h.node.restart().await;

    // The debit is back on the key, and the token's proofs back in the wallet: the wallet holds
    // nothing else, so the key's whole balance can be paid out only if they came back.
    assert_eq!(h.balance(&key).await, (40_000, 0));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let token = loop {
        let refund = h.post_with("/v1/balance/refund", &[("authorization", &auth)], &json!({})).await;
        if refund.status == 200 {
            break refund.json["token"].as_str().expect("a token").to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "the wallet never got its proofs back: {}", refund.text);
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(h.redeem(&token).await, 40);
    assert_eq!(h.balance(&key).await, (0, 0));
    h.assert_conserved().await;
}
