//! `GET /openapi.json` stays true to the code:
//!
//! - every `.route("…", method(…))` registered anywhere under `src/http/`
//!   is documented with the same methods, and nothing else is (a route added
//!   without documentation fails here, naming it);
//! - the document is OpenAPI 3.1 whose `$ref`s all resolve;
//! - the response schemas, derived from the types the handlers send, have
//!   exactly the fields the live responses carry (a `skip_serializing_if`
//!   or a `json!` slipped past the types shows here);
//! - `src/http/openapi.rs` defines no body types of its own: a schema
//!   there would describe a body no handler builds.

mod support;

use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use support::app::{spawn_app, test_settings, unique, TestApp};

/// The HTTP methods axum's `MethodRouter` builders are named after.
const METHODS: &[&str] = &["get", "post", "put", "delete", "patch", "head", "options", "trace"];

type Routes = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// `line` without its `//` comment (a `//` inside a string literal stays).
fn strip_comment(line: &str) -> &str {
    let mut in_string = false;
    let mut previous = ' ';
    for (index, c) in line.char_indices() {
        match c {
            '"' if previous != '\\' => in_string = !in_string,
            '/' if !in_string && previous == '/' => return &line[..index - 1],
            _ => {}
        }
        previous = c;
    }
    line
}

/// The source of `src/http/**.rs` without comments and unit-test modules,
/// per file.
fn http_sources() -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http"), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let code = match text.find("#[cfg(test)]") {
                Some(cut) => &text[..cut],
                None => &text,
            };
            let code = code.lines().map(strip_comment).collect::<Vec<_>>().join("\n");
            (path, code)
        })
        .collect()
}

/// Parses a string literal at the start of `text`: (value, rest).
fn string_literal(text: &str) -> Option<(String, &str)> {
    let body = text.strip_prefix('"')?;
    let end = body.find('"')?;
    Some((body[..end].to_owned(), &body[end + 1..]))
}

/// The text of a call's arguments: from just after `(` to its matching `)`.
fn call_arguments(text: &str) -> &str {
    let mut depth = 1;
    let mut in_string = false;
    let mut previous = ' ';
    for (index, c) in text.char_indices() {
        match c {
            '"' if previous != '\\' => in_string = !in_string,
            '(' if !in_string => depth += 1,
            ')' if !in_string => {
                depth -= 1;
                if depth == 0 {
                    return &text[..index];
                }
            }
            _ => {}
        }
        previous = c;
    }
    panic!("unbalanced parentheses after .route(: {text:.80}");
}

/// Identifiers immediately followed by `(` (calls), in order.
fn called_identifiers(text: &str) -> Vec<String> {
    let mut calls = Vec::new();
    let mut current = String::new();
    for c in text.chars() {
        if c.is_alphanumeric() || c == '_' {
            current.push(c);
        } else {
            if c == '(' && !current.is_empty() {
                calls.push(current.clone());
            }
            current.clear();
        }
    }
    calls
}

/// Every `.route(PATH, METHODS)` in the HTTP sources. `PATH` is a string
/// literal or a `SCREAMING_CASE` `&str` constant defined in those sources;
/// other `.route(…)` calls (a topic router's `route(&key)`) are not axum's.
fn routed() -> Routes {
    let sources = http_sources();
    let constant = |name: &str| -> String {
        let needle = format!("const {name}: &str = ");
        sources
            .iter()
            .find_map(|(_, code)| {
                let start = code.find(&needle)? + needle.len();
                string_literal(&code[start..]).map(|(value, _)| value)
            })
            .unwrap_or_else(|| panic!("route path constant {name} is not a `const {name}: &str = \"…\"` in src/http"))
    };
    let mut routes = Routes::new();
    for (path, code) in &sources {
        for unsupported in [".nest(", ".nest_service(", ".route_service(", ".fallback_service("] {
            assert!(
                !code.contains(unsupported),
                "{}: `{unsupported}` registers routes this check cannot see; extend tests/openapi.rs",
                path.display()
            );
        }
        for (at, _) in code.match_indices(".route(") {
            let arguments = call_arguments(&code[at + ".route(".len()..]);
            let arguments = arguments.trim_start();
            let (route, rest) = match string_literal(arguments) {
                Some(found) => found,
                None => {
                    let Some(comma) = arguments.find(',') else { continue };
                    let name = arguments[..comma].trim().rsplit("::").next().unwrap();
                    let is_constant = !name.is_empty()
                        && name
                            .chars()
                            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
                    if !is_constant {
                        continue;
                    }
                    (constant(name), &arguments[comma..])
                }
            };
            assert!(
                route.starts_with('/'),
                "{}: route path {route:?} does not start with /",
                path.display()
            );
            let calls = called_identifiers(rest);
            assert!(
                !calls.iter().any(|call| call == "any"),
                "{}: route {route} uses any(); list its methods so they can be documented",
                path.display()
            );
            let methods: BTreeSet<String> = calls
                .into_iter()
                .filter(|call| METHODS.contains(&call.as_str()))
                .collect();
            assert!(
                !methods.is_empty(),
                "{}: no method found for route {route}",
                path.display()
            );
            routes.entry(route).or_default().extend(methods);
        }
    }
    routes
}

fn documented(document: &Value) -> Routes {
    document["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .map(|(path, item)| {
            let methods = item
                .as_object()
                .unwrap()
                .keys()
                .filter(|key| METHODS.contains(&key.as_str()))
                .cloned()
                .collect();
            (path.clone(), methods)
        })
        .collect()
}

fn flatten(routes: &Routes) -> BTreeSet<String> {
    routes
        .iter()
        .flat_map(|(path, methods)| methods.iter().map(move |m| format!("{} {path}", m.to_uppercase())))
        .collect()
}

/// A gateway with no broker at all: the document must not depend on one.
async fn app() -> (tempfile::TempDir, TestApp) {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(test_settings(
        dir.path(),
        "amqp://127.0.0.1:1/%2f",
        &[(&unique("tg-openapi"), "#")],
    ))
    .await;
    (dir, app)
}

async fn served_document(app: &TestApp) -> Value {
    let response = app.client.get(app.url("/openapi.json")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    response.json().await.unwrap()
}

#[tokio::test]
async fn every_route_is_documented_and_nothing_else() {
    let (_dir, app) = app().await;
    let document = served_document(&app).await;
    let routes = flatten(&routed());
    let documented = flatten(&documented(&document));
    eprintln!("routes registered in src/http: {routes:#?}");
    // The scan found the routes everyone knows about, so it is not vacuous.
    for known in [
        "POST /v1/tasks",
        "GET /v1/tasks/{id}",
        "GET /healthz",
        "GET /openapi.json",
    ] {
        assert!(routes.contains(known), "route scan missed {known}: {routes:#?}");
    }
    let missing: Vec<_> = routes.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&routes).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "src/http/openapi.rs is out of date.\n  routed but not documented: {missing:?}\n  documented but not routed: {stale:?}"
    );
}

fn collect_refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, item) in map {
                if key == "$ref" {
                    out.push(item.as_str().unwrap().to_owned());
                } else {
                    collect_refs(item, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_refs(item, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_document_is_openapi_3_1_and_self_consistent() {
    let (_dir, app) = app().await;
    let document = served_document(&app).await;
    assert_eq!(document["openapi"], "3.1.0");
    assert_eq!(document["info"]["title"], "taskgate");
    assert_eq!(document["info"]["version"], env!("CARGO_PKG_VERSION"));

    let mut refs = Vec::new();
    collect_refs(&document, &mut refs);
    assert!(!refs.is_empty());
    for reference in refs {
        let name = reference
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected $ref {reference}"));
        assert!(
            document["components"]["schemas"][name].is_object(),
            "dangling $ref {reference}"
        );
    }

    let mut operation_ids = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let id = operation["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path}: no operationId"));
            assert!(operation_ids.insert(id.to_owned()), "duplicate operationId {id}");
            let responses = operation["responses"].as_object().unwrap();
            assert!(!responses.is_empty(), "{method} {path}: no responses");
        }
    }

    // Every TaskRequest field is described, and the description table in
    // openapi.rs names no field that does not exist.
    let request = &document["components"]["schemas"]["TaskRequest"];
    let properties = request["properties"].as_object().unwrap();
    for (name, property) in properties {
        assert!(
            property["description"].as_str().is_some_and(|d| !d.is_empty()),
            "TaskRequest.{name} has no description: add it to TASK_REQUEST_FIELDS"
        );
    }
    for (field, _) in taskgate::http::openapi::TASK_REQUEST_FIELDS {
        assert!(
            properties.contains_key(*field),
            "TASK_REQUEST_FIELDS names unknown field {field}"
        );
    }
    assert_eq!(request["required"], json!(["task"]));
    assert_eq!(request["properties"]["eta"]["format"], "date-time");
}

/// A schema with `$ref`s to components resolved (one level).
fn resolve<'a>(document: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => &document["components"]["schemas"][reference.trim_start_matches("#/components/schemas/")],
        None => schema,
    }
}

fn component<'a>(document: &'a Value, name: &str) -> &'a Value {
    let schema = &document["components"]["schemas"][name];
    assert!(schema.is_object(), "no schema {name}");
    schema
}

/// The JSON schema documented for one response.
fn response_schema<'a>(document: &'a Value, method: &str, path: &str, status: &str) -> &'a Value {
    let content = &document["paths"][path][method]["responses"][status]["content"];
    let schema = content
        .as_object()
        .and_then(|content| content.values().next())
        .map(|media| &media["schema"])
        .unwrap_or_else(|| panic!("{method} {path} documents no {status} body"));
    resolve(document, schema)
}

/// The live body's keys are documented and the required ones are there;
/// every documented key is there too, except those in `may_be_absent`.
fn assert_matches(name: &str, schema: &Value, body: &Value, may_be_absent: &[&str]) {
    let properties: BTreeSet<String> = schema["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("schema {name} has no properties"))
        .keys()
        .cloned()
        .collect();
    let required: BTreeSet<String> = schema["required"]
        .as_array()
        .map(|items| items.iter().map(|item| item.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default();
    let keys: BTreeSet<String> = body.as_object().unwrap().keys().cloned().collect();
    let undocumented: Vec<_> = keys.difference(&properties).collect();
    let absent: Vec<_> = properties
        .difference(&keys)
        .filter(|key| required.contains(*key) || !may_be_absent.contains(&key.as_str()))
        .collect();
    assert!(
        undocumented.is_empty() && absent.is_empty(),
        "schema {name} does not match the live body {body:#}\n  undocumented: {undocumented:?}\n  documented but absent: {absent:?}"
    );
}

#[tokio::test]
async fn response_schemas_match_live_responses() {
    let (_dir, app) = app().await;
    let document = served_document(&app).await;
    let get = |path: String| {
        let request = app.client.get(app.url(&path));
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };

    let response = app.post_task(&json!({"task": "tests.record", "args": [1]})).await;
    assert_eq!(response.status(), 202);
    assert!(response.headers().contains_key("location"));
    let accepted: Value = response.json().await.unwrap();
    assert_matches("AcceptedTask", component(&document, "AcceptedTask"), &accepted, &[]);

    let batch: Value = app
        .client
        .post(app.url("/v1/tasks/batch"))
        .json(&json!({"tasks": [{"task": "tests.record"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_matches("AcceptedBatch", component(&document, "AcceptedBatch"), &batch, &[]);

    let status = get(format!("/v1/tasks/{}", accepted["id"].as_str().unwrap())).await;
    assert_matches(
        "TaskStatus",
        component(&document, "TaskStatus"),
        &status,
        &["tracking_error"],
    );

    let malformed = app
        .client
        .post(app.url("/v1/tasks"))
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    assert_eq!(malformed.headers()["content-type"], "application/problem+json");
    let problem = component(&document, "Problem");
    assert_matches(
        "Problem",
        problem,
        &malformed.json().await.unwrap(),
        &["field", "errors"],
    );
    let wrong_type = app.post_task(&json!({"task": "tests.record", "args": "nope"})).await;
    assert_eq!(wrong_type.status(), 422);
    // With a field, every documented problem member is present.
    assert_matches("Problem", problem, &wrong_type.json().await.unwrap(), &[]);

    let tracked = get("/v1/tasks".into()).await;
    assert_matches(
        "TrackedTaskPage",
        response_schema(&document, "get", "/v1/tasks", "200"),
        &tracked,
        &[],
    );

    assert_matches("Health", component(&document, "Health"), &app.health().await, &[]);
    for probe in ["/healthz", "/readyz"] {
        assert_matches(
            "Probe",
            component(&document, "Probe"),
            &get(probe.into()).await,
            &["reason"],
        );
    }

    // The admin bodies a fresh gateway can show (development, loopback
    // caller, no token needed), read through the operations that document
    // them: some are derived types, the outbox's own are described by hand.
    for path in ["/v1/outbox", "/v1/outbox/tasks", "/v1/dead-letters", "/v1/breaker"] {
        let schema = response_schema(&document, "get", path, "200");
        assert_matches(&format!("GET {path}"), schema, &get(path.into()).await, &[]);
    }
    for (path, status) in [
        ("/v1/outbox/pause", "200"),
        ("/v1/outbox/resume", "200"),
        ("/v1/outbox/drain", "202"),
        ("/v1/dead-letters/requeue", "200"),
    ] {
        let response = app.client.post(app.url(path)).send().await.unwrap();
        assert_eq!(response.status().as_str(), status, "POST {path}");
        let schema = response_schema(&document, "post", path, status);
        assert_matches(&format!("POST {path}"), schema, &response.json().await.unwrap(), &[]);
    }

    // No worker answers here: a failing report, shortest timeout, one queue.
    let verified: Value = app
        .client
        .post(app.url("/v1/verify-workers"))
        .json(&json!({"timeout_seconds": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let report = response_schema(&document, "post", "/v1/verify-workers", "200");
    assert_matches("VerifyReport", report, &verified, &[]);
    assert_eq!(verified["passed"], false);
    let queue = &verified["queues"][0];
    assert_matches(
        "QueueVerification",
        component(&document, "QueueVerification"),
        queue,
        &[],
    );
    assert_matches(
        "CheckReport",
        component(&document, "CheckReport"),
        &queue["checks"][0],
        &[],
    );
}

#[test]
fn openapi_rs_defines_no_body_types() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http/openapi.rs");
    let source = std::fs::read_to_string(&path).unwrap();
    for line in source.lines().map(strip_comment).map(str::trim) {
        let declares_type = ["struct ", "enum ", "pub struct ", "pub enum "]
            .iter()
            .any(|start| line.starts_with(start));
        assert!(
            !declares_type && !line.contains("ToSchema)") && !line.contains("dead_code"),
            "src/http/openapi.rs: `{line}`: derive the schema on the type the handler sends instead"
        );
    }
}
