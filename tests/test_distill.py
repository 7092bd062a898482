"""Distillation on tiny random BERTs built here: losses by hand, student init, training, output
folder, resume, torchrun parity, argument errors and the CLI."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from benchmarks.tiny import write_sentence_transformer_layout  # noqa: E402
from edgepack.calibration import TextSet  # noqa: E402
from edgepack.distill.data import (  # noqa: E402
    LabelledSet,
    epoch_batches,
    label_ids,
    read_data,
    tokenize,
)
from edgepack.distill.layers import choose_layers  # noqa: E402
from edgepack.distill.losses import kd_loss  # noqa: E402
from edgepack.distill.objective import make_objective  # noqa: E402
from edgepack.distill.stage import DistillSettings, distill  # noqa: E402
from edgepack.distill.student import build_student, keep_layers, layer_map, load_teacher  # noqa: E402
from edgepack.errors import UserError  # noqa: E402
from edgepack.load.model import load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB = (
    "the a cat dog bird fish tree house car road sun moon rain snow wind fire water stone "
    "red blue green small big old new fast slow happy sad runs sleeps eats sees likes under "
    "over near far with without and but then now today night morning river hill city town"
)
WORDS = VOCAB.split()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine: a second thread only adds spin-wait contention
    (measured 12x slower), so these tests run single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_texts(n: int, seed: int = 0) -> tuple[str, ...]:
    import random

    rng = random.Random(seed)
    return tuple(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + f" {i % 7}"
        for i in range(n)
    )


def make_teacher(
    folder: Path, layers: int = 4, sentence: bool = True, labels: int = 0, seed: int = 0
) -> Path:
    """A tiny random BERT (optionally a sentence-transformers folder or a classifier)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *map(str, range(10))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tok.save_pretrained(folder)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    if labels:
        config.num_labels = labels
        config.id2label = {i: f"c{i}" for i in range(labels)}
        config.label2id = {f"c{i}": i for i in range(labels)}
        model = transformers.BertForSequenceClassification(config)
    else:
        model = transformers.BertModel(config)
    model.save_pretrained(folder)
    if sentence and not labels:
        write_sentence_transformer_layout(folder, 32, 64)
    return folder


def small(**kw) -> DistillSettings:
    base = {
        "layers": 2,
        "batch_size": 8,
        "lr": 1e-3,
        "max_length": 32,
        "checkpoint_every": 1000,
        "heldout_fraction": 0.1,
    }
    return DistillSettings(**{**base, **kw})


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# -- losses -------------------------------------------------------------------------------------


def test_kd_loss_equals_hand_computation() -> None:
    # Row 1: s = [2, 0], t = [0, 2], label 1; row 2: s = t = [0, 0], label 0. T = 2, alpha = 0.25.
    # Row 1 at T=2: p_s = softmax([1, 0]) = [e/(1+e), 1/(1+e)] = [0.7310586, 0.2689414],
    #   p_t = [0.2689414, 0.7310586]; KL(p_t || p_s) = 0.2689414·(−1) + 0.7310586·(+1) = 0.4621172.
    # Row 2: KL = 0. Soft = mean(0.4621172, 0) · T² = 0.2310586 · 4 = 0.9242344.
    # CE row 1 = log(1 + e²) = 2.1269280; row 2 = log 2 = 0.6931472; hard = 1.4100376.
    # Total = 0.25 · 0.9242344 + 0.75 · 1.4100376 = 0.2310586 + 1.0575282 = 1.2885868.
    s = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    got = kd_loss(s, t, torch.tensor([1, 0]), temperature=2.0, alpha=0.25)
    assert float(got) == pytest.approx(1.2885868, abs=1e-6)
    # Same thing written with math, so the constants above are not the only witness.
    e = math.e
    kl = (1 / (1 + e)) * math.log((1 / (1 + e)) / (e / (1 + e))) + (e / (1 + e)) * math.log(
        (e / (1 + e)) / (1 / (1 + e))
    )
    hand = 0.25 * (kl / 2) * 4 + 0.75 * (math.log(1 + e**2) + math.log(2)) / 2
    assert float(got) == pytest.approx(hand, abs=1e-6)


def test_kd_loss_without_labels_is_the_soft_loss_at_full_weight() -> None:
    s = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    assert float(kd_loss(s, t, None, 2.0, 0.25)) == pytest.approx(0.9242344, abs=1e-6)
    none_labelled = torch.tensor([-100, -100])
    assert float(kd_loss(s, t, none_labelled, 2.0, 0.25)) == pytest.approx(0.9242344, abs=1e-6)
    # Only row 1 labelled: hard = 2.1269280; 0.25 · 0.9242344 + 0.75 · 2.1269280 = 1.8262546.
    partly = torch.tensor([1, -100])
    assert float(kd_loss(s, t, partly, 2.0, 0.25)) == pytest.approx(1.8262546, abs=1e-6)


# -- student init -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "k", "expected"),
    [(6, 3, (1, 3, 5)), (6, 2, (2, 5)), (12, 4, (2, 5, 8, 11)), (6, 1, (5,)), (4, 4, (0, 1, 2, 3))],
)
def test_keep_layers_is_evenly_spaced_and_keeps_the_last(n, k, expected) -> None:
    assert keep_layers(n, k) == expected


def test_layer_choice_searches_all_subsets_when_few() -> None:
    # A score with a known best subset, (0, 4, 5); the search must find it among all 20.
    best, losses = choose_layers(
        6, 3, lambda keep: sum(abs(a - b) for a, b in zip(keep, (0, 4, 5), strict=True))
    )
    assert best == (0, 4, 5) and len(losses) == 20 and losses["0,4,5"] == 0.0


def test_layer_choice_is_greedy_when_subsets_are_many() -> None:
    # 12 choose 4 = 495 subsets: greedy removal, n + (n-1) + ... + (k+1) = 68 scorings.
    calls = []

    def score(keep: tuple[int, ...]) -> float:
        calls.append(keep)
        return -sum(2.0**i for i in keep)  # the later the layers, the lower the loss

    best, losses = choose_layers(12, 4, score)
    assert best == (8, 9, 10, 11) and len(calls) == len(losses) == 12 + 11 + 10 + 9 + 8 + 7 + 6 + 5


def test_layer_choice_ties_go_to_the_first_subset() -> None:
    assert choose_layers(4, 2, lambda keep: 1.0)[0] == (0, 1)


def test_even_layer_choice_keeps_the_evenly_spaced_layers(tmp_path: Path) -> None:
    teacher = load_model(str(make_teacher(tmp_path / "t")))
    settings = small(max_steps=2, layer_choice="even")
    distill(teacher, TextSet(make_texts(60), "synthetic"), settings, tmp_path / "s")
    record = json.loads((tmp_path / "s" / "distillation.json").read_text())["student"]
    assert record["keep"] == [1, 3] and record["choice"] == "even" and "choice_losses" not in record


def test_length_grouped_batches_cover_each_row_once_and_split_across_processes() -> None:
    lengths = [random.Random(i).randint(3, 60) for i in range(1000)]
    single = epoch_batches(1000, 32, 1, 0, seed=5, epoch=2, lengths=lengths)
    rows = [i for b in single for i in b]
    assert len(rows) == len(set(rows)) == 1000 // 32 * 32

    # Grouping cuts padding (tokens in batch-max-padded batches) well below random batching.
    def padded(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    plain = epoch_batches(1000, 32, 1, 0, seed=5, epoch=2)
    assert padded(single) < 0.7 * padded(plain)
    # Two processes: step s's local batches are together the single process's batch s.
    ranks = [epoch_batches(1000, 32, 2, r, seed=5, epoch=2, lengths=lengths) for r in (0, 1)]
    for s, batch in enumerate(single):
        assert sorted(ranks[0][s] + ranks[1][s]) == sorted(batch)
    # Another epoch, another order.
    assert epoch_batches(1000, 32, 1, 0, seed=5, epoch=3, lengths=lengths) != single


def test_student_copies_the_chosen_teacher_layers(tmp_path: Path) -> None:
    teacher = transformers.BertModel.from_pretrained(make_teacher(tmp_path / "t", layers=4))
    student = build_student(teacher, (0, 3))
    assert student.config.num_hidden_layers == 2
    t, s = teacher.state_dict(), student.state_dict()
    for new, old in ((0, 0), (1, 3)):
        for name in [k for k in s if k.startswith(f"encoder.layer.{new}.")]:
            source = name.replace(f"encoder.layer.{new}.", f"encoder.layer.{old}.")
            assert torch.equal(s[name], t[source]), name
    assert torch.equal(
        s["embeddings.word_embeddings.weight"], t["embeddings.word_embeddings.weight"]
    )
    # And not another layer: teacher layer 1 differs from student layer 1 (= teacher layer 3).
    key = "encoder.layer.{}.attention.self.query.weight"
    assert not torch.equal(s[key.format(1)], t[key.format(1)])


# -- training and output ------------------------------------------------------------------------


def test_distill_sentence_model_learns_and_writes_a_loadable_folder(tmp_path: Path) -> None:
    teacher = load_model(str(make_teacher(tmp_path / "t")))
    data = TextSet(make_texts(400), "synthetic")
    out = tmp_path / "student"
    model = distill(teacher, data, small(epochs=2, checkpoint_every=15), out)
    curve = json.loads((out / "distillation.json").read_text())["curve"]
    assert curve[0]["train_loss"] > 2 * curve[-1]["train_loss"], curve
    assert curve[-1]["mean_cosine"] > 0.95
    assert model.library == "sentence_transformers" and model.task == "feature-extraction"
    assert model.history[-1]["stage"] == "distill"
    loaded = transformers.AutoModel.from_pretrained(out)
    assert loaded.config.num_hidden_layers == 2
    again = load_model(str(out))
    assert (again.library, again.task) == ("sentence_transformers", "feature-extraction")
    record = json.loads((out / "distillation.json").read_text())
    losses = record["student"]["choice_losses"]  # every 2-of-4 subset, scored before training
    assert len(losses) == 6 and record["student"]["choice"] == "measured"
    assert ",".join(map(str, record["student"]["keep"])) == min(losses, key=losses.get)
    assert record["teacher"]["weights_sha256"] == teacher.weights_sha256
    assert record["data"] == {"source": "synthetic", "count": 400, "sha256": data.sha256}
    assert record["steps"] == 2 * ((400 - 40) // 8)
    assert record["heldout_count"] == 40 and record["train_count"] == 360
    assert (out / "1_Pooling" / "config.json").is_file() and (out / "checkpoints").is_dir()
    # The pooler is outside an embedding loss: frozen, so it is still the teacher's.
    assert record["frozen_parameters"] == 32 * 32 + 32
    assert len(record["losses"]["hidden_scales"]) == 3  # embeddings + 2 layers
    pooler = "pooler.dense.weight"
    assert torch.equal(weights(out)[pooler], weights(teacher.path)[pooler])


def test_distill_classifier_uses_labels_and_reports_accuracy(tmp_path: Path) -> None:
    teacher = load_model(str(make_teacher(tmp_path / "t", labels=3)))
    texts = make_texts(200)
    labels = tuple(["c0", "c1", 2, None][i % 4] for i in range(200))
    data = LabelledSet(texts, labels, "labelled")
    model = distill(teacher, data, small(max_steps=20, alpha=0.7), tmp_path / "s")
    record = json.loads((tmp_path / "s" / "distillation.json").read_text())
    assert model.task == "text-classification"
    assert "accuracy" in record["final_heldout"] and "top1_agreement" in record["final_heldout"]
    assert record["losses"]["soft_weight_alpha"] == 0.7 and record["losses"]["hard_weight"] == 0.3
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "s")
    assert loaded.config.num_labels == 3


def test_read_data_takes_labels_from_csv_and_maps_names(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("text,label\nhello there,c1\n,c0\nbye now,2\nno label,\n")
    data = read_data([path])
    assert isinstance(data, LabelledSet)
    assert data.texts == ("hello there", "bye now", "no label")
    config = transformers.BertConfig(id2label={0: "c0", 1: "c1", 2: "c2"})
    assert label_ids(data, config) == [1, 2, -100]
    bad = LabelledSet(("x",), ("c9",), "bad.csv")
    with pytest.raises(UserError, match="'c9' is not a teacher label; valid labels are: c0, c1"):
        label_ids(bad, config)


def test_time_budget_stops_cleanly_and_still_saves(tmp_path: Path) -> None:
    teacher = load_model(str(make_teacher(tmp_path / "t")))
    data = TextSet(make_texts(400), "synthetic")
    distill(teacher, data, small(epochs=50, time_budget=3.0), tmp_path / "s")
    record = json.loads((tmp_path / "s" / "distillation.json").read_text())
    assert record["stopped_by"] == "time budget"
    assert 0 < record["steps"] < record["planned_steps"]
    assert (tmp_path / "s" / "model.safetensors").is_file()


def test_student_folder_is_used_as_given(tmp_path: Path) -> None:
    make_teacher(tmp_path / "t", layers=4)
    small_model = make_teacher(tmp_path / "ready", layers=2, seed=5)
    teacher = load_model(str(tmp_path / "t"))
    data = TextSet(make_texts(120), "synthetic")
    distill(teacher, data, small(max_steps=3), tmp_path / "s", student_dir=small_model)
    record = json.loads((tmp_path / "s" / "distillation.json").read_text())
    assert record["student"]["init"] == "folder"
    assert record["student"]["hidden_map"] == [[0, 0], [1, 2], [2, 4]]


def test_a_distilled_student_keeps_its_layer_map_when_trained_again(tmp_path: Path) -> None:
    teacher = load_model(str(make_teacher(tmp_path / "t", layers=4)))
    data = TextSet(make_texts(120), "synthetic")
    distill(teacher, data, small(max_steps=2, keep=(0, 1)), tmp_path / "first")
    distill(teacher, data, small(max_steps=2), tmp_path / "again", student_dir=tmp_path / "first")
    record = json.loads((tmp_path / "again" / "distillation.json").read_text())["student"]
    assert record["mapped_to"] == [0, 1]  # not the even rule's (1, 3)
    assert record["hidden_map"] == [[0, 0], [1, 1], [2, 2]]


def test_pruned_sentence_model_recovers_as_a_student(tmp_path: Path) -> None:
    from edgepack.prune import PruneSettings, is_pruned, load_pruned, prune_model

    teacher = load_model(str(make_teacher(tmp_path / "t", layers=2)))
    data = TextSet(make_texts(120), "synthetic")
    pruned = prune_model(teacher, data, PruneSettings(budget=0.3, multiple=32), tmp_path / "p")
    student = distill(teacher, data, small(max_steps=3), tmp_path / "s", student_dir=pruned.path)
    assert is_pruned(student.path)  # its uneven shapes still load through the pruning record
    net = load_pruned(student.path)
    before = load_pruned(pruned.path)
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert changed, "training did not touch the pruned student"


# -- resume -------------------------------------------------------------------------------------


def test_resume_after_interruption_gives_the_uninterrupted_weights(tmp_path, monkeypatch) -> None:
    from edgepack.distill import loop as distill_loop

    teacher = load_model(str(make_teacher(tmp_path / "t")))
    data = TextSet(make_texts(200), "synthetic")
    settings = small(max_steps=20, checkpoint_every=5, dropout=0.1)
    distill(teacher, data, settings, tmp_path / "straight")

    original = distill_loop.Loop._train_step
    calls = {"n": 0}

    def interrupted(self, indices):
        calls["n"] += 1
        if calls["n"] == 13:  # steps 11-12 ran after the step-10 checkpoint and are lost
            raise KeyboardInterrupt
        return original(self, indices)

    monkeypatch.setattr(distill_loop.Loop, "_train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, data, settings, tmp_path / "resumed")
    monkeypatch.setattr(distill_loop.Loop, "_train_step", original)
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    distill(teacher, data, settings, tmp_path / "resumed", resume=True)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    curve = json.loads((tmp_path / "resumed" / "distillation.json").read_text())["curve"]
    assert [p["step"] for p in curve] == [5, 10, 15, 20]


def test_resume_refuses_a_checkpoint_from_other_settings(tmp_path: Path) -> None:
    teacher = load_model(str(make_teacher(tmp_path / "t")))
    data = TextSet(make_texts(120), "synthetic")
    distill(teacher, data, small(max_steps=4, checkpoint_every=2), tmp_path / "s")
    with pytest.raises(UserError, match=r"lr \(0.001 -> 0.01\)"):
        distill(teacher, data, small(max_steps=4, lr=1e-2), tmp_path / "s", resume=True)
    with pytest.raises(UserError, match="not empty; pass --resume"):
        distill(teacher, data, small(max_steps=4), tmp_path / "s")


# -- bad arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"alpha": 1.5}, r"--alpha must be in \[0, 1\], got 1.5"),
        ({"temperature": 0.0}, "--temperature must be > 0"),
        ({"layers": 9}, "--layers 9 is out of range; the teacher has 4 layers"),
        ({"keep": (0, 7)}, "layer 7 does not exist; the teacher has layers 0..3"),
        ({"keep": (2, 1)}, "must list distinct layers in order"),
        ({"batch_size": 500}, "fewer than one --batch-size 500"),
    ],
)
def test_bad_arguments_are_user_errors(tmp_path: Path, settings, message) -> None:
    teacher = load_model(str(make_teacher(tmp_path / "t")))
    data = TextSet(make_texts(60), "synthetic")
    with pytest.raises(UserError, match=message):
        distill(teacher, data, small(**settings), tmp_path / "s")


def test_heldout_overlapping_training_texts_is_refused(tmp_path: Path) -> None:
    teacher = load_model(str(make_teacher(tmp_path / "t")))
    data = TextSet(make_texts(60), "synthetic")
    with pytest.raises(UserError, match="3 held-out texts are also training texts"):
        distill(teacher, data, small(), tmp_path / "s", heldout=TextSet(data.texts[:3], "h"))


# -- CLI ----------------------------------------------------------------------------------------


def run_cli(args: list[str]):
    from click.testing import CliRunner

    from edgepack.cli import cli
    from edgepack.cli.distill import distill as command

    if "distill" not in cli.commands:
        cli.add_command(command)
    return CliRunner().invoke(cli, ["distill", *args])


def test_cli_distils_and_prints_the_student_folder(tmp_path: Path) -> None:
    teacher = make_teacher(tmp_path / "t")
    data = tmp_path / "d.txt"
    data.write_text("\n".join(make_texts(80)))
    out = tmp_path / "s"
    common = ["--teacher", str(teacher), "--data", str(data), "--out", str(out), "--quiet"]
    result = run_cli([*common, "--layers", "2", "--max-steps", "3", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(out)
    assert json.loads((out / "distillation.json").read_text())["steps"] == 3
    bad = run_cli([*common, "--alpha", "2"])
    assert bad.exit_code == 2 and "--alpha must be in [0, 1], got 2.0" in bad.output
    keep = run_cli([*common, "--keep", "one,two"])
    assert keep.exit_code == 2 and "--keep 'one,two' must be comma-separated" in keep.output


# -- torchrun -----------------------------------------------------------------------------------


def free_port() -> int:
    """torchrun's --master_port 0 hangs the workers (they never learn the port); pick one."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_half_batch_gradients_average_to_the_whole_batch_gradient(tmp_path: Path) -> None:
    """What DDP parity rests on: every loss is a mean of per-example values, so the mean of two
    processes' gradients on interleaved halves -- each padded to its own longest text -- equals
    one process's gradient on the whole batch."""
    folder = make_teacher(tmp_path / "t")
    teacher = load_model(str(folder))
    teacher_model = load_teacher(teacher)
    student = build_student(teacher_model, (1, 3)).eval()  # eval: no dropout noise
    tokenizer = transformers.BertTokenizerFast.from_pretrained(folder)
    texts = list(make_texts(8, seed=3))
    whole_batch = tokenize(tokenizer, texts, 32)
    objective = make_objective(teacher, small(), layer_map((1, 3)))
    objective = objective.calibrate(teacher_model, whole_batch)

    def gradients(batch_texts: list[str]) -> dict[str, torch.Tensor]:
        batch = tokenize(tokenizer, batch_texts, 32)
        with torch.no_grad():
            t_out = teacher_model(**batch, output_hidden_states=True)
        s_out = student(**batch, output_hidden_states=True)
        loss, _ = objective.loss(s_out, t_out, batch["attention_mask"], None)
        student.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    halves = tokenize(tokenizer, texts[0::2], 32), tokenize(tokenizer, texts[1::2], 32)
    assert halves[0]["input_ids"].shape[1] != halves[1]["input_ids"].shape[1]  # padding differs
    whole, a, b = gradients(texts), gradients(texts[0::2]), gradients(texts[1::2])
    assert whole.keys() == a.keys() and len(whole) > 20
    for name, grad in whole.items():
        assert torch.allclose(grad, (a[name] + b[name]) / 2, rtol=1e-4, atol=1e-7), name


def run_module(args: list[str], out: Path, processes: int = 1) -> dict[str, torch.Tensor]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        launch += ["--master_port", str(free_port())]
    command = [*launch, "-m", "edgepack.cli", "distill", *args, "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return weights(out)


def mean_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    total = sum(float((a[k] - b[k]).abs().sum()) for k in a)
    return total / sum(a[k].numel() for k in a)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path: Path) -> None:
    teacher = make_teacher(tmp_path / "t")
    data = tmp_path / "d.txt"
    data.write_text("\n".join(make_texts(200)))
    args = ["--teacher", str(teacher), "--data", str(data), "--layers", "2", "--max-steps", "12"]
    args += ["--batch-size", "8", "--lr", "1e-3", "--max-length", "32", "--quiet"]
    two = run_module(args, tmp_path / "two", processes=2)
    one = run_module(args, tmp_path / "one")
    record = json.loads((tmp_path / "two" / "distillation.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 12
    # Adam turns float noise in near-zero gradients into lr-sized steps, so single weights can
    # differ by a few lr; what must agree is the function. The yardstick: a run on another order.
    other_order = run_module([*args, "--seed", "1"], tmp_path / "seed1")
    texts = list(make_texts(64, seed=9))
    one_emb, two_emb, other_emb = (embed(tmp_path / n, texts) for n in ("one", "two", "seed1"))
    parity = float((1 - (one_emb * two_emb).sum(-1)).mean())
    order = float((1 - (one_emb * other_emb).sum(-1)).mean())
    assert parity < 2e-5 and parity < 0.1 * order, (parity, order)
    assert mean_abs_diff(one, two) < 0.5 * mean_abs_diff(one, other_order)


def embed(folder: Path, texts: list[str]) -> torch.Tensor:
    from edgepack.distill.losses import pool

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    model = transformers.AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return pool(model(**batch).last_hidden_state, batch["attention_mask"], "mean", True)
