//! The `qlik_tokens` documents: exact field names, BSON types, upsert semantics, the unique index.

use chrono::{Duration, Utc};
use mcp_worker::provider::Provider;
use mcp_worker::secret::Secret;
use std::sync::Arc;

use mcp_worker::crypto::TokenCipher;
use mcp_worker::store::{NewTokens, Store, TokenStore, embedded_migrations};
use mongodb::bson::{Bson, Document, doc};

use crate::support::test_settings;

async fn migrated() -> (TokenStore, mongodb::Collection<Document>) {
    let settings = test_settings("http://127.0.0.1:9/mcp", &[]);
    let store = Store::connect(&settings.mongodb).await.unwrap();
    let cipher = Arc::new(TokenCipher::from_settings(&settings.encryption).unwrap());
    store.migrate(&embedded_migrations().unwrap()).await.unwrap();
    let db = mongodb::Client::with_uri_str(settings.mongodb.uri.expose())
        .await
        .unwrap()
        .database(&settings.mongodb.database);
    (store.tokens(Provider::Qlik, &cipher), db.collection("qlik_tokens"))
}

fn tokens(access: &str, expires_in: Duration) -> NewTokens {
    NewTokens {
        access_token: Secret::new(access.to_owned()),
        refresh_token: Secret::new(format!("r-{access}")),
        expires_at: Utc::now() + expires_in,
    }
}

#[tokio::test]
async fn a_saved_token_has_the_seed_fields_with_bson_dates_and_no_plaintext() {
    let (tokens_store, raw) = migrated().await;
    let now = Utc::now();
    tokens_store.save("u1", &tokens("a1", Duration::hours(6)), now).await.unwrap();

    let document = raw.find_one(doc! { "user_id": "u1" }).await.unwrap().unwrap();
    let mut keys: Vec<&str> = document.keys().map(String::as_str).collect();
    keys.sort_unstable();
    // The seed's six fields (and _id), plus the refresher's status and version fence.
    assert_eq!(
        keys,
        [
            "_id",
            "access_token",
            "created_at",
            "expires_at",
            "refresh_token",
            "status",
            "updated_at",
            "user_id",
            "version"
        ]
    );
    for field in ["expires_at", "created_at", "updated_at"] {
        assert!(matches!(document.get(field), Some(Bson::DateTime(_))), "{field} is {:?}", document.get(field));
    }
    assert_eq!(document.get_str("status").unwrap(), "active");
    let access = document.get_str("access_token").unwrap();
    let refresh = document.get_str("refresh_token").unwrap();
    assert!(access.starts_with("v1.test1.") && !access.contains("a1"), "{access}");
    assert!(refresh.starts_with("v1.test1.") && !refresh.contains("r-a1"), "{refresh}");

    let read = tokens_store.get("u1").await.unwrap().unwrap();
    assert_eq!(read.access_token.expose(), "a1");
    assert_eq!(read.created_at.timestamp_millis(), now.timestamp_millis());
}

#[tokio::test]
async fn saving_again_replaces_tokens_but_keeps_created_at() {
    let (tokens_store, _raw) = migrated().await;
    let first = Utc::now() - Duration::minutes(10);
    tokens_store.save("u1", &tokens("a1", Duration::hours(6)), first).await.unwrap();
    let later = Utc::now();
    tokens_store.save("u1", &tokens("a2", Duration::hours(6)), later).await.unwrap();

    let read = tokens_store.get("u1").await.unwrap().unwrap();
    assert_eq!(read.access_token.expose(), "a2");
    assert_eq!(read.created_at.timestamp_millis(), first.timestamp_millis());
    assert_eq!(read.updated_at.timestamp_millis(), later.timestamp_millis());
}

#[tokio::test]
async fn delete_removes_the_document_and_reports_whether_there_was_one() {
    let (tokens_store, _raw) = migrated().await;
    tokens_store.save("u1", &tokens("a1", Duration::hours(6)), Utc::now()).await.unwrap();
    assert!(tokens_store.delete("u1").await.unwrap());
    assert!(tokens_store.get("u1").await.unwrap().is_none());
    assert!(!tokens_store.delete("u1").await.unwrap());
}

#[tokio::test]
async fn the_unique_index_rejects_a_second_document_for_the_same_user() {
    let (_store, raw) = migrated().await;
    raw.insert_one(doc! { "user_id": "dup", "access_token": "a" }).await.unwrap();
    let err = raw.insert_one(doc! { "user_id": "dup", "access_token": "b" }).await.unwrap_err();
    match *err.kind {
        mongodb::error::ErrorKind::Write(mongodb::error::WriteFailure::WriteError(ref e)) => assert_eq!(e.code, 11000),
        ref other => panic!("expected a duplicate-key error, got {other:?}"),
    }
}

#[tokio::test]
async fn reencrypt_moves_every_value_to_the_active_key_and_keeps_them_readable() {
    use base64::Engine;
    let settings = test_settings("http://127.0.0.1:9/mcp", &[]);
    let store = Store::connect(&settings.mongodb).await.unwrap();
    store.migrate(&embedded_migrations().unwrap()).await.unwrap();
    let old = Arc::new(TokenCipher::from_settings(&settings.encryption).unwrap());
    for user in ["u1", "u2"] {
        store
            .tokens(Provider::Qlik, &old)
            .save(user, &tokens(&format!("a-{user}"), Duration::hours(6)), Utc::now())
            .await
            .unwrap();
    }

    let mut rotated_settings = settings.encryption.keys.clone();
    rotated_settings.insert("test2".into(), Secret::new(base64::engine::general_purpose::STANDARD.encode([9u8; 32])));
    let rotated = Arc::new(
        TokenCipher::from_settings(&mcp_worker::config::EncryptionSettings {
            active_key: "test2".into(),
            keys: rotated_settings,
            allow_plaintext_tokens: false,
        })
        .unwrap(),
    );
    let tokens_store = store.tokens(Provider::Qlik, &rotated);
    assert_eq!(tokens_store.reencrypt().await.unwrap(), 2);
    assert_eq!(tokens_store.reencrypt().await.unwrap(), 0, "nothing left under the old key");

    let db = mongodb::Client::with_uri_str(settings.mongodb.uri.expose())
        .await
        .unwrap()
        .database(&settings.mongodb.database);
    let document = db.collection::<Document>("qlik_tokens").find_one(doc! { "user_id": "u1" }).await.unwrap().unwrap();
    assert!(document.get_str("access_token").unwrap().starts_with("v1.test2."));
    assert_eq!(tokens_store.get("u1").await.unwrap().unwrap().access_token.expose(), "a-u1");
    assert!(
        store.tokens(Provider::Qlik, &old).get("u1").await.is_err(),
        "the old ring alone cannot read the new values"
    );
}

#[tokio::test]
async fn the_backlog_counts_active_tokens_due_and_overdue_with_the_earliest_expiry() {
    let (store, raw) = migrated().await;
    let now = Utc::now();
    let until = now + Duration::seconds(600);
    for (user, expires_in) in
        [("overdue", Duration::seconds(-120)), ("due", Duration::seconds(300)), ("later", Duration::hours(5))]
    {
        store.save(user, &tokens("a", expires_in), now).await.unwrap();
    }
    // A token waiting for its user to reconnect is not the refresher's to renew, however old.
    store.save("refused", &tokens("a", Duration::seconds(-3600)), now).await.unwrap();
    raw.update_one(doc! { "user_id": "refused" }, doc! { "$set": { "status": "reauth_required" } }).await.unwrap();

    let backlog = store.backlog(now, until).await.unwrap();
    assert_eq!((backlog.due, backlog.overdue), (2, 1));
    let earliest = backlog.earliest.expect("something is due");
    assert!((earliest - (now - Duration::seconds(120))).num_milliseconds().abs() < 5, "{earliest}");

    let empty = store.backlog(now - Duration::hours(2), now - Duration::hours(1)).await.unwrap();
    assert_eq!((empty.due, empty.overdue, empty.earliest), (0, 0, None));
}
