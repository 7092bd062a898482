"""The README.md of a decoder bundle: what its harness (harness/bench_llm.py, shipped as bench.py)
and its app runtime (harness/edgepack_runtime.py) do, as the encoder bundles' README says for
theirs. The integrity rules and signatures are shared code (bundle_check.py), so their sections
come verbatim from harness/README.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgepack.bundle.requirements import ORT_FLOOR, min_python

# Why older onnxruntime releases fail (measured: edgepack/bundle/requirements.py).
WHY = {
    "onnx": "older releases lack the contrib operators this graph uses (MatMulNBits, "
    "GroupQueryAttention, GatherBlockQuantized with bits)",
    "ort": "older releases cannot read the converted operators of this .ort file (an app embeds "
    "onnxruntime-android or onnxruntime-objc of that version or newer)",
}
HARNESS_README = Path(__file__).resolve().parent.parent / "harness" / "README.md"
SHARED_SECTIONS = ("## What is checked before the run", "## Signed bundles")


def _shared_sections() -> list[str]:
    """The harness README's sections on bundle_check.py, which both harnesses run."""
    if not HARNESS_README.is_file():
        return []
    text = HARNESS_README.read_text(encoding="utf-8")
    out = []
    for heading in SHARED_SECTIONS:
        start = text.find(heading + "\n")
        if start < 0:
            continue
        end = text.find("\n## ", start + len(heading))
        out.append(text[start : end if end >= 0 else len(text)].rstrip() + "\n")
    return out


def _summary(name: str, manifest: dict[str, Any]) -> list[str]:
    fid, model = manifest["fidelity"], manifest["model"]
    fmt = Path(model["file"]).suffix.lstrip(".")
    config = (
        f"; operators for a reduced onnxruntime build: `{model['operator_config']}`"
        if model.get("operator_config")
        else ""
    )
    return [
        f"# {name}",
        "",
        f"{model['precision']} text-generation model for **{manifest['target']['name']}**, "
        f"built by edgepack from `{manifest['source']['model']}`.",
        "",
        f"- Model file: `{model['file']}` ({model['bytes'] / 1e6:.1f} MB){config}",
        f"- Held-out perplexity {fid.get('perplexity', float('nan')):.2f} "
        f"(fp32 {fid.get('perplexity_fp32', float('nan')):.2f}), next-token top-1 agreement "
        f"{fid.get('top1_agreement', float('nan')):.3f}",
        f"- Context: {manifest['generation']['context_length']} tokens (prompt plus new ones)",
        "",
        "## Install (once per device)",
        "",
        f"Python {min_python('decoder', fmt)} or newer and onnxruntime "
        f"{ORT_FLOOR[('decoder', fmt)]} or newer: {WHY[fmt]}, and onnxruntime publishes no wheels "
        "that new for older Pythons. Then:",
        "",
        "```sh",
        "python3 -m pip install -r requirements.txt   # onnxruntime, numpy, tokenizers (the app runtime)",
        "```",
        "",
    ]


HARNESS = """## Check and measure

```sh
sh run.sh --json ../result.json               # check, then the prompt sweep: TTFT, tokens/s
sh run.sh --check-only                        # only the check
sh run.sh --threads 1,2,4 --prompt-tokens 128,512 --new-tokens 64 --runs 10
sh run.sh --compare ../result.json --threshold 0.05   # exit 1 on a regression
```

`run.sh` runs `python3 bench.py` with your flags (`PYTHON=/path/to/python sh run.sh` picks another
interpreter). `bench.py` first checks the bundle's files (below), then feeds each prompt of
`reference.json` followed by the build host's greedy continuation, and counts the positions where
this device's next-token argmax equals the host's token. The check passes when that share is at
least `check.min_agreement` of `manifest.json`. It also decodes each prompt greedily on its own and
reports how many tokens stay on the host's path (int4 kernels round differently per CPU, so a
near-tie may send a free-running path elsewhere; the share above is what passes or fails). Then,
unless `--check-only`, it times, for each prompt length and thread count, the first token of the
prompt and the decoding of `--new-tokens` more: one warm-up run each, then `--runs` rounds that
visit every configuration once (so a slow spell on a shared or hot device falls on all of them),
reported as percentiles. It prints the JSON report and exits with:

| code | meaning |
| --- | --- |
| 0 | the check passed (and, with `--compare`, nothing regressed) |
| 1 | the check failed, or with `--compare` a configuration's decode p50 tokens/s fell, or its TTFT p50 rose, by more than `--threshold` |
| 2 | something you can fix: a tampered or missing file, a bad flag or value (e.g. a prompt plus new tokens longer than the context); one line says what |

## Flags

| flag | default | meaning |
| --- | --- | --- |
| `--json PATH` | none | also write the JSON report here (outside the bundle folder) |
| `--threads N[,N...]` | 1 | intra-op threads; a list sweeps them |
| `--prompt-tokens N[,N...]` | 32,128,512,1024 | prompt lengths for the time to first token (by default those that fit the context; one you name must fit) |
| `--new-tokens N` | 64 | tokens decoded per run for tokens/s; prompt plus new tokens must fit the context |
| `--runs N` | 5 | timed runs per configuration |
| `--warmup N` | 1 | untimed runs per configuration first |
| `--compare REPORT` | none | an earlier `--json` report: judge each configuration both ran by its p50s |
| `--threshold X` | 0.05 | with `--compare`: the change that counts as a regression (0.05 = 5 %) |
| `--check-only` | off | run the check, skip the timing |
| `--progress` | off | one `progress DONE/TOTAL ...` line per graph call of the check on stderr (stdout stays the JSON report) |
| `--no-verify` | off | skip the bundle check below |
| `--public-key PUB` | none | also verify the signature `bundle.sig` with this public key (needs `model-signing`) |
| `--require-signature` | off | with `--public-key`: exit 2, not just warn, when `model-signing` is not installed |

## JSON report

| key | type | meaning |
| --- | --- | --- |
| `check` | object | `passed`, `agreement` (share of positions whose argmax is the host's token), `min_agreement`, `tokens` (positions compared), `greedy_prefix_tokens` (per prompt, how many free-running greedy tokens equal the host's; null with `--forced-only`) |
| `env` | object | the encoder harness's: `machine`, `os`, `cpu_model`, `cores`, `affinity`, `governor`, `cpu_mhz`, `temperature_c`, `device_model`, `cpu_features` (the ISA extensions the int4/int8 kernels choose by: compare figures only between equal lists), plus `python`, `onnxruntime` |
| `settings` | object | `runs`, `warmup`, `new_tokens`, `prompt_tokens`, `threads`, `skipped_prompt_tokens` (default lengths the context cannot hold) |
| `sweep` | list | per (`threads`, `prompt_tokens`): `runs`, `new_tokens`; `ttft_ms`, `decode_tokens_per_s` (one value per run) and `inter_token_ms` (every decode step) as `mean`, `std`, `min`, `p50`, `p90`, `p95`, `p99`, `max`; `kv_cache_mb` at that prompt plus the new tokens |
| `perf` | object | absent with `--check-only`; the first configuration's headline: `threads`, `prompt_tokens`, `runs`, `ttft_ms` and `decode_tokens_per_s` (p50s) with their `_p90`, `peak_rss_mb`, `kv_cache_mb_at_context` (the KV cache at the full context, in its own type: fp32, or int8 when the manifest's `decoder.kv_cache` says so), `context_length` |
| `compare` | object or null | with `--compare`: `baseline`, `threshold`, `rows` (`threads`, `prompt_tokens`, `decode_ratio`, `ttft_ratio`, `regressed`), `regressed` |

## Use the model from an app

`edgepack_runtime.py` tokenizes exactly as the build host did (`tokenizer/tokenizer.json`) and
decodes with the KV cache; it needs only onnxruntime, numpy and tokenizers (requirements.txt) and
shares its decoding loop with `bench.py` (`edgepack_decode.py`). Greedy is the default, and it is
the path the check above passed.

```python
import sys; sys.path.insert(0, "/path/to/this/bundle")
from edgepack_runtime import BundleError, Model
model = Model("/path/to/this/bundle", threads=2)    # threads and providers are optional
text = model.generate("The capital of France is", max_new_tokens=32)   # str, greedy
for piece in model.stream("Once upon a time", max_new_tokens=32):      # str pieces, as decoded
    print(piece, end="", flush=True)
reply = model.chat([{"role": "system", "content": "Answer in one sentence."},
                    {"role": "user", "content": "What is the capital of France?"}],
                   max_new_tokens=64)
story = model.generate("Once upon a time", 64, temperature=0.8, top_p=0.95, seed=1,
                       stop=["\n\n"])                # the same seed gives the same text
ids = list(model.generate_ids([1, 2, 3], max_new_tokens=8))            # token ids in, ids out
```

- Sampling: `temperature` (0, the default, is greedy), `top_k` (0: all tokens), `top_p` (1.0: all),
  `repetition_penalty` (1.0: none), applied in transformers' order; `seed` makes a sampled run
  repeat itself exactly (numpy's Generator; no seed, a fresh one each time).
- `stop`: a string or strings; the text ends before the first one and leaves it out. The
  end-of-sequence token ends any text; a chat reply also ends at the template's end-of-turn token.
- Streaming (`stream`, `chat_stream`) hands out text as soon as it is whole: a character spread
  over several tokens (é, 日, an emoji) is never split. `model.start(ids, ...)` returns the same
  stream with `finish_reason` ("stop" or "length"), `prompt_tokens` and `completion_tokens`.
- Chat: `manifest.json` `generation.chat` holds the model's chat template as fixed strings between
  the turns, worked out by the build with transformers and checked against the template on several
  conversations (`tokenizer/chat_template.jinja` is the template itself). Conversations are an
  optional system message, then user and assistant turns alternating, ending with the user's;
  anything else raises `BundleError`, as does a bundle whose template could not be written down
  that way (`generation.chat.why` says why).
- A prompt whose tokens plus `max_new_tokens` exceed the context raises `BundleError`, as does a
  prompt with no tokens.

From a shell in this folder (exit 2 with one line on stderr for a `BundleError`):

```sh
python3 edgepack_runtime.py generate "The capital of France is" --max-new-tokens 32
# {"prompt": "The capital of France is", "text": " ..."}
python3 edgepack_runtime.py generate "Once upon a time" --temperature 0.8 --top-p 0.95 --top-k 50 --repetition-penalty 1.1 --seed 1 --stop "."
python3 edgepack_runtime.py chat --message "What is the capital of France?"   # the reply, streamed
python3 edgepack_runtime.py chat --system "Answer briefly."   # one user turn per stdin line
python3 edgepack_runtime.py tokenize "The capital of France is"   # ids and tokens
python3 edgepack_runtime.py --threads 2 --bundle /path/to/bundle generate "Hi" --max-new-tokens 16
```

## Serve it over HTTP (OpenAI-compatible)

```sh
python3 edgepack_runtime.py serve --port 8000        # loopback only; --host 0.0.0.0 to expose it
curl -s http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \
  -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32}'
```

`edgepack_serve.py` (standard library only) answers `POST /v1/completions`,
`POST /v1/chat/completions` (JSON with `id`, `object`, `created`, `model`, `choices`, `usage`; with
`"stream": true`, Server-Sent Events `data: {...}` chunks and then `data: [DONE]`) and
`GET /v1/models`, so OpenAI client libraries work with `base_url="http://127.0.0.1:8000/v1"`.
Requests take `max_tokens`, `temperature`, `top_p`, `seed`, `stop`, `stream`, and `top_k` and
`repetition_penalty` beyond OpenAI's; `n` must be 1 and other fields are ignored. Greedy unless
`temperature` is given. There is no authentication: keep it on loopback unless the network is yours.

| flag | default | meaning |
| --- | --- | --- |
| `--host ADDR` | 127.0.0.1 | address to listen on |
| `--port N` | 8000 | port; 0 picks a free one (the first stdout line names it) |
| `--queue N` | 8 | requests that may wait while one generates; more get 429 at once |
| `--max-tokens N` | 512 | most new tokens a request may ask (more is a 400) |
| `--max-body N` | 1048576 | largest request body in bytes (more is a 413, not read) |
| `--model-name NAME` | this folder's name | the model id the API reports |
| `--log` | off | one stderr line per request |

One generation runs at a time; bad JSON, a wrong type or value, or a prompt too long for the
context is a 400 with OpenAI's error object (`{"error": {"message", "type", "param", "code"}}`),
an unknown path a 404, and a client silent for 30 s loses its connection.
"""


MOBILE = """## In an Android or iOS app

`mobile/EdgepackLlm.kt` (onnxruntime-android) and `mobile/EdgepackLlm.swift` (onnxruntime-objc) do
what `edgepack_runtime.py` does, without Python: the model's byte-level BPE tokenizer (reading
`mobile/tokens.txt` and `mobile/merges.txt`), the chat template's table, greedy decoding or
sampling (temperature, top-k, top-p, repetition penalty, a seed: SplitMix64, so the same seed gives
the same tokens in both apps, not the same as the Python runtime's numpy draws), stop strings, the
end-of-turn token, and streamed text that never splits a character. Copy `{model}`,
`mobile/tokens.txt` and `mobile/merges.txt` into the app; the top of each file shows the calls.
`LlmSignature` holds this model's cache names, type and shape; edgepack's tests check them against
the model and run the Kotlin tokenizer, chat format and sampler on the JVM against this runtime.
"""


def decoder_readme(name: str, manifest: dict[str, Any]) -> str:
    """The whole README.md of one decoder bundle."""
    mobile = (manifest.get("app") or {}).get("mobile") or []
    extra = [MOBILE.format(model=manifest["model"]["file"])] if mobile else []
    return "\n".join([*_summary(name, manifest), HARNESS, *extra, *_shared_sections()])
