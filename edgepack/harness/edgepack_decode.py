"""Greedy decoding with the KV cache of an edgepack decoder bundle's ONNX graph.

Shared by the bundle's harness (bench.py) and its app runtime (edgepack_runtime.py), so what the
device checks is what an app runs. numpy and an onnxruntime session only; Python 3.8+.
"""

import numpy as np

# The cache's element types: fp32, or int8 (an int8 KV cache, dequantized inside the graph).
CACHE_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}


def empty_past(sess):
    past = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            dims = [d if isinstance(d, int) else 0 for d in i.shape]
            dims[0] = 1
            past[i.name] = np.zeros(dims, dtype=CACHE_TYPES.get(i.type, np.float32))
    return past


def step(sess, ids, past, start, last=False):
    """One pass over ``ids`` after ``start`` cached positions: (logits, new past). With ``last``,
    a graph that takes ``logits_from`` computes the last position's logits alone (generation
    reads no other); the returned rows then end with that position either way."""
    names = set(i.name for i in sess.get_inputs())
    feeds = dict(past)
    feeds["logits_from"] = np.asarray([len(ids) - 1 if last else 0], dtype=np.int64)
    feeds["input_ids"] = np.asarray([ids], dtype=np.int64)
    feeds["attention_mask"] = np.ones((1, start + len(ids)), dtype=np.int64)
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(start, start + len(ids), dtype=np.int64)[None]
    outputs = [o.name for o in sess.get_outputs()]
    values = sess.run(outputs, {k: v for k, v in feeds.items() if k in names})
    result = dict(zip(outputs, values))  # noqa: B905 (strict= needs 3.10; the harness runs on 3.8)
    new_past = {}
    for k, v in result.items():
        if k.startswith("present."):
            new_past["past_key_values." + k[len("present.") :]] = v
    return result["logits"][0], new_past


def teacher_forced(sess, prompt, continuation):
    """The graph's argmax after each token of ``prompt + continuation[:-1]``, in one pass.

    Fed the reference continuation instead of its own picks, one token that rounds the other way
    on this CPU (a near-tie) costs one position instead of the whole rest of the path."""
    if not continuation:
        return []
    tokens = list(prompt) + list(continuation[:-1])
    logits, _ = step(sess, tokens, empty_past(sess), 0)
    return [int(t) for t in np.argmax(logits[len(prompt) - 1 :], axis=-1)]


def greedy_stream(sess, prompt, n, eos):
    """Yield up to ``n`` greedy tokens after ``prompt``; an end-of-sequence token is the last."""
    logits, past = step(sess, list(prompt), empty_past(sess), 0, last=True)
    pos, count = len(prompt), 0
    while count < n:
        token = int(np.argmax(logits[-1]))
        count += 1
        yield token
        if token in eos or count == n:
            return
        logits, past = step(sess, [token], past, pos, last=True)
        pos += 1


def greedy(sess, prompt, n, eos):
    return list(greedy_stream(sess, prompt, n, eos))
