//! One shutdown signal per process: the serving code triggers it once in-flight requests have
//! finished, and every background task (watch streams, workers, probes, heartbeats, the leader's
//! loops) stops on it. Cloning a [`Shutdown`] is how a task subscribes.
//!
//! Invariant: the signal goes from "running" to "stopping" once and never back; a dropped
//! [`ShutdownTrigger`] counts as triggered, so no task outlives the code that started it.

use std::time::Duration;

use tokio::sync::watch;

/// Fires the signal.
#[derive(Debug)]
pub struct ShutdownTrigger {
    sender: watch::Sender<bool>,
}

/// Waits for the signal.
#[derive(Debug, Clone)]
pub struct Shutdown {
    receiver: watch::Receiver<bool>,
}

/// A new signal, not triggered.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (sender, receiver) = watch::channel(false);
    (ShutdownTrigger { sender }, Shutdown { receiver })
}

impl ShutdownTrigger {
    /// Tells every subscriber to stop.
    pub fn trigger(&self) {
        self.sender.send_replace(true);
    }

    pub fn subscribe(&self) -> Shutdown {
        Shutdown { receiver: self.sender.subscribe() }
    }
}

impl Shutdown {
    /// Whether the signal fired (or its trigger is gone).
    pub fn is_triggered(&self) -> bool {
        *self.receiver.borrow() || self.receiver.has_changed().is_err()
    }

    /// Resolves once the signal fired (at once if it already had).
    pub async fn wait(&mut self) {
        // `wait_for` fails only when the trigger is gone, which counts as fired.
        let _ = self.receiver.wait_for(|stopping| *stopping).await;
    }

    /// Sleeps for `duration` unless the signal fires first; returns whether it fired.
    pub async fn sleep(&mut self, duration: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(duration) => self.is_triggered(),
            _ = self.wait() => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn every_subscriber_sees_the_signal_once_fired() {
        let (trigger, mut first) = channel();
        let mut second = trigger.subscribe();
        assert!(!first.is_triggered());
        assert!(!first.sleep(Duration::from_secs(1)).await, "a sleep runs out while running");
        trigger.trigger();
        assert!(first.sleep(Duration::from_secs(3600)).await);
        second.wait().await;
        assert!(second.clone().is_triggered(), "a clone made after the signal sees it");
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_trigger_counts_as_fired() {
        let (trigger, mut shutdown) = channel();
        drop(trigger);
        assert!(shutdown.is_triggered());
        assert!(shutdown.sleep(Duration::from_secs(3600)).await);
    }
}
