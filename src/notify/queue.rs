//! The queue of waiters per lock in one manager: plain data, every change made under one
//! lock by the caller, tested here under every interleaving.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

/// The waiters of each lock in this manager, in arrival order: plain data, every change
/// made under one lock, so a notification is handed over atomically.
///
/// Each registered waiter is in exactly one of two places: `waiting` (in line) or `woken`
/// (handed a notification it has not yet acted on). A waiter that leaves while woken hands
/// its notification to the next in line, so a release is never lost to a cancelled waiter.
pub(super) struct Queues<T> {
    channels: HashMap<Box<[u8]>, Queue<T>>,
}

struct Queue<T> {
    waiting: VecDeque<T>,
    woken: Vec<T>,
    /// When the current holder's lease runs out unless extended, as last reported.
    held_until: Option<Instant>,
}

impl<T> Default for Queues<T> {
    fn default() -> Self {
        Queues {
            channels: HashMap::new(),
        }
    }
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Queue {
            waiting: VecDeque::new(),
            woken: Vec::new(),
            held_until: None,
        }
    }
}

impl<T: Clone> Queues<T> {
    /// A new waiter joins at the back.
    pub(super) fn enqueue(&mut self, channel: &[u8], slot: T) {
        self.channels
            .entry(channel.into())
            .or_default()
            .waiting
            .push_back(slot);
    }

    /// Hands a notification to the first waiter in line, if any; the caller wakes it.
    pub(super) fn wake_one(&mut self, channel: &[u8]) -> Option<T> {
        let queue = self.channels.get_mut(channel)?;
        let slot = queue.waiting.pop_front()?;
        queue.woken.push(slot.clone());
        Some(slot)
    }

    /// Hands a notification to the first waiter in line if it matches `is`.
    pub(super) fn wake_first_if(&mut self, channel: &[u8], is: impl Fn(&T) -> bool) -> Option<T> {
        let queue = self.channels.get_mut(channel)?;
        if !queue.waiting.front().is_some_and(is) {
            return None;
        }
        self.wake_one(channel)
    }

    /// Hands a notification to the first waiter in line unless a waiter of `channel` holds
    /// one it has not yet acted on: an announcement several servers repeat (a release on
    /// several primaries) wakes one waiter, and a repeat that arrives after that waiter
    /// went back in line (its attempt came too early) wakes it again.
    pub(super) fn wake_one_unless_acting(&mut self, channel: &[u8]) -> Option<T> {
        if self
            .channels
            .get(channel)
            .is_some_and(|q| !q.woken.is_empty())
        {
            return None;
        }
        self.wake_one(channel)
    }

    /// Hands a notification to every waiter in line on `channel` (a release that several
    /// waiters can use at once: read permits); the caller wakes them.
    pub(super) fn wake_channel(&mut self, channel: &[u8]) -> Vec<T> {
        let Some(queue) = self.channels.get_mut(channel) else {
            return Vec::new();
        };
        let drained: Vec<T> = queue.waiting.drain(..).collect();
        queue.woken.extend(drained.iter().cloned());
        drained
    }

    /// Hands a notification to every waiter in line; the caller wakes them.
    pub(super) fn wake_all(&mut self) -> Vec<T> {
        let mut all = Vec::new();
        for queue in self.channels.values_mut() {
            let drained: Vec<T> = queue.waiting.drain(..).collect();
            queue.woken.extend(drained.iter().cloned());
            all.extend(drained);
        }
        all
    }

    /// The waiter matching `is` acted (it is about to attempt): back in line, at the front
    /// if it had been handed a notification.
    pub(super) fn rearm(&mut self, channel: &[u8], is: impl Fn(&T) -> bool) {
        let Some(queue) = self.channels.get_mut(channel) else {
            return;
        };
        if let Some(i) = queue.woken.iter().position(&is) {
            let slot = queue.woken.swap_remove(i);
            queue.waiting.push_front(slot);
        }
    }

    /// The waiter matching `is` leaves. If it held an unused notification, the next in
    /// line is handed it and returned, for the caller to wake.
    pub(super) fn remove(&mut self, channel: &[u8], is: impl Fn(&T) -> bool) -> Option<T> {
        let queue = self.channels.get_mut(channel)?;
        queue.waiting.retain(|s| !is(s));
        let was_woken = match queue.woken.iter().position(&is) {
            Some(i) => {
                queue.woken.swap_remove(i);
                true
            }
            None => false,
        };
        let next = if was_woken {
            self.wake_one(channel)
        } else {
            None
        };
        if let Some(queue) = self.channels.get(channel)
            && queue.waiting.is_empty()
            && queue.woken.is_empty()
        {
            self.channels.remove(channel);
        }
        next
    }

    /// The waiter matching `is`, wherever it is (in line or woken); the queue is unchanged.
    pub(super) fn find(&self, channel: &[u8], is: impl Fn(&T) -> bool) -> Option<T> {
        let queue = self.channels.get(channel)?;
        queue
            .waiting
            .iter()
            .chain(&queue.woken)
            .find(|s| is(s))
            .cloned()
    }

    pub(super) fn has_waiters(&self, channel: &[u8]) -> bool {
        self.channels.contains_key(channel)
    }

    pub(super) fn is_first(&self, channel: &[u8], is: impl Fn(&T) -> bool) -> bool {
        self.channels
            .get(channel)
            .and_then(|q| q.waiting.front())
            .is_some_and(is)
    }

    pub(super) fn note_held_until(&mut self, channel: &[u8], until: Instant) {
        if let Some(queue) = self.channels.get_mut(channel) {
            queue.held_until = Some(until);
        }
    }

    pub(super) fn held_until(&self, channel: &[u8]) -> Option<Instant> {
        self.channels.get(channel).and_then(|q| q.held_until)
    }

    /// The channels somebody waits on.
    pub(super) fn wanted(&self) -> HashSet<Box<[u8]>> {
        self.channels.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashSet, VecDeque};

    use super::Queues;

    const CH: &[u8] = b"c";
    const WAITERS: u8 = 3;

    /// One step any waiter or the subscription task can take; each is atomic (one lock).
    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// Waiter `i` registers (then makes its first attempt).
        Register(u8),
        /// A release message arrives.
        Release,
        /// A release announced by several servers: one of its messages arrives.
        Announce,
        /// Waiter `i` wakes or times out, rearms and attempts.
        Attempt(u8),
        /// Waiter `i` is dropped (gave up, cancelled, or acquired).
        Drop(u8),
    }

    /// The abstract state: the queue, who is registered, and whether a release is still
    /// owed an attempt (a release happened while waiters were registered, and none of them
    /// has attempted since).
    #[derive(Clone, PartialEq, Eq, Hash, Debug)]
    struct Model {
        waiting: Vec<u8>,
        woken: BTreeSet<u8>,
        registered: BTreeSet<u8>,
        owed: bool,
    }

    fn model_of(q: &Queues<u8>, registered: &BTreeSet<u8>, owed: bool) -> Model {
        let (waiting, woken) = match q.channels.get(CH) {
            Some(queue) => (
                queue.waiting.iter().copied().collect(),
                queue.woken.iter().copied().collect(),
            ),
            None => (Vec::new(), BTreeSet::new()),
        };
        Model {
            waiting,
            woken,
            registered: registered.clone(),
            owed,
        }
    }

    fn queues_of(m: &Model) -> Queues<u8> {
        let mut q = Queues::default();
        if !m.waiting.is_empty() || !m.woken.is_empty() {
            let queue = q.channels.entry(CH.into()).or_default();
            queue.waiting = m.waiting.iter().copied().collect::<VecDeque<_>>();
            queue.woken = m.woken.iter().copied().collect();
        }
        q
    }

    /// Every reachable state of up to three waiters and any number of releases, under
    /// every interleaving of their steps: a release made while waiters are registered is
    /// always followed by an attempt of one of them, or is held by a woken waiter that
    /// will attempt; every registered waiter is in the queue exactly once; nobody is
    /// left in the queue once everyone has left.
    #[test]
    fn no_interleaving_loses_a_release_or_a_waiter() {
        let start = Model {
            waiting: Vec::new(),
            woken: BTreeSet::new(),
            registered: BTreeSet::new(),
            owed: false,
        };
        let mut seen = HashSet::new();
        let mut todo = vec![start];
        while let Some(m) = todo.pop() {
            if !seen.insert(m.clone()) {
                continue;
            }
            // Each registered waiter sits in exactly one place.
            let mut places: Vec<u8> = m.waiting.clone();
            places.extend(m.woken.iter().copied());
            places.sort_unstable();
            let registered: Vec<u8> = m.registered.iter().copied().collect();
            assert_eq!(places, registered, "{m:?}");
            // A release owed an attempt is held by a woken waiter, unless nobody waits.
            if m.owed && !m.registered.is_empty() {
                assert!(!m.woken.is_empty(), "release lost: {m:?}");
            }
            let mut steps = vec![Step::Release, Step::Announce];
            for i in 0..WAITERS {
                if m.registered.contains(&i) {
                    steps.push(Step::Attempt(i));
                    steps.push(Step::Drop(i));
                } else {
                    steps.push(Step::Register(i));
                }
            }
            for step in steps {
                let mut q = queues_of(&m);
                let mut registered = m.registered.clone();
                let mut owed = m.owed;
                match step {
                    Step::Register(i) => {
                        q.enqueue(CH, i);
                        registered.insert(i);
                        // Registering precedes an attempt, which sees any earlier release.
                        owed = false;
                    }
                    Step::Release | Step::Announce => {
                        let woke = if matches!(step, Step::Release) {
                            q.wake_one(CH)
                        } else {
                            q.wake_one_unless_acting(CH)
                        };
                        // Owed unless nobody waits at all, or a woken waiter already
                        // holds an earlier notification (one attempt serves both).
                        owed = !registered.is_empty();
                        if woke.is_none() && q.channels.get(CH).is_none_or(|c| c.woken.is_empty()) {
                            owed = false;
                            assert!(registered.is_empty(), "waiters but none woken: {m:?}");
                        }
                    }
                    Step::Attempt(i) => {
                        q.rearm(CH, |s| *s == i);
                        owed = false;
                    }
                    Step::Drop(i) => {
                        let _next = q.remove(CH, |s| *s == i);
                        registered.remove(&i);
                    }
                }
                if registered.is_empty() {
                    assert!(q.channels.is_empty(), "left behind after {step:?}: {m:?}");
                    owed = false;
                }
                todo.push(model_of(&q, &registered, owed));
            }
        }
        assert!(seen.len() > 50, "explored {} states", seen.len());
    }

    #[test]
    fn a_woken_waiter_that_leaves_hands_its_release_to_the_next() {
        let mut q = Queues::default();
        q.enqueue(CH, 1u8);
        q.enqueue(CH, 2u8);
        assert_eq!(q.wake_one(CH), Some(1));
        assert_eq!(q.remove(CH, |s| *s == 1), Some(2));
        assert_eq!(q.remove(CH, |s| *s == 2), None);
        assert!(!q.has_waiters(CH));
    }

    #[test]
    fn a_pass_claims_only_the_first_in_line_and_a_repeat_then_wakes_nobody() {
        let mut q = Queues::default();
        q.enqueue(CH, 1u8);
        q.enqueue(CH, 2u8);
        assert_eq!(q.wake_first_if(CH, |s| *s == 2), None, "not first in line");
        assert_eq!(q.wake_first_if(b"other", |_| true), None);
        assert_eq!(q.wake_first_if(CH, |s| *s == 1), Some(1));
        assert_eq!(
            q.wake_one_unless_acting(CH),
            None,
            "the claimed waiter counts as acting"
        );
        // Back in line when it acts (the claim ended): first again.
        q.rearm(CH, |s| *s == 1);
        assert!(q.is_first(CH, |s| *s == 1));
    }

    #[test]
    fn a_release_for_everyone_wakes_every_waiter_of_its_channel_only() {
        let mut q: Queues<u8> = Queues::default();
        for i in 1..=3 {
            q.enqueue(CH, i);
        }
        q.enqueue(b"other", 9);
        assert_eq!(q.wake_channel(CH), vec![1, 2, 3]);
        assert!(
            !q.has_waiters(CH) || q.wake_one(CH).is_none(),
            "nobody left in line"
        );
        assert_eq!(q.wake_one(b"other"), Some(9), "other channels untouched");
    }

    #[test]
    fn find_leaves_the_queue_as_it_was() {
        let mut q = Queues::default();
        q.enqueue(CH, 1u8);
        q.enqueue(CH, 2u8);
        assert_eq!(q.wake_one(CH), Some(1));
        assert_eq!(q.find(CH, |s| *s == 2), Some(2));
        assert_eq!(q.find(CH, |s| *s == 1), Some(1));
        assert_eq!(q.find(CH, |s| *s == 3), None);
        assert!(q.is_first(CH, |s| *s == 2));
    }

    #[test]
    fn a_repeated_announcement_wakes_nobody_while_a_woken_waiter_acts() {
        let mut q = Queues::default();
        q.enqueue(CH, 1u8);
        q.enqueue(CH, 2u8);
        assert_eq!(q.wake_one_unless_acting(CH), Some(1));
        assert_eq!(q.wake_one_unless_acting(CH), None, "1 has not acted yet");
        q.rearm(CH, |s| *s == 1);
        assert_eq!(
            q.wake_one_unless_acting(CH),
            Some(1),
            "1 came back too early: the repeat wakes it again"
        );
    }

    #[test]
    fn a_woken_waiter_that_loses_again_keeps_the_front() {
        let mut q = Queues::default();
        q.enqueue(CH, 1u8);
        q.enqueue(CH, 2u8);
        assert_eq!(q.wake_one(CH), Some(1));
        q.rearm(CH, |s| *s == 1);
        assert!(q.is_first(CH, |s| *s == 1));
    }
}
