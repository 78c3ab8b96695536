"""The Python package: vLLM's offline API, the seed's usage example with only the import
changed, on the embedded default model."""
import pytest

from conftest import MODEL
from vllm_apple import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm():
    # The seed's constructor call, word for word (the model is our embedded default).
    return LLM(model=str(MODEL), dtype="float16", max_model_len=2048, gpu_memory_utilization=0.85,
               max_num_seqs=8)


def test_seed_usage_example(llm):
    prompts = ["The capital of France is", "The largest planet in the solar system is"]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=50, temperature=0.0))
    assert len(outputs) == 2
    for prompt, out in zip(prompts, outputs):
        assert out.prompt == prompt
        assert out.prompt_token_ids == llm.encode(prompt)
        c = out.outputs[0]
        assert c.text and c.token_ids and c.finish_reason in ("stop", "length")
        assert len(c.token_ids) <= 50
    assert "Paris" in outputs[0].outputs[0].text


def test_chat_and_kwargs(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=24, temperature=0.0))
    assert "Paris" in out[0].outputs[0].text
    batch = llm.chat([[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Bye"}]],
                     SamplingParams(max_tokens=4, temperature=0.0))
    assert len(batch) == 2


def test_sampling_fields_and_logprobs(llm):
    sp = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=6, logprobs=2, stop=["\n\n"])
    a = llm.generate("Once upon a time", sp)[0]
    b = llm.generate({"prompt": "Once upon a time"}, sp)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert sorted(o.index for o in a.outputs) == [0, 1]
    for o in a.outputs:
        assert len(o.logprobs) == len(o.token_ids)
        for tok, lp in zip(o.token_ids, o.logprobs):
            assert tok in lp and lp[tok].logprob <= 0
        assert o.cumulative_logprob == pytest.approx(sum(lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)),
                                                     abs=1e-3)
    ids = llm.generate({"prompt_token_ids": llm.encode("Hello")}, SamplingParams(max_tokens=3, temperature=0))
    assert ids[0].prompt is None and len(ids[0].outputs[0].token_ids) == 3


def test_invalid_values_raise(llm):
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError):
        llm.generate("word " * 3000, SamplingParams(max_tokens=2))
    with pytest.raises(TypeError):
        llm.generate(42)
    # The engine is still usable after errors.
    assert llm.generate("Hi", SamplingParams(max_tokens=2, temperature=0))[0].outputs[0].token_ids
