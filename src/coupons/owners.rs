//! Owner epochs: a CouponIssuer batch from an owner that lost its partition fails instead of
//! deciding.
//!
//! After a revoke whose drain timed out, the old owner's batch can still be running while the
//! new owner decides the same partition. Row locks serialize the two, and each request is
//! decided once, but nothing else stops the stale batch. So each assignment of a partition
//! (a [`BatchOrigin::assignment`] newer than the last this process saw for it) first takes the
//! partition's next epoch in `partition_owner`, and each batch's transaction begins by
//! reading the partition's epoch under a shared lock ([`Fence::holds_in`]): a different
//! epoch means another owner took the partition since, and the batch rolls back, answered
//! [`crate::actors::domain::EventOutcome::Fenced`]. The shared lock makes a new owner's epoch
//! wait for a batch that is already deciding, so the new owner reads its decisions.
//!
//! The epoch is taken when the partition is assigned, before its actor takes a first batch
//! (the partition actor's [`AssignmentHook`]), so the new owner's epoch is taken after the
//! old owner's revocation began, and waits for the old owner's batch that is deciding. What
//! is left: an epoch statement of the old owner sent before its revocation and held in
//! MySQL for longer than a whole rebalance would land after the new owner's, and fence the
//! new owner's batches until the next rebalance: they wait, nothing is lost, and row locks
//! still decide each request once. Only the group coordinator's generation would close
//! that; it restarts when a group is re-created, which a stored epoch cannot tell from a
//! stale owner. A batch whose assignment has no epoch yet (a handler driven without a
//! partition actor) takes one itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::{MySqlConnection, MySqlPool};

use crate::actors::domain::{BatchOrigin, HandlerError};
use crate::actors::partition::AssignmentHook;
use crate::kafka::TopicPartition;

/// The epoch a batch decides under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub source: TopicPartition,
    pub epoch: u64,
}

impl Fence {
    /// Whether the partition's epoch is still this one, read in the caller's transaction
    /// under a shared lock held until its end.
    pub async fn holds_in(&self, connection: &mut MySqlConnection) -> Result<bool, sqlx::Error> {
        let epoch = sqlx::query_scalar!(
            "SELECT epoch FROM partition_owner WHERE topic = ? AND partition_id = ? \
             LOCK IN SHARE MODE",
            self.source.topic,
            self.source.partition,
        )
        .fetch_optional(&mut *connection)
        .await?;
        Ok(epoch == Some(self.epoch))
    }
}

/// Whether a batch may decide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ownership {
    /// Under this fence.
    Owner(Fence),
    /// The batch comes from an older assignment of its partition than one this process
    /// already took an epoch for.
    Stale,
}

/// The epochs this process took, per partition, with the assignment each was taken for.
#[derive(Clone)]
pub struct PartitionOwners {
    pool: MySqlPool,
    /// This instance's id, recorded as the owner.
    owner: Arc<str>,
    taken: Arc<Mutex<HashMap<TopicPartition, (u64, u64)>>>,
}

impl PartitionOwners {
    pub fn new(pool: MySqlPool, owner: &str) -> Self {
        Self {
            pool,
            owner: owner.into(),
            taken: Arc::default(),
        }
    }

    /// The fence of a batch: the epoch taken for its assignment, a new one for a newer
    /// assignment, [`Ownership::Stale`] for an older one.
    pub async fn fence_for(&self, origin: &BatchOrigin) -> Result<Ownership, sqlx::Error> {
        self.take(&origin.source, origin.assignment).await
    }

    /// The fence of `assignment` of `source`, its epoch taken if it has none yet.
    async fn take(
        &self,
        source: &TopicPartition,
        assignment: u64,
    ) -> Result<Ownership, sqlx::Error> {
        if let Some(ownership) = self.known(source, assignment) {
            return Ok(ownership);
        }
        let epoch = self.take_epoch(source).await?;
        let mut taken = self.taken.lock().expect("owner epochs lock");
        match taken.get(source) {
            // A newer assignment took its own meanwhile.
            Some((newer, _)) if *newer > assignment => Ok(Ownership::Stale),
            _ => {
                taken.insert(source.clone(), (assignment, epoch));
                Ok(Ownership::Owner(Fence {
                    source: source.clone(),
                    epoch,
                }))
            }
        }
    }

    fn known(&self, source: &TopicPartition, assignment: u64) -> Option<Ownership> {
        let taken = self.taken.lock().expect("owner epochs lock");
        let (known, epoch) = *taken.get(source)?;
        if known == assignment {
            Some(Ownership::Owner(Fence {
                source: source.clone(),
                epoch,
            }))
        } else if known > assignment {
            Some(Ownership::Stale)
        } else {
            None
        }
    }

    /// Takes the partition's next epoch (the first is 1).
    async fn take_epoch(&self, source: &TopicPartition) -> Result<u64, sqlx::Error> {
        let mut transaction = self.pool.begin().await?;
        sqlx::query!(
            "INSERT INTO partition_owner (topic, partition_id, epoch, owner, assigned_at) \
             VALUES (?, ?, 1, ?, NOW(6)) \
             ON DUPLICATE KEY UPDATE epoch = epoch + 1, owner = VALUES(owner), \
             assigned_at = VALUES(assigned_at)",
            source.topic,
            source.partition,
            &*self.owner,
        )
        .execute(&mut *transaction)
        .await?;
        let epoch = sqlx::query_scalar!(
            "SELECT epoch FROM partition_owner WHERE topic = ? AND partition_id = ?",
            source.topic,
            source.partition,
        )
        .fetch_one(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(epoch)
    }
}

impl AssignmentHook for PartitionOwners {
    fn assigned(
        &self,
        source: TopicPartition,
        assignment: u64,
    ) -> BoxFuture<'static, Result<(), HandlerError>> {
        let owners = self.clone();
        async move {
            owners
                .take(&source, assignment)
                .await
                .map(drop)
                .map_err(|error| HandlerError::from_error(&error))
        }
        .boxed()
    }
}
