//! Registered objects (functions and shared arguments): the payload the
//! engine keeps for workers that have not been sent it yet, and when each
//! is forgotten: once released and no queued or running task needs it, and
//! then by every worker that holds it too (a `Forget` frame).

use crate::id_hash::{IdMap, IdSet};

use super::event_loop::Engine;
use super::worker::Outgoing;
use crate::ipc::{Kind, Message};
use crate::reactor::WorkerKey;
use crate::task::{ObjectId, Task};

#[derive(Default)]
pub(super) struct Registry {
    payloads: IdMap<ObjectId, Message>,
    /// Released while tasks that need them are queued or running:
    /// forgotten once the last of those tasks is done.
    releasing: IdSet<ObjectId>,
}

impl Registry {
    pub fn payload(&self, id: ObjectId) -> Option<&Message> {
        self.payloads.get(&id)
    }

    pub fn is_releasing(&self, id: ObjectId) -> bool {
        self.releasing.contains(&id)
    }

    /// Gives back every payload's descriptors.
    pub fn clear(&mut self) {
        self.payloads.clear();
        self.releasing.clear();
    }
}

impl Engine {
    pub fn register_object(&mut self, id: ObjectId, body: Message) {
        self.registry.payloads.insert(id, body);
    }

    /// Forgets a registered object, once no queued or running task needs
    /// it; workers holding it are told to drop it.
    pub fn unregister(&mut self, id: ObjectId) {
        if self.needed(id) {
            self.registry.releasing.insert(id);
        } else {
            self.forget(id);
        }
    }

    fn needed(&self, id: ObjectId) -> bool {
        let needs = |t: &Task| t.function_id == id || t.needs.contains(&id);
        self.pending.iter().any(needs) || self.workers.values().any(|w| w.state.tasks().any(needs))
    }

    /// Forgets the released objects no task needs any more.
    pub(super) fn forget_released(&mut self) {
        if self.registry.releasing.is_empty() {
            return;
        }
        let done: Vec<ObjectId> = self
            .registry
            .releasing
            .iter()
            .copied()
            .filter(|&id| !self.needed(id))
            .collect();
        for id in done {
            self.registry.releasing.remove(&id);
            self.forget(id);
        }
    }

    fn forget(&mut self, id: ObjectId) {
        self.registry.payloads.remove(&id);
        let keys: Vec<WorkerKey> = self.workers.keys().copied().collect();
        for key in keys {
            if let Some(w) = self.workers.get_mut(&key) {
                if w.objects.remove(&id) && w.state.closing_since().is_none() {
                    w.outbox
                        .push_back(Outgoing::Owned(Message::new(Kind::Forget, id, 0)));
                    self.flush(key);
                }
            }
        }
    }
}
