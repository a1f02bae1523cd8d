//! Tests of the stand-in OpenAI-compatible upstream used by the node's tests, demo and benchmark.
#![cfg(feature = "demo")]

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use routstr_node::demo::upstream::{Behavior, StandInConfig, StandInModel, StandInUpstream};
use serde_json::{json, Value};

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().expect("reqwest client")
}

async fn start() -> StandInUpstream {
    StandInUpstream::start(StandInConfig::default()).await.expect("start stand-in")
}

fn chat_body(stream: bool, include_usage: bool) -> Value {
    let mut body = json!({
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [
                {"type": "text", "text": "say hello to"},
                {"type": "text", "text": "  the   world "}
            ]}
        ]
    });
    if stream {
        body["stream"] = json!(true);
    }
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}
/// Words in `chat_body`: "You are terse." (3) + "say hello to" (3) + "the world" (2).
const CHAT_PROMPT_WORDS: u64 = 8;

/// SSE `data:` payloads of a complete body, in order.
fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")).map(str::to_owned))
        .collect()
}

/// (event name, data JSON) pairs of an Anthropic/Responses style SSE body.
fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let name = e.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or("").to_owned();
            let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or("null");
            (name, serde_json::from_str(data).expect("event data is JSON"))
        })
        .collect()
}

async fn post(up: &StandInUpstream, path: &str, body: &Value) -> reqwest::Response {
    client().post(format!("{}{}", up.base_url, path)).json(body).send().await.expect("request")
}

/// Reads a streamed body until it ends, errors or stalls for `idle`.
/// Returns (text received, ended with an error, stalled).
async fn read_stream(resp: reqwest::Response, idle: Duration) -> (String, bool, bool) {
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    loop {
        match tokio::time::timeout(idle, stream.next()).await {
            Err(_) => return (text, false, true),
            Ok(None) => return (text, false, false),
            Ok(Some(Err(_))) => return (text, true, false),
            Ok(Some(Ok(b))) => text.push_str(&String::from_utf8_lossy(&b)),
        }
    }
}

fn content_chunks(data: &[String]) -> Vec<String> {
    data.iter()
        .filter(|d| d.as_str() != "[DONE]")
        .filter_map(|d| {
            let v: Value = serde_json::from_str(d).ok()?;
            v["choices"][0]["delta"]["content"].as_str().map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn models_follow_openrouter_schema() {
    let up = start().await;
    assert!(up.base_url.starts_with("http://127.0.0.1:"));
    assert!(up.base_url.ends_with("/v1"));
    for url in [format!("{}/models", up.base_url), format!("http://{}/models", up.addr)] {
        let resp = client().get(url).send().await.expect("models");
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.expect("json");
        assert_eq!(v["object"], "list");
        let data = v["data"].as_array().expect("data");
        let gpt = data.iter().find(|m| m["id"] == "gpt-test").expect("gpt-test");
        assert!(data.iter().any(|m| m["id"] == "embed-test"));
        assert_eq!(gpt["pricing"]["prompt"], "0.000001");
        assert_eq!(gpt["pricing"]["completion"], "0.000002");
        for k in ["request", "image", "web_search", "internal_reasoning", "input_cache_read", "input_cache_write"] {
            assert!(gpt["pricing"][k].is_string(), "pricing.{k} is a string");
        }
        assert!(gpt["context_length"].as_u64().expect("context_length") > 0);
        assert!(gpt["created"].is_u64());
        assert!(gpt["name"].is_string());
        assert_eq!(gpt["architecture"]["modality"], "text->text");
        assert!(gpt["top_provider"]["context_length"].is_u64());
        assert!(gpt["top_provider"]["max_completion_tokens"].is_u64());
    }
    let one: Value = client()
        .get(format!("{}/models/gpt-test", up.base_url))
        .send()
        .await
        .expect("model")
        .json()
        .await
        .expect("json");
    assert_eq!(one["id"], "gpt-test");
    // Listing models is not a completion request.
    assert_eq!(up.requests(), 0);
    assert!(up.last_request().is_none());

    let bare = StandInUpstream::start(StandInConfig {
        with_pricing: false,
        models: vec![StandInModel::chat("only-model", "0.5", "1.5")],
        ..StandInConfig::default()
    })
    .await
    .expect("start");
    let v: Value =
        client().get(format!("{}/models", bare.base_url)).send().await.expect("models").json().await.expect("json");
    assert_eq!(v["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["data"][0]["id"], "only-model");
    assert!(v["data"][0].get("pricing").is_none());
}

#[tokio::test]
async fn chat_json_usage_is_deterministic() {
    let up = start().await;
    let resp = post(&up, "/chat/completions", &chat_body(false, false)).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().expect("ct").starts_with("application/json"));
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-test");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let content = v["choices"][0]["message"]["content"].as_str().expect("content");
    assert!(!content.is_empty());
    assert_eq!(v["usage"]["prompt_tokens"], CHAT_PROMPT_WORDS);
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert_eq!(v["usage"]["total_tokens"], CHAT_PROMPT_WORDS + 8);

    // max_tokens caps the completion; so does max_completion_tokens.
    for key in ["max_tokens", "max_completion_tokens"] {
        let mut body = chat_body(false, false);
        body[key] = json!(3);
        let v: Value = post(&up, "/chat/completions", &body).await.json().await.expect("json");
        assert_eq!(v["usage"]["completion_tokens"], 3, "{key}");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
    }

    // The prompt counts at least one token, and works without the /v1 prefix.
    let resp = client()
        .post(format!("http://{}/chat/completions", up.addr))
        .json(&json!({"model": "gpt-test", "messages": [{"role": "user", "content": ""}]}))
        .send()
        .await
        .expect("request");
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["usage"]["prompt_tokens"], 1);
    assert_eq!(up.requests(), 4);
}

#[tokio::test]
async fn chat_stream_without_include_usage_has_no_usage_chunk() {
    let up = start().await;
    let resp = post(&up, "/chat/completions", &chat_body(true, false)).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().expect("ct").starts_with("text/event-stream"));
    let text = resp.text().await.expect("body");
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> =
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).expect("chunk json")).collect();
    assert_eq!(chunks.len(), 8 + 1, "8 content chunks + the finish chunk");
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(c.get("usage").is_none(), "no usage without include_usage: {c}");
        assert_eq!(c["choices"].as_array().map(Vec::len), Some(1));
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[8]["choices"][0]["finish_reason"], "stop");
    assert_eq!(content_chunks(&data).len(), 8);
}

#[tokio::test]
async fn chat_stream_with_include_usage_ends_with_usage_chunk() {
    let up = start().await;
    let resp = post(&up, "/chat/completions", &chat_body(true, true)).await;
    let text = resp.text().await.expect("body");
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let usage_chunk: Value = serde_json::from_str(&data[data.len() - 2]).expect("usage chunk");
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], CHAT_PROMPT_WORDS);
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 8);
    assert_eq!(usage_chunk["usage"]["total_tokens"], CHAT_PROMPT_WORDS + 8);
    // Every earlier chunk carries `"usage": null`, like OpenAI.
    for d in &data[..data.len() - 2] {
        let c: Value = serde_json::from_str(d).expect("chunk");
        assert!(c["usage"].is_null());
    }
    // The streamed content equals the non-streamed content.
    let streamed: String = content_chunks(&data).concat();
    let v: Value = post(&up, "/chat/completions", &chat_body(false, false)).await.json().await.expect("json");
    assert_eq!(v["choices"][0]["message"]["content"], streamed.as_str());

    // max_tokens caps the stream too.
    let mut body = chat_body(true, true);
    body["max_tokens"] = json!(2);
    let data = sse_data(&post(&up, "/chat/completions", &body).await.text().await.expect("body"));
    assert_eq!(content_chunks(&data).len(), 2);
    let usage_chunk: Value = serde_json::from_str(&data[data.len() - 2]).expect("usage chunk");
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 2);

    let rec = up.last_request().expect("recorded");
    assert_eq!(rec.body["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn chunks_are_flushed_one_by_one_with_delay() {
    let up = StandInUpstream::start(StandInConfig {
        chunk_delay: Duration::from_millis(100),
        stream_chunks: 5,
        ..StandInConfig::default()
    })
    .await
    .expect("start");
    let started = Instant::now();
    let resp = post(&up, "/chat/completions", &chat_body(true, true)).await;
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    let mut first_content_at = None;
    while let Some(b) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&b.expect("chunk")));
        if first_content_at.is_none() && text.contains("\"content\"") {
            first_content_at = Some(started.elapsed());
        }
    }
    let total = started.elapsed();
    let first = first_content_at.expect("content arrived");
    assert!(total >= Duration::from_millis(400), "4 delays of 100ms: {total:?}");
    assert!(
        first + Duration::from_millis(250) < total,
        "first chunk at {first:?} must arrive long before the end at {total:?}"
    );
    assert_eq!(content_chunks(&sse_data(&text)).len(), 5);

    // The header overrides both the delay and the chunk count.
    let started = Instant::now();
    let text = client()
        .post(format!("{}/chat/completions", up.base_url))
        .header("x-stand-in-delay-ms", "0")
        .header("x-stand-in-chunks", "12")
        .json(&chat_body(true, false))
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("body");
    assert!(started.elapsed() < Duration::from_millis(300));
    assert_eq!(content_chunks(&sse_data(&text)).len(), 12);
}

#[tokio::test]
async fn a_whole_answer_waits_its_answer_delay() {
    let up = start().await;
    let send_as = |delay: &str, stream: bool| {
        client()
            .post(format!("{}/chat/completions", up.base_url))
            .header("x-stand-in-answer-delay-us", delay)
            .json(&chat_body(stream, false))
            .send()
    };
    let send = |delay: &str| send_as(delay, false);
    let started = Instant::now();
    let resp = send("150000").await.expect("request");
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert!(started.elapsed() >= Duration::from_millis(150), "answered after {:?}", started.elapsed());

    // A range: each request its own delay within it.
    let started = Instant::now();
    assert_eq!(send("40000-60000").await.expect("request").status(), 200);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(40), "answered after {took:?}");

    for bad in ["60000-40000", "1-x"] {
        let resp = send(bad).await.expect("request");
        assert_eq!(resp.status(), 400, "{bad}");
    }
    let resp = send("soon").await.expect("request");
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.expect("json");
    assert!(v["error"]["message"].as_str().unwrap_or_default().contains("x-stand-in-answer-delay-us"));

    // Only whole answers wait: a stream begins at once.
    let started = Instant::now();
    let resp = send_as("5000000", true).await.expect("request");
    assert_eq!(resp.status(), 200);
    let _ = resp.text().await.expect("stream");
    assert!(started.elapsed() < Duration::from_secs(4), "the stream waited {:?}", started.elapsed());
}

#[tokio::test]
async fn status_behaviors_return_openai_errors() {
    let up = start().await;
    up.set_behavior(Behavior::Status(500));
    assert_eq!(up.behavior(), Behavior::Status(500));
    let resp = post(&up, "/chat/completions", &chat_body(false, false)).await;
    assert_eq!(resp.status(), 500);
    let v: Value = resp.json().await.expect("json");
    assert!(v["error"]["message"].is_string());
    assert!(v["error"]["type"].is_string());
    assert!(v["error"]["code"].is_string());

    // The per-request header wins over the global behavior.
    let resp = client()
        .post(format!("{}/chat/completions", up.base_url))
        .header("x-stand-in-behavior", "normal")
        .json(&chat_body(false, false))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);

    up.set_behavior(Behavior::Normal);
    for (value, status) in [("429", 429u16), ("503", 503), ("500", 500)] {
        let resp = client()
            .post(format!("{}/chat/completions", up.base_url))
            .header("x-stand-in-behavior", value)
            .json(&chat_body(true, true))
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status().as_u16(), status);
        if status == 429 {
            assert_eq!(resp.headers()["retry-after"], "1");
        }
        let v: Value = resp.json().await.expect("json");
        assert!(v["error"]["message"].is_string());
    }
    // Faults still count as upstream requests.
    assert_eq!(up.requests(), 5);

    // An unknown behavior value is a 400, not silently ignored.
    let resp = client()
        .post(format!("{}/chat/completions", up.base_url))
        .header("x-stand-in-behavior", "explode")
        .json(&chat_body(false, false))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn stall_never_answers() {
    let up = start().await;
    up.set_behavior(Behavior::Stall);
    let sent =
        tokio::time::timeout(Duration::from_millis(400), post(&up, "/chat/completions", &chat_body(false, false)))
            .await;
    assert!(sent.is_err(), "a stalled upstream must not answer");
    assert_eq!(up.requests(), 1);

    up.set_behavior(Behavior::Normal);
    let sent = tokio::time::timeout(
        Duration::from_millis(400),
        client()
            .post(format!("{}/chat/completions", up.base_url))
            .header("x-stand-in-behavior", "stall")
            .json(&chat_body(true, true))
            .send(),
    )
    .await;
    assert!(sent.is_err());
}

#[tokio::test]
async fn no_usage_omits_usage_everywhere() {
    let up = start().await;
    up.set_behavior(Behavior::NoUsage);
    let v: Value = post(&up, "/chat/completions", &chat_body(false, false)).await.json().await.expect("json");
    assert!(v.get("usage").is_none());
    assert!(v["choices"][0]["message"]["content"].is_string());

    let data = sse_data(&post(&up, "/chat/completions", &chat_body(true, true)).await.text().await.expect("body"));
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(content_chunks(&data).len(), 8);
    for d in &data[..data.len() - 1] {
        let c: Value = serde_json::from_str(d).expect("chunk");
        assert!(!c["usage"].is_object(), "no usage object: {c}");
        assert_ne!(c["choices"], json!([]), "no usage-only chunk");
    }

    // Anthropic stream without usage.
    let events = sse_events(
        &client()
            .post(format!("{}/messages", up.base_url))
            .json(&json!({"model": "gpt-test", "max_tokens": 100, "stream": true,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .expect("request")
            .text()
            .await
            .expect("body"),
    );
    assert!(events.iter().all(|(_, d)| d.get("usage").is_none() && d["message"].get("usage").is_none()));

    // Per-request override.
    up.set_behavior(Behavior::Normal);
    let v: Value = client()
        .post(format!("{}/chat/completions", up.base_url))
        .header("x-stand-in-behavior", "no-usage")
        .json(&chat_body(false, false))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert!(v.get("usage").is_none());
}

#[tokio::test]
async fn disconnect_mid_stream_sends_half_then_drops() {
    let up = start().await;
    up.set_behavior(Behavior::DisconnectMidStream);
    let resp = post(&up, "/chat/completions", &chat_body(true, true)).await;
    assert_eq!(resp.status(), 200);
    let (text, errored, stalled) = read_stream(resp, Duration::from_secs(5)).await;
    assert!(errored, "the body must end with an error, not cleanly");
    assert!(!stalled);
    let data = sse_data(&text);
    assert_eq!(content_chunks(&data).len(), 4, "half of 8 chunks");
    assert!(!text.contains("[DONE]"));
    assert!(!text.contains("\"total_tokens\""));

    // Non-streaming: half a JSON body, then the connection drops.
    let resp = post(&up, "/chat/completions", &chat_body(false, false)).await;
    assert!(resp.text().await.is_err());

    // Per-request override.
    up.set_behavior(Behavior::Normal);
    let resp = client()
        .post(format!("{}/chat/completions", up.base_url))
        .header("x-stand-in-behavior", "disconnect")
        .header("x-stand-in-chunks", "6")
        .json(&chat_body(true, false))
        .send()
        .await
        .expect("request");
    let (text, errored, _) = read_stream(resp, Duration::from_secs(5)).await;
    assert!(errored);
    assert_eq!(content_chunks(&sse_data(&text)).len(), 3);
}

#[tokio::test]
async fn stall_mid_stream_sends_some_then_hangs() {
    let up = start().await;
    up.set_behavior(Behavior::StallMidStream);
    let resp = post(&up, "/chat/completions", &chat_body(true, true)).await;
    assert_eq!(resp.status(), 200);
    let (text, errored, stalled) = read_stream(resp, Duration::from_millis(400)).await;
    assert!(stalled, "the stream must hang");
    assert!(!errored);
    assert_eq!(content_chunks(&sse_data(&text)).len(), 4);
    assert!(!text.contains("[DONE]"));

    up.set_behavior(Behavior::Normal);
    let resp = client()
        .post(format!("{}/messages", up.base_url))
        .header("x-stand-in-behavior", "stall-mid-stream")
        .json(&json!({"model": "gpt-test", "max_tokens": 100, "stream": true,
            "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("request");
    let (text, _, stalled) = read_stream(resp, Duration::from_millis(400)).await;
    assert!(stalled);
    let events = sse_events(&text);
    assert_eq!(events[0].0, "message_start");
    assert_eq!(events.iter().filter(|(n, _)| n == "content_block_delta").count(), 4);
    assert!(!events.iter().any(|(n, _)| n == "message_stop"));
}

#[tokio::test]
async fn connect_refused_drops_connections() {
    let up = start().await;
    up.set_behavior(Behavior::ConnectRefused);
    let err = client().post(format!("{}/chat/completions", up.base_url)).json(&chat_body(false, false)).send().await;
    assert!(err.is_err(), "no response at all");

    up.set_behavior(Behavior::Normal);
    let c = client();
    let ok = c
        .post(format!("{}/chat/completions", up.base_url))
        .json(&chat_body(false, false))
        .send()
        .await
        .expect("request");
    assert_eq!(ok.status(), 200);
    let _ = ok.bytes().await;
    // Per request, on an already-open connection: the request is read, then dropped.
    let err = c
        .post(format!("{}/chat/completions", up.base_url))
        .header("x-stand-in-behavior", "drop")
        .json(&chat_body(false, false))
        .send()
        .await;
    assert!(err.is_err());
    // And the server keeps serving.
    let ok = c
        .post(format!("{}/chat/completions", up.base_url))
        .json(&chat_body(false, false))
        .send()
        .await
        .expect("request");
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn anthropic_messages_usage_json_and_stream() {
    let up = start().await;
    let body = json!({
        "model": "gpt-test",
        "max_tokens": 100,
        "system": "be brief please",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}]
    });
    let v: Value = post(&up, "/messages", &body).await.json().await.expect("json");
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["content"][0]["type"], "text");
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["usage"]["input_tokens"], 5);
    assert_eq!(v["usage"]["output_tokens"], 8);

    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    streaming["max_tokens"] = json!(6);
    let resp = post(&up, "/messages", &streaming).await;
    assert!(resp.headers()["content-type"].to_str().expect("ct").starts_with("text/event-stream"));
    let events = sse_events(&resp.text().await.expect("body"));
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"message_stop"));
    for (n, d) in &events {
        assert_eq!(d["type"], n.as_str(), "event name matches data.type");
    }
    let start = &events[0].1;
    assert_eq!(start["message"]["usage"]["input_tokens"], 5);
    let deltas: Vec<&Value> = events.iter().filter(|(n, _)| n == "content_block_delta").map(|(_, d)| d).collect();
    assert_eq!(deltas.len(), 6);
    assert!(deltas.iter().all(|d| d["delta"]["type"] == "text_delta"));
    let message_delta = &events.iter().find(|(n, _)| n == "message_delta").expect("message_delta").1;
    assert_eq!(message_delta["usage"]["output_tokens"], 6);
    assert_eq!(message_delta["delta"]["stop_reason"], "max_tokens");
    let pos = |name: &str| names.iter().position(|n| *n == name).expect(name);
    assert!(pos("content_block_start") < pos("content_block_delta"));
    assert!(pos("content_block_stop") < pos("message_delta"));
    assert!(pos("message_delta") < pos("message_stop"));

    // Errors on the Anthropic endpoint carry the Anthropic top-level type too.
    let resp = client()
        .post(format!("{}/messages", up.base_url))
        .header("x-stand-in-behavior", "529")
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 529);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["type"], "error");
    assert!(v["error"]["message"].is_string());
}

#[tokio::test]
async fn legacy_completions_embeddings_and_responses() {
    let up = start().await;

    let v: Value =
        post(&up, "/completions", &json!({"model": "gpt-test", "prompt": "once upon a time", "max_tokens": 5}))
            .await
            .json()
            .await
            .expect("json");
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"].is_string());
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], 9);

    let text = post(
        &up,
        "/completions",
        &json!({"model": "gpt-test", "prompt": ["a b", "c"], "stream": true,
            "stream_options": {"include_usage": true}}),
    )
    .await
    .text()
    .await
    .expect("body");
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).expect("usage chunk");
    assert_eq!(usage["usage"]["prompt_tokens"], 3);
    assert_eq!(usage["usage"]["completion_tokens"], 8);
    let texts = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|c| c["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()))
        .count();
    assert_eq!(texts, 8);

    let v: Value =
        post(&up, "/embeddings", &json!({"model": "embed-test", "input": ["one two", "three", "four five six"]}))
            .await
            .json()
            .await
            .expect("json");
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().expect("data");
    assert_eq!(data.len(), 3);
    for (i, e) in data.iter().enumerate() {
        assert_eq!(e["index"], i);
        assert!(!e["embedding"].as_array().expect("vector").is_empty());
        assert!(e["embedding"][0].is_f64());
    }
    assert_eq!(v["usage"]["prompt_tokens"], 6);
    assert_eq!(v["usage"]["total_tokens"], 6);

    let v: Value = post(
        &up,
        "/responses",
        &json!({"model": "gpt-test", "instructions": "be nice",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "hello you"}]}]}),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["output"][0]["content"][0]["type"], "output_text");
    assert_eq!(v["usage"]["input_tokens"], 4);
    assert_eq!(v["usage"]["output_tokens"], 8);
    assert_eq!(v["usage"]["total_tokens"], 12);

    let events = sse_events(
        &post(&up, "/responses", &json!({"model": "gpt-test", "input": "hi", "stream": true, "max_output_tokens": 3}))
            .await
            .text()
            .await
            .expect("body"),
    );
    assert_eq!(events[0].0, "response.created");
    assert_eq!(events.iter().filter(|(n, _)| n == "response.output_text.delta").count(), 3);
    let (last, done) = events.last().expect("events");
    assert_eq!(last, "response.completed");
    assert_eq!(done["response"]["usage"]["input_tokens"], 1);
    assert_eq!(done["response"]["usage"]["output_tokens"], 3);
    assert_eq!(done["response"]["status"], "incomplete");
    assert_eq!(up.requests(), 5);
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let up = start().await;
    let resp = post(
        &up,
        "/chat/completions",
        &json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.expect("json");
    assert!(v["error"]["message"].as_str().expect("message").contains("no-such-model"));
    assert_eq!(v["error"]["code"], "model_not_found");
    assert!(v["error"]["type"].is_string());

    for body in ["{not json", "", "[1,2]", r#"{"model": 5}"#] {
        let resp = client()
            .post(format!("{}/chat/completions", up.base_url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 400, "body {body:?}");
        let v: Value = resp.json().await.expect("json");
        assert!(v["error"]["message"].is_string());
    }
    let resp = post(&up, "/chat/completions", &json!({"messages": []})).await;
    assert_eq!(resp.status(), 400);

    let resp = client().get(format!("{}/nope", up.base_url)).send().await.expect("request");
    assert_eq!(resp.status(), 404);
    let resp = client().get(format!("{}/chat/completions", up.base_url)).send().await.expect("request");
    assert_eq!(resp.status(), 405);
}

#[tokio::test]
async fn last_request_records_what_the_upstream_saw() {
    let up = start().await;
    let resp = client()
        .post(format!("{}/chat/completions?trace=1", up.base_url))
        .header("Authorization", "Bearer upstream-key")
        .header("X-Custom-Thing", "yes")
        .json(&chat_body(true, true))
        .send()
        .await
        .expect("request");
    let _ = resp.text().await;
    let rec = up.last_request().expect("recorded");
    assert_eq!(rec.method, "POST");
    assert_eq!(rec.path, "/v1/chat/completions");
    assert_eq!(rec.header("authorization"), Some("Bearer upstream-key"));
    assert_eq!(rec.header("AUTHORIZATION"), Some("Bearer upstream-key"));
    assert!(rec.headers.iter().any(|(k, v)| k == "x-custom-thing" && v == "yes"));
    assert!(rec.headers.iter().all(|(k, _)| *k == k.to_lowercase()));
    assert_eq!(rec.header("x-cashu"), None);
    assert_eq!(rec.body["model"], "gpt-test");
    assert_eq!(rec.body["stream"], true);
    assert_eq!(rec.body["stream_options"]["include_usage"], true);
    assert_eq!(up.requests(), 1);

    // A models listing does not overwrite it.
    let _ = client().get(format!("{}/models", up.base_url)).send().await.expect("models");
    assert_eq!(up.last_request().expect("recorded").path, "/v1/chat/completions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_many_concurrent_requests() {
    let up = start().await;
    let c = client();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..256 {
        let c = c.clone();
        let url = format!("{}/chat/completions", up.base_url);
        tasks.spawn(async move {
            let body = chat_body(i % 2 == 0, true);
            let resp = c.post(url).json(&body).send().await.expect("request");
            assert_eq!(resp.status(), 200);
            let text = resp.text().await.expect("body");
            if i % 2 == 0 {
                assert!(text.ends_with("data: [DONE]\n\n"));
            } else {
                let v: Value = serde_json::from_str(&text).expect("json");
                assert_eq!(v["usage"]["completion_tokens"], 8);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("task");
    }
    assert_eq!(up.requests(), 256);
}

#[tokio::test]
async fn dropping_the_handle_stops_the_server() {
    let up = start().await;
    let url = format!("{}/models", up.base_url);
    assert_eq!(client().get(&url).send().await.expect("models").status(), 200);
    drop(up);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let res = tokio::time::timeout(Duration::from_secs(2), client().get(&url).send()).await;
    assert!(matches!(res, Ok(Err(_))), "connection refused after drop");
}
