//! Routing to discovered providers: node A sells through its upstream and announces itself on
//! an in-process relay; node B has no upstream, discovers A, and serves its own paying clients
//! by buying from A with eCash from its wallet. Money is conserved on each node and between them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nostr_relay_builder::prelude::NostrDatabase;
use nostr_sdk::prelude::{EventBuilder, Keys, Kind, Tag};
use routstr_node::demo::mint::{mint_token, redeem_token};
use routstr_node::ledger::open_reader;
use serde_json::{json, Value};

use crate::harness::{chat, Harness, Options};
use crate::nostr::{eventually, start_relay, start_seller};

/// B's remote payments: (token value, change credited back, state), oldest first.
fn remote_spends(h: &Harness) -> Vec<(u64, u64, String)> {
    let conn = open_reader(&h.data_dir.join("ledger.sqlite")).expect("ledger");
    let mut stmt = conn.prepare("SELECT amount_msat, change_msat, state FROM remote_spends ORDER BY id").unwrap();
    let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get(2)?))).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

fn chat_with_limit(stream: bool, max_tokens: u64) -> Value {
    let mut body = chat(stream);
    body["max_tokens"] = json!(max_tokens);
    body
}

/// 110 % of what the provider kept, rounded up to the msat.
fn marked_up(kept_msat: u64) -> u64 {
    (kept_msat * 11).div_ceil(10)
}

/// Money between the nodes: what B sent A (less the tokens A never redeemed, which B took back
/// itself) is what A credited; the change A paid back is what B got back; what B spent is what
/// A charged.
async fn assert_conserved_between(a: &mut Harness, b: &Harness, never_redeemed_msat: u64) {
    let tb = b.totals();
    let spends = remote_spends(b);
    let sent: u64 = spends.iter().filter(|s| s.2 != "failed").map(|s| s.0).sum();
    a.paid_in_msat = sent - never_redeemed_msat;
    let ta = a.assert_conserved().await;
    b.assert_conserved().await;
    assert_eq!(tb.remote_sent_msat, sent, "no wallet fees at these mints: {tb:?}");
    assert_eq!(
        ta.credited_msat + ta.redemption_fees_msat,
        tb.remote_sent_msat - never_redeemed_msat,
        "B sent = A credited: {ta:?} {tb:?}"
    );
    let taken_back_by_b: u64 = spends.iter().filter(|s| s.2 == "settled").map(|s| s.1).sum();
    assert_eq!(tb.remote_returned_msat, taken_back_by_b);
    assert_eq!(
        tb.remote_returned_msat,
        ta.paid_out_msat + never_redeemed_msat,
        "B got back what A returned: {ta:?} {tb:?}"
    );
    assert_eq!(tb.remote_net_msat(), ta.charged_msat, "what B spent is what A charged: {ta:?} {tb:?}");
}

/// Node A (upstream, announced) and node B (no upstream, discovering A, trusting A's mint).
async fn start_pair(
    name: &str,
    b_env: Vec<(&'static str, String)>,
) -> (nostr_relay_builder::prelude::LocalRelay, Harness, Harness) {
    let (relay, relay_url, _) = start_relay().await;
    let a = start_seller(&format!("{name}-a"), &relay_url).await;
    let mut env = vec![
        ("NOSTR_ENABLED", "true".into()),
        ("RELAYS", relay_url.clone()),
        ("NAME", "node-b".into()),
        ("CASHU_MINTS", format!("{{MINT}},{}", a.mint.url)),
        ("NOSTR_HEALTH_SECONDS", "3600".into()),
    ];
    env.extend(b_env);
    let b = Harness::start_with(
        &format!("{name}-b"),
        Options { env, unset: vec!["UPSTREAM_BASE_URL", "UPSTREAM_API_KEY"], ..Default::default() },
    )
    .await;
    eventually("B discovers A selling gpt-test", 40, || a_found_by(&b)).await;
    (relay, a, b)
}

/// Whether B's discovery lists A, healthy, for gpt-test.
async fn a_found_by(b: &Harness) -> Option<()> {
    let list = b.get("/v1/providers?model=gpt-test", None).await.json;
    let first = list["providers"].as_array()?.first()?.clone();
    (first["name"] == "node-a" && first["health"] == "ok").then_some(())
}

async fn fund(a: &Harness, b: &mut Harness, sats: u64) {
    let funds = mint_token(&a.mint.url, sats, false).await.unwrap();
    let out = b.node.cli(&["wallet", "receive", &funds]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    b.operator_in_msat += sats * 1000;
}

/// B's client leaves mid-stream: B drops A's stream, so A's change never arrives with the
/// answer. B charges its client by usage, keeps the spend `recovering`, and its background task
/// gets the change back from A's /v1/balance/refund with the original token.
#[tokio::test]
async fn change_left_at_the_provider_is_recovered() {
    let (_relay, mut a, mut b) = start_pair("route-recover", vec![("REMOTE_RECOVERY_SECONDS", "1".into())]).await;
    fund(&a, &mut b, 200).await;
    let key = b.key(100).await;
    let mut resp = b
        .http
        .post(b.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-stand-in-chunks", "40")
        .header("x-stand-in-delay-ms", "100")
        .json(&chat_with_limit(true, 2000))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().expect("the stream began");
    assert!(!first.is_empty());
    drop(resp);
    b.wait_until_settled().await;
    let (_, reserved) = b.balance(&key).await;
    assert_eq!(reserved, 0);
    // Not settled with the answer…
    let spends = remote_spends(&b);
    assert_eq!(spends.len(), 1);
    assert_eq!(spends[0].0, 5_000);
    // …but recovered from A.
    let (sent, back) = eventually("B recovers the change A kept", 40, || async {
        let s = remote_spends(&b).pop()?;
        (s.2 == "settled").then_some((s.0, s.1))
    })
    .await;
    assert_eq!(sent, 5_000);
    assert!(back >= 3_000 && back % 1000 == 0, "A charged a few tokens of 2000 and returned whole sats: {back}");
    let ta = a.totals();
    assert_eq!(ta.paid_out_msat, back, "the change A made is the change B got");
    // Charged before the change was known: the whole token, marked up (the most the client
    // agreed to: a provider that keeps tokens cannot be paid out of B's pocket). The change
    // recovered later is B's operator's.
    let spent_by_client = 100_000 - b.balance(&key).await.0;
    assert_eq!(spent_by_client, marked_up(sent));
    assert_conserved_between(&mut a, &b, 0).await;
}

#[tokio::test]
async fn a_node_without_upstream_buys_from_a_discovered_provider() {
    let (_relay, relay_url, _) = start_relay().await;
    let mut a = start_seller("route-a", &relay_url).await;
    // B: no upstream; trusts its own mint (where its clients pay) and A's (where it pays A).
    let mut b = Harness::start_with(
        "route-b",
        Options {
            env: vec![
                ("NOSTR_ENABLED", "true".into()),
                ("RELAYS", relay_url.clone()),
                ("NAME", "node-b".into()),
                ("CASHU_MINTS", format!("{{MINT}},{}", a.mint.url)),
                // Checked once when discovered, then not again during the test (A going down
                // later must be found out by paying it, not by a health check).
                ("NOSTR_HEALTH_SECONDS", "3600".into()),
                ("REMOTE_MARKUP", "1.1".into()),
                ("MAX_REMOTE_PRICE_SATS", "1000".into()),
            ],
            unset: vec!["UPSTREAM_BASE_URL", "UPSTREAM_API_KEY"],
            ..Default::default()
        },
    )
    .await;
    eventually("B discovers A selling gpt-test", 40, || async {
        let list = b.get("/v1/providers?model=gpt-test", None).await.json;
        let first = list["providers"].as_array()?.first()?.clone();
        (first["name"] == "node-a" && first["health"] == "ok").then_some(())
    })
    .await;

    // Unfunded, B cannot buy: a clear error, and the client's X-Cashu comes back whole.
    let token = b.token(20, false).await;
    let r = b.post_with("/v1/chat/completions", &[("X-Cashu", &token)], &chat_with_limit(false, 2000)).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert!(r.json["error"]["message"].as_str().unwrap().contains("wallet cannot pay"), "{}", r.text);
    let change = r.header("x-cashu").expect("full change").to_owned();
    assert_eq!(b.redeem(&change).await * 1000, 20_000);
    b.paid_in_msat += 20_000;
    assert!(remote_spends(&b).iter().all(|s| s.2 == "failed"));

    // The operator funds B's wallet at A's mint.
    let funds = mint_token(&a.mint.url, 200, false).await.unwrap();
    let out = b.node.cli(&["wallet", "receive", &funds]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    b.operator_in_msat += 200_000;

    // JSON, paid from a key at B: B buys from A, keeps its markup, the client sees one answer.
    let key = b.key(100).await;
    let r = b.post("/v1/chat/completions", Some(&key), &chat_with_limit(false, 2000)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.json["choices"][0]["message"]["content"].as_str().unwrap().starts_with("Hello from the stand-in"));
    assert!(r.header("x-cashu").is_none(), "A's change must not reach B's client");
    let spends = remote_spends(&b);
    let (sent, back, state) = spends.last().unwrap().clone();
    assert_eq!(state, "settled");
    // 2000 completion tokens at 2 msat + the prompt: a 5-sat token; A used a few msat of it.
    assert_eq!(sent, 5_000);
    assert_eq!(back, 4_000, "A returned the unused whole sats");
    let cost = marked_up(sent - back);
    assert_eq!(r.header("x-routstr-cost-msats"), Some(cost.to_string().as_str()));
    assert_eq!(r.json["usage"]["cost"]["total_msats"], cost);
    assert_eq!(b.balance(&key).await, (100_000 - cost, 0));
    let ta = a.totals();
    assert_eq!((ta.credited_msat, ta.paid_out_msat, ta.charged_msat), (5_000, 4_000, 1_000));
    assert_eq!(a.upstream.requests(), 1, "A's upstream served it");
    assert_conserved_between(&mut a, &b, 0).await;

    // Streaming, paid with X-Cashu at B: real SSE through both nodes; A's change event is taken
    // by B, B's own change event goes to the client.
    let token = b.token(50, false).await;
    let r = b.post_with("/v1/chat/completions", &[("X-Cashu", &token)], &chat_with_limit(true, 2000)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    b.paid_in_msat += 50_000;
    assert!(r.header("content-type").unwrap().starts_with("text/event-stream"));
    let words: String =
        r.sse_data().iter().filter_map(|d| d["choices"][0]["delta"]["content"].as_str().map(str::to_owned)).collect();
    assert!(words.starts_with("Hello from the stand-in"), "{}", r.text);
    assert_eq!(r.text.matches("event: cashu-change").count(), 1, "only B's change event: {}", r.text);
    assert!(r.text.trim_end().ends_with("data: [DONE]"));
    let (sent, back, state) = remote_spends(&b).last().unwrap().clone();
    assert_eq!((sent, back, state.as_str()), (5_000, 4_000, "settled"));
    let cost = marked_up(sent - back);
    let cost_chunk = r.sse_data().into_iter().find(|d| d["usage"]["cost"].is_object()).expect("a cost chunk");
    let charged = cost_chunk["usage"]["cost"]["total_msats"].as_u64().unwrap();
    // B's client pays in whole sats too: B's rounding on top of its markup.
    assert_eq!(charged, cost + cost_chunk["usage"]["cost"]["rounding_msats"].as_u64().unwrap_or(0));
    let change_event = r
        .text
        .split("\n\n")
        .find(|e| e.starts_with("event: cashu-change"))
        .and_then(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .unwrap();
    let redeemed = b.redeem(change_event["token"].as_str().unwrap()).await * 1000;
    assert_eq!(redeemed, change_event["msats"].as_u64().unwrap());
    assert_eq!(redeemed + charged, 50_000, "the client got everything it did not pay for");
    assert_conserved_between(&mut a, &b, 0).await;

    // Over MAX_REMOTE_PRICE_SATS (1,000,000 tokens at 2 msat = 2000 sats): refused up front.
    let before = (b.balance(&key).await, remote_spends(&b).len(), a.totals());
    let r = b.post("/v1/chat/completions", Some(&key), &chat_with_limit(false, 1_000_000)).await;
    assert_eq!(r.status, 503, "{}", r.text);
    let message = r.json["error"]["message"].as_str().unwrap();
    assert!(message.contains("MAX_REMOTE_PRICE_SATS") && message.contains("2001 sats"), "{message}");
    assert_eq!((b.balance(&key).await, remote_spends(&b).len(), a.totals()), before, "nothing moved");

    // A goes down: B fails cleanly, releases the client's reservation, takes its token back.
    a.node.kill().await;
    let token = b.token(20, false).await;
    let r = b.post_with("/v1/chat/completions", &[("X-Cashu", &token)], &chat_with_limit(false, 2000)).await;
    assert_eq!(r.status, 502, "{}", r.text);
    assert!(r.json["error"]["message"].as_str().unwrap().contains("could not reach provider node-a"), "{}", r.text);
    let change = r.header("x-cashu").expect("full change").to_owned();
    assert_eq!(b.redeem(&change).await * 1000, 20_000);
    b.paid_in_msat += 20_000;
    let (sent, back, state) = remote_spends(&b).last().unwrap().clone();
    assert_eq!((sent, back, state.as_str()), (5_000, 5_000, "settled"), "B took its unredeemed token back");
    let r = b.post("/v1/chat/completions", Some(&key), &chat_with_limit(false, 2000)).await;
    assert_eq!(r.status, 503, "A cools down after failing: nobody sells gpt-test now: {}", r.text);
    assert!(r.json["error"]["message"].as_str().unwrap().contains("no provider discovered on Nostr sells"));
    assert_eq!(b.balance(&key).await.1, 0);
    assert_conserved_between(&mut a, &b, 5_000).await;
}

/// B dies after making A's token and before keeping it: nobody has that token. After the
/// restart the spend is failed, its proofs come back into B's wallet, B's client paid nothing,
/// and A never saw the money.
#[tokio::test]
async fn a_remote_payment_killed_after_its_token_was_made_returns_to_the_wallet() {
    let (_relay, mut a, mut b) = start_pair("route-crash", vec![]).await;
    fund(&a, &mut b, 200).await;
    let key = b.key(100).await;

    b.node.set_env("ROUTSTR_TEST_FAILPOINT", Some("remote:after-send"));
    b.node.restart().await;
    eventually("B finds A again after its restart", 40, || a_found_by(&b)).await;
    let died = b.http.post(b.url("/v1/chat/completions")).bearer_auth(&key).json(&chat(false)).send().await;
    assert!(died.is_err(), "B died with A's token made: {died:?}");
    b.node.set_env("ROUTSTR_TEST_FAILPOINT", None);
    b.node.restart().await;

    assert_eq!(b.balance(&key).await, (100_000, 0), "the client paid nothing");
    let spends = remote_spends(&b);
    assert_eq!(spends.len(), 1);
    assert_eq!(spends[0].2, "failed", "never recorded as sent");
    eventually("B takes the token's proofs back", 40, || async {
        let log = std::fs::read_to_string(b.data_dir.join("node.log")).unwrap_or_default();
        log.contains("took back the proofs of a token that never left the node").then_some(())
    })
    .await;
    assert_eq!(a.totals().credited_msat, 0, "A was never paid");
    // B's wallet holds its client's 100 sats and its operator's 200 again: conserved on both.
    assert_conserved_between(&mut a, &b, 0).await;

    // And B still buys from A afterwards.
    eventually("B finds A again after its restart", 40, || a_found_by(&b)).await;
    let answer = b.post("/v1/chat/completions", Some(&key), &chat(false)).await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    b.wait_until_settled().await;
    assert_conserved_between(&mut a, &b, 0).await;
}

/// A "provider" that redeems the token of every request it is paid for and refuses the request
/// (a 400 that is not about payment) without change: one out to collect tokens.
struct TokenKeeper {
    url: String,
    chats: Arc<AtomicU64>,
    _task: tokio::task::JoinHandle<()>,
}

async fn start_token_keeper(listing: Value, mint_url: String) -> TokenKeeper {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let chats = Arc::new(AtomicU64::new(0));
    let shared = (chats.clone(), Arc::new(listing), Arc::new(mint_url));
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let shared = shared.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (chats, listing, mint) = shared.clone();
                    async move {
                        let (status, body) = match req.uri().path() {
                            "/v1/info" => (200, json!({ "name": "keeper", "mints": [*mint] })),
                            "/v1/models" => (200, (*listing).clone()),
                            "/v1/chat/completions" => {
                                chats.fetch_add(1, Ordering::SeqCst);
                                if let Some(token) = req.headers().get("x-cashu").and_then(|v| v.to_str().ok()) {
                                    redeem_token(&mint, token).await.expect("the keeper takes the token");
                                }
                                let error = json!({ "message": "too long", "type": "invalid_request_error", "code": "context_length_exceeded" });
                                (400, json!({ "error": error }))
                            }
                            _ => (404, json!({ "error": { "message": "not here", "code": "not_found" } })),
                        };
                        let body = http_body_util::Full::new(bytes::Bytes::from(body.to_string()));
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(body)
                                .unwrap(),
                        )
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    TokenKeeper { url, chats, _task: task }
}

/// A provider that keeps the token of a request it refuses: the client gets the error and pays
/// nothing, the operator is out that one token, and the provider is not asked (nor paid) again
/// for a while: refusals cannot empty the node's wallet.
#[tokio::test]
async fn a_provider_keeping_tokens_of_refused_requests_is_not_paid_again() {
    let (relay, relay_url, db) = start_relay().await;
    let listing = {
        let template = Harness::start("keeper-template").await;
        template.get("/v1/models", None).await.json
    };
    let mut b = Harness::start_with(
        "keeper-b",
        Options {
            env: vec![
                ("NOSTR_ENABLED", "true".into()),
                ("RELAYS", relay_url.clone()),
                ("NAME", "node-b".into()),
                ("NOSTR_HEALTH_SECONDS", "3600".into()),
                ("REMOTE_RECOVERY_SECONDS", "1".into()),
            ],
            unset: vec!["UPSTREAM_BASE_URL", "UPSTREAM_API_KEY"],
            ..Default::default()
        },
    )
    .await;
    let keeper = start_token_keeper(listing, b.mint.url.clone()).await;
    let keys = Keys::generate();
    let tags = [["d", "keeper"], ["u", keeper.url.as_str()], ["mint", b.mint.url.as_str()], ["version", "9.9.9"]];
    let event = EventBuilder::new(Kind::from(38421), json!({ "name": "keeper", "about": "" }).to_string())
        .tags(tags.map(|t| Tag::parse(t).unwrap()))
        .sign_with_keys(&keys)
        .unwrap();
    db.save_event(&event).await.unwrap();
    relay.notify_event(event);
    eventually("B discovers the keeper", 40, || async {
        let list = b.get("/v1/providers?model=gpt-test", None).await.json;
        (list["providers"].as_array()?.first()?["health"] == "ok").then_some(())
    })
    .await;
    // The operator's own money beside the client's: what the keeper takes is the operator's loss.
    let deposit = mint_token(&b.mint.url, 200, false).await.unwrap();
    assert!(b.node.cli(&["wallet", "receive", &deposit]).await.status.success());
    b.operator_in_msat += 200_000;
    let key = b.key(100).await;

    let refused = b.post("/v1/chat/completions", Some(&key), &chat(false)).await;
    assert_eq!(refused.status, 400, "{}", refused.text);
    assert_eq!(refused.error_code(), "context_length_exceeded");
    assert_eq!(b.balance(&key).await, (100_000, 0), "the client pays nothing for a refusal");
    assert_eq!(keeper.chats.load(Ordering::SeqCst), 1);
    // Not chosen again meanwhile: nobody else sells the model, so the next request is refused here.
    let next = b.post("/v1/chat/completions", Some(&key), &chat(false)).await;
    assert_eq!(next.status, 503, "{}", next.text);
    assert_eq!(keeper.chats.load(Ordering::SeqCst), 1, "the keeper was not paid again");
    // B asked for change, was told there is none, and its books close: the token is its loss.
    let spend = eventually("the kept token's spend is settled", 40, || async {
        remote_spends(&b).pop().filter(|s| s.2 == "settled")
    })
    .await;
    assert_eq!(spend.1, 0, "no change came back");
    let t = b.assert_conserved().await;
    assert_eq!(t.remote_net_msat(), spend.0);
}
