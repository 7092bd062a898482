"""Greedy and sampled decoding with the KV cache of an edgepack decoder bundle's ONNX graph.

Shared by the bundle's harness (bench.py) and its app runtime (edgepack_runtime.py), so what the
device checks is what an app runs. numpy and an onnxruntime session only; Python 3.8+.

Sampling follows transformers' order of logits processors (repetition penalty, temperature,
top-k, top-p), so settings an app tuned against transformers mean the same here. Draws come from
one numpy Generator per generation: the same seed gives the same tokens on the same graph.
"""

import numpy as np

# The cache's element types: fp32, or int8 (an int8 KV cache, dequantized inside the graph).
CACHE_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}
# The graph metadata entry that says the cache can be written in place (families/cache_layout.py in edgepack).
CACHE_LAYOUT, IN_PLACE = "edgepack.kv_cache", "in-place"


def empty_past(sess):
    past = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            dims = [d if isinstance(d, int) else 0 for d in i.shape]
            dims[0] = 1
            past[i.name] = np.zeros(dims, dtype=CACHE_TYPES.get(i.type, np.float32))
    return past


def _inputs(names, ids, start, last):
    """The non-cache inputs of one pass over ``ids`` after ``start`` cached positions."""
    feeds = {
        "input_ids": np.asarray([ids], dtype=np.int64),
        "attention_mask": np.ones((1, start + len(ids)), dtype=np.int64),
        "logits_from": np.asarray([len(ids) - 1 if last else 0], dtype=np.int64),
    }
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(start, start + len(ids), dtype=np.int64)[None]
    return dict((k, v) for k, v in feeds.items() if k in names)


def step(sess, ids, past, start, last=False):
    """One pass over ``ids`` after ``start`` cached positions: (logits, new past). With ``last``,
    a graph that takes ``logits_from`` computes the last position's logits alone (generation
    reads no other); the returned rows then end with that position either way."""
    names = set(i.name for i in sess.get_inputs())
    feeds = _inputs(names, ids, start, last)
    feeds.update(past)
    outputs = [o.name for o in sess.get_outputs()]
    values = sess.run(outputs, feeds)
    result = dict(zip(outputs, values))  # noqa: B905 (strict= needs 3.10; the harness runs on 3.8)
    new_past = {}
    for k, v in result.items():
        if k.startswith("present."):
            new_past["past_key_values." + k[len("present.") :]] = v
    return result["logits"][0], new_past


def in_place(sess):
    """Whether the graph says its cache can be written in place (edgepack marks a graph whose
    GroupQueryAttention reads each past input and writes the matching present directly)."""
    try:
        meta = sess.get_modelmeta().custom_metadata_map
    except (AttributeError, RuntimeError):
        return False
    return meta.get(CACHE_LAYOUT) == IN_PLACE


class Cache:
    """The KV cache of one generation, grown one pass at a time by ``feed``.

    On a graph marked ``in_place`` it is one buffer per cache tensor, sized for the generation
    and bound as both the past input and the present output: onnxruntime's GroupQueryAttention
    then writes each pass's new positions into it and copies nothing. Otherwise each pass returns
    the whole cache as new present tensors (zeroed and copied in every layer, at every step) that
    become the next past, as ``step`` does."""

    def __init__(self, sess, capacity):
        self.sess, self.capacity, self.length = sess, capacity, 0
        self.names = set(i.name for i in sess.get_inputs())
        self.past = empty_past(sess)
        self.binding = None
        if in_place(sess):
            self._bind()

    def _bind(self):
        self.binding = self.sess.io_binding()
        # First: get_outputs() lists the outputs in the order they were bound.
        self.binding.bind_output("logits")
        self.buffers = []  # the arrays whose memory is bound, kept alive with the binding
        for name, empty in self.past.items():
            shape = list(empty.shape)
            shape[2] = self.capacity
            buffer = np.zeros(shape, dtype=empty.dtype)
            self.buffers.append(buffer)
            # Bound by address: the same memory as the past input and the present output.
            where = ("cpu", 0, buffer.dtype.type, shape, buffer.ctypes.data)
            self.binding.bind_input(name, *where)
            self.binding.bind_output("present." + name[len("past_key_values.") :], *where)

    def feed(self, ids, last=True):
        """The logits of a pass over ``ids`` after the cached positions (the last row alone with
        ``last``, on a graph that takes ``logits_from``); the cache then holds them too."""
        if self.binding is None:
            logits, self.past = step(self.sess, ids, self.past, self.length, last)
        else:
            if self.length + len(ids) > self.capacity:
                raise ValueError(
                    "%d cached + %d new positions exceed the cache's %d"
                    % (self.length, len(ids), self.capacity)
                )
            inputs = _inputs(self.names, ids, self.length, last)
            for name, value in inputs.items():
                self.binding.bind_cpu_input(name, value)
            self.sess.run_with_iobinding(self.binding)
            # A copy: the array onnxruntime hands out is its output buffer, which the next pass
            # reuses (rows a caller kept would change under it).
            logits = np.array(self.binding.get_outputs()[0].numpy()[0])
        self.length += len(ids)
        return logits


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
    cache = Cache(sess, len(prompt) + n)
    logits = cache.feed(list(prompt))
    count = 0
    while count < n:
        token = int(np.argmax(logits[-1]))
        count += 1
        yield token
        if token in eos or count == n:
            return
        logits = cache.feed([token])


def greedy(sess, prompt, n, eos):
    return list(greedy_stream(sess, prompt, n, eos))


def penalized(logits, history, repetition_penalty=1.0):
    """float64 logits with transformers' repetition penalty: a seen token's positive logit is
    divided by the penalty, a negative one multiplied."""
    scores = np.array(logits, dtype=np.float64)
    if repetition_penalty != 1.0 and len(history):
        seen = np.unique(np.asarray(history, dtype=np.int64))
        seen = seen[(seen >= 0) & (seen < scores.shape[0])]
        values = scores[seen]
        scores[seen] = np.where(
            values > 0, values / repetition_penalty, values * repetition_penalty
        )
    return scores


def distribution(scores, temperature=1.0, top_k=0, top_p=1.0):
    """Probabilities over the vocabulary after temperature, top-k, then top-p (the smallest set
    of most likely tokens whose probability reaches ``top_p``; the likeliest always stays)."""
    scores = np.array(scores, dtype=np.float64) / temperature
    if 0 < top_k < scores.shape[0]:
        kth = np.partition(scores, -top_k)[-top_k]
        scores[scores < kth] = -np.inf
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if top_p < 1.0:
        kept = np.zeros(probs.shape[0], dtype=bool)
        kept[nucleus(probs, top_p)] = True
        probs[~kept] = 0.0
        probs /= probs.sum()
    return probs


def nucleus(probs, top_p, first=64):
    """Indices of the smallest set of most likely tokens whose mass reaches ``top_p``.

    Sorting a 49k-token vocabulary took 15 ms a token (more than the model's step on a loaded
    2-core x86); the set is almost always among the few hundred likeliest, so only the ``first``
    likeliest are sorted, four times more while their mass falls short of ``top_p``."""
    size, k = probs.shape[0], first
    while True:
        if k >= size:
            order = np.argsort(-probs, kind="stable")
        else:
            top = np.argpartition(-probs, k)[:k]
            order = top[np.lexsort((top, -probs[top]))]  # as a stable sort of the whole row
        before = np.cumsum(probs[order]) - probs[order]  # mass of the more likely tokens
        if k >= size or before[-1] + probs[order[-1]] >= top_p:
            return order[before < top_p]  # the likeliest always stays (before = 0)
        k *= 4


def choose(logits, history, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, rng=None):
    """The next token from one row of logits: the argmax after the penalty when ``temperature``
    is 0, else one draw from ``rng`` over ``distribution``. ``history`` is the prompt and the
    tokens so far."""
    scores = penalized(logits, history, repetition_penalty)
    if temperature <= 0:
        return int(np.argmax(scores))
    cumulative = np.cumsum(distribution(scores, temperature, top_k, top_p))
    # searchsorted on the cumulative sum, not Generator.choice: choice insists the
    # probabilities sum to 1 within a tolerance a float32-derived row can miss.
    pick = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return min(pick, scores.shape[0] - 1)


def sample_stream(sess, prompt, n, eos, settings=None, rng=None):
    """Yield up to ``n`` tokens after ``prompt``, each from ``choose`` with ``settings`` (its
    keyword arguments; none is greedy, as ``greedy_stream``); an end-of-sequence token is the
    last."""
    settings = dict(settings or {})
    history = list(prompt)
    cache = Cache(sess, len(prompt) + n)
    logits = cache.feed(history)
    count = 0
    while count < n:
        token = choose(logits[-1], history, rng=rng, **settings)
        count += 1
        history.append(token)
        yield token
        if token in eos or count == n:
            return
        logits = cache.feed([token])
