//! `GET /openapi.json` describes exactly the routes served, and `GET /docs` serves Swagger UI
//! from the binary.

use std::collections::BTreeSet;

use actix_web::http::StatusCode;
use commerce_events::api::{Access, ROUTES};
use serde_json::Value;

use testkit::app::{TestApp, client, spawn_app};

/// `(METHOD, path)` of every operation of the document.
fn operations(document: &Value) -> BTreeSet<(String, String)> {
    document["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("a path item")
                .keys()
                .map(move |method| (method.to_uppercase(), path.clone()))
        })
        .collect()
}

/// A `GET` without a token: status, content type, body.
async fn fetch(app: &TestApp, path: &str) -> (StatusCode, String, Vec<u8>) {
    let mut response = client()
        .get(format!("{}{path}", app.address))
        .send()
        .await
        .expect("request sent");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = response.body().limit(16 << 20).await.expect("body read");
    (response.status(), content_type, body.to_vec())
}

#[actix_web::test]
async fn the_openapi_document_covers_exactly_the_route_table() {
    let app = spawn_app().await;
    let (status, document) = app.anonymous().get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK, "{document}");
    let version = document["openapi"].as_str().expect("an OpenAPI version");
    assert!(version.starts_with("3.1"), "{version}");
    assert_eq!(document["info"]["title"], "commerce-events");
    assert_eq!(document["info"]["version"], env!("CARGO_PKG_VERSION"));

    let documented = operations(&document);
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|route| (route.method.to_string(), route.path.to_string()))
        .collect();
    assert_eq!(
        documented.difference(&served).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "documented but not served"
    );
    assert_eq!(
        served.difference(&documented).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "served but not documented"
    );

    let scheme = &document["components"]["securitySchemes"]["bearerAuth"];
    assert_eq!(scheme["type"], "http", "{scheme}");
    assert_eq!(scheme["scheme"], "bearer", "{scheme}");
    assert_eq!(scheme["bearerFormat"], "JWT", "{scheme}");
    for route in ROUTES {
        let operation = &document["paths"][route.path][route.method.to_lowercase()];
        let context = format!("{} {}", route.method, route.path);
        // Every route that needs a token says so; public ones do not.
        let bearer = operation["security"]
            .as_array()
            .is_some_and(|requirements| {
                requirements
                    .iter()
                    .any(|requirement| requirement.get("bearerAuth").is_some())
            });
        assert_eq!(bearer, route.access != Access::Public, "{context}");
        assert!(operation["operationId"].is_string(), "{context}");
        assert_eq!(
            operation["tags"].as_array().map(Vec::len),
            Some(1),
            "{context}"
        );
        let responses = operation["responses"].as_object().expect("responses");
        assert!(
            responses
                .keys()
                .any(|status| status.starts_with('2') || status == "101"),
            "{context}: no success response"
        );
        // Every error status answers the common error body.
        for (status, response) in responses {
            if status.starts_with('4') || status.starts_with('5') || status == "default" {
                assert_eq!(
                    response["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{context} {status}"
                );
            }
        }
        if route.access != Access::Public {
            assert!(responses.contains_key("401"), "{context}");
        }
        for parameter in operation["parameters"].as_array().into_iter().flatten() {
            if parameter["in"] == "path" {
                let name = parameter["name"].as_str().unwrap();
                assert!(
                    route.path.contains(&format!("{{{name}}}")),
                    "{context}: {name}"
                );
            }
        }
    }
    // Every `$ref` points at a component.
    let text = document.to_string();
    let schemas = document["components"]["schemas"].as_object().unwrap();
    for (index, _) in text.match_indices("#/components/schemas/") {
        let name: String = text[index + "#/components/schemas/".len()..]
            .chars()
            .take_while(|c| *c != '"')
            .collect();
        assert!(schemas.contains_key(&name), "no schema {name}");
    }
}

#[actix_web::test]
async fn swagger_ui_is_served_from_the_binary() {
    let app = spawn_app().await;
    let (status, content_type, page) = fetch(&app, "/docs").await;
    assert_eq!(status, StatusCode::OK);
    assert!(content_type.starts_with("text/html"), "{content_type}");
    let page = String::from_utf8(page).expect("an HTML page");
    for reference in [
        "/docs/swagger-ui-bundle.js",
        "/docs/swagger-ui.css",
        "/openapi.json",
    ] {
        assert!(page.contains(reference), "{reference} in {page}");
    }
    assert!(
        !page.contains("https://"),
        "the page loads nothing from elsewhere"
    );

    let (status, content_type, bundle) = fetch(&app, "/docs/swagger-ui-bundle.js").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        content_type.starts_with("text/javascript"),
        "{content_type}"
    );
    assert!(bundle.len() > 100_000, "{} bytes", bundle.len());
    assert!(String::from_utf8_lossy(&bundle).contains("SwaggerUIBundle"));
    let (status, content_type, _) = fetch(&app, "/docs/swagger-ui.css").await;
    assert_eq!(status, StatusCode::OK);
    assert!(content_type.starts_with("text/css"), "{content_type}");

    for unknown in [
        "/docs/index.html",
        "/docs/..%2FCargo.toml",
        "/docs/swagger-ui.js",
    ] {
        let (status, body) = app.anonymous().get(unknown).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{unknown}");
        assert_eq!(body["error"]["code"], "NOT_FOUND", "{unknown}: {body}");
    }
}
