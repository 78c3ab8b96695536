//! The engine end to end on the tiny random Qwen3 of the model tests (2 layers, vocab 2048;
//! one test on the tiny Qwen3-MoE)
//! with the real Qwen3 tokenizer for text: batching with requests joining and leaving,
//! prefix caching, preemption in a tiny cache, aborts and leaks, seeds, stops, logprobs.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vllm_apple_engine::params::{FinishReason, StopReason};
use vllm_apple_engine::{EngineArgs, EngineError, Prompt, RequestOutput, SamplingParams, LLM};
use vllm_apple_ops::{ContextOptions, GpuContext};

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../model/tests/fixtures/tiny/qwen3"
);
const TOKENIZER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.cache/tokenizers/qwen3");

fn ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| GpuContext::new(&ContextOptions::default()).expect("a GPU adapter"))
        .clone()
}

fn llm(f: impl FnOnce(&mut EngineArgs)) -> LLM {
    llm_of(MODEL, f)
}

fn llm_of(model: &str, f: impl FnOnce(&mut EngineArgs)) -> LLM {
    let mut args = EngineArgs::new(model);
    args.tokenizer = Some(TOKENIZER.into());
    args.dtype = "float32".into();
    args.max_model_len = Some(256);
    args.num_gpu_blocks_override = Some(256);
    f(&mut args);
    LLM::with_context(ctx(), args).unwrap()
}

fn prompts(n: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut r = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = r.random_range(3..40);
            (0..len).map(|_| r.random_range(0..2048)).collect()
        })
        .collect()
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(max_tokens),
        ..SamplingParams::greedy()
    }
}

fn ids_of(outs: &[RequestOutput]) -> Vec<Vec<u32>> {
    outs.iter()
        .map(|o| o.outputs[0].token_ids.clone())
        .collect()
}

/// Drives the engine by hand: requests join at different steps and leave as they finish.
fn staggered(
    llm: &mut LLM,
    prompts: &[Vec<u32>],
    params: &[SamplingParams],
) -> HashMap<String, RequestOutput> {
    let e = &mut llm.engine;
    let mut done = HashMap::new();
    let mut next = 0;
    let mut step = 0;
    while done.len() < prompts.len() {
        // Two new requests every third step.
        if step % 3 == 0 {
            for _ in 0..2 {
                if next < prompts.len() {
                    e.add_request(
                        &format!("r{next}"),
                        Prompt::Ids(prompts[next].clone()),
                        params[next].clone(),
                    )
                    .unwrap();
                    next += 1;
                }
            }
        }
        for o in e.step().unwrap() {
            if o.finished {
                done.insert(o.request_id.clone(), o);
            }
        }
        step += 1;
        assert!(step < 10_000);
    }
    assert_eq!(e.kv_blocks_in_use(), 0, "blocks leaked");
    done
}

/// Each request's output alone, then through `staggered` (joining and leaving) and all at
/// once through `generate`: the same ids every way. Returns the staggered outputs.
fn same_alone_and_batched(
    m: &mut LLM,
    ps: &[Vec<u32>],
    params: &[SamplingParams],
) -> HashMap<String, RequestOutput> {
    let alone: Vec<Vec<u32>> = ps
        .iter()
        .zip(params)
        .map(|(p, sp)| {
            ids_of(
                &m.generate(vec![Prompt::Ids(p.clone())], std::slice::from_ref(sp))
                    .unwrap(),
            )[0]
            .clone()
        })
        .collect();
    let batched = staggered(m, ps, params);
    for (i, want) in alone.iter().enumerate() {
        let got = &batched[&format!("r{i}")].outputs[0].token_ids;
        assert_eq!(got, want, "request {i}");
    }
    let all = m
        .generate(ps.iter().cloned().map(Prompt::Ids).collect(), params)
        .unwrap();
    assert_eq!(ids_of(&all), alone);
    batched
}

#[test]
fn greedy_output_is_the_same_alone_and_in_a_changing_batch() {
    let mut m = llm(|_| {});
    let ps = prompts(16, 1);
    let params: Vec<SamplingParams> = (0..16).map(|i| greedy(6 + i % 7)).collect();
    let batched = same_alone_and_batched(&mut m, &ps, &params);
    for (i, sp) in params.iter().enumerate() {
        let got = &batched[&format!("r{i}")].outputs[0];
        assert_eq!(got.finish_reason, Some(FinishReason::Length));
        assert_eq!(got.token_ids.len(), sp.max_tokens.unwrap());
    }
}

/// The same for the tiny Qwen3-MoE (16 experts, top-4, a dense layer between two MoE
/// layers): decode steps route from the router fold (the logits from the attention's
/// GEMVs), one token inside the gate/up GEMV, more through the routing kernel, which finds
/// each token's 1/rms.
#[test]
fn moe_greedy_output_is_the_same_alone_and_in_a_changing_batch() {
    let moe = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../model/tests/fixtures/tiny/qwen3moe"
    );
    let mut m = llm_of(moe, |_| {});
    let ps = prompts(5, 9);
    let params: Vec<SamplingParams> = (0..5).map(|i| greedy(4 + i % 3)).collect();
    same_alone_and_batched(&mut m, &ps, &params);
}

#[test]
fn prefix_caching_gives_the_same_outputs_and_hits() {
    let shared: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % 2048).collect();
    let ps: Vec<Vec<u32>> = (0..6)
        .map(|i| shared.iter().copied().chain([100 + i, 7, 8 + i]).collect())
        .collect();
    let run = |caching: bool| {
        let mut m = llm(|a| a.enable_prefix_caching = caching);
        let mut outs = Vec::new();
        // One at a time, so later requests find the earlier ones' blocks.
        for p in &ps {
            outs.extend(ids_of(
                &m.generate(vec![Prompt::Ids(p.clone())], &[greedy(8)])
                    .unwrap(),
            ));
        }
        (outs, m.engine.stats().prefix_cache.hit_rate())
    };
    let (off, off_rate) = run(false);
    let (on, on_rate) = run(true);
    assert_eq!(off, on);
    assert_eq!(off_rate, 0.0);
    assert!(on_rate > 0.5, "hit rate {on_rate}");
}

#[test]
fn a_tiny_cache_finishes_everything_through_preemption() {
    let ps = prompts(8, 2);
    let params: Vec<SamplingParams> = (0..8).map(|_| greedy(24)).collect();
    let mut big = llm(|_| {});
    let want = ids_of(
        &big.generate(ps.iter().cloned().map(Prompt::Ids).collect(), &params)
            .unwrap(),
    );
    // 5 blocks of 16 tokens = 80 tokens for 8 requests of up to 63 tokens each.
    let mut tiny = llm(|a| {
        a.max_model_len = Some(80);
        a.num_gpu_blocks_override = Some(5);
    });
    let got = ids_of(
        &tiny
            .generate(ps.iter().cloned().map(Prompt::Ids).collect(), &params)
            .unwrap(),
    );
    assert_eq!(got, want);
    assert!(tiny.engine.stats().preemptions > 0, "expected preemptions");
    assert_eq!(tiny.engine.kv_blocks_in_use(), 0);
}

#[test]
fn aborts_at_any_time_leave_no_blocks() {
    for seed in 0..6u64 {
        let mut m = llm(|a| {
            a.num_gpu_blocks_override = Some(24);
            a.max_model_len = Some(128);
            a.max_num_batched_tokens = Some(48);
        });
        let mut r = StdRng::seed_from_u64(seed);
        let ps = prompts(12, 10 + seed);
        let mut live: Vec<String> = Vec::new();
        for (i, p) in ps.iter().enumerate() {
            let id = format!("a{i}");
            m.engine
                .add_request(&id, Prompt::Ids(p.clone()), greedy(r.random_range(1..30)))
                .unwrap();
            live.push(id);
            for _ in 0..r.random_range(0..3) {
                for o in m.engine.step().unwrap() {
                    if o.finished {
                        live.retain(|x| *x != o.request_id);
                    }
                }
            }
            if r.random_bool(0.4) && !live.is_empty() {
                let k = r.random_range(0..live.len());
                let id = live.swap_remove(k);
                let out = m.engine.abort(&id).expect("a live request");
                assert!(out.finished);
                assert_eq!(out.outputs[0].finish_reason, Some(FinishReason::Abort));
            }
        }
        while m.engine.has_unfinished() {
            m.engine.step().unwrap();
        }
        assert_eq!(m.engine.kv_blocks_in_use(), 0, "seed {seed}: blocks leaked");
        assert!(m.engine.abort("a0").is_none(), "finished requests are gone");
    }
}

#[test]
fn seeded_sampling_reproduces_whatever_the_batch() {
    let mut m = llm(|_| {});
    let ps = prompts(5, 3);
    let seeded = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 50,
        seed: Some(1234),
        max_tokens: Some(12),
        ..Default::default()
    };
    let alone = ids_of(
        &m.generate(
            vec![Prompt::Ids(ps[0].clone())],
            std::slice::from_ref(&seeded),
        )
        .unwrap(),
    );
    let mut params = vec![seeded.clone()];
    params.extend((1..5).map(|_| SamplingParams {
        temperature: 1.0,
        max_tokens: Some(12),
        ..Default::default()
    }));
    let batch = m
        .generate(ps.iter().cloned().map(Prompt::Ids).collect(), &params)
        .unwrap();
    assert_eq!(batch[0].outputs[0].token_ids, alone[0]);
    let other = SamplingParams {
        seed: Some(99),
        ..seeded.clone()
    };
    let diff = ids_of(
        &m.generate(vec![Prompt::Ids(ps[0].clone())], &[other])
            .unwrap(),
    );
    assert_ne!(diff[0], alone[0], "another seed should sample differently");
    // n > 1: distinct samples of one prompt, indexed.
    let n3 = SamplingParams { n: 3, ..seeded };
    let out = m.generate(vec![Prompt::Ids(ps[1].clone())], &[n3]).unwrap();
    assert_eq!(out[0].outputs.len(), 3);
    assert_eq!(
        out[0].outputs.iter().map(|o| o.index).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_ne!(out[0].outputs[0].token_ids, out[0].outputs[1].token_ids);
    assert_eq!(m.engine.kv_blocks_in_use(), 0);
}

#[test]
fn gpu_sampled_requests_reproduce_whatever_the_batch() {
    // The GPU draws these tokens (temperature, min-p, top-k, top-p) with the request's own
    // uniform draws, so the batch around a request cannot change them.
    // (prompts(6): one per request below.)
    let mut m = llm(|_| {});
    let ps = prompts(6, 4);
    let seeded = SamplingParams {
        temperature: 1.3,
        min_p: 0.02,
        top_k: 20,
        top_p: 0.9,
        seed: Some(77),
        max_tokens: Some(10),
        ..Default::default()
    };
    assert!(seeded.sampled_on_gpu());
    let alone = ids_of(
        &m.generate(
            vec![Prompt::Ids(ps[0].clone())],
            std::slice::from_ref(&seeded),
        )
        .unwrap(),
    );
    let mut params = vec![seeded.clone(), greedy(10)];
    // Neighbours with logprobs (raw rows copied on the GPU) and with penalties (applied
    // to the logits on the GPU).
    params.push(SamplingParams {
        logprobs: Some(2),
        ..seeded.clone()
    });
    params.push(SamplingParams {
        repetition_penalty: 1.3,
        presence_penalty: 0.5,
        ..seeded.clone()
    });
    params.extend((4..6).map(|i| SamplingParams {
        temperature: 0.7,
        seed: Some(i),
        max_tokens: Some(10),
        ..Default::default()
    }));
    let batch = m
        .generate(ps.iter().cloned().map(Prompt::Ids).collect(), &params)
        .unwrap();
    assert_eq!(batch[0].outputs[0].token_ids, alone[0]);
    let other = SamplingParams {
        seed: Some(78),
        ..seeded.clone()
    };
    let diff = ids_of(
        &m.generate(vec![Prompt::Ids(ps[0].clone())], &[other])
            .unwrap(),
    );
    assert_ne!(diff[0], alone[0], "another seed should sample differently");
    assert_eq!(m.engine.kv_blocks_in_use(), 0);
}

#[test]
fn async_scheduling_gives_the_same_outputs() {
    // Requests joining and leaving, greedy and seeded draws, a stop token and a stop
    // string met mid-run (so steps run ahead of the host are thrown away), min_tokens,
    // logprobs, n = 2: the same tokens, text and logprobs as recording each step after the
    // last one's tokens are back, and no block left.
    let ps = prompts(12, 21);
    let probe = {
        let mut m = llm(|a| a.async_scheduling = false);
        m.generate(
            ps.iter().cloned().map(Prompt::Ids).collect(),
            &vec![greedy(12); ps.len()],
        )
        .unwrap()
    };
    let params: Vec<SamplingParams> = (0..ps.len())
        .map(|i| {
            let free = &probe[i].outputs[0];
            match i % 5 {
                0 => greedy(4 + i),
                1 => SamplingParams {
                    stop_token_ids: vec![free.token_ids[4]],
                    ..greedy(12)
                },
                // Few candidates: the draw depends on the uniform each step takes, not on
                // rounding that differs with the batch's make-up (a near-uniform random
                // model's top-p draw would).
                2 => SamplingParams {
                    temperature: 0.7,
                    top_k: 5,
                    seed: Some(i as u64),
                    n: 2,
                    ..greedy(10)
                },
                3 => SamplingParams {
                    logprobs: Some(3),
                    min_tokens: 5,
                    stop_token_ids: vec![free.token_ids[1]],
                    ..greedy(9)
                },
                _ => SamplingParams {
                    stop: vec![free.text.chars().skip(3).take(2).collect()],
                    ..greedy(12)
                },
            }
        })
        .collect();
    let run = |on: bool| {
        let mut m = llm(|a| a.async_scheduling = on);
        let out = staggered(&mut m, &ps, &params);
        (out, m.engine.stats().steps_ahead)
    };
    let (on, ahead) = run(true);
    let (off, none) = run(false);
    assert!(ahead > 0, "no step ran ahead");
    assert_eq!(none, 0);
    for i in 0..ps.len() {
        let id = format!("r{i}");
        let (a, b) = (&on[&id], &off[&id]);
        assert_eq!(a.outputs.len(), b.outputs.len(), "request {i}");
        for (x, y) in a.outputs.iter().zip(&b.outputs) {
            assert_eq!(x.token_ids, y.token_ids, "request {i}");
            assert_eq!(x.text, y.text, "request {i}");
            assert_eq!(x.finish_reason, y.finish_reason, "request {i}");
            assert_eq!(x.stop_reason, y.stop_reason, "request {i}");
            assert_eq!(
                x.logprobs.as_ref().map(|v| v.len()),
                y.logprobs.as_ref().map(|v| v.len()),
                "request {i}"
            );
            if let (Some(u), Some(v)) = (&x.logprobs, &y.logprobs) {
                for (p, q) in u.iter().zip(v) {
                    assert_eq!(p.token.token, q.token.token, "request {i}");
                    // Batches of other sizes take other GEMM paths (other rounding).
                    let d = (p.token.logprob - q.token.logprob).abs();
                    assert!(d < 2e-3, "request {i}: logprobs {d} apart");
                }
            }
        }
    }
    // The stops were met: some requests ended early, by token and by text.
    let reasons: Vec<_> = on
        .values()
        .flat_map(|o| o.outputs.iter().map(|c| c.stop_reason.clone()))
        .collect();
    assert!(reasons
        .iter()
        .any(|r| matches!(r, Some(StopReason::Token(_)))));
    assert!(reasons
        .iter()
        .any(|r| matches!(r, Some(StopReason::Text(_)))));
}

#[test]
fn stop_strings_tokens_and_min_tokens() {
    let mut m = llm(|_| {});
    let p = prompts(1, 4).remove(0);
    let free = m
        .generate(vec![Prompt::Ids(p.clone())], &[greedy(24)])
        .unwrap()
        .remove(0);
    let text = free.outputs[0].text.clone();
    assert!(!text.is_empty());
    // A stop string from the middle of the text: output ends just before its first match.
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let (a, b) = (
        chars[chars.len() / 2].0,
        chars[(chars.len() / 2 + 3).min(chars.len() - 1)].0,
    );
    let stop = text[a..b.max(a + 1).min(text.len())].to_string();
    let first = text.find(&stop).unwrap();
    let sp = SamplingParams {
        stop: vec![stop.clone()],
        ..greedy(24)
    };
    let out = m
        .generate(vec![Prompt::Ids(p.clone())], std::slice::from_ref(&sp))
        .unwrap()
        .remove(0);
    assert_eq!(out.outputs[0].text, text[..first]);
    assert_eq!(out.outputs[0].finish_reason, Some(FinishReason::Stop));
    assert_eq!(
        out.outputs[0].stop_reason,
        Some(StopReason::Text(stop.clone()))
    );
    let keep = SamplingParams {
        include_stop_str_in_output: true,
        ..sp
    };
    let out = m
        .generate(vec![Prompt::Ids(p.clone())], &[keep])
        .unwrap()
        .remove(0);
    assert_eq!(out.outputs[0].text, text[..first + stop.len()]);
    // A stop token: the first greedy token ends it at once; min_tokens masks it for 3.
    let t0 = free.outputs[0].token_ids[0];
    let st = SamplingParams {
        stop_token_ids: vec![t0],
        ..greedy(24)
    };
    let out = m
        .generate(vec![Prompt::Ids(p.clone())], std::slice::from_ref(&st))
        .unwrap()
        .remove(0);
    assert_eq!(out.outputs[0].token_ids, vec![t0]);
    assert_eq!(out.outputs[0].stop_reason, Some(StopReason::Token(t0)));
    let min = SamplingParams {
        min_tokens: 3,
        ..st
    };
    let out = m.generate(vec![Prompt::Ids(p)], &[min]).unwrap().remove(0);
    assert!(out.outputs[0].token_ids.len() >= 3);
    assert!(!out.outputs[0].token_ids[..3].contains(&t0));
}

#[test]
fn logprobs_and_prompt_logprobs() {
    let mut m = llm(|_| {});
    let p = prompts(1, 5).remove(0);
    let sp = SamplingParams {
        logprobs: Some(3),
        prompt_logprobs: Some(2),
        ..greedy(5)
    };
    let out = m
        .generate(vec![Prompt::Ids(p.clone())], &[sp])
        .unwrap()
        .remove(0);
    let o = &out.outputs[0];
    let lps = o.logprobs.as_ref().unwrap();
    assert_eq!(lps.len(), 5);
    let mut sum = 0.0;
    for (pos, tok) in lps.iter().zip(&o.token_ids) {
        assert_eq!(pos.token.token, *tok);
        assert_eq!(pos.top.len(), 3);
        // Greedy picks the most likely token: rank 1, the top entry.
        assert_eq!(pos.token.rank, 1);
        assert_eq!(pos.top[0].token, *tok);
        assert!(pos.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        sum += pos.token.logprob as f64;
    }
    assert!((o.cumulative_logprob.unwrap() - sum).abs() < 1e-4);
    let plp = out.prompt_logprobs.as_ref().unwrap();
    assert_eq!(plp.len(), p.len());
    assert!(plp[0].is_none());
    for (i, e) in plp.iter().enumerate().skip(1) {
        let e = e.as_ref().unwrap();
        assert_eq!(e.token.token, p[i]);
        assert_eq!(e.top.len(), 2);
        assert!(e.token.logprob <= 0.0);
    }
}

#[test]
fn bad_requests_are_rejected_and_the_engine_goes_on() {
    let mut m = llm(|a| a.max_model_len = Some(64));
    let bad = [
        SamplingParams {
            temperature: -1.0,
            ..Default::default()
        },
        SamplingParams {
            top_p: 0.0,
            ..Default::default()
        },
        SamplingParams {
            n: 0,
            ..Default::default()
        },
    ];
    for sp in bad {
        let e = m
            .generate(vec![Prompt::Ids(vec![1, 2, 3])], &[sp])
            .unwrap_err();
        assert!(matches!(e, EngineError::InvalidRequest(_)), "{e}");
    }
    let long = m
        .generate(vec![Prompt::Ids(vec![5; 64])], &[greedy(4)])
        .unwrap_err();
    assert!(
        long.to_string().contains("maximum context length is 64"),
        "{long}"
    );
    let oov = m
        .generate(vec![Prompt::Ids(vec![5, 4096])], &[greedy(4)])
        .unwrap_err();
    assert!(oov.to_string().contains("4096"), "{oov}");
    // max_model_len caps generation.
    let out = m
        .generate(vec![Prompt::Ids(vec![5; 60])], &[greedy(100)])
        .unwrap()
        .remove(0);
    assert_eq!(out.outputs[0].token_ids.len(), 4);
    assert_eq!(out.outputs[0].finish_reason, Some(FinishReason::Length));
    assert_eq!(m.engine.kv_blocks_in_use(), 0);
}

#[test]
fn gpu_logits_processing_matches_the_host() {
    // Penalties, logit bias and min_tokens masks applied by `kernels::sample::adjust` give
    // the logits the host sampler computes, for several rows of one batch at once: the
    // same operations in the same order, so the same bits, except that a driver may fuse
    // the penalty's multiply with the subtraction after it (one rounding fewer: the H100
    // does), so allow one unit in the last place.
    use vllm_apple_engine::sampler;
    use vllm_apple_ops::kernels::sample;
    use vllm_apple_ops::{DType, Step};
    let ctx = ctx();
    let vocab = 3000;
    let mut r = StdRng::seed_from_u64(17);
    let cases: Vec<SamplingParams> = vec![
        SamplingParams {
            repetition_penalty: 1.3,
            ..Default::default()
        },
        SamplingParams {
            presence_penalty: 0.7,
            frequency_penalty: -0.4,
            logit_bias: vec![(5, 2.5), (9, -100.0), (5, -1.0)],
            ..Default::default()
        },
        SamplingParams {
            min_tokens: 50,
            stop_token_ids: vec![11, 2999],
            repetition_penalty: 0.8,
            frequency_penalty: 1.5,
            ..Default::default()
        },
        SamplingParams::greedy(),
    ];
    let mut rows = Vec::new();
    let mut adjust = Vec::new();
    let mut want: Vec<f32> = Vec::new();
    for (i, params) in cases.iter().enumerate() {
        let row: Vec<f32> = (0..vocab).map(|_| r.random_range(-8.0f32..8.0)).collect();
        let prompt: Vec<u32> = (0..40).map(|_| r.random_range(0..vocab as u32)).collect();
        // Outputs repeat tokens (frequency counts above 1) and overlap the prompt.
        let output: Vec<u32> = (0..30)
            .map(|k| {
                if k % 3 == 0 {
                    prompt[k % 7]
                } else {
                    r.random_range(0..60)
                }
            })
            .collect();
        let eos = Some(7);
        adjust.extend(sampler::logit_adjustments(
            i as u32, vocab, params, &prompt, &output, eos,
        ));
        want.extend(sampler::apply_logits_processors(&row, params, &prompt, &output, eos).iter());
        rows.extend(row);
    }
    assert!(adjust.len() > 100, "the cases touch many tokens");
    let logits = ctx
        .upload_f32(&[cases.len(), vocab], DType::F32, &rows)
        .unwrap();
    let mut step = Step::new(&ctx);
    sample::adjust(&mut step, &logits, &adjust).unwrap();
    step.submit_and_wait().unwrap();
    let got = logits.to_f32_vec(&ctx).unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let ulp = f32::from_bits(w.abs().to_bits() + 1) - w.abs();
        assert!(
            g == w || (g.is_nan() && w.is_nan()) || (g - w).abs() <= ulp,
            "row {} token {}: GPU {g}, host {w}",
            i / vocab,
            i % vocab
        );
    }
    assert!(
        got.iter().zip(&rows).any(|(g, x)| g != x),
        "something changed"
    );
}

#[test]
fn gpu_logprobs_match_the_host() {
    // `kernels::logprobs` against the host's `logprobs_of` on the raw rows: the sampled
    // token's logprob and rank, and the top-N with ties broken by the lower id, including
    // rows with tied maxima, NaN entries and top-N past a tie.
    use vllm_apple_engine::sampler;
    use vllm_apple_ops::kernels::logprobs::{self, LogprobRequest};
    use vllm_apple_ops::kernels::sample::{self, RowSampling};
    use vllm_apple_ops::{DType, Step};
    let ctx = ctx();
    let vocab = 5000;
    let mut r = StdRng::seed_from_u64(23);
    let mut rows: Vec<Vec<f32>> = (0..5)
        .map(|_| (0..vocab).map(|_| r.random_range(-6.0f32..6.0)).collect())
        .collect();
    for i in [3, 900, 4999, 17] {
        rows[1][i] = 9.5; // a four-way tie at the top
    }
    rows[2][100] = f32::NAN;
    rows[2][4000] = 8.0;
    for x in rows[3].iter_mut().step_by(7) {
        *x = 2.0; // hundreds of ties inside the top-N
    }
    let tops = [5u32, 3, 20, 20, 0];
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let logits = ctx
        .upload_f32(&[rows.len(), vocab], DType::F32, &flat)
        .unwrap();
    let reqs: Vec<LogprobRequest> = tops
        .iter()
        .enumerate()
        .map(|(row, &top)| LogprobRequest {
            row: row as u32,
            top,
        })
        .collect();
    let draws: Vec<RowSampling> = (0..rows.len())
        .map(|i| RowSampling {
            temperature: 1.5,
            u: 0.1 + 0.2 * i as f32,
            ..RowSampling::GREEDY
        })
        .collect();
    let ids = ctx.empty(&[rows.len()], DType::U32).unwrap();
    let mut step = Step::new(&ctx);
    let lp = logprobs::gather(&mut step, &logits, &reqs).unwrap();
    sample::sample(&mut step, &logits, &draws, &ids).unwrap();
    logprobs::finish(&mut step, &lp, &ids).unwrap();
    step.submit_and_wait().unwrap();
    let got = logprobs::read(&ctx, &lp).unwrap();
    let ids = ids.to_u32_vec(&ctx).unwrap();
    for (i, row) in rows.iter().enumerate() {
        let n = tops[i] as usize;
        let (own, top) = sampler::logprobs_from_gpu(ids[i], &got[i], n);
        let (want_own, want_top) = sampler::logprobs_of(row, ids[i], n);
        assert_eq!(own.token, want_own.token);
        assert_eq!(own.rank, want_own.rank, "row {i}: rank");
        assert!((own.logprob - want_own.logprob).abs() < 1e-4, "row {i}");
        let ids_of = |v: &[sampler::TokenLogprob]| v.iter().map(|t| t.token).collect::<Vec<_>>();
        assert_eq!(ids_of(&top), ids_of(&want_top), "row {i}: top ids");
        for (a, b) in top.iter().zip(&want_top) {
            assert!((a.logprob - b.logprob).abs() < 1e-4, "row {i}: top logprob");
            assert_eq!(a.rank, b.rank);
        }
    }
}
