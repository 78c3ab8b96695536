//! The scheduler, in the manner of vLLM v1: no separate prefill and decode phases, only
//! "each sequence has computed `num_computed` of its tokens; give it more". Every step:
//!
//! 1. running sequences first, in order: a decode takes one token, an unfinished prefill a
//!    chunk, under the step's token budget (`max_num_batched_tokens`); when the cache has
//!    no block for one, the most recently admitted running sequence is preempted (its
//!    blocks freed, its progress dropped: recomputed later) until it fits, possibly itself;
//! 2. then, unless something was preempted, waiting sequences in FCFS order while the
//!    budget, `max_num_seqs` and the cache allow, each starting from its longest cached
//!    prefix (prefix caching) and possibly with only a chunk of its prompt (chunked
//!    prefill).
//!
//! A sequence's tokens are its prompt and what it generated so far, so a preempted sequence
//! recomputes both and resumes where it was.

use std::collections::{HashMap, VecDeque};

use crate::kv_manager::{KvCacheManager, ReqId};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences in one step.
    pub max_num_seqs: usize,
    /// Most tokens in one step (the chunked-prefill budget).
    pub max_num_batched_tokens: usize,
}

/// What the scheduler needs of a sequence.
#[derive(Clone, Debug)]
pub struct SeqTokens {
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    /// Tokens whose KV is in the cache.
    pub num_computed: usize,
}

/// One sequence's work in a step: compute tokens `[num_computed, num_computed + num_new)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduled {
    pub id: ReqId,
    pub num_computed: usize,
    pub num_new: usize,
}

#[derive(Debug, Default)]
pub struct SchedulerOutput {
    pub seqs: Vec<Scheduled>,
    /// Sequences preempted in this step (back in the waiting queue, progress dropped).
    pub preempted: Vec<ReqId>,
}

impl SchedulerOutput {
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.num_new).sum()
    }
}

pub struct Scheduler {
    pub cfg: SchedulerConfig,
    waiting: VecDeque<ReqId>,
    running: Vec<ReqId>,
    pub num_preemptions: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Scheduler {
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_preemptions: 0,
        }
    }

    pub fn add(&mut self, id: ReqId) {
        self.waiting.push_back(id);
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Forgets a sequence (finished or aborted); its blocks are the caller's to free.
    pub fn remove(&mut self, id: ReqId) {
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&r| r != id);
    }

    pub fn schedule(
        &mut self,
        seqs: &mut HashMap<ReqId, SeqTokens>,
        kv: &mut KvCacheManager,
    ) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let Some(seq) = seqs.get(&id) else {
                self.running.remove(i);
                continue;
            };
            let num_computed = seq.num_computed;
            let remaining = seq.tokens.len() - num_computed;
            if remaining == 0 {
                i += 1;
                continue;
            }
            let num_new = remaining.min(budget);
            let total = num_computed + num_new;
            let mut fits = true;
            while !kv.allocate(id, total, &[]) {
                // Preempt the most recently admitted sequence (possibly this one).
                let Some(victim) = self.running.pop() else {
                    fits = false;
                    break;
                };
                kv.free(victim);
                if let Some(v) = seqs.get_mut(&victim) {
                    v.num_computed = 0;
                }
                self.waiting.push_front(victim);
                out.preempted.push(victim);
                self.num_preemptions += 1;
                if victim == id {
                    fits = false;
                    break;
                }
            }
            if !fits {
                break;
            }
            out.seqs.push(Scheduled {
                id,
                num_computed,
                num_new,
            });
            budget -= num_new;
            i += 1;
        }
        if !out.preempted.is_empty() {
            return out;
        }
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let Some(seq) = seqs.get_mut(&id) else {
                self.waiting.pop_front();
                continue;
            };
            let (hit, cached) = if seq.num_computed == 0 {
                kv.computed_blocks(&seq.tokens)
            } else {
                (Vec::new(), seq.num_computed)
            };
            let num_new = (seq.tokens.len() - cached).min(budget);
            if num_new == 0 || !kv.allocate(id, cached + num_new, &hit) {
                break;
            }
            seq.num_computed = cached;
            self.waiting.pop_front();
            self.running.push(id);
            out.seqs.push(Scheduled {
                id,
                num_computed: cached,
                num_new,
            });
            budget -= num_new;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(len: usize) -> SeqTokens {
        SeqTokens {
            tokens: (0..len as u32).map(|i| i * 7 + len as u32).collect(),
            num_computed: 0,
        }
    }

    /// Runs steps until nothing is left, appending a generated token to each sequence that
    /// finished its known tokens (up to `gen` tokens), as the engine would.
    fn drain(
        s: &mut Scheduler,
        seqs: &mut HashMap<ReqId, SeqTokens>,
        kv: &mut KvCacheManager,
        prompt_lens: &HashMap<ReqId, usize>,
        gen: usize,
    ) -> usize {
        let mut steps = 0;
        while s.has_work() {
            steps += 1;
            assert!(steps < 10_000, "no progress");
            let out = s.schedule(seqs, kv);
            assert!(out.num_tokens() <= s.cfg.max_num_batched_tokens);
            assert!(out.seqs.len() <= s.cfg.max_num_seqs);
            assert!(!out.seqs.is_empty(), "a step with work scheduled nothing");
            for sc in &out.seqs {
                let q = seqs.get_mut(&sc.id).unwrap();
                assert_eq!(q.num_computed, sc.num_computed);
                q.num_computed += sc.num_new;
                let done_known = q.num_computed == q.tokens.len();
                if done_known {
                    let produced = q.tokens.len() - prompt_lens[&sc.id];
                    if produced + 1 >= gen {
                        s.remove(sc.id);
                        kv.free(sc.id);
                        seqs.remove(&sc.id);
                    } else {
                        q.tokens.push(1000 + produced as u32);
                    }
                }
            }
            kv.check_invariants().unwrap();
        }
        steps
    }

    #[test]
    fn chunked_prefill_respects_the_budget() {
        let mut kv = KvCacheManager::new(64, 16, false);
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 4,
            max_num_batched_tokens: 32,
        });
        let mut seqs = HashMap::new();
        let mut lens = HashMap::new();
        for (id, len) in [(1u64, 100usize), (2, 5), (3, 40)] {
            seqs.insert(id, seq(len));
            lens.insert(id, len);
            s.add(id);
        }
        let first = s.schedule(&mut seqs, &mut kv);
        assert_eq!(
            first.seqs,
            vec![Scheduled {
                id: 1,
                num_computed: 0,
                num_new: 32
            }]
        );
        for sc in &first.seqs {
            seqs.get_mut(&sc.id).unwrap().num_computed += sc.num_new;
        }
        drain(&mut s, &mut seqs, &mut kv, &lens, 4);
        assert_eq!(kv.num_free_blocks(), 64);
    }

    #[test]
    fn tiny_cache_preempts_and_still_finishes_everything() {
        // 6 blocks of 4 tokens; each sequence needs up to 4 blocks alone.
        let mut kv = KvCacheManager::new(6, 4, true);
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: 64,
        });
        let mut seqs = HashMap::new();
        let mut lens = HashMap::new();
        for id in 0..8u64 {
            let len = 5 + id as usize;
            seqs.insert(id, seq(len));
            lens.insert(id, len);
            s.add(id);
        }
        drain(&mut s, &mut seqs, &mut kv, &lens, 16 - 12);
        assert!(s.num_preemptions > 0, "the cache was meant to run out");
        assert_eq!(kv.num_free_blocks(), 6);
        assert_eq!(kv.num_requests(), 0);
    }
}
