//! `Idempotency-Key`: a client that retries a request with the same key and body gets the
//! first answer again, and the effect happens once; the same key with another body is
//! refused (422).
//!
//! The key is claimed in the transaction of the request's effect ([`claim`]), and the answer
//! is stored in that same transaction ([`store`]): either both commit or neither. A second
//! request with the key while the first runs waits on the row's lock, then replays.

use sha2::{Digest, Sha256};
use sqlx::MySqlConnection;

use crate::common::ids::UserId;

/// The longest key accepted.
pub const MAX_KEY_LENGTH: usize = 128;

/// One request's key, with the route and body it came with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub user: UserId,
    /// A stable name of the route (`pay`, `charge`, …).
    pub route: &'static str,
    pub key: String,
    /// SHA-256 of what identifies the request (path ids and body).
    pub request_hash: String,
}

/// Why a key cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidKey {
    #[error("Idempotency-Key must have 1 to {MAX_KEY_LENGTH} visible ASCII characters")]
    Malformed,
}

impl IdempotencyKey {
    pub fn new(
        user: UserId,
        route: &'static str,
        key: &str,
        request: &[u8],
    ) -> Result<Self, InvalidKey> {
        let well_formed = !key.is_empty()
            && key.len() <= MAX_KEY_LENGTH
            && key.bytes().all(|byte| byte.is_ascii_graphic());
        if !well_formed {
            return Err(InvalidKey::Malformed);
        }
        let request_hash = Sha256::digest(request)
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        Ok(Self {
            user,
            route,
            key: key.to_string(),
            request_hash,
        })
    }
}

/// The answer stored for a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredAnswer {
    pub status: u16,
    pub body: String,
}

impl StoredAnswer {
    /// An answer with `status` and the JSON of `value`.
    pub fn json<T: serde::Serialize>(status: u16, value: &T) -> Self {
        Self {
            status,
            body: serde_json::to_string(value).expect("answers serialize"),
        }
    }
}

/// Whether a store error is two first requests with one key meeting (the second retries,
/// and replays the first's answer).
pub fn is_key_race(error: &sqlx::Error) -> bool {
    crate::common::connections::is_duplicate_key(error)
}

/// What a claim found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The first request with this key: go on, then [`store`] the answer.
    First,
    /// Answered before: send this again.
    Replay(StoredAnswer),
    /// The key was used with another request.
    Mismatch,
}

/// Looks the key up in the caller's transaction, locking its row if it exists.
pub async fn claim(
    connection: &mut MySqlConnection,
    key: &IdempotencyKey,
) -> Result<Claim, sqlx::Error> {
    let stored = sqlx::query!(
        "SELECT request_hash, response_status, response_body FROM idempotency_key \
         WHERE user_id = ? AND route = ? AND idempotency_key = ? FOR UPDATE",
        key.user,
        key.route,
        key.key,
    )
    .fetch_optional(&mut *connection)
    .await?;
    Ok(match stored {
        None => Claim::First,
        Some(row) if row.request_hash != key.request_hash => Claim::Mismatch,
        Some(row) => Claim::Replay(StoredAnswer {
            status: row.response_status,
            body: row.response_body,
        }),
    })
}

/// Stores the answer of the first request with `key`, in the caller's transaction. A
/// concurrent first request with the same key fails here on the primary key, and its
/// transaction (its effect included) rolls back: the client retries and replays.
pub async fn store(
    connection: &mut MySqlConnection,
    key: &IdempotencyKey,
    answer: &StoredAnswer,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "INSERT INTO idempotency_key \
         (user_id, route, idempotency_key, request_hash, response_status, response_body) \
         VALUES (?, ?, ?, ?, ?, ?)",
        key.user,
        key.route,
        key.key,
        key.request_hash,
        answer.status,
        answer.body,
    )
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// Stores the answers of many first requests at once (one statement), in the caller's
/// transaction; a key already stored (the same key sent twice at once) keeps its first
/// answer.
pub async fn store_keeping_first(
    connection: &mut MySqlConnection,
    answers: &[(&IdempotencyKey, StoredAnswer)],
) -> Result<(), sqlx::Error> {
    insert_answers(connection, answers, "INSERT IGNORE").await
}

/// Stores the answers of many first requests at once (one statement), in the caller's
/// transaction: a key stored meanwhile by another request fails the statement on the
/// primary key, as [`store`] does.
pub async fn store_many(
    connection: &mut MySqlConnection,
    answers: &[(&IdempotencyKey, StoredAnswer)],
) -> Result<(), sqlx::Error> {
    insert_answers(connection, answers, "INSERT").await
}

async fn insert_answers(
    connection: &mut MySqlConnection,
    answers: &[(&IdempotencyKey, StoredAnswer)],
    insert: &str,
) -> Result<(), sqlx::Error> {
    if answers.is_empty() {
        return Ok(());
    }
    let mut insert = sqlx::QueryBuilder::new(format!(
        "{insert} INTO idempotency_key \
         (user_id, route, idempotency_key, request_hash, response_status, response_body) "
    ));
    insert.push_values(answers, |mut row, (key, answer)| {
        row.push_bind(key.user)
            .push_bind(key.route)
            .push_bind(key.key.as_str())
            .push_bind(key.request_hash.as_str())
            .push_bind(answer.status)
            .push_bind(answer.body.as_str());
    });
    insert.build().execute(&mut *connection).await?;
    Ok(())
}

/// Looks the keys of many requests up at once in the caller's transaction (one statement,
/// none when no request has a key), locking the rows that exist: what each request's key
/// found, in order; a request without a key is [`Claim::First`].
pub async fn claim_many(
    connection: &mut MySqlConnection,
    keys: &[Option<&IdempotencyKey>],
) -> Result<Vec<Claim>, sqlx::Error> {
    if keys.iter().all(Option::is_none) {
        return Ok(vec![Claim::First; keys.len()]);
    }
    let mut select = sqlx::QueryBuilder::new(
        "SELECT user_id, route, idempotency_key, request_hash, response_status, \
         response_body FROM idempotency_key WHERE ",
    );
    let mut separated = select.separated(" OR ");
    for key in keys.iter().flatten() {
        separated
            .push("(user_id = ")
            .push_bind_unseparated(key.user)
            .push_unseparated(" AND route = ")
            .push_bind_unseparated(key.route)
            .push_unseparated(" AND idempotency_key = ")
            .push_bind_unseparated(key.key.as_str())
            .push_unseparated(")");
    }
    select.push(" ORDER BY user_id, route, idempotency_key FOR UPDATE");
    let rows: Vec<(UserId, String, String, String, u16, String)> =
        select.build_query_as().fetch_all(&mut *connection).await?;
    let stored: std::collections::BTreeMap<(UserId, String, String), (String, StoredAnswer)> = rows
        .into_iter()
        .map(|(user, route, key, hash, status, body)| {
            ((user, route, key), (hash, StoredAnswer { status, body }))
        })
        .collect();
    Ok(keys
        .iter()
        .map(|key| {
            let Some(key) = key else {
                return Claim::First;
            };
            match stored.get(&(key.user, key.route.to_string(), key.key.clone())) {
                None => Claim::First,
                Some((hash, _)) if *hash != key.request_hash => Claim::Mismatch,
                Some((_, answer)) => Claim::Replay(answer.clone()),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_names_its_request_by_hash() {
        let user = UserId::parse(1).unwrap();
        let first = IdempotencyKey::new(user, "charge", "k-1", b"{\"amount\":1}").unwrap();
        let again = IdempotencyKey::new(user, "charge", "k-1", b"{\"amount\":1}").unwrap();
        let other = IdempotencyKey::new(user, "charge", "k-1", b"{\"amount\":2}").unwrap();
        assert_eq!(first, again);
        assert_ne!(first.request_hash, other.request_hash);
        assert_eq!(first.request_hash.len(), 64);
        for bad in ["", "with space", &"x".repeat(129), "naïve"] {
            assert!(
                IdempotencyKey::new(user, "charge", bad, b"").is_err(),
                "{bad}"
            );
        }
    }
}
