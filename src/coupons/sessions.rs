//! Open WebSocket and Server-Sent-Events sessions of this instance, by user, and pushing
//! messages to them.
//!
//! A session subscribes with [`Sessions::subscribe`] and gets a bounded queue of messages;
//! dropping the [`Subscription`] unregisters it. A session that does not keep up loses
//! messages rather than slowing the push for everyone (counted); every pushed message is
//! also readable later through the API.
//!
//! Most sessions wait, idle, for one message (a sale's crowd waiting for its results), so an
//! empty queue holds no allocation: a [`Mailbox`] is a lock around a `VecDeque` and a
//! [`Notify`], about a hundred bytes, where a channel would allocate a block of 32 slots.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::common::connections::{RedisConnection, RedisConnectionError};
use crate::common::ids::{EventId, UserId};

/// One message for a user's sessions: the JSON text, and the id of the event it comes from
/// (what a reconnecting client resumes after).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushMessage {
    pub id: EventId,
    pub json: Arc<str>,
}

/// Messages a session may have queued before it starts losing them.
const SESSION_QUEUE: usize = 256;

#[derive(Clone, Default)]
pub struct Sessions {
    inner: Arc<SessionsInner>,
}

#[derive(Default)]
struct SessionsInner {
    by_user: DashMap<UserId, Vec<Subscriber>>,
    next_id: AtomicU64,
    dropped: AtomicU64,
    closing: CancellationToken,
}

struct Subscriber {
    id: u64,
    mailbox: Arc<Mailbox>,
}

/// One session's queued messages.
#[derive(Default)]
struct Mailbox {
    queue: Mutex<VecDeque<PushMessage>>,
    arrived: Notify,
}

impl Mailbox {
    /// Queues `message` unless [`SESSION_QUEUE`] are waiting already; whether it did.
    fn offer(&self, message: PushMessage) -> bool {
        let mut queue = self.queue.lock().expect("mailbox lock poisoned");
        if queue.len() >= SESSION_QUEUE {
            return false;
        }
        queue.push_back(message);
        drop(queue);
        self.arrived.notify_one();
        true
    }

    /// The oldest queued message; an emptied queue gives its allocation back.
    fn take(&self) -> Option<PushMessage> {
        let mut queue = self.queue.lock().expect("mailbox lock poisoned");
        let message = queue.pop_front();
        if queue.is_empty() && queue.capacity() > 0 {
            *queue = VecDeque::new();
        }
        message
    }
}

/// Counters for the admin view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionsState {
    pub users: usize,
    pub sessions: usize,
    /// Messages lost by sessions that did not keep up.
    pub dropped_messages: u64,
}

/// One session's queue; unregisters itself when dropped.
pub struct Subscription {
    user: UserId,
    id: u64,
    mailbox: Arc<Mailbox>,
    sessions: Sessions,
}

impl Subscription {
    /// The next message, or `None` once the instance is shutting down.
    pub async fn next(&mut self) -> Option<PushMessage> {
        loop {
            if self.sessions.inner.closing.is_cancelled() {
                return None;
            }
            if let Some(message) = self.mailbox.take() {
                return Some(message);
            }
            // A message offered since `take` left a permit: `notified` returns at once.
            tokio::select! {
                biased;
                _ = self.sessions.inner.closing.cancelled() => return None,
                _ = self.mailbox.arrived.notified() => {}
            }
        }
    }

    pub fn user(&self) -> UserId {
        self.user
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let user = self.user;
        let id = self.id;
        self.sessions
            .inner
            .by_user
            .remove_if_mut(&user, |_, subscribers| {
                subscribers.retain(|subscriber| subscriber.id != id);
                subscribers.is_empty()
            });
    }
}

impl Sessions {
    pub fn subscribe(&self, user: UserId) -> Subscription {
        let mailbox = Arc::new(Mailbox::default());
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner
            .by_user
            .entry(user)
            .or_default()
            .push(Subscriber {
                id,
                mailbox: mailbox.clone(),
            });
        Subscription {
            user,
            id,
            mailbox,
            sessions: self.clone(),
        }
    }

    /// Queues `message` for every session of `user`; returns how many sessions got it.
    pub fn push(&self, user: UserId, message: PushMessage) -> usize {
        let Some(subscribers) = self.inner.by_user.get(&user) else {
            return 0;
        };
        let mut delivered = 0;
        for subscriber in subscribers.iter() {
            if subscriber.mailbox.offer(message.clone()) {
                delivered += 1;
            } else {
                self.inner.dropped.fetch_add(1, Ordering::Relaxed);
                crate::observability::metrics::push_dropped();
            }
        }
        delivered
    }

    /// Cancelled when the instance shuts its sessions down (other live streams end too).
    pub fn closing(&self) -> tokio_util::sync::CancellationToken {
        self.inner.closing.clone()
    }

    /// Ends every session (shutdown): their [`Subscription::next`] returns `None`.
    pub fn close_all(&self) {
        self.inner.closing.cancel();
    }

    pub fn state(&self) -> SessionsState {
        SessionsState {
            users: self.inner.by_user.len(),
            sessions: self
                .inner
                .by_user
                .iter()
                .map(|entry| entry.value().len())
                .sum(),
            dropped_messages: self.inner.dropped.load(Ordering::Relaxed),
        }
    }
}

/// Single-use tickets that let a browser open a push channel (a browser cannot set an
/// `Authorization` header on a WebSocket): `POST /push/tickets` takes a bearer token and
/// returns a ticket, valid `push.ticket_ttl_secs`, passed as `?ticket=`. Kept in Redis, so a
/// ticket from one instance opens a channel on any other, once.
#[derive(Clone)]
pub struct PushTickets {
    redis: RedisConnection,
    ttl: std::time::Duration,
}

impl PushTickets {
    pub fn new(redis: RedisConnection, ttl: std::time::Duration) -> Self {
        Self { redis, ttl }
    }

    fn key(&self, ticket: &str) -> String {
        self.redis.key(&format!("push:ticket:{ticket}"))
    }

    /// A new ticket for `user`.
    pub async fn issue(&self, user: UserId) -> Result<String, RedisConnectionError> {
        let ticket = uuid::Uuid::new_v4().simple().to_string();
        let mut connection = self.redis.connection()?;
        redis::cmd("SET")
            .arg(self.key(&ticket))
            .arg(user.get())
            .arg("EX")
            .arg(self.ttl.as_secs().max(1))
            .query_async::<()>(&mut connection)
            .await?;
        Ok(ticket)
    }

    /// The user a ticket was issued to, if it is valid; it cannot be used again.
    pub async fn redeem(&self, ticket: &str) -> Result<Option<UserId>, RedisConnectionError> {
        if ticket.is_empty()
            || ticket.len() > 64
            || !ticket.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Ok(None);
        }
        let mut connection = self.redis.connection()?;
        let user: Option<u64> = redis::cmd("GETDEL")
            .arg(self.key(ticket))
            .query_async(&mut connection)
            .await?;
        Ok(user.and_then(|user| UserId::from_u64(user).ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: i64) -> UserId {
        UserId::parse(id).unwrap()
    }

    fn message(text: &str) -> PushMessage {
        PushMessage {
            id: EventId::generate(),
            json: Arc::from(text),
        }
    }

    #[tokio::test]
    async fn a_message_reaches_every_session_of_its_user_and_no_other() {
        let sessions = Sessions::default();
        let mut first = sessions.subscribe(user(1));
        let mut second = sessions.subscribe(user(1));
        let other = sessions.subscribe(user(2));
        assert_eq!(sessions.push(user(1), message("hello")), 2);
        assert_eq!(first.next().await.unwrap().json.as_ref(), "hello");
        assert_eq!(second.next().await.unwrap().json.as_ref(), "hello");
        assert_eq!(other.mailbox.take(), None);
    }

    #[tokio::test]
    async fn a_dropped_session_is_unregistered() {
        let sessions = Sessions::default();
        let subscription = sessions.subscribe(user(1));
        assert_eq!(sessions.state().sessions, 1);
        drop(subscription);
        assert_eq!(sessions.state().users, 0);
        assert_eq!(sessions.push(user(1), message("lost")), 0);
    }

    #[tokio::test]
    async fn closing_ends_every_session() {
        let sessions = Sessions::default();
        let mut subscription = sessions.subscribe(user(1));
        sessions.close_all();
        assert_eq!(subscription.next().await, None);
    }

    #[tokio::test]
    async fn a_waiting_session_wakes_for_a_message_pushed_while_it_waits() {
        let sessions = Sessions::default();
        let mut subscription = sessions.subscribe(user(1));
        let waiting = tokio::spawn(async move { subscription.next().await });
        tokio::task::yield_now().await;
        assert_eq!(sessions.push(user(1), message("late")), 1);
        let received = waiting.await.unwrap().expect("a message");
        assert_eq!(received.json.as_ref(), "late");
    }

    #[tokio::test]
    async fn an_emptied_queue_holds_no_allocation() {
        let sessions = Sessions::default();
        let mut subscription = sessions.subscribe(user(1));
        for _ in 0..10 {
            sessions.push(user(1), message("x"));
        }
        for _ in 0..10 {
            subscription.next().await.expect("a queued message");
        }
        let queue = subscription.mailbox.queue.lock().unwrap();
        assert_eq!(queue.capacity(), 0);
    }

    #[tokio::test]
    async fn a_session_that_does_not_keep_up_loses_messages_without_blocking() {
        let sessions = Sessions::default();
        let _slow = sessions.subscribe(user(1));
        for _ in 0..SESSION_QUEUE + 5 {
            sessions.push(user(1), message("x"));
        }
        assert_eq!(sessions.state().dropped_messages, 5);
    }
}
