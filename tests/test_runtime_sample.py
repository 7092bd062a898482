"""edgepack_runtime.py on the real sample (all-MiniLM-L6-v2, `edgepack build --target arm64`).

On the host: its tokenizer ids equal transformers' on every calibration and held-out text, and
its embeddings of the held-out texts equal the bundle's int8 graph fed by transformers (padded to
seq_len as the build does) within 1e-5. Under qemu aarch64 with the aarch64 tokenizers and
onnxruntime wheels: the same ids, and embeddings equal to the aarch64 onnxruntime's run of the
same graph on transformers' ids. aarch64 int8 kernels round differently from x86 ones (measured
here: max |diff| 0.012, min cosine 0.998 on 363 texts), so against the x86 host the emulated run
is held to the bundle's own device threshold, as bench.py is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgepack.device import emulate
from edgepack.errors import UserError

pytestmark = pytest.mark.slow
SAMPLES = Path(__file__).resolve().parents[1] / "samples"
GUEST_REFERENCE_TEXTS = 48  # emulation is ~50x slower; all 363 texts took ~2 minutes more


def lines(name: str) -> list[str]:
    return [t for t in (SAMPLES / name).read_text(encoding="utf-8").split("\n") if t.strip()]


@pytest.fixture(scope="module")
def bundle(sample_build: tuple[Path, str]) -> Path:
    return sample_build[0] / "all-MiniLM-L6-v2-arm64"


@pytest.fixture(scope="module")
def host(bundle: Path) -> dict:
    """transformers' ids for every sample text and the host's int8 embeddings of the held-out."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    seq_len = json.loads((bundle / "manifest.json").read_text())["harness"]["seq_len"]
    tok = AutoTokenizer.from_pretrained(str(bundle / "tokenizer"))
    texts = lines("calibration.txt") + lines("heldout.txt")
    ids = [tok(t, truncation=True, max_length=seq_len)["input_ids"] for t in texts]
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    heldout, rows = lines("heldout.txt"), []
    for start in range(0, len(heldout), 16):
        enc = tok(
            heldout[start : start + 16],
            padding="max_length",
            truncation=True,
            max_length=seq_len,
            return_tensors="np",
        )
        feeds = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
        rows.append(session.run(["sentence_embedding"], feeds)[0])
    return {"texts": texts, "ids": ids, "embeddings": np.concatenate(rows), "seq_len": seq_len}


def load_runtime(bundle: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sample_runtime", bundle / "edgepack_runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_host_ids_and_embeddings_equal_the_build_hosts(bundle: Path, host: dict) -> None:
    model = load_runtime(bundle).Model(bundle)
    assert len(host["texts"]) > 800
    assert [e.ids for e in model.tokenize(host["texts"])] == host["ids"]
    got = model.embed(lines("heldout.txt"))
    assert got.shape == host["embeddings"].shape == (len(lines("heldout.txt")), 384)
    assert np.abs(got - host["embeddings"]).max() <= 1e-5


GUEST = """
import json, sys
import numpy as np
import onnxruntime as ort
sys.path.insert(0, sys.argv[1])
import edgepack_runtime
work = sys.argv[2]
with open(work + "/all.txt", encoding="utf-8") as f:
    texts = json.load(f)
with open(work + "/heldout.txt", encoding="utf-8") as f:
    heldout = json.load(f)
model = edgepack_runtime.Model(sys.argv[1], threads=2)
ids = [e.ids for e in model.tokenize(texts)]
embeddings = model.embed(heldout)
feeds = dict(np.load(work + "/feeds.npz"))
session = ort.InferenceSession(sys.argv[1] + "/model.onnx", providers=["CPUExecutionProvider"])
reference = session.run(["sentence_embedding"], feeds)[0]
import platform
np.savez(work + "/out.npz", embeddings=embeddings, reference=reference)
with open(work + "/ids.json", "w") as f:
    json.dump({"ids": ids, "machine": platform.machine()}, f)
"""


def test_emulated_aarch64_runtime_gives_the_same_ids_and_embeddings(
    bundle: Path, host: dict, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    reason = emulate.emulator_available()
    if reason:
        pytest.skip(f"no aarch64 emulation here: {reason}")
    try:
        sysroot = emulate.ensure_sysroot()
    except UserError as exc:
        pytest.skip(f"cannot build the aarch64 sysroot: {exc}")
    assert emulate.read_sysroot_info(sysroot)["tokenizers"] != "unknown"
    heldout = lines("heldout.txt")
    (tmp_path / "all.txt").write_text(json.dumps(host["texts"]), encoding="utf-8")
    # The guest embeds as many held-out texts as it has references for: emulation is ~50x slower.
    heldout = heldout[:GUEST_REFERENCE_TEXTS]
    (tmp_path / "heldout.txt").write_text(json.dumps(heldout), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(str(bundle / "tokenizer"))
    enc = tok(
        heldout,
        padding="max_length",
        truncation=True,
        max_length=host["seq_len"],
        return_tensors="np",
    )
    np.savez(tmp_path / "feeds.npz", **{k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")})  # fmt: skip
    (tmp_path / "guest.py").write_text(GUEST)
    proc = emulate.run_python_emulated(
        [str(tmp_path / "guest.py"), str(bundle), str(tmp_path)], sysroot
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "ids.json").read_text())
    assert result["machine"] == "aarch64"
    assert result["ids"] == host["ids"]
    out = np.load(tmp_path / "out.npz")
    got, reference = out["embeddings"], out["reference"]
    # Same aarch64 kernels, transformers' ids padded to seq_len: the runtime adds no error.
    assert np.abs(got - reference).max() <= 1e-5
    # Against the x86 host: the bundle's own device threshold, as bench.py applies it.
    want = host["embeddings"][:GUEST_REFERENCE_TEXTS]
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    threshold = json.loads((bundle / "manifest.json").read_text())["reference"]["min_cosine"]
    assert cosine.min() >= threshold
