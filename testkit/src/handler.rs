//! A domain handler driven by a script, for the consumer tests: per event, failures or
//! panics before success, gates that hold a partition's batches, and a recorder of what it
//! handled.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use commerce_events::actors::domain::{Batch, DomainHandler, EventOutcome, HandlerError, Stats};
use commerce_events::events::EventId;
use tokio::sync::Semaphore;

/// What a scripted handler does with one event.
#[derive(Clone, Debug)]
pub enum Step {
    Fail(HandlerError),
    Panic,
}

/// What the scripted handler saw, shared with the test.
#[derive(Clone, Default)]
pub struct Recorder {
    inner: Arc<Mutex<RecorderState>>,
}

#[derive(Default)]
struct RecorderState {
    /// Events in the order they were handled successfully, with their partition.
    done: Vec<(i32, EventId)>,
    /// Every delivery attempt, successful or not.
    attempts: Vec<EventId>,
}

impl Recorder {
    pub fn done(&self) -> Vec<(i32, EventId)> {
        self.inner.lock().unwrap().done.clone()
    }

    pub fn done_ids(&self) -> Vec<EventId> {
        self.done().into_iter().map(|(_, id)| id).collect()
    }

    pub fn done_count(&self) -> usize {
        self.inner.lock().unwrap().done.len()
    }

    pub fn attempts_of(&self, id: EventId) -> usize {
        self.inner
            .lock()
            .unwrap()
            .attempts
            .iter()
            .filter(|seen| **seen == id)
            .count()
    }

    /// Events per partition, in handling order.
    pub fn done_by_partition(&self) -> BTreeMap<i32, Vec<EventId>> {
        let mut by_partition: BTreeMap<i32, Vec<EventId>> = BTreeMap::new();
        for (partition, id) in self.done() {
            by_partition.entry(partition).or_default().push(id);
        }
        by_partition
    }
}

/// A domain handler driven by a script: per event id, a queue of steps for its first
/// deliveries (then success); optionally held at a gate per partition.
#[derive(Clone, Default)]
pub struct ScriptedHandler {
    pub recorder: Recorder,
    script: Arc<Mutex<BTreeMap<EventId, VecDeque<Step>>>>,
    gates: Arc<Mutex<BTreeMap<i32, Arc<Semaphore>>>>,
}

impl ScriptedHandler {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next deliveries of `id` go through `steps` first.
    pub fn script(&self, id: EventId, steps: impl IntoIterator<Item = Step>) {
        self.script
            .lock()
            .unwrap()
            .entry(id)
            .or_default()
            .extend(steps);
    }

    /// Batches of `partition` wait until the returned gate gets permits (one per batch).
    pub fn gate(&self, partition: i32) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        self.gates.lock().unwrap().insert(partition, gate.clone());
        gate
    }
}

impl DomainHandler for ScriptedHandler {
    type Stats = ();

    fn name(&self) -> &'static str {
        "ScriptedHandler"
    }

    async fn handle(&self, batch: &Batch, _stats: &Stats<()>) -> Vec<EventOutcome> {
        let partition = batch.origin.source.partition;
        let gate = self.gates.lock().unwrap().get(&partition).cloned();
        if let Some(gate) = gate {
            gate.acquire()
                .await
                .expect("gates are never closed")
                .forget();
        }
        let mut outcomes = Vec::with_capacity(batch.events.len());
        for event in batch.events.iter() {
            let step = self
                .script
                .lock()
                .unwrap()
                .get_mut(&event.event_id)
                .and_then(VecDeque::pop_front);
            self.recorder
                .inner
                .lock()
                .unwrap()
                .attempts
                .push(event.event_id);
            match step {
                None => {
                    let mut recorded = self.recorder.inner.lock().unwrap();
                    recorded.done.push((partition, event.event_id));
                    outcomes.push(EventOutcome::Done);
                }
                Some(Step::Fail(error)) => outcomes.push(EventOutcome::Failed(error)),
                Some(Step::Panic) => panic!("scripted panic for {}", event.event_id),
            }
        }
        outcomes
    }
}
