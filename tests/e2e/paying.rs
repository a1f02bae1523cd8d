//! The paid flows a client uses: keys, tokens as keys, X-Cashu with change, top-up, refund.

use serde_json::json;

use crate::harness::{chat, Harness};

// Stand-in prices at 100k USD/BTC, no markup: 1 msat per prompt token, 2 per completion token.
// "hello there world" is 3 prompt tokens; the stand-in answers 8 chunks = 8 completion tokens.
const CHAT_COST_MSAT: u64 = 3 + 8 * 2;

#[tokio::test]
async fn key_chat_stream_embeddings_topup_refund() {
    let mut h = Harness::start("key-flow").await;
    let key = h.key(200).await;
    assert!(key.starts_with("sk-"));

    // A JSON chat: charged exactly what the usage says, reported in headers and body.
    let answer = h.post("/v1/chat/completions", Some(&key), &chat(false)).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json["usage"]["cost"]["total_msats"], CHAT_COST_MSAT);
    assert_eq!(answer.header("x-routstr-cost-msats"), Some(CHAT_COST_MSAT.to_string().as_str()));
    assert_eq!(answer.header("x-routstr-input-cost-msats"), Some("3"));
    assert_eq!(answer.header("x-routstr-output-cost-msats"), Some("16"));
    assert!(answer.header("x-routstr-cost-usd").is_some());
    assert!(answer.header("x-routstr-request-id").unwrap().starts_with("req-"));
    assert_eq!(h.balance(&key).await, (200_000 - CHAT_COST_MSAT, 0));

    // The upstream saw its own key, never the client's, and the model it serves.
    let seen = h.upstream.last_request().unwrap();
    assert_eq!(seen.header("authorization"), Some("Bearer upstream-secret"));
    assert_eq!(seen.header("x-api-key"), None);
    // Its own address as Host (built once per upstream), not the node's.
    assert_eq!(seen.header("host"), Some(h.upstream.addr.to_string().as_str()));
    assert!(seen.headers.iter().all(|(_, v)| !v.contains(&key)));

    // Kept-alive upstream connections: answers, streamed or not, leave theirs for the next
    // request (at most one more for the node's own price refresh meanwhile).
    let other = h.key(10).await;
    let opened = h.upstream.connections();
    for stream in [false, true, false, true, false, true] {
        assert_eq!(h.post("/v1/chat/completions", Some(&other), &chat(stream)).await.status, 200);
    }
    let more = h.upstream.connections() - opened;
    assert!(more <= 2, "{more} new upstream connections for 6 requests one after another");

    // Without the /v1 prefix too, and streaming: usage asked for and read from the stream.
    let answer = h.post("/chat/completions", Some(&key), &chat(true)).await;
    assert_eq!(answer.status, 200);
    let seen = h.upstream.last_request().unwrap();
    assert_eq!(seen.body["stream_options"]["include_usage"], true);
    let data = answer.sse_data();
    assert!(data.len() >= 9, "{}", answer.text);
    let last = data.last().unwrap();
    assert_eq!(last["usage"]["cost"]["total_msats"], CHAT_COST_MSAT, "cost in the last data chunk");
    assert!(answer.text.trim_end().ends_with("data: [DONE]"));
    assert_eq!(h.balance(&key).await.0, 200_000 - 2 * CHAT_COST_MSAT);

    // Embeddings: 3 input tokens at 0.1 msat each, rounded up.
    let emb = h.post("/v1/embeddings", Some(&key), &json!({ "model": "embed-test", "input": "one two three" })).await;
    assert_eq!(emb.status, 200, "{}", emb.text);
    assert_eq!(emb.json["usage"]["cost"]["total_msats"], 1);

    // Anthropic messages, streamed: input from message_start, output from message_delta.
    let msg = json!({ "model": "gpt-test", "max_tokens": 50, "stream": true,
                      "messages": [{ "role": "user", "content": "hi you" }] });
    let answer = h.post("/v1/messages", Some(&key), &msg).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let delta = answer.sse_data().into_iter().find(|v| v["type"] == "message_delta").expect("message_delta");
    assert_eq!(delta["usage"]["cost"]["total_msats"], 2 + 8 * 2);
    // Anthropic's header for the upstream's key too, on this path only.
    let seen = h.upstream.last_request().unwrap();
    assert_eq!(seen.header("x-api-key"), Some("upstream-secret"));
    assert_eq!(seen.header("authorization"), Some("Bearer upstream-secret"));

    // Top-up, then the same token again is refused.
    let top = h.token(50, true).await;
    let t = h.post("/v1/balance/topup", Some(&key), &json!({ "cashu_token": top })).await;
    assert_eq!(t.status, 200, "{}", t.text);
    assert_eq!(t.json["msats"], 50_000);
    h.paid_in_msat += 50_000;
    let again = h.post("/v1/balance/topup", Some(&key), &json!({ "cashu_token": top })).await;
    assert_eq!((again.status, again.error_code()), (400, "token_already_spent"));

    // Refund: the whole balance as a real token, rounded up to whole sats.
    let (before, _) = h.balance(&key).await;
    let refund = h.post("/v1/balance/refund", Some(&key), &json!({})).await;
    assert_eq!(refund.status, 200, "{}", refund.text);
    let sats = refund.json["sats"].as_str().unwrap().parse::<u64>().unwrap();
    assert_eq!(sats, before.div_ceil(1000));
    // Asking again hands out the same token (the first answer may have been lost).
    let replay = h.post("/v1/balance/refund", Some(&key), &json!({})).await;
    assert_eq!(replay.json["token"], refund.json["token"]);
    assert_eq!(h.redeem(refund.json["token"].as_str().unwrap()).await, sats);
    assert_eq!(h.balance(&key).await, (0, 0));

    // The deprecated /v1/wallet alias answers too.
    assert_eq!(h.get("/v1/wallet/info", Some(&key)).await.status, 200);
    h.assert_conserved().await;
}

#[tokio::test]
async fn xcashu_pays_per_request_with_change() {
    let mut h = Harness::start("xcashu").await;

    // JSON: change in the X-Cashu response header, a real token.
    let token = h.token(30, false).await;
    let answer = h.post_with("/v1/chat/completions", &[("x-cashu", &token)], &chat(false)).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    h.paid_in_msat += 30_000;
    let cost = &answer.json["usage"]["cost"];
    // The sub-sat rest cannot be paid as change: it is charged, and shown.
    assert_eq!(cost["total_msats"], 1000);
    assert_eq!(cost["rounding_msats"], 1000 - CHAT_COST_MSAT);
    let change = answer.header("x-cashu").expect("change").to_owned();
    assert_eq!(h.redeem(&change).await, 29);

    // Lost change is recoverable with the original token.
    let recovered = h.post_with("/v1/balance/refund", &[("x-cashu", &token)], &json!({})).await;
    assert_eq!(recovered.status, 200, "{}", recovered.text);
    assert_eq!(recovered.json["token"], change.as_str());
    // The token cannot pay twice.
    let twice = h.post_with("/v1/chat/completions", &[("x-cashu", &token)], &chat(false)).await;
    assert_eq!((twice.status, twice.error_code()), (400, "token_already_spent"));

    // Streaming: real SSE, change as a cashu-change event before [DONE].
    let token = h.token(20, true).await;
    let answer = h.post_with("/v1/chat/completions", &[("x-cashu", &token)], &chat(true)).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    h.paid_in_msat += 20_000;
    let event = answer.text.find("event: cashu-change").expect("cashu-change event");
    let done = answer.text.find("data: [DONE]").expect("[DONE]");
    assert!(event < done);
    let change_event = answer.sse_data().into_iter().find(|v| v.get("token").is_some()).unwrap();
    assert_eq!(change_event["msats"], 19_000);
    assert_eq!(h.redeem(change_event["token"].as_str().unwrap()).await, 19);

    // Unknown token for recovery → 404.
    let stranger = h.token(5, false).await;
    let r = h.post_with("/v1/balance/refund", &[("x-cashu", &stranger)], &json!({})).await;
    assert_eq!(r.status, 404);
    h.assert_conserved().await;
}

#[tokio::test]
async fn token_as_bearer_key_reaches_the_same_balance() {
    let mut h = Harness::start("bearer-token").await;
    let token = h.token(100, false).await;
    let first = h.post("/v1/chat/completions", Some(&token), &chat(false)).await;
    assert_eq!(first.status, 200, "{}", first.text);
    h.paid_in_msat += 100_000;
    let second = h.post("/v1/chat/completions", Some(&token), &chat(false)).await;
    assert_eq!(second.status, 200);
    let info = h.get("/v1/balance/info", Some(&token)).await;
    assert_eq!(info.json["balance"], 100_000 - 2 * CHAT_COST_MSAT);
    // The key it answers to works on its own, and create with the same token is idempotent.
    let key = info.json["api_key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("sk-") && !key.contains(&token));
    assert_eq!(h.balance(&key).await.0, 100_000 - 2 * CHAT_COST_MSAT);
    let created = h.post("/v1/balance/create", None, &json!({ "initial_balance_token": token })).await;
    assert_eq!(created.json["api_key"], key.as_str());
    h.assert_conserved().await;
}

#[tokio::test]
async fn models_info_and_payment_requests() {
    let h = Harness::start("public").await;
    let models = h.get("/v1/models", None).await;
    assert_eq!(models.status, 200);
    let m = models.json["data"].as_array().unwrap().iter().find(|m| m["id"] == "gpt-test").unwrap().clone();
    assert_eq!(m["pricing"]["prompt"], "0.000001");
    assert_eq!(m["sats_pricing"]["prompt"], 0.001);
    assert!(m["sats_pricing"]["max_cost"].as_f64().unwrap() > 0.0);
    assert_eq!(h.get("/models", None).await.status, 200);

    let info = h.get("/v1/info", None).await;
    assert_eq!(info.json["mints"][0], h.mint.url.as_str());
    assert!(info.json["version"].is_string());

    // No credential: 402 with a NUT-18 payment request in X-Cashu (NUT-24).
    let unpaid = h.post("/v1/chat/completions", None, &chat(false)).await;
    assert_eq!(unpaid.status, 402);
    assert!(unpaid.header("x-cashu").unwrap().starts_with("creqA"));
    assert!(unpaid.json["error"]["amount_required_msat"].as_u64().unwrap() > 0);
    assert_eq!(h.upstream.requests(), 0, "nothing was forwarded");
    h.assert_conserved().await;
}

#[tokio::test]
async fn mint_fees_are_accounted() {
    let mut h = Harness::start_with("fees", crate::harness::Options { mint_fee_ppk: 1000, ..Default::default() }).await;
    let token = h.token(64, false).await;
    let created = h.post("/v1/balance/create", None, &json!({ "initial_balance_token": token })).await;
    assert_eq!(created.status, 200, "{}", created.text);
    h.paid_in_msat += 64_000;
    let balance = created.json["balance"].as_u64().unwrap();
    assert!(balance < 64_000, "the swap fee is deducted: {balance}");
    let t = h.totals();
    assert_eq!(t.credited_msat + t.redemption_fees_msat, 64_000);
    h.assert_conserved().await;
}

#[tokio::test]
async fn operator_wallet_commands_never_touch_users_money() {
    let mut h = Harness::start("operator").await;
    let key = h.key(100).await;
    assert_eq!(h.post("/v1/chat/completions", Some(&key), &chat(false)).await.status, 200);

    let earnings = h.token(10, false).await;
    let received = h.node.cli(&["wallet", "receive", &earnings]).await;
    assert!(received.status.success(), "{}", String::from_utf8_lossy(&received.stderr));

    let balance = h.node.cli(&["wallet", "balance"]).await;
    let text = String::from_utf8_lossy(&balance.stdout).into_owned();
    assert!(balance.status.success());
    assert!(text.contains(&h.mint.url), "{text}");
    assert!(text.contains("users' balances"), "{text}");
    assert!(text.contains("99.981"), "users hold 100 sat minus one chat: {text}");

    // More than the earnings is refused: the rest backs users' balances.
    let greedy = h.node.cli(&["wallet", "send", "11"]).await;
    assert!(!greedy.status.success());
    assert!(String::from_utf8_lossy(&greedy.stderr).contains("refused"));

    let sent = h.node.cli(&["wallet", "send", "10"]).await;
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    let token = String::from_utf8_lossy(&sent.stdout).trim().to_owned();
    assert_eq!(h.redeem(&token).await, 10);
    // The user's balance is untouched and the books still close.
    assert_eq!(h.balance(&key).await.0, 100_000 - CHAT_COST_MSAT);
    h.assert_conserved().await;
}

/// A request that sets no completion limit gets the one the node reserved for, so the upstream
/// can never bill more than was held; a request's own limit is left as it is.
#[tokio::test]
async fn answers_are_capped_at_the_limit_reserved_for() {
    let mut h = Harness::start("cap").await;
    let key = h.key(200).await;
    let mut unlimited = chat(false);
    unlimited.as_object_mut().unwrap().remove("max_tokens");

    let answer = h.post("/v1/chat/completions", Some(&key), &unlimited).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let seen = h.upstream.last_request().unwrap().body;
    assert_eq!(seen["max_completion_tokens"], 16_384, "the model's own limit, as reserved: {seen}");
    assert_eq!(seen["messages"], unlimited["messages"], "the rest of the body as sent");
    let keys: Vec<&String> = seen.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        ["max_completion_tokens", "model", "messages", "stream"],
        "in the client's order, after the limit"
    );

    assert_eq!(h.post("/v1/chat/completions", Some(&key), &chat(false)).await.status, 200);
    let seen = h.upstream.last_request().unwrap().body;
    assert_eq!((seen["max_tokens"].as_u64(), seen.get("max_completion_tokens")), (Some(100), None));

    // Each endpoint gets its own field.
    let responses = json!({ "model": "gpt-test", "input": "hello there" });
    assert_eq!(h.post("/v1/responses", Some(&key), &responses).await.status, 200);
    assert_eq!(h.upstream.last_request().unwrap().body["max_output_tokens"], 16_384);

    // An operator whose upstream refuses these fields turns it off.
    h.node.set_env("CAP_COMPLETION_TOKENS", Some("false"));
    h.node.restart().await;
    assert_eq!(h.post("/v1/chat/completions", Some(&key), &unlimited).await.status, 200);
    assert_eq!(h.upstream.last_request().unwrap().body.get("max_completion_tokens"), None);
    h.assert_conserved().await;
}

/// An image given by URL is a few bytes of the body but hundreds of tokens upstream: the
/// reservation (here, the price a client without credential is quoted) counts it.
#[tokio::test]
async fn image_parts_are_reserved_for() {
    let h = Harness::start("attachments").await;
    let h = &h;
    let quote = |content: serde_json::Value| {
        let body =
            json!({ "model": "gpt-test", "max_tokens": 1, "messages": [{ "role": "user", "content": content }] });
        async move {
            let answer = h.post("/v1/chat/completions", None, &body).await;
            assert_eq!(answer.status, 402, "{}", answer.text);
            answer.json["error"]["amount_required_msat"].as_u64().unwrap()
        }
    };
    let text = quote(json!("describe the picture at https://example.com/cat.png please")).await;
    let image = quote(json!([
        { "type": "text", "text": "describe this" },
        { "type": "image_url", "image_url": { "url": "https://example.com/cat.png" } }
    ]))
    .await;
    assert!(image > 10 * text, "1,600 tokens for the image against ≈ 20 for the text: {image} vs {text}");
}

/// A key paid with tokens of two trusted mints: a refund comes from one mint (a token has one),
/// from the key's own when it can, else from one that can; when no mint holds the whole balance,
/// the fullest pays its part and the rest stays on the key for the next refund.
#[tokio::test]
async fn refunds_of_keys_paid_at_several_mints() {
    use routstr_node::demo::mint::{mint_token, redeem_token, start_test_mint, TestMintConfig};
    let second = start_test_mint(TestMintConfig::default()).await.expect("second mint");
    let options = crate::harness::Options {
        env: vec![("CASHU_MINTS", format!("{{MINT}},{}", second.url))],
        ..Default::default()
    };
    let mut h = Harness::start_with("two-mints", options).await;
    let key = h.key(10).await;
    let other_mint_token = mint_token(&second.url, 50, false).await.unwrap();
    let topup = h.post("/v1/balance/topup", Some(&key), &json!({ "cashu_token": other_mint_token })).await;
    assert_eq!(topup.status, 200, "{}", topup.json);
    h.paid_in_msat += 50_000;
    assert_eq!(h.balance(&key).await, (60_000, 0));

    // Neither mint holds 60 sat: the second pays its 50, 10 stay on the key.
    let first = h.post("/v1/balance/refund", Some(&key), &json!({})).await;
    assert_eq!((first.status, first.json["msats"].as_u64()), (200, Some(50_000)), "{}", first.json);
    assert_eq!(h.balance(&key).await, (10_000, 0));
    assert_eq!(redeem_token(&second.url, first.json["token"].as_str().unwrap()).await.unwrap(), 50);
    // The rest, from the key's own mint.
    let rest = h.post("/v1/balance/refund", Some(&key), &json!({})).await;
    assert_eq!((rest.status, rest.json["msats"].as_u64()), (200, Some(10_000)), "{}", rest.json);
    // The first part comes again with it, in case its answer was lost.
    assert_eq!(rest.json["earlier_tokens"], json!([{ "token": first.json["token"], "msats": 50_000 }]));
    assert_eq!(h.redeem(rest.json["token"].as_str().unwrap()).await, 10);
    assert_eq!(h.balance(&key).await, (0, 0));

    // A key whose own mint cannot pay is paid by another that can (here with the operator's
    // own money beside the users').
    let deposit = mint_token(&second.url, 100, false).await.unwrap();
    let received = h.node.cli(&["wallet", "receive", &deposit]).await;
    assert!(received.status.success(), "{}", String::from_utf8_lossy(&received.stderr));
    h.operator_in_msat += 100_000;
    let key = h.key(5).await;
    let big = mint_token(&second.url, 30, false).await.unwrap();
    assert_eq!(h.post("/v1/balance/topup", Some(&key), &json!({ "cashu_token": big })).await.status, 200);
    h.paid_in_msat += 30_000;
    let all = h.post("/v1/balance/refund", Some(&key), &json!({})).await;
    assert_eq!((all.status, all.json["msats"].as_u64()), (200, Some(35_000)), "{}", all.json);
    assert_eq!(redeem_token(&second.url, all.json["token"].as_str().unwrap()).await.unwrap(), 35);
    h.assert_conserved().await;
}
