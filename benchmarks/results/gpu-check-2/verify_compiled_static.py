"""The built-in model in fp32 on CUDA: the compiled engine (CUDA graphs) gives eager's greedy tokens (run on the GPU
machine, 2026-12-04)."""

import time

from depthwave import LLM, SamplingParams
from depthwave.engine import Request
from depthwave.samplers import registry

llm = LLM("builtin", device="cuda", dtype="float32")
qs = [
    "Sara buys 8 pens for 58 dollars each and 6 cups for 54 dollars each. How many dollars does Sara spend?",
    "A shop gets 26 stamps on Wednesday, 68 stamps on Friday and 92 stamps on Tuesday. It sells 168 stamps.",
]


def toks(compile, name, **kw):
    p = registry.make(name, **kw)
    reqs = [Request(llm.encode(q, chat=True), SamplingParams(temperature=0.0, max_new_tokens=32), p) for q in qs]
    e = llm.engine(reqs, p.cache_mode, max_num_seqs=1, compile=compile)
    t = time.perf_counter()
    out = [r.token_ids for r in e.run(reqs)]
    return out, time.perf_counter() - t


eager, te = toks(False, "static", cache_mode="shared")
comp, tc = toks(True, "static", cache_mode="shared")
comp2, tc2 = toks(True, "static", cache_mode="shared")
print(
    "static shared B=1: compiled == eager",
    comp == eager,
    comp2 == eager,
    f"eager {te:.1f}s compiled first {tc:.1f}s second {tc2:.1f}s",
    flush=True,
)
