//! Real messages the worker produces, validated against the JSON Schemas in `schemas/`.
//!
//! `schemas/job.v1.schema.json`, `reply.v1.schema.json` and `event.v1.schema.json` are the
//! machine-readable form of docs/CONTRACT.md, for the chat backend and anyone else to validate
//! against. A schema written by hand drifts from the code unless something checks it, so these
//! tests hold it to what the code really does:
//!
//! - each file is a valid draft 2020-12 schema;
//! - replies and events published by a running worker (the real broker, database, OAuth test
//!   server and Python MCP servers) match: ok replies from both MCP SDK generations, a tool's own
//!   failure, every error code that can be caused for real, and every kind of token event.
//!   `mcp_protocol_error` alone is left to the serialized `Reply` values below: the test MCP
//!   servers answer every failure as a tool result, and a failed handshake is `mcp_unavailable`;
//! - the jobs these tests publish, and the job `mcp-worker call` publishes (captured off the
//!   broker), match the job schema;
//! - the job schema accepts what the worker's decoder accepts and refuses what it refuses, except
//!   for a short, asserted list of rules JSON Schema cannot express;
//! - the reply schema's error codes are exactly those of `ErrorCode` and of the contract's table;
//! - hand-made wrong messages are refused, so a schema that accepts anything would fail here.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;

use chrono::Utc;
use jsonschema::Validator;
use lapin::message::Delivery;
use lapin::types::FieldTable;
use mcp_worker::job::{self, ErrorCode, Limits, Reply};
use mcp_worker::provider::Provider;
use serde_json::{Value, json};

use crate::support::{
    Flavor, McpServer, REPLY_WAIT, TestApp, connect_as_browser, declare_queue, repo, spawn_app, spawn_app_with,
    spawn_app_with_oauth, worker_env,
};

/// Nothing listens on port 9 (discard) on the test machines.
const NO_MCP: &str = "http://127.0.0.1:9/mcp";

const DRAFT_2020_12: &str = "https://json-schema.org/draft/2020-12/schema";

/// The decoder's limits with the defaults of config/default.toml.
const DEFAULT_LIMITS: Limits = Limits { max_bytes: 1 << 20, max_depth: 32 };

/// Every reply error code. `code_is_listed` stops compiling when a variant is added to
/// `ErrorCode`: that is the reminder to add it here, and so to the schema and the contract,
/// which the tests below compare with this list.
const ALL_CODES: [ErrorCode; 11] = [
    ErrorCode::InvalidJob,
    ErrorCode::UnknownTool,
    ErrorCode::NotConnected,
    ErrorCode::ReauthRequired,
    ErrorCode::TokenUnavailable,
    ErrorCode::McpUnavailable,
    ErrorCode::McpProtocolError,
    ErrorCode::Forbidden,
    ErrorCode::DeadlineExceeded,
    ErrorCode::DeliveryLimit,
    ErrorCode::Internal,
];

fn code_is_listed(code: ErrorCode) -> bool {
    match code {
        ErrorCode::InvalidJob
        | ErrorCode::UnknownTool
        | ErrorCode::NotConnected
        | ErrorCode::ReauthRequired
        | ErrorCode::TokenUnavailable
        | ErrorCode::McpUnavailable
        | ErrorCode::McpProtocolError
        | ErrorCode::Forbidden
        | ErrorCode::DeadlineExceeded
        | ErrorCode::DeliveryLimit
        | ErrorCode::Internal => ALL_CODES.contains(&code),
    }
}

/// Every provider; `provider_is_listed` plays the part of `code_is_listed` for `Provider`.
const ALL_PROVIDERS: [Provider; 1] = [Provider::Qlik];

fn provider_is_listed(provider: Provider) -> bool {
    match provider {
        Provider::Qlik => ALL_PROVIDERS.contains(&provider),
    }
}

const SCHEMA_NAMES: [&str; 4] = ["job", "reply", "event", "catalog"];

/// Where the schemas' `$id`s live: a schema refers to another by its file name, beside it.
const SCHEMA_BASE: &str = "https://mcp-worker.invalid/schemas/";

/// Finds a schema another refers to in `schemas/`, as a consumer would beside the referring file.
/// Nothing is fetched from the network.
struct Beside;

impl jsonschema::Retrieve for Beside {
    fn retrieve(&self, uri: &jsonschema::Uri<String>) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let file = uri.as_str().strip_prefix(SCHEMA_BASE).ok_or_else(|| format!("{uri} is not one of ours"))?;
        let name = file.strip_suffix(".v1.schema.json").ok_or_else(|| format!("{uri} is not a schema file"))?;
        Ok(schema_document(name))
    }
}

/// `schemas/<name>.v1.schema.json`, parsed.
fn schema_document(name: &str) -> Value {
    let path = repo().join(format!("schemas/{name}.v1.schema.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// A validator for `schemas/<name>.v1.schema.json`. Formats (`date-time`) are asserted, not just
/// annotated as draft 2020-12 does by default, because the contract relies on them; an unknown
/// format is an error rather than silently passing.
fn validator(name: &str) -> Validator {
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .should_ignore_unknown_formats(false)
        .with_retriever(Beside)
        .build(&schema_document(name))
        .unwrap_or_else(|e| panic!("schemas/{name}.v1.schema.json does not compile: {e}"))
}

struct Schemas {
    job: Validator,
    reply: Validator,
    event: Validator,
    catalog: Validator,
}

fn schemas() -> Schemas {
    Schemas {
        job: validator("job"),
        reply: validator("reply"),
        event: validator("event"),
        catalog: validator("catalog"),
    }
}

/// Fails the test, listing every violation, when `instance` does not match.
fn assert_valid(validator: &Validator, what: &str, instance: &Value) {
    let errors: Vec<String> =
        validator.iter_errors(instance).map(|e| format!("{e} (at `{}`)", e.instance_path())).collect();
    assert!(errors.is_empty(), "{what} does not match its schema: {errors:#?}\n{instance:#}");
}

fn assert_invalid(validator: &Validator, what: &str, instance: &Value) {
    assert!(!validator.is_valid(instance), "{what} should not match the schema, but does:\n{instance:#}");
}

/// The `enum` of `$defs/<name>` in a schema, as a set.
fn defs_enum(schema: &Value, name: &str) -> BTreeSet<String> {
    schema["$defs"][name]["enum"]
        .as_array()
        .unwrap_or_else(|| panic!("`$defs/{name}` has no `enum`"))
        .iter()
        .map(|v| v.as_str().expect("enum values are strings").to_owned())
        .collect()
}

/// Publishes `job` with `name` as its correlation id, after checking it against the job schema:
/// the jobs these tests send are samples of the contract too.
async fn send(app: &TestApp, schemas: &Schemas, name: &str, job: &Value) {
    assert_valid(&schemas.job, &format!("the test's job `{name}`"), job);
    app.publish(&serde_json::to_vec(job).unwrap(), Some(name)).await;
}

/// The next `count` replies, by correlation id. The worker runs jobs concurrently, so they may
/// come in any order.
async fn replies(app: &TestApp, count: usize) -> BTreeMap<String, Value> {
    let mut seen = BTreeMap::new();
    for _ in 0..count {
        let (reply, correlation) = app.next_reply().await;
        let correlation = correlation.expect("replies carry a correlation id");
        assert!(seen.insert(correlation.clone(), reply).is_none(), "two replies for `{correlation}`");
    }
    seen
}

#[test]
fn every_schema_is_a_valid_draft_2020_12_schema_with_its_own_id() {
    for name in SCHEMA_NAMES {
        let schema = schema_document(name);
        assert_eq!(schema["$schema"], DRAFT_2020_12, "{name}: declares draft 2020-12");
        assert_eq!(
            schema["$id"],
            format!("https://mcp-worker.invalid/schemas/{name}.v1.schema.json"),
            "{name}: its `$id` names its own file, under a host that never resolves"
        );
        if let Err(e) = jsonschema::draft202012::meta::validate(&schema) {
            panic!("schemas/{name}.v1.schema.json is not a valid draft 2020-12 schema: {e}");
        }
        assert!(schema["title"].is_string() && schema["description"].is_string(), "{name}: a title and a description");
        for (property, spec) in schema["properties"].as_object().expect("top-level properties") {
            assert!(spec["description"].is_string(), "{name}: `{property}` has no description");
        }
        validator(name);
    }
    // The meta-schema check above is not vacuous: it refuses a broken schema.
    assert!(jsonschema::draft202012::meta::validate(&json!({ "type": "strnig" })).is_err());
    assert!(jsonschema::draft202012::meta::validate(&json!({ "required": "job_id" })).is_err());
}

#[test]
fn the_reply_schema_has_exactly_the_error_codes_of_the_code_and_of_the_contract() {
    assert!(ALL_CODES.iter().all(|&code| code_is_listed(code)));
    let wire: BTreeSet<String> = ALL_CODES
        .iter()
        .map(|&code| {
            let name = serde_json::to_value(code).unwrap().as_str().expect("a code serializes as a string").to_owned();
            assert_eq!(name, code.as_str(), "the wire name and `as_str` (logs, metrics) agree");
            name
        })
        .collect();
    assert_eq!(wire.len(), ALL_CODES.len(), "ALL_CODES lists each code once");
    let retryable: BTreeSet<String> =
        ALL_CODES.iter().filter(|code| code.retryable()).map(|code| code.as_str().to_owned()).collect();

    let schema = schema_document("reply");
    assert_eq!(defs_enum(&schema, "error_code"), wire, "the schema's error codes are the code's");
    assert_eq!(defs_enum(&schema, "retryable_code"), retryable, "the schema's retryable codes are the code's");
    assert!(defs_enum(&schema, "provider_code").is_subset(&wire));

    // The contract's table: `| \`code\` | true/false | meaning | what the caller does |`.
    let contract = std::fs::read_to_string(repo().join("docs/CONTRACT.md")).unwrap();
    let reply_section = contract.split("\n## Reply").nth(1).expect("docs/CONTRACT.md has a Reply section");
    let reply_section = reply_section.split("\n## ").next().unwrap();
    let table: BTreeMap<String, bool> = reply_section
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let code = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            let retryable = match *cells.get(2)? {
                "true" => true,
                "false" => false,
                _ => return None,
            };
            Some((code.to_owned(), retryable))
        })
        .collect();
    let from_code: BTreeMap<String, bool> =
        ALL_CODES.iter().map(|code| (code.as_str().to_owned(), code.retryable())).collect();
    assert_eq!(table, from_code, "docs/CONTRACT.md's table of codes and `retryable` matches `ErrorCode`");

    // And every code as the worker serializes it matches the schema, with a provider where the
    // schema requires one, and without a job id only for `invalid_job`.
    let validator = validator("reply");
    let provider_codes = defs_enum(&schema, "provider_code");
    for code in ALL_CODES {
        for job_id in [Some("job-1"), None] {
            let what = format!("a `{}` reply with job id {job_id:?}", code.as_str());
            let mut reply = Reply::error(job_id, code, "a message");
            if job_id.is_none() && code != ErrorCode::InvalidJob {
                // Only a message too broken to read has no job id.
                assert_invalid(&validator, &what, &to_value(&reply.with_provider(Provider::Qlik)));
                continue;
            }
            if provider_codes.contains(code.as_str()) {
                assert_invalid(&validator, &format!("{what} and no provider"), &to_value(&reply));
                reply = reply.with_provider(Provider::Qlik);
            }
            assert_valid(&validator, &what, &to_value(&reply));
        }
    }
}

/// Serialization as the worker publishes it: `Reply::to_bytes`, parsed back.
fn to_value(reply: &Reply) -> Value {
    serde_json::from_slice(&reply.to_bytes()).unwrap()
}

#[test]
fn the_provider_enums_are_the_providers_of_the_code() {
    assert!(ALL_PROVIDERS.iter().all(|&provider| provider_is_listed(provider)));
    let names: BTreeSet<String> = ALL_PROVIDERS
        .iter()
        .map(|&provider| {
            let name = serde_json::to_value(provider).unwrap().as_str().unwrap().to_owned();
            assert_eq!(name, provider.as_str());
            name
        })
        .collect();
    assert_eq!(defs_enum(&schema_document("reply"), "provider"), names);
    let event = schema_document("event");
    let in_event: BTreeSet<String> = event["properties"]["provider"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(in_event, names);
}

/// A job whose only fault is nesting `arguments` one level deeper than the default limit.
fn too_deep_job() -> Value {
    let mut arguments = json!(1);
    for _ in 0..DEFAULT_LIMITS.max_depth + 1 {
        arguments = json!({ "a": arguments });
    }
    json!({ "job_id": "j", "user_id": "u", "tool": "t", "arguments": arguments })
}

#[test]
fn the_job_schema_accepts_what_the_decoder_accepts_and_refuses_what_it_refuses() {
    let schemas = schemas();
    let base = json!({ "job_id": "j-1", "user_id": "u-42", "tool": "qlik_list_apps" });
    let with = |key: &str, value: Value| {
        let mut job = base.clone();
        job[key] = value;
        job
    };
    let without = |key: &str| {
        let mut job = base.clone();
        job.as_object_mut().unwrap().remove(key);
        job
    };
    let fixed: Vec<(&str, Value)> = vec![
        ("the contract's example", {
            let mut job = with("arguments", json!({ "space": "x" }));
            job["deadline"] = json!("2026-11-26T15:04:05Z");
            job
        }),
        ("the three required fields alone", base.clone()),
        ("an unknown field", with("priority", json!("high"))),
        ("arguments null", with("arguments", Value::Null)),
        ("empty arguments", with("arguments", json!({}))),
        ("nested arguments within the limit", with("arguments", json!({ "a": [{ "b": { "c": null } }] }))),
        ("arguments an array", with("arguments", json!([1, 2]))),
        ("arguments a string", with("arguments", json!("x"))),
        ("arguments a number", with("arguments", json!(1))),
        ("deadline null", with("deadline", Value::Null)),
        ("deadline with an offset", with("deadline", json!("2026-11-26T15:04:05+02:00"))),
        ("deadline with fractions", with("deadline", json!("2026-11-26T15:04:05.123456Z"))),
        ("deadline not a date", with("deadline", json!("tomorrow"))),
        ("deadline a number", with("deadline", json!(1_800_000_000))),
        ("deadline without an offset", with("deadline", json!("2026-11-26T15:04:05"))),
        ("a byte-order mark is not whitespace", with("tool", json!("\u{feff}"))),
        ("a 255-byte id", with("job_id", json!("j".repeat(255)))),
        ("a 256-byte id", with("job_id", json!("j".repeat(256)))),
        ("an array", json!([])),
        ("a string", json!("job")),
        ("null", Value::Null),
        ("a number", json!(7)),
        ("an empty object", json!({})),
        ("a tools/call method", with("method", json!("tools/call"))),
        ("a null method", with("method", Value::Null)),
        ("an unknown method", with("method", json!("tools/lists"))),
        ("a method that is a number", with("method", json!(1))),
        ("a listing", json!({ "job_id": "j", "user_id": "u", "method": "tools/list" })),
        ("a listing with a blank tool", json!({ "job_id": "j", "user_id": "u", "method": "tools/list", "tool": " " })),
        (
            "a listing with a number for tool",
            json!({ "job_id": "j", "user_id": "u", "method": "tools/list", "tool": 5 }),
        ),
        (
            "a listing with array arguments",
            json!({ "job_id": "j", "user_id": "u", "method": "tools/list", "arguments": [] }),
        ),
        ("a listing without a user", json!({ "job_id": "j", "method": "tools/list" })),
        ("a listing with a blank user", json!({ "job_id": "j", "user_id": " ", "method": "tools/list" })),
        ("a call without a tool", json!({ "job_id": "j", "user_id": "u", "method": "tools/call" })),
    ];
    let mut cases: Vec<(String, Value)> = fixed.into_iter().map(|(name, job)| (name.to_owned(), job)).collect();
    for field in ["job_id", "user_id", "tool"] {
        cases.push((format!("{field} missing"), without(field)));
        cases.push((format!("{field} null"), with(field, Value::Null)));
        cases.push((format!("{field} a number"), with(field, json!(42))));
        cases.push((format!("{field} an array"), with(field, json!(["u"]))));
        cases.push((format!("{field} empty"), with(field, json!(""))));
        // Every kind of Unicode White_Space the decoder's `trim` removes.
        for blank in [" ", "\t\n\r\u{b}\u{c}", "\u{85}", "\u{a0}", "\u{1680}", "\u{2000}\u{200a}", "\u{2028}\u{2029}"] {
            cases.push((format!("{field} blank {blank:?}"), with(field, json!(blank))));
        }
        cases.push((format!("{field} blank U+202F U+205F U+3000"), with(field, json!("\u{202f}\u{205f}\u{3000}"))));
        cases.push((format!("{field} padded"), with(field, json!(" x "))));
    }
    let mut accepted = 0;
    for (name, job) in &cases {
        let decoded = job::decode(&serde_json::to_vec(job).unwrap(), DEFAULT_LIMITS);
        let valid = schemas.job.is_valid(job);
        assert_eq!(valid, decoded.is_ok(), "{name}: the schema says {valid}, the decoder {decoded:?}\n{job}");
        accepted += usize::from(valid);
    }
    assert!(accepted >= 10 && accepted < cases.len() - 20, "both outcomes are exercised ({accepted} accepted)");

    // What JSON Schema cannot express; the schema's description says so. Asserted, so that the
    // description is corrected when the decoder changes.
    let many_bytes = with("user_id", json!("é".repeat(200)));
    assert!(
        schemas.job.is_valid(&many_bytes) && job::decode(&to_bytes(&many_bytes), DEFAULT_LIMITS).is_err(),
        "200 characters are 400 bytes: `maxLength` counts characters, the decoder bytes"
    );
    let deep = too_deep_job();
    assert!(
        schemas.job.is_valid(&deep) && job::decode(&to_bytes(&deep), DEFAULT_LIMITS).is_err(),
        "nesting depth is beyond JSON Schema"
    );
    let twice = br#"{"job_id": "j-1", "user_id": "u", "user_id": "v", "tool": "t"}"#;
    let parsed: Value = serde_json::from_slice(twice).unwrap();
    assert!(schemas.job.is_valid(&parsed) && job::decode(twice, DEFAULT_LIMITS).is_err(), "a field given twice");
    let relaxed = with("deadline", json!("2026-11-26 15:04:05Z"));
    assert!(
        !schemas.job.is_valid(&relaxed) && job::decode(&to_bytes(&relaxed), DEFAULT_LIMITS).is_ok(),
        "the decoder accepts a space for `T`; the schema asks for RFC 3339"
    );
}

fn to_bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap()
}

#[test]
fn the_job_schema_refuses_every_malformed_job_it_can_see() {
    let schemas = schemas();
    // Bodies that are not JSON at all are for the decoder alone; one nested too deep is the
    // schema's known blind spot.
    let not_json = ["empty.json", "invalid_utf8.json", "truncated.json"];
    let blind = ["arguments_too_deep.json"];
    for (name, body) in crate::support::bad_job_corpus() {
        assert!(job::decode(&body, DEFAULT_LIMITS).is_err(), "{name}: the decoder refuses it");
        match serde_json::from_slice::<Value>(&body) {
            Err(_) => assert!(not_json.contains(&name.as_str()), "{name} is not JSON"),
            Ok(_) if not_json.contains(&name.as_str()) => panic!("{name} is JSON after all"),
            Ok(job) if blind.contains(&name.as_str()) => {
                assert!(schemas.job.is_valid(&job), "{name}: the schema was thought unable to refuse it")
            }
            Ok(job) => assert_invalid(&schemas.job, &name, &job),
        }
    }
}

/// Applies each mutation to a copy of `base`, which must match, and asserts that the result
/// does not: every mutation alone breaks the message.
/// A named change to a valid message.
type Mutation<'a> = (&'a str, &'a dyn Fn(&mut Value));

fn assert_mutants_invalid(validator: &Validator, what: &str, base: &Value, mutations: &[Mutation<'_>]) {
    assert_valid(validator, what, base);
    for (name, mutate) in mutations {
        let mut mutant = base.clone();
        mutate(&mut mutant);
        assert_ne!(&mutant, base, "{what}, {name}: the mutation changes something");
        assert_invalid(validator, &format!("{what}, {name}"), &mutant);
    }
}

fn remove(pointer: &'static str) -> impl Fn(&mut Value) {
    move |value: &mut Value| {
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        value.pointer_mut(parent).unwrap().as_object_mut().unwrap().remove(key).expect("the field is there");
    }
}

fn set(pointer: &'static str, new: Value) -> impl Fn(&mut Value) {
    move |value: &mut Value| {
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        value.pointer_mut(parent).unwrap().as_object_mut().unwrap().insert(key.to_owned(), new.clone());
    }
}

#[test]
fn hand_made_wrong_messages_are_refused() {
    let schemas = schemas();
    let job =
        json!({ "job_id": "j-1", "user_id": "u-42", "tool": "qlik_list_apps", "arguments": {}, "deadline": null });
    assert_mutants_invalid(
        &schemas.job,
        "a job",
        &job,
        &[
            ("without job_id", &remove("/job_id")),
            ("without user_id", &remove("/user_id")),
            ("without tool", &remove("/tool")),
            ("with a numeric user_id", &set("/user_id", json!(42))),
            ("with an empty tool", &set("/tool", json!(""))),
            ("with a blank job_id", &set("/job_id", json!("   "))),
            ("with list arguments", &set("/arguments", json!([1]))),
            ("with a bad deadline", &set("/deadline", json!("next week"))),
        ],
    );

    let ok = json!({ "status": "ok", "job_id": "j-1", "result": {
        "content": [{ "type": "text", "text": "hi" }], "structuredContent": { "n": 1 }, "isError": false,
        "_meta": {}, "resultType": "complete" } });
    assert_mutants_invalid(
        &schemas.reply,
        "an ok reply",
        &ok,
        &[
            ("without status", &remove("/status")),
            ("with an unknown status", &set("/status", json!("done"))),
            ("without result", &remove("/result")),
            ("without a job id", &set("/job_id", Value::Null)),
            ("with an empty job id", &set("/job_id", json!(""))),
            ("with a blank job id", &set("/job_id", json!(" "))),
            ("with an error besides", &set("/error", json!({ "code": "internal", "message": "m", "retryable": true }))),
            ("with an unknown field", &set("/extra", json!(1))),
            ("without content", &remove("/result/content")),
            ("with content not a list", &set("/result/content", json!("hi"))),
            ("with an untyped content block", &remove("/result/content/0/type")),
            ("with a string isError", &set("/result/isError", json!("false"))),
            ("with an input_required result", &set("/result/resultType", json!("input_required"))),
            ("with a field rmcp does not forward", &set("/result/toolResult", json!({}))),
        ],
    );

    let error = json!({ "status": "error", "job_id": "j-1", "error": {
        "code": "not_connected", "message": "connect Qlik first", "retryable": false, "provider": "qlik" } });
    assert_mutants_invalid(
        &schemas.reply,
        "an error reply",
        &error,
        &[
            ("with an unknown code", &set("/error/code", json!("exploded"))),
            ("with a code in another case", &set("/error/code", json!("NOT_CONNECTED"))),
            ("without a code", &remove("/error/code")),
            ("without a message", &remove("/error/message")),
            ("without retryable", &remove("/error/retryable")),
            ("retryable for a code that is not", &set("/error/retryable", json!(true))),
            ("with a string retryable", &set("/error/retryable", json!("false"))),
            ("without the provider it needs", &remove("/error/provider")),
            ("with an unknown provider", &set("/error/provider", json!("github"))),
            ("with a result besides", &set("/result", json!({ "content": [] }))),
            ("without a job_id field", &remove("/job_id")),
            ("with an empty job id", &set("/job_id", json!(""))),
            ("with a blank job id", &set("/job_id", json!(" \t"))),
            ("with a job id over 255 bytes", &set("/job_id", json!("j".repeat(256)))),
            ("as status ok", &set("/status", json!("ok"))),
        ],
    );
    let retryable = json!({ "status": "error", "job_id": "j-2", "error": {
        "code": "mcp_unavailable", "message": "down", "retryable": true } });
    assert_mutants_invalid(
        &schemas.reply,
        "a retryable error reply",
        &retryable,
        &[
            ("not retryable", &set("/error/retryable", json!(false))),
            ("with an unknown field in error", &set("/error/hint", json!("later"))),
        ],
    );
    // The worker echoes the `job_id` of an invalid job as it was, even when it is the fault, and
    // sends `null` when there was none: allowed for `invalid_job` alone, since every other code
    // answers a job that was read.
    for job_id in [json!(""), json!(" "), json!("j".repeat(300)), Value::Null] {
        let echoed = json!({ "status": "error", "job_id": job_id, "error": {
            "code": "invalid_job", "message": "field `job_id` must not be empty", "retryable": false } });
        assert_mutants_invalid(
            &schemas.reply,
            &format!("an invalid_job reply with job id {job_id}"),
            &echoed,
            &[("for another code", &set("/error/code", json!("unknown_tool")))],
        );
    }

    let event =
        json!({ "user_id": "u-42", "provider": "qlik", "at": "2026-11-26T15:04:05.123Z", "reason": "disconnected" });
    assert_mutants_invalid(
        &schemas.event,
        "an event",
        &event,
        &[
            ("without user_id", &remove("/user_id")),
            ("without provider", &remove("/provider")),
            ("without at", &remove("/at")),
            ("without reason", &remove("/reason")),
            ("with a numeric user_id", &set("/user_id", json!(42))),
            ("with an unknown provider", &set("/provider", json!("github"))),
            ("at a time that is not one", &set("/at", json!("yesterday"))),
            ("at a time not in UTC", &set("/at", json!("2026-11-26T17:04:05+02:00"))),
            ("with a type field", &set("/type", json!("token.disconnected"))),
        ],
    );
}

/// Two SDK generations, `qlik_*` tools on an `mcp<2` server (no `resultType`) and the plain tools
/// on an `mcp>=2` one (protocol 2026-07-28, with `resultType`), and a server that is down (no
/// retries: it is answered at once). The servers live as long as the returned pair.
async fn two_generations_and_a_down_server() -> ((McpServer, McpServer), TestApp) {
    let v1 = McpServer::spawn(Flavor::V1Sse).await;
    let v2 = McpServer::spawn(Flavor::V2Json).await;
    let overrides = [
        ("mcp.servers.plain.url", json!(v2.url())),
        ("mcp.servers.down", json!({ "url": NO_MCP, "tools": ["down_echo"] })),
        ("worker.retry_delays_ms", json!([])),
    ];
    let app = spawn_app_with(&v1.url(), &overrides).await;
    ((v1, v2), app)
}

#[tokio::test]
async fn replies_of_a_running_worker_match_the_reply_schema() {
    let schemas = schemas();
    let (_servers, app) = two_generations_and_a_down_server().await;
    app.store_token("alice", "alice-token").await;
    // A token no HTTP header can carry (stored by older code): only reconnecting helps.
    app.store_token("carol", "broken\ntoken").await;

    let call = |job_id: &str, user: &str, tool: &str| json!({ "job_id": job_id, "user_id": user, "tool": tool });
    let with = |mut job: Value, key: &str, value: Value| {
        job[key] = value;
        job
    };
    let jobs = [
        ("ok", with(call("job-ok", "alice", "echo"), "arguments", json!({ "text": "hi" }))),
        ("structured", with(call("job-whoami", "alice", "qlik_whoami"), "arguments", Value::Null)),
        ("tool_error", call("job-fail", "alice", "qlik_fail")),
        ("not_connected", call("job-nobody", "nobody", "qlik_whoami")),
        ("unknown_tool", call("job-unknown", "alice", "salesforce_query")),
        (
            "deadline_exceeded",
            with(call("job-late", "alice", "qlik_whoami"), "deadline", json!("2020-01-01T00:00:00Z")),
        ),
        ("reauth_required", call("job-carol", "carol", "qlik_whoami")),
        ("mcp_unavailable", with(call("job-down", "alice", "down_echo"), "arguments", json!({ "text": "x" }))),
    ];
    for (name, job) in &jobs {
        send(&app, &schemas, name, job).await;
    }
    // Invalid jobs, one whose id can be read and one too broken for that.
    let wrong_type = json!({ "job_id": "job-bad", "user_id": 42, "tool": "qlik_whoami" });
    assert_invalid(&schemas.job, "a job with a numeric user_id", &wrong_type);
    app.publish(&to_bytes(&wrong_type), Some("invalid_job")).await;
    app.publish(b"{not json", Some("invalid_job_unreadable")).await;

    let replies = replies(&app, jobs.len() + 2).await;
    for (name, reply) in &replies {
        assert_valid(&schemas.reply, &format!("the `{name}` reply"), reply);
    }
    // Each reply is the case it was meant to be, so the schema saw every one of them.
    let ok = &replies["ok"];
    assert_eq!((&ok["status"], &ok["result"]["content"][0]["text"]), (&json!("ok"), &json!("hi")), "{ok}");
    assert_eq!(ok["result"]["resultType"], "complete", "the mcp>=2 server sends a resultType: {ok}");
    let structured = &replies["structured"];
    assert_eq!(structured["result"]["structuredContent"]["token"], "alice-token", "{structured}");
    assert!(structured["result"].get("resultType").is_none(), "the mcp<2 server sends none: {structured}");
    assert_eq!(
        (&replies["tool_error"]["status"], &replies["tool_error"]["result"]["isError"]),
        (&json!("ok"), &json!(true))
    );
    for code in
        ["not_connected", "unknown_tool", "deadline_exceeded", "mcp_unavailable", "reauth_required", "invalid_job"]
    {
        assert_eq!(replies[code]["error"]["code"], code, "{}", replies[code]);
    }
    assert_eq!(replies["not_connected"]["error"]["provider"], "qlik");
    assert_eq!(replies["reauth_required"]["error"]["provider"], "qlik");
    assert_eq!(replies["invalid_job"]["job_id"], "job-bad");
    let unreadable = &replies["invalid_job_unreadable"];
    assert_eq!(
        (&unreadable["error"]["code"], &unreadable["job_id"]),
        (&json!("invalid_job"), &Value::Null),
        "{unreadable}"
    );
    app.stop().await;
}

/// `GET /v1/tools?user_id={user}` with the service key.
async fn catalog_over_http(app: &TestApp, user: &str) -> Value {
    let url = reqwest::Url::parse_with_params(&format!("{}/v1/tools", app.api), [("user_id", user)]).unwrap();
    let answer = reqwest::Client::new().get(url).bearer_auth(crate::support::SERVICE_KEY).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    answer.json().await.unwrap()
}

#[tokio::test]
async fn catalogs_over_amqp_and_http_match_the_catalog_schema() {
    let schemas = schemas();
    let (_servers, app) = two_generations_and_a_down_server().await;
    app.store_token("alice", "alice-token").await;
    let list = |job_id: &str, user: &str| json!({ "job_id": job_id, "user_id": user, "method": "tools/list" });
    send(&app, &schemas, "alice", &list("list-alice", "alice")).await;
    send(&app, &schemas, "nobody", &list("list-nobody", "nobody")).await;
    let replies = replies(&app, 2).await;
    for (user, reply) in &replies {
        assert_valid(&schemas.reply, &format!("{user}'s tools/list reply"), reply);
        assert_valid(&schemas.catalog, &format!("{user}'s catalog"), &reply["result"]);
        let over_http = catalog_over_http(&app, user).await;
        assert_valid(&schemas.catalog, &format!("{user}'s catalog over HTTP"), &over_http);
    }
    // Each catalog is the case it was meant to be: tools with their annotations, and each kind of
    // unavailable server.
    let alice = &replies["alice"]["result"];
    let whoami = alice["tools"].as_array().unwrap().iter().find(|t| t["name"] == "qlik_whoami").expect("listed");
    assert_eq!((&whoami["server"], &whoami["annotations"]["readOnlyHint"]), (&json!("qlik"), &json!(true)));
    assert!(alice["tools"].as_array().unwrap().iter().any(|t| t["server"] == "plain" && t["outputSchema"].is_object()));
    let codes = |catalog: &Value| -> BTreeMap<String, String> {
        let unavailable = catalog["unavailable"].as_array().unwrap().iter();
        unavailable
            .map(|u| (u["server"].as_str().unwrap().to_owned(), u["error"]["code"].as_str().unwrap().to_owned()))
            .collect()
    };
    assert_eq!(codes(alice), BTreeMap::from([("down".to_owned(), "mcp_unavailable".to_owned())]));
    let nobody = &replies["nobody"]["result"];
    assert_eq!(codes(nobody)["qlik"], "not_connected", "{nobody}");

    // The schema is not vacuous: wrong catalogs are refused.
    let mutations: &[Mutation<'_>] = &[
        ("a tool without its server", &remove("/tools/0/server")),
        ("a tool without an input schema", &remove("/tools/0/inputSchema")),
        ("a tool whose input schema is a string", &set("/tools/0/inputSchema", json!("x"))),
        ("an annotation of the wrong type", &set("/tools/0/annotations/readOnlyHint", json!("yes"))),
        ("an unknown error code", &set("/unavailable/0/error/code", json!("teapot"))),
        ("not_connected without its provider", &remove("/unavailable/0/error/provider")),
        ("no unavailable list", &remove("/unavailable")),
    ];
    assert_mutants_invalid(&schemas.catalog, "nobody's catalog", nobody, &mutations[..5]);
    let mut not_connected = nobody.clone();
    not_connected["unavailable"] =
        json!([nobody["unavailable"].as_array().unwrap().iter().find(|u| u["server"] == "qlik").unwrap()]);
    assert_mutants_invalid(&schemas.catalog, "a not_connected catalog", &not_connected, &mutations[5..]);
    assert_invalid(
        &schemas.reply,
        "an ok reply whose result is neither",
        &json!({ "status": "ok", "job_id": "j", "result": { "tools": [] } }),
    );
    app.stop().await;
}

#[tokio::test]
async fn the_invalid_job_replies_to_the_malformed_corpus_match_the_reply_schema() {
    let schemas = schemas();
    let app = spawn_app(NO_MCP).await;
    let cases = crate::support::bad_job_corpus();
    for (name, body) in &cases {
        app.publish(body, Some(name)).await;
    }
    let replies = replies(&app, cases.len()).await;
    for (name, _) in &cases {
        let reply = &replies[name];
        assert_valid(&schemas.reply, &format!("the reply to {name}"), reply);
        assert_eq!(reply["error"]["code"], "invalid_job", "{name}: {reply}");
    }
    app.stop().await;
}

/// The next message on `queue`, read through `channel` (the queue may be exclusive to its
/// connection); fails the test after [`REPLY_WAIT`].
async fn next_on(channel: &lapin::Channel, queue: &str, options: lapin::options::BasicGetOptions) -> Delivery {
    let poll = async {
        loop {
            match channel.basic_get(queue.into(), options).await.unwrap() {
                Some(message) => break message.delivery,
                None => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    };
    tokio::time::timeout(REPLY_WAIT, poll).await.unwrap_or_else(|_| panic!("nothing arrived on `{queue}` in time"))
}

#[tokio::test]
async fn a_delivery_limit_reply_matches_the_reply_schema() {
    use lapin::options::{BasicGetOptions, BasicPublishOptions, BasicRejectOptions};
    let schemas = schemas();
    let server = McpServer::spawn(Flavor::V2Json).await;
    // A first worker declares the queues and stops; then the test plays two workers that crashed
    // on the job (as in jobs.rs), and a second worker on the same queues and database answers
    // `delivery_limit` on the next delivery.
    let first = spawn_app_with(&server.url(), &[("amqp.delivery_limit", json!(2))]).await;
    let amqp = &first.settings.amqp;
    let same = [
        ("mongodb.database", json!(first.settings.mongodb.database)),
        ("amqp.jobs_queue", json!(amqp.jobs_queue)),
        ("amqp.dead_letter_queue", json!(amqp.dead_letter_queue)),
        ("amqp.refresh_queue", json!(amqp.refresh_queue)),
        ("amqp.events_exchange", json!(amqp.events_exchange)),
        ("amqp.delivery_limit", json!(2)),
    ];
    let jobs = amqp.jobs_queue.clone();
    // A connection of the test's own, which outlives the first worker's.
    let connection = lapin::Connection::connect(first.settings.amqp.url.expose(), Default::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    first.stop_keeping_queues().await;
    let replies = format!("{jobs}.poison-replies");
    declare_queue(&channel, &replies, FieldTable::default()).await;
    let job =
        json!({ "job_id": "job-poison", "user_id": "alice", "tool": "count_job", "arguments": { "job_id": "p" } });
    assert_valid(&schemas.job, "the poison job", &job);
    let properties = lapin::BasicProperties::default().with_reply_to(replies.as_str().into()).with_delivery_mode(2);
    channel
        .basic_publish("".into(), jobs.as_str().into(), BasicPublishOptions::default(), &to_bytes(&job), properties)
        .await
        .unwrap();
    for _ in 0..2 {
        let delivery = next_on(&channel, &jobs, BasicGetOptions { no_ack: false }).await;
        delivery.reject(BasicRejectOptions { requeue: true }).await.unwrap();
    }

    let app = spawn_app_with(&server.url(), &same).await;
    let reply = next_on(&channel, &replies, BasicGetOptions { no_ack: true }).await;
    let reply: Value = serde_json::from_slice(&reply.data).unwrap();
    assert_valid(&schemas.reply, "the delivery_limit reply", &reply);
    assert_eq!(reply["error"]["code"], "delivery_limit", "{reply}");
    assert!(server.tool_calls().is_empty(), "the job was not run");
    app.stop().await;
}

#[tokio::test]
async fn every_kind_of_token_event_and_the_reauth_required_reply_match_their_schemas() {
    let schemas = schemas();
    let quick_refresher = [("refresher.interval_secs", json!(1)), ("refresher.retry_initial_secs", json!(1))];
    let fx = spawn_app_with_oauth(NO_MCP, |_| {}, &quick_refresher).await;
    let events = fx.app.watch_events().await;

    // token.connected and token.disconnected: alice connects through the OAuth flow as a browser
    // would, then the chat backend disconnects her.
    assert_eq!(connect_as_browser(&fx.app, "alice", "allow").await.status, 303);
    assert_eq!(fx.app.disconnect("alice").await, 204);
    // token.reauth_required: bob's refresh token was never issued, so the provider refuses it.
    fx.app.store_tokens("bob", "bob-access", "never-issued", Utc::now() + chrono::Duration::seconds(120)).await;

    let mut seen = BTreeMap::new();
    for _ in 0..3 {
        let (key, event) = fx.app.next_event(&events).await;
        assert_valid(&schemas.event, &format!("the `{key}` event"), &event);
        assert!(seen.insert(key.clone(), event).is_none(), "two `{key}` events");
    }
    let kinds: Vec<&str> = seen.keys().map(String::as_str).collect();
    assert_eq!(kinds, ["token.connected", "token.disconnected", "token.reauth_required"]);
    assert_eq!(seen["token.connected"]["user_id"], "alice");
    assert_eq!(seen["token.disconnected"]["user_id"], "alice");
    assert_eq!(seen["token.reauth_required"]["user_id"], "bob");

    send(&fx.app, &schemas, "reauth", &json!({ "job_id": "job-bob", "user_id": "bob", "tool": "qlik_whoami" })).await;
    let (reply, _) = fx.app.next_reply().await;
    assert_valid(&schemas.reply, "the reauth_required reply", &reply);
    assert_eq!(reply["error"]["code"], "reauth_required", "{reply}");
}

#[tokio::test]
async fn a_token_unavailable_reply_matches_the_reply_schema() {
    let schemas = schemas();
    // As in refresher.rs: the token is too short for the call, the refresher's scan would not
    // renew it, and the provider fails every renewal the worker asks for.
    let overrides = [
        ("refresher.interval_secs", json!(3600)),
        ("refresher.lead_secs", json!(1)),
        ("refresher.retry_initial_secs", json!(3600)),
        ("tokens.defer_ms", json!(100)),
        ("tokens.max_deferrals", json!(2)),
    ];
    let fx = spawn_app_with_oauth(NO_MCP, |_| {}, &overrides).await;
    fx.oauth.fail_next_token_requests(100, 503, "temporarily_unavailable");
    let issued = fx.oauth.issue_grant("alice", "offline_access", std::time::Duration::from_secs(20));
    fx.app
        .store_tokens("alice", &issued.access_token, &issued.refresh_token, Utc::now() + chrono::Duration::seconds(20))
        .await;

    send(&fx.app, &schemas, "short", &json!({ "job_id": "job-short", "user_id": "alice", "tool": "qlik_whoami" }))
        .await;
    let (reply, _) = fx.app.next_reply().await;
    assert_valid(&schemas.reply, "the token_unavailable reply", &reply);
    assert_eq!(reply["error"]["code"], "token_unavailable", "{reply}");
}

#[tokio::test]
async fn the_job_mcp_worker_call_publishes_and_the_reply_it_prints_match_their_schemas() {
    let schemas = schemas();
    let server = McpServer::spawn(Flavor::V2Json).await;
    let app = spawn_app(&server.url()).await;
    // `mcp-worker call` is pointed at a queue of the test's instead of the worker's, so the job
    // can be read as published; the test then hands it on to the worker unchanged.
    let intercept = format!("{}.from-cli", app.settings.amqp.jobs_queue);
    declare_queue(&app.channel, &intercept, FieldTable::default()).await;
    let env = worker_env(&app.settings, &[("amqp.jobs_queue", json!(intercept))]);
    let cli = tokio::process::Command::new(env!("CARGO_BIN_EXE_mcp-worker"))
        .args(["call", "--user", "alice", "--tool", "echo", "--args", r#"{"text": "from the cli"}"#, "--wait", "60"])
        .env_remove("MCP_WORKER_ENV")
        .env_remove("RUST_LOG")
        .envs(env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mcp-worker call starts");

    let published = app.next_message(&intercept).await.expect("mcp-worker call publishes a job");
    let job: Value = serde_json::from_slice(&published.data).expect("the job is JSON");
    assert_valid(&schemas.job, "the job of `mcp-worker call`", &job);
    assert_eq!(
        (&job["user_id"], &job["tool"], &job["arguments"]),
        (&json!("alice"), &json!("echo"), &json!({ "text": "from the cli" }))
    );
    // The properties the contract recommends.
    let properties = &published.properties;
    let job_id = job["job_id"].as_str().unwrap();
    assert_eq!(properties.content_type().as_ref().map(|c| c.as_str()), Some("application/json"));
    assert_eq!(*properties.delivery_mode(), Some(2));
    assert_eq!(properties.message_id().as_ref().map(|m| m.as_str()), Some(job_id));
    assert_eq!(properties.correlation_id().as_ref().map(|c| c.as_str()), Some(job_id));
    assert!(properties.reply_to().is_some());
    app.publish_with(&published.data, published.properties.clone()).await;

    let output = cli.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "mcp-worker call failed ({:?}): {stderr}", output.status);
    let printed: Value = serde_json::from_slice(&output.stdout).expect("it prints the reply as JSON");
    assert_valid(&schemas.reply, "the reply `mcp-worker call` printed", &printed);
    assert_eq!(
        (&printed["job_id"], &printed["result"]["content"][0]["text"]),
        (&json!(job_id), &json!("from the cli"))
    );
    app.stop().await;
}
