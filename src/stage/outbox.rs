//! Outboxes: emitted events bound for one linked stage, one buffer per partition of its input,
//! sent when full or when the worker goes idle (natural batching).

use crate::channel::{BatchSender, StageInput};
use crate::stage::Envelope;

/// Events bound for one partition of a linked stage.
pub(crate) struct Outbox<M> {
    pub(crate) sender: BatchSender<M>,
    pub(crate) buffer: Vec<Envelope<M>>,
    /// The batch size to fill to: the stage's limit, read again at each flush.
    pub(crate) limit: usize,
}

impl<M> Outbox<M> {
    /// Adds an event; true when the outbox is full and must be flushed.
    pub(crate) fn push(&mut self, envelope: Envelope<M>) -> bool {
        self.buffer.push(envelope);
        self.buffer.len() >= self.limit
    }
}

/// The outboxes of one linked stage: one per partition of its input.
pub(crate) struct Outboxes<M> {
    pub(crate) input: StageInput<M>,
    pub(crate) partitions: Vec<Outbox<M>>,
}

impl<M> Outboxes<M> {
    /// Outboxes for every partition of `input`, with recycled buffers.
    pub(crate) fn new(input: StageInput<M>) -> Self {
        let partitions = (0..input.partitions())
            .map(|p| {
                let sender = input.sender(p).clone();
                Outbox { buffer: sender.buffer(), limit: sender.batch_limit(), sender }
            })
            .collect();
        Self { input, partitions }
    }
}
