//! Work that may take longer than a frame runs here, on its own thread, and comes back as a
//! message on one channel that the app drains with `try_recv` at the start of each frame. Every
//! sender wakes the window with `request_repaint`, so an idle studio sleeps instead of polling.
//! Generic over the message type: nothing here knows the studio's panels or messages.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};
use eframe::egui;

/// Something a worker is producing.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Load<T> {
    #[default]
    Empty,
    Loading,
    Ready(T),
    Failed(String),
}

impl<T> Load<T> {
    pub fn ready(&self) -> Option<&T> {
        match self {
            Load::Ready(v) => Some(v),
            _ => None,
        }
    }

    pub fn is_loading(&self) -> bool {
        matches!(self, Load::Loading)
    }
}

/// Worker threads that post their results as messages of type `M` on one channel.
pub struct Jobs<M> {
    tx: Sender<M>,
    rx: Receiver<M>,
    ctx: egui::Context,
    running: Arc<AtomicUsize>,
}

impl<M: Send + 'static> Jobs<M> {
    pub fn new(ctx: egui::Context) -> Self {
        let (tx, rx) = unbounded();
        Jobs { tx, rx, ctx, running: Arc::new(AtomicUsize::new(0)) }
    }

    /// Run `work` on a new thread; its message is posted and the window woken. `work` gets a
    /// sender of its own for progress messages.
    pub fn spawn(&self, name: &str, work: impl FnOnce(&Sender<M>) -> M + Send + 'static) {
        let tx = self.tx.clone();
        let ctx = self.ctx.clone();
        let running = Arc::clone(&self.running);
        running.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new().name(format!("studio-{name}")).spawn(move || {
            let msg = work(&tx);
            let _ = tx.send(msg);
            running.fetch_sub(1, Ordering::SeqCst);
            ctx.request_repaint();
        });
        if spawned.is_err() {
            self.running.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Background jobs still working (tests wait for zero).
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Messages that arrived since the last frame, without waiting.
    pub fn drain(&self) -> Vec<M> {
        self.rx.try_iter().collect()
    }

    /// Forward every item of `events` to the window as `wrap(item)`. The window is woken
    /// `wake_after(item)` later: at once for what changes the state the person acts on, later for
    /// what only moves a plot, so a stream of small events costs a bounded number of frames
    /// (egui keeps the earliest pending wake-up, so a burst makes one frame). The thread ends when
    /// the sender hangs up or the window is gone.
    pub fn forward<E: Send + 'static>(
        &self,
        name: &str,
        events: Receiver<E>,
        wrap: impl Fn(E) -> M + Send + 'static,
        wake_after: impl Fn(&E) -> Duration + Send + 'static,
    ) {
        let tx = self.tx.clone();
        let ctx = self.ctx.clone();
        let _ = std::thread::Builder::new().name(format!("studio-{name}")).spawn(move || {
            for event in events.iter() {
                let after = wake_after(&event);
                if tx.send(wrap(event)).is_err() {
                    break;
                }
                ctx.request_repaint_after(after);
            }
        });
    }
}

/// Run `f`, turning an error or a panic into the one-line message the window shows: a worker
/// that fails must never take the studio down with it.
pub fn guarded<T>(f: impl FnOnce() -> crate::Result<T>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(p) => Err(format!(
            "internal error: {}",
            p.downcast_ref::<String>().map(String::as_str).or(p.downcast_ref::<&str>().copied()).unwrap_or("panic")
        )),
    }
}

/// A stable key for "the inputs of this job", to drop results that an edit has made stale.
pub fn key_of(parts: &[&dyn Hashable]) -> u64 {
    let mut h = DefaultHasher::new();
    for p in parts {
        p.feed(&mut h);
    }
    h.finish()
}

/// Object-safe hashing for `key_of`.
pub trait Hashable {
    fn feed(&self, h: &mut DefaultHasher);
}

impl<T: Hash> Hashable for T {
    fn feed(&self, h: &mut DefaultHasher) {
        self.hash(h);
    }
}

/// Fires once per new key, after the key has held still for `delay`: typing a path or dragging
/// a number starts one job when the hand stops, not one per keystroke.
#[derive(Debug)]
pub struct Debounce {
    delay: Duration,
    pending: Option<(u64, Instant)>,
    fired: Option<u64>,
}

impl Debounce {
    pub fn new(delay: Duration) -> Self {
        Debounce { delay, pending: None, fired: None }
    }

    /// `Some(wait)` while a change is waiting (ask for a repaint after `wait`); `None` otherwise.
    /// Returns `Ready` when `key` should be acted on now.
    pub fn poll(&mut self, key: u64, now: Instant) -> DebounceState {
        if self.fired == Some(key) {
            self.pending = None;
            return DebounceState::Idle;
        }
        match self.pending {
            Some((k, since)) if k == key => {
                let waited = now.saturating_duration_since(since);
                if waited >= self.delay {
                    self.fired = Some(key);
                    self.pending = None;
                    DebounceState::Ready
                } else {
                    DebounceState::Waiting(self.delay - waited)
                }
            }
            _ => {
                // The first sighting of a key fires at once when nothing ran before (start-up),
                // so the first preview does not wait.
                if self.fired.is_none() {
                    self.fired = Some(key);
                    return DebounceState::Ready;
                }
                self.pending = Some((key, now));
                DebounceState::Waiting(self.delay)
            }
        }
    }

    /// A change is waiting for its key to hold still: the job it will start counts as running, so
    /// "every worker finished" is not said in the gap between an edit and its job.
    pub fn is_waiting(&self) -> bool {
        self.pending.is_some()
    }

    /// Drop a waiting change whose job is no longer wanted (its inputs went away).
    pub fn cancel(&mut self) {
        self.pending = None;
    }

    /// Forget what fired, so the same key runs again (a "reload" button).
    pub fn reset(&mut self) {
        self.fired = None;
        self.pending = None;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebounceState {
    Idle,
    Waiting(Duration),
    Ready,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debounce_waits_for_the_key_to_hold_still() {
        let mut d = Debounce::new(Duration::from_millis(100));
        let t0 = Instant::now();
        assert_eq!(d.poll(1, t0), DebounceState::Ready, "first key runs at once");
        assert_eq!(d.poll(1, t0), DebounceState::Idle);
        assert!(!d.is_waiting());
        assert!(matches!(d.poll(2, t0), DebounceState::Waiting(_)));
        assert!(d.is_waiting(), "an edit waiting for its delay counts as a job to come");
        assert!(matches!(d.poll(3, t0 + Duration::from_millis(50)), DebounceState::Waiting(_)), "a new edit restarts the wait");
        assert!(matches!(d.poll(3, t0 + Duration::from_millis(120)), DebounceState::Waiting(_)));
        assert_eq!(d.poll(3, t0 + Duration::from_millis(160)), DebounceState::Ready);
        assert!(!d.is_waiting());
        assert!(matches!(d.poll(4, t0 + Duration::from_millis(200)), DebounceState::Waiting(_)));
        d.cancel();
        assert!(!d.is_waiting(), "a cancelled edit is no longer waited for");
        assert_eq!(d.poll(3, t0 + Duration::from_millis(500)), DebounceState::Idle);
        d.reset();
        assert_eq!(d.poll(3, t0), DebounceState::Ready);
    }

    #[test]
    fn a_stream_of_small_events_wakes_the_window_once_per_interval() {
        let ctx = egui::Context::default();
        let delays = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&delays);
        ctx.set_request_repaint_callback(move |info| seen.lock().unwrap().push(info.delay));
        // Past the first frames, which repaint on their own, to an idle window.
        for _ in 0..4 {
            let _ = ctx.run_ui(Default::default(), |_| {});
        }
        delays.lock().unwrap().clear();
        let jobs = Jobs::<u32>::new(ctx);
        let (tx, rx) = unbounded();
        let slow = Duration::from_millis(250);
        jobs.forward("test", rx, |e| e, move |e| if *e == 0 { Duration::ZERO } else { slow });
        for e in (1..=50).chain([0]) {
            tx.send(e).unwrap();
        }
        drop(tx);
        let mut got = Vec::new();
        let t0 = Instant::now();
        while got.len() < 51 && t0.elapsed() < Duration::from_secs(10) {
            got.extend(jobs.drain());
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(got.len(), 51, "every event arrives");
        let delays = delays.lock().unwrap().clone();
        assert_eq!(delays.iter().filter(|d| **d == slow).count(), 1, "50 plot events, one wake-up: {delays:?}");
        assert_eq!(delays.last(), Some(&Duration::ZERO), "a state change wakes at once: {delays:?}");
    }

    #[test]
    fn guarded_turns_panics_into_messages() {
        let r: Result<(), String> = guarded(|| panic!("boom"));
        assert_eq!(r.unwrap_err(), "internal error: boom");
        let r: Result<(), String> = guarded(|| Err(crate::Error::config("lora.r", "bad")));
        assert_eq!(r.unwrap_err(), "config field `lora.r`: bad");
    }
}
